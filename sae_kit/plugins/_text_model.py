"""A language model and a stream of its text windows, for plugins that run the model in the training
loop (auglocal, text_aug): the model and hook come from the plugin's options, else the run's
``--model/--hook``, else the activation store's provenance."""
from __future__ import annotations

from typing import Any

import torch

from sae_kit.config import ConfigError


class ModelWindows:
    """The frozen model, the SAE's hook and resumable batches of ``windows`` text windows."""

    def __init__(self, plugin: str, trainer: Any, model: str, hook: str, dataset: str, context: int, windows: int):
        from sae_kit.harvest import HarvestConfig, WindowStream
        from sae_kit.models import load_model

        metadata = trainer.sae.cfg.metadata
        model_name = model or trainer.cfg.model or metadata.get("model_name")
        hook = hook or trainer.cfg.hook or metadata.get("hook_name")
        if not model_name or not hook or str(model_name).startswith("synthetic"):
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
