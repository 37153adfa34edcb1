"""``jobs watch``: follow a job live until it ends (registered by api.cli.jobs)."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from api.cli.common import client, num, out
from api.client import TERMINAL, DpcError

EXIT_FAILED, EXIT_CANCELLED = 1, 3
SUMMARY_METRICS = ("loss", "accuracy", "f1", "perplexity", "sparsity")


def _event_line(ev: dict) -> str | None:
    kind, data = ev["kind"], ev["data"]
    if kind == "phase.started":
        return f"phase {data.get('phase')} started (steps to {data.get('last_step')})"
    if kind == "budget.reserved":
        return f"budget: ε {num(data.get('epsilon'))} reserved"
    if kind == "budget.charged":
        return f"budget: ε {num(data.get('epsilon_spent'))} charged for the steps run"
    if kind == "budget.released":
        return "budget: the unused reservation was released"
    if kind.startswith("job.") and kind not in ("job.succeeded", "job.failed", "job.cancelled"):
        return kind
    return None


def jobs_watch(
    ctx: typer.Context,
    job_id: str,
    interval: float = typer.Option(1.0, help="seconds between polls"),
) -> None:
    """Follow a job live (phase, step, loss, ε spent vs planned, ETA) until it ends.

    Exits 0 when it succeeded, 1 when it failed, 3 when it was cancelled.
    """
    with client(ctx) as dpc:
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
            f"{k} {num(v)}"
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
