"""``dp_finetune``: DP-SGD fine-tuning of the base model, no compression.

The baseline of every method (Mireshghallah et al. 2022; Abadi et al. 2016, Alg. 1):

    1. load the base model with a task head (mean-pooled classifier, or the LM head)
    2. tokenise the private rows
    3. choose what trains — by default a classifier's head plus the body's biases and
       norms (BitFit), a causal LM's whole body; the word embedding too when
       ``embedding.mode`` is set — with per-group learning rates (fresh head ≫ body)
    4. DP-SGD for exactly the planned steps of phase "train" (q, σ, C from the plan);
       with ``embedding.mode`` fest/adafest only selected word-embedding rows are updated
    5. evaluate on the user's eval dataset, if named (non-private evaluation)
    6. save an HF folder + tokenizer into ``ctx.output_dir``

Privacy: only step 4 reads private rows, through the engine, which reports every logical
step to ``ctx.hooks`` before it touches data. The train loss in the metrics is computed
on private rows and flagged non-private.
"""

from __future__ import annotations

from typing import cast

import torch

from core.compress.report import evaluate_on_eval_set, phase_run_metrics
from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import load_model, load_snippet, save_model
from core.models.loading import Task
from core.privacy.embedding_frequencies import fest_rows
from core.privacy.engine import DPSGDEngine
from core.privacy.planner import plan_embedding_noise
from core.privacy.sparse_embedding import SparseEmbeddingUpdate
from core.recipe_api import JobContext, RecipeResult
from core.training.frozen_body import body_is_frozen, frozen_body_loss
from core.training.losses import (
    causal_lm_loss_per_example,
    classification_loss_per_example,
)
from core.training.optim import FINETUNE_CLASSIFIER_BODY, dp_optimizer, engine_config

PHASE = "train"


def run(ctx: JobContext) -> RecipeResult:
    spec, training, hooks = ctx.spec, ctx.spec.training, ctx.hooks
    task = cast(Task, ctx.train.task)
    phase = ctx.plan.phase(PHASE)
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

    # 3. what trains (core.training.optim), per-group lr: body vs freshly initialised head
    opt = dp_optimizer(model, spec, task=task, classifier_body=FINETUNE_CLASSIFIER_BODY)

    # 3b. embedding.mode fest / adafest: row-sparse embedding updates (accounted at σ)
    sparse = _setup_sparse_embedding(ctx, model, tokenizer, phase.noise_multiplier)

    # 4. DP-SGD: exactly the planned logical steps, Poisson sampling with q from the plan
    engine = DPSGDEngine(
        model=model,
        optimizer=opt.optimizer,
        phase=phase,
        dataset=train_rows,
        loss_fn=frozen_body_loss(  # a frozen body's features are computed once per row
            model,
            classification_loss_per_example
            if task == "classification"
            else causal_lm_loss_per_example,
        ),
        hooks=hooks,
        config=engine_config(spec),
        device=ctx.device,
        sparse_embedding=sparse,
    )
    result = engine.run()
    model.eval()

    # 5. evaluation on the user's separate eval dataset (non-private, flagged)
    eval_metrics = evaluate_on_eval_set(ctx, model, tokenizer)

    # 6. the artifact: a plain HF folder (no Opacus prefixes) + tokenizer
    save_model(model.cpu(), tokenizer, ctx.output_dir)

    metrics = {
        "task": task,
        "phase": PHASE,
        **phase_run_metrics(result, planned=phase.steps),
        "samples_per_second": (  # of this attempt
            round(result.samples_this_attempt / result.seconds, 3) if result.seconds else None
        ),
        "sample_rate": phase.sample_rate,
        "noise_multiplier": phase.noise_multiplier,
        "max_grad_norm": phase.max_grad_norm,
        "expected_batch_size": engine.expected_batch_size,
        "grad_sample_mode": training.grad_sample_mode,
        "learning_rate": opt.learning_rate,
        "head_learning_rate": opt.head_learning_rate,
        "train_body": opt.train_body,
        "frozen_body_features_cached": body_is_frozen(model),
        "pooling": loaded.pooling,
        "trainable_parameters": opt.trainable_parameters,
        "non_private_metrics": ["train_loss", "samples_seen"],
        "embedding_mode": (  # fest/adafest on a frozen (tied) embedding run as "frozen"
            "frozen"
            if not model.get_input_embeddings().weight.requires_grad
            else spec.embedding.effective_mode(opt.train_body)
        ),
        "embedding_clip_share": (  # ρ of group-wise clipping; None: flat clipping
            engine.group_clipping.share if engine.group_clipping is not None else None
        ),
        "seconds_per_step": (
            round(result.seconds / result.steps_run, 4) if result.steps_run else None
        ),
    }
    if sparse is not None:
        metrics["embedding"] = {
            **sparse.metrics(),
            "noise_multiplier": sparse.noise.noise_multiplier,
            "gradient_noise_multiplier": sparse.gradient_noise_multiplier,
            "selection_noise_multiplier": sparse.noise.selection_noise_multiplier,
            "selection_threshold": sparse.noise.threshold,
            "noise_ratio": sparse.noise.noise_ratio,
            "fest_top_k": sparse.noise.fest_top_k,
            "fest_rows_source": getattr(sparse, "rows_source", None),
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


def _setup_sparse_embedding(
    ctx: JobContext, model, tokenizer, noise_multiplier: float
) -> SparseEmbeddingUpdate | None:
    """The FEST / AdaFEST update of the word embedding, or None (dense, frozen).

    σ_grad, σ_sel and τ come from :func:`plan_embedding_noise` at the plan's σ; the phase
    stays accounted as DP-SGD at σ (see :mod:`core.privacy.sparse_embedding`). FEST rows
    come from a PUBLIC ranking only (:mod:`core.privacy.embedding_frequencies`). A frozen
    embedding (tied to the LM head with ``model.tied_weights="freeze"``) has nothing to
    update: the phase runs as "frozen" at σ
    and an ``embedding.sparse_skipped`` event says so.
    """
    emb_spec = ctx.spec.embedding
    noise = plan_embedding_noise(ctx.spec, noise_multiplier)
    if noise is None:
        return None
    weight = model.get_input_embeddings().weight
    if not weight.requires_grad:
        ctx.hooks.event(
            "embedding.sparse_skipped",
            {"phase": PHASE, "mode": emb_spec.mode, "effective_mode": "frozen",
             "message": "the word embedding is frozen (tied to the LM head with "
             "model.tied_weights='freeze'); set model.tied_weights='untie' to train it "
             "sparsely"},
        )  # fmt: skip
        return None
    rows, source = None, None
    if noise.mode == "fest":
        try:
            rows, source = fest_rows(
                public_rows=emb_spec.fest_public_rows, tokenizer=tokenizer,
                num_rows=int(weight.shape[0]), top_k=int(noise.fest_top_k or 1),
            )  # fmt: skip
        except ValueError as e:
            raise InvalidRequest(str(e), param="embedding.fest_public_rows") from e
    sparse = SparseEmbeddingUpdate(weight=weight, noise=noise, fest_rows=rows, seed=None)
    sparse.rows_source = source  # type: ignore[attr-defined]
    ctx.hooks.event(
        "embedding.sparse",
        {"phase": PHASE, "mode": noise.mode, "noise_multiplier": noise.noise_multiplier,
         "gradient_noise_multiplier": noise.gradient_noise_multiplier,
         "selection_noise_multiplier": noise.selection_noise_multiplier,
         "selection_threshold": noise.threshold, "fest_top_k": noise.fest_top_k,
         "fest_rows_source": source, "rows_total": int(weight.shape[0])},
    )  # fmt: skip
    return sparse

