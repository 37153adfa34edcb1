"""The FastAPI app. Torch-free: importing this module must leave torch unloaded."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

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


class ObserveRequests:
    """Request count and latency per route template (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)
            REQUESTS.labels(scope["method"], path, str(status[0])).inc()


def create_app() -> FastAPI:
    app = FastAPI(title="dpcompress", version="0.1.0", lifespan=lifespan,
                  description="Private model compression with a per-dataset DP budget.")
    install_error_handlers(app)

    app.add_middleware(ObserveRequests)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(ui.router)
    return app


app = create_app()
