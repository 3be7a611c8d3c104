"""A self-contained plotly HTML report of a run's curves (metrics.jsonl)."""
from __future__ import annotations

import json
from pathlib import Path

LOSS_PANEL = "Loss terms"
# The other panels are fixed; the loss panel holds "loss" and every other per-step number the run
# logged (each architecture's and plugin's loss terms), so a new term needs no edit here.
PANELS = (
    (LOSS_PANEL, ("loss", "reconstruction")),
    ("Held-out FVU", ("eval/fvu", "eval/nmse_mean_token")),
    ("L0 (active latents per token)", ("l0", "eval/l0_mean")),
    ("Dead / dense latent fraction", ("dead_fraction", "eval/dead_fraction", "eval/dense_fraction")),
    ("Learning rate", ("lr",)),
)
NOT_PLOTTED = ("step", "tokens")


def panels(records: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """PANELS with the loss panel extended by the logged keys no other panel shows."""
    shown = {key for _, keys in PANELS for key in keys} | set(NOT_PLOTTED)
    extra = sorted({key for r in records for key, value in r.items()
                    if key not in shown and not key.startswith("eval/") and isinstance(value, (int, float))})
    return [(name, keys + tuple(extra) if name == LOSS_PANEL else keys) for name, keys in PANELS]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(metrics_path: str | Path, out_path: str | Path, title: str = "SAE training") -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = read_metrics(metrics_path)
    layout = panels(records)
    fig = make_subplots(rows=len(layout), cols=1, subplot_titles=[name for name, _ in layout], vertical_spacing=0.06)
    for row, (_, keys) in enumerate(layout, start=1):
        for key in keys:
            points = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                fig.add_trace(go.Scatter(x=xs, y=ys, name=key, mode="lines+markers" if key.startswith("eval/") else "lines"), row=row, col=1)
        fig.update_xaxes(title_text="training tokens", row=row, col=1)
    fig.update_layout(title=title, height=300 * len(layout), template="plotly_white")
    out_path = Path(out_path)
    # Inline plotly.js: the report opens offline and can be shared as one file.
    fig.write_html(str(out_path), include_plotlyjs=True, full_html=True)
    return out_path
