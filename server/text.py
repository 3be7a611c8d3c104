"""POST routes over a text: search (which features fire, per token and overall) and encode.

Texts for the same model that arrive within a short window are encoded in one forward pass
(sae_kit.text_features.encode_many); each gets what it would get alone.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException

from sae_kit.text_features import EncodeRequest as Encoding, encode_many, feature_values, per_token_top, top_over_text
from .deps import registry, served_sae
from .registry import Registry
from .schemas import EncodeRequest, EncodeResponse, error_responses, SearchResponse, TextRequest

ENCODE_BATCH = 8
router = APIRouter(prefix="/api", tags=["text"], responses=error_responses(400, 404, 413, 422))


async def _encode(reg: Registry, sae_id: str, text: str):
    served = served_sae(reg, sae_id)
    model = reg.models[served.model_id]
    limit = reg.limits.max_text_tokens
    # Encoding a text is a prefill, already compute-bound on CPU: batches beyond a few texts add
    # latency (everyone waits for the whole batch) without adding throughput.
    batcher = model.batcher("encode", lambda items: encode_many(model.model, items, max_text_tokens=limit),
                            max_batch=ENCODE_BATCH)
    try:
        return await asyncio.wrap_future(batcher.submit(Encoding(served.sae, served.hook, text)))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.post("/search", response_model=SearchResponse)
async def search(request: TextRequest, reg: Registry = Depends(registry)):
    result = await _encode(reg, request.sae, request.text)
    return {"sae": request.sae, "tokens": result.tokens, "token_features": per_token_top(result.codes, request.top_k),
            "top_features": top_over_text(result.codes, request.top_features)}


@router.post("/encode", response_model=EncodeResponse)
async def encode(request: EncodeRequest, reg: Registry = Depends(registry)):
    served = served_sae(reg, request.sae)
    if request.features is not None:
        bad = [i for i in request.features if not 0 <= i < served.sae.cfg.d_sae]
        if bad:
            raise HTTPException(422, f"features {bad} are out of range: SAE {request.sae!r} has 0..{served.sae.cfg.d_sae - 1}")
    result = await _encode(reg, request.sae, request.text)
    response = {"sae": request.sae, "tokens": result.tokens, "token_ids": result.token_ids}
    if request.features is None:
        response["active"] = per_token_top(result.codes, result.codes.indices.shape[1])
    else:
        response["features"] = request.features
        response["values"] = feature_values(result.codes, request.features).tolist() if request.features else \
            [[] for _ in result.tokens]
    return response
