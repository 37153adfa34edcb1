"""The job's base model: ``model.base`` with the head its training data needs."""

from __future__ import annotations

from core.models import load_model
from core.models.loading import LoadedModel, Task
from core.recipe_api import JobContext


def load_base_model(ctx: JobContext, task: Task, *, phase: str | None) -> LoadedModel:
    """``spec.model.base`` with a ``task`` head (a classifier's labels from the training
    data; new weights seeded by ``training.seed``). The loader's notes (pooling, untied
    weights) become job events of ``phase``; ``None`` for a second load of the same base."""
    spec = ctx.spec
    loaded = load_model(
        spec.model.base, task=task,
        labels=ctx.train.labels if task == "classification" else None,
        pooling=spec.model.pooling, tied_weights=spec.model.tied_weights,
        seed=spec.training.seed, resolve_job_model=ctx.resolve_job_model,
    )  # fmt: skip
    if phase is not None:
        for note in loaded.notes:
            ctx.hooks.event(note["kind"], {**note, "phase": phase})
    return loaded
