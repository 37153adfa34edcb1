"""Magnitude pruning (Mireshghallah et al. 2022, Alg. 2 and 3): scores, masks, schedules,
and physically smaller models.

Privacy: every decision here is a function of model weights only. Scoring functions take
a ``{name: tensor}`` mapping of weights — never a batch, a dataset or a model to run — so
when the weights come out of DP-SGD the decisions are post-processing and cost no ε.

Two kinds of pruning:

* unstructured (Alg. 3): a global mask over the individual weights of the encoder's
  linear layers (:func:`prunable_weights`; not embeddings, LayerNorm, biases or the task
  head); the pruned weights are multiplied by 0 after every optimizer step.
* structured (Alg. 2): whole transformer layers and FFN neurons are removed and the
  model rebuilt with a smaller config (:func:`shrink_model`). Under transformers 5 a
  config can only express fewer layers (``num_hidden_layers``) and the same number of
  FFN neurons in every layer (``intermediate_size``) — DESIGN section 8 — so neurons are
  removed uniformly per layer, and attention heads are never removed.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from core.errors import InvalidRequest

Schedule = Literal["cubic", "stepwise"]
LayerSelection = Literal["top", "magnitude"]
MIN_FFN_SHARE = 0.125  # structured, layers + FFN: narrow FFNs to 1/8 before dropping layers


# -- where the encoder's layers and FFN neurons live ------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Parameter-name layout of a transformer's stack of layers.

    Attributes:
        layers: name of the ``nn.ModuleList`` of layers ("bert.encoder.layer").
        ffn_in: linear layers (relative to a layer) whose output rows are FFN neurons.
        ffn_out: the linear layer whose input columns are FFN neurons.
    """

    layers: str
    ffn_in: tuple[str, ...]
    ffn_out: str


BERT = Anatomy("bert.encoder.layer", ("intermediate.dense",), "output.dense")
LLAMA = Anatomy("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")


def encoder_anatomy(model: nn.Module) -> Anatomy:
    """The layout of ``model`` (BERT family with a ``bert`` body, or Llama family).

    Raises:
        InvalidRequest: another architecture.
    """
    names = dict(model.named_modules())
    for anatomy in (BERT, LLAMA):
        if isinstance(names.get(anatomy.layers), nn.ModuleList):
            return anatomy
    raise InvalidRequest(
        f"pruning supports BERT-family and Llama-family models, not {type(model).__name__}",
        param="model.base",
    )


def layer_index(name: str, anatomy: Anatomy) -> int | None:
    """Index of the layer a parameter belongs to ("bert.encoder.layer.3.x" → 3), or None."""
    match = re.match(re.escape(anatomy.layers) + r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


# -- unstructured: global magnitude masks (Alg. 3) ---------------------------------------


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weight matrices of every ``nn.Linear`` inside the encoder layers, by name."""
    anatomy = encoder_anatomy(model)
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and layer_index(f"{name}.", anatomy) is not None
    }


def magnitude_scores(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Importance of each weight: |w| (same shapes as ``weights``)."""
    return {name: w.detach().abs() for name, w in weights.items()}


def global_magnitude_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """Keep-masks that prune the ``round(sparsity · n)`` smallest-|w| weights over all
    tensors together (global magnitude pruning; n = total weights).

    Args:
        weights: tensors to prune, by name (the DP-trained weights, nothing else).
        sparsity: fraction in [0, 1) of the weights to prune.

    Returns:
        Bool masks of the same shapes, True = kept. Already-zero weights are the smallest,
        so with a non-decreasing schedule a pruned weight stays pruned.
    """
    scores = magnitude_scores(weights)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])  # [n]
    n_pruned = round(sparsity * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_pruned:
        keep[torch.topk(flat, n_pruned, largest=False, sorted=False).indices] = False
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
    return masks


@torch.no_grad()
def apply_masks(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """w ← w ⊙ m in place for every masked parameter (pruned positions become exactly 0)."""
    for name, mask in masks.items():
        params[name].mul_(mask)


@torch.no_grad()
def zero_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> None:
    """Zero every per-parameter state tensor (Adam's m and v, momentum) at pruned positions,
    so that noise accumulated in the moments cannot push a pruned weight back."""
    for name, mask in masks.items():
        for value in optimizer.state.get(params[name], {}).values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                value.mul_(mask)


def sparsity_by_layer(weights: Mapping[str, torch.Tensor], anatomy: Anatomy) -> dict[str, float]:
    """Fraction of exactly-zero weights per encoder layer ("layer.0": 0.5, ...)."""
    zeros: dict[str, list[int]] = {}
    for name, w in weights.items():
        key = f"layer.{layer_index(name, anatomy)}"
        z = zeros.setdefault(key, [0, 0])
        z[0] += int((w == 0).sum())
        z[1] += w.numel()
    return {k: z / n for k, (z, n) in sorted(zeros.items(), key=lambda kv: int(kv[0][6:]))}


# -- schedules -------------------------------------------------------------------------


def prune_events(
    total_steps: int, *, target: float, schedule: Schedule, rounds: int
) -> dict[int, float]:
    """Steps after whose update the model is pruned, and the sparsity reached there.

    ``rounds`` events evenly spaced over the phase at t_k = ⌈k·T/(R+1)⌉ (k = 1..R), which
    leaves the last ~T/(R+1) steps to recover from the final event. Sparsity at event k:

    * cubic (Zhu & Gupta 2017): s_k = s_f · (1 − (1 − k/R)³) — prune fast early, slowly late;
    * stepwise: s_k = s_f · k/R — equal steps.

    Both reach s_f = ``target`` at the last event. Events that fall on the same step (T ≤ R)
    merge and keep the larger sparsity.

    Returns:
        ``{step: sparsity}`` (1-based steps, sorted, sparsity non-decreasing).
    """
    events: dict[int, float] = {}
    for k in range(1, rounds + 1):
        step = min(total_steps, max(1, math.ceil(k * total_steps / (rounds + 1))))
        frac = k / rounds
        level = target * (1 - (1 - frac) ** 3) if schedule == "cubic" else target * frac
        events[step] = max(events.get(step, 0.0), level)
    return dict(sorted(events.items()))


def pruning_events(
    total_steps: int, *, target: float, schedule: Schedule, rounds: int, weights_train: bool
) -> dict[int, float]:
    """The recipe's prune events: :func:`prune_events`, or ``{0: target}`` when the
    prunable weights do not train.

    Alg. 2 and 3 prune gradually so that training recovers between events. A frozen body
    (or BitFit, which trains only biases and norms) never changes the weight matrices the
    scores read, so every event would pick from the same magnitudes, there is nothing to
    recover, and gradual pruning would only move the features under the head while it
    trains. Then the target is pruned once, before the first step (step 0).
    """
    if not weights_train:
        return {0: target}
    return prune_events(total_steps, target=target, schedule=schedule, rounds=rounds)


def sparsity_in_force(events: Mapping[int, float], step: int) -> float:
    """Sparsity of the last event at or before ``step`` (0 before the first)."""
    return max((s for t, s in events.items() if t <= step), default=0.0)


# -- structured: sizes, scores and the smaller model (Alg. 2) ------------------------------


@dataclass(frozen=True)
class EncoderShape:
    """Parameter counts of the layer stack, with FFN width as the variable.

    Attributes:
        num_layers: L, layers in the stack.
        intermediate_size: I, FFN neurons per layer.
        fixed_per_layer: parameters of one layer that do not depend on I (attention,
            norms, FFN output bias).
        per_neuron: parameters of one FFN neuron in one layer (its rows in the FFN input
            projections with their biases, and its column of the output projection).
    """

    num_layers: int
    intermediate_size: int
    fixed_per_layer: int
    per_neuron: int

    def parameters(self, num_layers: int | None = None, intermediate_size: int | None = None):
        layers = self.num_layers if num_layers is None else num_layers
        width = self.intermediate_size if intermediate_size is None else intermediate_size
        return layers * (self.fixed_per_layer + width * self.per_neuron)


def encoder_shape(model: nn.Module) -> EncoderShape:
    """The :class:`EncoderShape` of ``model`` (uniform layers assumed, as configs say)."""
    anatomy = encoder_anatomy(model)
    layers = cast(nn.ModuleList, model.get_submodule(anatomy.layers))
    first = layers[0]
    out = cast(nn.Linear, first.get_submodule(anatomy.ffn_out))
    ffn_in = [cast(nn.Linear, first.get_submodule(name)) for name in anatomy.ffn_in]
    width = out.in_features
    per_neuron = out.out_features + sum(m.in_features + (m.bias is not None) for m in ffn_in)
    total = sum(p.numel() for p in first.parameters())
    return EncoderShape(len(layers), width, total - width * per_neuron, per_neuron)


def structure_sizes(
    original: EncoderShape,
    current: EncoderShape,
    *,
    sparsity: float,
    target: float,
    structures: Iterable[str],
) -> tuple[int, int]:
    """(layers, FFN width) after an event at ``sparsity`` on the way to ``target``, never
    growing back what is already removed.

    The final shape removes at least ``target`` of the original encoder parameters: with
    layers only, ⌈L·s_f⌉ layers go; with FFN only, the widest uniform FFN that fits stays;
    with both, FFN neurons go first and whole layers only as far as needed to keep at least
    ``MIN_FFN_SHARE`` of the FFN width (a layer holds attention too: dropping one costs
    more function per parameter than narrowing FFNs, which are 2/3 of a BERT layer). An
    event at s_k < s_f drops a proportional share of the final layers and narrows the FFN
    to fit s_k, but never below the final width — so no later event overshoots the target.

    Raises:
        InvalidRequest: the target cannot be met with the allowed structures (at least one
            layer and one neuron per layer always stay).
    """
    structures = set(structures)
    use_layers, use_ffn = "layers" in structures, "ffn" in structures

    def keep_budget(s: float) -> int:  # encoder parameters that may stay at sparsity s
        return math.floor((1 - s) * original.parameters() + 1e-6)

    def widest(layers: int, s: float) -> int:  # FFN width that fits the budget of s
        return math.floor((keep_budget(s) / layers - original.fixed_per_layer)
                          / original.per_neuron + 1e-9)  # fmt: skip

    L, width = original.num_layers, original.intermediate_size
    final_layers = L
    if use_layers and not use_ffn:
        final_layers = L - math.ceil(L * target - 1e-9)
    elif use_layers:  # as few layers as keep MIN_FFN_SHARE of the FFN width
        min_width = max(1, math.ceil(MIN_FFN_SHARE * width))
        while final_layers > 1 and widest(final_layers, target) < min_width:
            final_layers -= 1
    final_width = widest(final_layers, target) if use_ffn and final_layers >= 1 else width
    final_width = min(final_width, width)
    if (
        final_layers < 1
        or final_width < 1
        or (original.parameters(final_layers, final_width) > keep_budget(target))
    ):
        raise InvalidRequest(
            f"compression.target_sparsity={target:g} cannot be reached by removing "
            f"{sorted(structures)} from {L} layers × {width} FFN neurons (one layer and one "
            "neuron per layer must stay); lower the target or allow both 'layers' and 'ffn'",
            param="compression.target_sparsity",
        )
    share = sparsity / target if target else 1.0
    layers = L - math.floor((L - final_layers) * share + 1e-9)
    if use_layers and not use_ffn:
        layers = L - math.ceil(L * sparsity - 1e-9)
    layers = max(final_layers, min(current.num_layers, layers))
    if use_ffn:
        width = max(final_width, min(current.intermediate_size, widest(layers, sparsity)))
    return layers, min(width, current.intermediate_size)


def layer_scores(weights: Mapping[str, torch.Tensor], anatomy: Anatomy) -> torch.Tensor:
    """Mean |w| over the weight matrices of each layer, shape [L]."""
    sums: dict[int, list[float]] = {}
    for name, w in weights.items():
        i = layer_index(name, anatomy)
        if i is not None and w.dim() == 2:
            s = sums.setdefault(i, [0.0, 0])
            s[0] += float(w.detach().abs().sum())
            s[1] += w.numel()
    return torch.tensor([sums[i][0] / sums[i][1] for i in range(len(sums))])


def neuron_scores(weights: Mapping[str, torch.Tensor], anatomy: Anatomy, layer: int):
    """L1 norm of each FFN neuron's weights in ``layer`` (its input rows + output
    column), shape [I]."""
    prefix = f"{anatomy.layers}.{layer}."
    score = weights[f"{prefix}{anatomy.ffn_out}.weight"].detach().abs().sum(dim=0)  # [I]
    for name in anatomy.ffn_in:
        score = score + weights[f"{prefix}{name}.weight"].detach().abs().sum(dim=1)
    return score


def select_structures(
    weights: Mapping[str, torch.Tensor],
    anatomy: Anatomy,
    *,
    num_layers: int,
    width: int,
    layer_selection: LayerSelection = "magnitude",
) -> tuple[list[int], list[list[int]]]:
    """The ``num_layers`` layers to keep and, in each, the ``width`` FFN neurons with the
    largest magnitude scores (indices into the current model, ascending).

    Args:
        layer_selection: "magnitude" keeps the layers with the largest mean |w|; "top"
            removes the top layers and keeps the first ``num_layers`` (Sajjad et al. 2023:
            of the layer-dropping orders tried on BERT, top-down keeps the most accuracy).
    """
    if layer_selection == "top":
        keep_layers = list(range(num_layers))
    else:
        scores = layer_scores(weights, anatomy)
        keep_layers = sorted(torch.topk(scores, num_layers).indices.tolist())
    keep_neurons = [
        sorted(torch.topk(neuron_scores(weights, anatomy, i), width).indices.tolist())
        for i in keep_layers
    ]
    return keep_layers, keep_neurons


def shrink_model(
    model: Any, *, keep_layers: list[int], keep_neurons: list[list[int]] | None = None
) -> Any:
    """A physically smaller copy of ``model``: only ``keep_layers`` (renumbered 0..L'−1)
    and, in each, only ``keep_neurons`` (same count per layer); all else copied as is.

    The copy has a config with the new ``num_hidden_layers`` and ``intermediate_size``, so
    its ``save_pretrained`` folder loads with plain ``from_pretrained``; ``requires_grad``
    flags are carried over (e.g. a frozen tied embedding stays frozen).
    """
    anatomy = encoder_anatomy(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep_layers)
    if keep_neurons is not None:
        config.intermediate_size = len(keep_neurons[0])
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    new_index = {old: new for new, old in enumerate(keep_layers)}
    state, grads = {}, {n: p.requires_grad for n, p in model.named_parameters()}
    new_grads = {}
    for name, tensor in model.state_dict().items():
        i = layer_index(name, anatomy)
        if i is None:
            state[name], new_grads[name] = tensor, grads.get(name, False)
            continue
        if i not in new_index:
            continue
        local = name[len(f"{anatomy.layers}.{i}.") :]
        if keep_neurons is not None:
            rows = torch.tensor(keep_neurons[new_index[i]], device=tensor.device)
            if local.rsplit(".", 1)[0] in anatomy.ffn_in:
                tensor = tensor.index_select(0, rows)  # weight [I, H] or bias [I]
            elif local == f"{anatomy.ffn_out}.weight":
                tensor = tensor.index_select(1, rows)  # weight [H, I]
        renamed = f"{anatomy.layers}.{new_index[i]}.{local}"
        state[renamed], new_grads[renamed] = tensor.clone(), grads.get(name, False)
    smaller = type(model)(config)
    smaller.load_state_dict(state, strict=True)
    smaller.to(next(model.parameters()).device)
    for name, p in smaller.named_parameters():
        p.requires_grad_(new_grads[name])
    return smaller
