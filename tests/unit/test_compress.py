"""The three recipes of Mireshghallah et al. 2022 (dpkd, dpimp_structured,
dpimp_unstructured) and their building blocks, on tiny random models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from core.compress import RECIPES, load_recipe
from core.compress.distill import evenly_spaced_layers, kd_loss_per_example
from core.compress.pruning import (
    EncoderShape,
    encoder_anatomy,
    global_magnitude_masks,
    prunable_weights,
    prune_events,
    pruning_events,
    select_structures,
    shrink_model,
    structure_sizes,
    zero_optimizer_state,
)
from core.compress.sparse_format import SPARSE_FILE, load_sparse_model, sparsify_folder
from core.data import EncodedDataset
from core.errors import InvalidRequest, JobCancelled
from core.models import load_model, save_model
from core.models.mean_pooling import BertMeanPoolForSequenceClassification
from core.privacy.accounting import DpEvent, compose_epsilon
from core.privacy.plan import PhasePlan, PrivacyPlan
from core.privacy.planner import plan_job
from core.recipe_api import JobContext
from core.specs import JobSpec
from core.training.losses import MODEL_INPUTS
from tests.unit.torch_fakes import model_cache_dir, text_rows, view

pytestmark = pytest.mark.usefixtures("recipe_settings", "one_torch_thread")


class PhaseHooks:
    """RecordingHooks for several phases: charges one step per ``before_step`` per phase;
    ``begin_phase`` returns the planned steps minus those charged and not resumed."""

    def __init__(self, planned: dict[str, int], ckpt_root: Path, *, cancel_before=None):
        self.planned, self.ckpt_root, self.cancel_before = planned, Path(ckpt_root), cancel_before
        self.charged = dict.fromkeys(planned, 0)
        self.before: list[tuple[str, int]] = []
        self.begins: list[tuple[str, int, int]] = []
        self.events: list[tuple[str, dict]] = []

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        last = resumed_step + self.planned[phase] - self.charged[phase]
        self.begins.append((phase, resumed_step, last))
        return last

    def before_step(self, phase: str, step: int) -> None:
        if (phase, step) == self.cancel_before:
            self.cancel_before = None
            raise JobCancelled(f"cancelled before {phase} step {step}")
        self.charged[phase] += 1
        self.before.append((phase, step))

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        pass

    def checkpoint_dir(self, phase: str) -> Path:
        return self.ckpt_root / phase

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))

    def steps(self, phase: str) -> list[int]:
        return [s for p, s in self.before if p == phase]


def _spec(
    method: str, base: str = "tiny:bert", train_body: bool | None = True, **compression
) -> JobSpec:
    """Train the body by default: the path where DP noise reaches pruned weights."""
    return JobSpec.model_validate(
        {
            "method": method,
            "dataset_id": "ds_train",
            "eval_dataset_id": "ds_eval",
            "model": {"base": base},
            "privacy": {"epsilon": 8.0},
            "training": {
                "epochs": 1,
                "batch_size": 8,
                "physical_batch_size": 8,
                "max_seq_length": 16,
                "train_body": train_body,
                "learning_rate": 5e-4,
            },
            "compression": compression,
        }
    )


def _ctx(tmp_path, spec, phases: dict[str, int], *, sigma=1.0, cancel_before=None, **kw):
    plan = PrivacyPlan(
        accountant="prv",
        delta=1e-5,
        epsilon=8.0,
        phases=[
            PhasePlan(
                name=name,
                mechanism="poisson_gaussian",
                sample_rate=0.25,
                noise_multiplier=sigma,
                steps=steps,
                max_grad_norm=1.0,
            )
            for name, steps in phases.items()
        ],
    )
    hooks = PhaseHooks(phases, tmp_path / "ckpt", cancel_before=cancel_before)
    ctx = JobContext(
        job_id="job_test",
        spec=spec,
        plan=plan,
        train=view(text_rows(32, seed=1)),
        eval=view(text_rows(16, seed=2), ds_id="ds_eval"),
        output_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        hooks=hooks,
        **kw,
    )
    return ctx, hooks


def _tiny_bert(seed: int = 0) -> nn.Module:
    return load_model(
        "tiny:bert",
        task="classification",
        labels=["neg", "pos"],
        seed=seed,
        cache_dir=model_cache_dir(),
    )


def _load_classifier(folder: Path) -> nn.Module:
    """The documented load call of the mean-pooled classifier."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)


def _logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(1, 1000, (3, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


# -- pruning building blocks -----------------------------------------------------------


def test_prune_schedules_reach_the_target_at_the_last_event():
    cubic = prune_events(60, target=0.5, schedule="cubic", rounds=5)
    assert list(cubic) == [10, 20, 30, 40, 50]  # the last 10 steps recover
    assert list(cubic.values()) == sorted(cubic.values()) and cubic[50] == 0.5
    assert cubic[10] == pytest.approx(0.5 * (1 - 0.8**3))  # fast early
    stepwise = prune_events(60, target=0.5, schedule="stepwise", rounds=5)
    assert list(stepwise.values()) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert prune_events(2, target=0.5, schedule="cubic", rounds=5) == {
        1: 0.5 * (1 - 0.4**3),
        2: 0.5,
    }


def test_global_masks_prune_exactly_the_smallest_weights_across_tensors():
    weights = {"a": torch.tensor([[0.1, -5.0], [3.0, 0.2]]), "b": torch.tensor([-0.3, 4.0, 0.05])}
    masks = global_magnitude_masks(weights, 3 / 7)
    assert masks["a"].tolist() == [[False, True], [True, False]]  # 0.1, 0.2 pruned
    assert masks["b"].tolist() == [True, True, False]  # 0.05 pruned; |-0.3| kept


def test_zero_optimizer_state_clears_adam_moments_at_pruned_positions():
    w = nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.randn(4, 3)
    opt.step()
    mask = torch.rand(4, 3) > 0.5
    zero_optimizer_state(opt, {"w": w}, {"w": mask})
    for key in ("exp_avg", "exp_avg_sq"):
        assert (opt.state[w][key][~mask] == 0).all() and (opt.state[w][key][mask] != 0).all()


def test_layer_selection_keeps_the_bottom_layers_or_the_largest_magnitudes():
    model = _tiny_bert().model
    anatomy = encoder_anatomy(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in weights:  # layer 0 gets the smallest weights
        if name.startswith("bert.encoder.layer.0.") and weights[name].dim() == 2:
            weights[name] *= 0.01
    top, _ = select_structures(weights, anatomy, num_layers=1, width=8, layer_selection="top")
    by_magnitude, neurons = select_structures(weights, anatomy, num_layers=1, width=8,
                                              layer_selection="magnitude")  # fmt: skip
    assert top == [0] and by_magnitude == [1] and len(neurons[0]) == 8


def test_structure_sizes_meet_the_target_and_refuse_the_impossible():
    shape = EncoderShape(
        num_layers=6, intermediate_size=1536, fixed_per_layer=592_896, per_neuron=769
    )
    both = {"target": 0.5, "structures": ["layers", "ffn"]}  # FFN first: 6 layers × 382
    assert structure_sizes(shape, shape, sparsity=0.5, **both) == (6, 382)
    widths = [structure_sizes(shape, shape, sparsity=s, **both)[1] for s in (0.2, 0.4, 0.5)]
    assert widths == sorted(widths, reverse=True) and widths[-1] == 382
    layers, width = structure_sizes(
        shape, shape, sparsity=0.7, target=0.7, structures=["layers", "ffn"]
    )
    assert layers < 6 and width >= 192  # below 1/8 of the FFN, whole layers go
    assert shape.parameters(layers, width) <= 0.3 * shape.parameters()
    assert structure_sizes(shape, shape, sparsity=0.5, target=0.5, structures=["layers"]) == (
        3,
        1536,
    )
    layers, width = structure_sizes(shape, shape, sparsity=0.5, target=0.5, structures=["ffn"])
    assert layers == 6 and shape.parameters(6, width) <= 0.5 * shape.parameters()
    assert shape.parameters(6, width + 1) > 0.5 * shape.parameters()
    with pytest.raises(InvalidRequest, match="target_sparsity"):
        structure_sizes(shape, shape, sparsity=0.9, target=0.9, structures=["ffn"])


def test_shrink_model_copies_kept_weights_into_a_smaller_llama_config(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    small = shrink_model(model, keep_layers=[0, 2], keep_neurons=[[1, 5, 9], [0, 2, 4]])
    assert small.config.num_hidden_layers == 2 and small.config.intermediate_size == 3
    up = model.model.layers[2].mlp.up_proj.weight
    assert torch.equal(small.model.layers[1].mlp.up_proj.weight, up[[0, 2, 4]])
    down = model.model.layers[2].mlp.down_proj.weight
    assert torch.equal(small.model.layers[1].mlp.down_proj.weight, down[:, [0, 2, 4]])
    small.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(reloaded(input_ids=ids).logits, small.eval()(input_ids=ids).logits)


# -- unstructured (Alg. 3) and the sparse artifact --------------------------------------


def test_sparse_artifact_is_smaller_and_round_trips_to_the_same_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    loaded = _tiny_bert()
    model = loaded.model
    weights = prunable_weights(model)
    with torch.no_grad():
        for name, mask in global_magnitude_masks(weights, 0.5).items():
            weights[name].mul_(mask)
        model.get_input_embeddings().weight[5000:] = 0  # unused rows: where the bytes are
    save_model(model, loaded.tokenizer, tmp_path / "dense")
    dense_bytes = (tmp_path / "dense" / "model.safetensors").stat().st_size
    save_model(model, loaded.tokenizer, tmp_path / "sparse")
    sparsify_folder(tmp_path / "sparse")
    assert (tmp_path / "sparse" / SPARSE_FILE).stat().st_size < 0.25 * dense_bytes
    assert not (tmp_path / "sparse" / "model.safetensors").exists()

    expected = _logits(model)
    assert torch.allclose(_logits(load_sparse_model(tmp_path / "sparse")), expected, atol=1e-6)
    # the documented load call: the loader shipped inside the folder
    loader = get_class_from_dynamic_module("sparse_format.load_sparse_model", tmp_path / "sparse")
    assert torch.allclose(_logits(loader(tmp_path / "sparse")), expected, atol=1e-6)
    with pytest.raises(OSError):  # a plain from_pretrained fails loudly, never half-loads
        AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "sparse", trust_remote_code=True
        )


def _optimizer_moments(ckpt_dir: Path) -> dict[int, dict]:
    folder = ckpt_dir / __import__("json").loads((ckpt_dir / "latest.json").read_text())["dir"]
    return torch.load(folder / "state.pt", weights_only=True)["optimizer"]["state"]


def test_unstructured_pruned_weights_are_exactly_zero_after_training_under_noise(tmp_path):
    spec = _spec("dpimp_unstructured", target_sparsity=0.5, prune_rounds=2)
    ctx, hooks = _ctx(tmp_path, spec, {"train": 6}, sigma=1.0)
    result = load_recipe("dpimp_unstructured")(ctx)

    m = result.metrics
    assert hooks.steps("train") == [1, 2, 3, 4, 5, 6] and len(hooks.begins) == 1
    assert [e["step"] for e in m["prune_events"]] == [2, 4]  # steps 5 and 6 add noise after
    assert m["train_body"] is True
    model = load_sparse_model(ctx.output_dir)
    weights = prunable_weights(model)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.5 * total) and m["achieved_sparsity"] == pytest.approx(0.5)
    assert set(m["sparsity_per_layer"]) == {"layer.0", "layer.1"}
    assert (model.get_input_embeddings().weight != 0).all()  # embeddings are not pruned
    # Adam's moments are zero wherever the final weights are pruned
    names = [n for n, p in model.named_parameters() if not n.startswith("classifier.")]
    state = _optimizer_moments(ctx.hooks.checkpoint_dir("train"))
    for name, w in weights.items():
        moments = state[names.index(name)]
        assert (moments["exp_avg"][w == 0] == 0).all() and (moments["exp_avg"] != 0).any()
    assert m["parameters"] == m["base_parameters"] and m["bytes_on_disk"] < m["base_bytes_on_disk"]
    assert {"latency_ms_batch1", "base_latency_ms_batch32", "size_ratio"} <= set(m)
    assert 0 <= m["eval_accuracy"] <= 1 and m["eval"]["non_private_evaluation"] is True
    assert "sparse_format.load_sparse_model" in result.model_card_extra["load"]


def test_unstructured_resume_with_lost_steps_still_reaches_the_target(tmp_path):
    spec = _spec("dpimp_unstructured", target_sparsity=0.5, prune_rounds=2)
    ctx, hooks = _ctx(tmp_path, spec, {"train": 6}, cancel_before=("train", 3))
    with pytest.raises(JobCancelled):
        load_recipe("dpimp_unstructured")(ctx)
    hooks.charged["train"] = 5  # the runner had charged 3 steps ahead that never ran
    result = load_recipe("dpimp_unstructured")(ctx)

    assert hooks.begins[-1] == ("train", 2, 3) and hooks.steps("train") == [1, 2, 3]
    events = result.metrics["prune_events"]  # the mask in force at step 2 is re-derived,
    assert [e["sparsity"] for e in events][-1] == 0.5  # and the event at 4 done afterwards
    # the restored weights were pruned and refit already: the re-derived mask prunes nothing
    # new and is not refit again; the later event is
    assert [e["step"] for e in events] == [2, 3] and "reconstruction" not in events[0]
    assert "reconstruction" in events[1]
    weights = prunable_weights(load_sparse_model(ctx.output_dir))
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == round(0.5 * sum(w.numel() for w in weights.values()))


def test_a_frozen_body_is_pruned_once_before_the_first_step(tmp_path):
    """Head only: the weight matrices never train, so the whole target goes at step 0 and
    the final weights are the pre-trained ones with exactly the global magnitude mask."""
    assert pruning_events(60, target=0.5, schedule="cubic", rounds=5, weights_train=False) == {
        0: 0.5
    }
    assert pruning_events(
        60, target=0.5, schedule="cubic", rounds=5, weights_train=True
    ) == prune_events(60, target=0.5, schedule="cubic", rounds=5)
    spec = _spec("dpimp_unstructured", train_body=False, target_sparsity=0.5, prune_rounds=2,
                 reconstruct=False)
    ctx, hooks = _ctx(tmp_path, spec, {"train": 4}, sigma=1.0)
    result = load_recipe("dpimp_unstructured")(ctx)

    m = result.metrics
    assert m["prune_events"] == [{"step": 0, "sparsity": 0.5}] and m["prune_schedule"] == "one_shot"
    assert m["reconstruction"] is None
    assert hooks.steps("train") == [1, 2, 3, 4] and hooks.charged["train"] == 4
    pretrained = prunable_weights(_tiny_bert().model)
    masks = global_magnitude_masks({n: w.detach() for n, w in pretrained.items()}, 0.5)
    for name, w in prunable_weights(load_sparse_model(ctx.output_dir)).items():
        assert torch.equal(w, pretrained[name].detach() * masks[name])


def test_structured_with_a_frozen_body_trains_every_step_on_the_final_shape(tmp_path):
    spec = _spec("dpimp_structured", train_body=False, target_sparsity=0.5, prune_rounds=2)
    ctx, hooks = _ctx(tmp_path, spec, {"train": 4}, cancel_before=("train", 3))
    with pytest.raises(JobCancelled):
        load_recipe("dpimp_structured")(ctx)
    result = load_recipe("dpimp_structured")(ctx)  # resumes in the pruned shape

    m = result.metrics
    assert m["prune_schedule"] == "one_shot" and [e["step"] for e in m["prune_events"]] == [0]
    # resumed from the step-2 checkpoint of the pruned model; 4 steps charged in all
    assert hooks.begins == [("train", 0, 4), ("train", 2, 4)] and hooks.charged["train"] == 4
    assert hooks.steps("train") == [1, 2, 3, 4]
    assert m["steps"] == 4 and m["achieved_sparsity"] >= 0.5
    assert _load_classifier(ctx.output_dir).config.num_hidden_layers == 1


# -- structured (Alg. 2) ---------------------------------------------------------------


def test_structured_output_is_smaller_loads_with_from_pretrained_and_charges_the_plan(tmp_path):
    from transformers import AutoConfig

    spec = _spec("dpimp_structured", target_sparsity=0.5, prune_rounds=2)
    ctx, hooks = _ctx(tmp_path, spec, {"train": 6})
    result = load_recipe("dpimp_structured")(ctx)

    m = result.metrics
    assert hooks.steps("train") == [1, 2, 3, 4, 5, 6]  # one phase, segments in order
    assert hooks.begins == [("train", 0, 6)]  # begun once
    assert m["steps"] == m["planned_steps"] == 6
    assert m["achieved_sparsity"] >= 0.5 and m["parameters"] < m["base_parameters"]
    config = AutoConfig.from_pretrained(ctx.output_dir, trust_remote_code=True)
    assert config.num_hidden_layers == 1 and len(m["kept_layers"]) == 1
    model = _load_classifier(ctx.output_dir)
    assert sum(p.numel() for p in model.parameters()) == m["parameters"]
    assert "trust_remote_code=True" in result.model_card_extra["load"]


def test_structured_ffn_resumes_after_cancel_in_the_right_shape_and_charges_the_plan(tmp_path):
    spec = _spec("dpimp_structured", target_sparsity=0.3, prune_rounds=3, structures=["ffn"])
    ctx, hooks = _ctx(tmp_path, spec, {"train": 6}, cancel_before=("train", 5))
    with pytest.raises(JobCancelled):
        load_recipe("dpimp_structured")(ctx)
    assert hooks.charged["train"] == 4
    result = load_recipe("dpimp_structured")(ctx)  # the runner's retry

    # checkpoint at step 3 (end of a segment); step 4 was charged and lost: 5 and 6 remain
    assert hooks.begins == [("train", 0, 6), ("train", 3, 5)]
    assert hooks.charged["train"] == 6 and hooks.steps("train")[-2:] == [4, 5]
    m = result.metrics
    widths = [e["intermediate_size"] for e in m["prune_events"]]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 64

    model = _load_classifier(ctx.output_dir)
    assert model.config.intermediate_size == widths[-1] and model.config.num_hidden_layers == 2
    assert m["achieved_sparsity"] >= 0.3


def test_structured_refuses_attention_heads_before_any_step(tmp_path):
    spec = _spec("dpimp_structured", structures=["heads", "ffn"])
    ctx, hooks = _ctx(tmp_path, spec, {"train": 2})
    with pytest.raises(InvalidRequest, match="heads cannot be removed"):
        load_recipe("dpimp_structured")(ctx)
    assert hooks.before == [] and hooks.begins == []


class _ScoringSpy:
    """Wraps a scoring function: while it runs, drawing a batch or running a forward pass
    raises; it records what the scoring function was given."""

    def __init__(self, fn):
        self.fn, self.active, self.calls = fn, False, []

    def __call__(self, weights, *args, **kwargs):
        self.calls.append({k: (v.dtype, tuple(v.shape)) for k, v in weights.items()})
        self.active = True
        try:
            return self.fn(weights, *args, **kwargs)
        finally:
            self.active = False


@pytest.mark.parametrize(
    ("method", "scorer"),
    [("dpimp_unstructured", "global_magnitude_masks"), ("dpimp_structured", "select_structures")],
)
def test_pruning_decisions_read_only_dp_trained_weights(tmp_path, monkeypatch, method, scorer):
    import importlib

    recipe = importlib.import_module(f"core.compress.{method}")
    spy = _ScoringSpy(getattr(recipe, scorer))
    monkeypatch.setattr(recipe, scorer, spy)
    timeline: list[str] = []
    collate, forward = EncodedDataset.collate, BertMeanPoolForSequenceClassification.forward

    def guarded_collate(self, indices):
        if spy.active:
            raise AssertionError("a private batch was drawn while pruning decisions were made")
        timeline.append("batch")
        return collate(self, indices)

    def guarded_forward(self, *args, **kwargs):
        if spy.active:
            raise AssertionError("the model ran on inputs while pruning decisions were made")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(EncodedDataset, "collate", guarded_collate)
    monkeypatch.setattr(BertMeanPoolForSequenceClassification, "forward", guarded_forward)
    ctx, _ = _ctx(tmp_path, _spec(method, prune_rounds=2), {"train": 6})
    load_recipe(method)(ctx)

    assert len(spy.calls) == 2 and timeline.count("batch") >= 1
    for given in spy.calls:  # weights by parameter name, float; no token ids, no labels
        assert all(k.endswith((".weight", ".bias")) for k in given)
        assert not set(given) & {*MODEL_INPUTS, "labels"}
        assert all(dtype.is_floating_point for dtype, _ in given.values())


# -- dpkd (Alg. 1) ---------------------------------------------------------------------


def test_student_copies_evenly_spaced_teacher_layers():
    assert evenly_spaced_layers(6, 3) == [1, 3, 5] and evenly_spaced_layers(12, 4) == [2, 5, 8, 11]
    with pytest.raises(InvalidRequest, match="student_layers"):
        evenly_spaced_layers(2, 3)
    teacher = _tiny_bert().model
    student = shrink_model(teacher, keep_layers=evenly_spaced_layers(2, 1))
    assert student.config.num_hidden_layers == 1
    t_layer, s_layer = teacher.bert.encoder.layer[1], student.bert.encoder.layer[0]
    for (name, t), (_, s) in zip(
        t_layer.state_dict().items(), s_layer.state_dict().items(), strict=True
    ):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr(), name
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_kd_loss_is_the_per_example_mix_of_ce_and_scaled_kl():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    T = 2.0
    ce = F.cross_entropy(s, y, reduction="none")
    kl = F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none"
    ).sum(-1)
    loss = kd_loss_per_example(s, t, y, alpha=0.3, temperature=T)
    assert loss.shape == (4,) and torch.allclose(loss, 0.7 * ce + 0.3 * T**2 * kl)
    s2 = s.clone()
    s2[1] += 5  # another example's logits do not change example 0's loss
    assert kd_loss_per_example(s2, t, y, alpha=0.3, temperature=T)[0] == loss[0]
    # causal LM: per-token terms averaged over each example's predicted tokens
    lm = kd_loss_per_example(
        torch.randn(2, 5, 7),
        torch.randn(2, 5, 7),
        torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 1, 2]]),
        alpha=0.5,
        temperature=1.0,
    )
    assert lm.shape == (2,) and torch.isfinite(lm).all()


def test_dpkd_charges_both_phases_exactly_and_saves_a_loadable_student(tmp_path):

    spec = _spec("dpkd", student_layers=1, train_body=None)  # classifier default: head only
    plan = plan_job(spec, num_records=32)  # epochs 1, batch 8: 4 steps per phase
    assert [(p.name, p.steps) for p in plan.phases] == [("teacher", 4), ("student", 4)]
    ctx, hooks = _ctx(tmp_path, spec, {"teacher": 4, "student": 4})
    ctx.plan = plan
    result = load_recipe("dpkd")(ctx)

    assert hooks.steps("teacher") == [1, 2, 3, 4] and hooks.steps("student") == [1, 2, 3, 4]
    assert [b[0] for b in hooks.begins] == ["teacher", "student"]
    assert hooks.before.index(("student", 1)) > hooks.before.index(("teacher", 4))
    # the job's ε composes what was charged; composition is below the sum of the phases
    charged = [
        DpEvent("poisson_gaussian", p.noise_multiplier, p.sample_rate, hooks.charged[p.name])
        for p in plan.phases
    ]
    eps = compose_epsilon(charged, delta=plan.delta, accountant=plan.accountant)
    assert eps == pytest.approx(plan.epsilon, rel=1e-6)
    assert eps < sum(p.epsilon for p in plan.phases)

    m = result.metrics
    assert m["copied_layers"] == [1] and m["num_hidden_layers"] == 1
    assert m["train_body"] is False  # a classifier's default here (core.training.optim)
    assert m["phases"]["teacher"]["steps"] == 4 and m["phases"]["student"]["steps"] == 4
    assert m["parameters"] < m["base_parameters"] and "teacher_eval_accuracy" in m
    student = _load_classifier(ctx.output_dir)
    assert student.config.num_hidden_layers == 1


def test_dpkd_runs_the_frozen_teacher_body_once_per_row_across_both_phases(
    tmp_path, monkeypatch
):
    """Head-only teacher phase: its cached features also give the student phase's teacher
    logits, so no private row goes through the teacher's encoder twice."""
    from transformers.models.bert.modeling_bert import BertModel

    seen: list[tuple[int, tuple[int, ...]]] = []  # (encoder layers, row tokens)
    forward = BertModel.forward

    def recording_forward(self, input_ids=None, attention_mask=None, **kwargs):
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            seen.append((len(self.encoder.layer), tuple(ids[mask.bool()].tolist())))
        return forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(BertModel, "forward", recording_forward)
    spec = _spec("dpkd", student_layers=1, train_body=None)
    ctx, hooks = _ctx(tmp_path, spec, {"teacher": 4, "student": 4})
    load_recipe("dpkd")(ctx)

    tokenizer = _tiny_bert().tokenizer
    private = {tuple(tokenizer(r["text"], truncation=True, max_length=16)["input_ids"])
               for r in ctx.train.rows}  # fmt: skip
    teacher_rows = [row for layers, row in seen if layers == 2 and row in private]
    assert hooks.steps("student") == [1, 2, 3, 4] and teacher_rows
    assert len(teacher_rows) == len(set(teacher_rows))


def test_dpkd_similar_block_needs_a_causal_lm_and_reads_only_teacher_samples(tmp_path):
    spec = _spec("dpkd", student_layers=1, student_layer_selection="similar_block")
    ctx, hooks = _ctx(tmp_path / "cls", spec, {"teacher": 2, "student": 2})
    with pytest.raises(InvalidRequest) as err:  # a classifier cannot sample text
        load_recipe("dpkd")(ctx)
    assert err.value.param == "compression.student_layer_selection" and not hooks.before

    spec = _spec("dpkd", base="tiny:llama", student_layers=1,
                 student_layer_selection="similar_block")  # fmt: skip
    ctx, hooks = _ctx(tmp_path / "lm", spec, {"teacher": 2, "student": 2})
    ctx = dataclasses.replace(ctx, train=view(text_rows(32, seed=1), task="causal_lm"),
                              eval=view(text_rows(8, seed=2), task="causal_lm", ds_id="ds_eval"))
    m = load_recipe("dpkd")(ctx).metrics
    assert m["student_layer_selection"] == "similar_block" and m["copied_layers"] == [1]
    assert hooks.charged == {"teacher": 2, "student": 2}  # the samples cost no step


def test_dpkd_epsilon_is_the_composition_of_teacher_and_student_not_their_sum():
    spec = _spec("dpkd")
    plan = plan_job(spec, num_records=1000)
    teacher, student = plan.phases
    events = [DpEvent(p.mechanism, p.noise_multiplier, p.sample_rate, p.steps) for p in plan.phases]
    composed = compose_epsilon(events, delta=plan.delta, accountant=plan.accountant)
    assert composed == pytest.approx(plan.epsilon, rel=1e-6) and plan.epsilon <= 8.0
    assert max(teacher.epsilon, student.epsilon) < composed < teacher.epsilon + student.epsilon
    # a DP teacher from an earlier job on the same dataset: only the student is planned
    only = plan_job(spec, num_records=1000, teacher_precharged=True)
    assert [p.name for p in only.phases] == ["student"] and only.epsilon <= 8.0


def test_dpkd_resume_reloads_the_finished_teacher_instead_of_retraining(tmp_path):
    spec = _spec("dpkd", student_layers=1)
    ctx, hooks = _ctx(tmp_path, spec, {"teacher": 4, "student": 4}, cancel_before=("student", 3))
    with pytest.raises(JobCancelled):
        load_recipe("dpkd")(ctx)
    teacher_file = ctx.work_dir / "teacher" / "model.safetensors"
    saved = teacher_file.read_bytes()
    result = load_recipe("dpkd")(ctx)

    assert hooks.steps("teacher") == [1, 2, 3, 4]  # never run again
    assert hooks.steps("student") == [1, 2, 3, 4] and hooks.charged == {"teacher": 4, "student": 4}
    assert [b[0] for b in hooks.begins] == ["teacher", "student", "student"]
    assert teacher_file.read_bytes() == saved
    assert result.metrics["teacher"].startswith("reloaded")
    assert result.metrics["phases"]["student"]["resumed_from_step"] == 2


def test_dpkd_from_an_earlier_dp_teacher_runs_only_the_student_phase(tmp_path):
    loaded = _tiny_bert(seed=3)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "job_teacher")
    spec = _spec("dpkd", base="job:job_teacher", student_layers=1)
    ctx, hooks = _ctx(
        tmp_path, spec, {"student": 3}, resolve_job_model=lambda job_id: tmp_path / job_id
    )
    result = load_recipe("dpkd")(ctx)
    assert hooks.begins == [("student", 0, 3)] and hooks.steps("student") == [1, 2, 3]
    assert result.metrics["phases"]["teacher"] is None
    assert "already DP-trained" in result.metrics["teacher"]


def test_the_three_methods_are_registered():
    for method in ("dpkd", "dpimp_structured", "dpimp_unstructured"):
        assert RECIPES[method] == f"core.compress.{method}:run"
        assert callable(load_recipe(method))
