"""/ui: the read-only web dashboard (server-side HTML, no JavaScript).

The API key comes from an HttpOnly, SameSite=Strict cookie set by the login form,
or from ``Authorization: Bearer``; it is checked with the same lookup as the API
(``core.db.tenants.tenant_for_key``). Every page shows only the tenant's own data:
another tenant's job answers the 404 page, like an unknown one.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from api.deps import ReadSession, tenant_of_key
from api.schemas import aware
from api.ui.plots import line_plot, metric_series
from core import states
from core.db.datasets import get_dataset, list_datasets
from core.db.jobs import get_job, list_events, list_jobs
from core.db.tables import Artifact, Job
from core.errors import InvalidRequest, NotFound
from core.privacy import ledger
from core.storage import artifact_store

router = APIRouter(prefix="/ui", include_in_schema=False)

COOKIE = "dpc_key"
COOKIE_SECONDS = 8 * 3600
PAGE = 50
# final job metrics worth a card on the job page (the rest are in the API's job object)
SUMMARY_METRICS = ("loss", "accuracy", "f1", "perplexity", "sparsity")
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parents[1] / "ui"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
# No script runs on these pages; styles are inline in the template.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _fmt_time(dt: datetime | None) -> str:
    dt = aware(dt)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC") if dt else "—"


TEMPLATES.filters["time"] = _fmt_time


def render(name: str, *, status_code: int = 200, **context) -> HTMLResponse:
    html = TEMPLATES.get_template(name).render(statuses=states.STATUSES, **context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def _request_key(request: Request) -> str | None:
    key = request.cookies.get(COOKIE, "").strip()
    if key:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def ui_tenant(request: Request, session) -> str | None:
    """The tenant of the cookie's (or header's) key; None when absent or revoked."""
    key = _request_key(request)
    return tenant_of_key(key, session) if key else None


def _safe_next(target: str | None) -> str:
    """Only a path of this dashboard (no scheme, host or protocol-relative URL)."""
    if target and target.startswith("/ui") and "//" not in target and "\\" not in target:
        return target
    return "/ui/jobs"


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)


def _not_found(message: str) -> HTMLResponse:
    return render("error.html", status_code=404, title="Not found", message=message, logged_in=True)


@router.get("")
def home(request: Request, session: ReadSession) -> Response:
    target = "/ui/jobs" if ui_tenant(request, session) else "/ui/login"
    return RedirectResponse(target, status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return render("login.html", next=_safe_next(next), error=None, logged_in=False)


@router.post("/login")
def login(
    request: Request,
    session: ReadSession,
    api_key: Annotated[str, Form(max_length=500)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/jobs",
) -> Response:
    key = api_key.strip()
    if not key or tenant_of_key(key, session) is None:
        return render(
            "login.html",
            status_code=401,
            next=_safe_next(next),
            error="invalid or revoked API key",
            logged_in=False,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        COOKIE,
        key,
        max_age=COOKIE_SECONDS,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


@router.get("/datasets")
def datasets_page(request: Request, session: ReadSession, after: str | None = None) -> Response:
    tenant_id = ui_tenant(request, session)
    if tenant_id is None:
        return _to_login(request)
    try:
        rows, has_more = list_datasets(session, tenant_id=tenant_id, limit=PAGE, after=after)
    except InvalidRequest:
        return _not_found(f"unknown page cursor {after}")
    items = []
    for ds in rows:
        budget = ledger.dataset_budget(session, dataset=ds)
        cap = budget.epsilon_cap or 1.0
        items.append(
            {
                "ds": ds,
                "budget": budget,
                "pct": {
                    k: min(100.0, 100.0 * v / cap)
                    for k, v in (
                        ("spent", budget.epsilon_spent),
                        ("reserved", budget.epsilon_reserved),
                        ("remaining", budget.epsilon_remaining),
                    )
                },
            }
        )
    return render(
        "datasets.html", items=items, logged_in=True, next_cursor=rows[-1].id if has_more else None
    )


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: ReadSession,
    status: str | None = None,
    dataset_id: str | None = None,
    after: str | None = None,
) -> Response:
    tenant_id = ui_tenant(request, session)
    if tenant_id is None:
        return _to_login(request)
    status = status if status in states.STATUSES else None
    try:
        rows, has_more = list_jobs(
            session,
            tenant_id=tenant_id,
            limit=PAGE,
            after=after,
            status=status,
            dataset_id=dataset_id or None,
        )
    except InvalidRequest:
        return _not_found(f"unknown page cursor {after}")
    return render(
        "jobs.html",
        jobs=[(j, _progress(j)) for j in rows],
        status=status,
        dataset_id=dataset_id or "",
        logged_in=True,
        next_cursor=rows[-1].id if has_more else None,
    )


def _progress(job: Job) -> dict:
    """Global step over all phases (a phase's step restarts at 1) and ε spent/planned."""
    phases = job.plan.get("phases", [])
    total = sum(int(p.get("steps", 0)) for p in phases) or job.total_steps
    if job.status == states.SUCCEEDED:
        done = total
    elif job.phase is None:
        done = 0
    else:
        done = job.step
        for p in phases:
            if p.get("name") == job.phase:
                break
            done += int(p.get("steps", 0))
        done = min(done, total)
    return {
        "step": done,
        "total": total,
        "pct": 100.0 * done / total if total else 0.0,
        "epsilon_spent": job.epsilon_spent,
        "epsilon_planned": job.plan.get("epsilon", 0.0),
    }


def _all_events(session, *, job_id: str) -> list:
    events, after = [], 0
    while True:
        page = list_events(session, job_id=job_id, after=after, limit=1000)
        events.extend(page)
        if len(page) < 1000:
            return events
        after = page[-1].seq


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, session: ReadSession) -> Response:
    tenant_id = ui_tenant(request, session)
    if tenant_id is None:
        return _to_login(request)
    try:
        job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    except NotFound:
        return _not_found(f"no job {job_id}")
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=job.dataset_id)
    events = _all_events(session, job_id=job.id)
    metrics = [e.data for e in events if e.kind == "train.metrics"]
    loss_plot = line_plot(
        metric_series(metrics, "loss"),
        title="Training loss",
        x_label="step",
        y_label="loss",
        plot_id="plot-loss",
    )
    eps_plot = line_plot(
        metric_series(metrics, "epsilon"),
        title="ε spent",
        x_label="step",
        y_label="ε",
        plot_id="plot-epsilon",
        y_from_zero=True,
    )
    rows = ledger.job_ledger(session, job_id=job.id)
    summary = ledger.summarize(rows, delta=job.plan["delta"], accountant=job.plan["accountant"])
    artifacts = list(
        session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name))
    )
    return render(
        "job.html",
        job=job,
        dataset=dataset,
        progress=_progress(job),
        loss_plot=loss_plot,
        eps_plot=eps_plot,
        ledger_rows=rows,
        summary=summary,
        artifacts=artifacts,
        recent=events[-12:][::-1],
        summary_metrics=[
            (k, v)
            for k, v in sorted((job.metrics or {}).items())
            if isinstance(v, int | float) and k.endswith(SUMMARY_METRICS)
        ][:4],
        logged_in=True,
        refresh=job.status not in states.TERMINAL,
    )


@router.get("/jobs/{job_id}/artifacts/{name}")
def artifact_download(job_id: str, name: str, request: Request, session: ReadSession) -> Response:
    tenant_id = ui_tenant(request, session)
    if tenant_id is None:
        return _to_login(request)
    try:
        get_job(session, tenant_id=tenant_id, job_id=job_id)
    except NotFound:
        return _not_found(f"no job {job_id}")
    art = session.scalars(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    ).first()
    if art is None:
        return _not_found(f"job {job_id} has no artifact {name}")
    return FileResponse(
        artifact_store().path(art.storage_key),
        media_type="application/gzip",
        filename=name,
        headers={"X-Checksum-Sha256": art.sha256, "Cache-Control": "no-store"},
    )
