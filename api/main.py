"""The FastAPI app. Torch-free: importing this module must leave torch unloaded."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from api.errors import install_error_handlers
from api.metrics import LATENCY, REQUESTS
from api.routes import datasets, health, jobs, ui
from core.db.session import session_scope
from core.db.tenants import ensure_bootstrap_key
from core.settings import get_settings

log = logging.getLogger("dpc.api")


@asynccontextmanager
async def lifespan(_: FastAPI):
    settings = get_settings()
    if settings.bootstrap_api_key:
        with session_scope() as session:
            ensure_bootstrap_key(session, key=settings.bootstrap_api_key)
    yield


def create_app() -> FastAPI:
    app = FastAPI(title="dpcompress", version="0.1.0", lifespan=lifespan,
                  description="Private model compression with a per-dataset DP budget.")
    install_error_handlers(app)

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        LATENCY.labels(request.method, path).observe(time.perf_counter() - start)
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        return response

    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(ui.router)
    return app


app = create_app()
