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

Both act on each position on its own, so generation keeps its KV cache
(``LanguageModel.generate(positionwise=True)``). The default and steered rows are generated as one
batch of two with one seeded generator: the same request always gives the same texts.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

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


@torch.no_grad()
def steer(model, prompt: str, features: Sequence[SteeringFeature], *, max_new_tokens: int = 32,
          temperature: float = 0.7, seed: int = 0, method: Method = "additive") -> dict:
    """Default and steered completions of ``prompt`` (plain text, no BOS added)."""
    if not features:
        raise ValueError("name at least one feature to steer with")
    prompt_tokens = model.to_tokens(prompt)[0]
    if prompt_tokens.numel() == 0:
        raise ValueError("the prompt has no tokens")
    batch = prompt_tokens.expand(2, -1)  # row 0 default, row 1 steered
    replace = steering_replacements(features, method, rows=1)
    out = model.generate(batch, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, replace=replace,
                         positionwise=True)
    completions = [model.to_string(row[prompt_tokens.numel():]) for row in out]
    return {"prompt": prompt, "prompt_tokens": int(prompt_tokens.numel()), "default": completions[0],
            "steered": completions[1]}
