"""The Alembic migrations build exactly the schema the ORM tables declare (SQLite, the
embedded default, and PostgreSQL, production): a model change without a migration fails."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from core.db.migrate import upgrade_head
from core.db.tables import Base


def _schema_diff(url: str) -> list:
    upgrade_head(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()


def test_migrated_sqlite_matches_the_tables(tmp_path):
    assert _schema_diff(f"sqlite:///{tmp_path / 'schema.sqlite3'}") == []


@pytest.mark.integration
def test_migrated_postgres_matches_the_tables(postgres_url):
    assert _schema_diff(postgres_url) == []
