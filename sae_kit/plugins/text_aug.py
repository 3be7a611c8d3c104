"""EDA text augmentation on the fly, with code consistency between original and augmented contexts
("Data augmentation for parameter-efficient tuning under data scarcity": EDA / back-translation /
mixup, and a contrastive loss that helps prefix tuning).

The paper finds task-agnostic augmentation of scarce text helps or hurts depending on model and task,
and that a contrastive term helps separate augmented data. SAE adaptation [plugins.md B24; our
choices marked]: for an SAE trained on little text, each step takes ``windows`` text windows, makes
one EDA variant of each, runs the model on both and

- replaces ``fraction`` of the batch's rows by activations of the augmented windows (more contexts:
  the harvest-time augmentation, done in the loop so no second store is needed);
- adds ``coefficient`` · InfoNCE (temperature ``temperature``, both directions) between the codes of
  the tokens the edit left unchanged, original vs augmented context (positive: the same token).

Alignment [ours]: EDA edits only the first ``edit_fraction`` of each window (after BOS); the rest keeps
its tokens at the same positions, so the "unchanged tokens" are exactly aligned (their left context
differs). The edited prefix is re-tokenised and cut or left-filled back to its length.
EDA operations [ours: word level, one per variant, drawn at random]: random swap, random deletion
(each word with probability α), random insertion of a word from the same window; α = 0.1 as the
reference suggests. Synonym replacement is left out: it needs WordNet, which is a download, and
back-translation needs a second model; neither is available offline. Expect neutral or negative clean
FVU (augmented text is off-distribution); the ablation runs on a harvested store with its model.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sae_kit.config import ConfigError
from sae_kit.plugins._text_model import TextModelPlugin
from sae_kit.plugins.api import Ablation, Batch, StepContext, option
from sae_kit.plugins.lfu import untouched_buffers
from sae_kit.seeding import derive_seed

OPERATIONS = ("swap", "delete", "insert")


def eda_words(words: list[str], operation: str, alpha: float, pool: list[str], rng: random.Random) -> list[str]:
    """One EDA operation on a list of words (α: fraction of words touched, at least one)."""
    words = list(words)
    n = max(1, round(alpha * len(words)))
    if operation == "swap" and len(words) > 1:
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif operation == "delete" and len(words) > 1:
        kept = [w for w in words if rng.random() >= alpha]
        if len(kept) == len(words):  # nothing drawn: delete one word, so every variant differs
            kept.pop(rng.randrange(len(kept)))
        words = kept or [rng.choice(words)]
    else:
        for _ in range(n):
            words.insert(rng.randrange(len(words) + 1), rng.choice(pool))
    return words


def augment_window(tokens: torch.Tensor, tokenizer: Any, edit_length: int, alpha: float, rng: random.Random,
                   operation: str | None = None) -> torch.Tensor:
    """An EDA variant of one window [T] (BOS first): positions 1..edit_length are edited and restored
    to that length; position 0 and the positions after the edit keep their tokens."""
    prefix = tokens[1: 1 + edit_length].tolist()
    words = tokenizer.decode(prefix).split(" ")
    pool = tokenizer.decode(tokens[1:].tolist()).split(" ")
    edited = eda_words(words, operation or rng.choice(OPERATIONS), alpha, pool, rng)
    ids = tokenizer(" ".join(edited), add_special_tokens=False)["input_ids"]
    if len(ids) >= edit_length:
        ids = ids[len(ids) - edit_length:]  # keep the end: the part next to the unchanged tokens
    else:
        ids = prefix[: edit_length - len(ids)] + ids
    out = tokens.clone()
    out[1: 1 + edit_length] = torch.tensor(ids, dtype=tokens.dtype)
    return out


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between rows of a and b [P, F]: row i of a matches row i of b."""
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class TextAug(TextModelPlugin):
    name = "text_aug"
    paper = "Data augmentation for parameter-efficient tuning (EDA + contrastive consistency)"
    summary = "EDA variants of text windows in the loop: extra contexts in the batch, InfoNCE between codes of unchanged tokens"
    ablation = Ablation(metric="fvu")

    @dataclass
    class Options:
        model: str = option("", "language model (default: the run's --model or the store's model_name)", path="model")
        hook: str = option("", "hook the SAE reads (default: the run's --hook or the store's hook_name)")
        dataset: str = option("default", "text to augment (train split)", path="dataset")
        context: int = option(64, "tokens per window")
        windows: int = option(4, "windows augmented per step")
        alpha: float = option(0.1, "EDA α: fraction of words each operation touches")
        edit_fraction: float = option(0.5, "fraction of each window (after BOS) that EDA may edit")
        fraction: float = option(0.25, "fraction of the batch's rows replaced by augmented-context activations")
        coefficient: float = option(0.05, "weight of the InfoNCE consistency term")
        temperature: float = option(0.1, "InfoNCE temperature")

    def validate(self) -> None:
        o = self.opts
        if o.context < 4 or o.windows < 1 or not 0 < o.alpha < 1 or not 0 < o.edit_fraction < 1:
            raise ConfigError("text_aug: need context >= 4, windows >= 1, 0 < alpha < 1 and 0 < edit_fraction < 1")
        if not 0 <= o.fraction <= 1 or o.coefficient < 0 or o.temperature <= 0:
            raise ConfigError("text_aug: need 0 <= fraction <= 1, coefficient >= 0 and temperature > 0")

    def pairs(self, tokens: torch.Tensor, step: int, seed: int) -> tuple[torch.Tensor, int]:
        """(augmented windows, edit length) for a [W, T] batch of windows."""
        edit_length = max(1, int(self.opts.edit_fraction * (tokens.shape[1] - 1)))
        rng = random.Random(derive_seed(self.name, seed, step))
        augmented = torch.stack([augment_window(row, self.model.tokenizer, edit_length, self.opts.alpha, rng)
                                 for row in tokens.cpu()])
        return augmented.to(tokens.device), edit_length

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        tokens = self.text.next_tokens()
        augmented, edit_length = self.pairs(tokens, trainer.step, trainer.cfg.seed)
        acts = self.model.capture(torch.cat([tokens, augmented]), [self.hook])[self.hook]
        original, changed = acts[: len(tokens)], acts[len(tokens):]
        unchanged = slice(1 + edit_length, tokens.shape[1])
        self._pairs = (original[:, unchanged].reshape(-1, acts.shape[-1]), changed[:, unchanged].reshape(-1, acts.shape[-1]))
        rows = changed[:, 1:].reshape(-1, acts.shape[-1]).to(batch.x)  # every augmented-context token but BOS
        n = min(int(self.opts.fraction * batch.x.shape[0]), rows.shape[0])
        if n:
            x = batch.x.clone()
            x[:n] = rows[:n]
            batch = Batch(x, target=None if batch.target is None else torch.cat([rows[:n], batch.target[n:]]),
                          weight=batch.weight, source=batch.source, extras=batch.extras)
        return batch

    def codes_dense(self, sae, x: torch.Tensor) -> torch.Tensor:
        """Dense codes with gradients (few rows), the SAE's running statistics untouched."""
        x_n, _ = sae.normalize(x.float())
        with untouched_buffers(sae):
            return sae.select(sae.pre_activations(x_n), x_n).to_dense()

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.coefficient == 0:
            return {}
        original, changed = self._pairs
        loss = info_nce(self.codes_dense(ctx.sae, original), self.codes_dense(ctx.sae, changed), self.opts.temperature)
        ctx.logs["text_aug/info_nce"] = loss.item()
        return {"consistency": self.opts.coefficient * loss}
