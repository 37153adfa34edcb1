"""Privacy accounting against references: dp_accounting PLD goldens, dp_accounting RDP (exact),
prv_accountant's own PRVAccountant, and the planner's inverse property.

The golden numbers were computed once, outside this code base, with dp_accounting 0.6 alone:
PLDAccountant(value_discretization_interval=2e-5) for ε, and a geometric bisection of σ to a
relative 2e-6 on PLD (interval 1e-4) or RDP for the golden σ.
"""

from __future__ import annotations

import math
import time

import dp_accounting as dpa
import pytest
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from core.errors import InvalidRequest
from core.privacy import accounting
from core.privacy.accounting import (
    DpEvent,
    PhaseShape,
    accountant_info,
    compose_epsilon,
    independent_epsilon,
    plan_noise_multiplier,
    plan_noise_split,
)

# SST-2 as in the seed paper: N = 67,349, batch 256, 3 epochs, δ = 1/(10·N).
SST2_N = 67_349
SST2_Q = 256 / SST2_N
SST2_STEPS = 790  # ceil(3·67349/256)
SST2_DELTA = 1 / (10 * SST2_N)

# (q, σ, steps, δ) -> ε from dp_accounting PLD.
GOLDEN_PLD = [
    (SST2_Q, 0.6, SST2_STEPS, SST2_DELTA, 4.026362201748442),
    (SST2_Q, 1.0, SST2_STEPS, SST2_DELTA, 0.6782444946888522),
    (0.01, 1.1, 3000, 1e-5, 2.6754762646824766),
    (0.05, 0.8, 200, 1e-6, 8.86566324010212),
    (1.0, 5.0, 10, 1e-5, 2.594383380716762),
    (0.1, 2.0, 100, 1e-5, 2.337399619992351),
]
# Two DP-SGD phases on SST-2 (σ 0.9 and 1.2) + a Gaussian histogram (σ 20), at SST2_DELTA.
GOLDEN_COMPOSED = 1.023727970709979
GOLDEN_PARTS = (0.9293152591311572, 0.4625054132921505, 0.1844704251926523)
# SST-2: the σ at which ε(σ) = target under PLD and under RDP.
GOLDEN_SIGMA_PLD = {1.0: 0.881219210920853, 3.0: 0.6549160509463218, 8.0: 0.48632442982230933}
GOLDEN_SIGMA_RDP = {1.0: 1.0919223475520072, 3.0: 0.709238444397522, 8.0: 0.5144597300590076}


def sgd(sigma: float, q: float = SST2_Q, steps: int = SST2_STEPS) -> DpEvent:
    return DpEvent("poisson_gaussian", sigma, q, steps)


def reference_event(q: float, sigma: float, steps: int) -> dpa.DpEvent:
    base = dpa.GaussianDpEvent(sigma)
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, base), steps)


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "golden"), GOLDEN_PLD)
def test_prv_is_an_upper_bound_within_one_percent_of_pld(q, sigma, steps, delta, golden):
    prv = compose_epsilon([sgd(sigma, q, steps)], delta=delta)
    assert golden * (1 - 1e-4) <= prv <= golden * 1.01


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "golden"), GOLDEN_PLD)
def test_independent_pld_recomputation_matches_golden(q, sigma, steps, delta, golden):
    assert independent_epsilon([sgd(sigma, q, steps)], delta=delta) == pytest.approx(
        golden, rel=1e-3
    )


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "golden"), GOLDEN_PLD)
def test_rdp_is_exactly_dp_accounting_rdp(q, sigma, steps, delta, golden):
    reference = RdpAccountant()
    reference.compose(reference_event(q, sigma, steps))
    ours = compose_epsilon([sgd(sigma, q, steps)], delta=delta, accountant="rdp")
    assert ours == reference.get_epsilon(delta)
    assert ours > golden  # RDP is the looser bound


def test_rdp_composition_is_exactly_dp_accounting_rdp():
    events = [sgd(0.9), sgd(1.2), DpEvent("gaussian", 20.0), DpEvent("laplace", 10.0)]
    reference = RdpAccountant()
    reference.compose(reference_event(SST2_Q, 0.9, SST2_STEPS))
    reference.compose(reference_event(SST2_Q, 1.2, SST2_STEPS))
    reference.compose(dpa.GaussianDpEvent(20.0))
    reference.compose(dpa.LaplaceDpEvent(10.0))
    assert compose_epsilon(events, delta=SST2_DELTA, accountant="rdp") == reference.get_epsilon(
        SST2_DELTA
    )


def test_prv_is_the_library_prv_accountant_upper_bound():
    sigma, steps = 0.6, SST2_STEPS
    ours = compose_epsilon([sgd(sigma)], delta=SST2_DELTA)
    eps_error = accounting.PRV_EPS_ERROR_REL * GOLDEN_PLD[0][-1]  # as sized from the estimate
    library = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(SST2_Q, sigma)],
        eps_error=eps_error,
        delta_error=SST2_DELTA * accounting.PRV_DELTA_ERROR_REL,
        max_self_compositions=[steps],
    ).compute_epsilon(delta=SST2_DELTA, num_self_compositions=[steps])
    assert ours == pytest.approx(library[2], rel=1e-5)


def test_two_phases_and_a_histogram_compose_like_pld_and_below_the_sum():
    events = [sgd(0.9), sgd(1.2), DpEvent("gaussian", 20.0)]
    composed = compose_epsilon(events, delta=SST2_DELTA)
    assert composed == pytest.approx(GOLDEN_COMPOSED, rel=0.01)
    assert composed >= GOLDEN_COMPOSED * (1 - 1e-4)
    parts = [compose_epsilon([e], delta=SST2_DELTA) for e in events]
    assert parts == pytest.approx(GOLDEN_PARTS, rel=0.01)
    assert composed < 0.7 * sum(parts)
    assert independent_epsilon(events, delta=SST2_DELTA) == pytest.approx(GOLDEN_COMPOSED, rel=1e-3)


def test_laplace_release_matches_pld():
    laplace = [DpEvent("laplace", 2.0)]  # b / sensitivity = 2: pure ε = 0.5
    reference = 0.4999970303917339  # dp_accounting PLD at δ = SST2_DELTA
    assert compose_epsilon(laplace, delta=SST2_DELTA) == pytest.approx(reference, rel=0.01)
    assert independent_epsilon(laplace, delta=SST2_DELTA) == pytest.approx(reference, rel=1e-4)


def test_wrong_sigma_q_or_steps_change_epsilon():
    base = compose_epsilon([sgd(0.9)], delta=SST2_DELTA)
    assert compose_epsilon([sgd(0.9 * 1.02)], delta=SST2_DELTA) < 0.95 * base
    assert compose_epsilon([sgd(0.9 * 1.1)], delta=SST2_DELTA) < 0.8 * base
    assert compose_epsilon([sgd(0.9, q=SST2_Q * 1.1)], delta=SST2_DELTA) > 1.05 * base
    assert compose_epsilon([sgd(0.9, steps=SST2_STEPS + 10)], delta=SST2_DELTA) > base
    assert compose_epsilon([sgd(0.9)], delta=SST2_DELTA / 10) > base


def test_composition_ignores_order_and_idle_events_and_merges_repeats():
    a, b = sgd(0.9), DpEvent("gaussian", 20.0)
    both = compose_epsilon([a, b], delta=SST2_DELTA)
    assert compose_epsilon([b, a, sgd(0.5, steps=0)], delta=SST2_DELTA) == both
    halves = [sgd(0.9, steps=400), sgd(0.9, steps=390)]
    assert compose_epsilon(halves, delta=SST2_DELTA) == compose_epsilon([a], delta=SST2_DELTA)
    assert compose_epsilon([], delta=SST2_DELTA) == 0.0
    assert compose_epsilon([sgd(0.9, steps=0)], delta=SST2_DELTA, accountant="rdp") == 0.0


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_plan_sst2_is_safe_tight_and_matches_golden_sigma(epsilon):
    start = time.process_time()
    sigma = plan_noise_multiplier(
        epsilon=epsilon, delta=SST2_DELTA, sample_rate=SST2_Q, steps=SST2_STEPS
    )
    assert time.process_time() - start < 5
    reached = compose_epsilon([sgd(sigma)], delta=SST2_DELTA)
    assert 0.99 * epsilon <= reached <= epsilon
    # Safe side of the exact σ, and no more than 0.5 % of extra noise.
    assert GOLDEN_SIGMA_PLD[epsilon] <= sigma <= GOLDEN_SIGMA_PLD[epsilon] * 1.005
    assert independent_epsilon([sgd(sigma)], delta=SST2_DELTA) <= epsilon


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_plan_with_rdp_inverts_dp_accounting_rdp(epsilon):
    sigma = plan_noise_multiplier(
        epsilon=epsilon, delta=SST2_DELTA, sample_rate=SST2_Q, steps=SST2_STEPS, accountant="rdp"
    )
    reached = compose_epsilon([sgd(sigma)], delta=SST2_DELTA, accountant="rdp")
    assert 0.99 * epsilon <= reached <= epsilon
    assert GOLDEN_SIGMA_RDP[epsilon] <= sigma <= GOLDEN_SIGMA_RDP[epsilon] * 1.002


def test_plan_is_verified_and_re_aimed_when_the_search_runs_low(monkeypatch):
    search = accounting._search_epsilon
    monkeypatch.setattr(accounting, "_search_epsilon", lambda *args: 0.97 * search(*args))
    sigma = plan_noise_multiplier(epsilon=2.0, delta=1e-5, sample_rate=0.02, steps=150)
    assert 0.99 * 2.0 <= compose_epsilon([sgd(sigma, 0.02, 150)], delta=1e-5) <= 2.0


def test_plan_composes_with_events_already_charged():
    charged = [sgd(0.9), DpEvent("gaussian", 20.0)]
    sigma = plan_noise_multiplier(
        epsilon=2.0, delta=SST2_DELTA, sample_rate=0.01, steps=300, other_events=charged
    )
    total = compose_epsilon([*charged, sgd(sigma, 0.01, 300)], delta=SST2_DELTA)
    assert 0.99 * 2.0 <= total <= 2.0
    with pytest.raises(InvalidRequest) as err:
        plan_noise_multiplier(
            epsilon=0.5, delta=SST2_DELTA, sample_rate=0.01, steps=300, other_events=charged
        )
    assert err.value.param == "privacy.epsilon"


def test_plan_rejects_an_unreachable_target():
    with pytest.raises(InvalidRequest) as err:
        plan_noise_multiplier(
            epsilon=1e-3, delta=1e-5, sample_rate=1.0, steps=10**9, accountant="rdp"
        )
    assert err.value.param == "privacy.epsilon"


def test_plan_split_respects_shares_and_target():
    shapes = (PhaseShape("poisson_gaussian", 0.05, 100), PhaseShape("gaussian"))
    sigmas = plan_noise_split(epsilon=2.0, delta=1e-5, phases=shapes, shares=(0.8, 0.2))
    events = [shape.with_noise(s) for shape, s in zip(shapes, sigmas, strict=True)]
    total = compose_epsilon(events, delta=1e-5)
    assert 0.99 * 2.0 <= total <= 2.0
    alone = [compose_epsilon([e], delta=1e-5) for e in events]
    assert alone[1] / alone[0] == pytest.approx(0.2 / 0.8, rel=0.03)
    assert sum(alone) > total  # c > 1: composition is sub-additive


def test_dp_event_round_trip_and_validation():
    event = sgd(0.9)
    assert DpEvent.from_dict(event.to_dict()) == event
    row = {**event.to_dict(), "id": 7, "job_id": "job_x", "status": "charged"}
    assert DpEvent.from_dict(row) == event
    for bad in [
        dict(mechanism="exponential", noise_multiplier=1.0),
        dict(mechanism="gaussian", noise_multiplier=0.0),
        dict(mechanism="gaussian", noise_multiplier=1.0, sample_rate=0.5),
        dict(mechanism="poisson_gaussian", noise_multiplier=1.0, sample_rate=1.5),
        dict(mechanism="poisson_gaussian", noise_multiplier=1.0, steps=-1),
    ]:
        with pytest.raises(ValueError):
            DpEvent(**bad)


def test_delta_outside_zero_one_is_rejected():
    for delta in (0.0, 1.0):
        with pytest.raises(ValueError):
            compose_epsilon([sgd(1.0)], delta=delta)


def test_accountant_info_and_unknown_accountant():
    from importlib.metadata import version

    assert accountant_info("prv") == {"name": "prv", "version": version("prv-accountant")}
    assert accountant_info("rdp") == {"name": "rdp", "version": version("dp-accounting")}
    with pytest.raises(InvalidRequest) as err:
        compose_epsilon([sgd(1.0)], delta=1e-5, accountant="moments")
    assert err.value.param == "privacy.accountant"


def test_golden_setting_is_the_papers():
    assert math.ceil(3 * SST2_N / 256) == SST2_STEPS


def test_prv_falls_back_to_pld_where_prv_accountant_cannot_discretise():
    """prv_accountant raises for large q at small δ; the PLD upper bound stands in."""
    events = [DpEvent("poisson_gaussian", 0.8, 0.125, 240)]
    eps = compose_epsilon(events, delta=1 / 640)
    assert eps == pytest.approx(independent_epsilon(events, delta=1 / 640), rel=1e-9)
    assert compose_epsilon(events, delta=1 / 640, accountant="rdp") >= eps


@pytest.mark.parametrize("sample_rate,steps,epsilon", [(0.125, 96, 8.0), (0.125, 480, 8.0),
                                                       (0.25, 8, 4.0)])
def test_planning_works_where_prv_accountant_cannot_discretise(sample_rate, steps, epsilon):
    sigma = plan_noise_multiplier(epsilon=epsilon, delta=1 / 640, sample_rate=sample_rate,
                                  steps=steps)
    reached = compose_epsilon([DpEvent("poisson_gaussian", sigma, sample_rate, steps)],
                              delta=1 / 640)
    assert 0.99 * epsilon <= reached <= epsilon
