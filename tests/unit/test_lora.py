"""LoRA adapters: wrapping, merging, what trains, exact per-example clipping, and
dp_finetune with ``train_body: "lora"`` end to end on tiny models."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.compress import load_recipe
from core.models import load_model, split_trainable
from core.models.lora import LoRALinear, add_lora, merge_lora
from core.specs import JobSpec, pydantic_problems
from tests.unit.test_dp_finetune import _ctx
from tests.unit.test_engine import _assert_clipped_sum_matches_naive_loop, _dataset, _tiny_bert
from tests.unit.torch_fakes import RecordingHooks, model_cache_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_adapters(seed: int = 0) -> tuple[nn.Module, object]:
    """tiny:bert (no dropout) with rank-4 adapters whose B is non-zero, so A has gradients."""
    model, tok = _tiny_bert(seed)
    torch.manual_seed(seed)
    add_lora(model, rank=4)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            nn.init.normal_(module.lora_b.weight, std=0.05)
    split_trainable(model, train_body="lora")
    return model, tok


def test_adapters_wrap_query_and_value_and_start_as_the_identity():
    model, tok = _tiny_bert()
    batch = _dataset(tok, 4).collate([0, 1, 2, 3])
    before = model(**batch).logits
    layers = model.config.num_hidden_layers
    assert add_lora(model, rank=4) == 2 * layers  # query and value of every layer
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert all(n.endswith((".query", ".value")) for n in wrapped)
    torch.testing.assert_close(model(**batch).logits, before)  # B = 0


def test_merge_folds_the_adapters_into_plain_linear_layers():
    model, tok = _with_adapters()
    batch = _dataset(tok, 4).collate([0, 1, 2, 3])
    adapted = model(**batch).logits
    assert merge_lora(model) == 2 * model.config.num_hidden_layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**batch).logits, adapted, rtol=1e-5, atol=1e-5)
    reference, _ = _tiny_bert()  # the merge changed the weights, the adapters were not idle
    assert not torch.allclose(model(**batch).logits, reference(**batch).logits)


def test_lora_trains_only_the_adapters_and_the_head():
    model, _ = _with_adapters()
    body, head = split_trainable(model, train_body="lora")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if ".lora_" in n or n.startswith("classifier.")}
    assert len(body) == 4 * model.config.num_hidden_layers and head
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)


def test_lora_without_adapters_is_an_error():
    model, _ = _tiny_bert()
    with pytest.raises(ValueError, match="add_lora"):
        split_trainable(model, train_body="lora")


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_adapter_clipped_sum_matches_naive_per_example_loop(mode, tmp_path):
    model, tok = _with_adapters()
    reference, _ = _with_adapters()
    _assert_clipped_sum_matches_naive_loop(model, reference, _dataset(tok, 12), tmp_path,
                                           mode=mode)  # fmt: skip


def test_dp_finetune_with_lora_saves_a_plain_folder_that_reproduces_its_accuracy(tmp_path):
    hooks = RecordingHooks(4, tmp_path / "ckpt")
    extra = {"training": {"batch_size": 12, "physical_batch_size": 8, "max_seq_length": 16,
                          "learning_rate": 5e-3, "train_body": "lora", "lora_rank": 2,
                          "probe_epochs": 0}}  # fmt: skip
    ctx = _ctx(tmp_path, base="tiny:bert", task="classification", n_train=48, n_eval=24,
               steps=4, batch=12, hooks=hooks, method_extra=extra)  # fmt: skip
    m = load_recipe("dp_finetune")(ctx).metrics
    config = load_model("tiny:bert", task="classification", labels=["0", "1"],
                        cache_dir=model_cache_dir()).model.config
    layers, hidden = 2 * config.num_hidden_layers, config.hidden_size
    assert m["train_body"] == "lora" and m["lora"] == {"rank": 2, "layers": layers}
    assert m["learning_rate"] == 5e-3 and m["steps"] == 4
    # per adapted layer A [2 × hidden] and B [hidden × 2]; the head [2 × hidden] + 2 biases
    assert m["trainable_parameters"] == layers * 2 * 2 * hidden + 2 * hidden + 2

    saved = AutoModelForSequenceClassification.from_pretrained(ctx.output_dir,
                                                               trust_remote_code=True)
    assert not any("lora" in n for n in saved.state_dict())
    from core.data import encode_dataset
    from core.training.losses import evaluate_classifier

    rows = encode_dataset(ctx.eval, load_model("tiny:bert", task="classification",
                          labels=["0", "1"], cache_dir=model_cache_dir()).tokenizer,
                          task="classification", max_seq_length=16, labels=ctx.train.labels,
                          uses_token_type_ids=True)  # fmt: skip
    assert evaluate_classifier(saved, rows)["accuracy"] == pytest.approx(m["eval"]["accuracy"])


def test_dp_finetune_with_lora_on_a_causal_lm(tmp_path):
    hooks = RecordingHooks(2, tmp_path / "ckpt")
    extra = {"training": {"batch_size": 8, "physical_batch_size": 8, "max_seq_length": 16,
                          "train_body": "lora"}}  # fmt: skip
    ctx = _ctx(tmp_path, base="tiny:llama", task="causal_lm", n_train=24, n_eval=8, steps=2,
               batch=8, hooks=hooks, method_extra=extra)  # fmt: skip
    m = load_recipe("dp_finetune")(ctx).metrics
    assert m["lora"]["rank"] == 8 and m["learning_rate"] == 1e-3  # the defaults
    assert 1.0 < m["eval"]["perplexity"] < 1e6
    saved = AutoModelForCausalLM.from_pretrained(ctx.output_dir)
    assert not any("lora" in n for n in saved.state_dict())


@pytest.mark.parametrize(
    ("method", "training", "param"),
    [
        ("dpkd", {"train_body": "lora"}, "training.train_body"),
        ("dp_finetune", {"lora_rank": 4}, "training.lora_rank"),
        ("dp_finetune", {"train_body": "bitfit", "lora_rank": 4}, "training.lora_rank"),
        ("dp_finetune", {"train_body": "lora", "lora_rank": 0}, "training.lora_rank"),
    ],
)
def test_lora_spec_errors_name_their_field(method, training, param):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"method": method, "dataset_id": "ds_a",
                                "privacy": {"epsilon": 8}, "training": training})
    assert [p["param"] for p in pydantic_problems(e.value)] == [param]
