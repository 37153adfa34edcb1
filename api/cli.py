"""``dpcompress``: admin commands (serve, migrate, keys, worker) and the users'
commands (``datasets …``, ``jobs …``), which talk to the API through api.client.

The users' commands read the API address and key from ``--api-url``/``--api-key``,
then ``DPC_API_URL``/``DPC_API_KEY``, then ``~/.config/dpcompress/config.toml``.
An error prints one line, ``error <code>: <message> (param: x)``, to stderr and
exits 1 (``DPC_DEBUG=1`` shows the traceback of an unexpected one).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from api.client import TERMINAL, DpcClient, DpcError
from core.settings import get_settings

app = typer.Typer(help="Private model compression service", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin: needs the database)", no_args_is_help=True)
datasets_app = typer.Typer(
    help="Upload private datasets and follow their ε budget", no_args_is_help=True
)
jobs_app = typer.Typer(help="Submit, follow and download compression jobs", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")

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


def _connection(ctx: typer.Context, api_url: str | None, api_key: str | None) -> None:
    ctx.ensure_object(dict)
    ctx.obj.update({k: v for k, v in (("api_url", api_url), ("api_key", api_key)) if v})


@app.callback()
def _root(ctx: typer.Context, api_url: str | None = API_URL, api_key: str | None = API_KEY):
    """Private model compression: DP fine-tuning, distillation and pruning with a
    per-dataset privacy budget."""
    _connection(ctx, api_url, api_key)


@datasets_app.callback()
def _datasets(ctx: typer.Context, api_url: str | None = API_URL, api_key: str | None = API_KEY):
    """Upload private datasets and follow their ε budget."""
    _connection(ctx, api_url, api_key)


@jobs_app.callback()
def _jobs(ctx: typer.Context, api_url: str | None = API_URL, api_key: str | None = API_KEY):
    """Submit, follow and download compression jobs."""
    _connection(ctx, api_url, api_key)


def _client(ctx: typer.Context) -> DpcClient:
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


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


def _num(value: Any, fmt: str = ".4g") -> str:
    return "—" if value is None else format(value, fmt)


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v if isinstance(v, Text) else Text(str(v)))
    return table


def _bytes_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
    )


# -- admin -------------------------------------------------------------------------
@app.command()
def serve(no_worker: bool = typer.Option(False, help="API only")) -> None:
    """Migrate, then run the API and one worker (embedded broker unless
    DPC_BROKER_URL is set). Ctrl-C stops everything."""
    from api.serve import serve as run_serve

    raise typer.Exit(run_serve(get_settings(), with_worker=not no_worker))


@app.command()
def migrate() -> None:
    """alembic upgrade head on DPC_DATABASE_URL."""
    from core.db.migrate import upgrade_head

    upgrade_head(get_settings().resolved_database_url)
    typer.echo("database at head")


@app.command()
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


# -- datasets ----------------------------------------------------------------------
def _budget_rows(b: dict) -> list[tuple[str, Any]]:
    return [
        ("ε cap", _num(b["epsilon_cap"])),
        ("ε spent", _num(b["epsilon_spent"])),
        ("ε reserved", _num(b["epsilon_reserved"])),
        ("ε remaining", _num(b["epsilon_remaining"])),
        ("δ", _num(b["delta"], ".3g")),
    ]


def _dataset_table(ds: dict) -> Table:
    cols = ds.get("columns", {})
    return _kv_table(
        f"dataset {ds['id']}",
        [
            ("name", Text(ds["name"])),
            ("task", ds["task"]),
            ("rows", ds["num_records"]),
            ("text fields", ", ".join(cols.get("text_fields") or [])),
            ("label field", cols.get("label_field") or "—"),
            ("labels", Text(", ".join(ds.get("labels") or []) or "—")),
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
    as_json: bool = AS_JSON,
) -> None:
    """Upload private rows with a total ε cap; every row is validated."""
    with _client(ctx) as dpc, _bytes_progress() as bar:
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
            progress=lambda done, total: bar.update(task_id, completed=done),
        )
    if as_json:
        _print_json(ds)
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
    with _client(ctx) as dpc:
        after = None
        while len(items) < limit:
            page = dpc.list_datasets(limit=min(100, limit - len(items)), after=after)
            items += page["data"]
            if not page["has_more"]:
                break
            after = page["next_cursor"]
    if as_json:
        _print_json(items)
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
            _num(b["epsilon_cap"]),
            _num(b["epsilon_spent"]),
            _num(b["epsilon_reserved"]),
            _num(b["epsilon_remaining"]),
            ds["created_at"][:19],
        )
    out.print(table)


@user_command(datasets_app, "show")
def datasets_show(ctx: typer.Context, dataset_id: str, as_json: bool = AS_JSON) -> None:
    """One dataset with its budget."""
    with _client(ctx) as dpc:
        ds = dpc.get_dataset(dataset_id)
    if as_json:
        _print_json(ds)
    else:
        out.print(_dataset_table(ds))


def _ledger_table(title: str, ledger: dict, *, with_job: bool) -> Table:
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
            _num(e["sample_rate"]),
            _num(e["noise_multiplier"]),
            str(e["steps"]),
            _num(e["max_grad_norm"], ".3g"),
            _num(e["delta"], ".3g"),
            e["status"],
        ]
        table.add_row(*([e["job_id"]] if with_job else []), *row)
    return table


@user_command(datasets_app, "ledger")
def datasets_ledger(ctx: typer.Context, dataset_id: str, as_json: bool = AS_JSON) -> None:
    """Every DP event on the dataset, across jobs, and the composed ε."""
    with _client(ctx) as dpc:
        ledger = dpc.dataset_ledger(dataset_id)
    if as_json:
        _print_json(ledger)
    else:
        out.print(_ledger_table(f"ledger of {dataset_id}", ledger, with_job=True))


@user_command(datasets_app, "set-cap")
def datasets_set_cap(
    ctx: typer.Context,
    dataset_id: str,
    epsilon_cap: float = typer.Option(..., help="the new total ε"),
) -> None:
    """Raise the ε cap (never below what is spent or reserved)."""
    with _client(ctx) as dpc:
        ds = dpc.raise_cap(dataset_id, epsilon_cap)
    out.print(_dataset_table(ds))


@user_command(datasets_app, "delete")
def datasets_delete(
    ctx: typer.Context, dataset_id: str, yes: bool = typer.Option(False, "--yes", help="do not ask")
) -> None:
    """Delete the private rows (the dataset record and its ledger stay)."""
    if not yes:
        typer.confirm(f"delete the rows of {dataset_id}?", abort=True)
    with _client(ctx) as dpc:
        dpc.delete_dataset(dataset_id)
    out.print(f"deleted the rows of {dataset_id}; its ledger stays")


# -- jobs --------------------------------------------------------------------------
def load_spec(path: Path) -> dict:
    """A job spec from JSON or YAML (by suffix; otherwise JSON, then YAML)."""
    import yaml

    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            spec = yaml.safe_load(text)
        else:
            try:
                spec = json.loads(text)
            except json.JSONDecodeError:
                if path.suffix.lower() == ".json":
                    raise
                spec = yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        msg = " ".join(str(e).split())
        raise DpcError(0, "invalid_spec", f"{path}: {msg}", "spec") from e
    if not isinstance(spec, dict):
        raise DpcError(0, "invalid_spec", f"{path}: a job spec is a mapping (JSON object)", "spec")
    return spec


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    value = int(value)
    return (
        f"{value // 3600}h{value % 3600 // 60:02d}m"
        if value >= 3600
        else f"{value // 60}m{value % 60:02d}s"
    )


def print_plan(answer: dict) -> None:
    """The dry run: one row per DP phase, then the composed ε and the budget check."""
    plan, budget, estimate = answer["plan"], answer["budget"], answer.get("estimate", {})
    table = Table(title="privacy plan (dry run: nothing was created)", title_justify="left")
    for col in ("phase", "mechanism", "q", "σ", "steps", "C", "ε"):
        table.add_column(col, justify="left" if col in ("phase", "mechanism") else "right")
    for p in plan["phases"]:
        table.add_row(
            p["name"],
            p["mechanism"],
            _num(p.get("sample_rate")),
            _num(p.get("noise_multiplier")),
            str(p.get("steps")),
            _num(p.get("max_grad_norm"), ".3g"),
            _num(p.get("epsilon")),
        )
    out.print(table)
    allowed = budget.get("allowed")
    out.print(
        _kv_table(
            "budget",
            [
                (
                    "composed ε",
                    f"{plan['epsilon']:.4f} ({plan['accountant']}, δ = {plan['delta']:.3g})",
                ),
                (
                    "independent ε",
                    f"{_num(plan.get('epsilon_independent'), '.4f')} (dp_accounting PLD)",
                ),
                ("ε cap", _num(budget.get("epsilon_cap"))),
                (
                    "ε spent / reserved",
                    f"{_num(budget.get('epsilon_spent'))} / {_num(budget.get('epsilon_reserved'))}",
                ),
                ("ε remaining after", _num(budget.get("epsilon_remaining_after"))),
                (
                    "allowed",
                    Text("yes", style="green")
                    if allowed
                    else Text("no: over the cap", style="bold red"),
                ),
                ("estimate", _seconds(estimate.get("seconds"))),
            ],
        )
    )


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
    with _client(ctx) as dpc:
        answer = dpc.create_job(spec, dry_run=dry_run, idempotency_key=idempotency_key)
    if as_json:
        _print_json(answer)
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
    with _client(ctx) as dpc:
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
        _print_json(items)
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
        ("δ", _num(priv["delta"], ".3g")),
        ("accountant", priv["plan"].get("accountant", "")),
        ("created", j["created_at"]),
        ("started", j["started_at"] or "—"),
        ("finished", j["finished_at"] or "—"),
    ]
    rows += [
        (f"metric {k}", _num(v) if isinstance(v, int | float) else Text(str(v)))
        for k, v in sorted(j.get("metrics", {}).items())
    ]
    if j.get("error"):
        e = j["error"]
        rows.append(("error", Text(f"{e.get('code')}: {e.get('message')}", style="red")))
    return _kv_table(f"job {j['id']}", rows)


@user_command(jobs_app, "show")
def jobs_show(ctx: typer.Context, job_id: str, as_json: bool = AS_JSON) -> None:
    """Status, progress, ε spent and planned, metrics, error."""
    with _client(ctx) as dpc:
        job = dpc.get_job(job_id)
    if as_json:
        _print_json(job)
    else:
        out.print(_job_table(job))


@user_command(jobs_app, "cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel: a queued job at once, a running one at its next step (ε charged for run steps)."""
    with _client(ctx) as dpc:
        job = dpc.cancel_job(job_id)
    out.print(f"{job['id']}: {job['status']}")


EXIT_FAILED, EXIT_CANCELLED = 1, 3
SUMMARY_METRICS = ("loss", "accuracy", "f1", "perplexity", "sparsity")


def _event_line(ev: dict) -> str | None:
    kind, data = ev["kind"], ev["data"]
    if kind == "phase.started":
        return f"phase {data.get('phase')} started (steps to {data.get('last_step')})"
    if kind == "budget.reserved":
        return f"budget: ε {_num(data.get('epsilon'))} reserved"
    if kind == "budget.charged":
        return f"budget: ε {_num(data.get('epsilon_spent'))} charged for the steps run"
    if kind == "budget.released":
        return "budget: the unused reservation was released"
    if kind.startswith("job.") and kind not in ("job.succeeded", "job.failed", "job.cancelled"):
        return kind
    return None


@user_command(jobs_app, "watch")
def jobs_watch(
    ctx: typer.Context,
    job_id: str,
    interval: float = typer.Option(1.0, help="seconds between polls"),
) -> None:
    """Follow a job live (phase, step, loss, ε spent vs planned, ETA) until it ends.

    Exits 0 when it succeeded, 1 when it failed, 3 when it was cancelled.
    """
    with _client(ctx) as dpc:
        job = dpc.get_job(job_id)
        plan = job["privacy"]["plan"]
        planned = {p["name"]: p["steps"] for p in plan.get("phases", [])}
        eps_planned = plan.get("epsilon", 0.0)
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("ε {task.fields[eps]} / " + f"{eps_planned:.3f}"),
            TimeRemainingColumn(),
        )
        tasks: dict[str, Any] = {}
        done: dict[str, int] = {}
        after, eps = 0, 0.0
        with Progress(*columns, console=out) as bar:
            out.print(
                f"watching {job_id}: {job['method']} on {job['dataset_id']}, planned ε "
                f"{eps_planned:.4f}"
            )

            def task_for(phase: str):
                if phase not in tasks:
                    tasks[phase] = bar.add_task(
                        phase, total=planned.get(phase), loss="—", eps=f"{eps:.3f}"
                    )
                return tasks[phase]

            while True:
                job = dpc.get_job(job_id)
                for ev in dpc.iter_events(job_id, after=after):
                    after = ev["seq"]
                    line = _event_line(ev)
                    if line:
                        bar.console.print(f"[dim]{ev['created_at'][11:19]}[/dim] {line}")
                    data = ev["data"]
                    if ev["kind"] == "phase.started":
                        task_for(data["phase"])
                    elif ev["kind"] == "train.metrics":
                        eps = float(data.get("epsilon", eps))
                        loss = data.get("loss")
                        done[data["phase"]] = max(done.get(data["phase"], 0), data["step"])
                        bar.update(
                            task_for(data["phase"]),
                            completed=data["step"],
                            total=data.get("total_steps") or planned.get(data["phase"]),
                            eps=f"{eps:.3f}",
                            loss="—" if loss is None else f"{loss:.4f}",
                        )
                # the job row's step moves between the (sparser) metrics events
                phase, step = job["progress"]["phase"], job["progress"]["step"]
                if phase and job["status"] not in TERMINAL and step > done.get(phase, 0):
                    done[phase] = step
                    bar.update(task_for(phase), completed=step)
                if job["status"] in TERMINAL:
                    if job["status"] == "succeeded":
                        for phase, task in tasks.items():
                            bar.update(task, completed=planned.get(phase, 0))
                    break
                time.sleep(interval)
    status, spent = job["status"], job["privacy"]["epsilon_spent"]
    if status == "succeeded":
        metrics = ", ".join(
            f"{k} {_num(v)}"
            for k, v in sorted(job["metrics"].items())
            if isinstance(v, int | float) and k.endswith(SUMMARY_METRICS)
        )
        out.print(
            f"{job_id} succeeded: ε spent {spent:.4f} of {eps_planned:.4f} planned"
            + (f"; {metrics}" if metrics else "")
            + f"\ndownload it: dpcompress jobs download {job_id}"
        )
        return
    e = job.get("error") or {}
    typer.echo(f"{job_id} {status}: ε spent {spent:.4f} of {eps_planned:.4f} planned", err=True)
    if e:
        typer.echo(
            str(DpcError(0, e.get("code") or "job_failed", e.get("message") or "", e.get("param"))),
            err=True,
        )
    raise typer.Exit(EXIT_FAILED if status == "failed" else EXIT_CANCELLED)


@user_command(jobs_app, "download")
def jobs_download(
    ctx: typer.Context,
    job_id: str,
    dest: Path = typer.Option(Path("."), help="folder to download and unpack in"),
    name: str = typer.Option("model.tar.gz", help="artifact name"),
) -> None:
    """Download the job's model archive, verify its sha256 and unpack it."""
    with _client(ctx) as dpc, _bytes_progress() as bar:
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
    with _client(ctx) as dpc:
        ledger = dpc.job_ledger(job_id)
    if as_json:
        _print_json(ledger)
    else:
        out.print(_ledger_table(f"ledger of {job_id}", ledger, with_job=False))


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
