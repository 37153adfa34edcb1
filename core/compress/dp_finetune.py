"""``dp_finetune``: DP-SGD fine-tuning of the base model, no compression.

The baseline of every method (Mireshghallah et al. 2022; Abadi et al. 2016, Alg. 1):

    1. load the base model with a task head (mean-pooled classifier, or the LM head)
    2. tokenise the private rows
    2b. a classifier whose body will train: DP-SGD phase "probe" on the fresh head alone
       (linear probing, then fine-tuning: LP-FT, Kumar et al. 2022), on the frozen body's
       features computed once per row; ``training.probe_epochs``, ε share
       ``privacy.phase_split``. A resumed job whose probe finished reloads its head
    3. choose what trains — by default a classifier's head plus the body's biases and
       norms (BitFit), a causal LM's whole body; the word embedding too when
       ``embedding.mode`` is set — with per-group learning rates (fresh head ≫ body)
    4. DP-SGD for exactly the planned steps of phase "train" (q, σ, C from the plan);
       with ``embedding.mode`` fest/adafest only selected word-embedding rows are updated
    5. evaluate on the user's eval dataset, if named (non-private evaluation)
    6. save an HF folder + tokenizer into ``ctx.output_dir``

Privacy: only steps 2b and 4 read private rows, each through its engine, which reports
every logical step to ``ctx.hooks`` under its phase's name before it touches data; the
ledger composes the two phases with the accountant. The train loss in the metrics is
computed on private rows and flagged non-private.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.compress.base_model import load_base_model
from core.compress.report import evaluate_on_eval_set, phase_run_metrics
from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import load_snippet, save_model
from core.models.loading import Task
from core.privacy.embedding_frequencies import fest_rows
from core.privacy.engine import DPSGDEngine
from core.privacy.planner import plan_embedding_noise
from core.privacy.sparse_embedding import SparseEmbeddingUpdate
from core.recipe_api import JobContext, RecipeResult
from core.specs import FINETUNE_CLASSIFIER_BODY, EmbeddingSpec
from core.training.frozen_body import body_is_frozen, frozen_body_loss
from core.training.losses import (
    causal_lm_loss_per_example,
    classification_loss_per_example,
)
from core.training.optim import dp_optimizer, engine_config

PHASE, PROBE = "train", "probe"
PROBE_HEAD, PROBE_DONE = "head.safetensors", "probe.json"  # in ctx.work_dir / "probe"


def run(ctx: JobContext) -> RecipeResult:
    spec, training, hooks = ctx.spec, ctx.spec.training, ctx.hooks
    task = cast(Task, ctx.train.task)
    phase = ctx.plan.phase(PHASE)
    torch.manual_seed(training.seed)  # dropout; DP noise and sampling have their own RNGs

    # 1. base model + task head (new weights seeded by training.seed)
    loaded = load_base_model(ctx, task, phase=PHASE)
    model, tokenizer = loaded.model, loaded.tokenizer

    # 2. private rows → token ids (truncated to max_seq_length)
    uses_token_type_ids = getattr(model.config, "type_vocab_size", 0) > 0
    train_rows = encode_dataset(
        ctx.train, tokenizer, task=task, max_seq_length=training.max_seq_length,
        uses_token_type_ids=uses_token_type_ids,
    )  # fmt: skip

    # 2b. linear probe: DP-SGD of the fresh head alone (when the plan has the phase)
    has_probe = any(p.name == PROBE for p in ctx.plan.phases)
    probe_metrics = _linear_probe(ctx, model, train_rows) if has_probe else None

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
        "probe": probe_metrics,  # None: no linear-probe phase
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
        "non_private_metrics": ["train_loss", "samples_seen", "probe.train_loss",
                                "probe.samples_seen"],
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


def _linear_probe(ctx: JobContext, model: nn.Module, rows) -> dict:
    """Phase "probe": DP-SGD of the head alone, the body and word embedding frozen (the
    body's features cached per row, :mod:`core.training.frozen_body`), for
    ``training.probe_epochs`` (the plan's steps). Afterwards every parameter gets back the
    ``requires_grad`` it had. Returns the phase's metrics.

    Resume: the trained head and a marker go to ``work_dir/probe``; a restarted job whose
    probe finished loads that head instead of running (and charging) the phase again.
    """
    folder, phase = Path(ctx.work_dir) / PROBE, ctx.plan.phase(PROBE)
    if (folder / PROBE_DONE).exists():
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(folder / PROBE_HEAD)).items():
                named[name].copy_(value)
        return {**json.loads((folder / PROBE_DONE).read_text()), "reloaded": True}
    spec = ctx.spec
    probe_spec = spec.model_copy(update={  # head only: no body, no word embedding
        "training": spec.training.model_copy(update={"train_body": False}),
        "embedding": EmbeddingSpec(),
    })  # fmt: skip
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    opt = dp_optimizer(model, probe_spec, task="classification", classifier_body=False)
    engine = DPSGDEngine(
        model=model, optimizer=opt.optimizer, phase=phase, dataset=rows,
        loss_fn=frozen_body_loss(model, classification_loss_per_example),
        hooks=ctx.hooks, config=engine_config(probe_spec), device=ctx.device,
    )  # fmt: skip
    features_cached = body_is_frozen(model)
    result = engine.run()
    head = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    metrics = {
        **phase_run_metrics(result, planned=phase.steps),
        "epochs": spec.training.linear_probe_epochs(method="dp_finetune",
                                                    task="classification"),
        "sample_rate": phase.sample_rate,
        "noise_multiplier": phase.noise_multiplier,
        "head_learning_rate": opt.head_learning_rate,
        "trainable_parameters": opt.trainable_parameters,
        "frozen_body_features_cached": features_cached,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(head, str(folder / PROBE_HEAD))
    tmp = folder / f".{PROBE_DONE}.tmp"
    tmp.write_text(json.dumps(metrics))
    tmp.replace(folder / PROBE_DONE)
    return metrics


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

