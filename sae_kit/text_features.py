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


@dataclass(frozen=True)
class EncodeRequest:
    sae: object  # an SAE (sae_kit.sae.SAE)
    hook: str
    text: str


@torch.no_grad()
def encode_text(model, sae, hook: str, text: str) -> TextCodes:
    result = encode_many(model, [EncodeRequest(sae, hook, text)])[0]
    if isinstance(result, ValueError):
        raise result
    return result


@torch.no_grad()
def encode_many(model, requests: list[EncodeRequest], max_text_tokens: int | None = None) -> list[TextCodes | ValueError]:
    """Every text's codes from one forward over the batch; a text that is wrong gets its ValueError.

    Texts are right-padded: the model is causal, so a text's activations do not see the padding
    after it, and each result is what its text gives alone (up to float rounding of the batch).
    """
    results: list[TextCodes | ValueError] = [None] * len(requests)  # type: ignore[list-item]
    good, rows = [], []
    bos = model.bos_token_id
    for i, request in enumerate(requests):
        ids = model.to_tokens(request.text)[0]
        if ids.numel() == 0:
            results[i] = ValueError("the text has no tokens")
        elif max_text_tokens is not None and ids.numel() > max_text_tokens:
            results[i] = ValueError(f"the text is {ids.numel()} tokens long; this server takes at most "
                                    f"{max_text_tokens}")
        else:
            good.append(i)
            rows.append(ids)
    if not good:
        return results
    start = 1 if bos is not None else 0
    length = start + max(ids.numel() for ids in rows)
    pad = model.eos_token_id if model.eos_token_id is not None else 0
    batch = torch.full((len(rows), length), pad, dtype=torch.long)
    for r, ids in enumerate(rows):
        if bos is not None:
            batch[r, 0] = bos
        batch[r, start:start + ids.numel()] = ids
    acts = model.capture(batch, sorted({requests[i].hook for i in good}))
    for r, (i, ids) in enumerate(zip(good, rows)):
        request = requests[i]
        x = acts[request.hook][r, start:start + ids.numel()]
        codes = request.sae.encode(x.cpu()).detach()
        results[i] = TextCodes([model.tokenizer.decode([int(t)]) for t in ids], ids.tolist(), codes)
    return results


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
