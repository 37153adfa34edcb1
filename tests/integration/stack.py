"""A live service for integration tests: the API (uvicorn) and Celery workers as
real processes, started exactly as ``dpcompress serve`` / the compose file start them."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveStack:
    def __init__(self, *, data_dir: Path, database_url: str | None, broker_url: str | None,
                 api_key: str = "live-test-key", **env: str):
        self.data_dir, self.api_key = data_dir, api_key
        self.port = free_port()
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", DPC_DATA_DIR=str(data_dir),
                        DPC_PORT=str(self.port), DPC_BOOTSTRAP_API_KEY=api_key,
                        DPC_JOB_LEASE_SECONDS="6", DPC_HEARTBEAT_SECONDS="1",
                        DPC_CHARGE_AHEAD_STEPS="2", DPC_CHECKPOINT_EVERY_STEPS="2", **env)
        if database_url:
            self.env["DPC_DATABASE_URL"] = database_url
        if broker_url:
            self.env["DPC_BROKER_URL"] = broker_url
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs = data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = (self.logs / log_name).open("ab")
        return subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=log,
                                start_new_session=True)

    def migrate(self) -> None:
        subprocess.run([sys.executable, "-m", "api.cli", "migrate"], cwd=ROOT, env=self.env,
                       check=True, capture_output=True, timeout=120)

    def start_api(self) -> None:
        self.api = self._spawn([sys.executable, "-m", "uvicorn", "api.main:app", "--host",
                                "127.0.0.1", "--port", str(self.port), "--no-access-log"],
                               "api.log")
        self.wait_ready()

    def start_worker(self) -> subprocess.Popen:
        from api.serve import worker_command

        proc = self._spawn(worker_command(), f"worker{len(self.workers)}.log")
        self.workers.append(proc)
        return proc

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("API did not start:\n" + self.tail("api.log"))

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker's whole process group (parent and job child)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def tail(self, name: str, n: int = 4000) -> str:
        path = self.logs / name
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> LiveStack:
        self.migrate()
        self.start_api()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 300,
             predicate=None) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job.get("status") in statuses and (predicate is None or predicate(job)):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")
