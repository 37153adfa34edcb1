"""The worker re-checks what a job reads before any recipe runs (defence in depth: the API
checked it at submission, but the database may hold rows written otherwise)."""

from __future__ import annotations

from sqlalchemy import update

from tests.conftest import upload


def _submit_with_calibration(client) -> tuple[str, str, str]:
    """A queued dpimp_unstructured job on a private dataset whose calibration text was
    uploaded as public; returns (job id, training dataset id, calibration dataset id)."""
    ds = upload(client).json()
    calibration = upload(client, name="public text", public="true").json()
    spec = {"method": "dpimp_unstructured", "dataset_id": ds["id"], "model": {"base": "tiny:bert"},
            "privacy": {"epsilon": 4.0}, "calibration_dataset_id": calibration["id"],
            "training": {"epochs": 1, "batch_size": 16, "max_seq_length": 16}}  # fmt: skip
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"], ds["id"], calibration["id"]


def test_worker_refuses_calibration_text_that_is_not_public(client):
    """A job whose calibration dataset is (no longer) marked public fails before reading
    any rows, naming the field, and charges nothing."""
    from core.db.session import session_scope
    from core.db.tables import Dataset
    from worker.runner import run_job

    job_id, ds_id, calibration_id = _submit_with_calibration(client)
    with session_scope() as s:
        s.execute(update(Dataset).where(Dataset.id == calibration_id).values(public=False))

    assert run_job(job_id, worker_id="test-worker") == "failed"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["error"]["param"] == "calibration_dataset_id", job["error"]
    assert "public" in job["error"]["message"]
    assert job["privacy"]["epsilon_spent"] == 0
    budget = client.get(f"/v1/datasets/{ds_id}").json()["budget"]
    assert (budget["epsilon_spent"], budget["epsilon_reserved"]) == (0, 0)


def test_worker_refuses_a_dataset_of_another_tenant(client, other_tenant_key):
    """A job row naming another tenant's dataset (never accepted by the API) fails."""
    from core.db.session import session_scope
    from core.db.tables import Job
    from worker.runner import run_job

    job_id, _, _ = _submit_with_calibration(client)
    client.headers["Authorization"] = f"Bearer {other_tenant_key}"
    foreign = upload(client, name="another tenant's rows", public="true").json()
    with session_scope() as s:
        job = s.get(Job, job_id)
        job.spec = {**job.spec, "calibration_dataset_id": foreign["id"]}
    assert run_job(job_id, worker_id="test-worker") == "failed"
    with session_scope(write=False) as s:
        error = s.get(Job, job_id).error
    assert error["param"] == "calibration_dataset_id", error
