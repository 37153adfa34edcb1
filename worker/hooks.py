"""The runner's side of a recipe's ``RecipeHooks``: charge ε before each step reads
private rows, stop on cancel or a lost lease, write progress and events.

Charging is ahead of execution in chunks of ``charge_ahead`` steps (one DB write per
chunk), so a crashed worker has always been charged for every step that may have
touched data. A step charged but never run is released when the process ends
cleanly; after a crash the pre-charged steps stay charged (conservative) and the
resumed attempt runs that many fewer steps, so the job never exceeds its
reservation and never double-charges (DESIGN.md section 5, rules 2-3).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.db.jobs import append_event, renew_lease
from core.db.session import session_scope
from core.db.tables import Job
from core.errors import JobCancelled, LeaseLost
from core.privacy.accounting import DpEvent, compose_epsilon
from core.privacy.ledger import charge_steps
from core.privacy.plan import PrivacyPlan

log = logging.getLogger("dpc.worker")
METRICS_EVERY_SECONDS = 5.0


def epsilon_of(plan: PrivacyPlan, steps_by_phase: dict[str, int]) -> float:
    """ε (plan's accountant and δ) of the steps charged so far in each phase."""
    events = [DpEvent(mechanism=p.mechanism, noise_multiplier=p.noise_multiplier,
                      sample_rate=p.sample_rate, steps=steps_by_phase.get(p.name, 0))
              for p in plan.phases if steps_by_phase.get(p.name, 0) > 0]
    return compose_epsilon(events, delta=plan.delta, accountant=plan.accountant) if events else 0.0


class RunnerHooks:
    def __init__(self, *, job_id: str, worker_id: str, plan: PrivacyPlan,
                 charged_at_start: dict[str, int], work_dir: Path, charge_ahead: int,
                 lease_seconds: int, heartbeat_seconds: float):
        self.job_id, self.worker_id, self.plan = job_id, worker_id, plan
        self.planned = {p.name: p.steps for p in plan.phases}
        self.charged = dict(charged_at_start)  # steps charged in the ledger, per phase
        self.executed = dict(charged_at_start)  # steps that may have read data, per phase
        self.offset: dict[str, int] = {}  # steps lost by a crashed attempt, per phase
        self.work_dir, self.charge_ahead = work_dir, max(1, charge_ahead)
        self.lease_seconds, self.heartbeat_seconds = lease_seconds, heartbeat_seconds
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._stop = threading.Event()
        self._last_metrics = 0.0
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}",
                                           daemon=True)

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._heartbeat.start()

    def stop(self) -> None:
        self._stop.set()
        self._heartbeat.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self._poll()
            except Exception:  # a DB hiccup must not kill the job; the next beat retries
                log.exception("heartbeat for %s failed", self.job_id)

    def _poll(self) -> None:
        with session_scope() as s:
            if not renew_lease(s, job_id=self.job_id, worker_id=self.worker_id,
                               lease_seconds=self.lease_seconds):
                self.lease_lost.set()
                return
            if s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)):
                self.cancel_requested.set()

    def _raise_if_stopped(self) -> None:
        if self.lease_lost.is_set():
            raise LeaseLost(self.job_id)
        if self.cancel_requested.is_set():
            raise JobCancelled(self.job_id)

    # -- RecipeHooks ---------------------------------------------------------------
    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        lost = max(0, self.charged.get(phase, 0) - resumed_step)
        self.offset[phase] = lost
        last = self.planned[phase] - lost
        with session_scope() as s:
            job = s.get(Job, self.job_id)
            job.phase, job.step = phase, resumed_step
            append_event(s, job_id=self.job_id, kind="phase.started",
                         data={"phase": phase, "resumed_step": resumed_step, "last_step": last,
                               "steps_lost_to_crash": lost})
        return last

    def before_step(self, phase: str, step: int) -> None:
        self._raise_if_stopped()
        effective = step + self.offset.get(phase, 0)
        if effective > self.planned[phase]:
            raise RuntimeError(f"{phase}: step {effective} exceeds the planned "
                               f"{self.planned[phase]} steps")
        if effective > self.charged.get(phase, 0):
            target = min(self.planned[phase], effective + self.charge_ahead - 1)
            with session_scope() as s:
                job = s.scalars(select(Job).where(Job.id == self.job_id).with_for_update()).one()
                if job.worker_id != self.worker_id:
                    self.lease_lost.set()
                elif job.cancel_requested:
                    self.cancel_requested.set()
                else:
                    self.charged[phase] = charge_steps(session=s, job_id=self.job_id,
                                                       phase=phase, steps=target)
                    job.phase, job.step = phase, effective - 1
                    job.epsilon_spent = epsilon_of(self.plan, self.charged)
            self._raise_if_stopped()
        self.executed[phase] = effective

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        effective = step + self.offset.get(phase, 0)
        now = time.monotonic()
        last = effective >= self.planned[phase] - self.offset.get(phase, 0)
        if now - self._last_metrics < METRICS_EVERY_SECONDS and not last and step != 1:
            return
        self._last_metrics = now
        eps = epsilon_of(self.plan, self.executed)
        with session_scope() as s:
            job = s.get(Job, self.job_id)
            job.phase, job.step = phase, effective
            data = {"phase": phase, "step": effective, "total_steps": self.planned[phase],
                    "epsilon": round(eps, 6), **{k: float(v) for k, v in metrics.items()}}
            if "loss" in metrics:  # a training statistic of private rows, not DP
                data["non_private"] = ["loss"]
            append_event(s, job_id=self.job_id, kind="train.metrics", data=data)

    def checkpoint_dir(self, phase: str) -> Path:
        path = self.work_dir / "checkpoints" / phase
        path.mkdir(parents=True, exist_ok=True)
        return path

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "checkpoint.saved" and "phase" in data:
            data = {**data, "epsilon": round(epsilon_of(self.plan, self.executed), 6)}
        with session_scope() as s:
            append_event(s, job_id=self.job_id, kind=kind, data=data)
