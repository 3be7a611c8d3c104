"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries in one.

The latents are ordered and cut at prefix widths m_1 < … < m_G = d_sae (``widths``, or
``group_fractions`` of d_sae). Every prefix must reconstruct the input on its own:

    L = Σ_g ‖x − (Σ_{i < m_g} f_i W_dec,i + b_dec)‖² / input_variance  +  α_aux · AuxK

with f chosen once by BatchTopK (the batch's top k·B activations, a global threshold at inference,
as in batchtopk.py). The prefixes are weighted equally (SAELens: outer MSE plus the unweighted inner
MSEs; dictionary_learning divides by G²), gradients flow between levels (no stop-gradient: it was
deliberate, against feature hedging), and AuxK reconstructs the full reconstruction's residual.

On the kernels: the code is computed once; each selected entry's group is found by bucketing its
index, and the entries of each inner group are compacted into their own short padded code, so the
prefix reconstructions are cumulative sums of per-group sparse decodes that together touch each
selected entry once (the full decode is the base's). No prefix builds a dense [B, d_sae] pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, SAEConfig, parse_options
from sae_kit.kernels import sparse_decode
from sae_kit.sae.base import SAE, TrainingOutput, register

DEFAULT_FRACTIONS = (1 / 64, 1 / 16, 1 / 4, 1.0)


@dataclass
class MatryoshkaOptions:
    # Comma-separated strictly increasing prefix widths, e.g. "128,512,2048,8192" (d_sae is appended
    # when missing); or group_fractions "0.0625,0.1875,0.75" (the remainder goes to the last group).
    widths: str = ""
    group_fractions: str = ""
    threshold_beta: float = 0.999


def _numbers(text: str | list, kind, what: str) -> list:
    """"128,512" from the CLI, or a list (``widths: [128, 512]`` in a YAML/JSON config)."""
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        return [kind(item) for item in items if item != ""]
    except ValueError:
        raise ConfigError(f"matryoshka option {what} must be comma-separated numbers, got {text!r}") from None


def prefix_widths(opts: MatryoshkaOptions, d_sae: int) -> list[int]:
    """The strictly increasing prefix widths ending at d_sae, from ``widths`` or ``group_fractions``."""
    if opts.widths and opts.group_fractions:
        raise ConfigError("matryoshka: give widths or group_fractions, not both")
    if opts.widths:
        widths = _numbers(opts.widths, int, "widths")
    else:
        if opts.group_fractions:
            fractions = _numbers(opts.group_fractions, float, "group_fractions")
            if any(f <= 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
                raise ConfigError(f"matryoshka group_fractions must be > 0 and sum to at most 1, got {fractions}")
            cumulative = torch.tensor(fractions, dtype=torch.float64).cumsum(0).tolist()
        else:
            cumulative = list(DEFAULT_FRACTIONS)
        widths = [max(1, round(c * d_sae)) for c in cumulative]
        widths = sorted(set(widths))
    if widths and widths[-1] != d_sae:
        widths.append(d_sae)
    if not widths or any(w < 1 for w in widths) or any(b <= a for a, b in zip(widths, widths[1:])) or widths[-1] > d_sae:
        raise ConfigError(f"matryoshka widths must strictly increase from >= 1 to d_sae={d_sae}, got {widths}")
    return widths


@register
class MatryoshkaSAE(SAE):
    architecture = "matryoshka"
    Options = MatryoshkaOptions
    saelens_export = SAE.saelens_threshold_export  # SAELens saves Matryoshka BatchTopK as jumprelu too

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        # Here rather than only in __init__: the server checks a run form's config with this before queueing it.
        super().check_config(cfg)
        prefix_widths(parse_options(cls.Options, cfg.options, f"architecture {cls.architecture!r}"), cfg.d_sae)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.widths = prefix_widths(self.opts, cfg.d_sae)
        self.register_threshold()

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        return self.batch_level_select(pre, pre)

    def group_codes(self, codes: SparseCodes, groups: int | None = None) -> list[SparseCodes]:
        """The code split by prefix group: one compact padded code for each of the first ``groups``
        groups (all by default); values keep autograd."""
        inner = torch.tensor(self.widths[:-1], device=codes.indices.device)
        group = torch.bucketize(codes.indices, inner, right=True)  # index < m_1 -> 0, ...
        group = torch.where(codes.active, group, -1)
        parts = []
        for g in range(len(self.widths) if groups is None else groups):
            rows, slots = (group == g).nonzero(as_tuple=True)
            compact = SparseCodes.from_coordinates(codes.values, rows, slots)
            parts.append(SparseCodes(codes.indices.gather(1, compact.indices), compact.values, codes.d_sae))
        return parts

    def auxiliary_losses(self, out: TrainingOutput, input_variance) -> dict[str, torch.Tensor]:
        losses = self.dead_latent_loss(out)
        if len(self.widths) > 1:
            # The outer prefix is the base's reconstruction term; add the inner ones, cumulatively.
            x_hat, inner = self.b_dec, 0
            for part in self.group_codes(out.codes, len(self.widths) - 1):
                x_hat = x_hat + sparse_decode(part.indices, part.values, self.W_dec)
                inner = inner + (x_hat - out.x_n).pow(2).sum(1).mean() / input_variance
            losses["inner_reconstruction"] = inner
        return losses

    def prefix_fvu(self, x: torch.Tensor) -> list[float]:
        """Fraction of variance unexplained by each prefix alone, on a batch (in normalised space)."""
        with torch.no_grad():
            x_n, _ = self.normalize(x)
            codes = self.select(self.pre_activations(x_n), x_n)
            variance = (x_n - x_n.mean(0)).pow(2).sum()
            x_hat, result = self.b_dec.expand_as(x_n), []
            for part in self.group_codes(codes):
                x_hat = x_hat + sparse_decode(part.indices, part.values, self.W_dec)
                result.append(float((x_hat - x_n).pow(2).sum() / variance))
        return result

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict[str, Any]:
        return {"k": int(target_l0)}

    def config_dict(self) -> dict[str, Any]:
        data = super().config_dict()
        data["sae_kit"]["matryoshka_widths"] = list(self.widths)  # the resolved widths, for readers
        return data
