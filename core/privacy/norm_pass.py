"""The first backward of ghost clipping, without the weight gradients it does not need.

Ghost clipping (Li et al. 2022; Opacus ``grad_sample_mode="ghost"``) backpropagates twice
per physical batch: pass 1 only feeds Opacus' module hooks, which compute each example's
gradient norm ‖g_i‖ from the layer's activations and backprops; pass 2 backpropagates
Σ_i c_i·loss_i with c_i = min(1, C/‖g_i‖) and yields the clipped sum. Opacus runs pass 1
as a plain ``loss.backward()``, which also computes every weight gradient ∂loss/∂W and
then throws it away. For a linear layer that is one of the two matmuls of its backward.

:class:`NormPass` runs pass 1 as ``torch.autograd.grad`` with respect to a subset of the
trainable parameters. Autograd executes only the nodes on paths from the loss to that
subset, and a linear node computes ∂W only when W is in it. The subset leaves out the
weight of every trainable ``nn.Linear`` whose input carried a gradient in this forward:
the backward must cross that input anyway, to reach whatever trainable tensor made it
carry one, so the layer's hook still fires. Everything else stays in (biases, norms,
embeddings, linear layers fed by frozen parts). After the pass every trainable
parameter's hook must have fired (Opacus' ``_forward_counter`` back to 0), else it raises
rather than clip with a stale norm. :func:`clipped_sum_backward` is pass 2.
"""

from __future__ import annotations

import torch
from torch import nn


class NormPass:
    """Pass 1 of ghost clipping for one model; call :meth:`remove` when the run ends."""

    def __init__(self, model: nn.Module):
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._fed_by_gradient: set[int] = set()  # id(W): a call this forward had a grad input
        self._fed_without: set[int] = set()  # id(W): a call this forward had a frozen input
        self._handles = [
            module.register_forward_pre_hook(self._on_linear_input)
            for module in model.modules()
            if isinstance(module, nn.Linear) and module.weight.requires_grad
        ]

    def _on_linear_input(self, module: nn.Linear, args: tuple) -> None:
        if not torch.is_grad_enabled():  # no graph, no pass 1
            return
        fed = self._fed_by_gradient if args[0].requires_grad else self._fed_without
        fed.add(id(module.weight))

    def inputs(self) -> list[torch.Tensor]:
        """The trainable tensors pass 1 differentiates (all but the skippable weights)."""
        skippable = self._fed_by_gradient - self._fed_without
        return [p for p in self.trainable if id(p) not in skippable]

    def run(self, loss_per_example: torch.Tensor) -> None:
        """Backpropagate mean(loss) for Opacus' per-example norms; ``.grad`` is untouched.

        Args:
            loss_per_example: [B], from the last forward with gradients enabled.
        """
        try:
            torch.autograd.grad(
                loss_per_example.mean(), self.inputs(), retain_graph=True, allow_unused=True
            )
        finally:
            self._fed_by_gradient, self._fed_without = set(), set()
        missed = sum(getattr(p, "_forward_counter", 0) != 0 for p in self.trainable)
        if missed:
            raise RuntimeError(
                f"ghost clipping: {missed} trainable parameter(s) got no per-example norm "
                "in the first backward; refusing to clip with a stale norm"
            )

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def clipped_sum_backward(grad_hooks, coef: torch.Tensor, loss_per_example: torch.Tensor) -> None:
    """Pass 2 of ghost clipping: add Σ_i coef_i·∇loss_i to ``.grad``, Opacus' hooks off.

    Args:
        grad_hooks: the model's Opacus ghost-clipping hooks.
        coef: [B] per-example clipping factors.
        loss_per_example: [B], whose graph pass 1 retained.
    """
    grad_hooks.disable_hooks()
    try:
        (coef.to(loss_per_example.device) * loss_per_example).sum().backward()
    finally:
        grad_hooks.enable_hooks()
