"""A language model and a stream of its text windows, for plugins that run the model in the training
loop (downstream_kl, auglocal, text_aug, all subclasses of ``TextModelPlugin``): the model and hook come
from the plugin's options, else the run's ``--model/--hook``, else the activation store's provenance."""
from __future__ import annotations

from typing import Any, Callable

import torch

from sae_kit.config import ConfigError
from sae_kit.plugins.api import Plugin


class ModelWindows:
    """The frozen model, the SAE's hook and resumable batches of ``windows`` text windows."""

    def __init__(self, plugin: str, trainer: Any, model: str, hook: str, dataset: str, context: int, windows: int):
        from sae_kit.harvest import HarvestConfig, WindowStream
        from sae_kit.models import load_model
        from sae_kit.sae_folders import synthetic_dataset

        metadata = trainer.sae.cfg.metadata
        model_name = model or trainer.cfg.model or metadata.get("model_name")
        hook = hook or trainer.cfg.hook or metadata.get("hook_name")
        if not model_name or not hook or synthetic_dataset({"model_name": model_name}):
            raise ConfigError(f"{plugin} needs a language model and a hook: train on a harvested store or with "
                              "--model/--hook, or pass the plugin options model=NAME_OR_FOLDER,hook=HOOK_NAME")
        self.model = load_model(model_name)
        self.model.model.requires_grad_(False)
        self.hook = hook
        if self.model.hook_dim(hook) != trainer.sae.cfg.d_in:
            raise ConfigError(f"{plugin}: hook {hook} of {model_name} has width {self.model.hook_dim(hook)}, "
                              f"the SAE reads d_in={trainer.sae.cfg.d_in}")
        self.stream = WindowStream(HarvestConfig(out="", hooks=[hook], dataset=dataset, context=context,
                                                 batch_size=windows), self.model.tokenizer, split="train")
        self.dataset, self.context = dataset, context
        self.windows_used = 0
        self._batches = None

    def next_tokens(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = self.stream.batches(start_window=self.windows_used)
        try:
            tokens = next(self._batches)
        except StopIteration:  # the text ran out: start it again
            self._batches = self.stream.batches(0)
            tokens = next(self._batches)
        self.windows_used += tokens.shape[0]
        return tokens.to(self.model.device)

    def restore(self, windows_used: int) -> None:
        self.windows_used = windows_used
        self._batches = None

    def spliced_kl(self, sae: Any, replace: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> torch.Tensor:
        """KL(model(x) ‖ model(x̂ spliced at the hook)) on the next text windows, differentiable in the SAE.

        ``replace`` holds further replacement hooks applied to both forward passes (auglocal's skipped
        blocks). BOS positions keep the model's own activations, as in the in-model evaluation."""
        from sae_kit.eval.in_model import kl_to_clean

        replace = replace or {}
        tokens = self.next_tokens()
        keep = self.stream.keep_mask(tokens)

        def spliced(acts: torch.Tensor) -> torch.Tensor:
            out = acts.clone()
            out[keep] = sae(acts[keep].float()).to(acts.dtype)
            return out

        clean = self.model.logits(tokens, replace=replace)
        with_sae = self.model.logits(tokens, replace={self.hook: spliced, **replace}, grad=True)
        return kl_to_clean(clean, with_sae)

    def evaluate(self, sae: Any, max_tokens: int) -> dict[str, Any]:
        """CE-loss recovered, KL and Δ LM loss of ``sae`` spliced into the full model, on held-out text."""
        from sae_kit.eval.in_model import evaluate_in_model

        was_training = sae.training
        metrics = evaluate_in_model(sae, self.model, hook=self.hook, dataset=self.dataset,
                                    context=self.context, max_tokens=max_tokens, progress=False)
        sae.train(was_training)  # evaluate_in_model leaves it in eval mode
        return {key: metrics[key] for key in ("ce_recovered_vs_zero", "ce_recovered_vs_mean", "kl_div", "delta_lm_loss")}


class TextModelPlugin(Plugin):
    """A plugin that runs the frozen model on its own text windows. Its options include ``model``, ``hook``,
    ``dataset``, ``context`` and ``windows``; ``setup`` builds ``self.text`` from them, and the checkpoint
    keeps the place in the text so a resumed run reads the same windows."""

    def setup(self, trainer) -> None:
        o = self.opts
        self.text = ModelWindows(self.name, trainer, o.model, o.hook, o.dataset, o.context, o.windows)
        self.model, self.hook = self.text.model, self.text.hook

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "windows_used": self.text.windows_used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.text.restore(state["windows_used"])
