"""Explanations: full-text search, the density distribution, and explaining one feature on request."""
from __future__ import annotations

import threading
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from sae_kit.feature_store import FeatureStoreError
from .deps import analysed_sae, registry, steering_token
from .registry import Registry
from .schemas import ID_PATTERN, Text, DensityDistribution, ExplanationBrief, ExplainRequest, ExplanationSearch, Feature, error_responses

router = APIRouter(prefix="/api", tags=["explanations"], responses=error_responses(400, 404, 413, 422))
SAE_ID = Path(pattern=ID_PATTERN, description="SAE id, as listed by GET /api/saes")
_explain_lock = threading.Lock()  # one explain job at a time (it writes the store and may load a model)


@router.get("/saes/{sae_id}/explanations/search", response_model=ExplanationSearch)
def search(q: Annotated[Text, Query(min_length=1, max_length=200, description="words, matched as prefixes, all required")],
           sae_id: str = SAE_ID,
           offset: int = Query(0, ge=0, le=100_000), limit: int = Query(20, ge=1, le=200),
           reg: Registry = Depends(registry)):
    served = analysed_sae(reg, sae_id)
    try:
        total, results = served.store.search_explanations(q, limit=limit, offset=offset)
    except FeatureStoreError as exc:
        raise HTTPException(404, str(exc)) from None
    return {"sae": sae_id, "q": q, "total": total, "offset": offset, "limit": limit, "results": results}


@router.get("/saes/{sae_id}/explanations", response_model=list[ExplanationBrief])
def briefs(sae_id: str = SAE_ID, ids: str = Query(..., max_length=2000, pattern=r"^\d+(,\d+)*$",
                                                   description="comma-separated feature ids"),
           reg: Registry = Depends(registry)):
    """The explanation and score of each listed feature (for pages that show feature ids)."""
    served = analysed_sae(reg, sae_id)
    wanted = [int(i) for i in ids.split(",")][:500]
    return served.store.explanation_briefs([i for i in wanted if 0 <= i < served.store.d_sae])


@router.get("/saes/{sae_id}/densities", response_model=DensityDistribution)
def densities(sae_id: str = SAE_ID, bins: int = Query(40, ge=2, le=200), reg: Registry = Depends(registry)):
    return {"sae": sae_id, **analysed_sae(reg, sae_id).store.density_histogram(bins)}


@router.post("/saes/{sae_id}/features/{index}/explain", response_model=Feature,
             dependencies=[Depends(steering_token)], responses=error_responses(401, 503))
def explain(request: Request, body: ExplainRequest, index: int, sae_id: str = SAE_ID,
            reg: Registry = Depends(registry)):
    from sae_kit.explain import ExplainConfig, run_explain
    from sae_kit.explain.backends import BackendError

    served = analysed_sae(reg, sae_id)
    if not 0 <= index < served.store.d_sae:
        raise HTTPException(404, f"feature {index} is out of range: this SAE has features 0..{served.store.d_sae - 1}")
    with _explain_lock:
        backend = None
        if body.explainer == "lm":
            try:
                backend = _local_backend(request)
            except BackendError as exc:
                raise HTTPException(503, f"no explainer model on this server: {exc}") from None
        cfg = ExplainConfig(backend="none" if backend is None else "local", features=[index], redo=True,
                            progress=False)
        try:
            result = run_explain(served.path, cfg, store_path=served.store.path, backend=backend)
        except FeatureStoreError as exc:
            raise HTTPException(422, str(exc)) from None
    if index in result.skipped:
        raise HTTPException(422, f"feature {index} cannot be explained and scored: {result.skipped[index]}")
    return {"sae": sae_id, **served.store.feature(index)}


def _local_backend(request: Request):
    """The server's explainer model (the embedded SmolLM2 unless SAE_KIT_EXPLAIN_MODEL names a folder),
    loaded on first use and kept."""
    import os

    from sae_kit.explain.backends import LocalBackend

    state = request.app.state
    if getattr(state, "explain_backend", None) is None:
        state.explain_backend = LocalBackend(os.environ.get("SAE_KIT_EXPLAIN_MODEL") or None)
    return state.explain_backend
