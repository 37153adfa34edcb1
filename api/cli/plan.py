"""Job specs from a file, and the dry run's privacy plan as a table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table
from rich.text import Text

from api.cli.common import kv_table, num, out
from api.client import DpcError


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
            num(p.get("sample_rate")),
            num(p.get("noise_multiplier")),
            str(p.get("steps")),
            num(p.get("max_grad_norm"), ".3g"),
            num(p.get("epsilon")),
        )
    out.print(table)
    allowed = budget.get("allowed")
    out.print(
        kv_table(
            "budget",
            [
                (
                    "composed ε",
                    f"{plan['epsilon']:.4f} ({plan['accountant']}, δ = {plan['delta']:.3g})",
                ),
                (
                    "independent ε",
                    f"{num(plan.get('epsilon_independent'), '.4f')} (dp_accounting PLD)",
                ),
                ("ε cap", num(budget.get("epsilon_cap"))),
                (
                    "ε spent / reserved",
                    f"{num(budget.get('epsilon_spent'))} / {num(budget.get('epsilon_reserved'))}",
                ),
                ("ε remaining after", num(budget.get("epsilon_remaining_after"))),
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
