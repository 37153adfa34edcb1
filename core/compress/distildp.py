"""``distildp``: DP distillation through synthetic text (Flemings & Annavaram 2024).

    1. phase "teacher": DP-SGD fine-tune the causal-LM base on the private rows, each
       prefixed with its control code (``"[code] text"``) when the dataset has codes;
       saved in the job's work dir — a restarted job reloads it instead of training (and
       charging) again
    2. phase "histogram": release the control-code counts with the Gaussian mechanism
       (σ_h from the plan, sensitivity 1), clip at 0, normalise → sampling distribution;
       one charged step, done once (the noisy histogram is stored and reused on restart)
    3. synthetic text (post-processing): ``synthetic.num_samples`` codes drawn from the
       noisy histogram, each prompt = the code prefix, sampled from the DP teacher with
       top-k 50, top-p 0.9, no repeated 2-grams; kept in the job's work dir only
    4. the student (post-processing): ``compression.student_layers`` teacher layers — all
       but the contiguous block whose ends' hidden states are most alike on the synthetic
       text (``compression.student_layer_selection``, default) or evenly spaced ones —
       trained with plain AdamW on the synthetic set ONLY with
         (1 − λ)·CE + λ·τ²·KL(teacher ‖ student) + MSE(W·h_S, h_T)
    5. perplexity of teacher and student on the user's eval dataset (non-private
       evaluation), the student saved as an HF causal-LM folder

λ, τ: the paper's 0.4 and 1.0 unless the job spec sets ``distill.alpha`` /
``distill.temperature`` explicitly (``DistillSpec``'s own defaults, 0.5 / 2.0, are dpkd's).

Privacy: only steps 1 and 2 read private rows, each charged through ``ctx.hooks`` before
it touches data; the raw counts of step 2 never leave :func:`release_control_histogram`.
Steps 3-5 see only DP outputs (teacher weights, noisy histogram) and the public eval set.
A dataset without control codes releases no histogram: its plan has no histogram phase
and the teacher gets the whole ε.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from core.compress.base_model import load_base_model
from core.compress.causal_distill import (
    StudentTraining,
    student_layers,
    train_student_on_synthetic,
)
from core.compress.distill import evenly_spaced_layers
from core.compress.pruning import encoder_anatomy, shrink_model
from core.compress.report import (
    compression_report,
    eval_metrics,
    evaluate_on_eval_set,
    phase_run_metrics,
)
from core.compress.synthetic import (
    GENERATION_BATCH_SIZE,
    NoisyHistogram,
    SyntheticSet,
    generate_synthetic,
    release_control_histogram,
    sample_control_codes,
)
from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import load_snippet, save_model
from core.privacy.engine import DPSGDEngine
from core.recipe_api import JobContext, RecipeResult
from core.specs import DistillSpec
from core.training.losses import causal_lm_loss_per_example
from core.training.optim import dp_optimizer, engine_config

TEACHER, HISTOGRAM = "teacher", "histogram"
PAPER_ALPHA, PAPER_TEMPERATURE = 0.4, 1.0  # λ, τ of Flemings & Annavaram 2024
TEACHER_WEIGHTS, TEACHER_DONE = "model.safetensors", "teacher.json"
HISTOGRAM_FILE, SYNTHETIC_FILE = "histogram.json", "synthetic.jsonl"


def run(ctx: JobContext) -> RecipeResult:
    spec, training, comp, hooks = ctx.spec, ctx.spec.training, ctx.spec.compression, ctx.hooks
    if ctx.train.task != "causal_lm":
        raise InvalidRequest(
            "distildp distils a causal LM; upload the dataset with task='causal_lm'",
            param="dataset_id",
        )
    alpha, temperature, weights_from = distillation_weights(spec.distill)
    torch.manual_seed(training.seed)  # dropout; DP noise and sampling have their own RNGs
    timings: dict[str, float] = {}

    # 1. the DP teacher: DP-SGD on "[code] text" (or reloaded after a restart)
    t0 = time.monotonic()
    loaded = load_base_model(ctx, "causal_lm", phase=TEACHER)
    teacher: Any = loaded.model  # PreTrainedModel (typed Any: HF's stubs are partial)
    tokenizer = loaded.tokenizer
    teacher_layers = len(teacher.get_submodule(encoder_anatomy(teacher).layers))
    evenly_spaced_layers(teacher_layers, comp.student_layers)  # validate before any step
    teacher_metrics = train_dp_teacher(ctx, teacher, tokenizer)
    teacher.to(ctx.device).eval()
    timings["teacher_seconds"] = round(time.monotonic() - t0, 3)

    # 2. the DP control-code histogram (Gaussian mechanism, one charged release)
    t0 = time.monotonic()
    histogram, histogram_info = release_histogram_once(ctx)
    timings["histogram_seconds"] = round(time.monotonic() - t0, 3)
    hooks.event("histogram.released", histogram_info)  # noisy (DP) values only
    # -- from here on nothing reads ctx.train: only DP outputs and the public eval set --

    # 3. synthetic text from the DP teacher, codes drawn from the noisy histogram
    t0 = time.monotonic()
    synthetic = synthesize_texts(ctx, teacher, tokenizer, histogram)
    timings["generation_seconds"] = round(time.monotonic() - t0, 3)

    # 4. the student: teacher layers chosen on the synthetic text, distilled on it only
    t0 = time.monotonic()
    layer_selection = comp.student_layer_selection or "similar_block"
    copied = student_layers(
        teacher, comp.student_layers, selection=layer_selection,
        synthetic=synthetic, tokenizer=tokenizer, max_seq_length=training.max_seq_length,
        device=ctx.device,
    )  # fmt: skip
    student: Any = shrink_model(teacher, keep_layers=copied)  # tied embeddings stay tied
    student_config = StudentTraining(
        alpha=alpha, temperature=temperature,
        epochs=spec.synthetic.student_epochs or training.epochs,
        batch_size=training.physical_batch_size, learning_rate=training.learning_rate,
        max_seq_length=training.max_seq_length, seed=training.seed,
    )  # fmt: skip
    hooks.event(
        "student.started",
        {
            "texts": len(synthetic),
            "alpha": alpha,
            "temperature": temperature,
            "copied_layers": copied,
            "layer_selection": layer_selection,
        },
    )
    student_result = train_student_on_synthetic(
        student, teacher, synthetic, tokenizer, config=student_config, device=ctx.device,
        on_step=lambda step, total, m: _student_progress(ctx, step, total, m),
    )  # fmt: skip
    timings["student_seconds"] = round(time.monotonic() - t0, 3)

    # 5. perplexity on the user's eval dataset (non-private evaluation); the artifact
    t0 = time.monotonic()
    teacher_eval = evaluate_on_eval_set(ctx, teacher, tokenizer)
    student_eval = evaluate_on_eval_set(ctx, student, tokenizer)
    timings["eval_seconds"] = round(time.monotonic() - t0, 3)
    save_model(student.cpu(), tokenizer, ctx.output_dir)
    report = compression_report(student, teacher, output_dir=ctx.output_dir,
                                seq_len=training.max_seq_length)  # fmt: skip
    metrics = {
        "task": "causal_lm",
        "phases": {TEACHER: teacher_metrics, HISTOGRAM: histogram_info},
        "histogram": histogram.to_dict() if histogram is not None else None,
        "synthetic_samples": len(synthetic),
        "synthetic_empty_texts": sum(1 for r in synthetic.rows if not r["text"]),
        "student": {
            "steps": student_result.steps,
            "first_loss": student_result.first_loss,
            "last_loss": student_result.last_loss,
            "mean_loss": student_result.mean_loss,
            "texts_per_second": student_result.texts_per_second,
            "trained_on": "synthetic text only (non-private AdamW)",
        },
        "teacher_layers": teacher_layers,
        "student_layers": comp.student_layers,
        "copied_layers": copied,
        "student_layer_selection": layer_selection,
        "alpha": alpha,
        "temperature": temperature,
        "distill_weights_from": weights_from,
        "teacher_parameters": report["base_parameters"],
        "student_parameters": report["parameters"],
        **report,
        **eval_metrics(student_eval),
        **eval_metrics(teacher_eval, prefix="teacher_eval"),
        "timings": timings,
        "non_private_metrics": ["phases"],  # the teacher's train loss: on private rows
    }
    card = {
        "method": "distildp",
        "base_model": spec.model.base,
        "student_layers": comp.student_layers,
        "trained_on": "synthetic text sampled from a DP-SGD teacher (control codes from a "
        "DP histogram)",
        "load": load_snippet("causal_lm", None),
    }
    return RecipeResult(metrics=metrics, model_card_extra=card)


def distillation_weights(distill: DistillSpec) -> tuple[float, float, dict[str, str]]:
    """(λ, τ, where each came from): a value the job spec sets explicitly wins; otherwise
    the paper's λ = 0.4, τ = 1 (``DistillSpec``'s defaults 0.5 / 2.0 are dpkd's)."""
    given = distill.model_fields_set
    alpha = distill.alpha if "alpha" in given else PAPER_ALPHA
    temperature = distill.temperature if "temperature" in given else PAPER_TEMPERATURE
    sources = {
        "alpha": "spec" if "alpha" in given else "distildp default",
        "temperature": "spec" if "temperature" in given else "distildp default",
    }
    return alpha, temperature, sources


def train_dp_teacher(ctx: JobContext, teacher, tokenizer) -> dict:
    """Phase "teacher": DP-SGD on the private rows, exactly the planned steps.

    The encoded private rows live only inside this function. A teacher finished by an
    earlier attempt is reloaded from ``work_dir/teacher`` (no step, no charge).
    """
    folder = Path(ctx.work_dir) / TEACHER
    if (folder / TEACHER_DONE).exists():
        load_safetensors(teacher, str(folder / TEACHER_WEIGHTS), strict=True)
        return {**json.loads((folder / TEACHER_DONE).read_text()), "reloaded": True}
    spec, training = ctx.spec, ctx.spec.training
    private_rows = encode_dataset(
        ctx.train, tokenizer, task="causal_lm", max_seq_length=training.max_seq_length
    )  # "[code] text" + EOS, as core.data.format_causal_text writes it
    engine = DPSGDEngine(
        model=teacher,
        optimizer=dp_optimizer(teacher, spec, task="causal_lm", classifier_body=True).optimizer,
        phase=ctx.plan.phase(TEACHER), dataset=private_rows,
        loss_fn=causal_lm_loss_per_example, hooks=ctx.hooks,
        config=engine_config(spec),
        device=ctx.device,
    )  # fmt: skip
    result = engine.run()
    metrics = phase_run_metrics(result, planned=ctx.plan.phase(TEACHER).steps)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(teacher, str(folder / TEACHER_WEIGHTS))
    tmp = folder / f".{TEACHER_DONE}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(folder / TEACHER_DONE)  # the marker last: weights are complete
    return metrics


def release_histogram_once(ctx: JobContext) -> tuple[NoisyHistogram | None, dict]:
    """Phase "histogram": one Gaussian release of the control-code counts, charged before
    the counts are read, stored in ``work_dir/histogram.json`` and reused on restart.

    Returns:
        (the noisy histogram or None when nothing is released, a metrics dict of DP /
        public values only).
    """
    hooks = ctx.hooks
    # Schema, not counts: uploads require a code on every row or on none
    # (core.uploads), and the planner gives such datasets no histogram phase.
    if not any(p.name == HISTOGRAM for p in ctx.plan.phases):
        return None, {"released": False, "charged": False,
                      "reason": "the dataset has no control codes: nothing to release, "
                      "synthetic text is sampled unprompted"}  # fmt: skip
    phase = ctx.plan.phase(HISTOGRAM)
    stored = Path(ctx.work_dir) / HISTOGRAM_FILE
    info = {"mechanism": phase.mechanism, "noise_multiplier": phase.noise_multiplier,
            "sensitivity": phase.sensitivity}  # fmt: skip
    if stored.exists():  # released and charged by an earlier attempt
        hooks.begin_phase(HISTOGRAM, resumed_step=1)
        histogram = NoisyHistogram.from_dict(json.loads(stored.read_text()))
        return histogram, {**info, "released": True, "reloaded": True}
    last = hooks.begin_phase(HISTOGRAM, resumed_step=0)
    if last < 1:  # an earlier attempt was charged but died before storing its release
        return None, {**info, "released": False, "charged": True,
                      "reason": "the release was charged by a crashed attempt and lost; "
                      "control codes are sampled uniformly instead"}  # fmt: skip
    hooks.before_step(HISTOGRAM, 1)  # charges ε (or raises on cancel) BEFORE the counts
    histogram = release_control_histogram(
        ctx.train.rows, noise_multiplier=phase.noise_multiplier, sensitivity=phase.sensitivity
    )
    tmp = stored.with_suffix(".json.tmp")
    stored.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(histogram.to_dict()))
    tmp.replace(stored)
    hooks.after_step(HISTOGRAM, 1, {"codes": float(len(histogram.codes))})
    return histogram, {**info, "released": True, "charged": True}


def synthesize_texts(
    ctx: JobContext, teacher, tokenizer, histogram: NoisyHistogram | None
) -> SyntheticSet:
    """``synthetic.num_samples`` texts from the DP teacher into ``work_dir/synthetic.jsonl``
    (reused when a restarted job already wrote them all). Post-processing: reads no row."""
    num, path = ctx.spec.synthetic.num_samples, Path(ctx.work_dir) / SYNTHETIC_FILE
    if path.exists():
        synthetic = SyntheticSet.load_jsonl(path)
        if len(synthetic) == num:
            return synthetic
    gen = torch.Generator().manual_seed(ctx.spec.training.seed)
    if histogram is None or not histogram.codes:
        controls: list[str | None] = [None] * num
    else:
        controls = list(sample_control_codes(histogram, num, generator=gen))
    ctx.hooks.event(
        "synthetic.started",
        {
            "total": num,
            "batch_size": GENERATION_BATCH_SIZE,
            "max_new_tokens": ctx.spec.synthetic.max_new_tokens,
        },
    )
    synthetic = generate_synthetic(
        teacher, tokenizer, controls=controls,
        max_new_tokens=ctx.spec.synthetic.max_new_tokens, seed=ctx.spec.training.seed,
        device=ctx.device, on_progress=lambda p: ctx.hooks.event("synthetic.progress", p),
    )  # fmt: skip
    synthetic.save_jsonl(path)
    return synthetic


def _student_progress(ctx: JobContext, step: int, total: int, metrics: dict) -> None:
    if step == 1 or step == total or step % 20 == 0:
        ctx.hooks.event("student.progress", {"step": step, "total_steps": total, **metrics})



