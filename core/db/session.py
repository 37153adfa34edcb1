"""Engine and session factory. SQLite gets WAL, a busy timeout and ``BEGIN
IMMEDIATE`` so that budget checks serialise; PostgreSQL uses row locks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.settings import get_settings

_pooling = {"enabled": True}


def use_connection_pool(enabled: bool) -> None:
    """Pool connections (default) or open one per session. A process that forks
    workers (the Celery parent) turns pooling off so that no connection it holds
    can be inherited by a child; each child starts with a fresh pool."""
    _pooling["enabled"] = enabled
    get_engine.cache_clear()
    _factory.cache_clear()


# More connections than the API's threadpool (40 threads): a sync route holds its
# session's connection until FastAPI has validated the response, which itself waits
# for a threadpool slot; with fewer connections than threads that can deadlock.
POOL = {"pool_size": 20, "max_overflow": 30}


def make_engine(url: str) -> Engine:
    pool = POOL if _pooling["enabled"] else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **pool)
        _install_sqlite_hooks(engine)
        return engine
    return create_engine(url, pool_pre_ping=_pooling["enabled"], **pool)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below take over
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        # Writers take the write lock at BEGIN: two budget checks never interleave.
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@lru_cache
def get_engine(url: str | None = None) -> Engine:
    return make_engine(url or get_settings().resolved_database_url)


@lru_cache
def _factory(url: str | None = None, write: bool = False) -> sessionmaker[Session]:
    engine = get_engine(url)
    return sessionmaker(bind=engine.execution_options(write=write), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None, *, write: bool = True) -> Iterator[Session]:
    """A transaction: commits on success, rolls back on error. ``write`` takes
    SQLite's write lock at BEGIN (PostgreSQL code paths lock rows instead)."""
    session = _factory(url, write)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def open_session(url: str | None = None, *, write: bool = False) -> Session:
    return _factory(url, write)()
