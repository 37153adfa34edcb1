"""Mean-pooled BERT sequence classifier, shipped as code inside every saved model folder.

Why: HF's ``BertForSequenceClassification`` classifies from the CLS token through a tanh
pooler; under DP-SGD that head never learned on this stack, while a head on the
attention-masked mean of the last hidden states (what all-MiniLM was trained with) did
(DESIGN.md section 8).

This file is self-contained (it imports only torch and transformers): ``save_pretrained``
copies it into the output folder and writes ``auto_map`` into ``config.json``, so the
artifact loads with ONE call::

    AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)

Without ``trust_remote_code`` the load fails loudly (unknown ``model_type``) instead of
silently building a CLS-pooler model with a random pooler.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class BertMeanPoolConfig(BertConfig):
    """A ``BertConfig`` whose model type names the mean-pooled classification head."""

    model_type = "dpc-bert-meanpool"


class BertMeanPoolForSequenceClassification(BertPreTrainedModel):
    """BERT encoder → masked mean over tokens → dropout → linear classifier.

    Parameter names match ``BertForSequenceClassification`` (``bert.*``, ``classifier.*``)
    minus the unused pooler, so a plain BERT checkpoint (e.g. MiniLM) loads into it.
    """

    config_class = BertMeanPoolConfig

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels or 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Classify a batch.

        Args:
            input_ids: token ids, shape [B, T].
            attention_mask: 1 for real tokens, 0 for padding, shape [B, T]; all ones if None.
            token_type_ids: segment ids, shape [B, T].
            position_ids: positions, shape [B, T].
            inputs_embeds: alternative to ``input_ids``, shape [B, T, H].
            labels: class ids, shape [B]; when given, ``loss`` is the mean cross-entropy.

        Returns:
            ``SequenceClassifierOutput`` with ``logits`` of shape [B, num_labels].
        """
        out = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.classify(self.mean_pool(out.last_hidden_state, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )

    def pooled_features(self, **inputs: torch.Tensor) -> torch.Tensor:
        """The encoder's masked mean over tokens, shape [B, H] (what :meth:`classify` reads).

        Args:
            inputs: the encoder's inputs (``input_ids``, ``attention_mask``, ...).
        """
        hidden = self.bert(**inputs).last_hidden_state  # [B, T, H]
        return self.mean_pool(hidden, inputs.get("attention_mask"))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head: dropout → linear, [B, H] → logits [B, num_labels]."""
        return self.classifier(self.dropout(pooled))

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of ``hidden`` [B, T, H] over the real tokens of ``attention_mask`` [B, T]."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # [B, H]
