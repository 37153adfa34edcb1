"""``dpimp_structured``: DP iterative structured pruning (Mireshghallah et al. 2022, Alg. 2).

    1. load the base model with a task head; keep a dense copy for the report
    2. check the structures: whole layers and/or FFN neurons (attention heads cannot be
       removed under transformers 5, DESIGN section 8) and that the target is reachable
    3. tokenise the private rows
    4. the pruning plan, from the spec only: R events t_1 < … < t_R on the cubic or
       stepwise schedule, the k-th removing s_k of the encoder's parameters (s_R = s_f =
       target_sparsity); they cut the ONE planned DP-SGD phase "train" into R + 1 segments.
       When the scored weight matrices do not train (a frozen body, BitFit) the plan is
       one event at step 0: the final structure, before the first step
    5. for each segment [t_k, t_{k+1}):
         DP-SGD on the current model (fresh optimizer; same phase, same step counter;
           a classifier trains only its head unless ``training.train_body`` is set)
         at t_{k+1}: score layers and FFN neurons by weight magnitude, keep the best,
                     rebuild a physically smaller model (new config, kept weights copied)
       (every event is applied, also when a crash's lost steps left a segment short,
       so the output always meets s_f)
    6. evaluate on the user's eval dataset, if named (non-private evaluation)
    7. save a plain HF folder whose config says the new num_hidden_layers and
       intermediate_size; report size and latency next to the dense base

Privacy: only the DP-SGD steps of step 5 read private rows, through the engine. The phase
is begun ONCE (``begin_phase``) and its steps are charged in order across segments
(:class:`SegmentHooks`), so the ledger charges exactly the planned steps. Structures are
chosen from the DP-trained weights alone: post-processing.

Resume: each segment checkpoints into its own folder next to a ``structure.json`` that
says the model's shape in that segment; a restarted job rebuilds that shape and continues
from the latest checkpoint (re-pruning at a segment end is deterministic in the weights).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch

from core.compress.base_model import load_base_model
from core.compress.pruning import (
    encoder_anatomy,
    encoder_shape,
    pruning_events,
    select_structures,
    shrink_model,
    structure_sizes,
)
from core.compress.report import compression_report, eval_metrics, evaluate_on_eval_set
from core.data import encode_dataset
from core.errors import InvalidRequest
from core.models import load_snippet, save_model
from core.models.loading import Task
from core.privacy.engine import DPSGDEngine
from core.recipe_api import JobContext, RecipeHooks, RecipeResult
from core.training.checkpoint import find_checkpoint
from core.training.frozen_body import frozen_body_loss
from core.training.losses import causal_lm_loss_per_example, classification_loss_per_example
from core.training.optim import COMPRESSION_CLASSIFIER_BODY as CLASSIFIER_BODY
from core.training.optim import body_training, dp_optimizer, engine_config

PHASE = "train"
# What trains by default (a classifier: only its head, measured best for this recipe) and
# the learning rates: core.training.optim, shared with dp_finetune.
STRUCTURE_FILE = "structure.json"


@dataclass
class Structure:
    """The model's shape during one segment (the resume sidecar ``structure.json``).

    Attributes:
        segment: segment index k (0 = before the first event).
        layer_ids: original indices of the layers still present.
        intermediate_size: FFN neurons per layer.
        history: the prune events so far: step, target sparsity, layers, FFN width.
    """

    segment: int
    layer_ids: list[int]
    intermediate_size: int
    history: list[dict] = field(default_factory=list)


class SegmentHooks:
    """The runner's hooks for segment k = steps (start, end] of one planned phase.

    The engine of each segment counts its own steps from 1; they are shifted by ``start``
    before they reach the runner. ``begin_phase`` reaches the runner only once per phase
    (the first segment this attempt runs), so the phase is begun, resumed and charged
    exactly as a single engine would; checkpoints go to a folder of their own per segment.
    """

    def __init__(self, hooks: RecipeHooks, *, segment: int, start: int, end: int, state: dict):
        self.hooks, self.segment, self.start, self.end = hooks, segment, start, end
        self.state = state  # shared by all segments: {"last": last step begin_phase allowed}

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        if "last" not in self.state:
            self.state["last"] = self.hooks.begin_phase(
                phase, resumed_step=self.start + resumed_step
            )
        return min(self.end, self.state["last"]) - self.start

    def before_step(self, phase: str, step: int) -> None:
        self.hooks.before_step(phase, self.start + step)

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.hooks.after_step(phase, self.start + step, metrics)

    def checkpoint_dir(self, phase: str) -> Path:
        return self.hooks.checkpoint_dir(phase) / f"segment-{self.segment:02d}"

    def event(self, kind: str, data: dict) -> None:
        self.hooks.event(kind, {**data, "segment": self.segment, "step_offset": self.start})


def run(ctx: JobContext) -> RecipeResult:
    spec, training, comp, hooks = ctx.spec, ctx.spec.training, ctx.spec.compression, ctx.hooks
    task = cast(Task, ctx.train.task)
    phase = ctx.plan.phase(PHASE)
    torch.manual_seed(training.seed)  # dropout; DP noise and sampling have their own RNGs

    # 1. base model + task head; a dense copy is the report's reference
    loaded = load_base_model(ctx, task, phase=PHASE)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_base = copy.deepcopy(model)

    # 2. what may be removed, and whether the target is reachable (before any step)
    if "heads" in comp.structures:
        raise InvalidRequest(
            "compression.structures: attention heads cannot be removed — transformers 5 has "
            "no head pruning and a smaller config can only say fewer layers "
            "(num_hidden_layers) or narrower FFNs (intermediate_size); use 'layers' and/or "
            "'ffn'",
            param="compression.structures",
        )
    original = encoder_shape(model)
    structure_sizes(original, original, sparsity=comp.target_sparsity,
                    target=comp.target_sparsity, structures=comp.structures)  # fmt: skip

    # 3. private rows → token ids
    uses_token_type_ids = getattr(model.config, "type_vocab_size", 0) > 0
    train_rows = encode_dataset(
        ctx.train, tokenizer, task=task, max_seq_length=training.max_seq_length,
        uses_token_type_ids=uses_token_type_ids,
    )  # fmt: skip

    # 4. the pruning plan (public: spec + planned steps) → segments of the one phase
    #    (one event at step 0 when the scored weights do not train: a frozen body, BitFit)
    train_body = body_training(spec, task=task, classifier_body=CLASSIFIER_BODY)
    weights_train = train_body is True
    events = pruning_events(phase.steps, target=comp.target_sparsity,
                            schedule=comp.prune_schedule, rounds=comp.prune_rounds,
                            weights_train=weights_train)  # fmt: skip
    ends = [*events, phase.steps] if phase.steps not in events else list(events)
    starts = [0, *ends[:-1]]
    ckpt_root = hooks.checkpoint_dir(PHASE)
    structure = _latest_structure(ckpt_root, len(ends)) or Structure(
        0, list(range(original.num_layers)), original.intermediate_size
    )
    model = _reshape(model, structure)

    # 5. DP-SGD segment by segment; prune at each segment end that is an event
    phase_state: dict = {}  # what begin_phase allowed, shared by the segments
    segments = []  # (start step, PhaseResult) of each segment run by this attempt
    for k in range(structure.segment, len(ends)):
        if ends[k] > starts[k]:  # the segment before a step-0 event has no steps
            seg_hooks = SegmentHooks(hooks, segment=k, start=starts[k], end=ends[k],
                                     state=phase_state)  # fmt: skip
            segments.append((starts[k], _train_segment(ctx, model, train_rows, seg_hooks, task)))
        if ends[k] in events:
            model, structure = _prune(model, structure, original, comp,
                                      sparsity=events[ends[k]], step=ends[k])  # fmt: skip
            _save_structure(ckpt_root, structure)
            hooks.event("prune.structured", {"phase": PHASE, **structure.history[-1]})

    model.eval()

    # 6. evaluation on the user's eval dataset (non-private, flagged)
    evaluation = evaluate_on_eval_set(ctx, model, tokenizer)

    # 7. the artifact: a plain, smaller HF folder; the report
    save_model(model.cpu(), tokenizer, ctx.output_dir)
    report = compression_report(model, dense_base, output_dir=ctx.output_dir,
                                seq_len=training.max_seq_length)  # fmt: skip
    kept = encoder_shape(model).parameters()
    metrics = {
        "task": task,
        "phase": PHASE,
        **_summarise(segments),
        "planned_steps": phase.steps,
        "sample_rate": phase.sample_rate,
        "noise_multiplier": phase.noise_multiplier,
        "max_grad_norm": phase.max_grad_norm,
        "learning_rate": training.body_learning_rate(train_body),
        "pooling": loaded.pooling,
        "train_body": train_body,
        "target_sparsity": comp.target_sparsity,
        "structures": list(comp.structures),
        "prune_schedule": comp.prune_schedule if weights_train else "one_shot",
        "encoder_parameters": kept,
        "base_encoder_parameters": original.parameters(),
        "achieved_sparsity": round(1 - kept / original.parameters(), 6),
        "kept_layers": structure.layer_ids,
        "prune_events": structure.history,
        **report,
        **eval_metrics(evaluation),
        "non_private_metrics": ["train_loss", "samples_seen"],
    }
    card = {
        "method": "dpimp_structured",
        "base_model": spec.model.base,
        "pooling": loaded.pooling,
        "sparsity": metrics["achieved_sparsity"],
        "load": load_snippet(task, loaded.pooling),
    }
    return RecipeResult(metrics=metrics, model_card_extra=card)


def _train_segment(ctx: JobContext, model, rows, seg_hooks: SegmentHooks, task: str):
    """DP-SGD on ``model`` for one segment: fresh optimizer (per-group lr), new engine."""
    spec = ctx.spec
    optimizer = dp_optimizer(model, spec, task=task, classifier_body=CLASSIFIER_BODY).optimizer
    engine = DPSGDEngine(
        model=model,
        optimizer=optimizer,
        phase=ctx.plan.phase(PHASE), dataset=rows,
        loss_fn=frozen_body_loss(  # a frozen body: features once per row (this segment)
            model,
            classification_loss_per_example if task == "classification"
            else causal_lm_loss_per_example,
        ),
        hooks=seg_hooks,
        config=engine_config(spec, step_offset=seg_hooks.start),
        device=ctx.device,
    )  # fmt: skip
    return engine.run()


def _prune(model, structure: Structure, original, comp, *, sparsity: float, step: int):
    """Remove the lowest-magnitude layers / FFN neurons until ``sparsity`` of the original
    encoder parameters are gone; returns the smaller model and its :class:`Structure`."""
    current = encoder_shape(model)
    layers, width = structure_sizes(
        original,
        current,
        sparsity=sparsity,
        target=comp.target_sparsity,
        structures=comp.structures,
    )
    weights = {name: p.detach() for name, p in model.named_parameters()}  # weights only
    keep_layers, keep_neurons = select_structures(
        weights, encoder_anatomy(model), num_layers=layers, width=width,
        layer_selection=comp.layer_selection,
    )  # fmt: skip
    smaller = shrink_model(model, keep_layers=keep_layers, keep_neurons=keep_neurons)
    layer_ids = [structure.layer_ids[i] for i in keep_layers]
    event = {
        "step": step,
        "sparsity": round(sparsity, 6),
        "num_hidden_layers": layers,
        "intermediate_size": width,
        "removed_layers": sorted(set(structure.layer_ids) - set(layer_ids)),
    }
    return smaller, Structure(structure.segment + 1, layer_ids, width,
                              [*structure.history, event])  # fmt: skip


def _reshape(model, structure: Structure):
    """``model`` with the shape of ``structure`` (weights are overwritten by the resumed
    checkpoint); ``model`` itself when nothing was removed yet."""
    if structure.segment == 0:
        return model
    return shrink_model(
        model,
        keep_layers=list(range(len(structure.layer_ids))),
        keep_neurons=[list(range(structure.intermediate_size))] * len(structure.layer_ids),
    )


def _segment_dir(ckpt_root: Path, segment: int) -> Path:
    return Path(ckpt_root) / f"segment-{segment:02d}"


def _save_structure(ckpt_root: Path, structure: Structure) -> None:
    folder = _segment_dir(ckpt_root, structure.segment)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STRUCTURE_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(structure), indent=2))
    tmp.replace(folder / STRUCTURE_FILE)


def _latest_structure(ckpt_root: Path, num_segments: int) -> Structure | None:
    """The structure of the latest segment that has a checkpoint (None: segment 0 or a
    fresh start)."""
    for k in range(num_segments - 1, 0, -1):
        folder = _segment_dir(ckpt_root, k)
        if find_checkpoint(folder) is not None:
            return Structure(**json.loads((folder / STRUCTURE_FILE).read_text()))
    return None


def _summarise(segments: list) -> dict:
    """Phase-level numbers from the segments run by this attempt (global step indices)."""
    if not segments:
        return {"steps": 0, "steps_run_this_attempt": 0, "train_loss": None}
    losses = [(r.train_loss, r.last_step) for _, r in segments if r.train_loss is not None]
    weight = sum(n for _, n in losses)
    first_start, first = segments[0]
    return {
        "steps": max((start + r.last_step for start, r in segments if r.last_step), default=0),
        "resumed_from_step": first_start + first.resumed_from,
        "steps_run_this_attempt": sum(r.steps_run for _, r in segments),
        "train_loss": sum(loss * n for loss, n in losses) / weight if weight else None,
        "samples_seen": sum(r.samples_seen for _, r in segments),
        "train_seconds": round(sum(r.seconds for _, r in segments), 3),
    }

