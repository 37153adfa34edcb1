"""/v1/jobs: create (with dry run and Idempotency-Key), list, show, cancel, events,
ledger, artifacts."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import ReadSession, TenantId, WriteSession
from api.schemas import (
    ArtifactList,
    DryRunPublic,
    ErrorResponse,
    EventList,
    JobList,
    JobPublic,
    LedgerPublic,
    artifact_public,
    event_public,
    job_public,
)
from core import states
from core.db.datasets import get_dataset, readable_dataset
from core.db.jobs import append_event, find_by_idempotency_key, get_job, list_events, list_jobs
from core.db.tables import Artifact, Job, new_id, utcnow
from core.errors import Conflict, InvalidRequest, InvalidState, NotFound
from core.model_refs import CAUSAL_BASES, check_model_base
from core.privacy import ledger
from core.privacy.planner import estimate_seconds, plan_job
from core.queue import send_run_job
from core.specs import JobSpec
from core.storage import artifact_store

log = logging.getLogger("dpc.api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"],
                   responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                              422: {"model": ErrorResponse}})


def _root_base(session, *, tenant_id: str, base: str) -> str:
    """Follow ``job:<id>`` references down to the original base model name."""
    for _ in range(32):
        if not base.startswith("job:"):
            return base
        base = get_job(session, tenant_id=tenant_id, job_id=base[4:]).spec["model"]["base"]
    return base


def _validate_against_data(session, *, tenant_id: str, spec: JobSpec):
    """Checks that need the database: datasets exist and fit the method and model."""
    ds = readable_dataset(session, tenant_id=tenant_id, dataset_id=spec.dataset_id,
                          param="dataset_id")
    if spec.eval_dataset_id:
        ev = readable_dataset(session, tenant_id=tenant_id, dataset_id=spec.eval_dataset_id,
                              param="eval_dataset_id")
        if ev.task != ds.task:
            raise InvalidRequest("eval dataset must exist and have the same task",
                                 param="eval_dataset_id")
    if spec.calibration_dataset_id:
        readable_dataset(session, tenant_id=tenant_id, dataset_id=spec.calibration_dataset_id,
                         param="calibration_dataset_id", read_without_dp=True)
    base_dataset = check_model_base(session, tenant_id=tenant_id, base=spec.model.base)
    causal = _root_base(session, tenant_id=tenant_id, base=spec.model.base) in CAUSAL_BASES
    if ds.task == "causal_lm" and not causal:
        raise InvalidRequest("a causal_lm dataset needs a causal base model "
                             "(bundled:smollm2-135m, tiny:llama)", param="model.base")
    if spec.method == "distildp" and ds.task != "causal_lm":
        raise InvalidRequest("distildp needs a causal_lm dataset", param="method")
    if spec.method in ("dpimp_structured", "dpkd") and causal and ds.task != "causal_lm":
        raise InvalidRequest(f"{spec.method} on classification needs an encoder base "
                             "(bundled:minilm-l6, tiny:bert)", param="model.base")
    teacher_precharged = spec.method == "dpkd" and base_dataset == ds.id
    if spec.method == "dpkd" and base_dataset not in (None, ds.id):
        raise InvalidRequest("a job:<id> teacher must be trained on the same dataset",
                             param="model.base")
    spec_delta = spec.privacy.delta if spec.privacy.delta is not None else ds.delta
    planned_spec = spec.model_copy(deep=True)
    planned_spec.privacy.delta = spec_delta
    plan = plan_job(planned_spec, num_records=ds.num_records, task=ds.task,
                    teacher_precharged=teacher_precharged, has_control_codes=bool(ds.controls))
    return ds, plan


@router.post("", status_code=201, response_model=JobPublic | DryRunPublic,
             responses={200: {"model": JobPublic}, 409: {"model": ErrorResponse}})
def create_job(spec: JobSpec, tenant_id: TenantId, session: WriteSession, response: Response,
               dry_run: bool = False,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None):
    """Plan the job's privacy, reserve its ε against the dataset cap (same
    transaction as the job row), and enqueue it. ``dry_run=true`` returns the plan
    and budget check and changes nothing."""
    spec_json = spec.model_dump(mode="json")
    if idempotency_key and not dry_run:
        existing = find_by_idempotency_key(session, tenant_id=tenant_id, key=idempotency_key)
        if existing is not None:
            if existing.spec != spec_json:
                raise Conflict("Idempotency-Key was used with a different job spec",
                               param="Idempotency-Key")
            response.status_code = 200
            return job_public(existing)
    ds, plan = _validate_against_data(session, tenant_id=tenant_id, spec=spec)
    plan_json = plan.model_dump(mode="json")
    if dry_run:
        budget = ledger.preview_budget(session, dataset=ds, plan=plan)
        session.rollback()
        response.status_code = 200
        return DryRunPublic(plan=plan_json, budget=budget,
                            estimate={"seconds": round(estimate_seconds(spec, ds.num_records,
                                                                        ds.task))})
    # Lock the dataset row before the job row's foreign key takes a share lock on it:
    # concurrent submissions then queue here instead of deadlocking.
    get_dataset(session, tenant_id=tenant_id, dataset_id=ds.id, lock=True)
    total_steps = sum(p.steps for p in plan.phases)
    job = Job(id=new_id("job"), tenant_id=tenant_id, dataset_id=ds.id,
              eval_dataset_id=spec.eval_dataset_id, method=spec.method, spec=spec_json,
              plan=plan_json, status=states.QUEUED, total_steps=total_steps,
              idempotency_key=idempotency_key if idempotency_key else None)
    session.add(job)
    session.flush()
    budget = ledger.reserve_budget(session=session, dataset_id=ds.id, job_id=job.id, plan=plan)
    append_event(session, job_id=job.id, kind="job.queued", data={"status": states.QUEUED})
    append_event(session, job_id=job.id, kind="budget.reserved",
                 data={"epsilon": plan.epsilon, "budget": budget.to_dict()})
    try:
        session.commit()
    except IntegrityError as e:  # the same Idempotency-Key raced us
        session.rollback()
        existing = find_by_idempotency_key(session, tenant_id=tenant_id,
                                           key=idempotency_key or "")
        if existing is None:
            raise
        if existing.spec != spec_json:
            raise Conflict("Idempotency-Key was used with a different job spec",
                           param="Idempotency-Key") from e
        response.status_code = 200
        return job_public(existing)
    try:
        send_run_job(job.id)
    except Exception:  # the worker's sweep re-sends queued jobs; the job is safe
        log.exception("could not enqueue %s; the worker sweep will pick it up", job.id)
    return job_public(job)


@router.get("", response_model=JobList)
def list_all(tenant_id: TenantId, session: ReadSession,
             limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None,
             status: Annotated[str | None, Query(pattern="^(" + "|".join(states.STATUSES)
                                                 + ")$")] = None,
             dataset_id: str | None = None) -> JobList:
    rows, has_more = list_jobs(session, tenant_id=tenant_id, limit=limit, after=after,
                               status=status, dataset_id=dataset_id)
    return JobList(data=[job_public(j) for j in rows], has_more=has_more,
                   next_cursor=rows[-1].id if has_more else None)


@router.get("/{job_id}", response_model=JobPublic)
def show(job_id: str, tenant_id: TenantId, session: ReadSession) -> JobPublic:
    return job_public(get_job(session, tenant_id=tenant_id, job_id=job_id))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic,
             responses={409: {"model": ErrorResponse}})
def cancel(job_id: str, tenant_id: TenantId, session: WriteSession) -> JobPublic:
    """A queued job is cancelled at once (its reservation released); a running
    one stops at its next step and is charged for the steps it ran."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id, lock=True)
    if job.status in states.TERMINAL:
        raise InvalidState(f"job {job.id} is already {job.status}", param="job_id")
    if job.status == states.QUEUED:
        job.cancel_requested = True
        ledger.release_unused(session=session, job_id=job.id)
        job.status = states.CANCELLED
        job.finished_at = utcnow()
        append_event(session, job_id=job.id, kind="budget.released", data={"epsilon_spent": 0.0})
        append_event(session, job_id=job.id, kind="job.cancelled", data={"status": job.status})
    elif job.status == states.RUNNING:
        job.cancel_requested = True
        job.status = states.CANCELLING
        append_event(session, job_id=job.id, kind="job.cancelling", data={"status": job.status})
    session.commit()
    return job_public(job)


@router.get("/{job_id}/events", response_model=EventList)
def events(job_id: str, tenant_id: TenantId, session: ReadSession,
           after: Annotated[int, Query(ge=0)] = 0,
           limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventList:
    """Ordered events; ``after`` is the ``seq`` of the last event seen."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = list_events(session, job_id=job_id, after=after, limit=limit + 1)
    page = rows[:limit]
    return EventList(data=[event_public(e) for e in page], has_more=len(rows) > limit,
                     next_cursor=str(page[-1].seq) if page else None)


@router.get("/{job_id}/ledger", response_model=LedgerPublic)
def job_ledger(job_id: str, tenant_id: TenantId, session: ReadSession) -> LedgerPublic:
    """The job's DP events and the composed ε of what was charged, next to an
    independent recomputation with dp_accounting (PLD)."""
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = ledger.job_ledger(session, job_id=job.id)
    return LedgerPublic(data=[ledger.event_to_dict(r) for r in rows],
                        **ledger.summarize(rows, delta=job.plan["delta"],
                                           accountant=job.plan["accountant"]))


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def artifacts(job_id: str, tenant_id: TenantId, session: ReadSession) -> ArtifactList:
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    rows = session.scalars(select(Artifact).where(Artifact.job_id == job_id)
                           .order_by(Artifact.name))
    return ArtifactList(data=[artifact_public(a) for a in rows], has_more=False,
                        next_cursor=None)


@router.get("/{job_id}/artifacts/{name}", response_class=FileResponse,
            responses={200: {"content": {"application/gzip": {}}}})
def download(job_id: str, name: str, tenant_id: TenantId, session: ReadSession):
    """Stream an artifact (the model archive is a .tar.gz of the HF folder)."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    art = session.scalars(select(Artifact).where(Artifact.job_id == job_id,
                                                 Artifact.name == name)).first()
    if art is None:
        raise NotFound(f"job {job_id} has no artifact {name}", param="name")
    path = artifact_store().path(art.storage_key)
    return FileResponse(path, media_type="application/gzip", filename=name,
                        headers={"X-Checksum-Sha256": art.sha256})
