"""GET /v1/jobs/{id} latency under 100 concurrent clients while a job trains.

Two load shapes. ``--interval 0`` (closed loop): each client sends its next request as soon
as the last answer arrives, so the server is saturated and, by Little's law, mean latency =
clients / throughput. ``--interval S``: each client polls every S seconds (a status poller;
start times staggered over the first interval; a late answer delays only that client's next
poll), so 100 clients offer 100/S requests per second and latency measures the service, not
a queue the load generator builds. ``--intervals 0,1`` runs both shapes, one after the
other, against the same running job.

Starts the service as it runs in production (uvicorn + one Celery worker) on the
embedded default (SQLite + bundled redis-server) or on PostgreSQL + Redis, submits a
long tiny:bert dp_finetune job, waits until it trains, then runs a bounded load from
this machine's loopback only and writes JSON to bench/results/api_latency.json.

    .venv/bin/python -m bench.api_latency --seconds 20 --clients 100 --intervals 0,1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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


async def _load(url: str, key: str, path: str, clients: int, seconds: float,
                interval: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                                 limits=limits, timeout=30) as c:
        async def one_client() -> None:
            nonlocal errors
            next_at = time.monotonic() + random.uniform(0, interval)
            while time.monotonic() < deadline:
                if interval:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at += interval
                t0 = time.perf_counter()
                r = await c.get(path)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.monotonic() - start
    q = statistics.quantiles(latencies, n=100)
    return {"interval_s": interval, "requests": len(latencies), "errors": errors,
            "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2)}


def run_mode(mode: str, clients: int, seconds: float, intervals: list[float]) -> list[dict]:
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
                ds = upload_reviews(c, n=2048)  # 12,800 steps: trains through every window
                job = submit(c, tiny_spec(ds["id"], epochs=100, batch_size=16, epsilon=8))
                wait_for(c, job["id"], {"running"}, timeout=120,
                         predicate=lambda j: j["progress"]["step"] >= 2)
                results = []
                for interval in intervals:
                    step_before = c.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"]
                    result = asyncio.run(_load(stack.url, stack.api_key,
                                               f"/v1/jobs/{job['id']}", clients, seconds,
                                               interval))  # fmt: skip
                    progress = c.get(f"/v1/jobs/{job['id']}").json()["progress"]
                    result["job_steps_during_load"] = progress["step"] - step_before
                    results.append({"mode": mode, "clients": clients, **result})
                c.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        if mode == "embedded":
            redis.terminate()
        if db_name:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--modes", default="embedded,postgres")
    ap.add_argument("--intervals", default="0,1",
                    help="seconds between one client's polls, comma-separated; 0 = closed loop")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "api_latency.json")
    args = ap.parse_args()
    intervals = [float(i) for i in args.intervals.split(",") if i]
    results = [r for m in args.modes.split(",")
               for r in run_mode(m, args.clients, args.seconds, intervals)]  # fmt: skip
    out = args.out
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
