"""Queries on datasets."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.pagination import page_after
from core.db.tables import Dataset, new_id, utcnow
from core.errors import InvalidRequest, NotFound


def insert_dataset(session: Session, *, tenant_id: str, name: str, task: str, num_records: int,
                   columns: dict, labels: list[str], controls: list[str], epsilon_cap: float,
                   delta: float, dataset_id: str | None = None, public: bool = False) -> Dataset:
    ds = Dataset(id=dataset_id or new_id("ds"), tenant_id=tenant_id, name=name, task=task,
                 num_records=num_records, columns=columns, labels=labels, controls=controls,
                 epsilon_cap=epsilon_cap, delta=delta, storage_key=None, public=public)
    session.add(ds)
    session.flush()
    return ds


def get_dataset(session: Session, *, tenant_id: str, dataset_id: str,
                param: str = "dataset_id", lock: bool = False) -> Dataset:
    """The tenant's dataset; another tenant's id answers NotFound like an unknown one."""
    stmt = select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)
    if lock:
        stmt = stmt.with_for_update()
    ds = session.scalars(stmt).first()
    if ds is None:
        raise NotFound(f"no dataset {dataset_id}", param=param)
    return ds


def readable_dataset(session: Session, *, tenant_id: str, dataset_id: str, param: str,
                     read_without_dp: bool = False) -> Dataset:
    """The tenant's dataset that a job may read: not deleted and, if the recipe reads it
    without DP (calibration text), uploaded as public. Checked at submission (API) and
    again by the worker before it loads any row."""
    ds = get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id, param=param)
    if ds.storage_key is None:
        raise InvalidRequest(f"dataset {ds.id} was deleted", param=param)
    if read_without_dp and not ds.public:
        raise InvalidRequest(f"dataset {ds.id} was not uploaded as public text (public=true); "
                             "a calibration dataset is read without DP", param=param)
    return ds


def list_datasets(session: Session, *, tenant_id: str, limit: int,
                  after: str | None) -> tuple[list[Dataset], bool]:
    stmt = select(Dataset).where(Dataset.tenant_id == tenant_id)
    return page_after(session, stmt, Dataset, limit=limit, after=after)


def mark_deleted(ds: Dataset) -> None:
    ds.storage_key = None
    ds.deleted_at = utcnow()
