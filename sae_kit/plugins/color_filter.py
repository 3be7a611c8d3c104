"""CoLoR-Filter data selection with two helper SAEs ("CoLoR-Filter: conditional loss reduction filtering
for targeted language model pre-training").

The paper scores a candidate by the conditional loss reduction of two small models, a "prior" model
trained on the generic pool and a "conditional" one (the prior fine-tuned on a little target-domain
data): ``score(x) = L_prior(x) − L_cond(x)``, and keeps the top 1/τ of the candidates.

SAE adaptation [plugins.md A1]: under a fixed-variance Gaussian likelihood the loss is the squared
reconstruction error, so ``score(x) = (‖x − S_p(x)‖² − ‖x − S_c(x)‖²) / ‖x − x̄‖²`` (normalised by the
token's distance to the batch mean so high-norm tokens do not dominate [our choice]). A fresh run
trains S_p (``helper_steps`` on the run's own data, the pool) and S_c (S_p fine-tuned for
``target_steps`` at 0.3× the learning rate on the target data) in ``setup``; both are frozen plugin
modules, so a resumed run reloads them. Each step draws ``keep_one_in`` × batch_size candidates and
keeps the batch_size with the highest score (online mode; tokens, not documents: activation rows carry
no document ids here). ``select=false`` keeps the first batch_size candidates instead (random from the
pool: the ablation's baseline, with the same helpers and the same tokens drawn).

``target``: an activation-store folder, or ``auto`` on synthetic data (the run's planted dictionary with
its firing profile reversed: the pool's rare features are the target's common ones). ``evaluate``
reports the held-out FVU on the target (``target_fvu``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sae_kit.config import ConfigError
from sae_kit.eval.synthetic import SyntheticSource
from sae_kit.plugins._sources import reversed_profile
from sae_kit.plugins.api import Ablation, Batch, Plugin, option
from sae_kit.sae import create_sae


class CoLoRFilter(Plugin):
    name = "color_filter"
    paper = "CoLoR-Filter (conditional loss reduction filtering)"
    summary = "select the tokens whose reconstruction error a target-tuned helper SAE reduces most"
    ablation = Ablation(metric="color_filter/target_fvu", baseline_options={"select": False})

    @dataclass
    class Options:
        target: str = option("auto", "target-domain activation store, or auto (synthetic data: reversed profile)", path="store")
        keep_one_in: int = option(4, "τ: candidates drawn per kept token")
        helper_d_sae: int = option(0, "latents of the helper SAEs (0: a quarter of the run's)")
        helper_steps: int = option(200, "training steps of the prior helper on the pool")
        target_steps: int = option(100, "fine-tuning steps of the conditional helper on the target")
        select: bool = option(True, "select by score (false: keep the first candidates, the baseline)")

    def validate(self) -> None:
        if self.opts.keep_one_in < 2:
            raise ConfigError(f"color_filter: keep_one_in must be >= 2, got {self.opts.keep_one_in}")
        if self.opts.helper_steps < 1 or self.opts.target_steps < 1 or self.opts.helper_d_sae < 0:
            raise ConfigError("color_filter: helper_steps and target_steps must be >= 1, helper_d_sae >= 0")
        self.oversample = self.opts.keep_one_in

    def target_source(self, trainer) -> Any:
        if self.opts.target == "auto":
            if not isinstance(trainer.source, SyntheticSource):
                raise ConfigError("color_filter: target=auto works on synthetic data only; give target=STORE_DIR")
            return reversed_profile(trainer.source.dataset)
        from sae_kit.store import ActivationStore

        store = ActivationStore(self.opts.target)
        if store.d_in != trainer.source.d_in:
            raise ConfigError(f"color_filter: the target store has d_in={store.d_in}, the run's data {trainer.source.d_in}")
        return store

    def setup(self, trainer) -> None:
        self.target = self.target_source(trainer)
        cfg = trainer.cfg
        helper_cfg = copy.deepcopy(trainer.sae.cfg)
        helper_cfg.d_sae = self.opts.helper_d_sae or max(trainer.sae.cfg.d_sae // 4, 2 * trainer.sae.cfg.k)
        for role in ("prior", "conditional"):
            self.modules[role] = create_sae(copy.deepcopy(helper_cfg)).requires_grad_(False)
        if trainer.resumed:
            return
        base = dict(d_sae=helper_cfg.d_sae, plugins=[], eval_every=10**9, checkpoint_every=10**9, log_every=50)
        prior_cfg = replace(cfg, out=str(Path(cfg.out) / "color_filter" / "prior"),
                            tokens=self.opts.helper_steps * cfg.batch_size, **base)
        prior = trainer.train_helper(prior_cfg, trainer.source)
        lr = 0.3 * (cfg.lr or type(prior).default_lr(helper_cfg.d_sae))
        conditional_cfg = replace(cfg, out=str(Path(cfg.out) / "color_filter" / "conditional"), lr=lr,
                                  tokens=self.opts.target_steps * cfg.batch_size, warmup_steps=0, **base)
        conditional = trainer.train_helper(conditional_cfg, self.target, init=prior)
        self.modules["prior"].load_state_dict(prior.state_dict())
        self.modules["conditional"].load_state_dict(conditional.state_dict())

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        prior, conditional = self.modules["prior"].eval(), self.modules["conditional"].eval()
        spread = (x - x.mean(0)).pow(2).sum(1).clamp_min(1e-12)
        return ((x - prior(x)).pow(2).sum(1) - (x - conditional(x)).pow(2).sum(1)) / spread

    def transform_batch(self, batch: Batch, trainer) -> Batch:
        size = trainer.cfg.batch_size
        if not self.opts.select:
            return Batch(batch.x[:size])
        keep = self.scores(batch.x).topk(size).indices.sort().values
        return Batch(batch.x[keep])

    def evaluate(self, sae, trainer) -> dict[str, Any]:
        from sae_kit.eval.evaluate import evaluate_sae

        cfg = trainer.cfg
        metrics = evaluate_sae(sae, self.target, max_tokens=cfg.eval_tokens, batch_size=min(cfg.batch_size, cfg.eval_tokens),
                               heldout_fraction=cfg.heldout_fraction)
        return {"target_fvu": metrics["fvu"], "target_dead_fraction": metrics["dead_fraction"]}
