"""Request context: database sessions and the current tenant. Routes never parse
headers themselves."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core.db.session import open_session
from core.db.tenants import tenant_for_key
from core.errors import Unauthenticated


def read_session() -> Iterator[Session]:
    session = open_session(write=False)
    try:
        yield session
    finally:
        session.close()


def write_session() -> Iterator[Session]:
    """A write transaction (SQLite: BEGIN IMMEDIATE). Routes commit explicitly."""
    session = open_session(write=True)
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


ReadSession = Annotated[Session, Depends(read_session)]
WriteSession = Annotated[Session, Depends(write_session)]


def _bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'",
                              param="Authorization")
    return key.strip()


KEY_CACHE_SECONDS = 5.0  # a revoked key stops working within this delay
_key_cache: dict[str, tuple[float, str]] = {}


def tenant_of_key(key: str) -> str | None:
    """The tenant of an active API key (cached for KEY_CACHE_SECONDS), or None."""
    cached = _key_cache.get(key)
    if cached and time.monotonic() - cached[0] < KEY_CACHE_SECONDS:
        return cached[1]
    session = open_session(write=False)
    try:
        tenant_id = tenant_for_key(session, key=key)
    finally:
        session.close()
    if tenant_id is not None:
        if len(_key_cache) > 10_000:
            _key_cache.clear()
        _key_cache[key] = (time.monotonic(), tenant_id)
    return tenant_id


def current_tenant(request: Request) -> str:
    tenant_id = tenant_of_key(_bearer_key(request))
    if tenant_id is None:
        raise Unauthenticated("invalid or revoked API key", param="Authorization")
    return tenant_id


TenantId = Annotated[str, Depends(current_tenant)]
