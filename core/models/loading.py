"""Build a trainable HF model (classification or causal LM) from a registry source, and
save it back as a folder that ``transformers`` loads.

Loading a saved folder:

* causal LM: ``AutoModelForCausalLM.from_pretrained(path)``;
* classification, ``pooling="cls"``: ``AutoModelForSequenceClassification.from_pretrained(path)``;
* classification, ``pooling="mean"`` (the default, BERT family):
  ``AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`` —
  the folder carries ``mean_pooling.py`` and an ``auto_map`` (see
  :mod:`core.models.mean_pooling`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from core.errors import InvalidRequest, ModelUnavailable
from core.models.mean_pooling import BertMeanPoolConfig, BertMeanPoolForSequenceClassification
from core.models.registry import ModelSource, resolve_source

log = logging.getLogger(__name__)

Task = Literal["classification", "causal_lm"]
TiedPolicy = Literal["freeze", "untie"]
HEAD_PREFIXES = ("classifier.", "score.")  # freshly initialised task heads
ENCODER_TYPES = {"bert", BertMeanPoolConfig.model_type}

# save_pretrained copies mean_pooling.py into the folder and writes auto_map.
BertMeanPoolConfig.register_for_auto_class()
BertMeanPoolForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
AutoConfig.register(BertMeanPoolConfig.model_type, BertMeanPoolConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    BertMeanPoolConfig, BertMeanPoolForSequenceClassification, exist_ok=True
)


@dataclass
class LoadedModel:
    """A model ready for training, its tokenizer, and what was decided while building it.

    Attributes:
        model: the HF model (``nn.Module``), fp32, on CPU.
        tokenizer: its tokenizer (pad token always set).
        task: "classification" or "causal_lm".
        pooling: "mean", "cls", "last_token" (decoder classifiers) or None (causal LM).
        notes: events worth logging (head kind, tied-weight policy), as dicts.
    """

    model: PreTrainedModel
    tokenizer: Any
    task: Task
    pooling: str | None
    notes: list[dict] = field(default_factory=list)


def load_model(
    base: str,
    *,
    task: Task,
    labels: list[str] | None = None,
    pooling: Literal["mean", "cls"] = "mean",
    tied_weights: TiedPolicy = "freeze",
    seed: int = 0,
    cache_dir: Path | None = None,
    resolve_job_model: Callable[[str], Path] | None = None,
) -> LoadedModel:
    """Load ``base`` with a head for ``task``; new weights are initialised from ``seed``.

    Args:
        base: a registry name (see :mod:`core.models.registry`).
        task: "classification" (needs ``labels``) or "causal_lm".
        labels: class names in id order (``DatasetView.labels``).
        pooling: classification pooling for BERT-family encoders; decoder-only models
            always use HF's last-token head (noted in ``notes``).
        tied_weights: what to do with an input embedding tied to the LM head; see
            :func:`apply_tied_weights_policy`.
        seed: seed of every randomly initialised weight (tiny models, new heads).
        cache_dir: model cache; default ``core.settings`` ``model_cache_dir``.
        resolve_job_model: ``job_id -> Path`` for ``job:<id>`` bases.
    """
    if cache_dir is None:
        from core.settings import get_settings

        cache_dir = get_settings().model_cache_dir
    source = resolve_source(base, cache_dir=cache_dir, resolve_job_model=resolve_job_model)
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = source.config
    if source.weights_dir is not None:
        config = AutoConfig.from_pretrained(source.weights_dir)
    encoder = config.model_type in ENCODER_TYPES
    notes: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if task == "causal_lm":
            if encoder:
                raise ModelUnavailable(
                    f"{base} is an encoder (BERT); causal_lm needs a decoder such as "
                    "bundled:smollm2-135m or tiny:llama",
                    param="model.base",
                )
            model = _build(AutoModelForCausalLM, source, {})
            used_pooling = None
        else:
            if not labels:
                raise InvalidRequest("classification needs at least one label", param="labels")
            kw = {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {name: i for i, name in enumerate(labels)},
            }
            if encoder and pooling == "mean":
                model = _build(BertMeanPoolForSequenceClassification, source, kw)
                used_pooling = "mean"
            elif encoder:
                model = _build(AutoModelForSequenceClassification, source, kw)
                used_pooling = "cls"
            else:
                kw["pad_token_id"] = tokenizer.pad_token_id
                model = _build(AutoModelForSequenceClassification, source, kw)
                used_pooling = "last_token"
            notes.append({"kind": "model.head", "pooling": used_pooling, "labels": len(labels)})
    tied = apply_tied_weights_policy(model, tied_weights)
    if tied:
        notes.append(tied)
    model.float()
    return LoadedModel(model, tokenizer, task, used_pooling, notes)


def _build(cls: Any, source: ModelSource, kw: dict) -> PreTrainedModel:
    mean_pool = cls is BertMeanPoolForSequenceClassification
    if source.weights_dir is None:  # random tiny model
        config_cls = BertMeanPoolConfig if mean_pool else type(source.config)
        config = config_cls.from_dict({**source.config.to_dict(), **kw})
        return cls(config) if mean_pool else cls.from_config(config)
    if mean_pool:
        # Via a plain dict: a BERT config.json becomes a mean-pool config without warnings.
        base_config = AutoConfig.from_pretrained(source.weights_dir).to_dict()
        config = BertMeanPoolConfig.from_dict({**base_config, **kw})
        return cls.from_pretrained(source.weights_dir, config=config, dtype=torch.float32)
    return cls.from_pretrained(source.weights_dir, dtype=torch.float32, **kw)


def apply_tied_weights_policy(model: PreTrainedModel, policy: TiedPolicy) -> dict | None:
    """Handle an input embedding shared with the LM head (SmolLM2, tiny:llama).

    Opacus ghost clipping raises on a parameter used by two layers, and hooks mode would
    clip a sum of two per-layer contributions. Choices:

    * ``"freeze"`` (default): the shared matrix is not trained. The artifact stays tied and
      small, DP noise is not spread over vocab × hidden extra coordinates, and DESIGN
      section 8 measured it faster (1.59 vs 1.37 samples/s on SmolLM2).
    * ``"untie"``: the LM head gets its own trainable copy; the embedding is trained too;
      ``config.tie_word_embeddings`` becomes False so the saved folder reloads untied.

    Returns:
        An event dict describing the decision, or None when nothing is tied.
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or out.weight is not inp.weight:
        return None
    if policy == "freeze":
        inp.weight.requires_grad_(False)
    elif policy == "untie":
        out.weight = nn.Parameter(inp.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if getattr(model.config, "get_text_config", None):
            model.config.get_text_config().tie_word_embeddings = False
    else:
        raise InvalidRequest(f"unknown tied-weights policy {policy!r}")
    log.info("tied input/output embeddings: %s", policy)
    return {"kind": "model.tied_weights", "policy": policy, "shape": list(inp.weight.shape)}


def split_trainable(
    model: PreTrainedModel,
    *,
    train_body: bool | Literal["bitfit"] = True,
    train_embeddings: bool | None = None,
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Set ``requires_grad`` and return (body params, head params) for per-group lr.

    The head is a freshly initialised task head (``classifier.*`` / ``score.*``); a causal
    LM has none (its LM head is pretrained, trained with the body lr).

    Args:
        train_body: True trains the whole body; "bitfit" only its biases and normalisation
            weights (:func:`is_bitfit_parameter`); False freezes everything but the head
            (and the word embedding when ``train_embeddings`` is True).
        train_embeddings: whether the input token embedding matrix is trained
            (:meth:`core.specs.EmbeddingSpec.trained`); None: like the body.
    """
    emb = model.get_input_embeddings().weight
    body, head = [], []
    for name, p in model.named_parameters():
        if name.startswith(HEAD_PREFIXES):
            head.append(p)
            continue
        if p is emb and train_embeddings is not None:
            trained = train_embeddings
        elif train_body == "bitfit":
            trained = is_bitfit_parameter(name)
        else:
            trained = bool(train_body)
        if not trained:  # never re-enables a weight frozen at load (a tied embedding)
            p.requires_grad_(False)
        if p.requires_grad:
            body.append(p)
    if not body and not head:
        raise InvalidRequest(
            "nothing to train: training.train_body=false keeps only a task head, and this "
            "model has none (causal_lm)",
            param="training.train_body",
        )
    return body, head


def is_bitfit_parameter(name: str) -> bool:
    """A bias or a normalisation weight (BERT ``LayerNorm``, Llama ``*_layernorm``/``norm``)."""
    module, _, leaf = name.rpartition(".")
    return leaf == "bias" or "norm" in module.rsplit(".", 1)[-1].lower()


def save_model(model: PreTrainedModel, tokenizer: Any, out_dir: Path) -> Path:
    """Save ``model`` + ``tokenizer`` as an HF folder (safetensors) and return it.

    The model must be the plain HF module (the engine attaches Opacus hooks without
    wrapping it, so there is no ``_module.`` prefix to strip).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load_snippet(task: Task, pooling: str | None, path: str = "model") -> str:
    """The Python a user runs to load a saved folder (goes into the model card)."""
    if task == "causal_lm":
        auto, remote = "AutoModelForCausalLM", ""
    else:
        auto = "AutoModelForSequenceClassification"
        remote = ", trust_remote_code=True" if pooling == "mean" else ""
    note = "  # the mean-pooled head ships as mean_pooling.py" if remote else ""
    return (
        f"from transformers import {auto}, AutoTokenizer\n"
        f'model = {auto}.from_pretrained("{path}"{remote}){note}\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{path}"{remote})'
    )
