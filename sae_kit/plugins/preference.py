"""Preference anchoring of named concepts on reserved latents (after "Prefer to Classify: Improving Text
Classifiers via Auxiliary Preference Learning", P2C).

P2C trains a classifier together with an auxiliary pairwise-preference task ("which of two inputs is
more X"), whose pairwise labels carry information instance labels miss. For an SAE [our adaptation,
plugins.md B15] the preference is about a concept c, and concept c is anchored on a reserved latent
j(c) = ``first_latent`` + c: with the latent's pre-activation s_c(x) = u_{j(c)}(x) as the score, the
Bradley–Terry loss

    coefficient · mean softplus(−(s_c(x_preferred) − s_c(x_rejected)))     (= BCE(σ(s_a − s_b), 1))

is added on ``batch_pairs`` pairs per step. This makes the SAE a semi-supervised dictionary: useful
only for probing/steering named concepts. The pre-activation (not the code) is scored because a TopK
code is 0 whenever the latent is not selected, which has no gradient [chosen].

Input: ``pairs=FILE`` a safetensors file with ``preferred`` and ``rejected`` [P, d_in] activations and
optionally ``concept`` [P] int64 (default 0); ``write_pairs`` writes one. ``pairs=auto`` on synthetic
data builds them: concept c is planted feature c, preferred = x + ``strength``·f_c, rejected = x. The
last ``heldout`` fraction of the pairs (after a seeded shuffle) is never trained on; ``evaluate``
reports ``pair_accuracy`` there (share of held-out pairs with s_c(preferred) > s_c(rejected)) and
``train_pair_accuracy``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_kit.config import ConfigError
from sae_kit.fileio import atomic_write
from sae_kit.plugins.api import Ablation, Plugin, StepContext, option
from sae_kit.seeding import derived_generator


def write_pairs(path: str | Path, preferred: torch.Tensor, rejected: torch.Tensor,
                concept: torch.Tensor | None = None) -> Path:
    """Write a preference-pairs file (the ``pairs=`` input of the ``preference`` plugin)."""
    if preferred.shape != rejected.shape or preferred.dim() != 2:
        raise ValueError(f"preferred and rejected must both be [P, d_in], got {tuple(preferred.shape)} and {tuple(rejected.shape)}")
    tensors = {"preferred": preferred.to(torch.float32).contiguous(), "rejected": rejected.to(torch.float32).contiguous()}
    if concept is not None:
        tensors["concept"] = concept.to(torch.int64).contiguous()
    atomic_write(Path(path), lambda p: save_file(tensors, str(p)))
    return Path(path)


def synthetic_pairs(features: torch.Tensor, base: torch.Tensor, concepts: int, strength: float,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Pairs for planted features 0..concepts-1: (x + strength·f_c, x) over the rows of ``base``."""
    concept = torch.randint(0, concepts, (base.shape[0],), generator=generator)
    return {"preferred": base + strength * features[concept].to(base.dtype), "rejected": base.clone(), "concept": concept}


def load_pairs(path: str, d_in: int) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"preference: cannot read the pairs file {path!r} ({exc}); give pairs=FILE, a safetensors "
                          "file with 'preferred' and 'rejected' [P, d_in] (see sae_kit.plugins.preference.write_pairs)") from None
    missing = {"preferred", "rejected"} - set(tensors)
    if missing:
        raise ConfigError(f"preference: the pairs file {path} lacks {sorted(missing)}; it needs 'preferred' and 'rejected'")
    preferred, rejected = tensors["preferred"], tensors["rejected"]
    if preferred.shape != rejected.shape or preferred.dim() != 2 or preferred.shape[1] != d_in:
        raise ConfigError(f"preference: 'preferred' {tuple(preferred.shape)} and 'rejected' {tuple(rejected.shape)} "
                          f"in {path} must both be [P, {d_in}] (the run's d_in)")
    concept = tensors.get("concept", torch.zeros(preferred.shape[0], dtype=torch.int64))
    if concept.shape != (preferred.shape[0],):
        raise ConfigError(f"preference: 'concept' in {path} must be [P] = [{preferred.shape[0]}], got {tuple(concept.shape)}")
    return {"preferred": preferred.float(), "rejected": rejected.float(), "concept": concept.long()}


class Preference(Plugin):
    name = "preference"
    paper = "Prefer to Classify: Improving Text Classifiers via Auxiliary Preference Learning (P2C)"
    summary = "Bradley–Terry loss on (preferred, rejected) concept pairs anchors each concept on a reserved latent"
    ablation = Ablation(metric="preference/pair_accuracy", higher_is_better=True, baseline_options={"coefficient": 0.0})

    @dataclass
    class Options:
        pairs: str = option("auto", "safetensors file of (preferred, rejected[, concept]) pairs, or auto (synthetic data)", path="file")
        coefficient: float = option(0.1, "weight of the preference loss")
        batch_pairs: int = option(64, "pairs per step")
        first_latent: int = option(0, "concept c is anchored on latent first_latent + c")
        heldout: float = option(0.2, "fraction of the pairs held out for evaluation")
        concepts: int = option(4, "pairs=auto: number of planted features used as concepts")
        strength: float = option(1.0, "pairs=auto: how much of the concept the preferred input adds")
        auto_pairs: int = option(2048, "pairs=auto: number of pairs")

    def validate(self) -> None:
        o = self.opts
        if o.coefficient < 0 or o.batch_pairs < 1 or o.first_latent < 0 or not 0 < o.heldout < 1 or o.concepts < 1 or o.auto_pairs < 2:
            raise ConfigError("preference: coefficient must be >= 0, batch_pairs >= 1, first_latent >= 0, heldout in "
                              "(0, 1), concepts >= 1, auto_pairs >= 2")

    def setup(self, trainer) -> None:
        d_in, d_sae, seed = trainer.sae.cfg.d_in, trainer.sae.cfg.d_sae, trainer.cfg.seed
        if self.opts.pairs == "auto":
            dataset = getattr(trainer.source, "dataset", None)
            if dataset is None:
                raise ConfigError("preference: pairs=auto works on synthetic data only; give pairs=FILE "
                                  "(see sae_kit.plugins.preference.write_pairs)")
            base = dataset.sample(self.opts.auto_pairs, derived_generator("preference-base", seed))[0]
            pairs = synthetic_pairs(dataset.features, base, min(self.opts.concepts, dataset.n_features),
                                    self.opts.strength, derived_generator("preference-concepts", seed))
        else:
            pairs = load_pairs(self.opts.pairs, d_in)
        n = pairs["concept"].shape[0]
        top = int(pairs["concept"].max()) if n else 0
        if n < 2 or int(pairs["concept"].min()) < 0 or self.opts.first_latent + top >= d_sae:
            raise ConfigError(f"preference: need >= 2 pairs and concept ids in [0, {d_sae - self.opts.first_latent}) "
                              f"(latent first_latent + c must exist); got {n} pairs, concepts up to {top}")
        order = torch.randperm(n, generator=derived_generator("preference-split", seed))
        cut = max(1, min(n - 1, round(n * (1 - self.opts.heldout))))
        self.train_pairs = {key: value[order[:cut]] for key, value in pairs.items()}
        self.heldout_pairs = {key: value[order[cut:]] for key, value in pairs.items()}

    def scores(self, sae, x: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        """s_c(x): the reserved latent's pre-activation, with gradients (no dense [B, d_sae] product)."""
        x_n, _ = sae.normalize(x)
        latent = self.opts.first_latent + concept
        columns = sae.encoder_weight()[:, latent].T  # [B, d_in]
        return ((x_n - sae.b_dec) * columns).sum(1) + sae.b_enc[latent]

    def margins(self, sae, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(sae, pairs["preferred"], pairs["concept"]) - self.scores(sae, pairs["rejected"], pairs["concept"])

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.opts.coefficient == 0:
            return {}
        n = self.train_pairs["concept"].shape[0]
        rows = torch.randint(0, n, (self.opts.batch_pairs,), generator=derived_generator("preference", ctx.trainer.cfg.seed, ctx.step))
        margin = self.margins(ctx.sae, {key: value[rows] for key, value in self.train_pairs.items()})
        ctx.logs["preference/accuracy"] = float((margin > 0).float().mean())
        return {"bradley_terry": self.opts.coefficient * F.softplus(-margin).mean()}

    @torch.no_grad()
    def evaluate(self, sae, trainer) -> dict[str, Any]:
        return {"pair_accuracy": float((self.margins(sae, self.heldout_pairs) > 0).float().mean()),
                "train_pair_accuracy": float((self.margins(sae, self.train_pairs) > 0).float().mean()),
                "heldout_pairs": int(self.heldout_pairs["concept"].shape[0])}
