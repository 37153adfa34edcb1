"""Per-example losses for DP-SGD, and evaluation metrics.

DP-SGD clips each example's gradient, so the engine needs one loss per example (a [B]
vector), never HF's already-averaged ``outputs.loss``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from core.data import IGNORE_INDEX, EncodedDataset, iter_eval_batches

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward arguments of a collated batch (everything but ``labels``)."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def classification_loss_per_example(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of each example.

    Args:
        model: a sequence classifier returning ``logits`` [B, num_labels].
        batch: collated batch with ``labels`` [B].

    Returns:
        Loss per example, shape [B] (nats).
    """
    logits = model(**model_inputs(batch)).logits  # [B, num_labels]
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def _token_nll(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL summed per example [B] and the number of predicted tokens [B]."""
    logits = model(**model_inputs(batch)).logits  # [B, T, V]
    logits, targets = logits[:, :-1], batch["labels"][:, 1:]  # predict token t+1 from ≤ t
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(targets.shape)  # [B, T-1], 0 where ignored
    return nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def causal_lm_loss_per_example(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token NLL of each example over its own non-padding tokens.

    Args:
        model: a causal LM returning ``logits`` [B, T, V].
        batch: collated batch with ``labels`` [B, T] (-100 on padding).

    Returns:
        Loss per example, shape [B] (nats per token).
    """
    total, count = _token_nll(model, batch)
    return total / count.clamp(min=1)


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, dataset: EncodedDataset, *, batch_size: int = 64, device: str = "cpu"
) -> dict[str, float]:
    """Accuracy and the share of the most predicted class (model left in eval mode).

    Returns:
        ``{"accuracy": fraction of rows whose argmax logit is the label,
        "predicted_class_share": fraction of rows given the most frequent prediction}``
        — a share of 1.0 on a multi-class eval set means DP training did not learn.
    """
    model.eval()
    correct, counts = 0, torch.zeros(0, dtype=torch.long)
    for batch in iter_eval_batches(dataset, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        pred = model(**model_inputs(batch)).logits.argmax(dim=-1)  # [B]
        correct += int((pred == batch["labels"]).sum())
        binc = torch.bincount(pred.cpu())
        counts = torch.nn.functional.pad(counts, (0, max(0, len(binc) - len(counts))))
        counts[: len(binc)] += binc
    n = max(len(dataset), 1)
    share = float(counts.max()) / n if len(counts) else 0.0
    return {"accuracy": correct / n, "predicted_class_share": share}


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, dataset: EncodedDataset, *, batch_size: int = 16, device: str = "cpu"
) -> float:
    """exp(total next-token NLL / total predicted tokens) over all rows (eval mode)."""
    model.eval()
    nll, tokens = 0.0, 0
    for batch in iter_eval_batches(dataset, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        total, count = _token_nll(model, batch)
        nll += float(total.sum())
        tokens += int(count.sum())
    return math.exp(nll / tokens) if tokens else float("nan")
