"""``datasets …``: upload private datasets and follow their ε budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from api.cli.common import (
    API_KEY,
    API_URL,
    AS_JSON,
    bytes_progress,
    client,
    connection,
    kv_table,
    ledger_table,
    num,
    out,
    print_json,
    user_command,
)

datasets_app = typer.Typer(
    help="Upload private datasets and follow their ε budget", no_args_is_help=True
)


@datasets_app.callback()
def _datasets(ctx: typer.Context, api_url: str | None = API_URL, api_key: str | None = API_KEY):
    """Upload private datasets and follow their ε budget."""
    connection(ctx, api_url, api_key)


def _budget_rows(b: dict) -> list[tuple[str, Any]]:
    return [
        ("ε cap", num(b["epsilon_cap"])),
        ("ε spent", num(b["epsilon_spent"])),
        ("ε reserved", num(b["epsilon_reserved"])),
        ("ε remaining", num(b["epsilon_remaining"])),
        ("δ", num(b["delta"], ".3g")),
    ]


def _dataset_table(ds: dict) -> Table:
    cols = ds.get("columns", {})
    return kv_table(
        f"dataset {ds['id']}",
        [
            ("name", Text(ds["name"])),
            ("task", ds["task"]),
            ("rows", ds["num_records"]),
            ("text fields", ", ".join(cols.get("text_fields") or [])),
            ("label field", cols.get("label_field") or "—"),
            ("labels", Text(", ".join(ds.get("labels") or []) or "—")),
            ("public text", "yes" if ds.get("public") else "no"),
            *_budget_rows(ds["budget"]),
            ("rows deleted", "yes" if ds.get("deleted") else "no"),
            ("created", ds["created_at"]),
        ],
    )


@user_command(datasets_app, "upload")
def datasets_upload(
    ctx: typer.Context,
    file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, readable=True, help="CSV, TSV or JSONL (UTF-8)"
    ),
    name: str | None = typer.Option(None, help="dataset name (default: the file name)"),
    task: str = typer.Option("classification", help="classification or causal_lm"),
    text_fields: str = typer.Option(..., help="comma-separated text column names"),
    label_field: str | None = typer.Option(None, help="label column (classification)"),
    control_field: str | None = typer.Option(None, help="control-code column (causal_lm)"),
    epsilon_cap: float = typer.Option(..., help="total ε all jobs on this dataset may spend"),
    delta: float | None = typer.Option(None, help="δ (default 1/(10·N); must be < 1/N)"),
    public: bool = typer.Option(False, help="declare the rows PUBLIC text (usable as a job's "
                                "calibration_dataset_id, which is read without DP)"),
    as_json: bool = AS_JSON,
) -> None:
    """Upload private rows with a total ε cap; every row is validated."""
    with client(ctx) as dpc, bytes_progress() as bar:
        task_id = bar.add_task(f"upload {file.name}", total=file.stat().st_size)
        ds = dpc.upload_dataset(
            file,
            name=name or file.stem,
            task=task,
            text_fields=text_fields,
            label_field=label_field,
            control_field=control_field,
            epsilon_cap=epsilon_cap,
            delta=delta,
            public=public,
            progress=lambda done, total: bar.update(task_id, completed=done),
        )
    if as_json:
        print_json(ds)
    else:
        out.print(_dataset_table(ds))


@user_command(datasets_app, "list")
def datasets_list(
    ctx: typer.Context,
    limit: int = typer.Option(50, help="at most this many"),
    as_json: bool = AS_JSON,
) -> None:
    """Datasets, newest first, with their ε budget (spent, reserved, remaining)."""
    items: list[dict] = []
    with client(ctx) as dpc:
        after = None
        while len(items) < limit:
            page = dpc.list_datasets(limit=min(100, limit - len(items)), after=after)
            items += page["data"]
            if not page["has_more"]:
                break
            after = page["next_cursor"]
    if as_json:
        print_json(items)
        return
    table = Table(title="datasets", title_justify="left")
    for col in ("id", "name", "task", "rows", "ε cap", "spent", "reserved", "remaining", "created"):
        table.add_column(col, justify="right" if col not in ("id", "name", "task") else "left")
    for ds in items:
        b = ds["budget"]
        table.add_row(
            ds["id"],
            Text(ds["name"]),
            ds["task"],
            str(ds["num_records"]),
            num(b["epsilon_cap"]),
            num(b["epsilon_spent"]),
            num(b["epsilon_reserved"]),
            num(b["epsilon_remaining"]),
            ds["created_at"][:19],
        )
    out.print(table)


@user_command(datasets_app, "show")
def datasets_show(ctx: typer.Context, dataset_id: str, as_json: bool = AS_JSON) -> None:
    """One dataset with its budget."""
    with client(ctx) as dpc:
        ds = dpc.get_dataset(dataset_id)
    if as_json:
        print_json(ds)
    else:
        out.print(_dataset_table(ds))


@user_command(datasets_app, "ledger")
def datasets_ledger(ctx: typer.Context, dataset_id: str, as_json: bool = AS_JSON) -> None:
    """Every DP event on the dataset, across jobs, and the composed ε."""
    with client(ctx) as dpc:
        ledger = dpc.dataset_ledger(dataset_id)
    if as_json:
        print_json(ledger)
    else:
        out.print(ledger_table(f"ledger of {dataset_id}", ledger, with_job=True))


@user_command(datasets_app, "set-cap")
def datasets_set_cap(
    ctx: typer.Context,
    dataset_id: str,
    epsilon_cap: float = typer.Option(..., help="the new total ε"),
) -> None:
    """Raise the ε cap (never below what is spent or reserved)."""
    with client(ctx) as dpc:
        ds = dpc.raise_cap(dataset_id, epsilon_cap)
    out.print(_dataset_table(ds))


@user_command(datasets_app, "delete")
def datasets_delete(
    ctx: typer.Context, dataset_id: str, yes: bool = typer.Option(False, "--yes", help="do not ask")
) -> None:
    """Delete the private rows (the dataset record and its ledger stay)."""
    if not yes:
        typer.confirm(f"delete the rows of {dataset_id}?", abort=True)
    with client(ctx) as dpc:
        dpc.delete_dataset(dataset_id)
    out.print(f"deleted the rows of {dataset_id}; its ledger stays")
