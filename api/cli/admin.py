"""Admin commands (they need the database or run the service): serve, migrate,
worker and ``keys create``."""

from __future__ import annotations

import os

import typer

from core.settings import get_settings

keys_app = typer.Typer(help="API keys (admin: needs the database)", no_args_is_help=True)


def serve(no_worker: bool = typer.Option(False, help="API only")) -> None:
    """Migrate, then run the API and one worker (embedded broker unless
    DPC_BROKER_URL is set). Ctrl-C stops everything."""
    from api.serve import serve as run_serve

    raise typer.Exit(run_serve(get_settings(), with_worker=not no_worker))


def migrate() -> None:
    """alembic upgrade head on DPC_DATABASE_URL."""
    from core.db.migrate import upgrade_head

    upgrade_head(get_settings().resolved_database_url)
    typer.echo("database at head")


def worker(concurrency: int = 1) -> None:
    """Run a Celery worker (one per GPU)."""
    from api.serve import worker_command

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cmd = worker_command(concurrency)
    os.execv(cmd[0], cmd)


@keys_app.command("create")
def keys_create(tenant: str = typer.Option(..., help="tenant name (new tenant) or id (tn_…)")):
    """Create an API key; it is printed once and stored hashed."""
    from sqlalchemy import select

    from core.db.session import session_scope
    from core.db.tables import Tenant
    from core.db.tenants import add_api_key, create_tenant

    with session_scope() as s:
        row = s.scalars(
            select(Tenant).where((Tenant.id == tenant) | (Tenant.name == tenant))
        ).first()
        row = row or create_tenant(s, name=tenant)
        key = add_api_key(s, tenant_id=row.id)
    typer.echo(f"tenant {row.id}\n{key}")
