"""The service on PostgreSQL + Redis with real Celery worker processes."""

from __future__ import annotations

import time

import pytest

from core.queue import QUEUE, RUN_JOB_TASK, make_celery
from core.settings import Settings
from tests.integration.flow import (
    assert_loads_and_predicts,
    charged_steps,
    download_model,
    submit,
    tiny_spec,
    upload_reviews,
)
from tests.integration.stack import LiveStack, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path, postgres_url, redis_url):
    with LiveStack(data_dir=tmp_path, database_url=postgres_url, broker_url=redis_url) as s:
        yield s


def _resend(stack: LiveStack, job_id: str) -> None:
    app = make_celery(Settings(broker_url=stack.env["DPC_BROKER_URL"]))
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE)


def _kinds(client, job_id: str) -> list[str]:
    return [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events",
                                          params={"limit": 1000}).json()["data"]]


def test_dp_finetune_end_to_end_and_duplicate_delivery(stack, tmp_path):
    with stack.client() as c:
        ds = upload_reviews(c)
        job = submit(c, tiny_spec(ds["id"]), **{"Idempotency-Key": "e2e-1"})
        assert job["status"] == "queued"
        _resend(stack, job["id"])  # the same message delivered twice more
        _resend(stack, job["id"])
        stack.start_worker()
        done = wait_for(c, job["id"], {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", (done, stack.tail("worker0.log"))
        kinds = _kinds(c, job["id"])
        assert kinds.count("job.running") == 1, kinds
        assert kinds[0] == "job.queued" and kinds[-1] == "job.succeeded"
        for k in ("budget.reserved", "phase.started", "train.metrics", "budget.charged"):
            assert k in kinds, kinds
        plan = done["privacy"]["plan"]
        ledger = c.get(f"/v1/jobs/{job['id']}/ledger").json()
        assert charged_steps(ledger) == {"train": plan["phases"][0]["steps"]}
        assert ledger["epsilon"] == pytest.approx(plan["epsilon"], rel=1e-3)
        assert ledger["epsilon_independent"] == pytest.approx(ledger["epsilon"], rel=0.01)
        assert done["privacy"]["epsilon_spent"] == pytest.approx(plan["epsilon"], rel=1e-3)
        budget = c.get(f"/v1/datasets/{ds['id']}").json()["budget"]
        assert budget["epsilon_reserved"] == 0
        assert budget["epsilon_spent"] == pytest.approx(plan["epsilon"], rel=0.01)
        assert_loads_and_predicts(download_model(c, job["id"], tmp_path / "dl"))
        _resend(stack, job["id"])  # redelivery after success does nothing
        time.sleep(3)
        assert _kinds(c, job["id"]) == kinds


def test_cancel_running_job_reports_partial_epsilon(stack):
    stack.start_worker()
    with stack.client() as c:
        ds = upload_reviews(c)
        job = submit(c, tiny_spec(ds["id"], epochs=60, batch_size=8, epsilon=8.0))
        wait_for(c, job["id"], {"running"}, timeout=120,
                 predicate=lambda j: j["progress"]["step"] >= 3)
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["status"] in ("cancelling", "cancelled")
        done = wait_for(c, job["id"], {"cancelled", "succeeded", "failed"}, timeout=120)
        assert done["status"] == "cancelled", done
        planned = done["privacy"]["plan"]["phases"][0]["steps"]
        ledger = c.get(f"/v1/jobs/{job['id']}/ledger").json()
        ran = charged_steps(ledger)["train"]
        assert 3 <= ran < planned
        assert 0 < done["privacy"]["epsilon_spent"] < done["privacy"]["plan"]["epsilon"]
        assert ledger["epsilon"] == pytest.approx(done["privacy"]["epsilon_spent"], rel=1e-3)
        released = [e for e in ledger["data"] if e["status"] == "released"]
        assert released and released[0]["steps"] == planned - ran
        assert c.get(f"/v1/datasets/{ds['id']}").json()["budget"]["epsilon_reserved"] == 0


def test_sigkilled_worker_is_recovered_and_charged_once(stack):
    first = stack.start_worker()
    with stack.client() as c:
        ds = upload_reviews(c)
        job = submit(c, tiny_spec(ds["id"], epochs=12, batch_size=8, epsilon=8.0))
        planned = job["privacy"]["plan"]["phases"][0]["steps"]
        wait_for(c, job["id"], {"running"}, timeout=120,
                 predicate=lambda j: j["progress"]["step"] >= 6)
        stack.kill_worker(first)
        charged_at_kill = charged_steps(c.get(f"/v1/jobs/{job['id']}/ledger").json())["train"]
        assert 0 < charged_at_kill < planned
        stack.start_worker()
        done = wait_for(c, job["id"], {"succeeded", "failed"}, timeout=300)
        assert done["status"] == "succeeded", (done, stack.tail("worker1.log"))
        ledger = c.get(f"/v1/jobs/{job['id']}/ledger").json()
        rows = [e for e in ledger["data"] if e["status"] == "charged"]
        assert len(rows) == 1 and rows[0]["steps"] == planned  # exactly once, never more
        assert ledger["epsilon"] == pytest.approx(done["privacy"]["plan"]["epsilon"], rel=1e-3)
        kinds = _kinds(c, job["id"])
        # a second worker took over; "job.recovering" appears only when the sweeper re-sent
        # the job, not when the broker's redelivery of the unacked message claimed it first
        assert kinds.count("job.running") == 2
        assert c.get(f"/v1/datasets/{ds['id']}").json()["budget"]["epsilon_reserved"] == 0
