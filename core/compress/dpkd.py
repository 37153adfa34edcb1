"""``dpkd``: DP knowledge distillation (Mireshghallah et al. 2022, Alg. 1).

    1. the teacher:
       a. if the plan has a "teacher" phase: DP-SGD fine-tune the base model with its task
          head (phase "teacher"), and save it in the job's work dir — a resumed job whose
          teacher phase finished reloads it instead of training (and charging) again;
       b. otherwise ``model.base = job:<id>`` already is a DP teacher trained on this
          dataset (that job's ledger holds its ε): load it
    2. the student: ``compression.student_layers`` layers copied from evenly spaced layers
       of the DP teacher, with its embeddings and head (post-processing, no privacy cost);
       or of the pre-trained base (``compression.student_init = "pretrained"``). A causal
       LM may instead keep all but the contiguous block of layers whose ends are most alike
       on texts sampled from the DP teacher (``compression.student_layer_selection``)
    3. DP-SGD phase "student" on the private rows with the per-example loss
         ℓ_i = (1 − α)·CE(y_i, s_i) + α·T²·KL(softmax(t_i/T) ‖ softmax(s_i/T))
       (teacher in eval mode under no_grad; ghost clipping wraps the [B] vector)
       A classifier trains only its head in both phases unless ``training.train_body``
       is set (measured best, core.training.optim).
    4. evaluate teacher and student on the user's eval dataset, if named (non-private)
    5. save the student as an HF folder; report size and latency next to the teacher (the
       dense base architecture)

Privacy: the two DP-SGD phases read private rows, each through its own engine, which
reports every logical step to ``ctx.hooks`` under the phase's name; the ledger composes
the two phases with the accountant (not by adding their ε).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors
from torch import nn

from core.compress.base_model import load_base_model
from core.compress.causal_distill import BLOCK_SELECTION_TEXTS, student_layers
from core.compress.distill import evenly_spaced_layers, make_kd_loss
from core.compress.pruning import encoder_anatomy, shrink_model
from core.compress.report import (
    compression_report,
    eval_metrics,
    evaluate_on_eval_set,
    phase_run_metrics,
)
from core.compress.synthetic import generate_synthetic
from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import (
    apply_tied_weights_policy,
    load_snippet,
    save_model,
)
from core.models.loading import Task
from core.privacy.engine import DPSGDEngine, PhaseResult
from core.recipe_api import JobContext, RecipeResult
from core.training.frozen_body import FrozenBodyView, frozen_body_loss, frozen_body_view
from core.training.losses import causal_lm_loss_per_example, classification_loss_per_example
from core.training.optim import COMPRESSION_CLASSIFIER_BODY as CLASSIFIER_BODY
from core.training.optim import body_training, dp_optimizer, engine_config

TEACHER, STUDENT = "teacher", "student"
# What trains by default (a classifier: only its head, measured best for this recipe) and
# the learning rates: core.training.optim, shared with dp_finetune.
TEACHER_WEIGHTS, TEACHER_DONE = "model.safetensors", "teacher.json"


def run(ctx: JobContext) -> RecipeResult:
    spec, training, comp = ctx.spec, ctx.spec.training, ctx.spec.compression
    task = cast(Task, ctx.train.task)
    phases = {p.name for p in ctx.plan.phases}
    layer_selection = comp.student_layer_selection or "evenly_spaced"
    if layer_selection == "similar_block" and task != "causal_lm":
        raise InvalidRequest(
            "compression.student_layer_selection='similar_block' compares layers on text "
            "sampled from the DP teacher, so it needs a causal LM; a classifier's student "
            "copies evenly spaced layers",
            param="compression.student_layer_selection",
        )
    torch.manual_seed(training.seed)  # dropout; DP noise and sampling have their own RNGs

    # 1. the DP teacher (trained here, reloaded after a restart, or an earlier DP job's)
    loaded = load_base_model(ctx, task, phase=TEACHER)
    teacher: Any = loaded.model  # an HF model (mypy: its .to() wrapper is mistyped)
    tokenizer = loaded.tokenizer
    layers = len(cast(nn.ModuleList, teacher.get_submodule(encoder_anatomy(teacher).layers)))
    copied = evenly_spaced_layers(layers, comp.student_layers)  # validates before any step
    uses_token_type_ids = getattr(teacher.config, "type_vocab_size", 0) > 0
    train_rows = encode_dataset(
        ctx.train, tokenizer, task=task, max_seq_length=training.max_seq_length,
        uses_token_type_ids=uses_token_type_ids,
    )  # fmt: skip
    teacher_dir = Path(ctx.work_dir) / TEACHER
    teacher_metrics: dict | None = None  # None: no teacher phase in this job
    # the teacher body's features, once per row: in its phase when its body is frozen there,
    # and for its logits in the student phase (make_kd_loss freezes it)
    teacher_view = frozen_body_view(teacher)
    if TEACHER not in phases:
        teacher_source = f"{spec.model.base} (already DP-trained on this dataset; not charged)"
    elif (teacher_dir / TEACHER_DONE).exists():
        load_safetensors(teacher, str(teacher_dir / TEACHER_WEIGHTS), strict=True)
        teacher_metrics = json.loads((teacher_dir / TEACHER_DONE).read_text())
        teacher_source = "reloaded: the teacher phase finished in an earlier attempt"
    else:
        result = _dp_sgd(
            ctx, teacher, train_rows, TEACHER,
            classification_loss_per_example if task == "classification"
            else causal_lm_loss_per_example, view=teacher_view,
        )  # fmt: skip
        teacher_metrics = phase_run_metrics(result)
        _save_teacher(teacher, teacher_dir, teacher_metrics)
        teacher_source = "DP-SGD fine-tuned base (phase teacher)"
    teacher.to(ctx.device).eval()

    # 2. the student: layers of the teacher (or of the pre-trained base), evenly spaced or
    #    all but the most similar block on texts sampled from the DP teacher (post-processing)
    if layer_selection == "similar_block":
        samples = generate_synthetic(
            teacher, tokenizer, controls=[None] * BLOCK_SELECTION_TEXTS,
            max_new_tokens=spec.synthetic.max_new_tokens, seed=training.seed, device=ctx.device,
        )  # fmt: skip
        copied = student_layers(
            teacher, comp.student_layers, selection=layer_selection, synthetic=samples,
            tokenizer=tokenizer, max_seq_length=training.max_seq_length, device=ctx.device,
        )  # fmt: skip
    if comp.student_init == "teacher":
        source = teacher
    else:  # the pre-trained base again (its load notes are already the teacher's events)
        source = load_base_model(ctx, task, phase=None).model
    student = shrink_model(source, keep_layers=copied).to(ctx.device)
    for p in student.parameters():  # not the teacher's training flags: a fresh start
        p.requires_grad_(True)
    apply_tied_weights_policy(student, spec.model.tied_weights)

    # 3. DP-SGD on the private rows with the distillation loss
    kd_loss = make_kd_loss(teacher, alpha=spec.distill.alpha, temperature=spec.distill.temperature,
                           cache_teacher_logits=task == "classification",
                           teacher_forward=teacher_view)  # fmt: skip
    student_result = _dp_sgd(ctx, student, train_rows, STUDENT, kd_loss)
    student.eval()

    # 4. evaluation on the user's eval dataset (non-private, flagged)
    teacher_eval = evaluate_on_eval_set(ctx, teacher, tokenizer)
    student_eval = evaluate_on_eval_set(ctx, student, tokenizer)

    # 5. the artifact: the student's HF folder; the report next to the dense teacher
    save_model(student.cpu(), tokenizer, ctx.output_dir)
    report = compression_report(student, teacher, output_dir=ctx.output_dir,
                                seq_len=training.max_seq_length)  # fmt: skip
    student_phase = ctx.plan.phase(STUDENT)
    metrics = {
        "task": task,
        "phases": {
            TEACHER: teacher_metrics,
            STUDENT: phase_run_metrics(student_result),
        },
        "steps": student_result.last_step,
        "planned_steps": student_phase.steps,
        "train_loss": student_result.train_loss,
        "teacher": teacher_source,
        "teacher_layers": layers,
        "student_layers": comp.student_layers,
        "student_init": comp.student_init,
        "copied_layers": copied,
        "student_layer_selection": layer_selection,
        "alpha": spec.distill.alpha,
        "temperature": spec.distill.temperature,
        "pooling": loaded.pooling,
        "train_body": body_training(spec, task=task, classifier_body=CLASSIFIER_BODY),
        **report,
        **eval_metrics(student_eval),
        **eval_metrics(teacher_eval, prefix="teacher_eval"),
        "non_private_metrics": ["train_loss", "phases"],
    }
    card = {
        "method": "dpkd",
        "base_model": spec.model.base,
        "pooling": loaded.pooling,
        "student_layers": comp.student_layers,
        "load": load_snippet(task, loaded.pooling),
    }
    return RecipeResult(metrics=metrics, model_card_extra=card)


def _dp_sgd(
    ctx: JobContext, model, rows, phase_name: str, loss_fn, view: FrozenBodyView | None = None
) -> PhaseResult:
    """Exactly the planned steps of DP phase ``phase_name`` on ``model`` (per-group lr); a
    frozen body's features are computed once per row (:mod:`core.training.frozen_body`),
    in ``view`` when given."""
    optimizer = dp_optimizer(
        model, ctx.spec, task=ctx.train.task, classifier_body=CLASSIFIER_BODY
    ).optimizer
    engine = DPSGDEngine(
        model=model,
        optimizer=optimizer,
        phase=ctx.plan.phase(phase_name), dataset=rows,
        loss_fn=frozen_body_loss(model, loss_fn, view), hooks=ctx.hooks,
        config=engine_config(ctx.spec),
        device=ctx.device,
    )  # fmt: skip
    return engine.run()


def _save_teacher(teacher, folder: Path, metrics: dict) -> None:
    """Weights (safetensors), then the marker that says the teacher phase is complete."""
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(teacher, str(folder / TEACHER_WEIGHTS))
    tmp = folder / f".{TEACHER_DONE}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(folder / TEACHER_DONE)



