"""Privacy accounting: compose DP events into one (ε, δ) guarantee, and plan σ for a target ε.

Pure numpy/scipy on two reference libraries; no torch, no database (DESIGN §3, §5):

* ``prv`` — the PRV accountant of Gopi, Lee & Wutschitz (2021), ``prv_accountant``. We report
  the *upper* end of its ε interval, so a reported ε is never below the true ε.
* ``rdp`` — ``dp_accounting``'s ``RdpAccountant``, called unchanged: our RDP ε is the library's.
* :func:`independent_epsilon` — ``dp_accounting``'s PLD accountant, the independent
  recomputation shown next to every reported ε (DESIGN §5 rule 5: agree within 1 %).

Privacy unit: one record, add/remove adjacency. Planning runs inside API requests (dry run,
job creation), so it searches σ with a cheap PRV *estimate* and only verifies the answer with
the reported upper bound; every evaluation is memoised on hashable arguments.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version

import dp_accounting
import numpy as np
import scipy.fft
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from prv_accountant import (
    GaussianMechanism,
    LaplaceMechanism,
    PoissonSubsampledGaussianMechanism,
    PrivacyRandomVariable,
    composers,
)
from prv_accountant.discrete_privacy_random_variable import DiscretePrivacyRandomVariable
from prv_accountant.domain import Domain
from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated
from scipy import special
from scipy.optimize import brentq

from core.errors import InvalidRequest

MECHANISMS = ("poisson_gaussian", "gaussian", "laplace")
ACCOUNTANTS = {"prv": "prv-accountant", "rdp": "dp-accounting"}  # name -> package (version)

# PRV accuracy. prv_accountant's eps_error is absolute; we make it relative to ε so the reported
# upper bound is ≤ 0.4 % above the true ε for ε ≥ 0.25 (and ≤ +0.001 below), which keeps it
# within 1 % of the PLD recomputation while one evaluation stays ~0.1-0.6 s.
PRV_EPS_ERROR_REL = 0.004
PRV_EPS_ERROR_MIN = 1e-3
PRV_ROUGH_EPS_ERROR = 0.1  # first, coarse pass that only sizes eps_error...
PRV_ROUGH_EPS_ERROR_REL = 0.02  # ... or 2 % of the RDP ε (≥ the true ε) when that is larger
PRV_DELTA_ERROR_REL = 1e-3  # δ error = δ/1000, as Opacus uses
# RDP orders for the PRV domain width and the coarse sizing pass only (see _safe_half_width).
RDP_ORDERS = np.concatenate([[1.1, 1.2, 1.35, 1.5, 1.75], np.arange(2.0, 65.0)])
# The σ search steers on the PRV *estimate* on a mesh 5× coarser than the reported bound's; it is
# within ~0.03 % of the true ε (measured against PLD), far below PLAN_SAFETY.
SEARCH_EPS_ERROR_REL = 0.02
PLAN_SAFETY = 1.5e-3  # aim this fraction below the target; the verified answer lands in 99-100 %
PLAN_MAX_REFINES = 4
SEARCH_SLOPE = 3.0  # first step assumes ε ∝ σ^-3 (DP-SGD: σ^-2 … σ^-4; one Gaussian: σ^-1)
SEARCH_MAX_EVALS = 30
COMPOSED_LOG_TOL = 3e-4  # |log(ε/aim)| accepted for the composition
SPLIT_LOG_TOL = 1e-3  # ... for a phase alone (only the ε split ratio depends on it)
SIGMA_MIN = 0.1  # never plan less noise (ε is then below the target: safe)
SIGMA_MAX = 1e4  # a target that needs more noise than this is rejected
# PLD (independent recomputation): the discretisation interval relative to ε; its pessimistic
# estimate is then within ~0.01 % of the true ε (measured), far inside the 1 % agreement rule.
PLD_INTERVAL_REL = 2e-4
PLD_INTERVAL_MAX = 1e-3


@dataclass(frozen=True)
class DpEvent:
    """One DP mechanism run ``steps`` times on the private rows (a ledger event's maths).

    Attributes:
        mechanism: ``poisson_gaussian`` (DP-SGD: Poisson sampling at rate q, Gaussian noise),
            ``gaussian`` (one full-data Gaussian release) or ``laplace``.
        noise_multiplier: σ = noise std / L2 sensitivity (Gaussian), or b / L1 sensitivity
            (Laplace scale b).
        sample_rate: q, the Poisson sampling probability; 1 for full-data releases.
        steps: how many times the mechanism ran; 0 means it never touched data.
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"unknown mechanism {self.mechanism!r}; use one of {MECHANISMS}")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.mechanism != "poisson_gaussian" and self.sample_rate != 1:
            raise ValueError(f"{self.mechanism} releases use the full data: sample_rate must be 1")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DpEvent:
        """Build from a dict; other keys (a ledger row's ids, status...) are ignored."""
        return cls(
            mechanism=data["mechanism"],
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data.get("sample_rate", 1.0)),
            steps=int(data.get("steps", 1)),
        )


@dataclass(frozen=True)
class PhaseShape:
    """A DP phase before its σ is planned: mechanism, q and steps."""

    mechanism: str
    sample_rate: float = 1.0
    steps: int = 1

    def with_noise(self, noise_multiplier: float) -> DpEvent:
        return DpEvent(self.mechanism, noise_multiplier, self.sample_rate, self.steps)


def accountant_info(name: str) -> dict:
    """``{"name", "version"}`` of an accountant, the version being its package's."""
    return {"name": name, "version": version(ACCOUNTANTS[_check_accountant(name)])}


def compose_epsilon(events: Sequence[DpEvent], *, delta: float, accountant: str = "prv") -> float:
    """ε at δ of running all ``events`` on the same rows (heterogeneous composition).

    Args:
        events: the DP events; those with ``steps == 0`` are ignored.
        delta: δ of the guarantee.
        accountant: ``prv`` (PRV upper bound, see module doc) or ``rdp`` (dp_accounting RDP).

    Returns:
        ε (0.0 when no event touched data).
    """
    _check_accountant(accountant)
    _check_delta(delta)
    active = tuple(e for e in events if e.steps > 0)
    if not active:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(active, delta)
    try:
        return _prv_epsilon(_canonical(active), delta)
    except RuntimeError:
        # prv_accountant's discretisation fails for large q at small δ (its own
        # PRVAccountant raises the same). dp_accounting's pessimistic PLD is also an
        # upper bound on ε, so it stands in; the ledger's independent value then
        # coincides with it.
        return independent_epsilon(active, delta=delta)


def independent_epsilon(events: Sequence[DpEvent], *, delta: float) -> float:
    """ε at δ recomputed with dp_accounting's PLD accountant (pessimistic estimate).

    The discretisation interval is sized from a coarse first pass: ``PLD_INTERVAL_REL`` · ε.
    """
    _check_delta(delta)
    active = _canonical(tuple(e for e in events if e.steps > 0))
    if not active:
        return 0.0
    rough = _pld_epsilon(active, delta, PLD_INTERVAL_MAX)
    return _pld_epsilon(active, delta, min(PLD_INTERVAL_MAX, PLD_INTERVAL_REL * rough))


def plan_noise_multiplier(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    other_events: Sequence[DpEvent] = (),
) -> float:
    """Smallest σ (to the search tolerance) of a DP-SGD phase so the whole run stays within ε.

    Composes ``other_events`` (e.g. phases already charged) with ``steps`` Poisson-sampled
    Gaussian steps at rate q = ``sample_rate``; the returned σ is verified:
    ``compose_epsilon(other_events + phase(σ)) ≤ epsilon`` (and ≳ 0.99·epsilon).

    Raises:
        InvalidRequest: (param ``privacy.epsilon``) if no σ ≤ ``SIGMA_MAX`` reaches ε.
    """
    shape = PhaseShape("poisson_gaussian", sample_rate, steps)
    return plan_noise_split(
        epsilon=epsilon,
        delta=delta,
        phases=(shape,),
        shares=(1.0,),
        accountant=accountant,
        other_events=other_events,
    )[0]


def plan_noise_split(
    *,
    epsilon: float,
    delta: float,
    phases: Sequence[PhaseShape],
    shares: Sequence[float],
    accountant: str = "prv",
    other_events: Sequence[DpEvent] = (),
) -> tuple[float, ...]:
    """σ of each phase so that the phases split ε by ``shares`` and compose to ≤ ε.

    Composition is sub-additive, so each phase i is planned at ε_i = c·shareᵢ·ε *alone*, with
    the largest scale c ≥ 1 whose composition (with ``other_events``) stays ≤ ε. Searched as:
    σ of the largest-share phase (the anchor) by safeguarded secant steps (bisection once
    bracketed); its ε alone fixes c; every other σ inverts its own ε-alone curve at c·shareᵢ·ε.
    The answer is then verified with the reported accountant and re-aimed if it overshoots.

    Args:
        epsilon: target ε of everything together.
        delta: δ.
        phases: mechanism, q and steps of each phase to plan.
        shares: ε share of each phase (normalised to sum 1).
        accountant: ``prv`` or ``rdp``.
        other_events: events already fixed (composed in, not planned).

    Returns:
        σ per phase, in the order of ``phases``.

    Raises:
        InvalidRequest: (param ``privacy.epsilon``) if the target cannot be reached.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if len(phases) != len(shares) or not phases or min(shares) <= 0:
        raise ValueError("give one positive share per phase")
    total = sum(shares)
    return _plan_split(
        epsilon,
        delta,
        tuple(phases),
        tuple(s / total for s in shares),
        accountant,
        _canonical(tuple(e for e in other_events if e.steps > 0)),
    )


# --- planning ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _plan_split(
    epsilon: float,
    delta: float,
    phases: tuple[PhaseShape, ...],
    shares: tuple[float, ...],
    accountant: str,
    other: tuple[DpEvent, ...],
) -> tuple[float, ...]:
    spent = compose_epsilon(other, delta=delta, accountant=accountant)
    if spent >= epsilon:
        raise InvalidRequest(
            f"the events already charged spend ε = {spent:.3g} ≥ the target ε = {epsilon:g}; "
            "raise privacy.epsilon",
            param="privacy.epsilon",
        )
    search = _SplitSearch(epsilon, delta, phases, shares, accountant, other)
    aim = epsilon * (1 - PLAN_SAFETY)
    for _ in range(PLAN_MAX_REFINES):
        sigmas = search.solve(aim)
        events = other + tuple(p.with_noise(s) for p, s in zip(phases, sigmas, strict=True))
        reached = compose_epsilon(events, delta=delta, accountant=accountant)
        if reached <= epsilon:
            return sigmas
        aim -= reached - epsilon + PLAN_SAFETY * epsilon  # the bound sat above the estimate
    raise RuntimeError(f"σ search did not converge to ε ≤ {epsilon} (last {reached})")


class _SplitSearch:
    """σ per phase whose composed *search estimate* (:func:`_search_epsilon`) hits an aim.

    The outer unknown is σ of the largest-share phase (the anchor); its ε alone fixes c·ε =
    ε_anchor / share_anchor, and every other σᵢ inverts its own ε-alone curve at c·shareᵢ·ε.
    Curves are memoised per phase shape, so later solves start warm (dpkd's teacher and student
    share one curve).
    """

    def __init__(self, epsilon, delta, phases, shares, accountant, other) -> None:
        self.epsilon, self.delta, self.accountant, self.other = epsilon, delta, accountant, other
        self.phases, self.shares = phases, shares
        self.anchor = max(range(len(phases)), key=lambda i: shares[i])
        self.alone = {
            shape: _LogCurve(functools.partial(self._alone_epsilon, shape)) for shape in set(phases)
        }
        self.composed = _LogCurve(self._composed_epsilon)
        self.split: dict[float, tuple[float, ...]] = {}  # σ_anchor -> σ per phase

    def solve(self, aim: float) -> tuple[float, ...]:
        if self.accountant == "prv":  # reported = estimate + eps_error (+ a hair for δ error)
            aim = min(aim - PRV_EPS_ERROR_MIN, aim / (1 + PRV_EPS_ERROR_REL))
        c_guess = 1 / math.sqrt(sum(s * s for s in self.shares))  # Gaussian DP: μ² add up
        spent = compose_epsilon(self.other, delta=self.delta, accountant=self.accountant)
        alone = min(self.epsilon - spent, c_guess * self.shares[self.anchor] * self.epsilon)
        guess = _clt_noise_guess(self.phases[self.anchor], epsilon=alone, delta=self.delta)
        u = self.composed.solve(math.log(aim), guess=guess, tol=COMPOSED_LOG_TOL)
        if u == math.log(SIGMA_MAX) and self.composed(u) > math.log(aim) + COMPOSED_LOG_TOL:
            raise InvalidRequest(
                f"ε = {self.epsilon:g} is unreachable: even σ = {SIGMA_MAX:g} spends more; "
                "raise privacy.epsilon, or train fewer epochs / with a smaller batch",
                param="privacy.epsilon",
            )
        return self.sigmas(math.exp(u))

    def sigmas(self, sigma_anchor: float) -> tuple[float, ...]:
        if sigma_anchor not in self.split:
            anchor, share_anchor = self.phases[self.anchor], self.shares[self.anchor]
            log_scale = self.alone[anchor](math.log(sigma_anchor)) - math.log(share_anchor)
            self.split[sigma_anchor] = tuple(
                sigma_anchor if i == self.anchor else self._invert(phase, log_scale, share)
                for i, (phase, share) in enumerate(zip(self.phases, self.shares, strict=True))
            )
        return self.split[sigma_anchor]

    def _invert(self, phase: PhaseShape, log_scale: float, share: float) -> float:
        target = log_scale + math.log(share)  # log(c·shareᵢ·ε)
        guess = _clt_noise_guess(phase, epsilon=math.exp(target), delta=self.delta)
        return math.exp(self.alone[phase].solve(target, guess=guess, tol=SPLIT_LOG_TOL))

    def _alone_epsilon(self, phase: PhaseShape, sigma: float) -> float:
        return _search_epsilon(
            (phase.with_noise(sigma),), self.delta, self.accountant, self.epsilon
        )

    def _composed_epsilon(self, sigma_anchor: float) -> float:
        phases = zip(self.phases, self.sigmas(sigma_anchor), strict=True)
        events = self.other + tuple(p.with_noise(s) for p, s in phases)
        return _search_epsilon(events, self.delta, self.accountant, self.epsilon)


class _LogCurve:
    """y(u) = log ε(σ = eᵘ) of a decreasing ε(σ), memoised, inverted by secant steps.

    σ is kept in [``SIGMA_MIN``, ``SIGMA_MAX``]; a solve that hits a limit returns it.
    """

    def __init__(self, fn: Callable[[float], float]) -> None:
        self.fn = fn
        self.points: dict[float, float] = {}

    def __call__(self, u: float) -> float:
        if u not in self.points:
            self.points[u] = math.log(max(self.fn(math.exp(u)), 1e-300))
        return self.points[u]

    def solve(self, y: float, *, guess: float, tol: float) -> float:
        """u with |y(u) − y| ≤ tol: secant through the two points nearest y, bisection when
        that would leave the known bracket; the first step assumes ε ∝ σ^-SEARCH_SLOPE."""
        lo, hi = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
        u = min(max(math.log(guess), lo), hi)
        for _ in range(SEARCH_MAX_EVALS):
            if self.points:
                near = sorted(self.points, key=lambda p: abs(self.points[p] - y))
                if abs(self.points[near[0]] - y) <= tol:
                    return near[0]
                u = min(max(self._next(y, near), lo), hi)
                if u in self.points:  # pinned at a σ limit (or the bracket cannot shrink)
                    return u
            self(u)
        raise RuntimeError(f"σ search did not converge (target log ε {y:.4f})")

    def _next(self, y: float, near: list[float]) -> float:
        u1, y1 = near[0], self.points[near[0]]
        slope = -SEARCH_SLOPE
        if len(near) > 1:
            secant = (self.points[near[1]] - y1) / (near[1] - u1)
            if secant < 0:  # ignore a pair that discretisation noise makes non-decreasing
                slope = secant
        u = u1 + (y - y1) / slope
        above = [p for p, v in self.points.items() if v > y]  # too little noise
        below = [p for p, v in self.points.items() if v < y]
        if above and below and not max(above) < u < min(below):
            u = (max(above) + min(below)) / 2
        return u


def _clt_noise_guess(phase: PhaseShape, *, epsilon: float, delta: float) -> float:
    """Starting σ from the Gaussian-DP central limit (Dong, Roth & Su 2019): DP-SGD is ≈ μ-GDP
    with μ = q·√(T·(e^{1/σ²} − 1)). It underestimates ε, so the search starts a little low."""
    mu = brentq(lambda m: _gdp_delta(m, epsilon) - delta, 1e-8, 1e3)
    if phase.mechanism == "poisson_gaussian" and phase.sample_rate < 1:
        return 1 / math.sqrt(math.log1p(mu**2 / (phase.sample_rate**2 * phase.steps)))
    return math.sqrt(phase.steps) / mu


def _gdp_delta(mu: float, epsilon: float) -> float:
    """δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2)."""
    return float(
        special.ndtr(-epsilon / mu + mu / 2)
        - np.exp(epsilon + special.log_ndtr(-epsilon / mu - mu / 2))
    )


def _log_ratio(value: float, target: float) -> float:
    return math.log(max(value, 1e-12)) - math.log(target)


def _search_epsilon(events, delta, accountant, scale) -> float:
    """ε used only to steer searches: the PRV estimate on a mesh sized by ``scale`` (a fixed ε
    magnitude, so the curve is smooth in σ), or the exact RDP ε."""
    if accountant == "rdp":
        return compose_epsilon(events, delta=delta, accountant="rdp")
    try:
        return max(0.0, _prv_bounds(_canonical(events), delta, SEARCH_EPS_ERROR_REL * scale)[1])
    except RuntimeError:  # prv_accountant cannot discretise here: steer on PLD instead
        return compose_epsilon(events, delta=delta, accountant="prv")


# --- the accountants --------------------------------------------------------------------------


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise InvalidRequest(
            f"unknown accountant {name!r}; use one of {sorted(ACCOUNTANTS)}",
            param="privacy.accountant",
        )
    return name


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")


def _canonical(events: tuple[DpEvent, ...]) -> tuple[DpEvent, ...]:
    """Order-free form for caching: identical mechanisms merged (steps summed), then sorted."""
    steps: dict[tuple, int] = {}
    for e in events:
        key = (e.mechanism, e.noise_multiplier, e.sample_rate)
        steps[key] = steps.get(key, 0) + e.steps
    return tuple(DpEvent(m, s, q, n) for (m, s, q), n in sorted(steps.items()))


@functools.lru_cache(maxsize=512)
def _rdp_epsilon(events: tuple[DpEvent, ...], delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(_dp_accounting_event(events))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=512)
def _pld_epsilon(events: tuple[DpEvent, ...], delta: float, interval: float) -> float:
    accountant = PLDAccountant(value_discretization_interval=interval)
    accountant.compose(_dp_accounting_event(events))
    return float(accountant.get_epsilon(delta))


def _dp_accounting_event(events: tuple[DpEvent, ...]) -> dp_accounting.DpEvent:
    parts = []
    for e in events:
        if e.mechanism == "laplace":
            base = dp_accounting.LaplaceDpEvent(e.noise_multiplier)
        else:
            base = dp_accounting.GaussianDpEvent(e.noise_multiplier)
            if e.mechanism == "poisson_gaussian":
                base = dp_accounting.PoissonSampledDpEvent(e.sample_rate, base)
        parts.append(dp_accounting.SelfComposedDpEvent(base, e.steps))
    return dp_accounting.ComposedDpEvent(parts)


@functools.lru_cache(maxsize=512)
def _prv_epsilon(events: tuple[DpEvent, ...], delta: float) -> float:
    """Reported PRV ε: the upper bound, with eps_error relative to a coarse first estimate
    (itself on a mesh sized by the RDP ε, so that large ε stay cheap)."""
    terms = _prv_terms(events)
    rough_error = max(PRV_ROUGH_EPS_ERROR, PRV_ROUGH_EPS_ERROR_REL * _rdp_bound(terms, delta))
    rough = _prv_bounds(events, delta, rough_error)[1]
    eps_error = max(PRV_EPS_ERROR_MIN, PRV_EPS_ERROR_REL * rough)
    return max(0.0, _prv_bounds(events, delta, eps_error)[2])


def _prv_terms(events: tuple[DpEvent, ...]) -> list[tuple[PrivacyRandomVariable, np.ndarray, int]]:
    """(PRV, its RDP at ``RDP_ORDERS``, self-compositions) per distinct mechanism. Full-data
    Gaussians (``gaussian``, or DP-SGD at q = 1) merge exactly: k releases with σᵢ are one
    Gaussian with 1/σ² = Σ kᵢ/σᵢ²."""
    terms = []
    precision = 0.0
    for e in events:
        if e.mechanism == "laplace" or e.sample_rate < 1:
            terms.append((*_prv(e.mechanism, e.sample_rate, e.noise_multiplier), e.steps))
        else:
            precision += e.steps / e.noise_multiplier**2
    if precision:
        terms.append((*_prv("gaussian", 1.0, precision**-0.5), 1))
    return terms


@functools.lru_cache(maxsize=4096)
def _prv(mechanism: str, sample_rate: float, noise_multiplier: float):
    if mechanism == "laplace":
        prv = LaplaceMechanism(mu=1.0 / noise_multiplier)  # privacy loss bound = 1/b
    elif mechanism == "gaussian":
        prv = GaussianMechanism(noise_multiplier=noise_multiplier)
    else:
        prv = PoissonSubsampledGaussianMechanism(sample_rate, noise_multiplier)
    return prv, np.array([prv.rdp(order) for order in RDP_ORDERS])


@functools.lru_cache(maxsize=2048)
def _prv_bounds(events: tuple[DpEvent, ...], delta: float, eps_error: float) -> tuple:
    """(lower, estimate, upper) ε of prv_accountant's ``PRVAccountant.compute_epsilon``.

    The same steps as ``PRVAccountant`` (safe domain, Theorem 5.5 mesh, cell-centred
    discretisation, Fourier self-composition, convolution tree) with speed-ups: the domain
    only gets wider (a wider domain truncates less: still safe) — its safe half-width on fewer
    RDP orders (:func:`_safe_half_width`), its grid rounded up to an FFT-friendly length — the
    cdf is evaluated once per cell edge, and the masses are float64 instead of long double (the
    library's long-double FFTs are 4× slower). The bounds move by ~1e-8 relative; a test checks
    against ``PRVAccountant``.
    """
    terms = _prv_terms(events)
    counts = [count for _, _, count in terms]
    delta_error = PRV_DELTA_ERROR_REL * delta
    half_width = _safe_half_width(terms, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / math.sqrt(sum(counts) / 2 * math.log(12 / delta_error))
    size = 2 * scipy.fft.next_fast_len(math.ceil(half_width / mesh) + 1, real=True)
    k = (size - 2) // 2  # nodes at −k·mesh … (k+1)·mesh, as Domain.create_aligned lays them
    domain = Domain(-k * mesh, (k + 1) * mesh, size)
    discrete = [_discretise(prv, domain) for prv, _, _ in terms]
    composed = composers.Heterogeneous(discrete).compute_composition(counts)
    return composed.compute_epsilon(delta, delta_error, eps_error)


def _discretise(prv: PrivacyRandomVariable, domain: Domain) -> DiscretePrivacyRandomVariable:
    """prv_accountant's ``CellCentred`` discretisation of the PRV truncated to the domain, with
    the cdf evaluated once per cell edge (the library evaluates each inner edge twice, and the
    long-double cdf is most of an evaluation's time); masses in float64."""
    truncated = PrivacyRandomVariableTruncated(prv, domain.t_min(), domain.t_max())
    centres = domain.ts()
    edges = np.append(centres - domain.dt() / 2, centres[-1] + domain.dt() / 2)
    with np.errstate(over="ignore"):  # the library's cdf overflows harmlessly at large t
        pmf = np.diff(truncated.cdf(edges)).astype(np.float64)
    mean_shift = truncated.mean() - float(np.dot(centres, pmf))
    if not abs(mean_shift) < domain.dt() / 2:
        raise RuntimeError("discrete mean differs from continuous mean significantly")
    return DiscretePrivacyRandomVariable(
        pmf, domain.shift_right(mean_shift), log_pmc_inf=np.log(1 - prv.pm_inf)
    )


def _safe_half_width(terms, *, eps_error: float, delta_error: float) -> float:
    """Half-width L of the PRV domain by Remark 5.6 of Gopi et al., as prv_accountant's
    ``compute_safe_domain_size``, but on ``RDP_ORDERS`` with each RDP curve computed once and
    cached (the library evaluates 150 orders, 99 fractional, twice: 80 % of a search step).
    Fewer orders can only give a larger RDP ε, hence a wider, still safe, domain."""
    total = sum(count for _, _, count in terms)
    half_width = _rdp_bound(terms, delta_error / 4)
    for _, curve, _ in terms:
        half_width = max(half_width, _rdp_to_epsilon(curve, delta_error / 8 / total))
    return max(half_width, eps_error) + 3


def _rdp_bound(terms, delta: float) -> float:
    """RDP upper bound on ε at δ of the composed terms."""
    return _rdp_to_epsilon(sum(curve * count for _, curve, count in terms), delta)


def _rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """ε at δ from RDP values at ``RDP_ORDERS`` (the conversion prv_accountant uses)."""
    orders = RDP_ORDERS
    return float(np.nanmin(rdp - np.log(delta * orders) / (orders - 1) + np.log1p(-1 / orders)))
