"""Tenants and API keys. Keys are random, shown once, stored as sha256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.tables import ApiKey, Tenant, new_id, utcnow

KEY_PREFIX = "dpc_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = Tenant(id=new_id("tn"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def add_api_key(session: Session, *, tenant_id: str, key: str | None = None) -> str:
    """Store a key (a new random one unless given); return the plaintext key."""
    key = key or KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=new_id("key"), tenant_id=tenant_id, key_hash=hash_key(key),
                       prefix=key[:8]))
    session.flush()
    return key


def tenant_for_key(session: Session, *, key: str) -> str | None:
    """Tenant id of an active key, or None."""
    row = session.execute(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == hash_key(key),
                                       ApiKey.revoked_at.is_(None))
    ).first()
    return row[0] if row else None


def ensure_bootstrap_key(session: Session, *, key: str, tenant_name: str = "default") -> str:
    """Make sure ``key`` exists (creating its tenant); return the tenant id."""
    tenant_id = tenant_for_key(session, key=key)
    if tenant_id:
        return tenant_id
    tenant = create_tenant(session, name=tenant_name)
    add_api_key(session, tenant_id=tenant.id, key=key)
    return tenant.id


def revoke_key(session: Session, *, key: str) -> bool:
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).first()
    if row is None:
        return False
    row.revoked_at = utcnow()
    return True
