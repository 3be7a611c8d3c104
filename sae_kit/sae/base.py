"""The shared SAE base: weights, input normalisation, encode/decode, losses, decoder constraint, save/load.

An architecture differs from another only in four things, and those are the whole of its file:
its selection rule (``select``), its auxiliary losses (``auxiliary_losses``), its extra state
(buffers registered in ``__init__``) and its defaults (``Options``, ``default_lr``...).

Conventions (SAELens-compatible): activations are row vectors, ``W_enc`` is [d_in, d_sae],
``W_dec`` is [d_sae, d_in] with unit-norm rows, and

    x_n = normalize(x)                      (none / unit_norm / layer_norm / mean_norm, undone on decode)
    u   = (x_n - b_dec) @ W_enc + b_enc     (b_dec pre-subtraction)
    z   = select(u)                         (SparseCodes)
    x̂   = denormalize(z @ W_dec + b_dec)

Training goes through ``sae_kit.kernels``: u is computed once without autograd, the rule selects on
it, and only the selected entries are gathered back with gradients (``code_values``), so neither
the encoder's nor the decoder's backward builds a dense [B, d_sae] matrix. Auxiliary losses that
need other entries of u (AuxK's dead latents) gather them the same way (``TrainingOutput.gather_pre``).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_kit import data_parallel
from sae_kit.codes import SparseCodes
from sae_kit.config import ConfigError, SAEConfig, parse_options
from sae_kit.fileio import atomic_write
from sae_kit.kernels import (batch_top_entries, dense_pre_activations, gather_pre_activations, matrix_entries, row_top_k,
                             sparse_decode)

class NotExportable(ConfigError):
    """Another library has no rule that computes this SAE's inference exactly."""


CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
LAYER_NORM_EPS = 1e-5
UNIT_NORM_EPS = 1e-8


@dataclass
class NoOptions:
    pass


@dataclass
class Normalization:
    """How one batch was normalised: ``x = x_n * scale + shift`` (both broadcast from [B, 1])."""

    shift: torch.Tensor | float = 0.0
    scale: torch.Tensor | float = 1.0

    def undo(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n * self.scale + self.shift


@dataclass
class TrainingOutput:
    """What one training forward pass produced; the trainer and plugins read it."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # every loss term, already weighted, plus "reconstruction"
    codes: SparseCodes
    x_n: torch.Tensor  # the normalised input
    x_hat_n: torch.Tensor  # the reconstruction in normalised space
    # Pre-activations [B, d_sae]. On the sparse path they carry no gradient and live in a buffer
    # reused by the next step: take gradients through ``gather_pre(indices)`` [B, K] instead.
    # ``gather_pre(indices, known=values)``: the same values already read from u (no gradient); the
    # sparse path returns them instead of gathering again, the dense path gathers anyway.
    pre_activations: torch.Tensor
    gather_pre: Callable[..., torch.Tensor]


class SAE(nn.Module):
    architecture: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_normalization: ClassVar[str] = "none"
    # Whether cfg.k matters (top-AFA, GBA and ReLU choose their own sparsity).
    uses_k: ClassVar[bool] = True
    # top-AFA and GBA keep b_enc out of the optimizer (a fixed zero / a bias adapted by a rule).
    trains_encoder_bias: ClassVar[bool] = True
    # Tensors written to the weights file for other tools but rebuilt from others on load.
    derived_tensors: ClassVar[tuple[str, ...]] = ()
    # Train through the sparse kernels (see the module doc); False backpropagates through dense u.
    sparse_training: bool = True
    # Per-latent rules (Feature Choice) read u column by column: lay it out feature-major.
    feature_major_pre_activations: ClassVar[bool] = False
    # Whether selected values keep their sign (AbsTopK) instead of being ReLU'd.
    signed_codes: ClassVar[bool] = False
    # Whether sparsify's SparseCoder (a per-token TopK of relu(u), no normalisation) is this SAE's rule.
    sparsify_exportable: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Refuse a config this architecture cannot build, before anything is allocated or written."""
        if cls.uses_k and cfg.k > cfg.d_sae:
            raise ConfigError(f"k={cfg.k} is larger than d_sae={cfg.d_sae}: a {cls.architecture} SAE keeps at most "
                              "d_sae latents per token; lower k or raise d_sae/expansion")

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.d_out is not None and cfg.normalize_activations is None:
            cfg.normalize_activations = "none"
        if cfg.architecture != self.architecture:
            raise ConfigError(f"{type(self).__name__} needs architecture={self.architecture!r}, got {cfg.architecture!r}")
        self.check_config(cfg)
        if cfg.normalize_activations is None:
            cfg.normalize_activations = self.default_normalization
        self.cfg = cfg
        self.opts = parse_options(self.Options, cfg.options, f"architecture {self.architecture!r}")
        self.dtype_ = getattr(torch, cfg.dtype)
        d_in, d_sae = cfg.d_in, cfg.d_sae

        # Tied init (Gao et al.): unit-norm random decoder rows, encoder = decoder transposed.
        # A transcoder's decoder writes the output hook (d_out wide), so its encoder gets its own
        # unit-norm random columns when the widths differ.
        W_dec = torch.randn(d_sae, self.d_out, dtype=torch.float32)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(self.dtype_))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, dtype=self.dtype_))
        self.init_encoder()
        if self.d_out != d_in and self.W_enc.shape != (d_in, d_sae):
            W_enc = torch.randn(d_in, d_sae, dtype=torch.float32)
            self.W_enc = nn.Parameter((W_enc / W_enc.norm(dim=0, keepdim=True)).to(self.dtype_))
        if self.is_transcoder:  # its decoder rows' norm (init_from_data), saved with the weights
            self.register_buffer("decoder_norm", torch.ones((), dtype=torch.float32))
        if cfg.normalize_activations == "mean_norm":  # the constant inputs are divided by (init_from_data)
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        if cfg.skip_connection:  # zero-initialised (Paulo et al.), trained jointly
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, dtype=self.dtype_))
        b_enc = torch.zeros(d_sae, dtype=self.dtype_)
        if self.trains_encoder_bias:
            self.b_enc = nn.Parameter(b_enc)
        else:
            self.register_buffer("b_enc", b_enc)
        # Dead-latent tracking is counted in tokens, not steps, so it does not depend on batch size.
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self._pre_buffer: torch.Tensor | None = None
        self._step_k: int | None = None

    # ------------------------------------------------------------- transcoders
    @property
    def is_transcoder(self) -> bool:
        """A transcoder reads one hook and predicts another (cfg.d_out); an SAE reconstructs its input."""
        return self.cfg.d_out is not None

    @property
    def d_out(self) -> int:
        return self.cfg.d_out if self.cfg.d_out is not None else self.cfg.d_in

    def split_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target): a transcoder's batches are [B, d_in + d_out] (store_pair.py); an SAE's target is x."""
        if not self.is_transcoder:
            return x, x
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in + self.d_out:
            raise ValueError(f"a transcoder trains on paired rows [batch, d_in + d_out = {self.cfg.d_in + self.d_out}] "
                             f"(input and target hooks side by side), got {tuple(x.shape)}")
        return x[:, : self.cfg.d_in], x[:, self.cfg.d_in :]

    def encoder_input(self, x_n: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x_n − b_dec for an SAE; a transcoder's b_dec lives in the
        output space, so it reads x_n as is (SAELens apply_b_dec_to_input=False, sparsify)."""
        # x_n + (−b_dec) is x_n − b_dec bit for bit, but its backward sums the [B, d] gradient into
        # b_dec's [d] and negates that, where subtraction's negates the whole [B, d] gradient first.
        return x_n if self.is_transcoder else x_n + self.b_dec.neg()

    def skip(self, x_n: torch.Tensor) -> torch.Tensor | float:
        """The skip transcoder's affine path x·W_skipᵀ (0 without one)."""
        return x_n.to(self.dtype_) @ self.W_skip.T if self.cfg.skip_connection else 0.0

    @torch.no_grad()
    def loss_scale(self, sample: torch.Tensor) -> float:
        """E‖t − E[t]‖² of the reconstruction target t (the normalised input, or a transcoder's output)."""
        x, target = self.split_pair(sample)
        t = target.to(self.dtype_) if self.is_transcoder else self.normalize(x)[0]
        return float((t - t.mean(0)).pow(2).sum(1).mean())

    # ----------------------------------------------------------------- weights
    def init_encoder(self) -> None:
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())

    def encoder_weight(self) -> torch.Tensor:
        return self.W_enc

    def decoder_directions(self) -> torch.Tensor:
        """Unit-norm feature directions [d_sae, d_in] (in normalised input space)."""
        W = self.W_dec.detach().float()
        return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @classmethod
    def sparsity_settings(cls, target_l0: int) -> dict[str, Any]:
        """SAEConfig/TrainConfig overrides that make this architecture run at about ``target_l0``
        mean active latents (``bench pareto`` and any "train at L0 ≈ N" code): k for the TopK family."""
        return {"k": int(target_l0)}

    @classmethod
    def short_run_options(cls) -> dict[str, Any]:
        """Options for runs of ~10^3 steps (benchmarks, ablations) where the defaults assume far more."""
        return {}

    @classmethod
    def default_lr(cls, d_sae: int) -> float:
        """Gao et al. / sparsify: 2e-4 / sqrt(d_sae / 2^14)."""
        return 2e-4 / math.sqrt(d_sae / 2**14)

    # ----------------------------------------------------------- normalisation
    def normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, Normalization]:
        if x.dim() != 2 or x.shape[1] != self.cfg.d_in:
            raise ValueError(f"expected activations of shape [batch, {self.cfg.d_in}], got {tuple(x.shape)}")
        x = x.to(self.dtype_)
        mode = self.cfg.normalize_activations
        if mode == "none":
            return x, Normalization()
        if mode == "unit_norm":
            scale = x.norm(dim=1, keepdim=True).clamp_min(UNIT_NORM_EPS)
            return x / scale, Normalization(scale=scale)
        if mode == "mean_norm":  # one constant for every token: a token still weighs by its norm²
            scale = self.input_scale.to(x.dtype)
            return x / scale, Normalization(scale=scale)
        mean = x.mean(dim=1, keepdim=True)
        std = x.std(dim=1, keepdim=True, unbiased=False) + LAYER_NORM_EPS
        return (x - mean) / std, Normalization(shift=mean, scale=std)

    # ------------------------------------------------------------ forward path
    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        return self.encoder_input(x_n) @ self.encoder_weight() + self.b_enc

    def select(self, pre: torch.Tensor, x_n: torch.Tensor) -> SparseCodes:
        """The architecture's sparsifying rule over pre-activations [B, d_sae].

        ``self.training`` picks the batch rule or the batch-independent inference rule; rules that
        keep running statistics (thresholds, frequencies) update them only while training. ``x_n``
        is the normalised input, for rules that look at it (top-AFA).
        """
        raise NotImplementedError

    def code_values(self, gathered: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
        """The selected codes' values recomputed, with gradients, from their gathered
        pre-activations [B, K]; must equal ``codes.values`` (what ``select`` returned)."""
        return torch.where(codes.active, gathered if self.signed_codes else gathered.relu(), 0)

    def pre_activation_buffer(self, batch: int) -> torch.Tensor:
        """The [B, d_sae] buffer the sparse path writes u into, reused while the batch size holds."""
        buffer, shape = self._pre_buffer, (batch, self.cfg.d_sae)
        if buffer is None or buffer.shape != shape or buffer.dtype != self.dtype_ or buffer.device != self.W_dec.device:
            if self.feature_major_pre_activations:
                buffer = torch.empty(shape[::-1], dtype=self.dtype_, device=self.W_dec.device).T
            else:
                buffer = torch.empty(shape, dtype=self.dtype_, device=self.W_dec.device)
            self._pre_buffer = buffer
        return buffer

    def decode_normalized(self, codes: SparseCodes) -> torch.Tensor:
        return sparse_decode(codes.indices, codes.values, self.W_dec) + self.b_dec

    def encode(self, x: torch.Tensor) -> SparseCodes:
        x_n, _ = self.normalize(x)
        return self.select(self.pre_activations(x_n), x_n)

    def decode(self, codes: SparseCodes, norm: Normalization | None = None) -> torch.Tensor:
        """Reconstruct in input space; pass the ``Normalization`` of the encoded batch to undo it."""
        x_hat_n = self.decode_normalized(codes)
        if norm is None:
            if self.cfg.normalize_activations != "none":
                raise ValueError(
                    "this SAE normalises its inputs: pass the Normalization returned by normalize(), "
                    "or call forward(x) to encode and decode in one go"
                )
            return x_hat_n
        return norm.undo(x_hat_n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x (an SAE) or the prediction of the output hook (a transcoder)."""
        x_n, norm = self.normalize(x)
        codes = self.select(self.pre_activations(x_n), x_n)
        return norm.undo(self.decode_normalized(codes) + self.skip(x_n))

    # ------------------------------------------------------------------ losses
    def training_forward(self, x: torch.Tensor, input_variance: float | torch.Tensor | None = None) -> TrainingOutput:
        """One training pass: selection, reconstruction, every loss term, dead-latent bookkeeping.

        The reconstruction loss is the normalised MSE ``mean_b ||x̂ - x||² / input_variance``, with
        ``input_variance = E||x - E[x]||²`` measured once from the data (Gao et al.'s fixed scale);
        without one the batch's own variance is used.
        """
        x, target = self.split_pair(x)
        x_n, _ = self.normalize(x)
        target_n = target.to(self.dtype_) if self.is_transcoder else x_n
        if self.sparse_training:
            W_enc = self.encoder_weight()
            if self.is_transcoder or x_n.requires_grad:
                x_c, gather_bias = self.encoder_input(x_n), self.b_enc
            else:  # x_n is data: b_dec is all of x_c's gradient, and it can come through the bias
                with torch.no_grad():
                    x_c = self.encoder_input(x_n)
                gather_bias = with_input_shift_gradient(self.b_enc, self.b_dec, W_enc)
            pre = dense_pre_activations(x_c, W_enc, self.b_enc, out=self.pre_activation_buffer(x.shape[0]))

            def gather_pre(indices: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
                return gather_pre_activations(x_c, W_enc, gather_bias, pre, indices, known=known)

            with torch.no_grad():
                selected = self.select(pre, x_n)
            codes = SparseCodes(selected.indices, self.code_values(gather_pre(selected.indices), selected), self.cfg.d_sae)
        else:
            pre = self.pre_activations(x_n)
            codes = self.select(pre, x_n)

            def gather_pre(indices: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
                return pre.gather(1, indices)  # autograd's own gather: ``known`` saves nothing here

        x_hat_n = self.decode_normalized(codes)
        if self.cfg.skip_connection:  # (adding skip()'s 0.0 would be one more [B, d] pass)
            x_hat_n = x_hat_n + self.skip(x_n)
        if input_variance is None:
            input_variance = (target_n - target_n.mean(0)).pow(2).sum(1).mean().detach()
        recon = mean_squared_error(x_hat_n, target_n) / input_variance
        # For a transcoder "x_n" is the target: the residual every auxiliary loss models is target − x̂.
        out = TrainingOutput(recon, {"reconstruction": recon}, codes, target_n, x_hat_n, pre, gather_pre)
        if self.training:
            self.update_fire_stats(codes)
        for name, term in self.auxiliary_losses(out, input_variance).items():
            out.parts[name] = term
            out.loss = out.loss + term
        return out

    def auxiliary_losses(self, out: TrainingOutput, input_variance: Any) -> dict[str, torch.Tensor]:
        return {}

    def dead_latent_loss(
        self, out: TrainingOutput, signed: bool = False, weights: torch.Tensor | None = None, name: str = "auxk",
        priority: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """AuxK (Gao et al.): the dead latents' top-k_aux pre-activations model the residual.

        ``weights`` [d_sae] >= 0 generalise the dead mask (aux_zipf_loss); ``priority`` [d_sae] bool
        marks candidates that take slots before any other (ranked by u among themselves);
        ``signed`` ranks by |u| and keeps signs (AbsTopK).
        """
        if not self.training:
            return {}
        if weights is None:
            weights = self.dead_mask().to(out.pre_activations.dtype)
        loss = auxiliary_reconstruction_loss(
            out.pre_activations, out.gather_pre, out.x_n - out.x_hat_n, self.W_dec, weights, self.k_aux, signed,
            priority,
        )
        return {name: self.cfg.aux_coefficient * loss}

    # ------------------------------------------------------- dead-latent stats
    @torch.no_grad()
    def update_fire_stats(self, codes: SparseCodes) -> None:
        self.tokens_since_fired += data_parallel.global_rows(codes.batch_size)
        self.tokens_since_fired[data_parallel.global_fired(codes.fired())] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold

    @property
    def k(self) -> int:
        """The k the selection uses: cfg.k, or the training step's k inside ``using_k``."""
        return self.cfg.k if self._step_k is None else self._step_k

    @contextmanager
    def using_k(self, k: int) -> Iterator[None]:
        """Select with ``k`` for one training step (plugins' schedules) without touching cfg.k."""
        if not 1 <= k <= self.cfg.d_sae:
            raise ConfigError(f"the step's k must be in [1, d_sae={self.cfg.d_sae}], got {k}")
        before, self._step_k = self._step_k, k
        try:
            yield
        finally:
            self._step_k = before

    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux or max(self.cfg.d_in // 2, 1)

    # ------------------------------------------------------ inference threshold
    def register_threshold(self) -> None:
        """For batch-level rules: an inference threshold [d_sae] (SAELens' JumpReLU key).

        It is a bias-corrected EMA of the batch rule's cut-off, so it tracks the batch rule from the
        first step on; ``threshold_weight`` holds the EMA's accumulated weight.
        """
        self.register_buffer("threshold", torch.zeros(self.cfg.d_sae, dtype=self.dtype_))
        self.register_buffer("threshold_weight", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def observe_threshold(self, observed: torch.Tensor, beta: float) -> None:
        update_ema(self.threshold, self.threshold_weight, observed, beta)

    def batch_level_select(self, score: torch.Tensor, values: torch.Tensor) -> SparseCodes:
        """BatchTopK's rule: the batch's top k·B entries of ``score`` that are > 0 while training (the
        smallest selected score feeds the threshold EMA), ``score > threshold`` at inference."""
        if not self.training:
            return SparseCodes.from_mask(values, score > self.threshold)
        total = self.k * data_parallel.global_rows(score.shape[0])
        if data_parallel.active():  # the global batch's top k·B: the entries at or above its k·B-th largest
            cutoff = data_parallel.global_kth_largest(score.detach(), total)
            rows, cols = ((score.detach() >= cutoff) & (score.detach() > 0)).nonzero(as_tuple=True)
        else:
            rows, cols = batch_top_entries(score.detach(), total)
        smallest = matrix_entries(score.detach(), rows, cols).min() if rows.numel() else score.new_tensor(float("inf"))
        smallest = data_parallel.all_min(smallest)
        if torch.isfinite(smallest):
            self.observe_threshold(smallest, self.opts.threshold_beta)
        return SparseCodes.from_coordinates(values, rows, cols)

    # ----------------------------------------------------------- training hooks
    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """b_dec = geometric median of a data sample (Gao et al.), in normalised space; a transcoder's
        b_dec is its target's median and b_enc = −mean(x)·W_enc centres the input (sparsify).
        ``mean_norm``'s constant is measured first, so everything after sees normalised inputs."""
        x, target = self.split_pair(sample)
        if self.cfg.normalize_activations == "mean_norm":
            self.input_scale.fill_(float(x.float().norm(dim=1).mean().clamp_min(1e-12)))
        x_n, _ = self.normalize(x)
        if self.is_transcoder:
            self.b_dec.copy_(geometric_median(target.float()).to(self.dtype_))
            # The decoder rows' norm c = spread(target) / spread(input): codes are on the input's scale
            # (projections of x) and c maps them onto the target's, which can be 100x smaller (an MLP's
            # output); with unit rows the encoder would have to shrink that much under Adam's fixed steps.
            spread = lambda t: (t.float() - t.float().mean(0)).pow(2).sum(1).mean().sqrt()  # noqa: E731
            self.decoder_norm.fill_(float(spread(target) / spread(x_n).clamp_min(1e-12)))
            self.renormalize_decoder()
            if self.trains_encoder_bias:
                self.b_enc.copy_(-(x_n.mean(0) @ self.encoder_weight()).to(self.dtype_))
            return
        self.b_dec.copy_(geometric_median(x_n.float()).to(self.dtype_))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups; a group's ``lr_scale`` multiplies the scheduled lr (JumpReLU's θ)."""
        return [{"params": self.trainable_parameters()}]

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (keeps the step on the sphere)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        # g -= (g·w / w·w) w per row: a row-wise dot product, a row norm and one fused update, no
        # [d_sae, d_in] temporaries (the unit directions, their product with g) as the textbook form
        # builds.
        W = self.W_dec.detach()
        coefficient = row_dots(grad, W) / torch.linalg.vector_norm(W, dim=1).square().clamp_min(1e-24)
        grad.addcmul_(W, coefficient[:, None], value=-1)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.renormalize_decoder()

    @torch.no_grad()
    def renormalize_decoder(self) -> None:
        """Decoder rows back to unit norm (a transcoder's to its ``decoder_norm``)."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min_(1e-12))
        if self.is_transcoder:
            self.W_dec.mul_(self.decoder_norm.to(self.W_dec.dtype))

    # ------------------------------------------------------------------ interop
    def saelens_export(self, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        """This SAE as SAELens computes it: (SAELens architecture, extra cfg keys); ``tensors``
        (W_enc, b_enc, W_dec, b_dec) may be rewritten in place. Raise NotExportable when SAELens has
        no architecture with the same inference rule."""
        raise NotExportable(f"SAELens has no architecture that computes a {self.architecture!r} SAE's inference rule")

    def saelens_threshold_export(self, tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
        """Batch-level rules at inference: SAELens computes relu(u)·1[u > θ], ours keeps relu(u) where
        relu(u) > θ, the same for every θ."""
        tensors["threshold"] = self.threshold.detach().clone()
        return "jumprelu", {}

    # -------------------------------------------------------------- save/load
    def config_dict(self) -> dict[str, Any]:
        """cfg.json: SAELens' top-level keys plus our own settings under ``sae_kit``."""
        cfg = self.cfg
        return {
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "architecture": cfg.architecture,
            "k": cfg.k,
            "normalize_activations": cfg.normalize_activations,
            "apply_b_dec_to_input": not self.is_transcoder,
            "dtype": cfg.dtype,
            "device": "cpu",
            "metadata": dict(cfg.metadata),
            "sae_kit": {
                "format_version": 1,
                "dead_tokens_threshold": cfg.dead_tokens_threshold,
                "aux_coefficient": cfg.aux_coefficient,
                "k_aux": cfg.k_aux,
                "options": asdict(self.opts),
                **({"transcoder": True, "skip_connection": cfg.skip_connection} if self.is_transcoder else {}),
            },
            **({"d_out": self.d_out} if self.is_transcoder else {}),
        }

    def tensors_to_save(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().contiguous() for name, t in self.state_dict().items()}

    def save(self, directory: str | Path) -> Path:
        """Write cfg.json and sae_weights.safetensors; each file appears whole or not at all."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.cpu() for name, t in self.tensors_to_save().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        text = json.dumps(self.config_dict(), indent=2, sort_keys=True)
        atomic_write(directory / CONFIG_FILE, lambda p: Path(p).write_text(text))
        return directory

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        tensors = {k: v for k, v in tensors.items() if k not in self.derived_tensors}
        expected = self.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{source} does not match a {self.architecture} SAE: missing {missing}, unexpected {unexpected}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(
                    f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
                )
        self.load_state_dict(tensors)


def steered_l0_target(target_l0: float | None, cfg: SAEConfig) -> float:
    """The mean L0 a penalty-steered architecture (ReLU, JumpReLU) aims at: ``target_l0`` None is the
    run's k as the TopK family reads it (at most every latent), 0 means no target (its fixed penalty)."""
    return float(min(cfg.k, cfg.d_sae)) if target_l0 is None else float(target_l0)


ARCHITECTURES: dict[str, type[SAE]] = {}


def register(cls: type[SAE]) -> type[SAE]:
    ARCHITECTURES[cls.architecture] = cls
    return cls


def auxiliary_reconstruction_loss(
    pre: torch.Tensor,
    gather_pre: Callable[..., torch.Tensor],
    residual: torch.Tensor,
    W_dec: torch.Tensor,
    weights: torch.Tensor,
    k_aux: int,
    signed: bool = False,
    priority: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct the detached residual from the top-``k_aux`` candidate latents (weight > 0).

    Candidates are ranked by ``weight * u`` (``weight * |u|`` when signed) on the candidates'
    columns only; their raw pre-activations (ReLU'd unless signed) are decoded without b_dec. The
    MSE is normalised by the residual's batch variance (OpenAI's normalized_mse) and a NaN becomes
    0, as in Gao et al. Gradients reach the encoder through ``gather_pre`` (see TrainingOutput).
    """
    candidates = (weights > 0).nonzero().squeeze(1)
    if candidates.numel() == 0:
        return residual.new_zeros(())
    known = None  # the chosen entries of u, when the selection read them (unit weights, unsigned)
    if candidates.numel() <= k_aux:
        indices = candidates.expand(pre.shape[0], -1)
    else:
        first = priority[candidates] if priority is not None else None
        if first is None or not bool(first.any()):
            indices, known = top_weighted_columns(pre.detach(), candidates, weights[candidates], k_aux, signed, sort=False,
                                                  with_values=True)
        elif int(first.sum()) >= k_aux:  # only priority candidates take slots, ranked by their own u
            firsts = candidates[first]
            indices = top_weighted_columns(pre.detach(), firsts, weights.new_ones(firsts.numel()), k_aux, signed)
        else:  # every priority candidate takes a slot; the rest go to the others by weight·u
            firsts, others = candidates[first], candidates[~first]
            rest = top_weighted_columns(pre.detach(), others, weights[others], k_aux - firsts.numel(), signed)
            indices = torch.cat([firsts.expand(pre.shape[0], -1), rest], dim=1)
    values = gather_pre(indices.contiguous(), known=known)
    if not signed:
        values = values.relu()
    target = residual.detach()
    estimate = sparse_decode(indices, values, W_dec)
    baseline = data_parallel.batch_variance(target)
    loss = mean_squared_error(estimate, target) / baseline
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0)


def with_input_shift_gradient(bias: torch.Tensor, shift: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """``bias`` (the same values) whose gradient g also reaches ``shift`` as ``−W_enc @ g``.

    With u = (x − shift) @ W_enc + bias and x constant, ∂L/∂shift = −W_enc @ Σ_b ∂L/∂u[b] and
    Σ_b ∂L/∂u[b] is ∂L/∂bias: so the gathers can take x − shift without autograd and skip the
    [B, d] input gradient (an embedding_bag over every gathered slot, AuxK's hundreds per token)
    for one [d, F] matrix-vector product. W_enc's own gradient still sees x − shift in full.
    """
    route = shift @ W_enc.detach()
    return bias - (route - route.detach())  # route − route.detach() is exactly 0; only its gradient counts


# Rows per block of top_weighted_columns: a [rows, candidates] score stays in cache.
TOP_COLUMNS_ROWS = 256


@torch.no_grad()
def top_weighted_columns(
    pre: torch.Tensor, columns: torch.Tensor, column_weights: torch.Tensor, k: int, signed: bool = False,
    sort: bool = True, with_values: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """[B, k] indices (into pre's columns, best first unless ``sort=False``) of each row's k largest ``weight · u`` (``weight ·
    |u|`` when signed) over ``columns`` (more than k of them).

    The same choice as ``(pre[:, columns] * weights).topk(k)`` (among equal scores another index may be
    taken), without its cost where thousands of columns are candidates (aux_zipf: every under-used
    latent): blocks of rows, so the gathered score is never [B, candidates] at once, and
    ``row_top_k``'s group maxima, with the columns padded by −inf to a multiple of the group.
    ``sort=False``: each row's k in any order (AuxK sums them; ``row_top_k`` then skips its sort).
    ``with_values``: also return ``pre.gather(1, indices)``, read from the selection's score where that
    score is u itself (unit weights, unsigned: AuxK's), else None.
    """
    group = 8
    n = columns.numel()
    pad = -(-n // group) * group - n
    padded = torch.cat([columns, columns[:1].expand(pad)])
    padded_weights = torch.cat([column_weights, column_weights.new_zeros(pad)])
    out = torch.empty(pre.shape[0], k, dtype=torch.int64, device=pre.device)
    block = torch.empty(min(TOP_COLUMNS_ROWS, pre.shape[0]), padded.numel(), dtype=pre.dtype, device=pre.device)
    unit_weights = bool((column_weights == 1).all())  # AuxK's: the score is u itself, no product pass
    values = torch.empty(pre.shape[0], k, dtype=pre.dtype, device=pre.device) if with_values and unit_weights and not signed else None
    for start in range(0, pre.shape[0], TOP_COLUMNS_ROWS):
        score = torch.index_select(pre[start:start + TOP_COLUMNS_ROWS], 1, padded, out=block[:min(TOP_COLUMNS_ROWS, pre.shape[0] - start)])
        if signed:
            score.abs_()
        if not unit_weights:
            score.mul_(padded_weights)
        score[:, n:] = float("-inf")
        top, positions = row_top_k(score, k, group=group, min_width=2, sort=sort)
        # index_select, not ``padded[positions]``: advanced indexing is ~4x slower on CPU.
        out[start:start + score.shape[0]] = padded.index_select(0, positions.reshape(-1)).view_as(positions)
        if values is not None:
            values[start:start + score.shape[0]] = top
    if with_values:
        return out, values
    return out


# Rows per block of row_dots: a block's elementwise product (512 x 768 fp32, 1.5 MiB) stays in cache.
ROW_DOTS_ROWS = 512


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(1)`` of two [n, d] matrices, a block of rows at a time: each block's product is
    summed while in cache (the whole [n, d] product would go to memory and back). At 16384 x 768,
    1 thread: ~2.5x faster than einsum's batched matmul of n (1 x d)(d x 1) products, which itself
    beat linalg.vecdot (it materialises the whole product) by 2x."""
    out = torch.empty(a.shape[0], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    for start in range(0, a.shape[0], ROW_DOTS_ROWS):
        rows = slice(start, start + ROW_DOTS_ROWS)
        torch.sum(a[rows] * b[rows], dim=1, out=out[rows])
    return out


class SquaredErrorSum(torch.autograd.Function):
    """``Σ (estimate − target)²`` from one kept difference: forward one subtraction and a BLAS dot
    of the difference with itself, backward one multiply. ``F.mse_loss`` writes an unreduced
    [B, d] loss before summing, and its backward zero-fills a [B, d] gradient before writing it
    (~4x the time of this at [4096, 768] fp32 on CPU). The backward does not overwrite the kept
    difference, so ``retain_graph`` (plugins' extra gradients) stays correct."""

    @staticmethod
    def forward(ctx, estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = estimate - target
        ctx.save_for_backward(diff)
        flat = diff.reshape(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        scaled = diff * (2 * grad)
        return (scaled if ctx.needs_input_grad[0] else None), (-scaled if ctx.needs_input_grad[1] else None)


def mean_squared_error(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_b ||estimate[b] − target[b]||²``: ``SquaredErrorSum`` for fp32/fp64 pairs of one shape,
    ``mse_loss`` otherwise (half precision, whose dot would accumulate in half; torch.func
    transforms, which need setup_context-style Functions). The same value up to summation order."""
    if (estimate.shape == target.shape and estimate.dtype == target.dtype and estimate.dtype in (torch.float32, torch.float64)
            and torch._C._functorch.peek_interpreter_stack() is None):
        return SquaredErrorSum.apply(estimate, target) / estimate.shape[0]
    return F.mse_loss(estimate, target, reduction="sum") / estimate.shape[0]


def update_ema(current: torch.Tensor, weight: torch.Tensor, observed: torch.Tensor, beta: float) -> None:
    """In-place bias-corrected EMA: ``current`` holds the corrected mean, ``weight`` the EMA of ones."""
    new_weight = beta * weight + (1 - beta)
    current.copy_((beta * weight * current + (1 - beta) * observed) / new_weight)
    weight.copy_(new_weight)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm, starting from the mean (as dictionary_learning does)."""
    median = points.mean(dim=0)
    for _ in range(max_iter):
        previous = median
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
        if (median - previous).norm() < tol * max(previous.norm().item(), 1.0):
            break
    return median
