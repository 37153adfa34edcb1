"""Least-squares refit of magnitude-pruned layers on public calibration text
(core.compress.reconstruction) and its use in dpimp_unstructured."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import core.compress.dpimp_unstructured as unstructured
from core.compress.pruning import apply_masks, global_magnitude_masks, prunable_weights
from core.compress.reconstruction import (
    DAMPING,
    calibration_inputs,
    reconstruct_pruned_linears,
)
from core.compress.sparse_format import load_sparse_model
from core.data import EncodedDataset
from tests.unit.test_compress import _ctx, _spec, _tiny_bert
from tests.unit.torch_fakes import text_rows, view

pytestmark = pytest.mark.usefixtures("recipe_settings", "one_torch_thread")


class _OneLinear(nn.Module):
    """A 'model' whose only layer reads fixed inputs x [1, n, d]."""

    def __init__(self, x: torch.Tensor, out_features: int):
        super().__init__()
        self.x, self.dense = x, nn.Linear(x.shape[-1], out_features)

    def forward(self, input_ids, attention_mask):
        return self.dense(self.x)


def test_refit_of_one_layer_is_the_least_squares_solution_on_the_kept_inputs():
    torch.manual_seed(0)
    x = torch.randn(1, 300, 6)
    model = _OneLinear(x, 3)
    target_w, target_b = torch.randn(3, 6), torch.randn(3)
    keep = torch.rand(3, 6) > 0.5
    keep[:, 0] = True  # every row keeps something
    with torch.no_grad():
        model.dense.weight.copy_(target_w * keep)
    batch = {"input_ids": torch.zeros(1, 300, dtype=torch.long),
             "attention_mask": torch.ones(1, 300, dtype=torch.long)}  # fmt: skip
    stats = reconstruct_pruned_linears(model, {"dense.weight": keep},
                                       {"dense.weight": (target_w, target_b)}, batch,
                                       damping=0.0)  # fmt: skip

    y = x[0] @ target_w.T + target_b  # [n, 3]: the unpruned layer's outputs
    for i in range(3):
        kept = keep[i].nonzero().squeeze(1)
        design = torch.cat([x[0][:, kept], torch.ones(300, 1)], 1)
        expected = torch.linalg.lstsq(design.double(), y[:, i:i + 1].double()).solution
        assert torch.allclose(model.dense.weight[i, kept].double(), expected[:-1, 0], atol=1e-5)
        bias = float(model.dense.bias[i].detach())
        assert bias == pytest.approx(float(expected[-1, 0]), abs=1e-5)
    assert (model.dense.weight[~keep] == 0).all()
    assert stats["layers"] == 1 and stats["relative_error_refit"] < stats["relative_error_pruned"]


def test_refit_keeps_the_mask_and_brings_the_pruned_encoder_closer_to_the_dense_one():
    loaded = _tiny_bert()
    dense, tokenizer = loaded.model.eval(), loaded.tokenizer
    calib = calibration_inputs(tokenizer, [r["text"] for r in text_rows(64, seed=7)],
                               max_seq_length=16, uses_token_type_ids=True)  # fmt: skip
    modules = dict(dense.named_modules())
    targets = {name: (w.detach().clone(), modules[name.removesuffix(".weight")].bias.detach())
               for name, w in prunable_weights(dense).items()}  # fmt: skip
    masks = global_magnitude_masks({n: w for n, w in targets.items() for w in [w[0]]}, 0.5)
    pruned = copy.deepcopy(dense)
    apply_masks(prunable_weights(pruned), masks)
    refit = copy.deepcopy(pruned)
    stats = reconstruct_pruned_linears(refit, masks, targets, calib)

    assert stats["layers"] == len(masks)
    assert stats["relative_error_refit"] < 0.5 * stats["relative_error_pruned"]
    for name, w in prunable_weights(refit).items():
        assert (w[~masks[name]] == 0).all()
        assert not torch.equal(w[masks[name]], targets[name][0][masks[name]])  # refit moved them

    def feature_error(model):  # on held-out text, not the calibration rows
        rows = tokenizer([r["text"] for r in text_rows(64, seed=8)], truncation=True,
                         max_length=16, padding=True, return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            return float((model.pooled_features(**rows) - dense.pooled_features(**rows))
                         .pow(2).sum())  # fmt: skip

    assert feature_error(refit) < feature_error(pruned)


def _layer_input(model, layer, calibration) -> torch.Tensor:
    """``layer``'s input on real tokens, from a full calibration pass: [n, d_in + 1] with a
    column of ones, float64."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(**calibration)
    handle.remove()
    x = seen[0][calibration["attention_mask"].bool()].double()
    return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)


def _reference_refit(model, masks, targets, calibration, damping=DAMPING):
    """The refit done plainly: one calibration pass per layer, in forward order, and each
    row's ridge least squares on its kept inputs by lstsq on the stacked design."""
    for name, layer in list(model.named_modules()):
        if f"{name}.weight" not in masks:
            continue
        x = _layer_input(model, layer, calibration)
        weight, bias = targets[f"{name}.weight"]
        y = x @ torch.cat([weight, bias[:, None]], 1).double().T  # the unpruned outputs
        keep = torch.cat([masks[f"{name}.weight"], torch.ones(len(y.T), 1, dtype=torch.bool)], 1)
        lam = damping * float(x.pow(2).sum(0).mean())  # λ: a share of H's mean diagonal
        solved = torch.zeros(keep.shape, dtype=torch.float64)
        for i, row in enumerate(keep):
            kept = row.nonzero().squeeze(1)
            design = torch.cat([x[:, kept], lam**0.5 * torch.eye(len(kept), dtype=torch.float64)])
            rhs = torch.cat([y[:, i], torch.zeros(len(kept), dtype=torch.float64)])
            solved[i, kept] = torch.linalg.lstsq(design, rhs[:, None]).solution[:, 0]
        with torch.no_grad():
            layer.weight.copy_(solved[:, :-1])
            layer.bias.copy_(solved[:, -1])


def test_grouped_passes_and_cholesky_refit_match_the_plain_per_layer_refit():
    loaded = _tiny_bert()
    model = loaded.model.eval()
    calib = calibration_inputs(loaded.tokenizer, None, max_seq_length=16,
                               uses_token_type_ids=True, sequences=32)  # fmt: skip
    modules = dict(model.named_modules())
    targets = {name: (w.detach().clone(),
                      modules[name.removesuffix(".weight")].bias.detach().clone())
               for name, w in prunable_weights(model).items()}  # fmt: skip
    masks = global_magnitude_masks({n: t[0] for n, t in targets.items()}, 0.5)
    apply_masks(prunable_weights(model), masks)
    expected = copy.deepcopy(model)
    _reference_refit(expected, masks, targets, calib)
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    stats = reconstruct_pruned_linears(model, masks, targets, calib)

    # each block's query, key and value read the same hidden states: one pass for the three
    blocks = [name for name in masks if name.endswith(".attention.self.query.weight")]
    assert blocks and len(passes) == stats["layers"] - 2 * len(blocks)
    reference = dict(expected.named_parameters())
    for name, got in model.named_parameters():
        want = reference[name]
        assert float((got - want).norm()) <= 1e-6 * float(want.norm()), name
        if name in masks:
            assert (got[~masks[name]] == 0).all()


def test_random_token_calibration_has_no_special_tokens_inside():
    tokenizer = _tiny_bert().tokenizer
    calib = calibration_inputs(tokenizer, None, max_seq_length=16, uses_token_type_ids=False,
                               sequences=32)  # fmt: skip
    ids = calib["input_ids"]
    assert ids.shape == (32, 16) and "token_type_ids" not in calib
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert (ids[:, -1] == tokenizer.sep_token_id).all()
    inner = set(ids[:, 1:-1].reshape(-1).tolist())
    assert not inner & set(tokenizer.all_special_ids) and len(inner) > 50


def test_unstructured_refits_on_the_named_public_rows_and_never_on_private_ones(
    tmp_path, monkeypatch
):
    tokenizer = _tiny_bert().tokenizer
    refits: list[torch.Tensor] = []
    active = False

    def spy(model, masks, targets, calibration, **kwargs):
        nonlocal active
        refits.append(calibration["input_ids"].clone())
        active = True
        try:
            return reconstruct_pruned_linears(model, masks, targets, calibration, **kwargs)
        finally:
            active = False

    collate = EncodedDataset.collate

    def guarded_collate(self, indices):
        if active:
            raise AssertionError("a private batch was drawn during the refit")
        return collate(self, indices)

    monkeypatch.setattr(unstructured, "reconstruct_pruned_linears", spy)
    monkeypatch.setattr(EncodedDataset, "collate", guarded_collate)
    spec = _spec("dpimp_unstructured", train_body=False, target_sparsity=0.5)
    spec = spec.model_copy(update={"calibration_dataset_id": "ds_public"})
    ctx, hooks = _ctx(tmp_path, spec, {"train": 4})
    private_texts = {r["text"] for r in ctx.train.rows}
    public_rows = [r for r in text_rows(48, seed=9) if r["text"] not in private_texts]
    ctx = dataclasses.replace(ctx, calibration=view(public_rows, ds_id="ds_public"))
    m = unstructured.run(ctx).metrics

    def token_rows(texts):
        return {tuple(tokenizer(t, truncation=True, max_length=16)["input_ids"]) for t in texts}

    assert len(refits) == 1  # one event, at step 0 (frozen body)
    read = {tuple(ids[ids != tokenizer.pad_token_id].tolist()) for ids in refits[0]}
    assert read == token_rows(r["text"] for r in public_rows)
    assert not read & token_rows(private_texts)
    assert m["reconstruction"]["calibration"] == "dataset ds_public (public text)"
    event = m["prune_events"][0]
    assert event["step"] == 0 and event["reconstruction"]["layers"] == len(m["pruned_tensors"])
    assert hooks.steps("train") == [1, 2, 3, 4]
    # the mask is the pre-trained weights' magnitude mask; the kept weights were refit
    pretrained = {n: w.detach() for n, w in prunable_weights(_tiny_bert().model).items()}
    masks = global_magnitude_masks(pretrained, 0.5)
    for name, w in prunable_weights(load_sparse_model(ctx.output_dir)).items():
        assert torch.equal(w != 0, masks[name])
        assert not torch.equal(w, pretrained[name] * masks[name])


def test_unstructured_without_a_calibration_dataset_refits_on_random_token_ids(tmp_path):
    spec = _spec("dpimp_unstructured", train_body=False, target_sparsity=0.5)
    ctx, _ = _ctx(tmp_path, spec, {"train": 2})
    m = unstructured.run(ctx).metrics
    assert m["reconstruction"]["calibration"] == "random token ids"
    assert "reconstruction" in m["prune_events"][0]
