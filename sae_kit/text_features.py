"""Which SAE features fire on a text: per-token activations and a text-level ranking.

The text is run as analysis windows are (``sae_kit.analysis``): BOS first when the tokenizer has one,
and the BOS position left out of the results, so activations here compare with the feature store's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_kit.codes import SparseCodes


@dataclass
class TextCodes:
    tokens: list[str]  # display text of each token (BOS excluded)
    token_ids: list[int]
    codes: SparseCodes  # [n_tokens, K]


@torch.no_grad()
def encode_text(model, sae, hook: str, text: str) -> TextCodes:
    ids = model.to_tokens(text)[0]
    if ids.numel() == 0:
        raise ValueError("the text has no tokens")
    bos = model.bos_token_id
    tokens = torch.cat([torch.tensor([bos]), ids]) if bos is not None else ids
    acts = model.capture(tokens[None], hook)[hook][0]
    if bos is not None:
        acts = acts[1:]
    codes = sae.encode(acts.cpu()).detach()
    return TextCodes([model.tokenizer.decode([int(t)]) for t in ids], ids.tolist(), codes)


def feature_values(codes: SparseCodes, features: list[int]) -> torch.Tensor:
    """[n_tokens, len(features)]: each listed feature's activation on each token."""
    ids = torch.tensor(features, dtype=torch.int64)
    match = codes.indices[:, :, None] == ids[None, None, :]
    return (codes.values[:, :, None] * match).sum(1)


def per_token_top(codes: SparseCodes, k: int) -> list[list[dict]]:
    """For each token its ``k`` strongest active features, strongest first."""
    result = []
    for indices, values in zip(codes.indices.tolist(), codes.values.tolist()):
        active = sorted(((v, i) for i, v in zip(indices, values) if v != 0), reverse=True)[:k]
        result.append([{"index": i, "value": v} for v, i in active])
    return result


def top_over_text(codes: SparseCodes, k: int) -> list[dict]:
    """The ``k`` features with the largest activation anywhere in the text, with where and how often."""
    flat_ids, flat_values = codes.indices.flatten(), codes.values.flatten()
    active = flat_values != 0
    rows = torch.arange(codes.indices.shape[0]).repeat_interleave(codes.indices.shape[1])[active]
    ids, values = flat_ids[active], flat_values[active]
    best: dict[int, dict] = {}
    for feature, value, row in zip(ids.tolist(), values.tolist(), rows.tolist()):
        entry = best.setdefault(feature, {"index": feature, "max_value": value, "max_token": row, "count": 0,
                                          "sum": 0.0})
        entry["count"] += 1
        entry["sum"] += value
        if value > entry["max_value"]:
            entry["max_value"], entry["max_token"] = value, row
    return sorted(best.values(), key=lambda e: (-e["max_value"], e["index"]))[:k]
