"""The worker's Celery app: ``celery -A worker.celery_app worker --concurrency 1``.

One worker process per GPU; each job runs in a fresh child process
(``--max-tasks-per-child 1``) so that no CUDA state outlives a job and none is
initialised before fork. A sweeper thread in the parent recovers jobs whose
worker died (lease expired) and re-sends queued jobs at start-up.
"""

from __future__ import annotations

import logging

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from core.db.session import use_connection_pool
from core.queue import get_celery
from worker.sweeper import Sweeper

app = get_celery()
app.conf.update(include=["worker.tasks"], worker_max_tasks_per_child=1)
log = logging.getLogger("dpc.worker")
_sweeper: Sweeper | None = None


@worker_process_init.connect
def _fresh_db_pool(**_) -> None:
    """Each job child gets its own connection pool."""
    use_connection_pool(True)


@worker_ready.connect
def _start_sweeper(**_) -> None:
    global _sweeper
    use_connection_pool(False)  # the parent forks children: it keeps no open connection
    _sweeper = Sweeper()
    _sweeper.start()


@worker_shutdown.connect
def _stop_sweeper(**_) -> None:
    if _sweeper is not None:
        _sweeper.stop()
