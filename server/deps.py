"""Shared request plumbing: the registry, SAE lookup, the steering token."""
from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .registry import Registry, ServedSAE

bearer = HTTPBearer(auto_error=False, description="needed for POST /api/steer and /api/runs when the server has an API token")


def registry(request: Request) -> Registry:
    return request.app.state.registry


def served_sae(registry: Registry, sae_id: str) -> ServedSAE:
    served = registry.saes.get(sae_id)
    if served is None and sae_id in registry.skipped:
        raise HTTPException(404, f"SAE {sae_id!r} is not served: {registry.skipped[sae_id]}")
    if served is None:
        raise HTTPException(404, f"no SAE {sae_id!r}; GET /api/saes lists the served ones")
    return served


def analysed_sae(registry: Registry, sae_id: str) -> ServedSAE:
    served = served_sae(registry, sae_id)
    if served.store is None:
        raise HTTPException(404, f"SAE {sae_id!r} has no feature store: {served.store_problem}")
    return served


def steering_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    expected = request.app.state.api_token
    if expected is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "steering and training runs need the server's API token: "
                                 "send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
