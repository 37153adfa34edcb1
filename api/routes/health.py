"""/healthz (liveness), /readyz (database and broker reachable), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select, text

from api.deps import ReadSession
from api.metrics import REGISTRY
from core.db.tables import Job
from core.queue import get_celery

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: ReadSession) -> JSONResponse:
    checks = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # report, never raise: this is a probe
        checks["database"] = f"error: {type(e).__name__}"
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"error: {type(e).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(session: ReadSession) -> Response:
    jobs = CollectorRegistry()
    gauge = Gauge("dpc_jobs", "jobs by status", ["status"], registry=jobs)
    for status, count in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        gauge.labels(status=status).set(count)
    body = generate_latest(REGISTRY) + generate_latest(jobs)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
