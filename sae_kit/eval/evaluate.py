"""Evaluate an SAE on held-out activations: FVU, normalised MSE, L0, dead/dense latents, densities, AFA ε-LBO."""
from __future__ import annotations

from typing import Any

import torch

from sae_kit.eval.metrics import ReconstructionMetrics
from sae_kit.sae import SAE

SUMMARY_DROPS = ("feature_density", "eps_lbo_sample", "afa_norms_sample")


@torch.no_grad()
def evaluate_sae(
    sae: SAE,
    source: Any,
    *,
    max_tokens: int = 262_144,
    batch_size: int = 4096,
    split: str = "heldout",
    seed: int = 0,
    summary: bool = True,
    heldout_fraction: float | None = None,
) -> dict[str, Any]:
    """Run ``max_tokens`` tokens of ``source``'s split through the SAE with its inference rule.

    Reconstruction metrics are measured in input space (after undoing the input normalisation);
    the AFA ε-LBO in the SAE's own normalised space, where its decoder lives. With ``summary`` the
    per-latent and per-token tensors are dropped and everything left is JSON-serialisable.
    """
    was_training = sae.training
    sae.eval()
    metrics = ReconstructionMetrics(sae.cfg.d_sae)
    afa = ReconstructionMetrics(sae.cfg.d_sae)
    kwargs = {} if heldout_fraction is None else {"heldout_fraction": heldout_fraction}
    # One pass over a finite split (stores); endless sources simply stop at max_tokens.
    batches = source.iter_batches(batch_size, split=split, seed=seed, epochs=1, drop_last=False, **kwargs)
    seen = 0
    try:
        while seen < max_tokens:
            try:
                x = next(batches)
            except StopIteration:
                break
            x = x[: max_tokens - seen].to(sae.b_dec.device, torch.float32)
            x, target = sae.split_pair(x)  # a transcoder is scored on its output hook
            x_n, norm = sae.normalize(x)
            codes = sae.select(sae.pre_activations(x_n), x_n)
            x_hat_n = sae.decode_normalized(codes) + sae.skip(x_n)
            metrics.update(target, norm.undo(x_hat_n), codes)
            afa.update(target if sae.is_transcoder else x_n, x_hat_n, codes, decoder_norms=sae.W_dec.norm(dim=1),
                       b_dec=sae.b_dec)
            seen += x.shape[0]
    finally:
        sae.train(was_training)
    if seen == 0:
        raise ValueError(f"no {split} activations to evaluate on: the source yielded no batch of {batch_size} tokens")
    result = metrics.compute()
    result.update({key: value for key, value in afa.compute().items() if key.startswith(("eps_lbo", "afa_"))})
    if summary:
        result = {key: value for key, value in result.items() if key not in SUMMARY_DROPS}
    return result
