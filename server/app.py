"""The FastAPI application: REST API under /api, the web UI at /, OpenAPI docs at /docs.

``create_app(root)`` serves every SAE folder under ``root`` (with its ``features.sqlite`` from
``sae-kit analyze``) and loads each SAE's model once. ``run()`` starts it on uvicorn
(``sae-kit serve``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from sae_kit.feature_store import FeatureStoreError

from . import catalog, explain, runs, steer, text
from .registry import Limits, Registry

FRONTEND_SPEC = "sae_kit.frontend"


def create_app(root: str | Path, *, model_name: str | None = None, api_token: str | None = None,
               limits: Limits = Limits(), device: str = "cpu", max_runs: int = 0) -> FastAPI:
    """``max_runs`` >= 1 also serves training runs (that many at once) under ``root/runs``."""
    from contextlib import asynccontextmanager

    from sae_kit.runs import RunService

    registry = Registry(root, model_name=model_name, device=device, limits=limits, lenient=max_runs > 0)
    service = RunService(root, max_runs=max_runs, on_sae_ready=registry.add_folder) if max_runs > 0 else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if service is not None:
            service.close()  # running runs become "interrupted", resumable

    app = FastAPI(lifespan=lifespan, title="sae-kit", version="0.1.0",
                  description="Browse SAE features, find the features a text activates, and steer generation.")
    app.state.registry = registry
    app.state.runs = service
    app.state.api_token = api_token or None
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    for router in (catalog.router, explain.router, text.router, steer.router, *([runs.router] if service is not None else [])):
        app.include_router(router)

    @app.exception_handler(FeatureStoreError)
    async def damaged_feature_store(request: Request, exc: FeatureStoreError):
        # The file changed under the server (deleted, truncated, overwritten): not the client's fault.
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # One readable sentence per problem, plus the structured list.
        problems = [f"{'.'.join(str(p) for p in error['loc'][1:]) or error['loc'][0]}: {error['msg']}"
                    for error in exc.errors()]
        return JSONResponse({"detail": "; ".join(problems), "errors": _jsonable(exc.errors())}, status_code=422)

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly_js():
        return FileResponse(_plotly_js(), media_type="application/javascript")

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse("/ui/index.html")

    app.mount("/ui", StaticFiles(directory=frontend_dir(), html=True), name="ui")
    return app


def frontend_dir() -> Path:
    spec = importlib.util.find_spec(FRONTEND_SPEC)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError("the web UI's files (package sae_kit.frontend) are not installed; reinstall sae-kit")
    return Path(locations[0])


def _plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")
    path = Path(spec.submodule_search_locations[0]) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise HTTPException(404, "plotly.min.js is not in the installed plotly package")
    return path


def _jsonable(errors: list) -> list:
    return [{key: (value if key != "ctx" else {k: str(v) for k, v in value.items()}) for key, value in error.items()
             if key in ("type", "loc", "msg", "ctx")} for error in errors]


class BodyLimit:
    """Answers 413 to a request body over ``max_bytes``: by its Content-Length, or, for a chunked body
    (no Content-Length), counted as it streams in. The body is read here, up to the limit, and handed
    on whole: the limit is enforced before any route (or FastAPI's body parser) sees a byte of it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes: send at most {self.max_bytes}"},
                                status_code=413)
        await response({"type": "http"}, None, send)


def run(root: str | Path, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
        api_token: str | None = None, threads: int | None = None, max_runs: int = 0) -> None:
    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    app = create_app(root, model_name=model_name, api_token=api_token, max_runs=max_runs)
    for sae_id, problem in app.state.registry.skipped.items():
        print(f"not serving {sae_id}: {problem}", flush=True)
    print(f"serving {len(app.state.registry.saes)} SAE(s) from {Path(root).resolve()} at http://{host}:{port}/ "
          f"(API docs: http://{host}:{port}/docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
