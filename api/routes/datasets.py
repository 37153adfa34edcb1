"""/v1/datasets: upload (validated row by row), list, show, ledger, cap, delete."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from sqlalchemy import select

from api.deps import ReadSession, TenantId, WriteSession
from api.schemas import (
    CapUpdate,
    DatasetList,
    DatasetPublic,
    ErrorResponse,
    LedgerPublic,
    dataset_public,
)
from core import states
from core.db.datasets import get_dataset, insert_dataset, list_datasets, mark_deleted
from core.db.tables import Job, new_id
from core.errors import Conflict, InvalidRequest, PayloadTooLarge
from core.privacy.ledger import (
    BUDGET_ACCOUNTANT,
    dataset_budget,
    dataset_ledger,
    event_to_dict,
    summarize,
)
from core.settings import get_settings
from core.storage import dataset_store
from core.uploads import detect_format, parse_dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"],
                   responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
                              422: {"model": ErrorResponse}})


def _split_fields(value: str | None) -> list[str]:
    return [f.strip() for f in (value or "").split(",") if f.strip()]


async def _read_limited(request: Request, file: UploadFile) -> bytes:
    limit = int(get_settings().max_upload_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    too_big = PayloadTooLarge(f"upload exceeds DPC_MAX_UPLOAD_MB = "
                              f"{get_settings().max_upload_mb:g} MB", param="file")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise too_big
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise too_big
    return data


@router.post("", status_code=201, response_model=DatasetPublic,
             responses={409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}})
async def upload_dataset(
    request: Request,
    tenant_id: TenantId,
    session: WriteSession,
    file: Annotated[UploadFile, File(description="CSV, TSV or JSONL, UTF-8")],
    name: Annotated[str, Form(min_length=1, max_length=200)],
    task: Annotated[Literal["classification", "causal_lm"], Form()],
    text_fields: Annotated[str, Form(description="comma-separated text column names")],
    epsilon_cap: Annotated[float, Form(gt=0, le=1000, description="total ε for all jobs")],
    label_field: Annotated[str | None, Form()] = None,
    control_field: Annotated[str | None, Form()] = None,
    delta: Annotated[float | None, Form(gt=0, lt=1)] = None,
    format: Annotated[Literal["csv", "tsv", "jsonl"] | None, Form()] = None,
    public: Annotated[bool, Form(description=(
        "the uploader declares these rows PUBLIC text: only such a dataset may serve as a "
        "job's calibration_dataset_id, which is read without DP"))] = False,
) -> DatasetPublic:
    """Upload private rows with a total ε cap (or, with ``public=true``, public text).
    Every row is validated first; an invalid file stores nothing. Row count and label set
    are returned (schema)."""
    fields = _split_fields(text_fields)
    if not fields:
        raise InvalidRequest("name at least one text column", param="text_fields")
    if task == "classification" and not label_field:
        raise InvalidRequest("a classification dataset needs label_field", param="label_field")
    fmt = detect_format(file.filename, format)
    data = await _read_limited(request, file)
    parsed = parse_dataset(data, fmt=fmt, task=task, text_fields=fields,
                           label_field=label_field, control_field=control_field)
    n = len(parsed.rows)
    if delta is not None and delta >= 1.0 / n:
        raise InvalidRequest(f"delta must be < 1/N = {1.0 / n:.3g} for N = {n} rows",
                             param="delta")
    dataset_id = new_id("ds")
    store = dataset_store()
    key = store.save(tenant_id=tenant_id, dataset_id=dataset_id, rows=parsed.rows)
    try:
        ds = insert_dataset(
            session, dataset_id=dataset_id, tenant_id=tenant_id, name=name, task=task,
            num_records=n, labels=parsed.labels, controls=parsed.controls,
            columns={"text_fields": fields, "label_field": label_field,
                     "control_field": control_field, "format": fmt},
            epsilon_cap=epsilon_cap, delta=delta if delta is not None else 1.0 / (10 * n),
            public=public)
        ds.storage_key = key
        session.commit()
    except BaseException:
        store.delete(key)
        raise
    return dataset_public(ds, dataset_budget(session, dataset=ds))


@router.get("", response_model=DatasetList)
def list_all(tenant_id: TenantId, session: ReadSession,
             limit: Annotated[int, Query(ge=1, le=100)] = 20,
             after: str | None = None) -> DatasetList:
    rows, has_more = list_datasets(session, tenant_id=tenant_id, limit=limit, after=after)
    return DatasetList(data=[dataset_public(d, dataset_budget(session, dataset=d)) for d in rows],
                       has_more=has_more, next_cursor=rows[-1].id if has_more else None)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def show(dataset_id: str, tenant_id: TenantId, session: ReadSession) -> DatasetPublic:
    ds = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    return dataset_public(ds, dataset_budget(session, dataset=ds))


@router.patch("/{dataset_id}", response_model=DatasetPublic,
              responses={409: {"model": ErrorResponse}})
def update_cap(dataset_id: str, body: CapUpdate, tenant_id: TenantId,
               session: WriteSession) -> DatasetPublic:
    """Change the ε cap: it can be raised, never lowered below what is spent or reserved."""
    ds = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id, lock=True)
    budget = dataset_budget(session, dataset=ds)
    committed = budget.epsilon_spent + budget.epsilon_reserved
    if body.epsilon_cap <= 0 or body.epsilon_cap < committed:
        raise InvalidRequest(f"epsilon_cap must be > 0 and ≥ the ε already spent or reserved "
                             f"({committed:.4g})", param="epsilon_cap")
    ds.epsilon_cap = body.epsilon_cap
    session.commit()
    return dataset_public(ds, dataset_budget(session, dataset=ds))


@router.get("/{dataset_id}/ledger", response_model=LedgerPublic)
def ledger(dataset_id: str, tenant_id: TenantId, session: ReadSession) -> LedgerPublic:
    """Every DP event on this dataset across jobs, and the composed ε of what was charged."""
    ds = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id)
    rows = dataset_ledger(session, dataset_id=ds.id)
    return LedgerPublic(data=[event_to_dict(r) for r in rows],
                        **summarize(rows, delta=ds.delta, accountant=BUDGET_ACCOUNTANT))


@router.delete("/{dataset_id}", status_code=204, responses={409: {"model": ErrorResponse}})
def delete(dataset_id: str, tenant_id: TenantId, session: WriteSession) -> None:
    """Remove the private rows. The dataset record and its ledger stay."""
    ds = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id, lock=True)
    active = session.scalar(select(Job.id).where(
        Job.dataset_id == ds.id, Job.status.in_((states.QUEUED, *states.ACTIVE))).limit(1))
    if active:
        raise Conflict(f"job {active} still uses this dataset; cancel it first",
                       param="dataset_id")
    if ds.storage_key:
        dataset_store().delete(ds.storage_key)
    mark_deleted(ds)
    session.commit()
