"""The privacy ledger in the database: reserve, charge, release, per-dataset caps.

Rules (DESIGN.md section 5): a job's planned ε is reserved in the transaction that
creates it, under a lock on the dataset row, and the cap is checked by composing
every charged and reserved event on the dataset with the accountant. The worker
then moves steps from each phase's ``reserved`` row to its ``charged`` row as they
run (an absolute count, so a redelivered or repeated charge is idempotent), and
releases what never ran when the job ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.tables import Dataset, LedgerEvent, new_id
from core.errors import BudgetExceeded
from core.privacy.accounting import DpEvent, compose_epsilon, independent_epsilon
from core.privacy.plan import PrivacyPlan

RESERVED, CHARGED, RELEASED = "reserved", "charged", "released"
# Composes all jobs on a dataset: dp_accounting's pessimistic PLD is an upper bound
# and stays fast for many heterogeneous events (PRV needs seconds for ten).
BUDGET_ACCOUNTANT = "pld"
CAP_SLACK = 1e-9


@dataclass(frozen=True)
class Budget:
    epsilon_cap: float
    delta: float
    epsilon_spent: float  # composed over charged events
    epsilon_reserved: float  # composed(charged + reserved) − spent
    epsilon_remaining: float  # cap − composed(charged + reserved), ≥ 0

    def to_dict(self) -> dict:
        return {k: v if k == "delta" else round(v, 6) for k, v in self.__dict__.items()}


def to_dp_event(row: LedgerEvent) -> DpEvent:
    return DpEvent(mechanism=row.mechanism, noise_multiplier=row.noise_multiplier,
                   sample_rate=row.sample_rate, steps=row.steps)


def _rows(session: Session, *, dataset_id: str | None = None, job_id: str | None = None,
          statuses: tuple[str, ...] = (RESERVED, CHARGED)) -> list[LedgerEvent]:
    stmt = select(LedgerEvent).where(LedgerEvent.status.in_(statuses))
    if dataset_id is not None:
        stmt = stmt.where(LedgerEvent.dataset_id == dataset_id)
    if job_id is not None:
        stmt = stmt.where(LedgerEvent.job_id == job_id)
    return list(session.scalars(stmt.order_by(LedgerEvent.created_at, LedgerEvent.id)))


def epsilon_of_events(events: list[DpEvent], *, delta: float, accountant: str) -> float:
    """Composed ε at δ with ``accountant`` (``prv``, ``rdp`` or ``pld``)."""
    if not events:
        return 0.0
    if accountant == "pld":
        return independent_epsilon(events, delta=delta)
    return compose_epsilon(events, delta=delta, accountant=accountant)


def _compose(rows: list[LedgerEvent], *, delta: float) -> float:
    events = [to_dp_event(r) for r in rows if r.steps > 0]
    return epsilon_of_events(events, delta=delta, accountant=BUDGET_ACCOUNTANT)


def dataset_budget(session: Session, *, dataset: Dataset) -> Budget:
    rows = _rows(session, dataset_id=dataset.id)
    spent = _compose([r for r in rows if r.status == CHARGED], delta=dataset.delta)
    committed = _compose(rows, delta=dataset.delta)
    return Budget(epsilon_cap=dataset.epsilon_cap, delta=dataset.delta, epsilon_spent=spent,
                  epsilon_reserved=max(0.0, committed - spent),
                  epsilon_remaining=max(0.0, dataset.epsilon_cap - committed))


def _planned_rows(*, dataset_id: str, job_id: str, plan: PrivacyPlan) -> list[LedgerEvent]:
    return [
        LedgerEvent(id=new_id("le"), job_id=job_id, dataset_id=dataset_id, phase=p.name,
                    mechanism=p.mechanism, sample_rate=p.sample_rate,
                    noise_multiplier=p.noise_multiplier, steps=steps,
                    max_grad_norm=p.max_grad_norm, sensitivity=p.sensitivity,
                    delta=plan.delta, status=status)
        for p in plan.phases
        for status, steps in ((CHARGED, 0), (RESERVED, p.steps))
    ]


def preview_budget(session: Session, *, dataset: Dataset, plan: PrivacyPlan) -> dict:
    """The dry run's budget block: would this plan fit, and what would remain."""
    existing = _rows(session, dataset_id=dataset.id)
    before = _compose(existing, delta=dataset.delta)
    new_rows = _planned_rows(dataset_id=dataset.id, job_id="dry-run", plan=plan)
    after = _compose(existing + new_rows, delta=dataset.delta)
    spent = _compose([r for r in existing if r.status == CHARGED], delta=dataset.delta)
    return {"epsilon_cap": dataset.epsilon_cap, "delta": dataset.delta,
            "epsilon_spent": round(spent, 6),
            "epsilon_reserved": round(max(0.0, before - spent), 6),
            "epsilon_remaining_after": round(dataset.epsilon_cap - after, 6),
            "allowed": after <= dataset.epsilon_cap * (1 + CAP_SLACK)}


def reserve_budget(*, session: Session, dataset_id: str, job_id: str,
                   plan: PrivacyPlan) -> Budget:
    """Lock the dataset, check the cap with the job's phases added, insert the
    reservation rows. Raises BudgetExceeded (with ε remaining) when it does not fit.
    Must run in the transaction that inserts the job row."""
    dataset = session.scalars(
        select(Dataset).where(Dataset.id == dataset_id).with_for_update()
    ).one()
    existing = _rows(session, dataset_id=dataset_id)
    new_rows = _planned_rows(dataset_id=dataset_id, job_id=job_id, plan=plan)
    before = _compose(existing, delta=dataset.delta)
    after = _compose(existing + new_rows, delta=dataset.delta)
    if after > dataset.epsilon_cap * (1 + CAP_SLACK):
        remaining = max(0.0, dataset.epsilon_cap - before)
        raise BudgetExceeded(
            f"the job needs ε = {after - before:.4g} more on dataset {dataset_id} (composed "
            f"ε would be {after:.4g}) but only {remaining:.4g} of the cap "
            f"{dataset.epsilon_cap:g} remains; lower privacy.epsilon or raise the cap",
            param="privacy.epsilon",
            details={"epsilon_remaining": round(remaining, 6),
                     "epsilon_required": round(after - before, 6)})
    session.add_all(new_rows)
    session.flush()
    spent = _compose([r for r in existing if r.status == CHARGED], delta=dataset.delta)
    return Budget(epsilon_cap=dataset.epsilon_cap, delta=dataset.delta, epsilon_spent=spent,
                  epsilon_reserved=max(0.0, after - spent),
                  epsilon_remaining=max(0.0, dataset.epsilon_cap - after))


def charged_steps(session: Session, *, job_id: str) -> dict[str, int]:
    """Steps charged so far per phase of a job."""
    return {r.phase: r.steps for r in _rows(session, job_id=job_id, statuses=(CHARGED,))}


def charge_steps(*, session: Session, job_id: str, phase: str, steps: int) -> int:
    """Set the phase's charged step count to ``steps`` (absolute, idempotent), moving
    them out of the reservation. Never charges beyond the planned steps. Returns the
    charged count."""
    rows = {r.status: r for r in session.scalars(
        select(LedgerEvent).where(LedgerEvent.job_id == job_id, LedgerEvent.phase == phase)
        .with_for_update())}
    charged, reserved = rows[CHARGED], rows.get(RESERVED)
    planned = charged.steps + (reserved.steps if reserved is not None else 0)
    steps = max(0, min(steps, planned))
    charged.steps = steps
    if reserved is not None:
        reserved.steps = planned - steps
    session.flush()
    return steps


def release_unused(*, session: Session, job_id: str) -> None:
    """The job has ended: what is still reserved never ran and is released."""
    for row in _rows(session, job_id=job_id, statuses=(RESERVED,)):
        row.status = RELEASED


def job_ledger(session: Session, *, job_id: str) -> list[LedgerEvent]:
    return list(session.scalars(select(LedgerEvent).where(LedgerEvent.job_id == job_id)
                                .order_by(LedgerEvent.phase, LedgerEvent.status)))


def dataset_ledger(session: Session, *, dataset_id: str) -> list[LedgerEvent]:
    return list(session.scalars(select(LedgerEvent).where(LedgerEvent.dataset_id == dataset_id)
                                .order_by(LedgerEvent.created_at, LedgerEvent.id)))


def summarize(rows: list[LedgerEvent], *, delta: float, accountant: str) -> dict:
    """Composed ε of the charged events, next to an independent recomputation."""
    charged = [to_dp_event(r) for r in rows if r.status == CHARGED and r.steps > 0]
    eps = epsilon_of_events(charged, delta=delta, accountant=accountant)
    indep = independent_epsilon(charged, delta=delta) if charged else 0.0
    return {"epsilon": round(eps, 6), "epsilon_independent": round(indep, 6), "delta": delta,
            "accountant": accountant}


def event_to_dict(row: LedgerEvent) -> dict:
    return {"id": row.id, "job_id": row.job_id, "dataset_id": row.dataset_id,
            "phase": row.phase, "mechanism": row.mechanism, "sample_rate": row.sample_rate,
            "noise_multiplier": row.noise_multiplier, "steps": row.steps,
            "max_grad_norm": row.max_grad_norm, "sensitivity": row.sensitivity,
            "delta": row.delta, "status": row.status,
            "created_at": row.created_at.isoformat() if row.created_at else None}
