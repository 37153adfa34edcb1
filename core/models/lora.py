"""Low-rank adapters on the attention projections (LoRA, Hu et al. 2022), merged for saving.

Under DP-SGD the noise lands on every trained coordinate, so training few parameters helps
(Yu et al. 2022, "Differentially private fine-tuning of language models", used LoRA on the
query and value projections). :func:`add_lora` wraps each attention query and value
``nn.Linear`` as W·x + b + (α/r)·B·A·x with W, b frozen, A [r × in] random and B [out × r]
zero (the model's output is unchanged at the start). A and B are plain ``nn.Linear`` layers,
so Opacus' ghost clipping clips them like any other. :func:`merge_lora` folds B·A into W and
puts plain ``nn.Linear`` layers back: the saved folder loads with ``transformers`` alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# attention query / value projections: BERT (query, value), Llama (q_proj, v_proj)
TARGET_NAMES = frozenset({"query", "value", "q_proj", "v_proj"})
LORA_ALPHA_PER_RANK = 2.0  # α = 2r: the update is scaled by α/r = 2


class LoRALinear(nn.Module):
    """``base(x) + scale · lora_b(lora_a(x))``; ``base`` frozen, ``lora_b`` starts at 0."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base, self.scale = base, LORA_ALPHA_PER_RANK
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        kwargs = {"bias": False, "device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, rank, **kwargs)
        self.lora_b = nn.Linear(rank, base.out_features, **kwargs)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))

    def merged(self) -> nn.Linear:
        """The base layer with W ← W + scale·B·A (in place; returns ``self.base``)."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_b.weight @ self.lora_a.weight)
        return self.base


def add_lora(model: nn.Module, rank: int) -> int:
    """Wrap every attention query / value projection of ``model`` (in place).

    Returns:
        how many layers were wrapped.

    Raises:
        ValueError: the model has no layer named like a query or value projection.
    """
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in TARGET_NAMES and isinstance(child, nn.Linear)
    ]
    if not targets:
        raise ValueError(f"no attention projection named {sorted(TARGET_NAMES)} to adapt")
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, rank))
    return len(targets)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and unwrap it (in place); returns how many."""
    wrapped = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, LoRALinear)
    ]
    for parent, name, child in wrapped:
        setattr(parent, name, child.merged())
    return len(wrapped)


def is_lora_parameter(name: str) -> bool:
    """A parameter of an adapter (``….lora_a.weight`` / ``….lora_b.weight``)."""
    return ".lora_a." in name or ".lora_b." in name
