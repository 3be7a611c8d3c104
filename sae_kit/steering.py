"""Steering generation with SAE features: default and steered completions of one prompt, side by side.

Two methods, both applied at the SAE's hook to every position of the steered sequence (prompt and
generated tokens), as Neuronpedia's steering does:

* ``additive``: add ``strength`` to the feature's activation, i.e. add ``strength ×`` its decoder
  row to the activation (scaled back to input space for SAEs that normalise their inputs).
* ``clamp``: encode the activation, set the feature's activation to ``strength`` (active or not),
  decode, and keep the SAE's error term: ``x + decode(clamped codes) − decode(codes)``. A feature
  clamped to its own value leaves the activation exactly as it was.

A transcoder writes to its output hook (``hook_name_out``): steering adds its decoder rows there
(``additive`` only).

Both act on each position on its own, so generation keeps its KV cache. The default and steered
rows of a request are sampled by one generator seeded by the request's seed, and each row stops at
EOS or at the request's length: the same request always gives the same texts. Many requests are
generated as one batch (:func:`steer_many`, sae_kit/batched_generation.py); each still gets the
texts it would get alone. :class:`sae_kit.batching.MicroBatcher` gathers concurrent requests.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from sae_kit.batched_generation import GenerationGroup, generate_groups
from sae_kit.codes import SparseCodes

METHODS = ("additive", "clamp")
Method = Literal["additive", "clamp"]


@dataclass(frozen=True)
class SteeringFeature:
    sae: object  # an SAE (sae_kit.sae.SAE)
    hook: str
    index: int
    strength: float


def steered_activations(sae, x: torch.Tensor, features: Sequence[tuple[int, float]], method: Method) -> torch.Tensor:
    """``x`` [n, d_in] with the given (feature, strength) pairs applied by ``method``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "clamp" and sae.is_transcoder:
        raise ValueError("clamp re-encodes the activation it steers, and a transcoder encodes another hook's; "
                         "steer a transcoder with method additive (its decoder rows at the output hook)")
    for index, _ in features:
        if not 0 <= index < sae.cfg.d_sae:
            raise ValueError(f"feature {index} is out of range: the SAE has features 0..{sae.cfg.d_sae - 1}")
    x_n, norm = sae.normalize(x)
    n = x.shape[0]
    ids = torch.tensor([index for index, _ in features], dtype=torch.int64).expand(n, -1)
    strengths = torch.tensor([strength for _, strength in features], dtype=x_n.dtype).expand(n, -1)
    if method == "additive":
        before = SparseCodes(ids, torch.zeros_like(strengths), sae.cfg.d_sae)
        after = SparseCodes(ids, strengths, sae.cfg.d_sae)
    else:
        before = sae.select(sae.pre_activations(x_n), x_n)
        # Drop the steered features' own entries, then append them with the clamped values.
        kept = before.values * ~torch.isin(before.indices, ids[0])
        after = SparseCodes(torch.cat([before.indices, ids], 1), torch.cat([kept, strengths], 1), sae.cfg.d_sae)
    delta = norm.undo(sae.decode_normalized(after)) - norm.undo(sae.decode_normalized(before))
    return x + delta.to(x.dtype)


def steering_replacements(features: Sequence[SteeringFeature], method: Method, rows: slice | int):
    """``{hook: fn}`` for ``LanguageModel.generate(replace=...)``, steering only the batch ``rows``."""
    by_hook: dict[str, dict[int, tuple[object, list]]] = defaultdict(dict)
    for feature in features:
        by_hook[feature.hook].setdefault(id(feature.sae), (feature.sae, []))[1].append((feature.index, feature.strength))

    def make(groups):
        def replace(acts: torch.Tensor) -> torch.Tensor:  # [batch, pos, d]
            out = acts.clone()
            target = out[rows]
            shape = target.shape
            flat = target.reshape(-1, shape[-1])
            for sae, pairs in groups.values():
                flat = steered_activations(sae, flat, pairs, method)
            out[rows] = flat.reshape(shape)
            return out

        return replace

    return {hook: make(groups) for hook, groups in by_hook.items()}


@dataclass(frozen=True)
class SteeringRequest:
    """One steering request: default and steered completions of ``prompt`` (plain text, no BOS added)."""

    prompt: str
    features: tuple[SteeringFeature, ...]
    max_new_tokens: int = 32
    temperature: float = 0.7
    seed: int = 0
    method: Method = "additive"


def check_request(model, request: SteeringRequest, max_prompt_tokens: int | None = None) -> torch.Tensor:
    """The prompt's token ids; a ValueError naming what is wrong with the request otherwise."""
    if not request.features:
        raise ValueError("name at least one feature to steer with")
    if request.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {request.method!r}")
    for feature in request.features:
        if not 0 <= feature.index < feature.sae.cfg.d_sae:
            raise ValueError(f"feature {feature.index} is out of range: the SAE has features "
                             f"0..{feature.sae.cfg.d_sae - 1}")
    prompt_tokens = model.to_tokens(request.prompt)[0]
    if prompt_tokens.numel() == 0:
        raise ValueError("the prompt has no tokens")
    if max_prompt_tokens is not None and prompt_tokens.numel() > max_prompt_tokens:
        raise ValueError(f"the prompt is {prompt_tokens.numel()} tokens long; this server takes at most "
                         f"{max_prompt_tokens}")
    if model.n_ctx is not None and prompt_tokens.numel() + request.max_new_tokens > model.n_ctx:
        raise ValueError(f"the prompt ({prompt_tokens.numel()} tokens) plus {request.max_new_tokens} new tokens "
                         f"exceeds {model.name}'s context of {model.n_ctx} tokens")
    return prompt_tokens


def batch_replacements(requests: Sequence[SteeringRequest]) -> dict:
    """``{hook: fn(acts, row_ids)}`` steering row ``2 i + 1`` as request ``i`` asks (row ``2 i``: its default)."""
    plans: dict[str, dict[int, list]] = defaultdict(dict)
    for i, request in enumerate(requests):
        by_hook: dict[str, dict[int, tuple[object, list]]] = defaultdict(dict)
        for feature in request.features:
            by_hook[feature.hook].setdefault(id(feature.sae), (feature.sae, []))[1].append(
                (feature.index, feature.strength))
        for hook, groups in by_hook.items():
            plans[hook][2 * i + 1] = [(sae, pairs, request.method) for sae, pairs in groups.values()]

    def make(plan):
        def replace(acts: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:  # [rows, pos, d]
            out = acts.clone()
            for j, row in enumerate(row_ids.tolist()):
                steps = plan.get(row)
                if steps is None:
                    continue
                flat = out[j]
                for sae, pairs, method in steps:
                    flat = steered_activations(sae, flat, pairs, method)
                out[j] = flat
            return out

        return replace

    return {hook: make(plan) for hook, plan in plans.items()}


@torch.no_grad()
def steer_many(model, requests: Sequence[SteeringRequest], *, stop_at_eos: bool = True,
               max_prompt_tokens: int | None = None) -> list[dict | ValueError]:
    """Every request's result, generated as one batch; a request that is wrong gets its ValueError.

    Each request gets what :func:`steer` would give it alone: its own seeded generator draws its
    two rows, its own length, and its own features, strengths and method on its steered row.
    """
    results: list[dict | ValueError] = [None] * len(requests)  # type: ignore[list-item]
    good, prompts = [], []
    for i, request in enumerate(requests):
        try:
            prompts.append(check_request(model, request, max_prompt_tokens))
            good.append(i)
        except ValueError as error:
            results[i] = error
    chosen = [requests[i] for i in good]
    groups = [GenerationGroup(prompt.expand(2, -1), request.max_new_tokens, request.temperature, request.seed,
                              stop_at_eos=stop_at_eos and model.eos_token_id is not None)
              for prompt, request in zip(prompts, chosen)]
    rows = generate_groups(model, groups, batch_replacements(chosen))
    for i, prompt, request, (default, steered) in zip(good, prompts, chosen, rows):
        results[i] = {"prompt": request.prompt, "prompt_tokens": int(prompt.numel()),
                      "default": model.to_string(_before_eos(model, default)),
                      "steered": model.to_string(_before_eos(model, steered))}
    return results


def _before_eos(model, tokens: torch.Tensor) -> torch.Tensor:
    if model.eos_token_id is not None and tokens.numel() and int(tokens[-1]) == model.eos_token_id:
        return tokens[:-1]
    return tokens


def steer(model, prompt: str, features: Sequence[SteeringFeature], *, max_new_tokens: int = 32,
          temperature: float = 0.7, seed: int = 0, method: Method = "additive") -> dict:
    """Default and steered completions of ``prompt`` (plain text, no BOS added); each row stops at EOS."""
    result = steer_many(model, [SteeringRequest(prompt, tuple(features), max_new_tokens, temperature, seed,
                                                method)])[0]
    if isinstance(result, ValueError):
        raise result
    return result
