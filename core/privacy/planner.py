"""The job planner: turn a job spec and the dataset size into a privacy plan (DESIGN §2, §4, §5).

Every DP phase gets its σ here, before anything runs; the API reserves the plan's composed ε
against the dataset cap. Pure maths on top of :mod:`core.privacy.accounting`.
"""

from __future__ import annotations

import math

from core.errors import ValidationFailed
from core.privacy.accounting import (
    DpEvent,
    PhaseShape,
    accountant_info,
    compose_epsilon,
    independent_epsilon,
    plan_noise_split,
)
from core.privacy.plan import PhasePlan, PrivacyPlan
from core.specs import JobSpec

# Default ε share of the first private phase in two-phase methods (``privacy.phase_split``).
# dpkd: the DP teacher and the DP student both learn from the private rows; Mireshghallah
# et al. split the budget evenly.
DPKD_TEACHER_SHARE = 0.5
# distildp: the control-code histogram is one Gaussian release of N counts (sensitivity 1);
# 5 % of ε is enough noise-wise for it, and the DP-SGD teacher keeps 95 %.
DISTILDP_TEACHER_SHARE = 0.95
HISTOGRAM_SENSITIVITY = 1.0  # one control code per row, add/remove adjacency ⇒ L2 sensitivity 1

# Throughput for estimate_seconds, samples/s at sequence length 64 (DESIGN §8, 2 CPU threads).
DP_SAMPLES_PER_S = {"minilm": 40.0, "smollm": 1.6, "tiny": 2000.0}
NON_PRIVATE_SPEEDUP = 1.6  # SmolLM distillation on synthetic text vs its DP-SGD (2.6 vs 1.6)
GENERATION_TOKENS_PER_S = {"minilm": 131.0, "smollm": 131.0, "tiny": 5000.0}
REFERENCE_SEQ_LENGTH = 64
STARTUP_SECONDS = 30.0  # load the model, tokenise, write the artifact


def plan_job(spec: JobSpec, *, num_records: int, teacher_precharged: bool = False) -> PrivacyPlan:
    """Plan σ of every DP phase of ``spec`` on a dataset of N = ``num_records`` rows.

    δ = ``privacy.delta`` or 1/(10·N); q = min(1, batch/N); T = max(1, ⌈epochs·N/batch⌉).
    Two-phase methods split ε by ``privacy.phase_split`` (see
    :func:`core.privacy.accounting.plan_noise_split`); the composed ε never exceeds the target.

    Args:
        spec: the validated job spec.
        num_records: N, rows of the training dataset.
        teacher_precharged: dpkd from ``model.base = job:<id>`` whose DP teacher was already
            charged by that job: only the student phase is planned.

    Raises:
        ValidationFailed: δ ≥ 1/N, or an empty dataset.
        InvalidRequest: the target ε is unreachable.
    """
    delta = _resolve_delta(spec.privacy.delta, num_records)
    names, shapes, shares = _phases(spec, num_records, teacher_precharged)
    accountant = spec.privacy.accountant
    sigmas = plan_noise_split(
        epsilon=spec.privacy.epsilon,
        delta=delta,
        phases=shapes,
        shares=shares,
        accountant=accountant,
    )
    events = [shape.with_noise(sigma) for shape, sigma in zip(shapes, sigmas, strict=True)]
    phases = [
        _phase_plan(spec, name, event, num_records, delta)
        for name, event in zip(names, events, strict=True)
    ]
    return PrivacyPlan(
        accountant=accountant,
        accountant_version=accountant_info(accountant)["version"],
        delta=delta,
        epsilon=compose_epsilon(events, delta=delta, accountant=accountant),
        epsilon_independent=independent_epsilon(events, delta=delta),
        phases=phases,
    )


def sample_rate_and_steps(spec: JobSpec, num_records: int) -> tuple[float, int]:
    """q = min(1, batch/N) and T = max(1, ⌈epochs·N/batch⌉) of a DP-SGD phase."""
    batch = spec.training.batch_size
    epochs_in_steps = spec.training.epochs * num_records / batch
    steps = max(1, math.ceil(epochs_in_steps - 1e-9))  # 0.1·2560/256 is 1.0000000000000002
    return min(1.0, batch / num_records), steps


def estimate_seconds(spec: JobSpec, num_records: int) -> float:
    """Rough wall time of the job on 2 CPU threads, from DESIGN §8 throughputs.

    Each DP-SGD phase processes epochs·N samples at the base model's DP throughput, scaled
    linearly with max_seq_length / 64 (dpkd's student is counted at the teacher's speed: an
    upper bound). distildp adds sampling the synthetic texts and the non-private student.
    Unknown bases (``job:<id>``, Hugging Face ids) count as MiniLM.
    """
    family = _model_family(spec.model.base)
    seq_scale = spec.training.max_seq_length / REFERENCE_SEQ_LENGTH
    dp_phase = spec.training.epochs * num_records / DP_SAMPLES_PER_S[family] * seq_scale
    seconds = STARTUP_SECONDS + dp_phase
    if spec.method == "dpkd":
        seconds += dp_phase
    if spec.method == "distildp":
        synthetic = spec.synthetic.num_samples
        seconds += synthetic * spec.synthetic.max_new_tokens / GENERATION_TOKENS_PER_S[family]
        seconds += dp_phase * synthetic / num_records / NON_PRIVATE_SPEEDUP
    return seconds


def _resolve_delta(delta: float | None, num_records: int) -> float:
    if num_records < 1:
        raise ValidationFailed([{"param": "dataset_id", "message": "the dataset has no records"}])
    if delta is None:
        return 1.0 / (10 * num_records)
    if delta >= 1.0 / num_records:
        message = (
            f"δ = {delta:g} must be < 1/N = {1 / num_records:.3g} for N = {num_records} records "
            f"(a larger δ allows releasing a whole record); use at most "
            f"{1 / (10 * num_records):.3g} or leave it unset"
        )
        raise ValidationFailed([{"param": "privacy.delta", "message": message}])
    return delta


def _phases(
    spec: JobSpec, num_records: int, teacher_precharged: bool
) -> tuple[list[str], list[PhaseShape], list[float]]:
    """Names, shapes and ε shares of the job's DP phases."""
    q, steps = sample_rate_and_steps(spec, num_records)
    dp_sgd = PhaseShape("poisson_gaussian", q, steps)
    split = spec.privacy.phase_split
    if spec.method == "dpkd":
        if teacher_precharged:
            return ["student"], [dp_sgd], [1.0]
        teacher = split or DPKD_TEACHER_SHARE
        return ["teacher", "student"], [dp_sgd, dp_sgd], [teacher, 1 - teacher]
    if spec.method == "distildp":
        teacher = split or DISTILDP_TEACHER_SHARE
        histogram = PhaseShape("gaussian", 1.0, 1)
        return ["teacher", "histogram"], [dp_sgd, histogram], [teacher, 1 - teacher]
    return ["train"], [dp_sgd], [1.0]


def _phase_plan(
    spec: JobSpec, name: str, event: DpEvent, num_records: int, delta: float
) -> PhasePlan:
    dp_sgd = event.mechanism == "poisson_gaussian"
    return PhasePlan(
        name=name,
        mechanism=event.mechanism,
        sample_rate=event.sample_rate,
        noise_multiplier=event.noise_multiplier,
        steps=event.steps,
        max_grad_norm=spec.privacy.max_grad_norm if dp_sgd else None,
        sensitivity=spec.privacy.max_grad_norm if dp_sgd else HISTOGRAM_SENSITIVITY,
        epsilon=compose_epsilon([event], delta=delta, accountant=spec.privacy.accountant),
        batch_size=min(spec.training.batch_size, num_records) if dp_sgd else None,
    )


def _model_family(base: str) -> str:
    if base.startswith("tiny:"):
        return "tiny"
    return "smollm" if "smollm" in base.lower() else "minilm"
