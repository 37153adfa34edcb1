"""Steps shared by the end-to-end tests: upload, submit, download, load."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import httpx

from tests.conftest import small_classification_rows, tsv_bytes


def upload_reviews(client: httpx.Client, *, cap: float = 20.0, n: int = 64,
                   public: bool = False) -> dict:
    r = client.post("/v1/datasets", files={"file": ("reviews.tsv",
                                                    tsv_bytes(small_classification_rows(n)))},
                    data={"name": "reviews", "task": "classification", "text_fields": "sentence",
                          "label_field": "label", "epsilon_cap": str(cap),
                          "public": str(public).lower()})
    assert r.status_code == 201, r.text
    return r.json()


def tiny_spec(dataset_id: str, *, epochs: float = 2, batch_size: int = 16,
              epsilon: float = 4.0, probe_epochs: float = 0) -> dict:
    """A quick dp_finetune job on tiny:bert; one DP phase unless ``probe_epochs`` > 0 adds
    the linear-probe phase (the default of a real job)."""
    return {"method": "dp_finetune", "dataset_id": dataset_id, "model": {"base": "tiny:bert"},
            "privacy": {"epsilon": epsilon},
            "training": {"epochs": epochs, "batch_size": batch_size, "physical_batch_size": 8,
                         "max_seq_length": 16, "learning_rate": 1e-3,
                         "probe_epochs": probe_epochs}}


def submit(client: httpx.Client, spec: dict, **headers: str) -> dict:
    r = client.post("/v1/jobs", json=spec, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def download_model(client: httpx.Client, job_id: str, dest: Path) -> Path:
    arts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert [a["name"] for a in arts] == ["model.tar.gz"], arts
    r = client.get(f"/v1/jobs/{job_id}/artifacts/model.tar.gz")
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == arts[0]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest / "model"


def charged_steps(ledger: dict) -> dict[str, int]:
    return {e["phase"]: e["steps"] for e in ledger["data"] if e["status"] == "charged"}


def assert_loads_and_predicts(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for name in ("MODEL_CARD.md", "privacy_ledger.json", "metrics.json", "config.json"):
        assert (model_dir / name).exists(), name
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["a fine film", "a dull mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
