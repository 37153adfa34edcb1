"""The job spec: the contract between the API and the worker.

Validated whole, up front; unknown fields are rejected. Model and method names are
resolved through whitelists (never import paths).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Method = Literal["dp_finetune", "dpkd", "dpimp_structured", "dpimp_unstructured", "distildp"]
# How much of the pretrained body trains: True (all), "bitfit" (biases and normalisation
# weights only; Ben Zaken et al. 2022, the DP variant of Yu et al. 2022) or False (none).
BodyTraining = bool | Literal["bitfit"]
# BitFit's few parameters need a far larger step than full fine-tuning (MiniLM-L6, SST-2
# 8,192 rows, ε = 8: 1e-3 → 81.2 % dev accuracy; bench/dp_finetune_quality.py).
BITFIT_LEARNING_RATE = 1e-3
# dp_finetune of a classifier trains the head + BitFit (core.training.optim) after a DP linear
# probe of this many epochs (LP-FT, Kumar et al. 2022): only the fresh head trains, on cached
# features of the frozen body (cheap), so the fine-tuning phase starts from a useful head.
# MiniLM-L6, SST-2 8,192 rows, ε = 8: 82.7 % dev accuracy against 81.0-81.2 % without
# (bench/dp_finetune_quality.py).
FINETUNE_CLASSIFIER_BODY: BodyTraining = "bitfit"
DEFAULT_PROBE_EPOCHS = 12.0
# ρ of group-wise embedding clipping (core.privacy.group_clipping) when embedding.mode is set
DEFAULT_EMBEDDING_CLIP_SHARE = 0.1
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]

MODEL_BASE_PATTERN = re.compile(
    r"^(bundled:(minilm-l6|smollm2-135m)|tiny:(bert|llama)|job:job_[A-Za-z0-9]+|"
    r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?)$"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class ModelSpec(_Strict):
    base: str = Field("bundled:minilm-l6", description="bundled:minilm-l6, bundled:smollm2-135m, "
                      "tiny:bert, tiny:llama, job:<id>, or a Hugging Face id in the local cache")
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="sentence pooling of the classification head (mean pooling is what "
        "all-MiniLM was trained with and what makes DP fine-tuning learn)")
    tied_weights: Literal["freeze", "untie"] = Field(
        "freeze", description="input embedding shared with the LM head (SmolLM2): freeze it "
        "(default; smaller, faster DP) or untie it into two trainable matrices")

    @field_validator("base")
    @classmethod
    def _known_base(cls, v: str) -> str:
        if not MODEL_BASE_PATTERN.match(v):
            raise ValueError("unknown model; use bundled:minilm-l6, bundled:smollm2-135m, "
                             "tiny:bert, tiny:llama, job:<id> or a cached Hugging Face id")
        return v


class PrivacySpec(_Strict):
    epsilon: float = Field(..., gt=0, le=100, description="target ε of the whole job")
    delta: float | None = Field(None, gt=0, lt=1, description="δ; default 1/(10·N), must be < 1/N")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example clipping norm C")
    accountant: Literal["prv", "rdp"] = "prv"
    phase_split: float | None = Field(
        None, gt=0, lt=1, description="share of ε given to the first private phase in "
        "two-phase methods (dpkd and distildp: the teacher, default 0.5 and 0.95; "
        "dp_finetune with a linear probe: the probe, default 0.25); the rest to the second")


class CompressionSpec(_Strict):
    target_sparsity: float = Field(
        0.5, ge=0, lt=1, description="fraction of weights (unstructured) or of prunable "
        "parameters (structured) removed")
    student_layers: int = Field(3, ge=1, le=64)
    student_init: Literal["teacher", "pretrained"] = Field(
        "teacher", description="dpkd: copy the student's evenly spaced layers from the DP "
        "teacher (default) or from the pre-trained base model")
    student_layer_selection: Literal["evenly_spaced", "similar_block"] | None = Field(
        None, description="which teacher layers the student copies: all but the contiguous "
        "block whose input and output hidden states are most alike on text sampled from "
        "the DP teacher (distildp's default: its synthetic text; dpkd: causal LMs only), or "
        "evenly spaced ones (dpkd's default)")
    prune_schedule: Literal["cubic", "stepwise"] = "cubic"
    prune_rounds: int = Field(5, ge=1, le=100)
    structures: list[Literal["heads", "ffn", "layers"]] = Field(
        default_factory=lambda: ["layers"],
        description="what dpimp_structured may remove: whole layers (default), FFN neurons "
        "(by magnitude; with both, FFN neurons go first), never attention heads")
    layer_selection: Literal["top", "magnitude"] = Field(
        "top", description="dpimp_structured: which layers go — the top ones (default; "
        "measured best on MiniLM/SST-2) or those with the smallest mean |w|")
    reconstruct: bool = Field(
        True, description="dpimp_unstructured: after each pruning event, refit every pruned "
        "linear layer's kept weights and bias by least squares so it reproduces the unpruned "
        "layer on PUBLIC calibration text (calibration_dataset_id, else random token ids); "
        "post-processing, no ε (core.compress.reconstruction)")


class TrainingSpec(_Strict):
    epochs: float = Field(3, gt=0, le=100)
    batch_size: int = Field(256, ge=1, le=65536, description="expected logical batch (q = batch/N)")
    learning_rate: float = Field(5e-5, gt=0, lt=10)
    head_learning_rate: float | None = Field(
        None, gt=0, lt=10, description="learning rate of the freshly initialised task head "
        "(default: 2e-2, or lr if larger; a DP head needs a much larger step than the body)")
    max_seq_length: int = Field(128, ge=8, le=2048)
    physical_batch_size: int = Field(32, ge=1, le=4096)
    seed: int = Field(0, ge=0)
    train_body: BodyTraining | None = Field(
        None, description="train the pretrained body with the head: true (all of it), "
        "'bitfit' (only its biases and normalisation weights, ~0.1 % of MiniLM; "
        f"learning_rate defaults to {BITFIT_LEARNING_RATE} then) or false (only the head, "
        "plus the word embedding when embedding.mode is set). Unset: the method's default "
        "— dp_finetune of a classifier trains 'bitfit' (measured best under DP on SST-2 "
        "up to 16,384 rows; on all 67,349 rows at batch 4096, true with embedding.mode "
        "'frozen' and learning_rate 5e-4 did better: README, bench/dp_finetune_quality.py), "
        "the other methods' classifiers only the head, causal LMs the whole body")
    lr_schedule: Literal["constant", "linear"] = Field(
        "constant", description="learning rates over a DP phase's T steps: constant, or "
        "linear decay lr·(1 − (t−1)/T)")
    grad_sample_mode: Literal["ghost", "hooks"] = Field(
        "ghost", description="per-example clipping: ghost clipping (fast, low memory) or "
        "Opacus hooks (materialised per-example gradients; fallback)")
    probe_epochs: float | None = Field(
        None, ge=0, le=100, description="dp_finetune of a classifier whose body trains: "
        "epochs of a first DP phase 'probe' in which only the fresh head trains, on the "
        "frozen body's features computed once per row (linear probing, then fine-tuning). "
        f"Default {DEFAULT_PROBE_EPOCHS:g}; 0 turns it off. Its ε share is "
        "privacy.phase_split")

    def body_trained(self, default: BodyTraining = True) -> BodyTraining:
        """``train_body`` if the user set it, else the recipe's ``default``."""
        return default if self.train_body is None else self.train_body

    def linear_probe_epochs(self, *, method: str, task: str) -> float:
        """Epochs of dp_finetune's linear-probe phase (0: none) for a job on ``task`` data.

        Raises:
            ValueError: ``probe_epochs`` > 0 where there is no fresh head to probe with a
                trainable body after it (another method, a causal LM, ``train_body=false``).
        """
        body = self.body_trained(FINETUNE_CLASSIFIER_BODY)
        if method == "dp_finetune" and task == "classification" and body is not False:
            return DEFAULT_PROBE_EPOCHS if self.probe_epochs is None else self.probe_epochs
        if self.probe_epochs:
            raise ValueError(
                "training.probe_epochs applies to dp_finetune of a classifier whose body "
                "trains (a linear probe of the fresh head first); here there is none to "
                f"run (method {method}, task {task}, train_body {body}): leave it unset or 0"
            )
        return 0.0

    def body_learning_rate(self, body: BodyTraining) -> float:
        """``learning_rate``, or :data:`BITFIT_LEARNING_RATE` for BitFit when left unset."""
        if body == "bitfit" and "learning_rate" not in self.model_fields_set:
            return BITFIT_LEARNING_RATE
        return self.learning_rate


class DistillSpec(_Strict):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term")
    temperature: float = Field(2.0, gt=0, le=100)


class SyntheticSpec(_Strict):
    num_samples: int = Field(2000, ge=1, le=1_000_000)
    max_new_tokens: int = Field(64, ge=1, le=1024)
    student_epochs: float | None = Field(
        None, gt=0, le=100, description="distildp: passes of the student over the synthetic "
        "texts (post-processing: costs no ε, only time); default training.epochs")


class EmbeddingSpec(_Strict):
    mode: Literal["dense", "frozen", "fest", "adafest"] | None = Field(
        None, description="the word embedding: dense (every row trained), frozen, fest (a "
        "fixed top-k of rows by public frequency) or adafest (rows selected per step with "
        "DP; fest and adafest: dp_finetune only). Set, it applies even when "
        "training.train_body=false (a classifier then trains its head and the word "
        "embedding). Unset: the embedding follows the body")
    fest_top_k: int | None = Field(None, ge=1)
    adafest_threshold: float | None = Field(None, ge=0)
    adafest_noise_ratio: float | None = Field(None, gt=0)
    clip_share: float | None = Field(
        None, gt=0, le=1, description="group-wise clipping: the word embedding's per-example "
        "gradient is clipped to clip_share·C and the rest to √(1−clip_share²)·C (same "
        "sensitivity C, same ε; ghost clipping only). 1: flat clipping (one joint norm). "
        f"Unset: {DEFAULT_EMBEDDING_CLIP_SHARE} when mode is dense, fest or adafest and "
        "training.grad_sample_mode is ghost; flat otherwise (mode unset, or hooks)")
    fest_public_rows: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=1_000_000, description="fest: embedding row ids ranked by a PUBLIC "
        "frequency (most frequent first); the first fest_top_k are trained. Default: the "
        "tokenizer-order proxy (see core.privacy.embedding_frequencies)")

    def trained(self, body_trained: BodyTraining) -> bool:
        """Whether the word embedding is trainable, given how the body is trained."""
        return body_trained is True if self.mode is None else self.mode != "frozen"

    def group_clip_share(self) -> float | None:
        """ρ of group-wise clipping when the embedding trains, or None for flat clipping
        (see ``clip_share``)."""
        if self.clip_share is not None:
            return None if self.clip_share == 1 else self.clip_share
        return DEFAULT_EMBEDDING_CLIP_SHARE if self.mode in ("dense", "fest", "adafest") else None

    def effective_mode(self, body_trained: BodyTraining) -> str:
        """The mode that runs: "frozen" when the embedding is not trained, else the mode."""
        return (self.mode or "dense") if self.trained(body_trained) else "frozen"


class JobSpec(_Strict):
    method: Method
    dataset_id: str = Field(..., pattern=r"^ds_[A-Za-z0-9]+$")
    eval_dataset_id: str | None = Field(None, pattern=r"^ds_[A-Za-z0-9]+$")
    calibration_dataset_id: str | None = Field(
        None, pattern=r"^ds_[A-Za-z0-9]+$", description="dpimp_unstructured: a dataset of "
        "PUBLIC text whose rows calibrate compression.reconstruct; they are read without DP "
        "and never charged, so it must have been uploaded with public=true (the uploader's "
        "declaration). Unset: random token ids")
    model: ModelSpec = Field(default_factory=ModelSpec)
    privacy: PrivacySpec
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.eval_dataset_id is not None and self.eval_dataset_id == self.dataset_id:
            raise ValueError("eval_dataset_id must differ from dataset_id (evaluation on the "
                             "private training rows would leak)")
        if self.calibration_dataset_id is not None:
            if self.calibration_dataset_id == self.dataset_id:
                raise ValueError("calibration_dataset_id must differ from dataset_id (it is "
                                 "read without DP: it must be public text)")
            if self.method != "dpimp_unstructured" or not self.compression.reconstruct:
                raise ValueError("calibration_dataset_id is read only by dpimp_unstructured "
                                 "with compression.reconstruct=true; leave it unset")
        if self.embedding.mode in ("fest", "adafest") and self.method != "dp_finetune":
            raise ValueError(f"embedding.mode {self.embedding.mode!r} (row-sparse embedding "
                             f"updates) is available for dp_finetune only, not {self.method}; "
                             "use 'dense' or 'frozen'")
        if self.embedding.clip_share not in (None, 1) and self.training.grad_sample_mode != "ghost":
            raise ValueError("embedding.clip_share (group-wise clipping) needs "
                             "training.grad_sample_mode='ghost'")
        if self.training.physical_batch_size > self.training.batch_size:
            self.training.physical_batch_size = self.training.batch_size
        return self


def pydantic_problems(exc) -> list[dict]:
    """Turn a pydantic ValidationError into ``[{"param", "message"}]`` with dotted params."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        problems.append({"param": loc or _field_named_by(msg), "message": msg})
    return problems


def _field_named_by(message: str) -> str | None:
    """The JobSpec field a cross-field check's message starts with ("Value error,
    embedding.clip_share needs ..."), so that spec-wide errors still name their field."""
    match = re.match(r"Value error, ([a-z_]+(?:\.[a-z_]+)*) ", message)
    if not match:
        return None
    model: type[BaseModel] | None = JobSpec
    for part in match.group(1).split("."):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        nested = field.annotation
        model = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return match.group(1)
