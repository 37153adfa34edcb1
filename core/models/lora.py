"""LoRA adapters (Hu et al. 2022) for DP fine-tuning, merged into the weights at save.

Each targeted ``nn.Linear`` W (out × in) becomes W·x + (α/r)·B·A·x with A (r × in) and
B (out × r) two plain ``nn.Linear`` layers, so Opacus computes their per-example norms
(ghost clipping) like any other linear layer. B starts at zero: the adapted model starts
exactly at the pre-trained one. :func:`merge_lora` folds B·A into W and puts the plain
``nn.Linear`` back, so the saved folder is an ordinary HF model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LORA_TARGETS = ("query", "value")  # BERT self-attention projections (Hu et al.'s choice)
LORA_RANK = 8
LORA_ALPHA = 16.0


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · lora_b(lora_a(x))``; ``base`` keeps its own flags."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        self.scale = alpha / rank
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.lora_a.to(base.weight.device, base.weight.dtype)
        self.lora_b.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] → [..., out]
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(
    model: nn.Module,
    *,
    targets: tuple[str, ...] = LORA_TARGETS,
    rank: int = LORA_RANK,
    alpha: float = LORA_ALPHA,
) -> list[nn.Parameter]:
    """Wrap every ``nn.Linear`` whose name ends with one of ``targets``; return the new
    adapter parameters (A and B of each wrapped layer).

    Raises:
        ValueError: no linear layer matches ``targets``.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not found:
        raise ValueError(f"no nn.Linear named {targets} in {type(model).__name__}")
    params: list[nn.Parameter] = []
    for name, linear in found:
        parent_name, _, leaf = name.rpartition(".")
        adapted = LoRALinear(linear, rank=rank, alpha=alpha)
        setattr(model.get_submodule(parent_name), leaf, adapted)
        params += [adapted.lora_a.weight, adapted.lora_b.weight]
    return params


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W ← W + (α/r)·B·A) and put the plain
    ``nn.Linear`` back; returns how many layers were merged."""
    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            delta = module.lora_b.weight @ module.lora_a.weight  # [out, in]
            module.base.weight.add_(module.scale * delta.to(module.base.weight.dtype))
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, module.base)
            merged += 1
    return merged
