"""Shared fixtures: configured settings, a migrated database, API clients.

Integration tests use the real PostgreSQL and Redis of the machine; when one is
not reachable they are skipped with the reason, never faked.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get("DPC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DPC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def reset_caches() -> None:
    from core.db.session import _factory, get_engine
    from core.queue import get_celery
    from core.settings import get_settings

    for fn in (get_settings, get_engine, _factory, get_celery):
        fn.cache_clear()
    from api.deps import _key_cache

    _key_cache.clear()


def configure(monkeypatch, *, data_dir: Path, database_url: str, broker_url: str,
              **extra: str) -> None:
    monkeypatch.setenv("DPC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DPC_DATABASE_URL", database_url)
    monkeypatch.setenv("DPC_BROKER_URL", broker_url)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    reset_caches()


@pytest.fixture
def redis_url() -> str:
    """A Redis database of its own for this test, emptied first."""
    if not port_open("127.0.0.1", 6379):
        pytest.skip("Redis is not reachable on 127.0.0.1:6379")
    import redis

    url = f"{REDIS_URL}/{secrets.randbelow(14) + 1}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not port_open("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    from sqlalchemy import create_engine, text

    name = f"dpc_test_{secrets.token_hex(6)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from core.db.session import get_engine

    get_engine.cache_clear()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_env(tmp_path, monkeypatch, redis_url):
    """Settings on a migrated SQLite file; the broker is a real Redis db no worker reads."""
    from core.db.migrate import upgrade_head

    url = f"sqlite:///{tmp_path / 'dpc.sqlite3'}"
    configure(monkeypatch, data_dir=tmp_path, database_url=url, broker_url=redis_url,
              DPC_BOOTSTRAP_API_KEY="test-key-tenant-a")
    upgrade_head(url)
    yield url
    reset_caches()


@pytest.fixture
def client(sqlite_env):
    from fastapi.testclient import TestClient

    from api.main import create_app

    with TestClient(create_app()) as c:
        c.headers["Authorization"] = "Bearer test-key-tenant-a"
        yield c


@pytest.fixture
def other_tenant_key(client) -> str:
    from core.db.session import session_scope
    from core.db.tenants import add_api_key, create_tenant

    with session_scope() as s:
        t = create_tenant(s, name="tenant-b")
        return add_api_key(s, tenant_id=t.id)


def tsv_bytes(rows: list[tuple[str, str]]) -> bytes:
    return ("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows)).encode()


def small_classification_rows(n: int = 64) -> list[tuple[str, str]]:
    good = ["a fine film", "great acting", "loved it", "wonderful and warm"]
    bad = ["a dull mess", "terrible plot", "hated it", "boring and cold"]
    return [((good if i % 2 else bad)[i % 4] + f" {i}", str(i % 2)) for i in range(n)]


def upload(client, *, rows=None, name="reviews", cap=10.0, **form):
    data = {"name": name, "task": "classification", "text_fields": "sentence",
            "label_field": "label", "epsilon_cap": str(cap), **form}
    body = tsv_bytes(rows or small_classification_rows())
    return client.post("/v1/datasets", data=data, files={"file": ("d.tsv", body)})
