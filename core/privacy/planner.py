"""The job planner: turn a job spec and the dataset size into a privacy plan (DESIGN §2, §4, §5).

Every DP phase gets its σ here, before anything runs; the API reserves the plan's composed ε
against the dataset cap. Pure maths on top of :mod:`core.privacy.accounting`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.errors import InvalidRequest, ValidationFailed
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
# dp_finetune's linear probe (head only, training.probe_epochs) before fine-tuning: a quarter
# of ε (MiniLM-L6, SST-2 8,192 rows, ε = 8: probe alone 80.0 %, then fine-tuning 82.7 %).
DP_FINETUNE_PROBE_SHARE = 0.25
HISTOGRAM_SENSITIVITY = 1.0  # one control code per row, add/remove adjacency ⇒ L2 sensitivity 1

# Throughput for estimate_seconds, samples/s at sequence length 64 (DESIGN §8, 2 CPU threads).
DP_SAMPLES_PER_S = {"minilm": 40.0, "smollm": 1.6, "tiny": 2000.0}
NON_PRIVATE_SPEEDUP = 1.6  # SmolLM distillation on synthetic text vs its DP-SGD (2.6 vs 1.6)
GENERATION_TOKENS_PER_S = {"minilm": 131.0, "smollm": 131.0, "tiny": 5000.0}
REFERENCE_SEQ_LENGTH = 64
STARTUP_SECONDS = 30.0  # load the model, tokenise, write the artifact


def plan_job(spec: JobSpec, *, num_records: int, task: str = "classification",
             teacher_precharged: bool = False, has_control_codes: bool = True) -> PrivacyPlan:
    """Plan σ of every DP phase of ``spec`` on a dataset of N = ``num_records`` rows.

    δ = ``privacy.delta`` or 1/(10·N); q = min(1, batch/N); T = max(1, ⌈epochs·N/batch⌉).
    Two-phase methods split ε by ``privacy.phase_split`` (see
    :func:`core.privacy.accounting.plan_noise_split`); the composed ε never exceeds the target.

    Args:
        spec: the validated job spec.
        num_records: N, rows of the training dataset.
        task: the dataset's task, "classification" or "causal_lm" (dp_finetune probes a
            classifier's fresh head first, ``training.probe_epochs``).
        teacher_precharged: dpkd from ``model.base = job:<id>`` whose DP teacher was already
            charged by that job: only the student phase is planned.
        has_control_codes: distildp on a dataset with control codes releases their DP
            histogram; without codes there is no histogram phase and the teacher gets all ε.

    Raises:
        ValidationFailed: δ ≥ 1/N, or an empty dataset.
        InvalidRequest: the target ε is unreachable.
    """
    delta = _resolve_delta(spec.privacy.delta, num_records)
    names, shapes, shares = _phases(spec, num_records, task, teacher_precharged,
                                    has_control_codes)  # fmt: skip
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


def sample_rate_and_steps(
    spec: JobSpec, num_records: int, *, epochs: float | None = None
) -> tuple[float, int]:
    """q = min(1, batch/N) and T = max(1, ⌈epochs·N/batch⌉) of a DP-SGD phase (epochs:
    ``training.epochs`` unless given)."""
    batch = spec.training.batch_size
    epochs_in_steps = (spec.training.epochs if epochs is None else epochs) * num_records / batch
    steps = max(1, math.ceil(epochs_in_steps - 1e-9))  # 0.1·2560/256 is 1.0000000000000002
    return min(1.0, batch / num_records), steps


def estimate_seconds(spec: JobSpec, num_records: int, task: str = "classification") -> float:
    """Rough wall time of the job on 2 CPU threads, from DESIGN §8 throughputs.

    Each DP-SGD phase processes epochs·N samples at the base model's DP throughput, scaled
    linearly with max_seq_length / 64 (dpkd's student is counted at the teacher's speed: an
    upper bound). distildp adds sampling the synthetic texts and the non-private student;
    dp_finetune's linear probe one forward pass over the rows (its head steps are cheap).
    Unknown bases (``job:<id>``, Hugging Face ids) count as MiniLM.
    """
    family = _model_family(spec.model.base)
    seq_scale = spec.training.max_seq_length / REFERENCE_SEQ_LENGTH
    dp_phase = spec.training.epochs * num_records / DP_SAMPLES_PER_S[family] * seq_scale
    seconds = STARTUP_SECONDS + dp_phase
    if spec.method == "dpkd":
        seconds += dp_phase
    if spec.training.linear_probe_epochs(method=spec.method, task=task) > 0:
        seconds += num_records / DP_SAMPLES_PER_S[family] * seq_scale / 3  # one forward pass
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
    spec: JobSpec, num_records: int, task: str, teacher_precharged: bool,
    has_control_codes: bool,
) -> tuple[list[str], list[PhaseShape], list[float]]:
    """Names, shapes and ε shares of the job's DP phases."""
    q, steps = sample_rate_and_steps(spec, num_records)
    dp_sgd = PhaseShape("poisson_gaussian", q, steps)
    split = spec.privacy.phase_split
    try:
        probe_epochs = spec.training.linear_probe_epochs(method=spec.method, task=task)
    except ValueError as e:
        raise InvalidRequest(str(e), param="training.probe_epochs") from e
    if probe_epochs > 0:
        _, probe_steps = sample_rate_and_steps(spec, num_records, epochs=probe_epochs)
        probe = PhaseShape("poisson_gaussian", q, probe_steps)
        share = split or DP_FINETUNE_PROBE_SHARE
        return ["probe", "train"], [probe, dp_sgd], [share, 1 - share]
    if spec.method == "dpkd":
        if teacher_precharged:
            return ["student"], [dp_sgd], [1.0]
        teacher = split or DPKD_TEACHER_SHARE
        return ["teacher", "student"], [dp_sgd, dp_sgd], [teacher, 1 - teacher]
    if spec.method == "distildp" and not has_control_codes:
        return ["teacher"], [dp_sgd], [1.0]
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


# -- embedding.mode fest / adafest (DESIGN §2, §8; Ghazi et al. 2023) -------------------------
#
# Both run *inside* a DP-SGD phase and are accounted as that phase's ordinary DP-SGD with the
# planned σ: the plan's σ, q, T and ε do not change with the embedding mode.
#
# * fest with public frequencies: a fixed, data-independent set of trainable rows; freezing
#   the other rows is a choice of trainable parameters, free of privacy cost. Gradient noise σ.
# * adafest: per step, the selection (noisy per-row contribution counts, L2 sensitivity 1 per
#   sparse layer) and the gradient (sensitivity C) are Gaussians on the same Poisson batch.
#   Stacked as one vector [c_1/σ_sel, …, c_L/σ_sel, g/(σ_grad·C)] with unit noise, one example
#   moves it by at most √(L/σ_sel² + 1/σ_grad²). With
#       σ_sel = σ·√(1+r²)·√L,  σ_grad = σ·√(1+r²)/r   (r = σ_sel/(√L·σ_grad))
#   that is √(1/(σ²(1+r²)) + r²/(σ²(1+r²))) = 1/σ: the pair *is* one subsampled Gaussian
#   with noise multiplier σ, i.e. 1/σ² = 1/(σ_sel/√L)² + 1/σ_grad².
#   Every trainable parameter (not only the embedding) gets σ_grad, never σ: the gradient
#   release is the whole clipped gradient.
DEFAULT_ADAFEST_NOISE_RATIO = 2.0  # r: σ_grad = 1.118·σ (+12 % gradient noise), σ_sel = 2.24·σ
DEFAULT_ADAFEST_THRESHOLD_SIGMAS = 3.0  # τ = 3·σ_sel: zero-count rows kept w.p. 0.13 % (~41/30,522)
DEFAULT_FEST_TOP_K = 2048  # SST-2 batches of 256 touch ~1,272 distinct rows (DESIGN §8)


@dataclass(frozen=True)
class EmbeddingNoise:
    """Noise of a DP-SGD phase with a row-sparse embedding (the engine's inputs).

    Attributes:
        mode: "fest" or "adafest".
        noise_multiplier: σ of the plan, the one the phase is accounted with.
        gradient_noise_multiplier: σ_grad, noise std / C on every trainable coordinate that
            is updated (σ for fest).
        selection_noise_multiplier: σ_sel, noise std of each row's contribution count
            (adafest; None for fest).
        threshold: τ, a row is selected when its noisy count ≥ τ (adafest).
        noise_ratio: r = σ_sel/(√L·σ_grad) (adafest).
        sparse_layers: L, embedding tables with a sparse update (1: the word embedding).
        fest_top_k: k, trainable rows (fest).
    """

    mode: str
    noise_multiplier: float
    gradient_noise_multiplier: float
    selection_noise_multiplier: float | None = None
    threshold: float | None = None
    noise_ratio: float | None = None
    sparse_layers: int = 1
    fest_top_k: int | None = None


def adafest_noise_multipliers(
    *, noise_multiplier: float, noise_ratio: float, sparse_layers: int = 1
) -> tuple[float, float]:
    """(σ_sel, σ_grad) whose combination is one Gaussian of noise multiplier σ.

    σ_sel = σ·√(1+r²)·√L and σ_grad = σ·√(1+r²)/r, so 1/(σ_sel/√L)² + 1/σ_grad² = 1/σ²
    (DESIGN §8, TF-Privacy's DP-AdaFEST). σ = 0 (no noise) gives (0, 0).
    """
    if noise_ratio <= 0 or sparse_layers < 1:
        raise ValueError("noise_ratio must be > 0 and sparse_layers ≥ 1")
    scale = noise_multiplier * math.sqrt(1.0 + noise_ratio**2)
    return scale * math.sqrt(sparse_layers), scale / noise_ratio


def plan_embedding_noise(
    spec: JobSpec, noise_multiplier: float, *, sparse_layers: int = 1
) -> EmbeddingNoise | None:
    """σ_sel, σ_grad and τ of a phase planned at σ for ``spec.embedding`` (None: dense/frozen).

    The privacy cost is the plan's: see the comment block above. τ defaults to
    ``DEFAULT_ADAFEST_THRESHOLD_SIGMAS``·σ_sel (public: a function of σ only).
    """
    emb = spec.embedding
    if emb.mode == "fest":
        return EmbeddingNoise(
            mode="fest",
            noise_multiplier=noise_multiplier,
            gradient_noise_multiplier=noise_multiplier,
            fest_top_k=emb.fest_top_k or DEFAULT_FEST_TOP_K,
            sparse_layers=sparse_layers,
        )
    if emb.mode != "adafest":
        return None
    ratio = emb.adafest_noise_ratio or DEFAULT_ADAFEST_NOISE_RATIO
    sigma_sel, sigma_grad = adafest_noise_multipliers(
        noise_multiplier=noise_multiplier, noise_ratio=ratio, sparse_layers=sparse_layers
    )
    threshold = emb.adafest_threshold
    if threshold is None:
        threshold = DEFAULT_ADAFEST_THRESHOLD_SIGMAS * sigma_sel
    return EmbeddingNoise(
        mode="adafest",
        noise_multiplier=noise_multiplier,
        gradient_noise_multiplier=sigma_grad,
        selection_noise_multiplier=sigma_sel,
        threshold=threshold,
        noise_ratio=ratio,
        sparse_layers=sparse_layers,
    )


def _model_family(base: str) -> str:
    if base.startswith("tiny:"):
        return "tiny"
    return "smollm" if "smollm" in base.lower() else "minilm"
