"""Ghost clipping's first backward: which weight gradients it skips, and its guard
against clipping with a norm that no hook computed."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from torch import nn

from core.data import encode_dataset
from core.models import load_model
from core.privacy.norm_pass import NormPass
from core.training.losses import classification_loss_per_example
from tests.unit.torch_fakes import model_cache_dir, text_rows, view

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_skips_exactly_the_linear_weights_fed_by_gradients():
    """Whole tiny BERT trained: every linear layer sits above the trained embeddings, so
    pass 1 differentiates embeddings, biases and norms only — and still sets every norm."""
    loaded = load_model("tiny:bert", task="classification", labels=["neg", "pos"],
                        cache_dir=model_cache_dir())  # fmt: skip
    model = loaded.model
    data = encode_dataset(view(text_rows(6)), loaded.tokenizer, task="classification",
                          max_seq_length=16, uses_token_type_ids=True)  # fmt: skip
    hooks = prepare_module(model, grad_sample_mode="ghost", wrap_model=False, batch_first=True,
                           loss_reduction="mean", max_grad_norm=1.0)  # fmt: skip
    norm_pass = NormPass(model)
    model.train()
    loss = classification_loss_per_example(model, data.collate(list(range(6))))
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    differentiated = {id(p) for p in norm_pass.inputs()}
    assert len(linear_weights) == 13  # 2 layers × 6 + the head
    assert differentiated == {id(p) for p in model.parameters()} - linear_weights
    norm_pass.run(loss)
    assert all(p.grad is None for p in model.parameters())  # pass 1 leaves .grad alone
    assert all(p._norm_sample.shape == (6,) for p in model.parameters())
    norm_pass.remove()
    hooks.cleanup()


def test_refuses_to_clip_when_a_hook_did_not_fire():
    """A linear layer whose input carries a gradient from outside the trained parameters
    is skipped but nothing below it is differentiated: its norm would be stale."""
    fed, other = nn.Linear(4, 1, bias=False), nn.Linear(4, 1)
    model = nn.ModuleDict({"fed": fed, "other": other})
    hooks = prepare_module(model, grad_sample_mode="ghost", wrap_model=False, batch_first=True,
                           loss_reduction="mean", max_grad_norm=1.0)  # fmt: skip
    norm_pass = NormPass(model)
    outside = torch.randn(3, 4, requires_grad=True)  # not a parameter of the model
    loss = (fed(outside) + other(torch.randn(3, 4))).squeeze(1)
    with pytest.raises(RuntimeError, match="stale norm"):
        norm_pass.run(loss)
    hooks.cleanup()
