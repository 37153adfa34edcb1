"""DP-SGD on Opacus 1.6 (Abadi et al. 2016, Alg. 1), driven by a precomputed plan.

One logical step t (Poisson batch L_t, each row in with probability q):

    g̃_t = ( Σ_{i ∈ L_t} g_i · min(1, C / ‖g_i‖₂)  +  N(0, σ²C²·I) ) / (q·N)

with σ = ``phase.noise_multiplier``, C = ``phase.max_grad_norm`` and q = ``phase.sample_rate``
taken from the plan as given — the engine never computes σ. Noise is added once to the
summed clipped gradient and the sum divided by the *expected* batch q·N (Opacus
``loss_reduction="mean"`` semantics), then the wrapped optimizer steps.

Opacus pieces are attached without wrapping the model (``wrap_model=False``: the HF
model keeps its interface and its ``save_pretrained`` keys). This is what
``PrivacyEngine.make_private(wrap_model=False, poisson_sampling=False)`` assembles, minus
its DataLoader-derived q and its accountant: q comes from the plan, sampling is ours
(:class:`core.data.PoissonSampler`) and the service's ledger does the accounting.

Logical batches ≫ physical (DESIGN section 8 fast path): each Poisson batch is sorted by
length and split into chunks of ``physical_batch_size`` rows with tight padding;
``optimizer.signal_skip_step(do_skip=not last)`` before each chunk's ``step()`` makes
Opacus accumulate clipped sums and add noise once, on the last chunk.

Randomness: the Poisson sampler and the noise have their own generators. Unless a test
passes explicit seeds they are seeded from OS entropy — never from the job spec's public
``training.seed``, since a known seed would reveal the noise and the sampled rows. Their
states go into the (worker-private) checkpoints, so a resumed run continues the same
streams. ``secure_mode`` (Opacus's CSPRNG and 4-draw noise, robust to floating-point
attacks) needs ``torchcsprng``, which has no build for torch 2.13: it raises until one is
installed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from torch import nn

from core.data import EncodedDataset, PoissonSampler, split_physical
from core.errors import InvalidRequest
from core.privacy.group_clipping import EmbeddingGroupClipping
from core.privacy.norm_pass import NormPass, clipped_sum_backward
from core.privacy.plan import PhasePlan
from core.privacy.sparse_embedding import SparseEmbeddingUpdate
from core.recipe_api import RecipeHooks
from core.training.checkpoint import (
    ResumeState,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # -> loss per example [B]


@dataclass(frozen=True)
class EngineConfig:
    """How to run a DP phase (not *what* it costs: that is the plan).

    Attributes:
        grad_sample_mode: "ghost" (ghost clipping: per-example norms without per-example
            gradients; default) or "hooks" (materialised per-example gradients; fallback).
        physical_batch_size: rows per forward/backward chunk.
        checkpoint_every: save a resume checkpoint every K logical steps (and at the end).
        sampler_seed: seed of the Poisson sampler; None → OS entropy (production).
        noise_seed: seed of the Gaussian noise; None → OS entropy (production).
        secure_mode: Opacus secure RNG + noise; requires ``torchcsprng``.
        lr_schedule: "constant", or "linear": every group's lr × (1 − (t − 1)/T) at
            logical step t of the phase's T planned steps (stateless in t, so a resumed
            run continues the same curve).
        step_offset: steps of the phase run before this engine's step 1 (a phase split
            into segments, dpimp_structured), so that t = offset + the engine's step.
        embedding_clip_share: ρ of group-wise clipping when the word embedding trains
            (:mod:`core.privacy.group_clipping`: the embedding's per-example gradient is
            clipped to ρC, the rest to √(1−ρ²)·C; ghost mode only). None: flat clipping.
    """

    grad_sample_mode: Literal["ghost", "hooks"] = "ghost"
    physical_batch_size: int = 32
    checkpoint_every: int = 50
    sampler_seed: int | None = None
    noise_seed: int | None = None
    secure_mode: bool = False
    lr_schedule: Literal["constant", "linear"] = "constant"
    step_offset: int = 0
    embedding_clip_share: float | None = None


@dataclass(frozen=True)
class PhaseResult:
    """What one (possibly resumed) run of a DP phase did.

    Attributes:
        phase: phase name.
        resumed_from: step of the checkpoint this attempt started from (0: fresh).
        last_step: last logical step run (the index ``begin_phase`` returned).
        steps_run: logical steps run by this attempt.
        train_loss: mean per-step train loss over the whole phase (nats; non-private).
        samples_seen: rows processed over the whole phase.
        samples_this_attempt: rows processed by this attempt.
        seconds: wall time of this attempt.
    """

    phase: str
    resumed_from: int
    last_step: int
    steps_run: int
    train_loss: float | None
    samples_seen: int
    samples_this_attempt: int
    seconds: float


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """Multiplier of the base learning rates at logical step ``step`` (1-based) of
    ``total_steps``: 1 for "constant"; 1 − (step − 1)/total_steps for "linear" (1 at the
    first step, 1/T at the last)."""
    if schedule == "constant":
        return 1.0
    return 1.0 - (min(step, total_steps) - 1) / total_steps


class DPSGDEngine:
    """Runs the planned logical steps of one DP-SGD phase.

    Args:
        model: the plain HF model; trained in place (``requires_grad`` decides what).
        optimizer: a standard optimizer over the trainable parameters (per-group lr).
        phase: the plan of this phase (q, σ, C, steps).
        dataset: the encoded private rows; N = ``len(dataset)``.
        loss_fn: ``(model, batch) -> loss per example [B]``.
        hooks: the runner's hooks (charging, cancel, checkpoints, events).
        config: engine options.
        device: "cpu", "cuda", "cuda:1", ...
        sparse_embedding: optional row-sparse embedding update (``embedding.mode`` fest /
            adafest, :mod:`core.privacy.sparse_embedding`). None (default): dense DP-SGD,
            unchanged. When set, the DP optimizer noises at its σ_grad (= σ for fest; for
            adafest σ_grad > σ, which together with the selection noise is accounted as σ),
            and only the selected embedding rows are updated each step.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        phase: PhasePlan,
        dataset: EncodedDataset,
        loss_fn: LossFn,
        hooks: RecipeHooks,
        config: EngineConfig | None = None,
        device: str = "cpu",
        sparse_embedding: SparseEmbeddingUpdate | None = None,
    ):
        if phase.mechanism != "poisson_gaussian" or phase.max_grad_norm is None:
            raise InvalidRequest(
                f"phase {phase.name!r} is not a DP-SGD phase (mechanism "
                f"{phase.mechanism!r}, max_grad_norm {phase.max_grad_norm})"
            )
        self.model, self.phase, self.dataset = model, phase, dataset
        self.loss_fn, self.hooks, self.device = loss_fn, hooks, device
        self.config = config or EngineConfig()
        self.sparse_embedding = sparse_embedding
        noise_multiplier = phase.noise_multiplier
        if sparse_embedding is not None:
            if not math.isclose(sparse_embedding.noise.noise_multiplier, phase.noise_multiplier):
                raise InvalidRequest(
                    f"the sparse embedding update was planned for σ = "
                    f"{sparse_embedding.noise.noise_multiplier}, the phase for σ = "
                    f"{phase.noise_multiplier}; plan both from the same phase"
                )
            noise_multiplier = sparse_embedding.gradient_noise_multiplier  # σ_grad
        self.max_grad_norm = float(phase.max_grad_norm)  # C
        self.expected_batch_size = phase.sample_rate * len(dataset)  # q·N, may be fractional
        self.sampler = PoissonSampler(
            num_samples=len(dataset),
            sample_rate=phase.sample_rate,
            seed=_seed_or_entropy(self.config.sampler_seed),
        )
        self.noise_generator = _noise_generator(self.config, device)
        self.model.to(device)
        self.model.train()  # ghost clipping needs train mode before its hooks attach
        mode = self.config.grad_sample_mode
        kw = {"max_grad_norm": self.max_grad_norm} if mode == "ghost" else {}
        self.grad_hooks = prepare_module(
            model, grad_sample_mode=mode, wrap_model=False, batch_first=True,
            loss_reduction="mean", **kw,
        )  # fmt: skip
        optim_cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
        self.optimizer = optim_cls(
            optimizer=optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self.noise_generator,
            secure_mode=self.config.secure_mode,
        )
        if sparse_embedding is not None:
            sparse_embedding.attach(self.optimizer.original_optimizer)
        self.norm_pass = NormPass(model) if mode == "ghost" else None
        self.group_clipping = self._group_clipping(model)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]  # before any resume

    # -- the phase ---------------------------------------------------------------------

    def run(self) -> PhaseResult:
        """Resume from the latest checkpoint if any, then run up to ``begin_phase``'s step.

        ``hooks.before_step`` is called before each logical step touches data; when it
        raises (``JobCancelled``, ``LeaseLost``) the exception propagates between steps,
        so the last checkpoint and the model are consistent. Opacus hooks are removed on
        the way out, leaving a plain HF model.
        """
        name, started = self.phase.name, time.monotonic()
        ckpt_dir = self.hooks.checkpoint_dir(name)
        state = self._resume(ckpt_dir) or ResumeState(
            phase=name,
            step=0,
            sample_rate=self.phase.sample_rate,
            noise_multiplier=self.phase.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            grad_sample_mode=self.config.grad_sample_mode,
        )
        resumed_from, samples_before = state.step, state.samples_seen
        last = self.hooks.begin_phase(name, resumed_step=resumed_from)
        self.hooks.event(
            "dp_sgd.started",
            {"phase": name, "resumed_step": resumed_from, "last_step": last,
             "sample_rate": self.phase.sample_rate,
             "noise_multiplier": self.phase.noise_multiplier,
             "max_grad_norm": self.phase.max_grad_norm,
             "expected_batch_size": self.expected_batch_size,
             "grad_sample_mode": self.config.grad_sample_mode,
             "physical_batch_size": self.config.physical_batch_size,
             **self._sparse_embedding_summary()},
        )  # fmt: skip
        try:
            for step in range(resumed_from + 1, last + 1):
                self.hooks.before_step(name, step)
                indices = self.sampler.sample()
                self._set_learning_rates(step)
                loss = self._logical_step(indices)
                state = _advance(state, step, loss, len(indices))
                metrics = {"batch_size": float(len(indices))}
                if self.sparse_embedding is not None:  # |S|: a DP quantity
                    metrics["embedding_rows"] = float(len(self.sparse_embedding.selected))
                if not math.isnan(loss):  # an empty Poisson batch has no loss (and no NaN)
                    metrics["loss"] = loss
                self.hooks.after_step(name, step, metrics)
                if step % self.config.checkpoint_every == 0 or step == last:
                    self._checkpoint(ckpt_dir, state)
        finally:  # one run per engine: leave a plain HF model behind
            self.optimizer.zero_grad(set_to_none=True)
            self.grad_hooks.cleanup()
            if self.norm_pass is not None:
                self.norm_pass.remove()
            if self.group_clipping is not None:
                self.group_clipping.remove()
            if self.sparse_embedding is not None:
                self.sparse_embedding.detach()
        seconds = time.monotonic() - started
        mean_loss = state.loss_sum / state.loss_steps if state.loss_steps else None
        self.hooks.event(
            "phase.finished",
            {"phase": name, "step": state.step, "steps_run": state.step - resumed_from,
             "train_loss": mean_loss, "seconds": round(seconds, 3)},
        )  # fmt: skip
        return PhaseResult(
            phase=name,
            resumed_from=resumed_from,
            last_step=state.step,
            steps_run=state.step - resumed_from,
            train_loss=mean_loss,
            samples_seen=state.samples_seen,
            samples_this_attempt=state.samples_seen - samples_before,
            seconds=seconds,
        )

    def _set_learning_rates(self, step: int) -> None:
        factor = lr_factor(self.config.lr_schedule, self.config.step_offset + step,
                           self.phase.steps)  # fmt: skip
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def _logical_step(self, indices: list[int]) -> float:
        """One DP-SGD update on the Poisson batch ``indices``; returns its mean loss."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if self.sparse_embedding is not None:  # S of this step, before any backward
            self.sparse_embedding.begin_step([self.dataset.input_ids[i] for i in indices])
        chunks = split_physical(indices, self.dataset.lengths, self.config.physical_batch_size)
        if not chunks:  # an empty Poisson batch still releases noise: θ -= lr·N(0,σ²C²)/(qN)
            self._step_on_empty_batch()
            return math.nan
        loss_sum = 0.0
        for i, chunk in enumerate(chunks):
            batch = {k: v.to(self.device) for k, v in self.dataset.collate(chunk).items()}
            loss_per_example = self.loss_fn(self.model, batch)  # [b]
            loss_sum += float(loss_per_example.detach().sum())
            opt.signal_skip_step(do_skip=i < len(chunks) - 1)
            if self.group_clipping is not None:
                self.group_clipping.backward(self.grad_hooks, self.norm_pass, loss_per_example)
            elif self.norm_pass is not None:
                self._ghost_clipping_backward(loss_per_example)
            else:
                loss_per_example.mean().backward()
            opt.step()  # clips + accumulates; on the last chunk also noises and updates
            opt.zero_grad(set_to_none=True)  # keeps the accumulated sum while skipping
        return loss_sum / len(indices)

    def _ghost_clipping_backward(self, loss_per_example: torch.Tensor) -> None:
        """Leaves Σ_i c_i·∇loss_i in ``.grad``, c_i = min(1, C/‖g_i‖) (Opacus' two passes,
        loss_reduction "mean", with the lighter first pass of :mod:`core.privacy.norm_pass`)."""
        self.norm_pass.run(loss_per_example)  # 1st pass: per-example norms ‖g_i‖
        coef = self.grad_hooks.get_clipping_coef()
        clipped_sum_backward(self.grad_hooks, coef, loss_per_example)  # 2nd: the clipped sum

    def _group_clipping(self, model: nn.Module) -> EmbeddingGroupClipping | None:
        """The embedding's clipping group when group-wise clipping applies, else None."""
        share = self.config.embedding_clip_share
        if share is None:
            return None
        if self.config.grad_sample_mode != "ghost":
            raise InvalidRequest(
                "group-wise embedding clipping (embedding.clip_share) needs "
                "training.grad_sample_mode='ghost'", param="embedding.clip_share",
            )  # fmt: skip
        embedding = model.get_input_embeddings()
        if not embedding.weight.requires_grad:  # nothing to split: flat clipping
            return None
        return EmbeddingGroupClipping(embedding, max_grad_norm=self.max_grad_norm, share=share)

    def _step_on_empty_batch(self) -> None:
        for p in self.optimizer.params:
            if self.config.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:  # zero per-example gradients for a batch of 0 rows
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.signal_skip_step(do_skip=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints -------------------------------------------------------------------

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"sampler": self.sampler.generator.get_state(), "torch": torch.get_rng_state()}
        if isinstance(self.noise_generator, torch.Generator):
            states["noise"] = self.noise_generator.get_state()
        if str(self.device).startswith("cuda"):
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.sparse_embedding is not None:
            states["sparse_embedding"] = self.sparse_embedding.rng_state()
        return states

    def _checkpoint(self, ckpt_dir, state: ResumeState) -> None:
        save_checkpoint(
            ckpt_dir, model=self.model, optimizer=self.optimizer,
            rng_states=self._rng_states(), state=state,
        )  # fmt: skip
        self.hooks.event("checkpoint.saved", {"phase": state.phase, "step": state.step})

    def _resume(self, ckpt_dir) -> ResumeState | None:
        found = find_checkpoint(ckpt_dir)
        if found is None:
            return None
        folder, state = found
        planned = (self.phase.name, self.phase.sample_rate, self.phase.noise_multiplier,
                   self.max_grad_norm)  # fmt: skip
        saved = (state.phase, state.sample_rate, state.noise_multiplier, state.max_grad_norm)
        if saved != planned:
            raise InvalidRequest(
                f"checkpoint {folder} was written for (phase, q, σ, C) = {saved}, but the "
                f"plan says {planned}; refusing to mix two mechanisms in one phase"
            )
        rng = load_checkpoint(folder, model=self.model, optimizer=self.optimizer,
                              device=self.device)  # fmt: skip
        self.sampler.generator.set_state(rng["sampler"])
        torch.set_rng_state(rng["torch"])
        if "noise" in rng and isinstance(self.noise_generator, torch.Generator):
            self.noise_generator.set_state(rng["noise"])
        if "cuda" in rng and str(self.device).startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if "sparse_embedding" in rng and self.sparse_embedding is not None:
            self.sparse_embedding.set_rng_state(rng["sparse_embedding"])
        log.info("resuming phase %s from step %d (%s)", state.phase, state.step, folder)
        return state

    def _sparse_embedding_summary(self) -> dict:
        se = self.sparse_embedding
        if se is None:
            return {}
        return {"embedding_mode": se.mode,
                "gradient_noise_multiplier": se.gradient_noise_multiplier,
                "selection_noise_multiplier": se.noise.selection_noise_multiplier,
                "selection_threshold": se.noise.threshold}  # fmt: skip


def _advance(state: ResumeState, step: int, loss: float, batch_size: int) -> ResumeState:
    has_loss = not math.isnan(loss)
    return dataclasses.replace(
        state,
        step=step,
        loss_sum=state.loss_sum + (loss if has_loss else 0.0),
        loss_steps=state.loss_steps + int(has_loss),
        samples_seen=state.samples_seen + batch_size,
    )


def _seed_or_entropy(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


def _noise_generator(config: EngineConfig, device: str):
    if config.secure_mode:
        try:
            import torchcsprng  # type: ignore[import-not-found]
        except ImportError as e:
            raise InvalidRequest(
                "secure_mode needs the torchcsprng package (cryptographically secure noise "
                "robust to floating-point attacks), which is not installed on this worker",
            ) from e
        return torchcsprng.create_random_device_generator("/dev/urandom")
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_or_entropy(config.noise_seed))
    return gen
