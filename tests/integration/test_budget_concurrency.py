"""20 concurrent submissions against one dataset cap on PostgreSQL: the composed
ε of everything reserved never exceeds the cap; the rest get 409 budget_exceeded
with the remaining ε."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from core.privacy.accounting import DpEvent, compose_epsilon
from tests.integration.flow import tiny_spec, upload_reviews
from tests.integration.stack import LiveStack

pytestmark = pytest.mark.integration


def test_concurrent_submissions_never_exceed_the_cap(tmp_path, postgres_url, redis_url):
    with (LiveStack(data_dir=tmp_path, database_url=postgres_url,
                broker_url=redis_url) as stack, stack.client(timeout=120) as c):
        ds = upload_reviews(c, cap=10.0)
        spec = tiny_spec(ds["id"], epsilon=3.0)

        def post(_):
            with stack.client(timeout=120) as ci:
                return ci.post("/v1/jobs", json=spec)

        with ThreadPoolExecutor(max_workers=20) as pool:
            responses = list(pool.map(post, range(20)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {201, 409}, [r.text for r in responses]
        accepted = [r.json() for r in responses if r.status_code == 201]
        rejected = [r.json()["error"] for r in responses if r.status_code == 409]
        assert accepted and rejected
        assert all(e["code"] == "budget_exceeded" and e["epsilon_remaining"] >= 0
                   for e in rejected)
        ledger = c.get(f"/v1/datasets/{ds['id']}/ledger").json()
        held = [e for e in ledger["data"] if e["status"] in ("reserved", "charged")]
        events = [DpEvent(mechanism=e["mechanism"], noise_multiplier=e["noise_multiplier"],
                          sample_rate=e["sample_rate"], steps=e["steps"])
                  for e in held if e["steps"] > 0]
        composed = compose_epsilon(events, delta=ds["budget"]["delta"], accountant="prv")
        assert composed <= 10.0 * (1 + 1e-9)
        assert len({e["job_id"] for e in held}) == len(accepted)
        # the cap was really used: one more job of the same size does not fit
        dry = c.post("/v1/jobs", params={"dry_run": "true"}, json=spec).json()
        assert dry["budget"]["allowed"] is False
