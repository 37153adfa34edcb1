"""What a DP-SGD phase trains, and at which learning rates: one rule for every recipe.

Unset ``training.train_body``: a causal LM trains its whole body; a classifier trains its
freshly initialised head plus, in dp_finetune, the body's biases and normalisation weights
(BitFit), and in the compression recipes nothing else. Measured on SST-2 with MiniLM-L6
(bench/dp_finetune_quality.py, bench/compression.py), one run per cell:

* dp_finetune, 8,192 rows, ε = 8: BitFit 81.0-81.2 % dev accuracy, head only 79.6 % (the
  same as the non-private head-only run); the whole body under DP lost 4-25 points (body lr
  1e-5 to 5e-4, batch 256 to 1,024).
* compression recipes, 4,096 rows, ε = 8, head only vs BitFit: dpkd student 77.8 vs 74.2 %,
  dpimp_structured 75.6 vs 74.0 %, dpimp_unstructured 76.6 vs 75.5 %; the whole body (1,024
  rows) gave 51-69 % against 73-75 % for the head only.
* a DP head needs lr 2e-2..5e-2 whatever the body's (2e-3 is far too low, DESIGN §8);
  BitFit's few parameters need ~1e-3 (:data:`core.specs.BITFIT_LEARNING_RATE`).

BitFit leaves every weight matrix at its pre-trained value, so pruning scores computed from
weight magnitudes read public weights only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.models import split_trainable
from core.privacy.engine import EngineConfig
from core.specs import BodyTraining, JobSpec

HEAD_LR = 2e-2
# dp_finetune's default body is core.specs.FINETUNE_CLASSIFIER_BODY (the planner needs it too)
COMPRESSION_CLASSIFIER_BODY: BodyTraining = False  # dpkd, dpimp_structured, dpimp_unstructured


def body_training(spec: JobSpec, *, task: str, classifier_body: BodyTraining) -> BodyTraining:
    """What of the body trains: ``training.train_body``, else the recipe's default."""
    return spec.training.body_trained(classifier_body if task == "classification" else True)


@dataclass(frozen=True)
class DPOptimizer:
    """AdamW over the trainable parameters, and what it trains (for the job's metrics)."""

    optimizer: torch.optim.Optimizer
    train_body: BodyTraining
    learning_rate: float
    head_learning_rate: float | None
    trainable_parameters: int


def dp_optimizer(
    model: nn.Module, spec: JobSpec, *, task: str, classifier_body: BodyTraining
) -> DPOptimizer:
    """Freeze what does not train and build AdamW with per-group lr (body vs fresh head).

    Args:
        classifier_body: the recipe's default for a classifier's body (see the module doc).
    """
    training = spec.training
    train_body = body_training(spec, task=task, classifier_body=classifier_body)
    body, head = split_trainable(
        model, train_body=train_body, train_embeddings=spec.embedding.trained(train_body)
    )
    body_lr = training.body_learning_rate(train_body)
    head_lr = training.head_learning_rate or max(HEAD_LR, body_lr)
    groups = [{"params": body, "lr": body_lr}, {"params": head, "lr": head_lr}]
    return DPOptimizer(
        optimizer=torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0),
        train_body=train_body,
        learning_rate=body_lr,
        head_learning_rate=head_lr if head else None,
        trainable_parameters=sum(p.numel() for p in body + head),
    )


def engine_config(spec: JobSpec, *, step_offset: int = 0) -> EngineConfig:
    """The DP engine's options from the job spec (clipping mode, physical batch, lr
    schedule, group-wise embedding clipping) and the worker's checkpoint interval
    (``DPC_CHECKPOINT_EVERY_STEPS``).

    Args:
        step_offset: steps of the phase run before this engine's first (a phase split into
            segments), so the lr schedule follows the whole phase.
    """
    from core.settings import get_settings

    training = spec.training
    ghost = training.grad_sample_mode == "ghost"  # group clipping needs ghost clipping
    return EngineConfig(
        grad_sample_mode=training.grad_sample_mode,
        physical_batch_size=training.physical_batch_size,
        checkpoint_every=get_settings().checkpoint_every_steps,
        lr_schedule=training.lr_schedule,
        step_offset=step_offset,
        embedding_clip_share=spec.embedding.group_clip_share() if ghost else None,
    )
