"""The distildp recipe (Flemings & Annavaram 2024) end to end on tiny:llama, and its parts:
the DP histogram release, control-code conditioned generation, the synthetic-only student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from core.compress import load_recipe
from core.compress.causal_distill import (
    HiddenProjection,
    StudentTraining,
    distill_loss,
    student_layers,
    train_student_on_synthetic,
)
from core.compress.distildp import distillation_weights
from core.compress.pruning import shrink_model
from core.compress.synthetic import (
    NoisyHistogram,
    SyntheticSet,
    control_prompt,
    generate_synthetic,
    release_control_histogram,
    sample_control_codes,
)
from core.data import encode_dataset
from core.models import load_model
from core.privacy.plan import PhasePlan, PrivacyPlan
from core.recipe_api import DatasetView, JobContext
from core.specs import JobSpec
from tests.unit.torch_fakes import model_cache_dir, text_rows

TEACHER_STEPS = 3


pytestmark = pytest.mark.usefixtures("recipe_settings", "one_torch_thread")


class GuardedRows(list):
    """Private rows that raise on any read once ``locked`` (after the DP phases)."""

    locked = False

    def _check(self):
        if self.locked:
            raise AssertionError("private rows read after the histogram release")

    def __getitem__(self, i):
        self._check()
        return super().__getitem__(i)

    def __iter__(self):
        self._check()
        return super().__iter__()

    def __len__(self):
        self._check()
        return super().__len__()


class PhaseHooks:
    """RecipeHooks that charge per phase like the runner, and lock the private rows when
    the recipe announces the histogram release."""

    def __init__(self, planned: dict[str, int], ckpt_root: Path, rows: GuardedRows | None = None):
        self.planned, self.ckpt_root, self.rows = planned, ckpt_root, rows
        self.charged: dict[str, int] = {}
        self.before: list[tuple[str, int]] = []
        self.events: list[tuple[str, dict]] = []

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        lost = max(0, self.charged.get(phase, 0) - resumed_step)
        return self.planned[phase] - lost

    def before_step(self, phase: str, step: int) -> None:
        assert step <= self.planned[phase]
        self.charged[phase] = max(self.charged.get(phase, 0), step)
        self.before.append((phase, step))

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        pass

    def checkpoint_dir(self, phase: str) -> Path:
        return self.ckpt_root / phase

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))
        if kind == "histogram.released" and self.rows is not None:
            self.rows.locked = True


def _ctx(tmp_path, rows, hooks, *, sigma_h=2.0, n_eval=6, distill=None,
         synthetic=None) -> JobContext:
    spec = JobSpec.model_validate({
        "method": "distildp", "dataset_id": "ds_train",
        "eval_dataset_id": "ds_eval" if n_eval else None,
        "model": {"base": "tiny:llama"}, "privacy": {"epsilon": 8.0},
        "compression": {"student_layers": 1},
        "training": {"batch_size": 8, "physical_batch_size": 8, "max_seq_length": 24,
                     "learning_rate": 1e-3, "epochs": 1},
        "synthetic": {"num_samples": 10, "max_new_tokens": 6, **(synthetic or {})},
        **({"distill": distill} if distill else {}),
    })  # fmt: skip
    plan = PrivacyPlan(accountant="prv", delta=1e-5, epsilon=8.0, phases=[
        PhasePlan(name="teacher", mechanism="poisson_gaussian", sample_rate=8 / 24,
                  noise_multiplier=0.6, steps=TEACHER_STEPS, max_grad_norm=1.0),
        PhasePlan(name="histogram", mechanism="gaussian", sample_rate=1.0,
                  noise_multiplier=sigma_h, steps=1, sensitivity=1.0),
    ])  # fmt: skip
    eval_rows = text_rows(n_eval, seed=2)
    return JobContext(
        job_id="job_test", spec=spec, plan=plan,
        train=DatasetView(id="ds_train", task="causal_lm", labels=[], rows=rows),
        eval=DatasetView(id="ds_eval", task="causal_lm", labels=[], rows=eval_rows)
        if n_eval else None,
        output_dir=tmp_path / "out", work_dir=tmp_path / "work", hooks=hooks,
    )  # fmt: skip


def test_distildp_charges_the_plan_never_reads_rows_after_release_and_saves(tmp_path):
    rows = GuardedRows(text_rows(24, seed=1))  # controls "neg" / "pos"
    hooks = PhaseHooks({"teacher": TEACHER_STEPS, "histogram": 1}, tmp_path / "ckpt", rows)
    ctx = _ctx(tmp_path, rows, hooks)
    result = load_recipe("distildp")(ctx)
    assert rows.locked  # the student phase ran with rows that raise on any read

    # the ledger sees exactly the teacher's planned steps and one histogram release
    assert hooks.before == [("teacher", 1), ("teacher", 2), ("teacher", 3), ("histogram", 1)]
    m = result.metrics
    assert m["phases"]["teacher"]["steps"] == TEACHER_STEPS
    assert m["phases"]["histogram"]["released"] and m["histogram"]["codes"] == ["neg", "pos"]
    assert abs(sum(m["histogram"]["probabilities"]) - 1) < 1e-9
    assert m["synthetic_samples"] == 10 and m["student_parameters"] < m["teacher_parameters"]
    assert m["alpha"] == 0.4 and m["temperature"] == 1.0
    assert 1 < m["eval_perplexity"] < 1e6 and 1 < m["teacher_eval_perplexity"] < 1e6
    assert "AutoModelForCausalLM" in result.model_card_extra["load"]

    # synthetic text stays in the work dir, never in events or metrics
    synthetic = SyntheticSet.load_jsonl(ctx.work_dir / "synthetic.jsonl")
    assert len(synthetic) == 10 and {r["control"] for r in synthetic.rows} <= {"neg", "pos"}
    dumped = json.dumps([m, hooks.events], default=str)
    assert all(r["text"] not in dumped for r in synthetic.rows if len(r["text"]) > 12)
    kinds = [k for k, _ in hooks.events]
    assert "synthetic.progress" in kinds and "histogram.released" in kinds

    # the saved student loads with plain transformers and generates
    model = AutoModelForCausalLM.from_pretrained(ctx.output_dir)
    tok = AutoTokenizer.from_pretrained(ctx.output_dir)
    assert model.config.num_hidden_layers == 1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = tok("[pos]", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]

    # a restarted job charges nothing more (teacher and histogram reloaded)
    rows.locked = False
    again = load_recipe("distildp")(ctx)
    assert len(hooks.before) == 4 and again.metrics["phases"]["teacher"]["reloaded"]
    assert again.metrics["histogram"] == m["histogram"]


def test_dataset_without_control_codes_releases_no_histogram(tmp_path):
    rows = [{**r, "control": None} for r in text_rows(24, seed=1)]
    hooks = PhaseHooks({"teacher": TEACHER_STEPS, "histogram": 1}, tmp_path / "ckpt")
    ctx = _ctx(tmp_path, rows, hooks, n_eval=0, synthetic={"student_epochs": 3})
    ctx.plan.phases = [ctx.plan.phase("teacher")]  # the planner plans no histogram here
    m = load_recipe("distildp")(ctx).metrics
    assert [p for p, _ in hooks.before] == ["teacher"] * TEACHER_STEPS
    # more student epochs: more (non-private) student steps, not one more charged step
    assert m["student"]["steps"] == 3 * 2  # 10 synthetic texts in batches of 8, 3 epochs
    assert m["histogram"] is None and m["phases"]["histogram"]["charged"] is False
    synthetic = SyntheticSet.load_jsonl(ctx.work_dir / "synthetic.jsonl")
    assert all(r["control"] is None for r in synthetic.rows)


def test_histogram_noise_has_std_sigma_and_raw_counts_do_not_leave():
    sigma, per_code = 3.0, 100
    rows = [{"control": f"c{i:03d}"} for i in range(400) for _ in range(per_code)]
    hist = release_control_histogram(
        rows, noise_multiplier=sigma, generator=torch.Generator().manual_seed(0)
    )
    noise = torch.tensor(hist.noisy_counts, dtype=torch.float64) - per_code  # no clipping here
    assert abs(float(noise.mean())) < 4 * sigma / 20  # 4 standard errors
    assert 0.9 * sigma < float(noise.std()) < 1.1 * sigma
    assert set(hist.to_dict()) == {"codes", "noisy_counts", "probabilities",
                                   "noise_multiplier", "sensitivity"}  # fmt: skip
    # clipping and normalisation: negative noisy counts become 0, all zero → uniform
    tiny = release_control_histogram([{"control": "a"}, {"control": "b"}], noise_multiplier=1e-9)
    assert tiny.probabilities == pytest.approx([0.5, 0.5])
    zero = release_control_histogram(
        [{"control": "a"}], noise_multiplier=100.0, generator=_negative_noise_seed()
    )
    assert zero.noisy_counts == [0.0] and zero.probabilities == [1.0]


def _negative_noise_seed() -> torch.Generator:
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        if float(torch.normal(0.0, 100.0, size=(1,), generator=g, dtype=torch.float64)) < -1:
            return torch.Generator().manual_seed(seed)
    raise AssertionError("no seed with negative noise")


def test_generation_is_conditioned_on_the_sampled_control_code(monkeypatch):
    loaded = load_model("tiny:llama", task="causal_lm", cache_dir=model_cache_dir())
    model, tok = loaded.model, loaded.tokenizer
    hist = NoisyHistogram(
        codes=["neg", "pos"],
        noisy_counts=[0.0, 7.0],
        probabilities=[0.0, 1.0],
        noise_multiplier=1.0,
        sensitivity=1.0,
    )
    codes = sample_control_codes(hist, 12, generator=torch.Generator().manual_seed(0))
    assert codes == ["pos"] * 12
    prompts: list[str] = []
    real_generate = model.generate

    def recording_generate(**kw):
        for ids, mask in zip(kw["input_ids"], kw["attention_mask"], strict=True):
            prompts.append(tok.decode(ids[mask.bool()]))
        return real_generate(**kw)

    monkeypatch.setattr(model, "generate", recording_generate)
    progress: list[dict] = []
    synthetic = generate_synthetic(model, tok, controls=codes, max_new_tokens=5, batch_size=5,
                                   on_progress=progress.append)  # fmt: skip
    assert prompts == [control_prompt("pos")] * 12 == ["[pos]"] * 12
    assert [p["done"] for p in progress] == [5, 10, 12]
    assert all(t.startswith("[pos]") for t in synthetic.texts())
    assert tok.padding_side == "right"  # restored for training


def test_student_accepts_only_synthetic_text_and_projects_hidden_states(tmp_path):
    loaded = load_model("tiny:llama", task="causal_lm", cache_dir=model_cache_dir())
    teacher, tok = loaded.model, loaded.tokenizer
    config = StudentTraining(alpha=0.4, temperature=1.0, epochs=1, batch_size=4,
                             learning_rate=1e-3, max_seq_length=16)  # fmt: skip
    private = DatasetView(id="ds", task="causal_lm", labels=[], rows=text_rows(4))
    narrow = LlamaForCausalLM(
        LlamaConfig(
            **{**teacher.config.to_dict(), "hidden_size": 32, "num_hidden_layers": 1, "head_dim": 8}
        )
    )
    with pytest.raises(TypeError, match="SyntheticSet"):
        train_student_on_synthetic(narrow, teacher, private, tok, config=config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SyntheticSet"):
        train_student_on_synthetic(narrow, teacher, private.rows, tok, config=config)  # type: ignore[arg-type]

    # widths differ (32 vs 64): a learned projection carries the hidden-state MSE
    proj = HiddenProjection(32, 64)
    assert sum(p.numel() for p in proj.parameters()) == 32 * 64
    synthetic = SyntheticSet(tuple({"control": "pos", "text": r["text"]} for r in text_rows(8)))
    rows = encode_dataset(DatasetView("s", "causal_lm", [], list(synthetic.rows)), tok,
                          task="causal_lm", max_seq_length=16)  # fmt: skip
    loss, parts = distill_loss(narrow, teacher, proj, rows.collate(range(4)), alpha=0.4,
                               temperature=1.0)  # fmt: skip
    assert loss.requires_grad and parts["hidden_mse"] > 0
    result = train_student_on_synthetic(narrow, teacher, synthetic, tok, config=config)
    assert result.steps == 2 and result.last_loss is not None


def test_distillation_weights_default_to_the_paper_unless_the_spec_sets_them():
    def spec(distill):
        return JobSpec.model_validate(
            {
                "method": "distildp",
                "dataset_id": "ds_a",
                "privacy": {"epsilon": 1.0},
                "distill": distill,
            }
        ).distill

    assert distillation_weights(spec({}))[:2] == (0.4, 1.0)
    assert distillation_weights(spec({"alpha": 0.5}))[:2] == (0.5, 1.0)
    a, t, src = distillation_weights(spec({"alpha": 0.7, "temperature": 2.0}))
    assert (a, t) == (0.7, 2.0) and src == {"alpha": "spec", "temperature": "spec"}


def test_similar_block_drops_the_layers_that_change_the_hidden_state_least():
    """Layers 2 and 3 of a 6-layer Llama are made identity maps (zero attention and MLP
    output projections): the block choice must drop exactly them; evenly spaced does not."""
    loaded = load_model("tiny:llama", task="causal_lm", cache_dir=model_cache_dir())
    tok = loaded.tokenizer
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(**{**loaded.model.config.to_dict(),
                                              "num_hidden_layers": 6})).eval()  # fmt: skip
    with torch.no_grad():
        for i in (2, 3):
            teacher.model.layers[i].self_attn.o_proj.weight.zero_()
            teacher.model.layers[i].mlp.down_proj.weight.zero_()
    synthetic = SyntheticSet(tuple({"control": None, "text": r["text"]} for r in text_rows(8)))
    kw = {"synthetic": synthetic, "tokenizer": tok, "max_seq_length": 16}

    kept = student_layers(teacher, 4, selection="similar_block", **kw)
    assert kept == [0, 1, 4, 5]
    assert student_layers(teacher, 4, selection="evenly_spaced", **kw) == [1, 2, 3, 5]
    assert student_layers(teacher, 6, selection="similar_block", **kw) == list(range(6))
    # the last layer always stays, whatever the distances
    assert student_layers(teacher, 1, selection="similar_block", **kw) == [5]
    student = shrink_model(teacher, keep_layers=kept)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():  # dropping identity layers changes nothing
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits,
                              atol=1e-5)  # fmt: skip
    private = DatasetView(id="ds", task="causal_lm", labels=[], rows=text_rows(4))
    with pytest.raises(TypeError, match="SyntheticSet"):
        student_layers(teacher, 4, selection="similar_block", **{**kw, "synthetic": private})
