"""A small synchronous Python client for the REST API v1 (httpx; torch-free).

    from api.client import DpcClient
    with DpcClient() as dpc:                      # DPC_API_URL, DPC_API_KEY or the config file
        ds = dpc.upload_dataset("reviews.tsv", name="reviews", task="classification",
                                text_fields=["sentence"], label_field="label", epsilon_cap=8)
        job = dpc.create_job({"method": "dp_finetune", "dataset_id": ds["id"], ...})
        for event in dpc.iter_events(job["id"], follow=True):
            print(event["kind"], event["data"])
        dpc.download_artifact(job["id"], "model.tar.gz", "out/")

Connection settings, first found wins: the constructor's arguments, the environment
(``DPC_API_URL``, ``DPC_API_KEY``), the config file ``$XDG_CONFIG_HOME/dpcompress/
config.toml`` (or ``config.json``; keys ``api_url`` and ``api_key``), then the
default URL ``http://127.0.0.1:8000``. Every API error raises :class:`DpcError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_EVENTS = frozenset(f"job.{s}" for s in TERMINAL)
Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


class DpcError(Exception):
    """An error answered by the API (``{"error": {"code", "message", "param"}}``), or a
    client-side one (``status`` 0: connection, checksum, bad config).

    ``details`` holds the error body's other fields (``problems`` of a 422,
    ``epsilon_remaining`` of a ``budget_exceeded``)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        details: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.details = details or {}

    def __str__(self) -> str:
        line = f"error {self.code}: {self.message}"
        return line + (f" (param: {self.param})" if self.param else "")

    @classmethod
    def from_response(cls, response: httpx.Response) -> DpcError:
        """Parse the error body; a body that is not ours (a proxy's page) still
        gives one readable error."""
        try:
            body = response.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
            return cls(
                response.status_code,
                f"http_{response.status_code}",
                text or response.reason_phrase or "unexpected response",
            )
        details = {k: v for k, v in err.items() if k not in ("code", "message", "param")}
        return cls(
            response.status_code,
            str(err.get("code") or f"http_{response.status_code}"),
            str(err.get("message") or ""),
            err.get("param"),
            details,
        )


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "dpcompress"


def read_config(directory: Path | None = None) -> dict[str, str]:
    """``api_url`` and ``api_key`` from config.toml (or config.json); {} when absent."""
    directory = directory or config_path()
    toml_file, json_file = directory / "config.toml", directory / "config.json"
    try:
        if toml_file.exists():
            data = tomllib.loads(toml_file.read_text())
        elif json_file.exists():
            data = json.loads(json_file.read_text())
        else:
            return {}
    except (ValueError, OSError) as e:
        raise DpcError(0, "bad_config", f"cannot read {directory}/config.*: {e}") from e
    return {k: str(v) for k, v in data.items() if k in ("api_url", "api_key") and v}


class _ProgressReader:
    """Wraps an open file so that httpx's multipart encoder (which reads 64 KiB
    chunks, and finds the length through ``fileno``) reports upload progress."""

    def __init__(self, file: BinaryIO, total: int, progress: Progress):
        self._file, self._total, self._progress, self._done = file, total, progress, 0

    def fileno(self) -> int:
        return self._file.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        pos = self._file.seek(offset, whence)
        if whence == 0:
            self._done = pos
        return pos

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._done += len(chunk)
        self._progress(self._done, self._total)
        return chunk


@dataclass(frozen=True)
class Download:
    archive: Path  # the downloaded file
    sha256: str  # verified against the artifact list
    unpacked: Path | None  # the archive's top folder (or dest) once unpacked


class DpcClient:
    """Synchronous client; one ``httpx.Client`` per instance (use it as a context
    manager, or call :meth:`close`)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        config: dict[str, str] = {}
        if not (base_url or os.environ.get("DPC_API_URL")) or not (
            api_key or os.environ.get("DPC_API_KEY")
        ):
            config = read_config()
        self.base_url = (
            base_url or os.environ.get("DPC_API_URL") or config.get("api_url") or DEFAULT_API_URL
        ).rstrip("/")
        self.api_key = api_key or os.environ.get("DPC_API_KEY") or config.get("api_key")
        headers = {"User-Agent": "dpcompress-client/0.1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise DpcError(
                0, "connection_error", f"cannot reach {self.base_url}: {e or type(e).__name__}"
            ) from e
        if response.status_code >= 400:
            raise DpcError.from_response(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        return response.json() if response.content else None

    # -- datasets ----------------------------------------------------------------
    def upload_dataset(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        task: str,
        text_fields: list[str] | str,
        epsilon_cap: float,
        label_field: str | None = None,
        control_field: str | None = None,
        delta: float | None = None,
        format: str | None = None,
        public: bool = False,
        progress: Progress | None = None,
    ) -> dict:
        """Stream a CSV, TSV or JSONL file as multipart; ``progress(sent, total)`` is
        called as the file is read. ``public``: declare the rows public text (usable as a
        job's ``calibration_dataset_id``). Returns the dataset (rows, labels, budget)."""
        path = Path(path)
        fields = text_fields if isinstance(text_fields, str) else ",".join(text_fields)
        form = {
            "name": name,
            "task": task,
            "text_fields": fields,
            "epsilon_cap": repr(float(epsilon_cap)),
            "label_field": label_field,
            "control_field": control_field,
            "delta": None if delta is None else repr(float(delta)),
            "format": format,
            "public": "true" if public else None,
        }
        data = {k: v for k, v in form.items() if v is not None}
        with path.open("rb") as f:
            total = os.fstat(f.fileno()).st_size
            body: Any = _ProgressReader(f, total, progress) if progress else f
            return self._json(
                "POST",
                "/v1/datasets",
                data=data,
                files={"file": (path.name, body, "application/octet-stream")},
            )

    def list_datasets(self, *, limit: int = 20, after: str | None = None) -> dict:
        """One page: ``{"data": [...], "has_more", "next_cursor"}``."""
        return self._json("GET", "/v1/datasets", params=_params(limit=limit, after=after))

    def get_dataset(self, dataset_id: str) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def dataset_ledger(self, dataset_id: str) -> dict:
        return self._json("GET", f"/v1/datasets/{dataset_id}/ledger")

    def raise_cap(self, dataset_id: str, epsilon_cap: float) -> dict:
        """Set a new ε cap; the API refuses one below what is spent or reserved."""
        return self._json("PATCH", f"/v1/datasets/{dataset_id}", json={"epsilon_cap": epsilon_cap})

    def delete_dataset(self, dataset_id: str) -> None:
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    # -- jobs --------------------------------------------------------------------
    def create_job(
        self, spec: dict, *, dry_run: bool = False, idempotency_key: str | None = None
    ) -> dict:
        """Submit a job spec; with ``dry_run`` the privacy plan, budget check and time
        estimate come back and nothing is created."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"dry_run": "true"} if dry_run else {}
        return self._json("POST", "/v1/jobs", json=spec, params=params, headers=headers)

    def list_jobs(
        self,
        *,
        status: str | None = None,
        dataset_id: str | None = None,
        limit: int = 20,
        after: str | None = None,
    ) -> dict:
        return self._json(
            "GET",
            "/v1/jobs",
            params=_params(status=status, dataset_id=dataset_id, limit=limit, after=after),
        )

    def get_job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def iter_events(
        self, job_id: str, *, after: int = 0, follow: bool = False, poll_interval: float = 1.0
    ) -> Iterator[dict]:
        """The job's events in order from ``after`` (a ``seq``). With ``follow`` it
        polls for new ones until the job is terminal and its last event was yielded."""
        while True:
            page = self._json(
                "GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 500}
            )
            finished = False
            for event in page["data"]:
                after = event["seq"]
                finished = finished or event["kind"] in TERMINAL_EVENTS
                yield event
            if page["has_more"]:
                continue
            if not follow or finished:
                return
            if not page["data"] and self.get_job(job_id)["status"] in TERMINAL:
                # terminal without a terminal event (never expected): drain once more
                follow = False
                continue
            time.sleep(poll_interval)

    def job_ledger(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}/ledger")

    def list_artifacts(self, job_id: str) -> list[dict]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")["data"]

    def download_artifact(
        self,
        job_id: str,
        name: str,
        dest: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
        unpack: bool = True,
    ) -> Download:
        """Stream an artifact into the folder ``dest``, verify its sha256 against the
        artifact list, and unpack a ``.tar.gz`` there (``filter="data"``: no absolute
        paths, links out of ``dest`` or device files)."""
        listed = {a["name"]: a for a in self.list_artifacts(job_id)}
        if name not in listed:
            raise DpcError(
                404,
                "not_found",
                f"job {job_id} has no artifact {name} (it has: {', '.join(listed) or 'none'})",
                "name",
            )
        expected = listed[name]["sha256"]
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / Path(name).name
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                if response.status_code >= 400:
                    response.read()
                    raise DpcError.from_response(response)
                total = int(response.headers.get("content-length", 0)) or listed[name]["bytes"]
                done = 0
                with partial.open("wb") as out:
                    for chunk in response.iter_bytes(256 * 1024):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
        except httpx.TransportError as e:
            partial.unlink(missing_ok=True)
            raise DpcError(0, "connection_error", f"download interrupted: {e}") from e
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise DpcError(
                0,
                "checksum_mismatch",
                f"{name}: sha256 {digest.hexdigest()} "
                f"!= {expected} from the artifact list; nothing was kept",
                "name",
            )
        partial.replace(target)
        unpacked = None
        if unpack and name.endswith((".tar.gz", ".tgz")):
            unpacked = unpack_archive(target, dest)
        return Download(archive=target, sha256=expected, unpacked=unpacked)


def unpack_archive(archive: Path, dest: Path) -> Path:
    """Extract with tarfile's ``data`` filter; returns the single top folder, or dest."""
    with tarfile.open(archive, mode="r:gz") as tar:
        tops = {Path(m.name).parts[0] for m in tar.getmembers() if Path(m.name).parts}
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as e:
            raise DpcError(0, "unsafe_archive", f"{archive.name}: {e}") from e
    return dest / tops.pop() if len(tops) == 1 else dest


def _params(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}
