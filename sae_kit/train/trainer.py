"""The training loop: one loop for every architecture, resumable to the bit on CPU.

Run folder: ``config.json`` (the TrainConfig), ``metrics.jsonl`` (one line per logged step and per
held-out evaluation), ``report.html`` (plotly curves), ``checkpoint/`` (latest, see checkpoint.py)
and, at the end, ``sae/`` (the trained SAE with ``eval.json``).

Determinism: batch n is a pure function of (seed, n) in every data source, the learning rate is a
pure function of the step, and the SAE's running statistics, the optimizer and the RNG travel in the
checkpoint, so ``--resume`` continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from sae_kit import data_parallel
from sae_kit.config import ConfigError, SAEConfig
from sae_kit.plugins.api import Batch, PluginSet, StepContext, build_plugins, free_parameters, normalize_specs
from sae_kit.sae import ARCHITECTURES, SAE, create_sae
from sae_kit.train import distributed
from sae_kit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class BatchSource(Protocol):
    """What the trainer needs from activations: an ActivationStore, a synthetic generator, a model."""

    d_in: int

    def iter_batches(self, batch_size: int, *, split: str = "train", seed: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]: ...

    def sample(self, n: int, seed: int = 0) -> torch.Tensor: ...


@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI flags and YAML/JSON config files fill the same fields."""

    activations: str | None = None
    # Or train straight from a model, without a cache (harvest on the fly):
    model: str | None = None
    hook: str | None = None
    # Transcoders: the output hook's store (rows aligned with activations'), or its hook with --model.
    targets: str | None = None
    target_hook: str | None = None
    skip_connection: bool = False  # skip transcoder: an affine W_skip beside the sparse path
    dataset: str = "default"
    context: int = 128
    out: str = "runs/sae"
    architecture: str = "topk"
    k: int = 32
    # Train at about this mean L0 whatever the architecture: its sparsity_settings(N) set k or options.
    target_l0: int | None = None
    expansion: int = 8
    d_sae: int | None = None  # overrides expansion
    normalize_activations: str | None = None  # None: the architecture's default
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None  # None: the architecture's default (2e-4/sqrt(d_sae/2^14) for the TopK family)
    batch_size: int = 4096
    tokens: int = 10_000_000
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of the steps
    grad_clip: float | None = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    dead_tokens_threshold: int = 10_000_000
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None
    heldout_fraction: float = 0.05
    eval_every: int = 500
    eval_tokens: int = 65_536
    log_every: int = 10
    checkpoint_every: int = 500
    init_tokens: int = 32_768  # sample for b_dec's geometric median and the loss scale
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    # Training plugins, in hook order: names, "NAME:key=value,..." or {name: NAME, key: value} (sae_kit/plugins).
    plugins: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
        positive = ("k", "expansion", "batch_size", "tokens", "eval_every", "eval_tokens", "log_every",
                    "checkpoint_every", "init_tokens")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        # A negative clip norm would flip every gradient (clip_grad_norm_ scales by max_norm / norm).
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 or None disables it), got {self.grad_clip!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ConfigError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        self.adam_betas = tuple(self.adam_betas)
        if self.target_l0 is not None:
            self.apply_target_l0()
        self.plugins = normalize_specs(self.plugins)
        build_plugins(self.plugins)  # unknown names, bad options and conflicts are reported now

    def apply_target_l0(self) -> None:
        """Fold ``target_l0`` into the architecture's own knob (k, or an option such as JumpReLU's)."""
        if not isinstance(self.target_l0, int) or self.target_l0 < 1:
            raise ConfigError(f"target_l0 must be a positive integer, got {self.target_l0!r}")
        cls = ARCHITECTURES[self.architecture]
        knob = getattr(cls, "sparsity_settings", None)
        if knob is None and not cls.uses_k:
            raise ConfigError(f"architecture {self.architecture!r} has no target-L0 setting; tune its own options")
        overrides = knob(self.target_l0) if knob else {"k": self.target_l0}
        for name, value in overrides.items():
            if name == "options":
                self.options = {**self.options, **value}
            else:
                setattr(self, name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; valid settings: {sorted(known)}")
        return cls(**data)

    @property
    def total_steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def sae_config(self, d_in: int, metadata: dict[str, Any], d_out: int | None = None) -> SAEConfig:
        return SAEConfig(
            d_in=d_in,
            d_out=d_out,
            skip_connection=self.skip_connection,
            d_sae=self.d_sae or self.expansion * d_in,
            architecture=self.architecture,
            k=self.k,
            normalize_activations=self.normalize_activations,
            dead_tokens_threshold=self.dead_tokens_threshold,
            aux_coefficient=self.aux_coefficient,
            k_aux=self.k_aux,
            options=dict(self.options),
            metadata=metadata,
        )

    def learning_rate(self, base_lr: float, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        decay_steps = int(self.total_steps * self.decay_fraction)
        decay_start = self.total_steps - decay_steps
        decay = 1.0 if step < decay_start or decay_steps == 0 else (self.total_steps - step) / decay_steps
        return base_lr * warmup * decay


def source_metadata(source: Any) -> dict[str, Any]:
    """Provenance for the SAE's cfg.json metadata (SAELens keys), from whatever the source knows."""
    if hasattr(source, "metadata_for_sae"):
        return dict(source.metadata_for_sae())
    meta = {}
    for key in ("model_name", "hook_name", "context_size"):
        value = getattr(source, key, None)
        if value is not None:
            meta[key] = value
    return meta


class Trainer:
    """Trains one SAE on a batch source; ``run()`` returns the trained SAE (also saved to ``out/sae``)."""

    def __init__(self, cfg: TrainConfig, source: BatchSource, resume: bool = False, data_parallel: bool = True):
        self.cfg = cfg
        self.source = source
        self.run_dir = Path(cfg.out)
        # torchrun: data-parallel over its ranks (see distributed.py); otherwise one process.
        self.dist = distributed.setup() if data_parallel else distributed.DistributedContext()
        distributed.check_batch_size(cfg.batch_size, self.dist)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        checkpoint = find_checkpoint(self.run_dir) if resume else None
        if resume and checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir}; start the run without --resume")
        if checkpoint is None and (self.run_dir / "checkpoint").exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run's checkpoint; pass --resume to continue it or choose another --out"
            )
        distributed.barrier(self.dist)  # every rank has looked for a checkpoint before rank 0 writes
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.plugins = PluginSet(build_plugins(cfg.plugins))
        if self.dist.enabled and self.plugins.oversample > 1:
            raise ConfigError("selecting plugins (oversample > 1) do not support data-parallel training yet: "
                              "run them in one process")
        self.resumed = checkpoint is not None
        if checkpoint is not None:
            self._resume_from(checkpoint)
        else:
            self._start_fresh()
        distributed.broadcast_state(self.sae, self.dist)

    # ----------------------------------------------------------------- set-up
    def _start_fresh(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        # The held-out fraction travels with the SAE so `sae-kit eval` scores the same held-out rows.
        metadata = {**source_metadata(self.source), "heldout_fraction": cfg.heldout_fraction}
        self.sae: SAE = create_sae(cfg.sae_config(self.source.d_in, metadata, getattr(self.source, "d_out", None)))
        n_init = cfg.init_tokens
        if hasattr(self.source, "split"):  # a finite store: at most its whole training split
            n_init = min(n_init, len(self.source.split(cfg.heldout_fraction).train))
        sample = self.source.sample(n_init, seed=cfg.seed, heldout_fraction=cfg.heldout_fraction)
        sample = sample.to(torch.float32)
        self.sae.init_from_data(sample)
        self.input_variance = self.sae.loss_scale(sample)
        self.sae.to(self.dist.device).train()
        self.step = 0
        self.plugins.setup(self)
        self.optimizer = self._make_optimizer()
        if self.dist.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
            (self.run_dir / METRICS_FILE).write_text("")

    def _resume_from(self, checkpoint: Path) -> None:
        self.sae, optimizer_state, state = load_checkpoint(checkpoint)
        self.sae.to(self.dist.device)
        self.step = state["step"]
        self.input_variance = state["input_variance"]
        self.plugins.setup(self)
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(optimizer_state)
        self.plugins.load_state(checkpoint)
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        sae_params = self.sae.trainable_parameters()
        groups = [*self.sae.parameter_groups(), *self.plugins.parameter_groups(exclude=sae_params)]
        return torch.optim.Adam(groups, lr=self.base_lr, betas=self.cfg.adam_betas, eps=self.cfg.adam_eps)

    @property
    def base_lr(self) -> float:
        return self.cfg.lr or type(self.sae).default_lr(self.sae.cfg.d_sae)

    # ------------------------------------------------------------------- loop
    def run(self) -> SAE:
        cfg = self.cfg
        total = cfg.total_steps
        # A selecting plugin draws oversample × batch_size candidates and keeps batch_size of them.
        batches = self.source.iter_batches(cfg.batch_size * self.plugins.oversample, split="train", seed=cfg.seed, start_batch=self.step,
                                           heldout_fraction=cfg.heldout_fraction)
        main = self.dist.is_main
        bar = tqdm(total=total, initial=self.step, desc=f"train {cfg.architecture}", unit="step",
                   disable=not cfg.progress or not main, dynamic_ncols=True)
        try:
            with data_parallel.use_group() if self.dist.enabled else nullcontext():
                while self.step < total:
                    x = distributed.shard(next(batches), self.dist).to(self.dist.device, torch.float32)
                    record = self.train_step(x)
                    self.step += 1
                    bar.update(1)
                    if main and (self.step % cfg.log_every == 0 or self.step == total):
                        self._log({"step": self.step, "tokens": self.step * cfg.batch_size, **record})
                        bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.3f}")
                    if main and (self.step % cfg.eval_every == 0 or self.step == total):
                        self._log({"step": self.step, "tokens": self.step * cfg.batch_size,
                                   **{f"eval/{k}": v for k, v in self.evaluate().items()}})
                    if main and (self.step % cfg.checkpoint_every == 0 or self.step == total):
                        self.save_checkpoint()
        finally:
            bar.close()
        sae = self.finish() if main else self.sae
        distributed.barrier(self.dist)  # the final SAE is on disk before any rank returns
        return sae

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        hp = self.plugins.hyperparameters({"lr": self.cfg.learning_rate(self.base_lr, self.step), "k": self.cfg.k}, self)
        lr = hp["lr"]
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.sae.cfg.k = int(hp["k"])
        batch = self.plugins.transform_batch(Batch(x), self)
        # Parametrised weights (plugins) are computed once per step, not at every use.
        with parametrize.cached():
            out = self.sae.training_forward(batch.x, self.input_variance)
            ctx = StepContext(self, batch, out, self.step)
            self.plugins.loss_terms(ctx)
            if not distributed.all_finite(out.loss, self.dist):
                where = find_checkpoint(self.run_dir)
                saved = json.loads((where / "state.json").read_text())["step"] if where else None
                # Steps are numbered from 1 as in metrics.jsonl: this update would have been step self.step + 1.
                raise TrainingDiverged(
                    f"the loss became {out.loss.item()} at step {self.step + 1}; "
                    + (f"the last good checkpoint is {where} (step {saved}; resume with a lower --lr)" if where
                       else "no checkpoint was written yet")
                    + "; check the activations for NaN/inf or lower the learning rate"
                )
            self.optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        # Averaged before the plugins see them, so every rank's gradient surgery agrees.
        distributed.average_gradients([p for g in self.optimizer.param_groups for p in g["params"]], self.dist)
        self.plugins.after_backward(ctx)
        self.sae.before_optimizer_step()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.sae.trainable_parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.sae.after_optimizer_step()
        self.plugins.after_step(ctx)
        record = {"lr": lr, "loss": out.loss.item()}
        record.update({name: term.item() for name, term in out.parts.items()})
        record["l0"] = out.codes.l0().float().mean().item()
        record["dead_fraction"] = self.sae.dead_mask().float().mean().item()
        record.update(ctx.logs)
        return distributed.mean_over_ranks(record, self.dist)

    def evaluate(self) -> dict[str, Any]:
        from sae_kit.eval.evaluate import evaluate_sae

        return evaluate_sae(self.sae, self.source, max_tokens=self.cfg.eval_tokens, summary=True,
                            batch_size=min(self.cfg.batch_size, self.cfg.eval_tokens),
                            heldout_fraction=self.cfg.heldout_fraction)

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "input_variance": self.input_variance, "base_lr": self.base_lr}
        # The free tensors of plugin parametrisations are saved; setup() re-registers them on resume.
        with free_parameters(self.sae):
            return save_checkpoint(self.run_dir, self.sae, self.optimizer, state, write_extra=self.plugins.save_state)

    def finish(self) -> SAE:
        from sae_kit.train.report import write_report

        self.sae = self.plugins.posthoc(self.sae, self)
        sae_dir = self.sae.save(self.run_dir / "sae")
        metrics = {**self.evaluate(), **self.plugins.evaluate(self.sae, self)}
        (sae_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
        write_report(self.run_dir / METRICS_FILE, self.run_dir / "report.html", title=f"{self.cfg.architecture} training")
        return self.sae

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from, so no step appears twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def source_from_config(cfg: TrainConfig) -> BatchSource:
    """An activation store (``activations``) or a model hook read on the fly (``model`` + ``hook``)."""
    if cfg.activations and cfg.model:
        raise ConfigError("give either --activations (a cached store) or --model/--hook (no cache), not both")
    if cfg.targets and not cfg.activations:
        raise ConfigError("--targets (a transcoder's output store) goes with --activations (its input store)")
    if cfg.target_hook and not cfg.model:
        raise ConfigError("--target-hook goes with --model/--hook; with cached stores pass --targets")
    if cfg.model:
        if not cfg.hook:
            raise ConfigError("--model needs --hook (e.g. blocks.6.hook_resid_post)")
        from sae_kit.harvest import ModelSource
        from sae_kit.models import load_model

        return ModelSource(load_model(cfg.model), cfg.hook, dataset=cfg.dataset, context=cfg.context,
                           target_hook=cfg.target_hook)
    if cfg.targets:
        from sae_kit.store_pair import PairedStore

        return PairedStore(cfg.activations, cfg.targets)
    if not cfg.activations:
        raise ConfigError("no activations: pass --activations DIR (an activation store) or --model and --hook")
    from sae_kit.store import ActivationStore

    return ActivationStore(cfg.activations)


def train(cfg: TrainConfig, source: BatchSource | None = None, resume: bool = False, data_parallel: bool = True) -> SAE:
    """Train from a TrainConfig; without a source, ``cfg.activations`` names an activation store.

    Under torchrun the ranks train this one SAE data-parallel unless ``data_parallel`` is False."""
    if source is None:
        source = source_from_config(cfg)
    if not math.isfinite(cfg.tokens):
        raise ConfigError("tokens must be finite")
    return Trainer(cfg, source, resume=resume, data_parallel=data_parallel).run()
