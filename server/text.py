"""POST routes over a text: search (which features fire, per token and overall) and encode."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from sae_kit.text_features import encode_text, feature_values, per_token_top, top_over_text
from .deps import model_turn, registry, served_sae
from .registry import Registry
from .schemas import EncodeRequest, EncodeResponse, error_responses, SearchResponse, TextRequest

router = APIRouter(prefix="/api", tags=["text"], responses=error_responses(400, 404, 413, 422))


def _encode(reg: Registry, sae_id: str, text: str):
    served = served_sae(reg, sae_id)
    model = reg.models[served.model_id]
    limit = reg.limits.max_text_tokens
    with model_turn(model):
        n_tokens = len(model.model.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n_tokens > limit:
            raise HTTPException(422, f"the text is {n_tokens} tokens long; this server takes at most {limit}")
        return encode_text(model.model, served.sae, served.hook, text)


@router.post("/search", response_model=SearchResponse)
def search(request: TextRequest, reg: Registry = Depends(registry)):
    result = _encode(reg, request.sae, request.text)
    return {"sae": request.sae, "tokens": result.tokens, "token_features": per_token_top(result.codes, request.top_k),
            "top_features": top_over_text(result.codes, request.top_features)}


@router.post("/encode", response_model=EncodeResponse)
def encode(request: EncodeRequest, reg: Registry = Depends(registry)):
    served = served_sae(reg, request.sae)
    if request.features is not None:
        bad = [i for i in request.features if not 0 <= i < served.sae.cfg.d_sae]
        if bad:
            raise HTTPException(422, f"features {bad} are out of range: SAE {request.sae!r} has 0..{served.sae.cfg.d_sae - 1}")
    result = _encode(reg, request.sae, request.text)
    response = {"sae": request.sae, "tokens": result.tokens, "token_ids": result.token_ids}
    if request.features is None:
        response["active"] = per_token_top(result.codes, result.codes.indices.shape[1])
    else:
        response["features"] = request.features
        response["values"] = feature_values(result.codes, request.features).tolist() if request.features else \
            [[] for _ in result.tokens]
    return response
