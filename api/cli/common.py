"""What the CLI's commands share: the consoles, the connection options, the API
client, the ``user_command`` error handling and small render helpers."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from api.client import DpcClient, DpcError

# Piped output (a file, a test) gets a wide console so ids and numbers are never cut.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)

API_URL = typer.Option(
    None,
    "--api-url",
    help="API base URL (default: $DPC_API_URL, the config file, http://127.0.0.1:8000)",
    show_default=False,
)
API_KEY = typer.Option(
    None,
    "--api-key",
    help="API key (default: $DPC_API_KEY or the config "
    "file; prefer those: options show in process lists)",
    show_default=False,
)
AS_JSON = typer.Option(False, "--json", help="print the API's JSON answer")


def connection(ctx: typer.Context, api_url: str | None, api_key: str | None) -> None:
    ctx.ensure_object(dict)
    ctx.obj.update({k: v for k, v in (("api_url", api_url), ("api_key", api_key)) if v})


def client(ctx: typer.Context) -> DpcClient:
    obj = ctx.obj or {}
    return DpcClient(base_url=obj.get("api_url"), api_key=obj.get("api_key"))


def user_command(group: typer.Typer, name: str):
    """Register a command whose errors print one line and exit 1, never a traceback."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except DpcError as e:
                typer.echo(str(e), err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as e:
                if os.environ.get("DPC_DEBUG"):
                    raise
                typer.echo(f"error client_error: {type(e).__name__}: {e}", err=True)
                raise typer.Exit(1) from None

        group.command(name)(run)
        return fn

    return register


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def num(value: Any, fmt: str = ".4g") -> str:
    return "—" if value is None else format(value, fmt)


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v if isinstance(v, Text) else Text(str(v)))
    return table


def bytes_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


def ledger_table(title: str, ledger: dict, *, with_job: bool) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        caption=f"composed ε {ledger['epsilon']:.4f} ({ledger['accountant']}) · "
        f"independent ε {ledger['epsilon_independent']:.4f} (PLD) · "
        f"δ {ledger['delta']:.3g}",
        caption_justify="left",
    )
    cols = (["job"] if with_job else []) + [
        "phase",
        "mechanism",
        "q",
        "σ",
        "steps",
        "C",
        "δ",
        "status",
    ]
    for col in cols:
        table.add_column(col, justify="right" if col in ("q", "σ", "steps", "C", "δ") else "left")
    for e in ledger["data"]:
        row = [
            e["phase"],
            e["mechanism"],
            num(e["sample_rate"]),
            num(e["noise_multiplier"]),
            str(e["steps"]),
            num(e["max_grad_norm"], ".3g"),
            num(e["delta"], ".3g"),
            e["status"],
        ]
        table.add_row(*([e["job_id"]] if with_job else []), *row)
    return table
