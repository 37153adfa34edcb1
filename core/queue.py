"""The Celery app (torch-free): the API sends tasks by name, the worker runs them.

A message carries only a job id; the database is the source of truth. Settings
for hour-long GPU jobs (DESIGN.md section 3): late acks, reject on worker loss,
prefetch 1, a Redis visibility timeout above the longest job.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from core.settings import Settings, get_settings

RUN_JOB_TASK = "dpc.run_job"
QUEUE = "dpc.jobs"


def make_celery(settings: Settings) -> Celery:
    app = Celery("dpcompress", broker=settings.resolved_broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    return make_celery(get_settings())


def send_run_job(job_id: str) -> None:
    """Enqueue a job by task name (the API never imports the worker)."""
    get_celery().send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE)
