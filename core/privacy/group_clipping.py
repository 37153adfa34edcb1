"""Group-wise clipping of the word embedding vs the rest (ghost clipping only).

Flat clipping bounds each example's whole gradient: ‖[g_E, g_R]‖₂ ≤ C. When the word
embedding E trains next to a fresh task head, its per-example gradient grows with the
head's weights (∂loss/∂E passes through them) and soon takes most of C: measured on
MiniLM-L6 + SST-2, the embedding's share of ‖g‖² goes from 5 % at initialisation to 56 %
once the head has grown 5×, so every clipped example carries less head signal against the
same noise, and a trained embedding ended 3-4 points BELOW a frozen one at ε = 3 even with
an embedding lr of 1e-9 (bench/results/embedding_sparsity_lr1e-9.json).

Group-wise clipping (He et al., ICLR 2023) gives each group its own budget,

    g_E,i · min(1, ρC / ‖g_E,i‖)      and      g_R,i · min(1, √(1−ρ²)·C / ‖g_R,i‖)

so ‖clip(g_i)‖² ≤ ρ²C² + (1−ρ²)C² = C²: the sensitivity of the summed gradient is still C,
the noise is still N(0, σ²C²) on every coordinate, and the accounting is unchanged. ρ is
``embedding.clip_share``.

With ghost clipping the second backward weights each example's loss by ONE coefficient.
We weight it by c_R,i and rescale the embedding's per-example backprops by c_E,i / c_R,i
with a tensor hook on the embedding output. The embedding is the first layer (its input
is token ids), so that rescale reaches the embedding weight's gradient and nothing else.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.privacy.norm_pass import clipped_sum_backward


def group_clip_factors(
    embedding_norms: torch.Tensor, rest_norms: torch.Tensor, *, max_grad_norm: float,
    embedding_share: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-example clip factors (c_E, c_R) of the embedding and of the rest, each in (0, 1].

    Args:
        embedding_norms: ‖g_E,i‖₂ per example [B].
        rest_norms: ‖g_R,i‖₂ per example [B] (zeros when nothing else trains).
        max_grad_norm: C.
        embedding_share: ρ ∈ (0, 1): the embedding's budget is ρC, the rest's √(1−ρ²)·C.
    """
    if not 0 < embedding_share < 1:
        raise ValueError(f"embedding_share must be in (0, 1), got {embedding_share}")
    budget_e = embedding_share * max_grad_norm
    budget_r = math.sqrt(1 - embedding_share**2) * max_grad_norm
    c_e = (budget_e / (embedding_norms + 1e-6)).clamp(max=1.0)
    c_r = (budget_r / (rest_norms + 1e-6)).clamp(max=1.0)
    return c_e, c_r


class EmbeddingGroupClipping:
    """Ghost clipping with the word embedding as its own group, for one engine run.

    A forward hook on the embedding registers a tensor hook on its output; that hook is the
    identity except inside the second backward of :meth:`backward`, where it multiplies
    example i's backprops by c_E,i / c_R,i. Call :meth:`remove` when the run ends.
    """

    def __init__(self, embedding: nn.Module, *, max_grad_norm: float, share: float):
        self.weight: nn.Parameter = embedding.weight
        self.max_grad_norm, self.share = max_grad_norm, share
        self._scale: torch.Tensor | None = None
        self._handle = embedding.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if output.requires_grad:
            output.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            return grad
        return grad * self._scale.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))

    def remove(self) -> None:
        self._handle.remove()

    def backward(self, grad_hooks, norm_pass, loss_per_example: torch.Tensor) -> None:
        """Leaves Σ_i [c_E,i·g_E,i, c_R,i·g_R,i] in ``.grad``.

        The engine's ghost-clipping backward (loss_reduction "mean") with the two
        per-group coefficients in place of the flat one.

        Args:
            grad_hooks: Opacus ghost-clipping hooks of the model (``_norm_sample`` per
                parameter).
            norm_pass: the model's :class:`core.privacy.norm_pass.NormPass`.
            loss_per_example: [B].
        """
        norm_pass.run(loss_per_example)  # 1st pass: per-example norms
        embedding_norms = self.weight._norm_sample
        rest = [p._norm_sample for p in grad_hooks.trainable_parameters if p is not self.weight]
        rest_norms = (
            torch.stack([n.to(embedding_norms.device) for n in rest]).norm(2, dim=0)
            if rest else torch.zeros_like(embedding_norms)
        )  # fmt: skip
        c_e, c_r = group_clip_factors(embedding_norms, rest_norms,
                                      max_grad_norm=self.max_grad_norm,
                                      embedding_share=self.share)  # fmt: skip
        self._scale = (c_e / c_r).to(loss_per_example.device)
        try:  # 2nd pass: Σ c_R,i·∇loss_i, the embedding's part rescaled to c_E,i
            clipped_sum_backward(grad_hooks, c_r, loss_per_example)
        finally:
            self._scale = None
