"""The users' CLI end to end, as a user runs it (``python -m api.cli …`` in a shell
with DPC_API_URL and DPC_API_KEY), against the embedded service."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import small_classification_rows, tsv_bytes
from tests.integration.stack import ROOT

pytestmark = pytest.mark.integration


def dpc(service, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        env=service.cli_env(**env),
        capture_output=True,
        encoding="utf-8",
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def test_cli_upload_plan_submit_watch_download(embedded_service, tmp_path):
    svc = embedded_service
    data = tmp_path / "reviews.tsv"
    data.write_bytes(tsv_bytes(small_classification_rows(64)))

    ds = json.loads(
        ok(
            dpc(
                svc,
                "datasets",
                "upload",
                str(data),
                "--name",
                "cli-reviews",
                "--text-fields",
                "sentence",
                "--label-field",
                "label",
                "--epsilon-cap",
                "10",
                "--json",
            )
        )
    )
    assert ds["num_records"] == 64 and ds["labels"] == ["0", "1"]
    assert ds["budget"]["epsilon_remaining"] == 10
    listing = ok(dpc(svc, "datasets", "list"))
    assert ds["id"] in listing and "cli-reviews" in listing and "remaining" in listing
    assert "ε remaining" in ok(dpc(svc, "datasets", "show", ds["id"]))

    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "method": "dp_finetune",
                "dataset_id": ds["id"],
                "model": {"base": "tiny:bert"},
                "privacy": {"epsilon": 4},
                "training": {
                    "epochs": 2,
                    "batch_size": 16,
                    "physical_batch_size": 8,
                    "max_seq_length": 16,
                    "learning_rate": 1e-3,
                    "probe_epochs": 0,  # one phase (test_embedded runs the two-phase default)
                },
            }
        )
    )

    plan = ok(dpc(svc, "jobs", "submit", str(spec), "--dry-run"))
    assert "privacy plan" in plan and "poisson_gaussian" in plan
    assert re.search(r"train\W+poisson_gaussian\W+0\.25\W", plan), plan
    for label in ("composed ε", "independent ε", "ε remaining after", "allowed", "estimate"):
        assert label in plan, (label, plan)
    assert re.search(r"allowed\W+yes", plan), plan
    assert json.loads(ok(dpc(svc, "jobs", "list", "--dataset", ds["id"], "--json"))) == []

    submitted = ok(dpc(svc, "jobs", "submit", str(spec)))
    job_id = re.search(r"submitted (job_\w+) \(queued\)", submitted).group(1)

    watched = dpc(svc, "jobs", "watch", job_id, "--interval", "0.5", timeout=300)
    assert watched.returncode == 0, (watched.stdout, watched.stderr, svc.tail())
    assert f"{job_id} succeeded" in watched.stdout
    assert "phase train started" in watched.stdout and "8/8" in watched.stdout

    shown = json.loads(ok(dpc(svc, "jobs", "show", job_id, "--json")))
    assert shown["status"] == "succeeded" and shown["progress"]["step"] == 8
    assert job_id in ok(dpc(svc, "jobs", "list", "--status", "succeeded"))

    ledger = ok(dpc(svc, "jobs", "ledger", job_id))
    assert "charged" in ledger and "composed ε" in ledger and "independent ε" in ledger
    assert job_id in ok(dpc(svc, "datasets", "ledger", ds["id"]))

    downloaded = ok(dpc(svc, "jobs", "download", job_id, "--dest", str(tmp_path / "dl")))
    assert "sha256 verified" in downloaded
    model = tmp_path / "dl" / "model"
    for name in ("config.json", "MODEL_CARD.md", "privacy_ledger.json"):
        assert (model / name).is_file(), (name, sorted(p.name for p in model.iterdir()))
    assert json.loads((model / "privacy_ledger.json").read_text())

    after = json.loads(ok(dpc(svc, "datasets", "show", ds["id"], "--json")))["budget"]
    assert 0 < after["epsilon_spent"] <= 4.0 + 1e-6 and after["epsilon_reserved"] == 0


def test_cli_errors_are_one_line_and_exit_non_zero(embedded_service):
    svc = embedded_service
    missing = dpc(svc, "jobs", "show", "job_doesnotexist")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip() == "error not_found: no job job_doesnotexist (param: job_id)"

    bad_key = dpc(svc, "jobs", "list", DPC_API_KEY="not-a-key")
    assert bad_key.returncode == 1
    assert bad_key.stderr.strip() == (
        "error unauthenticated: invalid or revoked API key (param: Authorization)"
    )

    watch = dpc(svc, "jobs", "watch", "job_doesnotexist")
    assert watch.returncode == 1 and len(watch.stderr.strip().splitlines()) == 1
