"""Head-only DP-SGD without re-running a frozen body: each row's features computed once.

When nothing in a mean-pooled classifier's body trains (the compression recipes' default,
or ``training.train_body=false``), every DP-SGD step would run the whole frozen encoder
again to get the same pooled vector; only the head (dropout → linear) changes. Here the
body runs once per distinct row, in eval mode (no dropout inside the frozen body; the
head's dropout still applies), and later steps read the pooled vector from memory: many
epochs cost about one pass of the encoder (MiniLM-L6, 4,096 SST-2 rows, 12 epochs,
head only: 38 s instead of 15 min on one CPU thread, bench/compression.py).

Privacy: unchanged. Each example's loss is still a function of that example alone and of
the head's parameters, and the engine clips and noises it exactly as before; which rows a
step reads is still the Poisson draw. The features stay in the worker's memory for the
phase: never logged, returned or checkpointed.

The cache is valid only while the body's weights are constant. It fills as rows are first
seen, so a frozen body may be changed only before a phase's first loss (the dpimp recipes
prune a frozen body once, in ``begin_phase``); each engine gets its own cache from
:func:`frozen_body_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from core.models.mean_pooling import BertMeanPoolForSequenceClassification

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


class RowCache:
    """A tensor per distinct row (keyed by its unpadded token ids), computed on first use."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._values)

    def get(
        self,
        inputs: dict[str, torch.Tensor],
        compute: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        """The rows' values stacked, [B, ...]; ``compute`` runs once on the unseen rows.

        Args:
            inputs: a right-padded batch (``input_ids`` and ``attention_mask`` [B, T], and
                any other [B, T] model inputs).
            compute: ``sub-batch → [b, ...]`` for the rows not cached yet.
        """
        keys = [
            tuple(ids[mask.bool()].tolist())
            for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True)
        ]
        missing = [b for b, key in enumerate(keys) if key not in self._values]
        if missing:
            rows = torch.tensor(missing, device=inputs["input_ids"].device)
            values = compute({k: v.index_select(0, rows) for k, v in inputs.items()})
            for b, value in zip(missing, values, strict=True):
                self._values.setdefault(keys[b], value.detach())
        return torch.stack([self._values[key] for key in keys])


def body_is_frozen(model: nn.Module) -> bool:
    """A mean-pooled classifier of which only the head (``classifier.*``) trains."""
    return isinstance(model, BertMeanPoolForSequenceClassification) and not any(
        p.requires_grad for p in model.bert.parameters()
    )


class FrozenBodyView:
    """Stands in for the model inside a loss function: the frozen body's pooled features
    from a :class:`RowCache`, the (training) head run as usual. One view may serve several
    losses of the same frozen body (dpkd: the teacher's phase, then its logits for the
    student), so each row's features are computed once."""

    def __init__(self, model: BertMeanPoolForSequenceClassification):
        self.model, self.features = model, RowCache()

    def _pooled_in_eval_mode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        body, was_training = self.model.bert, self.model.bert.training
        body.eval()
        try:
            with torch.no_grad():
                return self.model.pooled_features(**inputs)
        finally:
            body.train(was_training)

    def __call__(self, **inputs: torch.Tensor) -> SimpleNamespace:
        pooled = self.features.get(inputs, self._pooled_in_eval_mode)  # [B, H]
        return SimpleNamespace(logits=self.model.classify(pooled))  # [B, num_labels]


def frozen_body_view(model: nn.Module) -> FrozenBodyView | None:
    """A :class:`FrozenBodyView` of a mean-pooled classifier (None for other models), to be
    used only while its body does not change."""
    if isinstance(model, BertMeanPoolForSequenceClassification):
        return FrozenBodyView(model)
    return None


def frozen_body_loss(model: nn.Module, loss_fn: LossFn, view: FrozenBodyView | None = None
                     ) -> LossFn:
    """``loss_fn`` reading a frozen body's features from a cache, or ``loss_fn`` itself.

    Applies when :func:`body_is_frozen` holds for ``model`` now; the returned function must
    be called with that same ``model`` (the engine's). ``view``: a :class:`FrozenBodyView`
    of ``model`` to share (default: a new one).
    """
    if not body_is_frozen(model):
        return loss_fn
    if view is not None and view.model is not model:
        raise ValueError("the FrozenBodyView is of another model")
    cached = view or FrozenBodyView(model)  # type: ignore[arg-type]

    def loss_with_cached_body(engine_model: nn.Module, batch: dict[str, torch.Tensor]):
        if engine_model is not model:
            raise ValueError("frozen_body_loss was built for another model")
        return loss_fn(cached, batch)  # type: ignore[arg-type]

    return loss_with_cached_body
