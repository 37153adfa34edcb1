"""``dp_finetune``: DP-SGD fine-tuning of the base model, no compression.

The baseline of every method (Mireshghallah et al. 2022; Abadi et al. 2016, Alg. 1):

    1. load the base model with a task head (mean-pooled classifier, or the LM head)
    2. tokenise the private rows
    3. optimizer with per-group learning rates (fresh head ≫ pretrained body)
    4. DP-SGD for exactly the planned steps of phase "train" (q, σ, C from the plan)
    5. evaluate on the user's eval dataset, if named (non-private evaluation)
    6. save an HF folder + tokenizer into ``ctx.output_dir``

Privacy: only step 4 reads private rows, through the engine, which reports every logical
step to ``ctx.hooks`` before it touches data. The train loss in the metrics is computed
on private rows and flagged non-private.
"""

from __future__ import annotations

from typing import cast

import torch

from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import load_model, load_snippet, save_model, split_trainable
from core.models.loading import Task
from core.privacy.engine import DPSGDEngine, EngineConfig
from core.recipe_api import DatasetView, JobContext, RecipeResult
from core.training.losses import (
    causal_lm_loss_per_example,
    classification_loss_per_example,
    evaluate_classifier,
    evaluate_perplexity,
)

PHASE = "train"
HEAD_LR_FACTOR = 400.0  # DESIGN §8: a DP head needs 2e-2..5e-2 where the body takes 5e-5
HEAD_LR_CAP = 5e-2


def default_head_learning_rate(learning_rate: float) -> float:
    """Head lr when the spec leaves it unset: 400 × body lr, capped at 5e-2."""
    return min(HEAD_LR_FACTOR * learning_rate, HEAD_LR_CAP)


def run(ctx: JobContext) -> RecipeResult:
    spec, training, hooks = ctx.spec, ctx.spec.training, ctx.hooks
    task = cast(Task, ctx.train.task)
    phase = ctx.plan.phase(PHASE)
    if spec.embedding.mode in ("fest", "adafest"):
        raise InvalidRequest(
            f"embedding.mode={spec.embedding.mode!r} is not available for dp_finetune yet; "
            "use 'dense' or 'frozen'",
            param="embedding.mode",
        )
    torch.manual_seed(training.seed)  # dropout; DP noise and sampling have their own RNGs

    # 1. base model + task head (new weights seeded by training.seed)
    loaded = load_model(
        spec.model.base,
        task=task,
        labels=ctx.train.labels if task == "classification" else None,
        pooling=spec.model.pooling,
        tied_weights=spec.model.tied_weights,
        seed=training.seed,
        resolve_job_model=ctx.resolve_job_model,
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    for note in loaded.notes:
        hooks.event(note["kind"], {**note, "phase": PHASE})

    # 2. private rows → token ids (truncated to max_seq_length)
    uses_token_type_ids = getattr(model.config, "type_vocab_size", 0) > 0
    train_rows = encode_dataset(
        ctx.train, tokenizer, task=task, max_seq_length=training.max_seq_length,
        uses_token_type_ids=uses_token_type_ids,
    )  # fmt: skip

    # 3. per-group learning rates: pretrained body vs freshly initialised head
    body, head = split_trainable(
        model, train_body=training.train_body, freeze_embeddings=spec.embedding.mode == "frozen"
    )
    head_lr = training.head_learning_rate or default_head_learning_rate(training.learning_rate)
    groups = [{"params": body, "lr": training.learning_rate}, {"params": head, "lr": head_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)

    # 4. DP-SGD: exactly the planned logical steps, Poisson sampling with q from the plan
    engine = DPSGDEngine(
        model=model,
        optimizer=optimizer,
        phase=phase,
        dataset=train_rows,
        loss_fn=(
            classification_loss_per_example
            if task == "classification"
            else causal_lm_loss_per_example
        ),
        hooks=hooks,
        config=EngineConfig(
            grad_sample_mode=training.grad_sample_mode,
            physical_batch_size=training.physical_batch_size,
            checkpoint_every=_checkpoint_every(),
        ),
        device=ctx.device,
    )
    result = engine.run()
    model.eval()

    # 5. evaluation on the user's separate eval dataset (non-private, flagged)
    eval_metrics = None
    if ctx.eval is not None:
        eval_metrics = _evaluate(ctx, ctx.eval, model, tokenizer, uses_token_type_ids)

    # 6. the artifact: a plain HF folder (no Opacus prefixes) + tokenizer
    save_model(model.cpu(), tokenizer, ctx.output_dir)

    metrics = {
        "task": task,
        "phase": PHASE,
        "steps": result.last_step,
        "planned_steps": phase.steps,
        "steps_run_this_attempt": result.steps_run,
        "resumed_from_step": result.resumed_from,
        "train_loss": result.train_loss,
        "samples_seen": result.samples_seen,
        "train_seconds": round(result.seconds, 3),
        "samples_per_second": (  # of this attempt
            round(result.samples_this_attempt / result.seconds, 3) if result.seconds else None
        ),
        "sample_rate": phase.sample_rate,
        "noise_multiplier": phase.noise_multiplier,
        "max_grad_norm": phase.max_grad_norm,
        "expected_batch_size": engine.expected_batch_size,
        "grad_sample_mode": training.grad_sample_mode,
        "learning_rate": training.learning_rate,
        "head_learning_rate": head_lr if head else None,
        "pooling": loaded.pooling,
        "trainable_parameters": sum(p.numel() for p in body + head),
        "non_private_metrics": ["train_loss", "samples_seen"],
    }
    if eval_metrics is not None:
        metrics["eval"] = eval_metrics
        for key in ("accuracy", "perplexity"):  # flat copies for the model card table
            if key in eval_metrics:
                metrics[f"eval_{key}"] = eval_metrics[key]
    card = {
        "method": "dp_finetune",
        "base_model": spec.model.base,
        "pooling": loaded.pooling,
        "load": load_snippet(task, loaded.pooling),
    }
    return RecipeResult(metrics=metrics, model_card_extra=card)


def _evaluate(
    ctx: JobContext, eval_view: DatasetView, model, tokenizer, uses_token_type_ids: bool
) -> dict:
    """Accuracy (classification) or perplexity (causal LM) on the user's eval dataset."""
    task, training = ctx.train.task, ctx.spec.training
    rows = encode_dataset(
        eval_view, tokenizer, task=task, max_seq_length=training.max_seq_length,
        labels=ctx.train.labels if task == "classification" else None,
        uses_token_type_ids=uses_token_type_ids,
    )  # fmt: skip
    out = {"dataset_id": eval_view.id, "num_records": len(rows), "non_private_evaluation": True}
    if task == "classification":
        out.update(evaluate_classifier(model, rows, device=ctx.device))
        if out["predicted_class_share"] == 1.0 and len(set(rows.labels or [])) > 1:
            ctx.hooks.event(
                "eval.degenerate",
                {"message": "the model predicts a single class on the eval set: DP training "
                 "did not learn; raise the head lr, epochs, batch size or ε"},
            )  # fmt: skip
    else:
        out["perplexity"] = evaluate_perplexity(model, rows, device=ctx.device)
    return out


def _checkpoint_every() -> int:
    from core.settings import get_settings

    return get_settings().checkpoint_every_steps
