"""Held-out tokens and robustness scores shared by the plugins' ``evaluate`` hooks."""
from __future__ import annotations

from typing import Any, Iterator

import torch

from sae_kit.eval.metrics import ReconstructionMetrics
from sae_kit.seeding import derived_generator


def heldout_batches(trainer: Any, tokens: int | None = None) -> Iterator[torch.Tensor]:
    """The held-out activations as float32 batches of at most the run's batch size, ``tokens`` (default:
    the run's eval_tokens, never more) in all: for evaluations that work a batch at a time."""
    cfg = trainer.cfg
    wanted = min(tokens or cfg.eval_tokens, cfg.eval_tokens)
    batches = trainer.source.iter_batches(min(cfg.batch_size, wanted), split="heldout", seed=cfg.seed, epochs=1,
                                          drop_last=False, heldout_fraction=cfg.heldout_fraction)
    seen = 0
    for x in batches:
        x = x[: wanted - seen].to(torch.float32)
        yield x
        seen += x.shape[0]
        if seen >= wanted:
            return


@torch.no_grad()
def heldout_tokens(trainer: Any, tokens: int | None = None) -> torch.Tensor:
    """Up to ``tokens`` (default: the run's eval_tokens) held-out activations [N, d_in], float32."""
    parts = list(heldout_batches(trainer, tokens))
    if not parts:
        raise ValueError("the data source has no held-out tokens to evaluate on")
    return torch.cat(parts)


def training_sample(trainer: Any, tokens: int, seed: int) -> torch.Tensor:
    """Up to ``tokens`` distinct training-split activations [N, d_in] (at most a finite store's split)."""
    cfg = trainer.cfg
    if hasattr(trainer.source, "split"):
        tokens = min(tokens, len(trainer.source.split(cfg.heldout_fraction).train))
    return trainer.source.sample(tokens, seed=seed, heldout_fraction=cfg.heldout_fraction).to(torch.float32)


@torch.no_grad()
def fvu(sae: Any, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
    """FVU of reconstructing ``target`` (default ``x``) from the SAE's inference codes of ``x``."""
    was_training = sae.training
    sae.eval()
    try:
        x_n, norm = sae.normalize(x)
        codes = sae.select(sae.pre_activations(x_n), x_n)
        metrics = ReconstructionMetrics(sae.cfg.d_sae)
        metrics.update(x if target is None else target, norm.undo(sae.decode_normalized(codes)), codes)
        return float(metrics.compute()["fvu"])
    finally:
        sae.train(was_training)


@torch.no_grad()
def steered(sae: Any, x: torch.Tensor, strength: float, seed: int = 0) -> torch.Tensor:
    """``x + strength · rms‖x‖ · d_j`` with one random decoder direction d_j per token: the inputs a
    steering server feeds the SAE (a latent's direction added to the residual stream)."""
    generator = derived_generator("steered-inputs", seed)
    latents = torch.randint(0, sae.cfg.d_sae, (x.shape[0],), generator=generator)
    directions = sae.decoder_directions()[latents].to(x.dtype)
    scale = x.pow(2).sum(1).mean().sqrt()
    return x + strength * scale * directions


def perturbed_fvu(sae: Any, x: torch.Tensor, strength: float, seed: int = 0) -> float:
    """FVU on steered inputs (the steered input is its own target)."""
    return fvu(sae, steered(sae, x, strength, seed))
