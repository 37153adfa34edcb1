"""Public shapes of every resource (``response_model`` on every route so that
internal columns such as storage keys and worker ids never leak)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from core.db.tables import Artifact, Dataset, Job, JobEvent
from core.privacy.ledger import Budget


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class BudgetPublic(BaseModel):
    epsilon_cap: float
    delta: float
    epsilon_spent: float
    epsilon_reserved: float
    epsilon_remaining: float


class DatasetPublic(BaseModel):
    id: str
    name: str
    task: str
    num_records: int
    columns: dict[str, Any]
    labels: list[str]
    controls: list[str]
    budget: BudgetPublic
    public: bool  # declared public text at upload (may be read without DP as calibration)
    deleted: bool
    created_at: datetime


class Progress(BaseModel):
    phase: str | None
    step: int
    total_steps: int


class JobPrivacy(BaseModel):
    plan: dict[str, Any]
    epsilon_spent: float
    delta: float


class JobPublic(BaseModel):
    id: str
    status: str
    method: str
    dataset_id: str
    eval_dataset_id: str | None
    spec: dict[str, Any]
    progress: Progress
    privacy: JobPrivacy
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class EventPublic(BaseModel):
    seq: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


class ArtifactPublic(BaseModel):
    name: str
    bytes: int
    sha256: str
    created_at: datetime


class LedgerEventPublic(BaseModel):
    id: str
    job_id: str
    dataset_id: str
    phase: str
    mechanism: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float | None
    sensitivity: float
    delta: float
    status: str
    created_at: datetime


class LedgerPublic(BaseModel):
    data: list[LedgerEventPublic]
    epsilon: float
    epsilon_independent: float
    delta: float
    accountant: str


class Page(BaseModel):
    has_more: bool
    next_cursor: str | None


class DatasetList(Page):
    data: list[DatasetPublic]


class JobList(Page):
    data: list[JobPublic]


class EventList(Page):
    data: list[EventPublic]


class ArtifactList(Page):
    data: list[ArtifactPublic]


class DryRunPublic(BaseModel):
    plan: dict[str, Any]
    budget: dict[str, Any]
    estimate: dict[str, Any]


class CapUpdate(BaseModel):
    model_config = {"extra": "forbid"}
    epsilon_cap: float


def aware(dt: datetime | None) -> datetime | None:
    """SQLite drops the zone; every stored time is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def dataset_public(ds: Dataset, budget: Budget) -> DatasetPublic:
    return DatasetPublic(id=ds.id, name=ds.name, task=ds.task, num_records=ds.num_records,
                         columns=ds.columns, labels=ds.labels, controls=ds.controls,
                         budget=BudgetPublic(**budget.to_dict()), public=ds.public,
                         deleted=ds.deleted_at is not None,
                         created_at=aware(ds.created_at))


def job_public(job: Job) -> JobPublic:
    return JobPublic(
        id=job.id, status=job.status, method=job.method, dataset_id=job.dataset_id,
        eval_dataset_id=job.eval_dataset_id, spec=job.spec,
        progress=Progress(phase=job.phase, step=job.step, total_steps=job.total_steps),
        privacy=JobPrivacy(plan=job.plan, epsilon_spent=round(job.epsilon_spent, 6),
                           delta=job.plan.get("delta", 0.0)),
        metrics=job.metrics or {}, error=job.error, cancel_requested=job.cancel_requested,
        created_at=aware(job.created_at), started_at=aware(job.started_at),
        finished_at=aware(job.finished_at))


def event_public(ev: JobEvent) -> EventPublic:
    return EventPublic(seq=ev.seq, kind=ev.kind, data=ev.data, created_at=aware(ev.created_at))


def artifact_public(a: Artifact) -> ArtifactPublic:
    return ArtifactPublic(name=a.name, bytes=a.bytes, sha256=a.sha256,
                          created_at=aware(a.created_at))
