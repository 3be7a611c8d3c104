"""Paired activation stores for transcoders: an input hook's store and an output hook's store whose
rows are the same tokens (``sae-kit harvest --hook IN --hook OUT`` writes both in one model pass).

Batches are the two stores' rows side by side, ``[B, d_in + d_out]``, so every part of training that
moves batches around (shuffling, resume, data-parallel sharding, plugins' batch transforms) keeps
input and target together; the transcoder splits them (``SAE.split_pair``). Alignment is checked
when the pair is opened (row counts, shard layout, every token id) and again on every batch (the
token ids of both sides), so a pair from two different harvests is refused, not silently mixed.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from sae_kit.config import ConfigError
from sae_kit.store import ActivationStore

CHECK_ROWS = 1 << 20


class PairedStore:
    def __init__(self, inputs: str | ActivationStore, targets: str | ActivationStore):
        self.inputs = inputs if isinstance(inputs, ActivationStore) else ActivationStore(inputs)
        self.targets = targets if isinstance(targets, ActivationStore) else ActivationStore(targets)
        a, b = self.inputs, self.targets
        if a.n_tokens != b.n_tokens:
            raise ConfigError(f"--activations has {a.n_tokens} rows but --targets has {b.n_tokens}: a transcoder needs "
                              "both hooks of the same tokens (harvest them together: --hook IN --hook OUT)")
        if [s["n_tokens"] for s in a.shards] != [s["n_tokens"] for s in b.shards] or a.context_size != b.context_size:
            raise ConfigError("--activations and --targets are laid out differently (shards or context size): "
                              "harvest both hooks in one `sae-kit harvest` run")
        for start in range(0, a.n_tokens, CHECK_ROWS):
            stop = min(start + CHECK_ROWS, a.n_tokens)
            if not torch.equal(a.tokens(start, stop), b.tokens(start, stop)):
                raise ConfigError(f"--activations and --targets hold different tokens (rows {start}..{stop}): "
                                  "they come from different harvests")
        self.d_in, self.d_out = a.d_in, b.d_in
        self.n_tokens = a.n_tokens
        self.model_name, self.hook_name, self.context_size = a.model_name, a.hook_name, a.context_size

    def metadata_for_sae(self) -> dict[str, Any]:
        meta = {"hook_name": self.inputs.hook_name, "hook_name_out": self.targets.hook_name,
                "model_name": self.inputs.model_name, "context_size": self.context_size}
        return {k: v for k, v in meta.items() if v is not None}

    def split(self, heldout_fraction: float = 0.05):
        return self.inputs.split(heldout_fraction)

    def __len__(self) -> int:
        return self.n_tokens

    def iter_batches(self, batch_size: int, **kwargs) -> Iterator[torch.Tensor]:
        kwargs.pop("with_tokens", None)
        left = self.inputs.iter_batches(batch_size, with_tokens=True, **kwargs)
        right = self.targets.iter_batches(batch_size, with_tokens=True, **kwargs)
        for (x, tx), (y, ty) in zip(left, right):
            if not torch.equal(tx, ty):
                raise RuntimeError("paired stores went out of step (different tokens in one batch); "
                                   "re-harvest both hooks together")
            yield torch.cat([x, y.to(x.dtype)], dim=1)

    def sample(self, n: int, seed: int = 0, **kwargs) -> torch.Tensor:
        x = self.inputs.sample(n, seed=seed, **kwargs)
        y = self.targets.sample(n, seed=seed, **kwargs)  # same seed, same layout: the same rows
        return torch.cat([x, y.to(x.dtype)], dim=1)


class PairedSource:
    """Any two-sided batch source for tests and planted claims: ``fn(n, generator) -> (x, y)``."""

    def __init__(self, draw, d_in: int, d_out: int, name: str = "planted-pair"):
        self.draw, self.d_in, self.d_out, self.model_name, self.hook_name = draw, d_in, d_out, name, "planted_in"

    def metadata_for_sae(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "hook_name": "planted_in", "hook_name_out": "planted_out"}

    def _generator(self, seed: int, split: str, index: Any) -> torch.Generator:
        from sae_kit.seeding import derived_generator

        return derived_generator("pair", self.model_name, seed, split, index)

    def iter_batches(self, batch_size: int, *, split: str = "train", seed: int = 0, start_batch: int = 0, **_):
        index = start_batch
        while True:
            x, y = self.draw(batch_size, self._generator(seed, split, index))
            yield torch.cat([x, y], dim=1)
            index += 1

    def sample(self, n: int, seed: int = 0, **_) -> torch.Tensor:
        x, y = self.draw(n, self._generator(seed, "train", "init-sample"))
        return torch.cat([x, y], dim=1)
