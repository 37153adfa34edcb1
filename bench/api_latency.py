"""GET /v1/jobs/{id} latency under 100 concurrent clients while a job trains.

Starts the service as it runs in production (uvicorn + one Celery worker) on the
embedded default (SQLite + bundled redis-server) or on PostgreSQL + Redis, submits a
long tiny:bert dp_finetune job, waits until it trains, then runs a bounded load from
this machine's loopback only and writes JSON to bench/results/api_latency.json.

    .venv/bin/python -m bench.api_latency --seconds 20 --clients 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from tests.integration.flow import submit, tiny_spec, upload_reviews
from tests.integration.stack import LiveStack, wait_for

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


async def _load(url: str, key: str, path: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 limits=limits, timeout=30) as c:
        async def one_client() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                r = await c.get(path)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.monotonic() - start
    q = statistics.quantiles(latencies, n=100)
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


def run_mode(mode: str, clients: int, seconds: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"dpc-bench-{mode}-"))
    db_name = None
    if mode == "postgres":
        db_name = f"dpc_bench_{secrets.token_hex(4)}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        stack = LiveStack(data_dir=tmp, database_url=PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}",
                          broker_url="redis://127.0.0.1:6379/13")
    else:
        stack = LiveStack(data_dir=tmp, database_url=None, broker_url=None)
        from api.serve import start_embedded_redis
        from core.settings import Settings

        redis = start_embedded_redis(Settings(data_dir=tmp))
        stack.env["DPC_BROKER_URL"] = f"redis+socket://{tmp.absolute()}/redis.sock"
    try:
        with stack:
            stack.env["DPC_CHARGE_AHEAD_STEPS"] = "10"
            stack.env["DPC_CHECKPOINT_EVERY_STEPS"] = "50"
            stack.start_worker()
            with stack.client() as c:
                ds = upload_reviews(c, n=512)
                job = submit(c, tiny_spec(ds["id"], epochs=100, batch_size=16, epsilon=8))
                wait_for(c, job["id"], {"running"}, timeout=120,
                         predicate=lambda j: j["progress"]["step"] >= 2)
                result = asyncio.run(_load(stack.url, stack.api_key, f"/v1/jobs/{job['id']}",
                                           clients, seconds))
                result["job_step_after"] = c.get(f"/v1/jobs/{job['id']}").json()["progress"]
                c.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        if mode == "embedded":
            redis.terminate()
        if db_name:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    return {"mode": mode, "clients": clients, **result}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--modes", default="embedded,postgres")
    args = ap.parse_args()
    results = [run_mode(m, args.clients, args.seconds) for m in args.modes.split(",")]
    out = Path(__file__).parent / "results" / "api_latency.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
