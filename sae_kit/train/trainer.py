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
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from sae_kit import data_parallel
from sae_kit.config import ConfigError, TrainConfig
from sae_kit.fileio import atomic_write
from sae_kit.plugins.api import Batch, StepContext
from sae_kit.sae import ARCHITECTURES, SAE, create_sae
from sae_kit.sae_folders import SYNTHETIC_KEY, synthetic_dataset
from sae_kit.train import distributed
from sae_kit.train.adam import Adam
from sae_kit.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from sae_kit.train.plugin_set import PluginSet, free_parameters

__all__ = ["METRICS_FILE", "BatchSource", "TrainConfig", "Trainer", "TrainingDiverged", "source_from_config", "train"]

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class BatchSource(Protocol):
    """What the trainer needs from activations: an ActivationStore, a synthetic generator, a model."""

    d_in: int

    def iter_batches(self, batch_size: int, *, split: str = "train", seed: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]: ...

    def sample(self, n: int, seed: int = 0) -> torch.Tensor: ...


def source_metadata(source: Any) -> dict[str, Any]:
    """Provenance for the SAE's cfg.json metadata (SAELens keys), from whatever the source knows."""
    if hasattr(source, "metadata_for_sae"):
        return dict(source.metadata_for_sae())
    meta = {}
    for key in ("model_name", "hook_name", "context_size"):
        value = getattr(source, key, None)
        if value is not None:
            meta[key] = value
    # Planted features (a SyntheticSource, or a store written from one) say so in the metadata.
    planted = getattr(source, SYNTHETIC_KEY, None) or synthetic_dataset(getattr(source, "metadata", None) or {})
    if planted:
        meta[SYNTHETIC_KEY] = planted
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
        if checkpoint is None and (self.run_dir / "sae").exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a trained SAE ({self.run_dir / 'sae'}); choose another --out, "
                "or move that SAE away to train again into this folder"
            )
        if checkpoint is None:  # k > d_sae and the like are refused before the run folder exists
            ARCHITECTURES[cfg.architecture].check_config(cfg.sae_config(source.d_in, {}, getattr(source, "d_out", None)))
        distributed.barrier(self.dist)  # every rank has looked for a checkpoint before rank 0 writes
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.plugins = PluginSet(cfg.take_plugins())
        if self.dist.enabled and self.plugins.oversample > 1:
            raise ConfigError("selecting plugins (oversample > 1) do not support data-parallel training yet: "
                              "run them in one process")
        self.resumed = checkpoint is not None
        self.step_k = cfg.k  # this step's k: cfg.k unless a plugin's hyperparameters() moves it
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
            (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            (self.run_dir / METRICS_FILE).write_text("")

    def _resume_from(self, checkpoint: Path) -> None:
        self.sae, optimizer_state, state = load_checkpoint(checkpoint)
        self.sae.to(self.dist.device)
        self.step = state["step"]
        self.input_variance = state["input_variance"]
        self.plugins.setup(self)
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(optimizer_state)
        _match_state_layout(self.optimizer)
        self.plugins.load_state(checkpoint)
        if self.dist.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        sae_params = self.sae.trainable_parameters()
        groups = [*self.sae.parameter_groups(), *self.plugins.parameter_groups(exclude=sae_params)]
        # fused: one pass over each parameter and its two moments instead of ~7 elementwise kernels
        # (about 0.1 s of a 0.8 s CPU step at 16384 latents); the same update up to rounding. Our
        # subclass skips the kernel's dead copy of the column-major encoder gradient (train/adam.py).
        return Adam(groups, lr=self.base_lr, betas=self.cfg.adam_betas, eps=self.cfg.adam_eps,
                                fused=_fused_adam_supported(groups))

    @property
    def base_lr(self) -> float:
        return self.cfg.lr or type(self.sae).default_lr(self.sae.cfg.d_sae)

    # ------------------------------------------------- what plugins may do (plugins.api.TrainingRun)
    def replace_source(self, source: BatchSource) -> None:
        self.source = source

    def train_helper(self, cfg: TrainConfig, source: BatchSource, init: SAE | None = None) -> SAE:
        """Train another SAE to completion in this process (a prior, a teacher, a second seed)."""
        helper = Trainer(cfg, source, data_parallel=False)
        if init is not None:
            helper.sae.load_state_dict(init.state_dict())  # in place: the helper's optimizer keeps its parameters
        return helper.run()

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
        k = self.step_k = int(hp["k"])
        # The step's k reaches the selection and the plugins (ctx.k); cfg.k stays the run's setting.
        with self.sae.using_k(k):
            return self._step(x, lr, k)

    def _step(self, x: torch.Tensor, lr: float, k: int) -> dict[str, float]:
        batch = self.plugins.transform_batch(Batch(x), self)
        # Parametrised weights (plugins) are computed once per step, not at every use.
        with parametrize.cached():
            out = self.sae.training_forward(batch.x, self.input_variance)
            ctx = StepContext(self, batch, out, self.step, k=k)
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
            clip_gradients(self.sae.trainable_parameters(), self.cfg.grad_clip)
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

        # At the k the latest step trained with (a plugin's schedule may have moved it).
        with self.sae.using_k(self.step_k):
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

        # The final SAE runs at the k its last step trained with (the one place k is written).
        self.sae.cfg.k = self.step_k
        self.sae = self.plugins.posthoc(self.sae, self)
        sae_dir = self.sae.save(self.run_dir / "sae")
        metrics = {**self.evaluate(), **self.plugins.evaluate(self.sae, self)}
        text = json.dumps(metrics, indent=2)  # whole or absent: the server lists runs while they finish
        atomic_write(sae_dir / "eval.json", lambda path: path.write_text(text))
        write_report(self.run_dir / METRICS_FILE, self.run_dir / "report.html", title=f"{self.cfg.architecture} training")
        return self.sae

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _fused_adam_supported(groups: list[dict[str, Any]]) -> bool:
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded moments their parameter's memory layout (safetensors stores them contiguous;
    the encoder is column-major): the fused Adam kernel walks parameter, gradient and moments in
    one flat order, so a moment laid out otherwise would be updated element-mismatched."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """``clip_grad_norm_`` without its multiply-by-1.0 pass over every gradient when the norm is
    already below ``max_norm`` (the common case after warm-up): the same gradients, bit for bit."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = torch.nn.utils.get_total_norm(grads)
    # clip_grad_norm_ scales by min(1, max_norm / (total + 1e-6)): below 1 exactly when this holds.
    if not float(total) + 1e-6 <= max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


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
