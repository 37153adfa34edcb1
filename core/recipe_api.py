"""What a recipe (core/compress/*) receives from the worker, and what it returns.

Torch-free: the runner builds a ``JobContext``; a recipe reads private rows only
through it and reports every logical DP step through ``hooks`` so that the ledger
charges exactly what touched data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.privacy.plan import PrivacyPlan
from core.specs import JobSpec


@dataclass(frozen=True)
class DatasetView:
    """Rows of one uploaded dataset. ``rows`` are dicts with keys ``text`` (str, the
    text fields joined), ``label`` (str or None) and ``control`` (str or None)."""

    id: str
    task: str  # "classification" | "causal_lm"
    labels: list[str]
    rows: list[dict]


class RecipeHooks(Protocol):
    """Side effects of a running recipe, implemented by the worker's runner."""

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        """Start (or resume at ``resumed_step``) DP phase ``phase``; return the last
        logical step index (1-based, inclusive) the phase may run. It is below the
        planned steps when a crashed attempt already spent steps that were lost."""

    def before_step(self, phase: str, step: int) -> None:
        """Called before logical step ``step`` (1-based) reads private rows: charges ε
        for it and raises ``JobCancelled`` / ``LeaseLost`` when the job must stop."""

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        """Progress and periodic train metrics (loss, lr, ...)."""

    def checkpoint_dir(self, phase: str) -> Path:
        """Folder for this phase's resume checkpoint (kept across worker restarts)."""

    def event(self, kind: str, data: dict[str, Any]) -> None:
        """Append an event (``phase.started``, ``checkpoint.saved``, ...) to the job."""


@dataclass
class JobContext:
    job_id: str
    spec: JobSpec
    plan: PrivacyPlan
    train: DatasetView
    eval: DatasetView | None
    output_dir: Path  # the HF save_pretrained folder of the result
    work_dir: Path  # scratch space private to this job (synthetic text, caches)
    hooks: RecipeHooks
    device: str = "cpu"
    resolve_job_model: Any = None  # callable(job_id) -> Path of an earlier job's model
    calibration: DatasetView | None = None  # PUBLIC text named by calibration_dataset_id


@dataclass
class RecipeResult:
    """``metrics`` go to metrics.json and the job row; eval metrics computed on the
    user's eval dataset are marked non-private there by the runner."""

    metrics: dict[str, Any] = field(default_factory=dict)
    model_card_extra: dict[str, Any] = field(default_factory=dict)
