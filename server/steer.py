"""POST /api/steer: default and steered completions side by side.

Requests for the same model that arrive within a short window (or while a batch is generating) are
generated as one batch (sae_kit.steering.steer_many); each gets the texts it would get alone.
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException

from sae_kit.steering import SteeringFeature, SteeringRequest, steer_many
from .deps import registry, served_sae, steering_token
from .registry import Registry
from .schemas import SteerRequest, SteerResponse, error_responses

router = APIRouter(prefix="/api", tags=["steering"], responses=error_responses(400, 401, 404, 413, 422))


@router.post("/steer", response_model=SteerResponse, dependencies=[Depends(steering_token)])
async def steer(request: SteerRequest, reg: Registry = Depends(registry)):
    served = [served_sae(reg, feature.sae) for feature in request.features]
    model_ids = {s.model_id for s in served}
    if len(model_ids) > 1:
        raise HTTPException(422, f"the features come from SAEs of different models ({sorted(model_ids)}); "
                                 "steer one model at a time")
    for s, feature in zip(served, request.features):
        if feature.index >= s.sae.cfg.d_sae:
            raise HTTPException(422, f"feature {feature.index} is out of range: SAE {s.id!r} has 0..{s.sae.cfg.d_sae - 1}")
    model = reg.models[served[0].model_id]
    limit = reg.limits.max_prompt_tokens
    batcher = model.batcher("steer", lambda items: steer_many(model.model, items, max_prompt_tokens=limit))
    steering = SteeringRequest(request.prompt, tuple(SteeringFeature(s.sae, s.output_hook, f.index, f.strength)
                                                     for s, f in zip(served, request.features)),
                               max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                               seed=request.seed, method=request.method)
    try:
        result = await asyncio.wrap_future(batcher.submit(steering))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"model": model.id, "method": request.method, "seed": request.seed, **result}
