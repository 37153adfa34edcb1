"""The worker's Celery app: ``celery -A worker.celery_app worker --concurrency 1``.

One worker process per GPU; each job runs in a fresh child process
(``--max-tasks-per-child 1``) so that no CUDA state outlives a job and none is
initialised before fork. A sweeper thread in the parent recovers jobs whose
worker died (lease expired) and re-sends queued jobs at start-up.
"""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown

from core.queue import get_celery
from worker.sweeper import Sweeper

app = get_celery()
app.conf.update(include=["worker.tasks"], worker_max_tasks_per_child=1)
log = logging.getLogger("dpc.worker")
_sweeper: Sweeper | None = None


@worker_ready.connect
def _start_sweeper(**_) -> None:
    global _sweeper
    _sweeper = Sweeper()
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()
