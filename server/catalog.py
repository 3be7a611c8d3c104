"""GET routes: models, hooks, SAEs, pages of features and single features."""
from __future__ import annotations

from typing import Any, Literal, Optional

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from .deps import analysed_sae, registry, served_sae
from .registry import Registry
from .schemas import ID_PATTERN, Text, error_responses, Feature, FeaturePage, HookInfo, ModelInfo, SAEInfo, ServerInfo

router = APIRouter(prefix="/api", tags=["catalog"], responses=error_responses(404, 422, 503))
SAE_ID = Path(pattern=ID_PATTERN, description="SAE id, as listed by GET /api/saes")


@router.get("/health")
def health(reg: Registry = Depends(registry)) -> dict[str, Any]:
    """"ok", or "degraded" with ``problems`` by SAE id (e.g. a feature store damaged while served)."""
    return reg.health()


@router.get("/server", response_model=ServerInfo)
def server(request: Request):
    """What this server does: the UI asks before showing the training pages."""
    service = request.app.state.runs
    return {"trains": service is not None, "max_runs": service.max_runs if service is not None else 0,
            "needs_token": request.app.state.api_token is not None}


@router.get("/models", response_model=list[ModelInfo])
def models(reg: Registry = Depends(registry)):
    return reg.describe_models()


@router.get("/hooks", response_model=list[HookInfo])
def hooks(reg: Registry = Depends(registry)):
    return reg.describe_hooks()


@router.get("/saes", response_model=list[SAEInfo])
def saes(reg: Registry = Depends(registry)):
    return reg.describe_saes()


@router.get("/saes/{sae_id}", response_model=SAEInfo)
def sae(sae_id: str = SAE_ID, reg: Registry = Depends(registry)):
    return served_sae(reg, sae_id).describe()


@router.get("/saes/{sae_id}/features", response_model=FeaturePage)
def feature_page(
    sae_id: str = SAE_ID,
    offset: int = Query(0, ge=0, le=10_000_000),
    limit: int = Query(50, ge=1, le=500),
    sort: Literal["id", "density", "max_act", "mean_act", "fire_count", "score"] = "id",
    order: Literal["asc", "desc"] = "asc",
    min_density: Optional[float] = Query(None, ge=0, le=1),
    max_density: Optional[float] = Query(None, ge=0, le=1),
    min_max_act: Optional[float] = Query(None, ge=-1e9, le=1e9),
    q: Optional[Text] = Query(None, max_length=200, description="words in the explanation or top tokens (full-text), or text in the promoted tokens"),
    reg: Registry = Depends(registry),
):
    served = analysed_sae(reg, sae_id)
    total, rows = served.store.list_features(offset=offset, limit=limit, sort=sort, descending=order == "desc",
                                             min_density=min_density, max_density=max_density,
                                             min_max_act=min_max_act, text=q or None)
    return {"sae": sae_id, "total": total, "offset": offset, "limit": limit, "features": rows}


@router.get("/saes/{sae_id}/features/{index}", response_model=Feature)
def feature(index: int, sae_id: str = SAE_ID, reg: Registry = Depends(registry)):
    served = analysed_sae(reg, sae_id)
    try:
        return {"sae": sae_id, **served.store.feature(index)}
    except IndexError as exc:
        raise HTTPException(404, str(exc)) from None
