"""``dpimp_unstructured``: DP iterative magnitude pruning of individual weights
(Mireshghallah et al. 2022, Alg. 3).

    1. load the base model with a task head; keep a dense copy for the report
    2. tokenise the private rows
    3. optimizer with per-group learning rates (fresh head ≫ pretrained body); a
       classifier trains only its head unless ``training.train_body`` is set (measured
       best, core.training.optim)
    4. the pruning plan, from the spec only: prunable weights = the encoder's linear
       weights; R events on the cubic or stepwise schedule reaching s_f = target_sparsity,
       or one event at step 0 when those weights do not train (a frozen body, BitFit)
    5. one DP-SGD phase "train" (exactly the planned steps); after EVERY update:
         w ← w ⊙ m  and Adam's moments ← moments ⊙ m   (DP noise re-densifies w otherwise)
       and at each event t_k: m ← global magnitude mask of the current weights at s_k,
       then (``compression.reconstruct``) each pruned linear layer's kept weights and bias
       are refit by least squares to its unpruned outputs on PUBLIC calibration text
    6. post-processing: if a crash cost the last events, prune to s_f now
    7. evaluate on the user's eval dataset, if named (non-private evaluation)
    8. save a bitmask-sparse folder (smaller on disk; loads back into a dense HF model)
       and report sparsity per layer, size and latency next to the dense base

Privacy: only step 5 reads private rows, through the engine, which reports every logical
step to ``ctx.hooks`` before it touches data. Masks are computed from the DP-trained
weights alone (:mod:`core.compress.pruning` never sees a batch): post-processing. The refit
(:mod:`core.compress.reconstruction`) reads those weights and public calibration inputs
only: the dataset named by ``calibration_dataset_id`` or random token ids.
Masks are not stored: the checkpoint's weights are zero exactly where the mask in force
prunes, so a resumed run recomputes the same mask from them.

``torch.nn.utils.prune`` is not used: its ``weight_orig``/``weight_mask`` re-parametrisation
is rejected by Opacus' per-sample gradient hooks.
"""

from __future__ import annotations

import copy
from typing import cast

import torch

from core.compress.base_model import load_base_model
from core.compress.pruning import (
    apply_masks,
    global_magnitude_masks,
    prunable_weights,
    pruning_events,
    sparsity_in_force,
    zero_optimizer_state,
)
from core.compress.reconstruction import calibration_inputs, reconstruct_pruned_linears
from core.compress.report import (
    compression_report,
    eval_metrics,
    evaluate_on_eval_set,
    phase_run_metrics,
)
from core.compress.sparse_format import SPARSE_FILE, sparsify_folder
from core.data import encode_dataset
from core.models import save_model
from core.models.loading import Task
from core.privacy.engine import DPSGDEngine
from core.recipe_api import JobContext, RecipeHooks, RecipeResult
from core.training.frozen_body import frozen_body_loss
from core.training.losses import causal_lm_loss_per_example, classification_loss_per_example
from core.training.optim import COMPRESSION_CLASSIFIER_BODY as CLASSIFIER_BODY
from core.training.optim import dp_optimizer, engine_config

PHASE = "train"
# What trains by default (a classifier: only its head, measured best for this recipe) and
# the learning rates: core.training.optim, shared with dp_finetune.


def load_hint(pooling: str | None) -> str:
    """The model card's load call: the folder's own loader densifies the weights."""
    remote = ", trust_remote_code=True" if pooling == "mean" else ""
    return (
        "from transformers import AutoTokenizer\n"
        "from transformers.dynamic_module_utils import get_class_from_dynamic_module\n"
        'load_sparse_model = get_class_from_dynamic_module("sparse_format.load_sparse_model", '
        '"model")\n'
        'model = load_sparse_model("model")  # bitmask-sparse weights → a dense HF model\n'
        f'tokenizer = AutoTokenizer.from_pretrained("model"{remote})'
    )


class MaskingHooks:
    """The runner's hooks plus Alg. 3's mask step, run right after each DP-SGD update.

    The engine calls ``after_step`` after the logical step's (single, noised) optimizer
    update and before it checkpoints, so every saved and every final weight is masked.
    ``begin_phase`` comes after the engine restored a checkpoint: the mask in force at the
    resume step is recomputed from the restored (already masked) weights.
    """

    def __init__(self, hooks: RecipeHooks, *, model, optimizer, events: dict[int, float],
                 calibration: dict[str, torch.Tensor] | None = None):
        """``calibration``: a PUBLIC batch for the least-squares refit; None: no refit."""
        self.hooks, self.optimizer, self.events = hooks, optimizer, events
        self.model, self.calibration = model, calibration
        self.weights = prunable_weights(model)  # name → Parameter, updated in place
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        self.history: list[dict] = []

    def prune_to(self, sparsity: float, *, step: int) -> None:
        """New global masks at ``sparsity`` from the current weights (and nothing else);
        when they prune weights that were not zero yet, refit the pruned layers on the
        public calibration batch. (A resumed run's restored weights are already pruned
        and refit: the recomputed mask prunes nothing new, so nothing is refit twice.)"""
        current = {name: w.detach() for name, w in self.weights.items()}
        self.masks = global_magnitude_masks(current, sparsity)
        newly_pruned = any(bool((current[n][~m] != 0).any()) for n, m in self.masks.items())
        targets = self._layers_before() if newly_pruned and self.calibration is not None else None
        self.sparsity = sparsity
        self.reapply()
        record = {"step": step, "sparsity": round(sparsity, 6)}
        if targets is not None:
            # only kept weights move: pruned ones and their optimizer state stay zero
            refit = reconstruct_pruned_linears(self.model, self.masks, targets,
                                               cast(dict, self.calibration))  # fmt: skip
            record["reconstruction"] = {k: round(v, 6) for k, v in refit.items()}
        self.history.append(record)
        self.hooks.event("prune.unstructured", {"phase": PHASE, **record})

    def _layers_before(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each prunable layer's (weight, bias) before the new mask: the refit's target."""
        modules = dict(self.model.named_modules())
        out = {}
        for name, weight in self.weights.items():
            bias = modules[name.removesuffix(".weight")].bias
            out[name] = (weight.detach().clone(),
                         bias.detach().clone() if bias is not None else None)  # fmt: skip
        return out

    def reapply(self) -> None:
        apply_masks(self.weights, self.masks)
        zero_optimizer_state(self.optimizer, self.weights, self.masks)

    # -- RecipeHooks -------------------------------------------------------------------
    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        if sparsity_in_force(self.events, resumed_step) > 0:
            self.prune_to(sparsity_in_force(self.events, resumed_step), step=resumed_step)
        return self.hooks.begin_phase(phase, resumed_step=resumed_step)

    def before_step(self, phase: str, step: int) -> None:
        self.hooks.before_step(phase, step)

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.reapply()  # the noised update touched every weight
        if step in self.events:
            self.prune_to(self.events[step], step=step)
        self.hooks.after_step(phase, step, {**metrics, "sparsity": self.sparsity})

    def checkpoint_dir(self, phase: str):
        return self.hooks.checkpoint_dir(phase)

    def event(self, kind: str, data: dict) -> None:
        self.hooks.event(kind, data)


def run(ctx: JobContext) -> RecipeResult:
    spec, training, comp, hooks = ctx.spec, ctx.spec.training, ctx.spec.compression, ctx.hooks
    task = cast(Task, ctx.train.task)
    phase = ctx.plan.phase(PHASE)
    torch.manual_seed(training.seed)  # dropout; DP noise and sampling have their own RNGs

    # 1. base model + task head; a dense copy is the report's reference
    loaded = load_base_model(ctx, task, phase=PHASE)
    model, tokenizer = loaded.model, loaded.tokenizer
    dense_base = copy.deepcopy(model)

    # 2. private rows → token ids
    uses_token_type_ids = getattr(model.config, "type_vocab_size", 0) > 0
    train_rows = encode_dataset(
        ctx.train, tokenizer, task=task, max_seq_length=training.max_seq_length,
        uses_token_type_ids=uses_token_type_ids,
    )  # fmt: skip

    # 3. what trains and the per-group learning rates (core.training.optim)
    opt = dp_optimizer(model, spec, task=task, classifier_body=CLASSIFIER_BODY)

    # 4. the pruning plan (public: spec + planned steps); one-shot at step 0 when the
    #    prunable weights are frozen (nothing to recover between rounds)
    weights_train = opt.train_body is True
    events = pruning_events(phase.steps, target=comp.target_sparsity,
                            schedule=comp.prune_schedule, rounds=comp.prune_rounds,
                            weights_train=weights_train)  # fmt: skip
    calibration = None
    if comp.reconstruct:  # public text only: the named public dataset, else random ids
        public = [row["text"] for row in ctx.calibration.rows] if ctx.calibration else None
        calibration = calibration_inputs(
            tokenizer, public, max_seq_length=training.max_seq_length,
            uses_token_type_ids=uses_token_type_ids, seed=training.seed,
        )  # fmt: skip
    masking = MaskingHooks(hooks, model=model, optimizer=opt.optimizer, events=events,
                           calibration=calibration)  # fmt: skip

    # 5. DP-SGD with masks re-applied after every update
    engine = DPSGDEngine(
        model=model, optimizer=opt.optimizer, phase=phase, dataset=train_rows,
        loss_fn=frozen_body_loss(  # a frozen body: features once per row, after pruning
            model,
            classification_loss_per_example if task == "classification"
            else causal_lm_loss_per_example,
        ),
        hooks=masking,
        config=engine_config(spec),
        device=ctx.device,
    )  # fmt: skip
    result = engine.run()
    model.eval()

    # 6. post-processing: reach s_f even if lost steps skipped the last events
    if masking.sparsity < comp.target_sparsity:
        masking.prune_to(comp.target_sparsity, step=result.last_step)

    # 7. evaluation on the user's eval dataset (non-private, flagged)
    evaluation = evaluate_on_eval_set(ctx, model, tokenizer)

    # 8. the artifact: bitmask-sparse weights + loader; the report
    save_model(model.cpu(), tokenizer, ctx.output_dir)
    sparsify_folder(ctx.output_dir)
    report = compression_report(model, dense_base, output_dir=ctx.output_dir,
                                seq_len=training.max_seq_length)  # fmt: skip
    metrics = {
        "task": task,
        "phase": PHASE,
        **phase_run_metrics(result, planned=phase.steps),
        "sample_rate": phase.sample_rate,
        "noise_multiplier": phase.noise_multiplier,
        "max_grad_norm": phase.max_grad_norm,
        "learning_rate": opt.learning_rate,
        "head_learning_rate": opt.head_learning_rate,
        "pooling": loaded.pooling,
        "train_body": opt.train_body,
        "target_sparsity": comp.target_sparsity,
        "achieved_sparsity": report["encoder_linear_sparsity"],
        "prune_schedule": comp.prune_schedule if weights_train else "one_shot",
        "prune_events": masking.history,
        "pruned_tensors": sorted(masking.weights),
        "reconstruction": {  # the public-data refit after each pruning event (or None)
            "calibration": (f"dataset {ctx.calibration.id} (public text)" if ctx.calibration
                            else "random token ids"),
            "sequences": int(calibration["input_ids"].shape[0]),
            "tokens": int(calibration["attention_mask"].sum()),
        } if calibration is not None else None,
        "weights_file": SPARSE_FILE,
        **report,
        **eval_metrics(evaluation),
        "non_private_metrics": ["train_loss", "samples_seen"],
    }
    card = {
        "method": "dpimp_unstructured",
        "base_model": spec.model.base,
        "pooling": loaded.pooling,
        "sparsity": report["encoder_linear_sparsity"],
        "load": load_hint(loaded.pooling),
    }
    return RecipeResult(metrics=metrics, model_card_extra=card)

