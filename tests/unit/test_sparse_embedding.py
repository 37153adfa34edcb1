"""embedding.mode fest / adafest (Ghazi et al. 2023) against references: noiseless dense
DP-SGD, bit-identical untouched rows, the zero-count selection rate, and the accounting."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from core.compress import load_recipe
from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import load_model
from core.privacy.accounting import DpEvent, compose_epsilon
from core.privacy.embedding_frequencies import fest_rows, rank_rows_by_tokenizer_order
from core.privacy.engine import DPSGDEngine, EngineConfig
from core.privacy.planner import (
    DEFAULT_ADAFEST_NOISE_RATIO,
    EmbeddingNoise,
    adafest_noise_multipliers,
    plan_embedding_noise,
    plan_job,
)
from core.privacy.sparse_embedding import (
    SparseEmbeddingUpdate,
    contribution_counts,
    select_rows,
    zero_count_selection_probability,
)
from core.recipe_api import JobContext
from core.specs import DEFAULT_EMBEDDING_CLIP_SHARE, JobSpec, pydantic_problems
from core.training.losses import classification_loss_per_example
from tests.unit.torch_fakes import (
    RecordingHooks,
    dp_phase,
    model_cache_dir,
    plan_of,
    text_rows,
    view,
)

pytestmark = pytest.mark.usefixtures("recipe_settings", "one_torch_thread")


# -- accounting ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.4, 0.9, 3.0])
@pytest.mark.parametrize("ratio", [0.25, 1.0, 2.0, 7.0])
@pytest.mark.parametrize("layers", [1, 3])
def test_selection_and_gradient_noise_compose_to_the_planned_sigma(sigma, ratio, layers):
    sel, grad = adafest_noise_multipliers(
        noise_multiplier=sigma, noise_ratio=ratio, sparse_layers=layers
    )
    # L count vectors of sensitivity 1 at σ_sel each + the gradient at σ_grad = one Gaussian at σ
    assert layers / sel**2 + 1 / grad**2 == pytest.approx(1 / sigma**2, rel=1e-12)
    assert sel == pytest.approx(sigma * math.sqrt(1 + ratio**2) * math.sqrt(layers))
    assert grad == pytest.approx(sigma * math.sqrt(1 + ratio**2) / ratio)
    assert grad > sigma  # every trainable coordinate pays for the selection


def test_adafest_plan_and_ledger_epsilon_equal_dp_sgd_at_sigma():
    def spec(embedding):
        return JobSpec.model_validate({
            "method": "dp_finetune", "dataset_id": "ds_a", "privacy": {"epsilon": 3.0},
            "training": {"batch_size": 64, "epochs": 2, "probe_epochs": 0},
            "embedding": embedding,
        })  # fmt: skip

    n = 2_000
    dense = plan_job(spec({"mode": "dense"}), num_records=n)
    ada_spec = spec({"mode": "adafest", "adafest_noise_ratio": 1.5})
    ada = plan_job(ada_spec, num_records=n)
    fest = plan_job(spec({"mode": "fest", "fest_top_k": 100}), num_records=n)
    for plan in (ada, fest):
        assert plan.phases[0].mechanism == "poisson_gaussian"
        assert plan.phases[0].noise_multiplier == dense.phases[0].noise_multiplier
        assert plan.epsilon == dense.epsilon and plan.epsilon <= 3.0
    p = ada.phases[0]
    # what the ledger stores (mechanism, q, σ, T) recomputes the planned ε
    event = DpEvent("poisson_gaussian", p.noise_multiplier, p.sample_rate, p.steps)
    assert compose_epsilon([event], delta=ada.delta) == pytest.approx(ada.epsilon, rel=1e-9)
    noise = plan_embedding_noise(ada_spec, p.noise_multiplier)
    combined = (noise.selection_noise_multiplier**-2 + noise.gradient_noise_multiplier**-2) ** -0.5
    assert combined == pytest.approx(p.noise_multiplier, rel=1e-12)
    assert noise.noise_ratio == 1.5 and noise.threshold == pytest.approx(
        3.0 * noise.selection_noise_multiplier
    )
    assert plan_embedding_noise(spec({"mode": "adafest"}), 1.0).noise_ratio == (
        DEFAULT_ADAFEST_NOISE_RATIO
    )


# -- selection ----------------------------------------------------------------------------


def test_contribution_counts_give_each_example_total_one():
    counts = contribution_counts([[5, 5, 7], [7], []], num_rows=10)
    assert counts.sum() == pytest.approx(2.0)
    assert counts[5] == pytest.approx(2 / 3) and counts[7] == pytest.approx(1 / 3 + 1)


def test_selection_noise_reaches_zero_count_rows_at_the_expected_rate():
    V, sigma_sel, tau = 30_522, 2.0, 4.0  # τ/σ_sel = 2 → p₀ = 2.275 %
    counts = torch.zeros(V, dtype=torch.float64)
    counts[:100] = 50.0  # far above τ: always selected
    counts[100:200] = tau  # exactly at τ: selected with probability 1/2
    gen = torch.Generator().manual_seed(0)
    p0 = zero_count_selection_probability(threshold=tau, selection_noise=sigma_sel)
    assert p0 == pytest.approx(0.02275, abs=1e-5)
    draws, zero_hits, half_hits = 40, 0, 0
    for _ in range(draws):
        s = select_rows(counts, threshold=tau, selection_noise=sigma_sel, generator=gen)
        assert set(range(100)) <= set(s.tolist())
        assert len(set(s.tolist())) == len(s)
        zero_hits += int((s >= 200).sum())
        half_hits += int(((s >= 100) & (s < 200)).sum())
    n_zero = (V - 200) * draws
    sd = math.sqrt(n_zero * p0 * (1 - p0))
    assert abs(zero_hits - n_zero * p0) < 5 * sd  # Binomial(n, p₀) within 5 sd
    assert abs(half_hits - 100 * draws * 0.5) < 5 * math.sqrt(100 * draws * 0.25)
    # no noise: exactly the rows at or above τ
    s = select_rows(counts, threshold=tau, selection_noise=0.0, generator=gen)
    assert s.tolist() == list(range(200))


# -- the engine ---------------------------------------------------------------------------


def _tiny_bert(seed: int = 0):
    loaded = load_model("tiny:bert", task="classification", labels=["neg", "pos"], seed=seed,
                        cache_dir=model_cache_dir())  # fmt: skip
    for m in loaded.model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return loaded.model, loaded.tokenizer


def _dataset(tokenizer, n: int):
    return encode_dataset(view(text_rows(n, seed=0)), tokenizer, task="classification",
                          max_seq_length=16, uses_token_type_ids=True)  # fmt: skip


def _engine(model, data, tmp_path, *, sigma, q, steps, sparse=None, wd=0.01, mode="ghost",
            clip_share=None):
    return DPSGDEngine(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd),
        phase=dp_phase(sample_rate=q, noise_multiplier=sigma, steps=steps, max_grad_norm=0.5),
        dataset=data,
        loss_fn=classification_loss_per_example,
        hooks=RecordingHooks(steps, tmp_path),
        config=EngineConfig(grad_sample_mode=mode, physical_batch_size=4, sampler_seed=3,
                            noise_seed=4, checkpoint_every=100,
                            embedding_clip_share=clip_share),
        sparse_embedding=sparse,
    )  # fmt: skip


def _adafest(model, *, sigma, ratio=2.0, tau=None, sel=None, grad=None, seed=0):
    if sel is None:
        sel, grad = adafest_noise_multipliers(noise_multiplier=sigma, noise_ratio=ratio)
    threshold = 3 * sel if tau is None else tau
    noise = EmbeddingNoise(mode="adafest", noise_multiplier=sigma, gradient_noise_multiplier=grad,
                           selection_noise_multiplier=sel, threshold=threshold,
                           noise_ratio=ratio)  # fmt: skip
    weight = model.get_input_embeddings().weight
    return SparseEmbeddingUpdate(weight=weight, noise=noise, seed=seed)


@pytest.mark.parametrize(("tau", "q", "wd", "clip_share"), [
    (0.0, 0.5, 0.01, None), (1e-9, 1.0, 0.0, None), (0.0, 0.5, 0.01, 0.3),
])  # fmt: skip
def test_noiseless_adafest_equals_noiseless_dense_dp_sgd(tau, q, wd, clip_share, tmp_path):
    """σ_sel = σ_grad = 0. τ = 0 selects every row; τ = 0⁺ selects exactly the touched rows
    (q = 1: the same rows every step, so dense Adam moves no other row either). Flat and
    group-wise clipping alike."""
    dense, tok = _tiny_bert()
    data = _dataset(tok, 12)
    _engine(dense, data, tmp_path / "d", sigma=0.0, q=q, steps=2, wd=wd,
            clip_share=clip_share).run()  # fmt: skip
    model, _ = _tiny_bert()
    sparse = _adafest(model, sigma=0.0, tau=tau, sel=0.0, grad=0.0)
    _engine(model, data, tmp_path / "s", sigma=0.0, q=q, steps=2, sparse=sparse, wd=wd,
            clip_share=clip_share).run()  # fmt: skip
    touched = {t for ids in data.input_ids for t in ids}
    assert len(sparse.selected) == (model.config.vocab_size if tau == 0 else len(touched))
    for (name, a), b in zip(dense.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
    moved = (dense.get_input_embeddings().weight != _tiny_bert()[0].get_input_embeddings().weight)
    assert moved.any()  # the comparison is not vacuous


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_unselected_rows_are_bit_identical_weights_and_adam_state(mode, tmp_path):
    model, tok = _tiny_bert()
    data = _dataset(tok, 24)
    sigma = 1.0
    # τ/σ_sel = 2.5: a few dozen zero-count rows selected per step among 30,522
    sparse = _adafest(model, sigma=sigma, tau=2.5 * 2.236)
    engine = _engine(model, data, tmp_path, sigma=sigma, q=0.5, steps=3, sparse=sparse, mode=mode)
    assert engine.optimizer.noise_multiplier == pytest.approx(sparse.gradient_noise_multiplier)
    inner, w = engine.optimizer.original_optimizer, model.get_input_embeddings().weight
    snaps: list[dict] = []

    def snapshot() -> dict:
        state = inner.state.get(w, {})
        return {"w": w.detach().clone(),
                **{k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() == 2}}

    inner.register_step_pre_hook(lambda *a: snaps.append({"before": snapshot()}))
    inner.register_step_post_hook(
        lambda *a: snaps[-1].update(after=snapshot(), selected=sparse.selected.clone())
    )
    engine.run()
    assert len(snaps) == 3
    for i, snap in enumerate(snaps):
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[snap["selected"]] = True
        before, after = snap["before"], snap["after"]
        assert torch.equal(before["w"][~keep], after["w"][~keep])
        assert not torch.equal(before["w"][keep], after["w"][keep])  # selected rows move
        if i > 0:  # Adam's moments exist from the first step on
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(before[k][~keep], after[k][~keep]), k
        else:
            assert (after["exp_avg"][~keep] == 0).all()
        # zero-count rows were selected by the noise
        assert 5 < int((~torch.isin(snap["selected"], torch.tensor(sorted(
            {t for ids in data.input_ids for t in ids})))).sum()) < 300  # fmt: skip
    assert sparse.metrics()["embedding_grad_reduction"] > 50


def test_fest_trains_only_its_public_rows(tmp_path):
    model, tok = _tiny_bert()
    data = _dataset(tok, 16)
    rows, source = fest_rows(public_rows=None, tokenizer=tok, num_rows=30522, top_k=3000)
    assert source == "tokenizer_order" and rows[:2] != [0, 1]
    assert set(tok.all_special_ids) <= set(rows)  # [CLS]/[SEP]/... ranked first
    noise = EmbeddingNoise(mode="fest", noise_multiplier=0.8, gradient_noise_multiplier=0.8,
                           fest_top_k=3000)  # fmt: skip
    sparse = SparseEmbeddingUpdate(weight=model.get_input_embeddings().weight, noise=noise,
                                   fest_rows=rows)  # fmt: skip
    before = model.get_input_embeddings().weight.detach().clone()
    _engine(model, data, tmp_path, sigma=0.8, q=0.5, steps=2, sparse=sparse).run()
    after = model.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero(as_tuple=True)[0]
    assert set(changed.tolist()) == set(rows)
    order = rank_rows_by_tokenizer_order(tok, num_rows=30522)
    assert sorted(order) == list(range(30522))
    assert tok.convert_ids_to_tokens(order[len(tok.all_special_ids)]) == "!"  # ASCII first


# -- the dp_finetune recipe ----------------------------------------------------------------


def _ctx(tmp_path, *, base, task, embedding, model_extra=None, steps=2):
    rows = text_rows(16, seed=1)
    spec = JobSpec.model_validate({
        "method": "dp_finetune", "dataset_id": "ds_train", "eval_dataset_id": "ds_eval",
        "model": {"base": base, **(model_extra or {})}, "privacy": {"epsilon": 8.0},
        "training": {"batch_size": 8, "physical_batch_size": 4, "max_seq_length": 16},
        "embedding": embedding,
    })  # fmt: skip
    hooks = RecordingHooks(steps, tmp_path / "ckpt")
    return JobContext(
        job_id="job_t", spec=spec,
        plan=plan_of(dp_phase(sample_rate=0.5, noise_multiplier=0.6, steps=steps)),
        train=view(rows, task=task), eval=view(text_rows(8, seed=2), task=task, ds_id="ds_eval"),
        output_dir=tmp_path / "out", work_dir=tmp_path / "work", hooks=hooks,
    ), hooks  # fmt: skip


@pytest.mark.parametrize("mode", ["adafest", "fest"])
def test_dp_finetune_bert_sparse_modes_report_sparsity(mode, tmp_path):
    ctx, hooks = _ctx(tmp_path, base="tiny:bert", task="classification",
                      embedding={"mode": mode, "fest_top_k": 500})  # fmt: skip
    m = load_recipe("dp_finetune")(ctx).metrics
    emb = m["embedding"]
    assert m["embedding_mode"] == mode and emb["rows_total"] == 30522
    assert 0 < emb["rows_updated_per_step"] < 30522 and emb["embedding_grad_reduction"] > 10
    assert m["noise_multiplier"] == 0.6 and emb["noise_multiplier"] == 0.6
    assert m["embedding_clip_share"] == DEFAULT_EMBEDDING_CLIP_SHARE  # group-wise clipping
    if mode == "adafest":
        assert emb["gradient_noise_multiplier"] > 0.6
    assert all("embedding_rows" in metrics for _, metrics in hooks.after)
    assert "eval_accuracy" in m and m["seconds_per_step"] > 0


def _finetune_spec(**sections) -> JobSpec:
    """A dp_finetune spec at ε = 8 with the given sections (training, embedding, ...)."""
    return JobSpec.model_validate({"method": "dp_finetune", "dataset_id": "ds_a",
                                   "privacy": {"epsilon": 8.0}, **sections})  # fmt: skip


@pytest.mark.parametrize(("embedding", "train_body", "trained"), [
    ({}, None, set()),                                    # default classifier: head only
    ({"mode": "dense"}, None, {"word_embeddings"}),       # set mode: head + word embedding
    ({"mode": "adafest"}, None, {"word_embeddings"}),
    ({"mode": "frozen"}, True, {"layer", "other"}),       # body without the word embedding
    ({}, True, {"word_embeddings", "layer", "other"}),    # unset mode follows the body
])  # fmt: skip
def test_which_parameters_a_classifier_trains(embedding, train_body, trained):
    from core.models import load_model, split_trainable

    spec = _finetune_spec(training={"train_body": train_body}, embedding=embedding)
    model = load_model("tiny:bert", task="classification", labels=["0", "1"]).model
    body_trained = spec.training.body_trained(False)
    body, head = split_trainable(
        model, train_body=body_trained, train_embeddings=spec.embedding.trained(body_trained)
    )
    assert head and all(p.requires_grad for p in head)
    kinds = {"word_embeddings" if "word_embeddings" in n else "layer" if ".layer." in n
             else "other" for n, p in model.named_parameters()
             if p.requires_grad and not n.startswith("classifier")}  # fmt: skip
    assert kinds == trained and len(body) == sum(
        p.requires_grad for n, p in model.named_parameters() if not n.startswith("classifier"))
    mode = spec.embedding.effective_mode(body_trained)
    assert mode == ("frozen" if "word_embeddings" not in trained
                    else embedding.get("mode", "dense"))  # fmt: skip


@pytest.mark.parametrize(("embedding", "grad_sample_mode", "share"), [
    ({}, "ghost", None),                                   # unset mode: flat, as before
    ({"mode": "frozen"}, "ghost", None),
    ({"mode": "dense"}, "ghost", DEFAULT_EMBEDDING_CLIP_SHARE),
    ({"mode": "adafest"}, "ghost", DEFAULT_EMBEDDING_CLIP_SHARE),
    ({"mode": "fest", "clip_share": 0.5}, "ghost", 0.5),
    ({"mode": "dense", "clip_share": 1}, "ghost", None),   # 1: flat clipping
    ({"mode": "dense"}, "hooks", None),                    # the default needs ghost
])  # fmt: skip
def test_which_clipping_a_phase_gets(embedding, grad_sample_mode, share):
    from core.training.optim import engine_config

    spec = _finetune_spec(training={"grad_sample_mode": grad_sample_mode}, embedding=embedding)
    assert engine_config(spec).embedding_clip_share == share


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_clip_share_out_of_range_names_the_field(bad):
    with pytest.raises(ValidationError) as e:
        _finetune_spec(embedding={"mode": "dense", "clip_share": bad})
    assert pydantic_problems(e.value)[0]["param"] == "embedding.clip_share"


def test_an_explicit_clip_share_with_hooks_mode_is_refused():
    with pytest.raises(ValidationError) as e:
        _finetune_spec(training={"grad_sample_mode": "hooks"},
                       embedding={"mode": "dense", "clip_share": 0.3})  # fmt: skip
    problem = pydantic_problems(e.value)[0]
    assert problem["param"] == "embedding.clip_share" and "ghost" in problem["message"]


@pytest.mark.parametrize("method", ["dpkd", "dpimp_structured", "dpimp_unstructured",
                                    "distildp"])
@pytest.mark.parametrize("mode", ["fest", "adafest"])
def test_sparse_embedding_modes_outside_dp_finetune_are_refused_at_submit(method, mode):
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({"method": method, "dataset_id": "ds_a",
                                "privacy": {"epsilon": 8.0}, "embedding": {"mode": mode}})
    problem = pydantic_problems(e.value)[0]
    assert problem["param"] == "embedding.mode" and method in problem["message"]


@pytest.mark.parametrize("base", ["tiny:bert", "tiny:llama"])
def test_bitfit_trains_only_biases_and_norms(base):
    from core.models import load_model, split_trainable

    task = "classification" if base == "tiny:bert" else "causal_lm"
    model = load_model(base, task=task, labels=["0", "1"] if task == "classification" else None,
                       tied_weights="untie").model  # fmt: skip
    body, head = split_trainable(model, train_body="bitfit")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    trained_body = {n for n in names if not n.startswith(("classifier", "score"))}
    assert trained_body and len(body) == len(trained_body)
    assert all(n.endswith(".bias") or "norm" in n.lower() for n in trained_body)
    assert not model.get_input_embeddings().weight.requires_grad
    every_norm = {n for n, _ in model.named_parameters() if "norm" in n.lower()}
    assert every_norm <= names  # none missed (BERT LayerNorm, Llama RMSNorm)
    assert sum(p.numel() for p in body) < 0.05 * sum(p.numel() for p in model.parameters())


def test_bitfit_gets_its_own_default_learning_rate():
    from core.specs import BITFIT_LEARNING_RATE, TrainingSpec

    assert TrainingSpec().body_learning_rate("bitfit") == BITFIT_LEARNING_RATE
    assert TrainingSpec().body_learning_rate(True) == TrainingSpec().learning_rate
    assert TrainingSpec(learning_rate=3e-4).body_learning_rate("bitfit") == 3e-4


def test_a_tied_embedding_frozen_at_load_stays_frozen():
    from core.models import load_model, split_trainable

    model = load_model("tiny:llama", task="causal_lm", tied_weights="freeze").model
    split_trainable(model, train_body=True, train_embeddings=True)
    assert not model.get_input_embeddings().weight.requires_grad


def test_dp_finetune_llama_untied_adafest_and_tied_frozen(tmp_path):
    ctx, hooks = _ctx(tmp_path / "u", base="tiny:llama", task="causal_lm",
                      embedding={"mode": "adafest"},
                      model_extra={"tied_weights": "untie"})  # fmt: skip
    m = load_recipe("dp_finetune")(ctx).metrics
    assert m["embedding_mode"] == "adafest" and m["embedding"]["rows_total"] == 49152
    ctx, hooks = _ctx(tmp_path / "t", base="tiny:llama", task="causal_lm",
                      embedding={"mode": "adafest"})  # fmt: skip
    m = load_recipe("dp_finetune")(ctx).metrics
    assert m["embedding_mode"] == "frozen" and "embedding" not in m
    assert any(k == "embedding.sparse_skipped" for k, _ in hooks.events)


def test_fest_public_rows_outside_the_vocabulary_are_refused_before_any_step(tmp_path):
    ctx, hooks = _ctx(tmp_path, base="tiny:bert", task="classification",
                      embedding={"mode": "fest", "fest_public_rows": [1, 99_999]})  # fmt: skip
    with pytest.raises(InvalidRequest, match="fest_public_rows"):
        load_recipe("dp_finetune")(ctx)
    assert hooks.charged == 0
