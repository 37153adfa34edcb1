"""Cursor pagination: newest first, ``after`` = the id of the last item seen."""

from __future__ import annotations

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from core.errors import InvalidRequest


def page_after(session: Session, stmt: Select, table, *, limit: int,
               after: str | None) -> tuple[list, bool]:
    if after:
        anchor = session.execute(
            select(table.created_at, table.id).where(table.id == after)).first()
        if anchor is None:
            raise InvalidRequest(f"unknown cursor {after}", param="after")
        created_at, anchor_id = anchor
        stmt = stmt.where(or_(table.created_at < created_at,
                              and_(table.created_at == created_at, table.id < anchor_id)))
    rows = list(session.scalars(
        stmt.order_by(table.created_at.desc(), table.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
