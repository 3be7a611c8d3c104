"""A self-contained plotly HTML report of a run's curves (metrics.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("Loss terms", ("loss", "reconstruction", "auxk", "aux_zipf", "afa", "l1")),
    ("Held-out FVU", ("eval/fvu", "eval/nmse_mean_token")),
    ("L0 (active latents per token)", ("l0", "eval/l0_mean")),
    ("Dead / dense latent fraction", ("dead_fraction", "eval/dead_fraction", "eval/dense_fraction")),
    ("Learning rate", ("lr",)),
)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(metrics_path: str | Path, out_path: str | Path, title: str = "SAE training") -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = read_metrics(metrics_path)
    fig = make_subplots(rows=len(PANELS), cols=1, subplot_titles=[name for name, _ in PANELS], vertical_spacing=0.06)
    for row, (_, keys) in enumerate(PANELS, start=1):
        for key in keys:
            points = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                fig.add_trace(go.Scatter(x=xs, y=ys, name=key, mode="lines+markers" if key.startswith("eval/") else "lines"), row=row, col=1)
        fig.update_xaxes(title_text="training tokens", row=row, col=1)
    fig.update_layout(title=title, height=300 * len(PANELS), template="plotly_white")
    out_path = Path(out_path)
    # Inline plotly.js: the report opens offline and can be shared as one file.
    fig.write_html(str(out_path), include_plotlyjs=True, full_html=True)
    return out_path
