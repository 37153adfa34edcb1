"""Celery tasks. Thin: the runner owns the job lifecycle."""

from __future__ import annotations

import os
import socket

from core.queue import RUN_JOB_TASK, get_celery
from worker.runner import run_job as run_job_lifecycle

app = get_celery()


@app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    return run_job_lifecycle(job_id, worker_id=f"{socket.gethostname()}:{os.getpid()}")
