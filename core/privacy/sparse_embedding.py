"""Row-sparse DP updates of the word embedding: FEST and DP-AdaFEST (Ghazi et al. 2023).

Inside one DP-SGD logical step (see :mod:`core.privacy.engine`) the embedding gradient
g_E ∈ R^{V×h} keeps only a set S of rows; the other rows get no gradient, no noise, and
are not touched at all (weights and optimizer state bit-identical).

FEST: S is a fixed top-k set ranked by a PUBLIC frequency (:mod:`embedding_frequencies`);
rows outside S are frozen. Noise σ on S. No extra privacy cost.

DP-AdaFEST, per logical step on the Poisson batch B (TF-Privacy's algorithm, DESIGN §8):

    c_i[v]  = (# tokens of example i equal to v) / (# tokens of example i)   ‖c_i‖₁ = 1
    c       = Σ_{i∈B} c_i                                   (sensitivity ‖c_i‖₂ ≤ 1)
    S       = { v : c[v] + N(0, σ_sel²) ≥ τ }
    g̃_E[v] = Σ_i clip(g_i)[v] + N(0, σ_grad²C²)   for v ∈ S,   dropped for v ∉ S

Zero-count rows are selected too — that is what makes S private: each with probability
p₀ = P[N(0,1) ≥ τ/σ_sel]. They are drawn sparsely: K ~ Binomial(#zero-count rows, p₀), then
K of them uniformly without replacement (same law as V independent coin flips, no dense
noise vector). Counts are taken from the rows' real tokens (never from padding, whose
amount depends on the other rows of a physical chunk).

Accounting (DESIGN §8). The selection (sensitivity 1 per sparse layer, L layers) and the
gradient (sensitivity C) are released on the same batch; stacking [c/σ_sel, g/(σ_grad·C)]
with unit noise, one example moves it by ≤ √(L/σ_sel² + 1/σ_grad²). With the planned σ
and the ratio r (``embedding.adafest_noise_ratio``, default 2.0, see
:data:`core.privacy.planner.DEFAULT_ADAFEST_NOISE_RATIO`)

    σ_sel  = σ·√(1+r²)·√L,     σ_grad = σ·√(1+r²)/r
    ⇒ L/σ_sel² + 1/σ_grad² = 1/(σ²(1+r²)) + r²/(σ²(1+r²)) = 1/σ²

so the step is one Poisson-subsampled Gaussian with noise multiplier σ, and the phase is
accounted (planned, ledgered) as ordinary DP-SGD at σ. Consequence: EVERY trainable
parameter gets noise σ_grad·C (the engine's optimizer runs at σ_grad), not only the
embedding. Dropping rows after clipping is post-processing (a projection, sensitivity ≤ C).

Implementation notes:

* Opacus draws its noise for the whole embedding matrix; we zero the rows ∉ S after. Since
  coordinates are independent, the released update has exactly the law above; only the
  compute of a dense draw is wasted (a sparse draw needs an Opacus optimizer subclass).
* Ghost clipping computes each example's norm over its whole embedding gradient, rows ∉ S
  included: valid (conservative), part of the clipping budget is spent on dropped rows.
  With ``embedding.clip_share`` ρ (default for fest/adafest/dense, see
  :mod:`core.privacy.group_clipping`) the embedding's part is bounded by ρC on its own, so
  it cannot crowd out the head's signal.
* Untouched rows: a pre-step hook on the *inner* optimizer (it runs after Opacus has
  clipped, noised and scaled) zeroes g̃_E outside S and saves the matrix and its per-row
  optimizer state (tensors shaped like the matrix: Adam moments, momentum); a post-step
  hook writes the saved rows back. Scalar state (Adam's ``step``) is per tensor.
* Tied embeddings (tiny:llama, SmolLM2) are frozen by default (``model.tied_weights``):
  there is no trainable embedding, the recipe runs the phase as ``frozen`` and says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from core.privacy.planner import EmbeddingNoise

SparseMode = Literal["fest", "adafest"]


def contribution_counts(token_rows: Sequence[Sequence[int]], *, num_rows: int) -> torch.Tensor:
    """c = Σ_i c_i, each example's token-count vector normalised to total 1. float64 [V]."""
    counts = torch.zeros(num_rows, dtype=torch.float64)
    for ids in token_rows:
        if not ids:
            continue
        t = torch.as_tensor(list(ids), dtype=torch.long)
        counts.index_add_(0, t, torch.full((len(t),), 1.0 / len(t), dtype=torch.float64))
    return counts


def zero_count_selection_probability(*, threshold: float, selection_noise: float) -> float:
    """p₀ = P[N(0, σ_sel²) ≥ τ] for a row nobody in the batch touched."""
    if selection_noise == 0:
        return 1.0 if threshold <= 0 else 0.0
    return 0.5 * math.erfc(threshold / (selection_noise * math.sqrt(2.0)))


def select_rows(
    counts: torch.Tensor,
    *,
    threshold: float,
    selection_noise: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """S = {v : counts[v] + N(0, σ_sel²) ≥ τ}; zero-count rows sampled sparsely. Sorted int64.

    Args:
        counts: c, float [V] (non-negative).
        threshold: τ.
        selection_noise: σ_sel (std of the count noise; sensitivity of c is 1).
        generator: the selection RNG (CPU).
    """
    touched = (counts > 0).nonzero(as_tuple=True)[0]
    noisy = counts[touched] + selection_noise * torch.randn(
        len(touched), dtype=counts.dtype, generator=generator
    )
    chosen = touched[noisy >= threshold]
    zero_rows = (counts == 0).nonzero(as_tuple=True)[0]
    p0 = zero_count_selection_probability(threshold=threshold, selection_noise=selection_noise)
    k = 0
    if p0 >= 1.0:
        k = len(zero_rows)
    elif p0 > 0.0 and len(zero_rows):
        k = int(torch.binomial(torch.tensor(float(len(zero_rows))), torch.tensor(p0),
                               generator=generator))  # fmt: skip
    if k:
        pick = torch.randperm(len(zero_rows), generator=generator)[:k]
        chosen = torch.cat([chosen, zero_rows[pick]])
    return chosen.sort().values


class SparseEmbeddingUpdate:
    """The row-sparse update of one embedding matrix inside :class:`DPSGDEngine` steps.

    Args:
        weight: the embedding matrix parameter, [V, h] (must be trainable).
        noise: σ, σ_grad, σ_sel, τ from :func:`core.privacy.planner.plan_embedding_noise`.
        fest_rows: the fixed trainable rows (fest); ignored for adafest.
        seed: seed of the selection RNG (adafest); None → OS entropy.
    """

    def __init__(
        self,
        *,
        weight: nn.Parameter,
        noise: EmbeddingNoise,
        fest_rows: Sequence[int] | None = None,
        seed: int | None = None,
    ):
        if not weight.requires_grad:
            raise ValueError("the embedding matrix is frozen: nothing to update sparsely")
        self.weight, self.noise, self.mode = weight, noise, noise.mode
        self.num_rows, self.hidden = int(weight.shape[0]), int(weight.shape[1])
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.fixed_rows: torch.Tensor | None = None
        if self.mode == "fest":
            if fest_rows is None:
                raise ValueError("fest needs its public rows")
            self.fixed_rows = torch.as_tensor(sorted(set(fest_rows)), dtype=torch.long)
        self.selected = self.fixed_rows if self.fixed_rows is not None else torch.arange(0)
        self._handles: list = []
        self._saved: dict[str, torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.rows_sum = 0
        self.seconds = 0.0

    @property
    def gradient_noise_multiplier(self) -> float:
        """σ_grad: the noise multiplier the engine's DP optimizer must run at."""
        return self.noise.gradient_noise_multiplier

    # -- per logical step --------------------------------------------------------------

    def begin_step(self, token_rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Choose S for the step on these examples' token ids (before any backward)."""
        started = time.perf_counter()
        if self.fixed_rows is None:
            counts = contribution_counts(token_rows, num_rows=self.num_rows)
            self.selected = select_rows(
                counts,
                threshold=float(self.noise.threshold or 0.0),
                selection_noise=float(self.noise.selection_noise_multiplier or 0.0),
                generator=self.generator,
            )
        self.seconds += time.perf_counter() - started
        return self.selected

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook the *inner* optimizer (runs after Opacus's clip + noise + scale)."""
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(self._before_update),
            optimizer.register_step_post_hook(self._after_update),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _unselected_mask(self) -> torch.Tensor:
        keep = torch.zeros(self.num_rows, dtype=torch.bool, device=self.weight.device)
        keep[self.selected.to(self.weight.device)] = True
        return ~keep

    def _before_update(self, optimizer, args, kwargs) -> None:
        started = time.perf_counter()
        w = self.weight
        drop = self._unselected_mask()
        if w.grad is not None:
            w.grad.masked_fill_(drop[:, None], 0.0)  # no gradient, no noise outside S
        saved = {"__weight__": w.detach().clone(), "__drop__": drop}
        for name, value in optimizer.state.get(w, {}).items():
            if torch.is_tensor(value) and value.shape == w.shape:
                saved[name] = value.clone()
        self._saved = saved
        self.steps += 1
        self.rows_sum += int(self.num_rows - int(drop.sum()))
        self.seconds += time.perf_counter() - started

    @torch.no_grad()
    def _after_update(self, optimizer, args, kwargs) -> None:
        started = time.perf_counter()
        saved, self._saved = self._saved, None
        if saved is None:
            return
        w, drop = self.weight, saved.pop("__drop__")
        rows = drop[:, None]
        w.copy_(torch.where(rows, saved.pop("__weight__"), w))
        for name, value in optimizer.state.get(w, {}).items():
            if torch.is_tensor(value) and value.shape == w.shape:
                before = saved.get(name)  # None: state created by this step → a fresh row
                old = torch.zeros_like(value) if before is None else before
                value.copy_(torch.where(rows, old, value))
        self.seconds += time.perf_counter() - started

    # -- reporting, resume -------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Rows updated per step and gradient bytes vs dense (all DP: functions of S)."""
        rows = self.rows_sum / self.steps if self.steps else float(len(self.selected))
        dense_bytes = self.num_rows * self.hidden * 4
        sparse_bytes = rows * self.hidden * 4
        return {
            "mode": self.mode,
            "rows_total": self.num_rows,
            "rows_updated_per_step": round(rows, 2),
            "rows_updated_fraction": round(rows / self.num_rows, 6),
            "embedding_grad_bytes_per_step": round(sparse_bytes),
            "embedding_grad_bytes_dense": dense_bytes,
            "embedding_grad_reduction": round(dense_bytes / sparse_bytes, 2) if rows else None,
            "sparse_overhead_seconds": round(self.seconds, 3),
        }

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
