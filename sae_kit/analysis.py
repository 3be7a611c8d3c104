"""``sae-kit analyze``: what each feature of an SAE does on held-out text, into a feature store.

One pass runs held-out windows through the model up to the SAE's hook and encodes them; only the
sparse codes are kept (tokens × k entries, independent of the number of features). Then the
features are processed in chunks — sorting the codes by feature gives each feature's firings as
one contiguous segment — and each chunk's rows go straight into SQLite, so memory grows with the
analysed tokens, not with d_sae × tokens.

Per feature: density, mean and max activation, a histogram of its non-zero activations (from
their minimum to their maximum), the top activating examples (at most one per window) and random
samples from equal-count activation quantiles, each with ±``example_radius`` tokens of context and the feature's per-token
activations; logit effects (its decoder direction through the model's final-norm gain and the
unembedding: which next tokens it promotes and suppresses); nearest features by decoder cosine.

A transcoder is analysed the same way: its examples are where it fires reading its input hook, and its
logit effects are those of its decoder rows, which write to the output hook (an MLP's output adds to the
residual stream, so the same unembedding path applies).

Choices: logit effects use the final norm's gain (and centring for LayerNorm) but not its
data-dependent scale, a positive per-token factor that does not change the ranking; BOS positions
are skipped as at harvest time (their outlier norms would top every feature's examples).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_kit.config import ConfigError
from sae_kit.feature_store import EXPLANATIONS_FILE, STORE_FILE, FeatureStoreWriter
from sae_kit.fileio import atomic_write
from sae_kit.seeding import derive_seed


@dataclass
class AnalyzeConfig:
    dataset: str = "default"
    split: str = "heldout"
    context: int = 64
    batch_size: int = 8
    tokens: int = 32_768  # token positions (windows × context) to analyse
    top_examples: int = 10
    quantiles: int = 4
    quantile_examples: int = 3
    example_radius: int = 8  # tokens of context on each side of an example's token
    # For `sae-kit explain` (not shown by the browser): held-out positives across the quantiles, in
    # windows none of the shown examples use (the scoring set), and windows where the feature is
    # silent: random ones and ones where a neighbouring feature (by decoder cosine) fires.
    heldout_examples: int = 16
    random_negatives: int = 8
    contrast_negatives: int = 8
    histogram_bins: int = 32
    logit_tokens: int = 10
    neighbours: int = 10
    feature_chunk: int = 256
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("context", "batch_size", "tokens", "top_examples", "quantiles", "histogram_bins",
                     "logit_tokens", "neighbours", "feature_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("quantile_examples", "example_radius", "heldout_examples", "random_negatives",
                     "contrast_negatives"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


def analyze_sae_folder(sae_dir: str | Path, cfg: AnalyzeConfig, *, model_name: str | None = None,
                       hook: str | None = None, out: str | Path | None = None) -> Path:
    """Load the SAE in ``sae_dir`` and its model (``model_name``, else the one its cfg.json names) and analyse it."""
    from sae_kit.models import load_model
    from sae_kit.sae import load_sae

    sae = load_sae(sae_dir)
    model_name = model_name or sae.cfg.metadata.get("model_name")
    if not model_name:
        raise ConfigError(f"{sae_dir}/cfg.json names no model_name; pass the model explicitly (--model)")
    return analyze(sae, load_model(model_name), cfg, out, hook=hook, sae_path=sae_dir)


@torch.no_grad()
def analyze(sae, model, cfg: AnalyzeConfig, out: str | Path | None = None, *, hook: str | None = None,
            sae_path: str | Path | None = None) -> Path:
    """Analyse ``sae`` on ``model``'s held-out text and write the feature store; returns its path.

    ``out`` defaults to ``<sae_path>/features.sqlite``. An existing store is replaced only once the
    new one is complete.
    """
    if out is None:
        if sae_path is None:
            raise ValueError("pass out= (the store's path) or sae_path= (the store goes inside it)")
        out = Path(sae_path) / STORE_FILE
    out = Path(out)
    hook = hook or sae.cfg.metadata.get("hook_name")
    if not hook:
        raise ConfigError("the SAE's cfg.json names no hook_name; pass the hook explicitly (--hook)")
    if model.hook_dim(hook) != sae.cfg.d_in:
        raise ConfigError(f"hook {hook} of {model.name} has width {model.hook_dim(hook)} but the SAE expects "
                          f"d_in={sae.cfg.d_in}; analyse it with the model it was trained on")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: the folder {out.parent} does not exist")
    sae.eval()
    windows, indices, values, n_tokens = _encode_heldout(sae, model, hook, cfg)
    meta = {"sae": str(sae_path) if sae_path is not None else None, "model": model.name, "hook": hook,
            "dataset": cfg.dataset, "split": cfg.split, "context": int(windows.shape[1]),
            "n_windows": int(windows.shape[0]), "n_tokens": n_tokens, "d_sae": sae.cfg.d_sae,
            "architecture": sae.cfg.architecture, "histogram_bins": cfg.histogram_bins, "config": asdict(cfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if sae.is_transcoder:  # examples are read at the input hook; logit effects are of the output directions
        meta["hook_out"] = sae.cfg.metadata.get("hook_name_out")
    atomic_write(out, lambda temp: _write_store(temp, meta, sae, model, cfg, windows, indices, values))
    if sae_path is not None and (Path(sae_path) / EXPLANATIONS_FILE).is_file():
        _load_exported_explanations(out, Path(sae_path) / EXPLANATIONS_FILE)
    return out


def _load_exported_explanations(store: Path, source: Path) -> None:
    """Explanations that came with an imported SAE (``sae-kit export`` wrote them) into its new store."""
    import json

    from sae_kit.feature_store import import_explanations

    try:
        import_explanations(store, json.loads(source.read_text(encoding="utf-8")))
    except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{source}: {exc}; the feature store was written without them (fix the file and "
                          f"run `sae-kit explain {source.parent} --import {source}`, or delete it)") from None


# --------------------------------------------------------------------------------------------------
# Pass over the text
# --------------------------------------------------------------------------------------------------
def _stream(model, hook: str, cfg: AnalyzeConfig):
    from sae_kit.harvest import HarvestConfig, WindowStream

    return WindowStream(HarvestConfig(out="", hooks=[hook], dataset=cfg.dataset, context=cfg.context,
                                      batch_size=cfg.batch_size), model.tokenizer, split=cfg.split)


def _encode_heldout(sae, model, hook: str, cfg: AnalyzeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(windows [W, T] int32, code indices [W*T, K] int32, code values [W*T, K] float32 with 0 = inactive
    or skipped, number of analysed positions)."""
    stream = _stream(model, hook, cfg)
    windows, indices, values = [], [], []
    width = 1
    seen = kept = 0
    bar = tqdm(total=cfg.tokens, unit="tok", desc="analyze", disable=not cfg.progress)
    for tokens in stream.batches():
        tokens = tokens[: max(1, (cfg.tokens - seen + cfg.context - 1) // cfg.context)]
        keep = stream.keep_mask(tokens)
        kept += int(keep.sum())
        acts = model.capture(tokens.to(model.device), hook)[hook]
        codes = sae.encode(acts.flatten(0, 1).cpu())
        codes_values = codes.values.detach().float() * keep.flatten()[:, None]
        windows.append(tokens.to(torch.int32).numpy())
        indices.append(codes.indices.to(torch.int32).numpy())
        values.append(codes_values.numpy())
        width = max(width, codes.indices.shape[1])
        seen += tokens.numel()
        bar.update(tokens.numel())
        if seen >= cfg.tokens:
            break
    bar.close()
    if not windows:
        raise ValueError(f"no {cfg.split} text of at least {cfg.context} tokens in dataset {cfg.dataset!r}")
    # Variable-k architectures give batches of different widths; pad to one.
    indices = [np.pad(block, ((0, 0), (0, width - block.shape[1]))) for block in indices]
    values = [np.pad(block, ((0, 0), (0, width - block.shape[1]))) for block in values]
    return np.concatenate(windows), np.concatenate(indices), np.concatenate(values), kept


# --------------------------------------------------------------------------------------------------
# Per-feature statistics
# --------------------------------------------------------------------------------------------------
def _write_store(path: Path, meta: dict, sae, model, cfg: AnalyzeConfig, windows: np.ndarray,
                 indices: np.ndarray, values: np.ndarray) -> None:
    writer = FeatureStoreWriter(path, meta)
    writer.add_windows(0, windows)
    tokenizer = model.tokenizer
    writer.add_vocab({int(t): tokenizer.decode([int(t)]) for t in np.unique(windows)})

    context = windows.shape[1]
    n_tokens = meta["n_tokens"]
    # Every firing as (feature, row, value), sorted by feature: each feature's firings are one segment.
    active = values != 0
    rows = np.nonzero(active)[0].astype(np.int64)
    features = indices[active].astype(np.int64)
    acts = values[active]
    order = np.argsort(features, kind="stable")
    rows, features, acts = rows[order], features[order], acts[order]
    d_sae = sae.cfg.d_sae
    counts = np.bincount(features, minlength=d_sae)
    starts = np.concatenate([[0], np.cumsum(counts)])
    directions = sae.decoder_directions()
    unembed = _unembedding(model)
    kept_rows = np.nonzero(values.any(axis=1))[0]  # positions not skipped (BOS has no codes)

    bar = tqdm(total=d_sae, unit="feat", desc="features", disable=not cfg.progress)
    for first in range(0, d_sae, cfg.feature_chunk):
        chunk = range(first, min(d_sae, first + cfg.feature_chunk))
        pos_logits, neg_logits = _logit_effects(directions[chunk.start:chunk.stop], unembed, tokenizer,
                                                cfg.logit_tokens)
        neighbours = _neighbours(directions, chunk, cfg.neighbours)
        feature_rows, example_rows = [], []
        for offset, feature in enumerate(chunk):
            segment = slice(starts[feature], starts[feature + 1])
            f_rows, f_acts = rows[segment], acts[segment]
            examples = list(_examples(feature, f_rows, f_acts, indices, values, context, cfg))
            shown_windows = {e[4] for e in examples}
            example_rows += examples
            example_rows += _scoring_examples(feature, f_rows, f_acts, shown_windows, neighbours[offset], rows,
                                              acts, starts, kept_rows, indices, values, context, cfg)
            top_tokens = dict.fromkeys(tokenizer.decode([int(windows[e[4], e[6]])]).strip()
                                       for e in examples if e[1] == "top")
            hist_min = float(f_acts.min()) if f_acts.size else 0.0
            hist_max = float(f_acts.max()) if f_acts.size else 0.0
            hist = (np.histogram(f_acts, bins=cfg.histogram_bins, range=(hist_min, hist_max))[0].tolist()
                    if f_acts.size and hist_max > hist_min else [int(f_acts.size)] + [0] * (cfg.histogram_bins - 1))
            feature_rows.append({
                "id": feature, "fire_count": int(f_acts.size), "density": f_acts.size / max(1, n_tokens),
                "max_act": hist_max, "mean_act": float(f_acts.mean()) if f_acts.size else 0.0,
                "hist_min": hist_min, "hist_max": hist_max, "hist": hist,
                "pos_logits": pos_logits[offset], "neg_logits": neg_logits[offset], "neighbours": neighbours[offset],
                "top_tokens": " ".join(token for token in top_tokens if token),
            })
        writer.add_features(feature_rows)
        writer.add_examples(example_rows)
        bar.update(len(chunk))
    bar.close()
    writer.finish()


def _examples(feature: int, rows: np.ndarray, acts: np.ndarray, indices: np.ndarray, values: np.ndarray,
              context: int, cfg: AnalyzeConfig) -> Iterator[tuple]:
    """Top examples (one per window, by activation) and random samples from each quantile bin."""
    if rows.size == 0:
        return
    by_value = np.argsort(-acts, kind="stable")
    windows_in_order = rows[by_value] // context
    _, first_of_window = np.unique(windows_in_order, return_index=True)
    top = by_value[np.sort(first_of_window)[: cfg.top_examples]]
    for rank, i in enumerate(top):
        yield _example(feature, "top", 0, rank, int(rows[i]), indices, values, context, cfg.example_radius)
    if cfg.quantile_examples == 0:
        return
    ascending = by_value[::-1]
    generator = np.random.default_rng(derive_seed("analysis-quantiles", cfg.seed, feature))
    for q, members in enumerate(np.array_split(ascending, cfg.quantiles)):
        if members.size == 0:
            continue
        chosen = generator.choice(members, size=min(cfg.quantile_examples, members.size), replace=False)
        for rank, i in enumerate(sorted(chosen, key=lambda j: -acts[j])):
            yield _example(feature, "quantile", q, rank, int(rows[i]), indices, values, context, cfg.example_radius)


def _scoring_examples(feature: int, f_rows: np.ndarray, f_acts: np.ndarray, shown_windows: set[int],
                      neighbours: list, rows: np.ndarray, acts: np.ndarray, starts: np.ndarray,
                      kept_rows: np.ndarray, indices: np.ndarray, values: np.ndarray, context: int,
                      cfg: AnalyzeConfig) -> list[tuple]:
    """The examples ``sae-kit explain`` scores with, none in a window the browser shows for this feature:
    ``heldout`` positives (bin = activation quantile, 0 lowest, one per window), ``random`` windows and
    ``contrast`` windows (bin = the neighbour that fires there) where this feature is silent on the whole excerpt."""
    if f_rows.size == 0:
        return []
    generator = np.random.default_rng(derive_seed("analysis-scoring", cfg.seed, feature))
    used = set(shown_windows)
    out: list[tuple] = []
    if cfg.heldout_examples:
        ascending = np.argsort(f_acts, kind="stable")
        bins = np.array_split(ascending, cfg.quantiles)
        quota = np.diff(np.linspace(0, cfg.heldout_examples, cfg.quantiles + 1).round().astype(int))
        for q, (members, wanted) in enumerate(zip(bins, quota)):
            chosen = []
            for i in generator.permutation(members):
                window = int(f_rows[i]) // context
                if window not in used:
                    used.add(window)
                    chosen.append(int(i))
                    if len(chosen) == wanted:
                        break
            for rank, i in enumerate(sorted(chosen, key=lambda j: -f_acts[j])):
                out.append(_example(feature, "heldout", q, rank, int(f_rows[i]), indices, values, context,
                                    cfg.example_radius))

    def silent(row: int) -> tuple | None:
        example = _example(feature, "", 0, 0, row, indices, values, context, cfg.example_radius)
        return example if not example[8].any() and example[4] not in used else None

    rank = 0
    for _ in range(cfg.random_negatives * 8):  # a dense feature leaves few silent windows: bounded tries
        if rank == cfg.random_negatives or kept_rows.size == 0:
            break
        example = silent(int(kept_rows[generator.integers(kept_rows.size)]))
        if example is not None:
            used.add(example[4])
            out.append((feature, "random", 0, rank, *example[4:]))
            rank += 1
    # Contrast: each neighbour's strongest firings (one per window) where this feature is silent, round robin.
    candidates = []
    for neighbour, _cosine in neighbours:
        segment = slice(starts[neighbour], starts[neighbour + 1])
        n_rows = rows[segment][np.argsort(-acts[segment], kind="stable")]
        candidates.append((int(neighbour), iter(n_rows[:64])))
    rank = 0
    while candidates and rank < cfg.contrast_negatives:
        for entry in list(candidates):
            neighbour, remaining = entry
            for row in remaining:
                example = silent(int(row))
                if example is not None:
                    used.add(example[4])
                    out.append((feature, "contrast", neighbour, rank, *example[4:]))
                    rank += 1
                    break
            else:
                candidates.remove(entry)
            if rank == cfg.contrast_negatives:
                break
    return out


def _example(feature: int, kind: str, bin_: int, rank: int, row: int, indices: np.ndarray, values: np.ndarray,
             context: int, radius: int) -> tuple:
    window, position = divmod(row, context)
    start, stop = max(0, position - radius), min(context, position + radius + 1)
    block = slice(window * context + start, window * context + stop)
    acts = np.where(indices[block] == feature, values[block], 0.0).sum(axis=1).astype(np.float32)
    return (feature, kind, bin_, rank, window, start, position, float(values[row][indices[row] == feature].sum()), acts)


def _unembedding(model) -> torch.Tensor:
    """[d_model, vocab]: the final norm's gain (rows) times the unembedding, with centring for LayerNorm."""
    W_U = model.model.W_U.detach().float()
    norm = getattr(model.model, "ln_final", None)
    gain = None
    if norm is not None:
        for name, parameter in norm.named_parameters():
            if name.split(".")[-1] in ("w", "weight") and parameter.dim() == 1:
                gain = parameter.detach().float()
    if gain is not None:
        W_U = gain[:, None] * W_U
    if norm is not None and "rms" not in type(norm).__name__.lower():
        # LayerNorm removes the mean over d_model from its input; so does a direction's effect.
        W_U = W_U - W_U.mean(dim=0, keepdim=True)
    return W_U


def _logit_effects(directions: torch.Tensor, W_U: torch.Tensor, tokenizer, n: int) -> tuple[list, list]:
    effects = directions @ W_U
    n = min(n, effects.shape[1])
    top = effects.topk(n, dim=1)
    bottom = effects.topk(n, dim=1, largest=False)

    def as_pairs(result) -> list[list]:
        return [[[tokenizer.decode([int(t)]), float(v)] for t, v in zip(ids, vals)]
                for ids, vals in zip(result.indices, result.values)]

    return as_pairs(top), as_pairs(bottom)


def _neighbours(directions: torch.Tensor, chunk: range, n: int) -> list[list]:
    similarity = directions[chunk.start:chunk.stop] @ directions.T
    similarity[torch.arange(len(chunk)), torch.arange(chunk.start, chunk.stop)] = -float("inf")
    n = min(n, directions.shape[0] - 1)
    if n <= 0:
        return [[] for _ in chunk]
    best = similarity.topk(n, dim=1)
    return [[[int(i), float(c)] for i, c in zip(ids, vals)] for ids, vals in zip(best.indices, best.values)]
