"""Recovery: finds jobs whose worker stopped renewing its lease and re-sends
them (the claim lets exactly one worker take over); at start-up, re-sends queued
jobs whose message may have been lost. A cancelling job whose worker died is
finished as cancelled with its charged steps kept (conservative)."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import select

from core import states
from core.db.jobs import append_event, expired_jobs, set_status
from core.db.session import session_scope
from core.db.tables import Job, utcnow
from core.privacy import ledger
from core.queue import send_run_job
from core.settings import get_settings

log = logging.getLogger("dpc.worker")


def recover_expired() -> list[str]:
    """One sweep; returns the ids of the jobs re-sent."""
    resent = []
    with session_scope() as s:
        for job_id in expired_jobs(s):
            job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
            if job.lease_until is None or job.lease_until.replace(tzinfo=None) > \
                    utcnow().replace(tzinfo=None):
                continue
            if job.cancel_requested:
                ledger.release_unused(session=s, job_id=job.id)
                set_status(job, states.CANCELLED)
                append_event(s, job_id=job.id, kind="job.cancelled",
                             data={"status": job.status, "reason": "worker lost while cancelling",
                                   "epsilon_spent": round(job.epsilon_spent, 6)})
            else:
                append_event(s, job_id=job.id, kind="job.recovering",
                             data={"reason": "worker lease expired", "worker": job.worker_id})
                resent.append(job.id)
    for job_id in resent:
        send_run_job(job_id)
    return resent


def resend_queued() -> list[str]:
    with session_scope(write=False) as s:
        ids = list(s.scalars(select(Job.id).where(Job.status == states.QUEUED)))
    for job_id in ids:
        send_run_job(job_id)
    return ids


class Sweeper:
    def __init__(self, interval_seconds: float | None = None):
        settings = get_settings()
        self.interval = interval_seconds or max(1.0, settings.job_lease_seconds / 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dpc-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        try:
            resend_queued()
        except Exception:
            log.exception("re-sending queued jobs failed")
        while not self._stop.wait(self.interval):
            try:
                recovered = recover_expired()
                if recovered:
                    log.warning("re-sent jobs with expired leases: %s", recovered)
            except Exception:
                log.exception("recovery sweep failed")
