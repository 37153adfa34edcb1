"""The job planner: δ rules, q and steps, phases per method, and the ε split never exceeding the
target."""

from __future__ import annotations

import math
import time

import pytest

from core.errors import InvalidRequest, ValidationFailed
from core.privacy.accounting import DpEvent, compose_epsilon
from core.privacy.planner import (
    DISTILDP_TEACHER_SHARE,
    estimate_seconds,
    plan_job,
    sample_rate_and_steps,
)
from core.specs import JobSpec

N = 5_000


def make_spec(
    method: str = "dp_finetune",
    *,
    epsilon: float = 3.0,
    base: str | None = None,
    training: dict | None = None,
    **privacy,
) -> JobSpec:
    body = {
        "method": method,
        "dataset_id": "ds_abc",
        "privacy": {"epsilon": epsilon, **privacy},
        "training": training or {},
    }
    if base:
        body["model"] = {"base": base}
    return JobSpec.model_validate(body)


def check_within_target(plan, epsilon: float) -> None:
    assert 0.99 * epsilon <= plan.epsilon <= epsilon
    assert plan.epsilon_independent == pytest.approx(plan.epsilon, rel=0.01)


def test_delta_defaults_to_a_tenth_of_one_over_n():
    plan = plan_job(make_spec(), num_records=N)
    assert plan.delta == 1 / (10 * N)


@pytest.mark.parametrize("delta", [1 / N, 2 / N, 0.5])
def test_delta_of_one_over_n_or_more_is_rejected(delta):
    with pytest.raises(ValidationFailed) as err:
        plan_job(make_spec(delta=delta), num_records=N)
    assert err.value.param == "privacy.delta"
    assert err.value.details["problems"][0]["param"] == "privacy.delta"


def test_explicit_delta_below_one_over_n_is_used():
    plan = plan_job(make_spec(delta=1e-5), num_records=N)
    assert plan.delta == 1e-5


def test_sample_rate_and_steps_formula():
    spec = make_spec(training={"batch_size": 256, "epochs": 3})
    assert sample_rate_and_steps(spec, 10_000) == (0.0256, math.ceil(3 * 10_000 / 256))
    assert sample_rate_and_steps(spec, 100) == (1.0, math.ceil(3 * 100 / 256))  # q capped at 1
    short = make_spec(training={"batch_size": 256, "epochs": 0.01})
    assert sample_rate_and_steps(short, 1_000) == (0.256, 1)
    tenth = make_spec(training={"batch_size": 256, "epochs": 0.1})
    assert sample_rate_and_steps(tenth, 2_560) == (0.1, 1)  # not 2 from float round-off


@pytest.mark.parametrize("method", ["dp_finetune", "dpimp_structured", "dpimp_unstructured"])
def test_single_phase_methods(method):
    probe = {"probe_epochs": 0} if method == "dp_finetune" else {}  # its probe: below
    spec = make_spec(method, max_grad_norm=0.5,
                     training={"batch_size": 128, "epochs": 2, **probe})  # fmt: skip
    plan = plan_job(spec, num_records=N)
    (train,) = plan.phases
    assert (train.name, train.mechanism) == ("train", "poisson_gaussian")
    assert train.sample_rate == 128 / N
    assert train.steps == math.ceil(2 * N / 128)
    assert (train.max_grad_norm, train.batch_size) == (0.5, 128)
    assert train.epsilon == plan.epsilon
    check_within_target(plan, 3.0)
    recomputed = compose_epsilon([DpEvent.from_dict(train.model_dump())], delta=plan.delta)
    assert recomputed == plan.epsilon  # the plan's fields are enough to recompute ε


def test_dpkd_two_phases_compose_within_target():
    plan = plan_job(make_spec("dpkd"), num_records=N)
    teacher, student = plan.phases
    assert (teacher.name, student.name) == ("teacher", "student")
    assert (teacher.sample_rate, teacher.steps) == (student.sample_rate, student.steps)
    assert teacher.noise_multiplier == student.noise_multiplier  # even default split
    check_within_target(plan, 3.0)
    assert teacher.epsilon < plan.epsilon < teacher.epsilon + student.epsilon


def test_dpkd_custom_split():
    plan = plan_job(make_spec("dpkd", phase_split=0.3), num_records=N)
    teacher, student = plan.phases
    assert teacher.epsilon / student.epsilon == pytest.approx(0.3 / 0.7, rel=0.03)
    assert teacher.noise_multiplier > student.noise_multiplier
    check_within_target(plan, 3.0)


def test_dpkd_from_a_charged_teacher_plans_only_the_student():
    spec = make_spec("dpkd", base="job:job_abc123")
    plan = plan_job(spec, num_records=N, teacher_precharged=True)
    (student,) = plan.phases
    assert student.name == "student"
    check_within_target(plan, 3.0)


def test_distildp_releases_a_gaussian_histogram():
    plan = plan_job(make_spec("distildp"), num_records=N)
    teacher, histogram = plan.phases
    assert teacher.mechanism == "poisson_gaussian"
    assert (histogram.name, histogram.mechanism) == ("histogram", "gaussian")
    assert (histogram.sample_rate, histogram.steps, histogram.sensitivity) == (1.0, 1, 1.0)
    assert histogram.max_grad_norm is None and histogram.batch_size is None
    share = (1 - DISTILDP_TEACHER_SHARE) / DISTILDP_TEACHER_SHARE
    assert histogram.epsilon / teacher.epsilon == pytest.approx(share, rel=0.05)
    check_within_target(plan, 3.0)


def test_rdp_plan_reports_the_rdp_accountant():
    plan = plan_job(make_spec("dpkd", accountant="rdp"), num_records=N)
    assert plan.accountant == "rdp" and plan.accountant_version
    assert 0.99 * 3.0 <= plan.epsilon <= 3.0
    assert plan.epsilon_independent < plan.epsilon  # PLD is tighter than RDP


@pytest.mark.parametrize(
    ("method", "epsilon", "limit"),
    # dp_finetune composes two phases of different shapes (its 12-epoch linear probe): two
    # σ curves to search instead of dpkd's one
    [("dp_finetune", 2.5, 8), ("dpkd", 2.5, 5), ("distildp", 2.5, 5)],
)
def test_planning_is_fast_on_sst2(method, epsilon, limit):
    start = time.process_time()  # CPU seconds: a busy machine must not fail the test
    plan = plan_job(make_spec(method, epsilon=epsilon), num_records=67_349)
    assert time.process_time() - start < limit
    check_within_target(plan, epsilon)


def test_estimate_seconds_scales_with_work():
    base = estimate_seconds(make_spec(), 10_000)
    assert base > 0
    assert estimate_seconds(make_spec(), 20_000) > base
    assert estimate_seconds(make_spec(training={"max_seq_length": 256}), 10_000) > base
    assert estimate_seconds(make_spec("dpkd"), 10_000) > base
    assert estimate_seconds(make_spec(base="tiny:bert"), 10_000) < base
    assert estimate_seconds(
        make_spec("distildp", base="bundled:smollm2-135m"), 2_000
    ) > estimate_seconds(make_spec("distildp", base="tiny:llama"), 2_000)


def test_distildp_without_control_codes_plans_no_histogram():
    spec = JobSpec.model_validate({"method": "distildp", "dataset_id": "ds_x",
                                   "privacy": {"epsilon": 4.0}})
    with_codes = plan_job(spec, num_records=2000)
    without = plan_job(spec, num_records=2000, has_control_codes=False)
    assert [p.name for p in with_codes.phases] == ["teacher", "histogram"]
    assert [p.name for p in without.phases] == ["teacher"]
    # the teacher gets the whole ε: less noise than when sharing with the histogram
    assert without.phases[0].noise_multiplier < with_codes.phase("teacher").noise_multiplier


def test_dp_finetune_of_a_classifier_probes_its_head_first():
    from core.privacy.planner import DP_FINETUNE_PROBE_SHARE
    from core.specs import DEFAULT_PROBE_EPOCHS

    spec = make_spec(training={"batch_size": 250, "epochs": 3})
    plan = plan_job(spec, num_records=N)
    probe, train = plan.phases
    assert (probe.name, train.name) == ("probe", "train")
    assert probe.steps == math.ceil(DEFAULT_PROBE_EPOCHS * N / 250) and train.steps == 60
    assert probe.sample_rate == train.sample_rate == 250 / N
    events = [DpEvent("poisson_gaussian", p.noise_multiplier, p.sample_rate, p.steps)
              for p in plan.phases]  # fmt: skip
    assert compose_epsilon(events, delta=plan.delta) == pytest.approx(plan.epsilon)
    check_within_target(plan, 3.0)
    # a quarter of ε to the probe: its ε alone is below the fine-tuning's
    assert probe.epsilon < train.epsilon
    split = plan_job(make_spec(training={"batch_size": 250}, phase_split=0.6), num_records=N)
    assert split.phase("probe").epsilon > split.phase("train").epsilon
    assert DP_FINETUNE_PROBE_SHARE == 0.25


@pytest.mark.parametrize(
    ("training", "task"),
    [({"probe_epochs": 0}, "classification"), ({"train_body": False}, "classification"),
     ({}, "causal_lm")],
)
def test_dp_finetune_without_a_probe_phase(training, task):
    plan = plan_job(make_spec(training=training), num_records=N, task=task)
    assert [p.name for p in plan.phases] == ["train"]


@pytest.mark.parametrize(
    ("method", "training", "task"),
    [("dp_finetune", {"probe_epochs": 2, "train_body": False}, "classification"),
     ("dp_finetune", {"probe_epochs": 2}, "causal_lm"),
     ("dpkd", {"probe_epochs": 2}, "classification")],
)
def test_a_probe_that_cannot_run_is_refused(method, training, task):
    with pytest.raises(InvalidRequest) as err:
        plan_job(make_spec(method, training=training), num_records=N, task=task)
    assert err.value.param == "training.probe_epochs"
