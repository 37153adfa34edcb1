"""Bad inputs answer 4xx with the error body, never 5xx, and change nothing."""

from __future__ import annotations

import json

import pytest

from tests.conftest import small_classification_rows, tsv_bytes, upload


def _spec(ds_id: str, **over) -> dict:
    spec = {"method": "dp_finetune", "dataset_id": ds_id, "model": {"base": "tiny:bert"},
            "privacy": {"epsilon": 4.0},
            "training": {"epochs": 1, "batch_size": 16, "max_seq_length": 16}}
    spec.update(over)
    return spec


def _counts(client) -> tuple[int, int]:
    ds = client.get("/v1/datasets", params={"limit": 100}).json()["data"]
    jobs = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    return len(ds), len(jobs)


def _assert_error(resp, status: int, code: str | None = None, param: str | None = None):
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) >= {"code", "message", "param"}
    if code:
        assert body["code"] == code, body
    if param:
        assert param in (body["param"] or "") or param in body["message"], body
    return body


def test_upload_returns_dataset_with_budget(client):
    r = upload(client, cap=5.0)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and ds["num_records"] == 64
    assert ds["labels"] == ["0", "1"]
    assert ds["budget"] == {"epsilon_cap": 5.0, "delta": pytest.approx(1 / 640),
                            "epsilon_spent": 0.0, "epsilon_reserved": 0.0,
                            "epsilon_remaining": 5.0}


@pytest.mark.parametrize("body,code,param", [
    (b"", "invalid_file", "file"),
    (b"sentence\tlabel\n", "invalid_file", "file"),
    (b"sentence\tlabel\nfine \xe9 film\t1\n", "invalid_file", "file"),  # latin-1 byte
    (b"sentence\tlabel\nok\t1\n\xff\xfe\x00\x01\t0\n", "invalid_file", "file"),
    (b"sentence\tlabel\nok\t1\n\t0\n", "invalid_file", "file"),  # empty text
    (b"sentence\tlabel\nok\t1\nalso ok\t\n", "invalid_file", "file"),  # missing label
    (b"sentence\tlabel\nok\t1\tEXTRA\n", "invalid_file", "file"),
    (b"text\tlabel\nok\t1\n", "invalid_request", "text_fields"),  # missing column
    (b"sentence\tlabel\nok\t1\nfine\t1\n", "invalid_request", "label_field"),  # one class
])
def test_bad_files_are_rejected_and_store_nothing(client, body, code, param):
    before = _counts(client)
    r = client.post("/v1/datasets", files={"file": ("d.tsv", body)},
                    data={"name": "x", "task": "classification", "text_fields": "sentence",
                          "label_field": "label", "epsilon_cap": "1"})
    _assert_error(r, 422, code, param)
    assert _counts(client) == before


def test_bad_jsonl_and_csv(client):
    bad_jsonl = b'{"text": "a", "y": "1"}\n{oops\n'
    r = client.post("/v1/datasets", files={"file": ("d.jsonl", bad_jsonl)},
                    data={"name": "x", "task": "classification", "text_fields": "text",
                          "label_field": "y", "epsilon_cap": "1"})
    body = _assert_error(r, 422, "invalid_file")
    assert "line 2" in body["message"]
    r = client.post("/v1/datasets", files={"file": ("d.csv", b'text,y\n"unclosed,1\n')},
                    data={"name": "x", "task": "classification", "text_fields": "text",
                          "label_field": "y", "epsilon_cap": "1"})
    assert r.status_code == 422


def test_upload_form_errors(client):
    _assert_error(upload(client, cap=0), 422, "validation_failed", "epsilon_cap")
    _assert_error(upload(client, cap=-1), 422, "validation_failed", "epsilon_cap")
    _assert_error(upload(client, delta="0.5"), 422, "invalid_request", "delta")
    r = client.post("/v1/datasets", files={"file": ("d.tsv", tsv_bytes([("a", "1")]))},
                    data={"task": "classification"})
    body = _assert_error(r, 422, "validation_failed")
    assert "name" in body["message"] and "text_fields" in body["message"]
    _assert_error(upload(client, task="translation"), 422, "validation_failed", "task")


def test_oversize_upload(client, monkeypatch):
    from tests.conftest import reset_caches

    monkeypatch.setenv("DPC_MAX_UPLOAD_MB", "0.001")
    reset_caches()
    big = small_classification_rows(200)
    _assert_error(upload(client, rows=big), 413, "payload_too_large", "file")


def test_auth_errors(client):
    r = client.get("/v1/datasets", headers={"Authorization": ""})
    _assert_error(r, 401, "unauthenticated")
    r = client.get("/v1/datasets", headers={"Authorization": "Bearer nope"})
    _assert_error(r, 401, "unauthenticated")
    r = client.get("/v1/datasets", headers={"Authorization": "Basic dGVzdA=="})
    _assert_error(r, 401, "unauthenticated")


def test_other_tenant_sees_404(client, other_tenant_key):
    ds = upload(client).json()
    other = {"Authorization": f"Bearer {other_tenant_key}"}
    _assert_error(client.get(f"/v1/datasets/{ds['id']}", headers=other), 404, "not_found")
    r = client.post("/v1/jobs", json=_spec(ds["id"]), headers=other)
    _assert_error(r, 404, "not_found", "dataset_id")
    job = client.post("/v1/jobs", json=_spec(ds["id"])).json()
    for path in ("", "/events", "/ledger", "/artifacts"):
        _assert_error(client.get(f"/v1/jobs/{job['id']}{path}", headers=other), 404)
    _assert_error(client.post(f"/v1/jobs/{job['id']}/cancel", headers=other), 404)
    assert client.get("/v1/jobs", headers=other).json()["data"] == []


def test_bad_specs_report_every_problem_at_once(client):
    ds = upload(client).json()
    before = _counts(client)
    spec = _spec(ds["id"], colour="blue")
    spec["privacy"] = {"epsilon": -1, "max_grad_norm": "big"}
    spec["training"] = {"epochs": "three", "batch_size": 0}
    r = client.post("/v1/jobs", json=spec)
    body = _assert_error(r, 422, "validation_failed")
    params = {p["param"] for p in body["problems"]}
    assert {"colour", "privacy.epsilon", "privacy.max_grad_norm", "training.epochs",
            "training.batch_size"} <= params
    assert _counts(client) == before


@pytest.mark.parametrize("mutate,status,param", [
    (lambda s: s["privacy"].update(epsilon=0), 422, "privacy.epsilon"),
    (lambda s: s["privacy"].update(delta=0.5), 422, "privacy.delta"),  # ≥ 1/N
    (lambda s: s.update(dataset_id="ds_doesnotexist"), 404, "dataset_id"),
    (lambda s: s.update(dataset_id="not-an-id"), 422, "dataset_id"),
    (lambda s: s.update(method="magic"), 422, "method"),
    (lambda s: s["model"].update(base="../../etc/passwd"), 422, "model.base"),
    (lambda s: s["model"].update(base="some-org/not-cached"), 422, "model.base"),
    (lambda s: s["model"].update(base="job:job_nope"), 422, "model.base"),
    (lambda s: s.update(method="distildp"), 422, "method"),
    (lambda s: s["training"].update(probe_epochs=2, train_body=False), 422,
     "training.probe_epochs"),  # a head-only job has no separate head probe
    (lambda s: s.update(method="dpimp_unstructured", calibration_dataset_id=s["dataset_id"]),
     422, "calibration_dataset_id"),  # read without DP: never the private rows
    (lambda s: s.update(calibration_dataset_id="ds_public"), 422,
     "calibration_dataset_id"),  # dp_finetune reads no calibration text
    (lambda s: s.update(method="dpimp_unstructured", calibration_dataset_id="ds_doesnotexist"),
     404, "calibration_dataset_id"),
])
def test_bad_job_fields(client, mutate, status, param):
    ds = upload(client).json()
    before = _counts(client)
    spec = _spec(ds["id"])
    mutate(spec)
    _assert_error(client.post("/v1/jobs", json=spec), status, param=param)
    assert _counts(client) == before
    assert client.get(f"/v1/datasets/{ds['id']}").json()["budget"]["epsilon_reserved"] == 0


def test_calibration_text_must_be_uploaded_as_public(client):
    """A calibration dataset is read without DP: a dataset not declared public at upload
    (the default) is refused, naming the field; one uploaded with public=true is accepted."""
    ds = upload(client).json()
    private = upload(client, name="more private rows").json()
    public = upload(client, name="public text", public="true").json()
    assert (private["public"], public["public"]) == (False, True)
    assert client.get(f"/v1/datasets/{public['id']}").json()["public"] is True
    before = _counts(client)
    spec = {**_spec(ds["id"]), "method": "dpimp_unstructured",
            "calibration_dataset_id": private["id"]}
    body = _assert_error(client.post("/v1/jobs", json=spec), 422, param="calibration_dataset_id")
    assert "public" in body["message"]
    assert _counts(client) == before
    spec["calibration_dataset_id"] = public["id"]
    r = client.post("/v1/jobs", params={"dry_run": "true"}, json=spec)
    assert r.status_code == 200, r.text


def test_malformed_json_body(client):
    r = client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    _assert_error(r, 422)
    r = client.post("/v1/jobs", content=json.dumps([1, 2]),
                    headers={"Content-Type": "application/json"})
    _assert_error(r, 422)


def test_dry_run_plans_and_changes_nothing(client):
    ds = upload(client, cap=3.0).json()
    r = client.post("/v1/jobs", params={"dry_run": "true"}, json=_spec(ds["id"]))
    assert r.status_code == 200, r.text
    out = r.json()
    plan = out["plan"]
    probe, train = plan["phases"]  # a classifier: linear probe (12 epochs), then fine-tuning
    assert (probe["name"], probe["steps"], train["name"], train["steps"]) == (
        "probe", 48, "train", 4)
    assert probe["sample_rate"] == train["sample_rate"] == pytest.approx(16 / 64)
    assert plan["epsilon"] <= 4.0
    assert out["budget"]["allowed"] is False  # ε 4 does not fit a cap of 3
    assert out["estimate"]["seconds"] >= 0
    assert _counts(client)[1] == 0


def test_budget_exceeded_and_idempotency(client):
    ds = upload(client, cap=5.0).json()
    spec = _spec(ds["id"])
    r1 = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    assert r1.status_code == 201, r1.text
    r2 = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]
    other = dict(spec, privacy={"epsilon": 3.0})
    _assert_error(client.post("/v1/jobs", json=other, headers={"Idempotency-Key": "k1"}), 409,
                  "conflict")
    r3 = client.post("/v1/jobs", json=spec)  # 4 + 4 composed > 5
    body = _assert_error(r3, 409, "budget_exceeded", "privacy.epsilon")
    assert 0 < body["epsilon_remaining"] < 5.0 - 3.9
    budget = client.get(f"/v1/datasets/{ds['id']}").json()["budget"]
    assert budget["epsilon_reserved"] == pytest.approx(r1.json()["privacy"]["plan"]["epsilon"],
                                                       rel=1e-2)


def test_cancel_queued_job_releases_reservation(client):
    ds = upload(client, cap=5.0).json()
    job = client.post("/v1/jobs", json=_spec(ds["id"])).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert client.get(f"/v1/datasets/{ds['id']}").json()["budget"]["epsilon_reserved"] == 0
    _assert_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "invalid_state")
    kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert kinds == ["job.queued", "budget.reserved", "budget.released", "job.cancelled"]
    ledger = client.get(f"/v1/jobs/{job['id']}/ledger").json()
    assert ledger["epsilon"] == 0 and {e["status"] for e in ledger["data"]} == {"charged",
                                                                                "released"}


def test_cap_raise_not_lower_and_delete(client):
    ds = upload(client, cap=5.0).json()
    client.post("/v1/jobs", json=_spec(ds["id"]))
    _assert_error(client.patch(f"/v1/datasets/{ds['id']}", json={"epsilon_cap": 1.0}), 422,
                  param="epsilon_cap")
    r = client.patch(f"/v1/datasets/{ds['id']}", json={"epsilon_cap": 20.0})
    assert r.status_code == 200 and r.json()["budget"]["epsilon_cap"] == 20.0
    _assert_error(client.delete(f"/v1/datasets/{ds['id']}"), 409, "conflict")


def test_pagination_and_unknown_route(client):
    ids = [upload(client, name=f"d{i}").json()["id"] for i in range(3)]
    p1 = client.get("/v1/datasets", params={"limit": 2}).json()
    assert p1["has_more"] and len(p1["data"]) == 2
    p2 = client.get("/v1/datasets", params={"limit": 2, "after": p1["next_cursor"]}).json()
    assert not p2["has_more"]
    assert {d["id"] for d in p1["data"] + p2["data"]} == set(ids)
    _assert_error(client.get("/v1/datasets", params={"after": "ds_zzz"}), 422, param="after")
    _assert_error(client.get("/v1/nothing"), 404, "not_found")
    _assert_error(client.get("/v1/datasets", params={"limit": 0}), 422)


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert "dpc_http_requests" in client.get("/metrics").text
