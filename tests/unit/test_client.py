"""The Python client and the CLI's error path, against httpx.MockTransport (no server)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from api.client import DpcClient, DpcError, read_config


def _client(handler, **kw) -> DpcClient:
    return DpcClient("http://dpc.test", "k-1", transport=httpx.MockTransport(handler), **kw)


def _error(status: int, code: str, message: str, param=None, **extra) -> httpx.Response:
    body = {"error": {"code": code, "message": message, "param": param, **extra}}
    return httpx.Response(status, json=body)


def test_error_body_is_parsed_with_param_and_details():
    resp = _error(
        409,
        "budget_exceeded",
        "only 1.2 of the cap remains",
        "privacy.epsilon",
        epsilon_remaining=1.2,
    )
    err = DpcError.from_response(resp)
    assert (err.status, err.code, err.param) == (409, "budget_exceeded", "privacy.epsilon")
    assert err.details == {"epsilon_remaining": 1.2}
    assert str(err) == (
        "error budget_exceeded: only 1.2 of the cap remains (param: privacy.epsilon)"
    )


def test_error_without_param_and_a_foreign_body():
    assert str(DpcError.from_response(_error(401, "unauthenticated", "bad key"))) == (
        "error unauthenticated: bad key"
    )
    err = DpcError.from_response(httpx.Response(502, text="<html>Bad gateway</html>\nmore"))
    assert (err.status, err.code, err.message) == (502, "http_502", "<html>Bad gateway</html>")
    assert DpcError.from_response(httpx.Response(500)).code == "http_500"


def test_requests_carry_the_key_and_errors_raise():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers["authorization"]
        return _error(404, "not_found", "no job job_x", "job_id")

    with _client(handler) as dpc, pytest.raises(DpcError) as info:
        dpc.get_job("job_x")
    assert seen["auth"] == "Bearer k-1"
    assert str(info.value) == "error not_found: no job job_x (param: job_id)"


def test_connection_errors_are_one_dpc_error():
    def handler(request):
        raise httpx.ConnectError("connection refused", request=request)

    with _client(handler) as dpc, pytest.raises(DpcError) as info:
        dpc.list_jobs()
    assert info.value.code == "connection_error" and info.value.status == 0


def test_create_job_sends_dry_run_and_idempotency_key():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "query": str(request.url.query, "ascii"),
                "key": request.headers.get("idempotency-key"),
                "body": json.loads(request.content),
            },
        )

    with _client(handler) as dpc:
        answer = dpc.create_job({"method": "dp_finetune"}, dry_run=True, idempotency_key="r-1")
    assert answer == {"query": "dry_run=true", "key": "r-1", "body": {"method": "dp_finetune"}}


def test_upload_streams_the_file_and_reports_progress(tmp_path):
    data = b"sentence\tlabel\n" + b"a fine film\t1\n" * 20_000  # several 64 KiB chunks
    path = tmp_path / "d.tsv"
    path.write_bytes(data)
    calls: list[tuple[int, int | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        assert int(request.headers["content-length"]) == len(body)
        assert data in body and b'name="epsilon_cap"' in body and b"sentence,title" in body
        assert b'name="public"\r\n\r\ntrue' in body
        return httpx.Response(201, json={"id": "ds_1"})

    with _client(handler) as dpc:
        ds = dpc.upload_dataset(
            path,
            name="d",
            task="classification",
            text_fields=["sentence", "title"],
            label_field="label",
            epsilon_cap=8,
            public=True,
            progress=lambda d, t: calls.append((d, t)),
        )
    assert ds == {"id": "ds_1"}
    assert len(calls) > 2 and calls[-1] == (len(data), len(data))


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _artifact_server(blob: bytes, sha256: str):
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(
                200,
                json={
                    "data": [
                        {
                            "name": "model.tar.gz",
                            "bytes": len(blob),
                            "sha256": sha256,
                            "created_at": "x",
                        }
                    ],
                    "has_more": False,
                    "next_cursor": None,
                },
            )
        return httpx.Response(200, content=blob)

    return handler


def test_download_verifies_and_unpacks(tmp_path):
    blob = _tarball({"model/config.json": b"{}", "model/MODEL_CARD.md": b"# card"})
    progress: list[int] = []
    with _client(_artifact_server(blob, hashlib.sha256(blob).hexdigest())) as dpc:
        result = dpc.download_artifact(
            "job_1", "model.tar.gz", tmp_path / "out", progress=lambda d, t: progress.append(d)
        )
    assert result.unpacked == tmp_path / "out" / "model"
    assert (result.unpacked / "config.json").read_text() == "{}"
    assert result.archive.read_bytes() == blob and progress[-1] == len(blob)


def test_download_with_a_bad_checksum_keeps_nothing(tmp_path):
    blob = _tarball({"model/config.json": b"{}"})
    with _client(_artifact_server(blob, "0" * 64)) as dpc, pytest.raises(DpcError) as info:
        dpc.download_artifact("job_1", "model.tar.gz", tmp_path)
    assert info.value.code == "checksum_mismatch"
    assert list(tmp_path.iterdir()) == []


def test_download_refuses_an_archive_escaping_dest(tmp_path):
    blob = _tarball({"../evil.txt": b"x"})
    dest = tmp_path / "out"
    with (
        _client(_artifact_server(blob, hashlib.sha256(blob).hexdigest())) as dpc,
        pytest.raises(DpcError) as info,
    ):
        dpc.download_artifact("job_1", "model.tar.gz", dest)
    assert info.value.code == "unsafe_archive"
    assert not (tmp_path / "evil.txt").exists()


def test_download_of_an_unknown_artifact(tmp_path):
    blob = _tarball({"model/a": b""})
    with _client(_artifact_server(blob, "x")) as dpc, pytest.raises(DpcError) as info:
        dpc.download_artifact("job_1", "other.bin", tmp_path)
    assert (info.value.code, info.value.param) == ("not_found", "name")


def test_iter_events_follows_until_the_terminal_event():
    pages = [
        [{"seq": 1, "kind": "job.queued"}],
        [],
        [{"seq": 2, "kind": "train.metrics"}, {"seq": 3, "kind": "job.succeeded"}],
    ]
    afters = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            afters.append(int(request.url.params["after"]))
            data = pages.pop(0)
            return httpx.Response(200, json={"data": data, "has_more": False, "next_cursor": None})
        return httpx.Response(200, json={"status": "running"})

    with _client(handler) as dpc:
        kinds = [e["kind"] for e in dpc.iter_events("job_1", follow=True, poll_interval=0)]
    assert kinds == ["job.queued", "train.metrics", "job.succeeded"]
    assert afters == [0, 1, 1]


def test_settings_from_env_then_config_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("DPC_API_URL", raising=False)
    monkeypatch.delenv("DPC_API_KEY", raising=False)
    assert read_config() == {}
    assert DpcClient().base_url == "http://127.0.0.1:8000"
    (tmp_path / "dpcompress").mkdir()
    (tmp_path / "dpcompress" / "config.toml").write_text(
        'api_url = "http://svc:9000/"\napi_key = "from-file"\n'
    )
    dpc = DpcClient()
    assert (dpc.base_url, dpc.api_key) == ("http://svc:9000", "from-file")
    monkeypatch.setenv("DPC_API_KEY", "from-env")
    assert DpcClient().api_key == "from-env"
    assert DpcClient(api_key="arg").api_key == "arg"
    (tmp_path / "dpcompress" / "config.toml").write_text("api_url = ")
    with pytest.raises(DpcError) as info:
        DpcClient()
    assert info.value.code == "bad_config"


def test_cli_prints_one_error_line(tmp_path):
    from api.cli import app

    result = CliRunner().invoke(
        app, ["--api-url", "http://127.0.0.1:9", "--api-key", "k", "jobs", "show", "job_x"]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error connection_error: cannot reach")
    assert "Traceback" not in result.output


def test_cli_rejects_a_spec_that_is_not_an_object(tmp_path):
    from api.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text("- just\n- a list\n")
    result = CliRunner().invoke(app, ["jobs", "submit", str(spec), "--dry-run"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error invalid_spec: {spec}: a job spec is a mapping (JSON object) (param: spec)"
    )


def test_cli_loads_yaml_and_json_specs(tmp_path):
    from api.cli import load_spec

    (tmp_path / "a.yaml").write_text("method: dp_finetune\nprivacy: {epsilon: 4}\n")
    (tmp_path / "b.json").write_text('{"method": "dpkd"}')
    assert load_spec(tmp_path / "a.yaml") == {"method": "dp_finetune", "privacy": {"epsilon": 4}}
    assert load_spec(Path(tmp_path / "b.json")) == {"method": "dpkd"}
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(DpcError) as info:
        load_spec(tmp_path / "c.json")
    assert info.value.code == "invalid_spec"


def _watch_server(status: str, error: dict | None):
    job = {
        "id": "job_1",
        "status": status,
        "method": "dp_finetune",
        "dataset_id": "ds_1",
        "progress": {"phase": "train", "step": 3, "total_steps": 8},
        "privacy": {
            "plan": {"epsilon": 4.0, "phases": [{"name": "train", "steps": 8}]},
            "epsilon_spent": 1.5,
            "delta": 1e-5,
        },
        "metrics": {},
        "error": error,
    }
    events = [
        {
            "seq": 1,
            "kind": "phase.started",
            "created_at": "2026-01-01T00:00:01Z",
            "data": {"phase": "train", "last_step": 8},
        },
        {
            "seq": 2,
            "kind": "train.metrics",
            "created_at": "2026-01-01T00:00:02Z",
            "data": {"phase": "train", "step": 3, "total_steps": 8, "loss": 0.7, "epsilon": 1.5},
        },
        {
            "seq": 3,
            "kind": f"job.{status}",
            "created_at": "2026-01-01T00:00:03Z",
            "data": {"status": status},
        },
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            after = int(request.url.params["after"])
            return httpx.Response(
                200,
                json={
                    "data": [e for e in events if e["seq"] > after],
                    "has_more": False,
                    "next_cursor": None,
                },
            )
        return httpx.Response(200, json=job)

    return handler


@pytest.mark.parametrize(
    "status,error,code",
    [
        ("succeeded", None, 0),
        ("failed", {"code": "job_failed", "message": "RuntimeError: boom", "param": None}, 1),
        ("cancelled", None, 3),
    ],
)
def test_cli_watch_exit_codes(monkeypatch, status, error, code):
    import api.cli
    import api.cli.common

    handler = _watch_server(status, error)
    monkeypatch.setattr(
        api.cli.common,
        "DpcClient",
        lambda base_url, api_key: DpcClient(
            "http://dpc.test", "k", transport=httpx.MockTransport(handler)
        ),
    )
    result = CliRunner().invoke(api.cli.app, ["jobs", "watch", "job_1", "--interval", "0"])
    assert result.exit_code == code, result.output
    assert "phase train started" in result.output
    if status == "failed":
        assert "error job_failed: RuntimeError: boom" in result.output
    assert f"job_1 {status}" in result.output
