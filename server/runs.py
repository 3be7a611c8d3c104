"""Training runs: start, list, watch, cancel, resume and analyse them (sae_kit.runs does the work).

Every route needs the server's API token when it has one: a run spends the server's CPU and disk."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import Field

from sae_kit.config import ConfigError
from sae_kit.runs import RunService, RunStateError, config_schema
from .deps import registry, steering_token
from .registry import Registry
from .schemas import ID_PATTERN, Strict, Text, error_responses

router = APIRouter(prefix="/api/runs", tags=["runs"], dependencies=[Depends(steering_token)],
                   responses=error_responses(400, 401, 404, 409, 413, 422))
RUN_ID = Path(pattern=ID_PATTERN, description="run id, as listed by GET /api/runs")


class RunRequest(Strict):
    config: dict[str, Any] = Field(description="TrainConfig settings, as in `sae-kit train --config` (GET /api/runs/schema); "
                                               "paths are relative to the server's data folder")
    name: Optional[Text] = Field(None, max_length=200)


class AnalyzeRequest(Strict):
    model: Optional[Text] = Field(None, max_length=500, description="model (name, or folder in the data folder); "
                                                                    "default: the one the SAE was trained on")
    hook: Optional[Text] = Field(None, max_length=200)
    tokens: int = Field(4096, ge=64, le=1_000_000)
    context: int = Field(64, ge=8, le=2048)


def runs(request: Request) -> RunService:
    return request.app.state.runs  # the router is included only when the server trains


def _call(action, *args, **kwargs):
    try:
        result = action(*args, **kwargs)
    except KeyError as exc:
        raise HTTPException(404, exc.args[0]) from None
    except RunStateError as exc:
        raise HTTPException(409, str(exc)) from None
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None
    return result


def _served(run: dict[str, Any], reg: Registry) -> dict[str, Any]:
    """Whether the feature browser serves the run's SAE (it does once the SAE can run on a model)."""
    if run["sae"] is not None:
        run["sae"]["served"] = run["sae"]["id"] in reg.saes
        run["sae"]["problem"] = reg.skipped.get(run["sae"]["id"])
    return run


@router.get("/schema")
def schema(service: RunService = Depends(runs)) -> dict[str, Any]:
    return config_schema()


@router.post("", status_code=201)
def create(body: RunRequest, service: RunService = Depends(runs), reg: Registry = Depends(registry)) -> dict[str, Any]:
    return _served(_call(service.create, body.config, body.name), reg)


@router.get("")
def list_runs(service: RunService = Depends(runs), reg: Registry = Depends(registry)) -> list[dict[str, Any]]:
    return [_served(run, reg) for run in service.list()]


@router.get("/{run_id}")
def run(run_id: str = RUN_ID, service: RunService = Depends(runs), reg: Registry = Depends(registry)) -> dict[str, Any]:
    return _served(_call(service.describe, run_id), reg)


@router.get("/{run_id}/metrics")
def metrics(run_id: str = RUN_ID, since_step: int = Query(0, ge=0, description="only records after this step"),
            service: RunService = Depends(runs)) -> dict[str, Any]:
    return {"run": run_id, "records": _call(service.metrics, run_id, since_step)}


@router.post("/{run_id}/cancel")
def cancel(run_id: str = RUN_ID, service: RunService = Depends(runs), reg: Registry = Depends(registry)) -> dict[str, Any]:
    return _served(_call(service.cancel, run_id), reg)


@router.post("/{run_id}/resume")
def resume(run_id: str = RUN_ID, service: RunService = Depends(runs), reg: Registry = Depends(registry)) -> dict[str, Any]:
    return _served(_call(service.resume, run_id), reg)


@router.post("/{run_id}/analyze", status_code=202)
def analyze(body: AnalyzeRequest, run_id: str = RUN_ID, service: RunService = Depends(runs),
            reg: Registry = Depends(registry)) -> dict[str, Any]:
    return _served(_call(service.analyze, run_id, body.model, body.hook, body.tokens, body.context), reg)
