"""Queries on jobs and their events: create, list, claim, lease, progress, finish."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from core import states
from core.db.pagination import page_after
from core.db.tables import Job, JobEvent, utcnow
from core.errors import NotFound


def get_job(session: Session, *, tenant_id: str | None, job_id: str, lock: bool = False) -> Job:
    stmt = select(Job).where(Job.id == job_id)
    if tenant_id is not None:
        stmt = stmt.where(Job.tenant_id == tenant_id)
    if lock:
        stmt = stmt.with_for_update()
    job = session.scalars(stmt).first()
    if job is None:
        raise NotFound(f"no job {job_id}", param="job_id")
    return job


def find_by_idempotency_key(session: Session, *, tenant_id: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.tenant_id == tenant_id,
                                             Job.idempotency_key == key)).first()


def list_jobs(session: Session, *, tenant_id: str, limit: int, after: str | None,
              status: str | None, dataset_id: str | None) -> tuple[list[Job], bool]:
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if dataset_id:
        stmt = stmt.where(Job.dataset_id == dataset_id)
    return page_after(session, stmt, Job, limit=limit, after=after)


def append_event(session: Session, *, job_id: str, kind: str, data: dict | None = None) -> int:
    """Append to the job's ordered event stream; returns the event's seq (1-based).
    Locks the job row so concurrent writers (worker, API) never collide on seq."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    seq = (session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
           or 0) + 1
    session.add(JobEvent(job_id=job_id, seq=seq, kind=kind, data=data or {}))
    session.flush()
    return seq


def list_events(session: Session, *, job_id: str, after: int, limit: int) -> list[JobEvent]:
    return list(session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after)
        .order_by(JobEvent.seq).limit(limit)))


def claim_job(session: Session, *, job_id: str, worker_id: str, lease_seconds: int,
              now: datetime | None = None) -> bool:
    """Conditional UPDATE: take a queued job, or a running one whose lease expired
    (its worker died). Exactly one claimant wins; a redelivered message loses."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.cancel_requested.is_(False),
               or_(Job.status == states.QUEUED,
                   (Job.status == states.RUNNING) & (Job.lease_until < now)))
        .values(status=states.RUNNING, worker_id=worker_id, attempts=Job.attempts + 1,
                lease_until=now + timedelta(seconds=lease_seconds),
                started_at=func.coalesce(Job.started_at, now))
        .execution_options(synchronize_session=False))
    return result.rowcount == 1


def renew_lease(session: Session, *, job_id: str, worker_id: str, lease_seconds: int) -> bool:
    """Heartbeat; False when another worker owns the job now."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.worker_id == worker_id,
                          Job.status.in_(states.ACTIVE))
        .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False))
    return result.rowcount == 1


def expired_jobs(session: Session, *, now: datetime | None = None) -> list[str]:
    """Running or cancelling jobs whose worker stopped renewing its lease."""
    now = now or utcnow()
    return list(session.scalars(select(Job.id).where(Job.status.in_(states.ACTIVE),
                                                     Job.lease_until < now)))


def set_status(job: Job, status: str) -> None:
    if not states.can_transition(job.status, status):
        raise ValueError(f"job {job.id}: {job.status} → {status} is not allowed")
    job.status = status
    if status in states.TERMINAL:
        job.finished_at = utcnow()
        job.lease_until = None
