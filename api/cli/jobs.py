"""``jobs …``: submit (or dry-run) job specs, list, show, cancel, watch, download and
the ledger."""

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
from api.cli.plan import load_spec, print_plan
from api.cli.watch import jobs_watch

jobs_app = typer.Typer(help="Submit, follow and download compression jobs", no_args_is_help=True)


@jobs_app.callback()
def _jobs(ctx: typer.Context, api_url: str | None = API_URL, api_key: str | None = API_KEY):
    """Submit, follow and download compression jobs."""
    connection(ctx, api_url, api_key)


@user_command(jobs_app, "submit")
def jobs_submit(
    ctx: typer.Context,
    spec_file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, metavar="SPEC", help="job spec, .json or .yaml"
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="print the privacy plan and budget check; create nothing"
    ),
    dataset: str | None = typer.Option(None, help="set the spec's dataset_id"),
    idempotency_key: str | None = typer.Option(
        None, help="a retry with the same key returns the same job"
    ),
    as_json: bool = AS_JSON,
) -> None:
    """Submit a job (its ε is reserved against the dataset's cap), or --dry-run it."""
    spec = load_spec(spec_file)
    if dataset:
        spec["dataset_id"] = dataset
    with client(ctx) as dpc:
        answer = dpc.create_job(spec, dry_run=dry_run, idempotency_key=idempotency_key)
    if as_json:
        print_json(answer)
    elif dry_run:
        print_plan(answer)
        if not answer["budget"].get("allowed"):
            raise typer.Exit(1)
    else:
        out.print(
            f"submitted {answer['id']} ({answer['status']}): {answer['method']} on "
            f"{answer['dataset_id']}, planned ε "
            f"{answer['privacy']['plan']['epsilon']:.4f}\n"
            f"follow it: dpcompress jobs watch {answer['id']}"
        )


@user_command(jobs_app, "list")
def jobs_list(
    ctx: typer.Context,
    status: str | None = typer.Option(
        None, help="queued, running, cancelling, succeeded, failed or cancelled"
    ),
    dataset: str | None = typer.Option(None, help="only jobs on this dataset id"),
    limit: int = typer.Option(50, help="at most this many"),
    as_json: bool = AS_JSON,
) -> None:
    """Jobs, newest first."""
    items: list[dict] = []
    with client(ctx) as dpc:
        after = None
        while len(items) < limit:
            page = dpc.list_jobs(
                status=status, dataset_id=dataset, limit=min(100, limit - len(items)), after=after
            )
            items += page["data"]
            if not page["has_more"]:
                break
            after = page["next_cursor"]
    if as_json:
        print_json(items)
        return
    table = Table(title="jobs", title_justify="left")
    for col in (
        "id",
        "status",
        "method",
        "dataset",
        "phase",
        "step",
        "ε spent / planned",
        "created",
    ):
        table.add_column(col)
    for j in items:
        p = j["progress"]
        table.add_row(
            j["id"],
            j["status"],
            j["method"],
            j["dataset_id"],
            p["phase"] or "—",
            f"{p['step']}/{p['total_steps']}",
            f"{j['privacy']['epsilon_spent']:.3f} / {j['privacy']['plan'].get('epsilon', 0):.3f}",
            j["created_at"][:19],
        )
    out.print(table)


def _job_table(j: dict) -> Table:
    p, priv = j["progress"], j["privacy"]
    rows: list[tuple[str, Any]] = [
        ("status", j["status"]),
        ("method", j["method"]),
        ("model", j["spec"].get("model", {}).get("base", "")),
        ("dataset", j["dataset_id"]),
        ("phase", p["phase"] or "—"),
        ("step", f"{p['step']}/{p['total_steps']}"),
        (
            "ε spent / planned",
            f"{priv['epsilon_spent']:.4f} / {priv['plan'].get('epsilon', 0):.4f}",
        ),
        ("δ", num(priv["delta"], ".3g")),
        ("accountant", priv["plan"].get("accountant", "")),
        ("created", j["created_at"]),
        ("started", j["started_at"] or "—"),
        ("finished", j["finished_at"] or "—"),
    ]
    rows += [
        (f"metric {k}", num(v) if isinstance(v, int | float) else Text(str(v)))
        for k, v in sorted(j.get("metrics", {}).items())
    ]
    if j.get("error"):
        e = j["error"]
        rows.append(("error", Text(f"{e.get('code')}: {e.get('message')}", style="red")))
    return kv_table(f"job {j['id']}", rows)


@user_command(jobs_app, "show")
def jobs_show(ctx: typer.Context, job_id: str, as_json: bool = AS_JSON) -> None:
    """Status, progress, ε spent and planned, metrics, error."""
    with client(ctx) as dpc:
        job = dpc.get_job(job_id)
    if as_json:
        print_json(job)
    else:
        out.print(_job_table(job))


@user_command(jobs_app, "cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel: a queued job at once, a running one at its next step (ε charged for run steps)."""
    with client(ctx) as dpc:
        job = dpc.cancel_job(job_id)
    out.print(f"{job['id']}: {job['status']}")


user_command(jobs_app, "watch")(jobs_watch)


@user_command(jobs_app, "download")
def jobs_download(
    ctx: typer.Context,
    job_id: str,
    dest: Path = typer.Option(Path("."), help="folder to download and unpack in"),
    name: str = typer.Option("model.tar.gz", help="artifact name"),
) -> None:
    """Download the job's model archive, verify its sha256 and unpack it."""
    with client(ctx) as dpc, bytes_progress() as bar:
        task = bar.add_task(f"download {name}", total=None)
        result = dpc.download_artifact(
            job_id,
            name,
            dest,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    out.print(f"sha256 verified: {result.sha256}\nsaved {result.archive}")
    if result.unpacked:
        files = sorted(p.name for p in result.unpacked.iterdir())
        out.print(f"unpacked to {result.unpacked}: {', '.join(files)}")


@user_command(jobs_app, "ledger")
def jobs_ledger(ctx: typer.Context, job_id: str, as_json: bool = AS_JSON) -> None:
    """The job's DP events, the composed ε and an independent recomputation."""
    with client(ctx) as dpc:
        ledger = dpc.job_ledger(job_id)
    if as_json:
        print_json(ledger)
    else:
        out.print(ledger_table(f"ledger of {job_id}", ledger, with_job=False))
