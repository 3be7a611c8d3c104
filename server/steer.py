"""POST /api/steer: default and steered completions side by side."""
from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException

from sae_kit.steering import SteeringFeature, steer as steer_prompt
from .deps import model_turn, registry, served_sae, steering_token
from .registry import Registry
from .schemas import SteerRequest, SteerResponse, error_responses

router = APIRouter(prefix="/api", tags=["steering"], responses=error_responses(400, 401, 404, 413, 422))


@router.post("/steer", response_model=SteerResponse, dependencies=[Depends(steering_token)])
def steer(request: SteerRequest, reg: Registry = Depends(registry)):
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
    with model_turn(model):
        n_tokens = len(model.model.tokenizer(request.prompt, add_special_tokens=False)["input_ids"])
        if n_tokens > limit:
            raise HTTPException(422, f"the prompt is {n_tokens} tokens long; this server takes at most {limit}")
        result = steer_prompt(model.model, request.prompt,
                              [SteeringFeature(s.sae, s.output_hook, f.index, f.strength) for s, f in zip(served, request.features)],
                              max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                              seed=request.seed, method=request.method)
    return {"model": model.id, "method": request.method, "seed": request.seed, **result}
