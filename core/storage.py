"""Where bytes live: the dataset store (private rows) and the artifact store.

Both are local directories by default (under ``DPC_DATA_DIR``). Rows are stored as
JSONL, never pickled; only the worker and the upload path read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol


class ArtifactStore(Protocol):
    def put(self, *, key: str, source: Path) -> tuple[int, str]: ...
    def path(self, key: str) -> Path: ...
    def delete_prefix(self, prefix: str) -> None: ...


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


class DatasetStore:
    """Private rows of uploaded datasets, one JSONL file per dataset."""

    def __init__(self, root: Path):
        self.root = root

    def save(self, *, tenant_id: str, dataset_id: str, rows: list[dict]) -> str:
        key = f"{tenant_id}/{dataset_id}.jsonl"
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        _atomic_write(self.root / key, body.encode("utf-8"))
        return key

    def load(self, key: str) -> list[dict]:
        with (self.root / key).open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


class LocalArtifactStore:
    """Artifacts as files under a root directory; keys are relative paths."""

    def __init__(self, root: Path):
        self.root = root

    def put(self, *, key: str, source: Path) -> tuple[int, str]:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{dest.name}")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
        return file_digest(dest)

    def path(self, key: str) -> Path:
        return self.root / key

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)


def dataset_store() -> DatasetStore:
    from core.settings import get_settings

    return DatasetStore(get_settings().datasets_dir)


def artifact_store() -> LocalArtifactStore:
    from core.settings import get_settings

    return LocalArtifactStore(get_settings().artifacts_dir)
