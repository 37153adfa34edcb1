"""Test doubles for the torch zone: an in-memory RecipeHooks and tiny data/plans."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from core.errors import JobCancelled
from core.privacy.plan import PhasePlan, PrivacyPlan
from core.recipe_api import DatasetView

POSITIVE = ("good", "great", "fine", "bright", "nice", "warm")
WORDS = [*POSITIVE, "bad", "awful", "dull", "grim", "poor", "cold"]


def model_cache_dir() -> Path:
    """``<test data dir>/model-cache``, shared by test runs (the SmolLM2 tokenizer extracted
    once lives here); the data dir is ``DPC_TEST_DATA_DIR`` or a fixed temp folder."""
    root = Path(os.environ.get("DPC_TEST_DATA_DIR", Path(tempfile.gettempdir()) / "dpc-test-data"))
    path = root / "model-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def single_torch_thread():
    """Fixture body: tiny models run ~10× faster on one thread than on two threads
    competing with other processes (OpenMP spin-waits); restores the count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingHooks:
    """Records every call; charges one unit of ε per ``before_step`` like the runner.

    ``begin_phase`` returns the last step the phase may run: the planned steps minus the
    steps charged in earlier attempts that the resume point does not cover (wasted).

    Args:
        planned_steps: steps of the phase in the plan.
        ckpt_root: folder for checkpoints.
        cancel_before_step: raise ``JobCancelled`` in ``before_step`` of this step (no
            charge), simulating a cancel or a crash between steps.
        crash_after_step: raise ``RuntimeError`` in ``after_step`` of this step (charged,
            not checkpointed: wasted).
    """

    def __init__(
        self,
        planned_steps: int,
        ckpt_root: Path,
        *,
        cancel_before_step: int | None = None,
        crash_after_step: int | None = None,
    ):
        self.planned_steps = planned_steps
        self.ckpt_root = Path(ckpt_root)
        self.cancel_before_step = cancel_before_step
        self.crash_after_step = crash_after_step
        self.charged = 0
        self.before: list[int] = []
        self.after: list[tuple[int, dict]] = []
        self.begins: list[tuple[int, int]] = []  # (resumed_step, returned last step)
        self.events: list[tuple[str, dict]] = []

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        last = resumed_step + (self.planned_steps - self.charged)
        self.begins.append((resumed_step, last))
        return last

    def before_step(self, phase: str, step: int) -> None:
        if step == self.cancel_before_step:
            self.cancel_before_step = None
            raise JobCancelled(f"cancelled before step {step}")
        self.charged += 1
        self.before.append(step)

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.after.append((step, metrics))
        if step == self.crash_after_step:
            self.crash_after_step = None
            raise RuntimeError(f"worker died after step {step}")

    def checkpoint_dir(self, phase: str) -> Path:
        return self.ckpt_root / phase

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


def text_rows(n: int, *, seed: int = 0, labels: tuple[str, ...] = ("neg", "pos")) -> list[dict]:
    """``n`` rows of 2-12 words; label = whether 'good'-ish words dominate (learnable)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 12))]
        positive = sum(w in POSITIVE for w in words)
        label = labels[int(positive * 2 >= len(words))]
        rows.append({"text": " ".join(words), "label": label, "control": label})
    return rows


def view(rows: list[dict], *, task: str = "classification", ds_id: str = "ds_train") -> DatasetView:
    labels = sorted({r["label"] for r in rows}) if task == "classification" else []
    return DatasetView(id=ds_id, task=task, labels=labels, rows=rows)


def dp_phase(
    *, sample_rate: float, noise_multiplier: float, steps: int, max_grad_norm: float = 1.0
) -> PhasePlan:
    return PhasePlan(
        name="train",
        mechanism="poisson_gaussian",
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=steps,
        max_grad_norm=max_grad_norm,
    )


def plan_of(phase: PhasePlan) -> PrivacyPlan:
    return PrivacyPlan(accountant="prv", delta=1e-5, epsilon=8.0, phases=[phase])
