"""Knowledge distillation pieces of DPKD (Mireshghallah et al. 2022, Alg. 1).

* :func:`evenly_spaced_layers`: which k of the teacher's L layers a student copies (with
  the teacher's embeddings and head, :func:`core.compress.pruning.shrink_model`;
  post-processing of the DP teacher's weights: no privacy cost);
* :func:`kd_loss_per_example`: the per-example distillation loss (Hinton et al. 2015)

      ℓ_i = (1 − α) · CE(y_i, s_i) + α · T² · KL(softmax(t_i / T) ‖ softmax(s_i / T))

  as a [B] vector, so that the DP engine clips each example's gradient (ghost clipping
  backpropagates the vector twice, DESIGN section 8);
* :func:`make_kd_loss`: the engine's ``loss_fn`` — the teacher runs in eval mode under
  ``torch.no_grad()`` and is never wrapped by Opacus: only the student is trained, and
  the teacher's outputs on a batch are part of that example's loss, clipped with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.data import IGNORE_INDEX
from core.errors import InvalidRequest
from core.training.frozen_body import RowCache
from core.training.losses import model_inputs


def evenly_spaced_layers(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layers the student copies: every (L/k)-th layer, ending at the last one.

    ``evenly_spaced_layers(6, 3) == [1, 3, 5]``; ``evenly_spaced_layers(12, 4) == [2, 5,
    8, 11]``. The last layer is always kept: the head was trained on its output.

    Raises:
        InvalidRequest: k < 1 or k > L.
    """
    L, k = num_teacher_layers, num_student_layers
    if not 1 <= k <= L:
        raise InvalidRequest(
            f"compression.student_layers={k} must be between 1 and the base model's {L} layers",
            param="compression.student_layers",
        )
    return [round((i + 1) * L / k) - 1 for i in range(k)]


def kd_loss_per_example(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """(1 − α)·CE + α·T²·KL(teacher ‖ student), one value per example.

    Args:
        student_logits: [B, C] (classification) or [B, S, V] (causal LM).
        teacher_logits: same shape as ``student_logits``.
        labels: [B] class ids, or [B, S] token ids with -100 on padding (causal LM: the
            logits at position t predict token t+1; both terms average over the example's
            predicted tokens).
        alpha: weight α ∈ [0, 1] of the distillation term.
        temperature: T > 0; the KL term is scaled by T² so its gradient does not shrink
            with T (Hinton et al. 2015).

    Returns:
        Loss per example, shape [B] (nats).
    """
    if student_logits.dim() == 3:  # causal LM: shift, then per-token terms [B, S-1]
        student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        labels = labels[:, 1:]
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # [B] or [B, S-1]
    ce = F.cross_entropy(
        student_logits.reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(labels.shape)
    loss = (1 - alpha) * ce + alpha * temperature**2 * kl
    if loss.dim() == 2:  # mean over the example's own predicted tokens
        tokens = (labels != IGNORE_INDEX).to(loss.dtype)
        loss = (loss * tokens).sum(dim=1) / tokens.sum(dim=1).clamp(min=1)
    return loss


def make_kd_loss(
    teacher: nn.Module, *, alpha: float, temperature: float, cache_teacher_logits: bool = False,
    teacher_forward: Callable[..., Any] | None = None,
):
    """The DP engine's ``loss_fn(student, batch) -> [B]`` for distillation from ``teacher``.

    The teacher is put in eval mode (no dropout), its parameters frozen, and it runs under
    ``torch.no_grad()``: no gradient, no Opacus hook, no per-example norm involves it.

    Args:
        cache_teacher_logits: keep each row's teacher logits in memory after their first
            computation (they never change); for classifiers ([C] per row), not for LMs
            ([T, V] per row).
        teacher_forward: what computes the teacher's ``.logits`` from the inputs instead of
            ``teacher`` itself (a :class:`~core.training.frozen_body.FrozenBodyView` of it
            whose features are already cached).
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    cache = RowCache() if cache_teacher_logits else None

    forward = teacher_forward or teacher

    def teacher_logits_of(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return forward(**inputs).logits

    def loss_fn(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs(batch)
        teacher_logits = (
            teacher_logits_of(inputs) if cache is None else cache.get(inputs, teacher_logits_of)
        )
        student_logits = student(**inputs).logits
        return kd_loss_per_example(
            student_logits, teacher_logits, batch["labels"], alpha=alpha, temperature=temperature
        )

    return loss_fn
