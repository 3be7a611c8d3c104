"""Harvest a language model's activations at one or more hooks into activation stores.

text → fixed token windows → one model pass per batch (stopped after the last hooked layer) →
one store per hook (``OUT/<hook name>/``), rows = kept positions (BOS and padding dropped by default).

Resumable: windows are a deterministic function of (dataset, tokenizer, context), so a re-run counts
the rows each store already holds, skips the batches of windows they cover without running the
model, and drops the leading rows of the first re-run batch that are already stored. Rows reach
disk in whole shards (and the last, short one when the harvest completes), so an interrupted
harvest leaves the same shards behind whether it was killed or stopped by an exception. A killed or
interrupted harvest re-run with the same command therefore yields exactly the store (same shards,
same bytes) an uninterrupted run writes.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from sae_kit.config import DTYPES, ConfigError, setting
from sae_kit.seeding import derived_generator
from sae_kit.store import ActivationStore, ActivationStoreWriter
from sae_kit.text import batched_windows, iter_texts, skip_positions_mask, token_windows


@dataclass
class HarvestConfig:
    """The settings of ``sae-kit harvest`` (its flags are generated from these fields)."""

    out: str = setting(help="folder: one store per hook in OUT/<hook>/")
    hooks: list[str] = setting(factory=list, help="transformer-lens hook name, repeatable", flags=("--hook",),
                               required=True)
    model: str = setting("smollm2", "smollm2 (embedded default), gpt2..., or a local HF model folder")
    dataset: str = setting("default", "'default' (bundled corpus), a local file/folder, or a hub name")
    split: str = setting("train", "dataset split")
    column: str = setting("text", "text column of jsonl/parquet/hub datasets")
    tokens: int = setting(1_000_000, "activation rows per hook", required=True)
    context: int = setting(128, "tokens per context window")
    batch_size: int = setting(8, "context windows per forward pass")
    prepend_bos: bool = setting(True, "do not prepend BOS to each window", flags=("--no-bos",))
    skip_bos: bool = setting(True, "keep the BOS position's activations", flags=("--keep-bos",))
    dtype: str = setting("float32", "storage dtype", choices=DTYPES)
    shard_tokens: int = setting(65_536, "rows per shard file")
    threads: int | None = setting(None, "torch CPU threads")
    progress: bool = setting(True, "hide the progress bar", flags=("--no-progress",))
    # Parallel harvest: part i of n writes rows [i·tokens/n, (i+1)·tokens/n) of the full harvest;
    # `sae-kit store join` then makes one store of the parts' shards (see store_join.py).
    part: int = setting(0, "parallel harvest: this job's part, 0..PARTS-1")
    parts: int = setting(1, "parallel harvest: split the --tokens rows into PARTS contiguous parts "
                            "(join them with `store join`)")

    def __post_init__(self) -> None:
        if not 0 <= self.part < self.parts:
            raise ConfigError(f"--part must be in [0, --parts={self.parts}), got {self.part}")
        if not self.hooks:
            raise ConfigError("name at least one --hook (e.g. blocks.6.hook_resid_post)")
        if len(set(self.hooks)) != len(self.hooks):
            raise ConfigError(f"--hook names repeat: {self.hooks}")
        for name in ("tokens", "context", "batch_size", "shard_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.context < 2:
            raise ConfigError("context must be at least 2 tokens")

    def store_metadata(self) -> dict:
        """What must match for a re-run to continue a store (anything else would mix two harvests)."""
        meta = {"dataset": self.dataset, "split": self.split, "column": self.column,
                "prepend_bos": self.prepend_bos, "skip_bos": self.skip_bos}
        if self.parts > 1:
            first, count = self.part_rows()
            meta["harvest_part"] = {"part": self.part, "parts": self.parts, "first_row": first, "rows": count,
                                    "total_rows": self.tokens, "batch_size": self.batch_size}
        return meta

    def part_rows(self) -> tuple[int, int]:
        """(first row, number of rows) of this part within the full ``tokens``-row harvest."""
        first = self.part * self.tokens // self.parts
        return first, (self.part + 1) * self.tokens // self.parts - first


def store_path(out: str | Path, hook: str) -> Path:
    return Path(out) / hook


class WindowStream:
    """The deterministic token windows of a dataset, and the rows each one contributes."""

    def __init__(self, cfg: HarvestConfig, tokenizer, split: str | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.split = split or cfg.split

    def windows(self) -> Iterator[torch.Tensor]:
        texts = iter_texts(self.cfg.dataset, split=self.split, column=self.cfg.column)
        return token_windows(texts, self.tokenizer, self.cfg.context, prepend_bos=self.cfg.prepend_bos)

    def keep_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return skip_positions_mask(tokens, skip_bos=self.cfg.skip_bos and self.cfg.prepend_bos,
                                   skip_pad=False, bos_token_id=bos)

    def batches(self, start_window: int = 0) -> Iterator[torch.Tensor]:
        windows = itertools.islice(self.windows(), start_window, None)
        return batched_windows(windows, self.cfg.batch_size)

    def locate_row(self, row: int, align: int = 1) -> tuple[int, int]:
        """(window index, rows from that window on before ``row``) — from tokenisation alone.

        The index is rounded down to a multiple of ``align`` (the batch size), so a resumed harvest
        groups windows into the same batches as an uninterrupted one.
        """
        seen = group_seen = 0
        for index, window in enumerate(self.windows()):
            if index % align == 0:
                group_seen = seen
            kept = int(self.keep_mask(window[None])[0].sum())
            if seen + kept > row:
                return index - index % align, row - group_seen
            seen += kept
        raise ValueError(f"the dataset has only {seen} rows of activations; asked to start at row {row}")


def rows_of_batch(tokens: torch.Tensor, keep: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flatten a [B, T, d] batch to its kept rows: (activations, token ids, positions)."""
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return acts[keep], tokens[keep], positions[keep]


def harvest(cfg: HarvestConfig, model=None) -> dict[str, ActivationStore]:
    """Fill one store per hook with ``cfg.tokens`` rows; continue any stores already begun."""
    from sae_kit.models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = model or load_model(cfg.model)
    for hook in cfg.hooks:
        model.layer_of(hook)  # validates the hook name before anything is written
    writers = {
        hook: ActivationStoreWriter(
            store_path(cfg.out, hook), d_in=model.hook_dim(hook), dtype=cfg.dtype, model_name=model.name,
            hook_name=hook, context_size=cfg.context, shard_tokens=cfg.shard_tokens,
            metadata={**cfg.store_metadata(), **model.metadata()},
        )
        for hook in cfg.hooks
    }
    _fill(cfg, model, writers)
    # Only on success: after an interruption (Ctrl-C, an error) the rows still buffered are dropped,
    # as a SIGKILL would drop them. Writing them as a short shard would shift every later shard
    # boundary, so the resumed store would differ from an uninterrupted one (and shuffle differently).
    for writer in writers.values():
        writer.close()
    return {hook: ActivationStore(store_path(cfg.out, hook)) for hook in cfg.hooks}


def _fill(cfg: HarvestConfig, model, writers: dict[str, ActivationStoreWriter]) -> None:
    first_row, quota = cfg.part_rows()
    written = {hook: min(writer.tokens_written, quota) for hook, writer in writers.items()}
    start_row = min(written.values())
    if start_row >= quota:
        return
    stream = WindowStream(cfg, model.tokenizer)
    # Restart at the batch holding start_row, so every batch has the windows of the uninterrupted run
    # (a part starts inside the full harvest, at the batch holding its first row).
    absolute_row = first_row + start_row
    start_window, rows_before = stream.locate_row(absolute_row, align=cfg.batch_size) if absolute_row else (0, 0)
    # Rows each store already holds from the first batch we re-run (stores can differ by shards).
    to_drop = {hook: written[hook] - start_row + rows_before for hook in writers}
    produced = start_row
    bar = tqdm(total=quota, initial=start_row, unit="tok", desc="harvest", disable=not cfg.progress,
               dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for tokens in stream.batches(start_window):
            captured = model.capture(tokens, cfg.hooks)
            keep = stream.keep_mask(tokens)
            n_new = None
            for hook, writer in writers.items():
                acts, ids, positions = rows_of_batch(tokens, keep, captured[hook])
                drop = min(to_drop[hook], acts.shape[0])
                to_drop[hook] -= drop
                room = quota - written[hook]
                acts, ids, positions = (t[drop:drop + room] for t in (acts, ids, positions))
                if acts.shape[0]:
                    writer.append(acts, token_ids=ids, positions=positions)
                    written[hook] += acts.shape[0]
                n_new = min(written.values())
            bar.update(n_new - produced)
            produced = n_new
            bar.set_postfix(tok_per_s=f"{(produced - start_row) / max(time.perf_counter() - started, 1e-9):.0f}")
            if produced >= quota:
                return
    finally:
        bar.close()
    raise ValueError(
        f"the dataset {cfg.dataset!r} ran out after {first_row + produced} rows (asked for {first_row + quota}); "
        "ask for fewer --tokens or use a larger dataset"
    )


class ModelSource:
    """Activations straight from a model, without a cache: a BatchSource for the trainer.

    The row stream is a pure function of (dataset, seed): windows are grouped into blocks of
    ``block_windows``; each block's kept rows are shuffled with a generator seeded by
    (seed, epoch, block) on the train split. Resuming at batch n skips every block before row n·B
    from tokenisation alone, so only the block holding that row is run through the model again.
    """

    def __init__(self, model, hook: str, *, dataset: str = "default", column: str = "text", context: int = 128,
                 batch_size: int = 8, block_windows: int = 64, prepend_bos: bool = True, skip_bos: bool = True,
                 target_hook: str | None = None):
        model.layer_of(hook)
        self.model = model
        self.hook_name = hook
        # A transcoder's target: rows become [input hook | target hook] of the same tokens (store_pair.py).
        self.target_hook = target_hook
        if target_hook is not None:
            model.layer_of(target_hook)
            self.d_out = model.hook_dim(target_hook)
        self.hooks = [hook] if target_hook is None else [hook, target_hook]
        self.model_name = model.name
        self.context_size = context
        self.d_in = model.hook_dim(hook)
        self.block_windows = block_windows
        self.cfg = HarvestConfig(out="", hooks=list(self.hooks), model=model.name, dataset=dataset, column=column,
                                 context=context, batch_size=batch_size, prepend_bos=prepend_bos, skip_bos=skip_bos)

    def metadata_for_sae(self) -> dict:
        meta = {**self.model.metadata(), "model_name": self.model_name, "hook_name": self.hook_name,
                "context_size": self.context_size, "dataset_path": self.cfg.dataset}
        if self.target_hook is not None:
            meta["hook_name_out"] = self.target_hook
        return meta

    def _blocks(self, split: str) -> Iterator[list[torch.Tensor]]:
        stream = WindowStream(self.cfg, self.model.tokenizer, split=split)
        windows = stream.windows()
        while block := list(itertools.islice(windows, self.block_windows)):
            yield block

    def _rows(self, split: str, seed: int, start_row: int, epochs: int | None) -> Iterator[torch.Tensor]:
        stream = WindowStream(self.cfg, self.model.tokenizer, split=split)
        position = 0
        for epoch in itertools.count() if epochs is None else range(epochs):
            empty = True
            for index, block in enumerate(self._blocks(split)):
                empty = False
                tokens = torch.stack(block)
                keep = stream.keep_mask(tokens)
                n_rows = int(keep.sum())
                if position + n_rows <= start_row:
                    position += n_rows
                    continue
                captured = [self.model.capture(chunk, self.hooks) for chunk in tokens.split(self.cfg.batch_size)]
                acts = torch.cat([torch.cat([c[h].to(torch.float32) for h in self.hooks], dim=-1)
                                  for c in captured])[keep]
                if split == "train":
                    generator = derived_generator("model-source", seed, epoch, index)
                    acts = acts[torch.randperm(acts.shape[0], generator=generator)]
                yield acts[max(start_row - position, 0):]
                position += n_rows
            if empty:
                raise ValueError(f"the dataset {self.cfg.dataset!r} has no {split} text")

    def iter_batches(self, batch_size: int, *, split: str = "train", seed: int = 0, start_batch: int = 0,
                     epochs: int | None = None, drop_last: bool = True, **_: object) -> Iterator[torch.Tensor]:
        pending: list[torch.Tensor] = []
        held = 0
        for rows in self._rows(split, seed, start_batch * batch_size, epochs):
            pending.append(rows)
            held += rows.shape[0]
            while held >= batch_size:
                joined = torch.cat(pending)
                yield joined[:batch_size]
                pending, held = [joined[batch_size:]], held - batch_size
        if held and not drop_last:
            yield torch.cat(pending)

    def sample(self, n: int, seed: int = 0, **_: object) -> torch.Tensor:
        return next(self.iter_batches(n, seed=seed, drop_last=False))
