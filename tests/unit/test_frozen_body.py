"""Head-only DP-SGD on a frozen body reads each row's features from a cache: same losses,
same clipped and noised update, the body run once per distinct row, and features taken
from the body as it is at the first loss (after a dpimp recipe's step-0 pruning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.compress.distill import make_kd_loss
from core.data import encode_dataset
from core.models import load_model, split_trainable
from core.privacy.engine import DPSGDEngine, EngineConfig
from core.training.frozen_body import RowCache, body_is_frozen, frozen_body_loss
from core.training.losses import classification_loss_per_example
from tests.unit.torch_fakes import RecordingHooks, dp_phase, model_cache_dir, text_rows, view

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _head_only_bert(seed: int = 0) -> tuple[nn.Module, object]:
    loaded = load_model("tiny:bert", task="classification", labels=["neg", "pos"], seed=seed,
                        cache_dir=model_cache_dir())  # fmt: skip
    for m in loaded.model.modules():  # no dropout: cached and uncached must agree exactly
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    split_trainable(loaded.model, train_body=False)
    return loaded.model, loaded.tokenizer


def _rows(tokenizer, n: int):
    return encode_dataset(view(text_rows(n, seed=3)), tokenizer, task="classification",
                          max_seq_length=16, uses_token_type_ids=True)  # fmt: skip


class _CountRows(nn.Module):
    """Counts the rows the encoder's embedding layer sees (a forward hook)."""

    def __init__(self, model):
        super().__init__()
        self.rows = 0
        model.bert.embeddings.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.rows += output.shape[0]


def test_cached_loss_equals_the_full_forward_and_runs_the_body_once_per_row():
    model, tok = _head_only_bert()
    data = _rows(tok, 10)
    counter = _CountRows(model)
    loss = frozen_body_loss(model, classification_loss_per_example)
    assert loss is not classification_loss_per_example

    first = loss(model, data.collate(range(6)))  # rows 0-5 computed
    second = loss(model, data.collate([4, 5, 6, 7]))  # only 6, 7 new
    assert counter.rows == 8
    counter.rows = 0
    full = classification_loss_per_example(model, data.collate(range(8)))
    torch.testing.assert_close(torch.cat([first, second[2:]]), full)
    torch.testing.assert_close(second[:2], first[4:])


def test_not_applied_when_any_body_parameter_trains():
    model, _ = _head_only_bert()
    model.bert.encoder.layer[0].output.dense.bias.requires_grad_(True)  # BitFit-like
    assert not body_is_frozen(model)
    assert frozen_body_loss(model, classification_loss_per_example) is (
        classification_loss_per_example
    )
    with pytest.raises(ValueError, match="another model"):
        other, _ = _head_only_bert()
        frozen_body_loss(other, classification_loss_per_example)(model, {})


def test_features_come_from_the_body_as_pruned_before_the_first_loss():
    """dpimp prunes a frozen body in begin_phase, after the loss is built: the cache must
    hold the pruned body's features, not the dense one's."""
    model, tok = _head_only_bert()
    data = _rows(tok, 6)
    loss = frozen_body_loss(model, classification_loss_per_example)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(0.0)
    torch.testing.assert_close(
        loss(model, data.collate(range(6))),
        classification_loss_per_example(model, data.collate(range(6))),
    )


@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_engine_update_is_the_same_with_and_without_the_cache(sigma, tmp_path):
    """One logical step (q = 1, C inside the norm range, same noise seed): identical head
    update whether the loss reads cached features or runs the body — the cache changes
    nothing in clipping, noise or the 1/(qN) scaling."""
    updates = []
    for cached in (False, True):
        model, tok = _head_only_bert()
        data = _rows(tok, 12)
        head = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in head]
        engine = DPSGDEngine(
            model=model, optimizer=torch.optim.SGD(head, lr=1.0),
            phase=dp_phase(sample_rate=1.0, noise_multiplier=sigma, steps=1, max_grad_norm=0.05),
            dataset=data,
            loss_fn=(frozen_body_loss(model, classification_loss_per_example) if cached
                     else classification_loss_per_example),
            hooks=RecordingHooks(1, tmp_path / f"{cached}"),
            config=EngineConfig(physical_batch_size=5, sampler_seed=0, noise_seed=7),
        )  # fmt: skip
        engine.run()
        deltas = [(b - p.detach()).reshape(-1) for b, p in zip(before, head, strict=True)]
        updates.append(torch.cat(deltas))
    assert float(updates[0].norm()) > 0
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-6)


def test_row_cache_keys_rows_by_their_unpadded_tokens():
    cache, calls = RowCache(), []

    def compute(sub):
        calls.append(sub["input_ids"].shape[0])
        return sub["input_ids"].sum(dim=1, keepdim=True).float()

    a = {"input_ids": torch.tensor([[5, 6, 0], [7, 0, 0]]),
         "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}  # fmt: skip
    b = {"input_ids": torch.tensor([[7, 0], [5, 6]]),  # same rows, other padding and order
         "attention_mask": torch.tensor([[1, 0], [1, 1]])}  # fmt: skip
    assert cache.get(a, compute).tolist() == [[11.0], [7.0]]
    assert cache.get(b, compute).tolist() == [[7.0], [11.0]]
    assert calls == [2] and len(cache) == 2


def test_kd_loss_with_cached_teacher_logits_is_unchanged():
    teacher, tok = _head_only_bert(seed=1)
    student, _ = _head_only_bert(seed=2)
    data = _rows(tok, 8)
    batch = data.collate(range(8))
    plain = make_kd_loss(teacher, alpha=0.5, temperature=2.0)(student, batch)
    cached_loss = make_kd_loss(teacher, alpha=0.5, temperature=2.0, cache_teacher_logits=True)
    counter = _CountRows(teacher)
    torch.testing.assert_close(cached_loss(student, batch), plain)
    torch.testing.assert_close(cached_loss(student, batch), plain)
    assert counter.rows == 8  # the teacher ran once per row
