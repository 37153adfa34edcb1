"""Request context: database sessions and the current tenant. Routes never parse
headers themselves."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core.db.session import open_session
from core.db.tenants import tenant_for_key
from core.errors import Unauthenticated

# At most SESSION_LIMIT sessions of each kind exist at once (waiting costs no thread),
# together fewer than the pool's connections: a request that holds a connection while
# it waits for a threadpool slot (FastAPI validates a sync route's response there) can
# then never starve the threads that wait for a connection — without the limit, 100
# concurrent clients deadlocked the API until the pool timeout.
SESSION_LIMIT = 15
async def read_session() -> AsyncIterator[Session]:
    session = open_session(write=False)
    try:
        yield session
    finally:
        session.close()


async def write_session() -> AsyncIterator[Session]:
    """A write transaction (SQLite: BEGIN IMMEDIATE). Routes commit explicitly."""
    session = open_session(write=True)
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


ReadSession = Annotated[Session, Depends(read_session, max_concurrency=SESSION_LIMIT)]
WriteSession = Annotated[Session, Depends(write_session, max_concurrency=SESSION_LIMIT)]


def _bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
                              param="Authorization")
    return key.strip()


KEY_CACHE_SECONDS = 5.0  # a revoked key stops working within this delay
_key_cache: dict[str, tuple[float, str]] = {}


def tenant_of_key(key: str, session: Session) -> str | None:
    """The tenant of an active API key (cached for KEY_CACHE_SECONDS), or None."""
    cached = _key_cache.get(key)
    if cached and time.monotonic() - cached[0] < KEY_CACHE_SECONDS:
        return cached[1]
    tenant_id = tenant_for_key(session, key=key)
    if tenant_id is not None:
        if len(_key_cache) > 10_000:
            _key_cache.clear()
        _key_cache[key] = (time.monotonic(), tenant_id)
    return tenant_id


def current_tenant(request: Request, session: ReadSession) -> str:
    tenant_id = tenant_of_key(_bearer_key(request), session)
    if tenant_id is None:
        raise Unauthenticated("invalid or revoked API key", param="Authorization")
    return tenant_id


TenantId = Annotated[str, Depends(current_tenant)]
