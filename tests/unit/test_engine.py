"""DP-SGD engine against references: a naive per-example clipping loop, the noise
distribution, the Poisson sampler, the planned step count, and kill/resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.data import PoissonSampler, encode_dataset, split_physical
from core.errors import InvalidRequest, JobCancelled
from core.models import load_model
from core.privacy.engine import DPSGDEngine, EngineConfig, lr_factor
from core.training.checkpoint import find_checkpoint
from core.training.losses import classification_loss_per_example
from tests.unit.torch_fakes import (
    RecordingHooks,
    dp_phase,
    model_cache_dir,
    text_rows,
    view,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_bert(seed: int = 0, dropout: bool = False) -> tuple[nn.Module, object]:
    loaded = load_model(
        "tiny:bert", task="classification", labels=["neg", "pos"], seed=seed,
        cache_dir=model_cache_dir(),
    )  # fmt: skip
    if not dropout:
        for m in loaded.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    return loaded.model, loaded.tokenizer


def _dataset(tokenizer, n: int, seed: int = 0):
    return encode_dataset(
        view(text_rows(n, seed=seed)), tokenizer, task="classification", max_seq_length=16,
        uses_token_type_ids=True,
    )  # fmt: skip


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _run_one_step(model, dataset, *, q, sigma, C, mode, tmp_path, physical=5, noise_seed=1):
    hooks = RecordingHooks(1, tmp_path / f"{mode}-{sigma}")
    engine = DPSGDEngine(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        phase=dp_phase(sample_rate=q, noise_multiplier=sigma, steps=1, max_grad_norm=C),
        dataset=dataset,
        loss_fn=classification_loss_per_example,
        hooks=hooks,
        config=EngineConfig(
            grad_sample_mode=mode, physical_batch_size=physical, sampler_seed=0,
            noise_seed=noise_seed,
        ),
    )  # fmt: skip
    engine.run()
    return hooks


def _assert_clipped_sum_matches_naive_loop(model, reference, data, tmp_path,
                                           mode: str = "ghost") -> None:
    """One DP step (q = 1, σ = 0, C inside the per-example norm range) moves
    the trainable parameters by the naive per-example loop's Σ_i clip(g_i)."""
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = []
    for i in range(len(data)):
        reference.zero_grad(set_to_none=True)
        classification_loss_per_example(reference, data.collate([i])).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
    norms = [float(g.norm()) for g in grads]
    C = sorted(norms)[len(norms) // 2]
    expected = sum(g * min(1.0, C / (n + 1e-6)) for g, n in zip(grads, norms, strict=True))

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainable])
    _run_one_step(model, data, q=1.0, sigma=0.0, C=C, mode=mode, tmp_path=tmp_path)
    after = torch.cat([p.detach().reshape(-1).clone() for p in trainable])
    got = (before - after) * len(data)
    assert min(norms) < C < max(norms)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-4, f"{mode}: relative error {rel:.2e}"


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_clipped_sum_matches_naive_per_example_loop(mode, tmp_path):
    """The whole model trains; q = 1: every row in the one logical batch, split into 3
    physical chunks; σ = 0."""
    model, tok = _tiny_bert()
    reference, _ = _tiny_bert()
    _assert_clipped_sum_matches_naive_loop(model, reference, _dataset(tok, 12), tmp_path,
                                           mode=mode)  # fmt: skip


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_noise_std_is_sigma_C_over_expected_batch(mode, tmp_path):
    """Same data, same sampled batch, σ vs σ=0: the difference is pure noise / (q·N)."""
    sigma, C, q, n = 1.5, 0.7, 0.5, 16
    noisy, tok = _tiny_bert()
    clean, _ = _tiny_bert()
    data = _dataset(tok, n)
    start = _flat(noisy)
    _run_one_step(noisy, data, q=q, sigma=sigma, C=C, mode=mode, tmp_path=tmp_path)
    _run_one_step(clean, data, q=q, sigma=0.0, C=C, mode=mode, tmp_path=tmp_path)
    noise = _flat(clean) - _flat(noisy)  # = N(0, σ²C²) / (q·N) per coordinate
    assert float((_flat(clean) - start).abs().max()) > 0  # the clean run did learn something
    expected_std = sigma * C / (q * n)  # divided by the *expected* batch q·N = 8
    assert noise.numel() > 500_000
    assert abs(float(noise.std()) / expected_std - 1) < 0.01
    assert abs(float(noise.mean())) < 5 * expected_std / math.sqrt(noise.numel())


def test_poisson_batch_sizes_average_q_times_n():
    n, q, steps = 1000, 0.05, 2000
    sampler = PoissonSampler(num_samples=n, sample_rate=q, seed=3)
    sizes = torch.tensor([len(sampler.sample()) for _ in range(steps)], dtype=torch.float64)
    sd_of_mean = math.sqrt(n * q * (1 - q) / steps)
    assert abs(float(sizes.mean()) - n * q) < 4 * sd_of_mean
    assert abs(float(sizes.var()) / (n * q * (1 - q)) - 1) < 0.15  # Binomial, not fixed
    # every row can be drawn, rows are not repeated within a batch
    batch = sampler.sample()
    assert len(batch) == len(set(batch))


def test_sampler_state_round_trips():
    a = PoissonSampler(num_samples=50, sample_rate=0.3, seed=7)
    a.sample()
    state = a.state_dict()
    b = PoissonSampler(num_samples=50, sample_rate=0.3, seed=99)
    b.load_state_dict(state)
    assert [a.sample() for _ in range(3)] == [b.sample() for _ in range(3)]


def test_split_physical_sorts_by_length_and_keeps_every_row():
    lengths = [3, 9, 1, 7, 5]
    chunks = split_physical([0, 1, 2, 3, 4], lengths, 2)
    assert chunks == [[1, 3], [4, 0], [2]]


def _engine(model, data, hooks, *, steps, q=0.25, sigma=0.8, every=2, mode="ghost",
            schedule="constant"):  # fmt: skip
    return DPSGDEngine(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        phase=dp_phase(sample_rate=q, noise_multiplier=sigma, steps=steps),
        dataset=data,
        loss_fn=classification_loss_per_example,
        hooks=hooks,
        config=EngineConfig(
            grad_sample_mode=mode, physical_batch_size=4, checkpoint_every=every,
            sampler_seed=5, noise_seed=6, lr_schedule=schedule,
        ),
    )  # fmt: skip


def test_runs_exactly_the_planned_steps(tmp_path):
    model, tok = _tiny_bert()
    data = _dataset(tok, 20)
    hooks = RecordingHooks(7, tmp_path)
    result = _engine(model, data, hooks, steps=7, every=3).run()
    assert hooks.before == list(range(1, 8))
    assert [s for s, _ in hooks.after] == list(range(1, 8))
    assert result.last_step == 7 and result.steps_run == 7
    saved = [d["step"] for k, d in hooks.events if k == "checkpoint.saved"]
    assert saved == [3, 6, 7]  # every K and at the phase end
    assert find_checkpoint(tmp_path / "train")[1].step == 7
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # hooks removed


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path):
    steps = 6
    _, tok = _tiny_bert()
    data = _dataset(tok, 16)

    torch.manual_seed(0)
    straight_model, _ = _tiny_bert(dropout=True)
    straight = RecordingHooks(steps, tmp_path / "straight")
    _engine(straight_model, data, straight, steps=steps).run()

    torch.manual_seed(0)
    model, _ = _tiny_bert(dropout=True)
    hooks = RecordingHooks(steps, tmp_path / "killed", cancel_before_step=5)
    with pytest.raises(JobCancelled):
        _engine(model, data, hooks, steps=steps).run()
    assert hooks.charged == 4 and find_checkpoint(tmp_path / "killed" / "train")[1].step == 4

    # a new process: fresh model from the same base, new engine, same checkpoint folder
    torch.manual_seed(123)  # a different global RNG: the checkpoint must restore it
    resumed_model, _ = _tiny_bert(dropout=True)
    result = _engine(resumed_model, data, hooks, steps=steps).run()

    assert hooks.begins == [(0, 6), (4, 6)]
    assert hooks.before == [1, 2, 3, 4, 5, 6] and hooks.charged == steps  # nothing wasted
    assert result.resumed_from == 4 and result.last_step == steps == straight.before[-1]
    torch.testing.assert_close(_flat(resumed_model), _flat(straight_model), rtol=0, atol=1e-6)


def test_linear_lr_schedule_decays_per_step_and_survives_a_resume(tmp_path):
    steps = 4
    model, tok = _tiny_bert()
    data = _dataset(tok, 16)
    hooks = RecordingHooks(steps, tmp_path, cancel_before_step=4)
    engine = _engine(model, data, hooks, steps=steps, schedule="linear")
    lrs: list[float] = []
    step = engine._logical_step
    engine._logical_step = lambda idx: (lrs.append(engine.optimizer.param_groups[0]["lr"]),
                                        step(idx))[1]  # fmt: skip
    with pytest.raises(JobCancelled):
        engine.run()
    resumed = _engine(_tiny_bert()[0], data, hooks, steps=steps, schedule="linear")
    step2 = resumed._logical_step
    resumed._logical_step = lambda idx: (lrs.append(resumed.optimizer.param_groups[0]["lr"]),
                                         step2(idx))[1]  # fmt: skip
    resumed.run()  # from the step-2 checkpoint; step 3 was charged and lost: the phase ends at 3
    assert lrs == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.5e-3])  # step 3 again at 0.5e-3
    assert lr_factor("constant", 3, 4) == 1.0 and lr_factor("linear", 9, 4) == 0.25
    segment = DPSGDEngine(  # a later segment of the same phase follows the phase's curve
        model=_tiny_bert()[0], optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        phase=dp_phase(sample_rate=0.25, noise_multiplier=0.8, steps=steps), dataset=data,
        loss_fn=classification_loss_per_example, hooks=RecordingHooks(steps, tmp_path / "s"),
        config=EngineConfig(lr_schedule="linear", step_offset=2),
    )  # fmt: skip
    segment._set_learning_rates(1)
    assert segment.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_resume_after_wasted_steps_ends_where_begin_phase_says(tmp_path):
    steps = 6
    model, tok = _tiny_bert()
    data = _dataset(tok, 16)
    hooks = RecordingHooks(steps, tmp_path, crash_after_step=5)  # step 5 charged, not saved
    with pytest.raises(RuntimeError):
        _engine(model, data, hooks, steps=steps, mode="hooks").run()
    model2, _ = _tiny_bert()
    result = _engine(model2, data, hooks, steps=steps, mode="hooks").run()
    assert hooks.begins[-1] == (4, 5)  # one charged step was lost: the phase ends at 5
    assert result.last_step == 5 and hooks.charged == steps
    assert find_checkpoint(tmp_path / "train")[1].step == 5


def test_resume_refuses_a_checkpoint_of_another_mechanism(tmp_path):
    model, tok = _tiny_bert()
    data = _dataset(tok, 8)
    _engine(model, data, RecordingHooks(2, tmp_path), steps=2).run()
    with pytest.raises(Exception, match="refusing to mix"):
        _engine(model, data, RecordingHooks(2, tmp_path), steps=2, sigma=2.0).run()


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batches_still_step_with_noise(mode, tmp_path):
    model, tok = _tiny_bert()
    data = _dataset(tok, 4)
    before = _flat(model)
    hooks = RecordingHooks(3, tmp_path)
    result = _engine(model, data, hooks, steps=3, q=1e-6, sigma=1.0, mode=mode).run()
    assert [m for _, m in hooks.after] == [{"batch_size": 0.0}] * 3  # no NaN loss
    assert result.train_loss is None and result.last_step == 3
    assert float((_flat(model) - before).abs().max()) > 0


@pytest.mark.parametrize("train_embeddings", [False, True], ids=["head-only", "head+embedding"])
def test_clipping_is_exact_when_the_body_is_frozen(train_embeddings, tmp_path):
    """A frozen body (the classifier defaults) leaves the trainable modules' inputs without
    gradients; the clipped sum must still equal the naive per-example loop."""
    from core.models import split_trainable

    model, tok = _tiny_bert()
    reference, _ = _tiny_bert()
    for m in (model, reference):
        split_trainable(m, train_body=False, train_embeddings=train_embeddings)
    _assert_clipped_sum_matches_naive_loop(model, reference, _dataset(tok, 10), tmp_path)


def test_clipping_is_exact_when_only_the_top_layers_linear_weights_train(tmp_path):
    """No bias, norm or embedding trains: the first backward skips ∂W of the layers fed
    by gradients (attention output, MLP, head) and must still reach query/key/value, the
    lowest trainable layers, through every one of them."""
    model, tok = _tiny_bert()
    reference, _ = _tiny_bert()
    for m in (model, reference):
        for name, p in m.named_parameters():
            p.requires_grad = name.endswith("weight") and (
                name.startswith("bert.encoder.layer.1.") and "LayerNorm" not in name
                or name.startswith("classifier.")
            )  # fmt: skip
    _assert_clipped_sum_matches_naive_loop(model, reference, _dataset(tok, 10), tmp_path)


def test_group_clipping_bounds_the_embedding_and_the_rest_separately(tmp_path):
    """embedding_clip_share ρ: Σ_i [g_E,i·min(1, ρC/‖g_E,i‖), g_R,i·min(1, √(1−ρ²)C/‖g_R,i‖)],
    against a naive per-example loop; a flat clip (or a missing one) would not match."""
    from core.models import split_trainable

    model, tok = _tiny_bert()
    reference, _ = _tiny_bert()
    for m in (model, reference):
        split_trainable(m, train_body=False, train_embeddings=True)
    data = _dataset(tok, 10)
    emb = reference.get_input_embeddings().weight
    rest = [p for p in reference.parameters() if p.requires_grad and p is not emb]
    per_example = []
    for i in range(len(data)):
        reference.zero_grad(set_to_none=True)
        classification_loss_per_example(reference, data.collate([i])).sum().backward()
        per_example.append((emb.grad.reshape(-1).clone(),
                            torch.cat([p.grad.reshape(-1) for p in rest])))  # fmt: skip
    C = sorted(float(torch.cat(g).norm()) for g in per_example)[len(per_example) // 2]
    share = 0.2
    budget_e, budget_r = share * C, math.sqrt(1 - share**2) * C
    expected_e = sum(g_e * min(1.0, budget_e / (float(g_e.norm()) + 1e-6))
                     for g_e, _ in per_example)  # fmt: skip
    expected_r = sum(g_r * min(1.0, budget_r / (float(g_r.norm()) + 1e-6))
                     for _, g_r in per_example)  # fmt: skip
    # both groups are clipped for some rows, so the test sees each budget
    assert any(float(g_e.norm()) > budget_e for g_e, _ in per_example)
    assert any(float(g_r.norm()) > budget_r for _, g_r in per_example)

    weight = model.get_input_embeddings().weight
    trainable = [p for p in model.parameters() if p.requires_grad and p is not weight]
    before_e = weight.detach().reshape(-1).clone()
    before_r = torch.cat([p.detach().reshape(-1).clone() for p in trainable])
    engine = DPSGDEngine(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        phase=dp_phase(sample_rate=1.0, noise_multiplier=0.0, steps=1, max_grad_norm=C),
        dataset=data, loss_fn=classification_loss_per_example,
        hooks=RecordingHooks(1, tmp_path / "group"),
        config=EngineConfig(physical_batch_size=4, sampler_seed=0, noise_seed=0,
                            embedding_clip_share=share),
    )  # fmt: skip
    engine.run()
    got_e = (before_e - weight.detach().reshape(-1)) * len(data)
    got_r = (before_r - torch.cat([p.detach().reshape(-1) for p in trainable])) * len(data)
    for got, expected in ((got_e, expected_e), (got_r, expected_r)):
        rel = float((got - expected).norm() / expected.norm())
        assert rel < 1e-4, f"relative error {rel:.2e}"
    # the hook is gone: a later plain backward is unscaled
    assert not model.get_input_embeddings()._forward_hooks


def test_group_clipping_needs_ghost_clipping(tmp_path):
    model, tok = _tiny_bert()
    with pytest.raises(InvalidRequest, match="ghost"):
        DPSGDEngine(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            phase=dp_phase(sample_rate=0.5, noise_multiplier=1.0, steps=1, max_grad_norm=1.0),
            dataset=_dataset(tok, 4), loss_fn=classification_loss_per_example,
            hooks=RecordingHooks(1, tmp_path / "h"),
            config=EngineConfig(grad_sample_mode="hooks", embedding_clip_share=0.3),
        )  # fmt: skip
