"""The language-model interface: hook points with transformer-lens names, capture, replacement, generation.

:class:`LanguageModel` wraps a transformer-lens ``HookedTransformer`` or ``TransformerBridge``; where a
model comes from (the embedded SmolLM2, a local folder, the Hub) is sae_kit/models.py (``load_model``).
Tests and callers with an in-memory model use :meth:`LanguageModel.from_hooked_transformer` or
:meth:`LanguageModel.from_bridge`.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor


__all__ = ["LanguageModel", "ModelLoadError", "Replacement"]

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
