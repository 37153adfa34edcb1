"""The joint report of a compression job (DESIGN section 4): utility, size, sparsity per
layer and CPU latency, each next to the uncompressed (dense) base model.

Nothing here reads private training rows: sizes and latencies are measured on weights and
on random token ids (a public input), sparsity on weights, and accuracy / perplexity on
the eval dataset the user named, flagged ``non_private_evaluation``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model as save_safetensors
from torch import nn

from core.compress.pruning import encoder_anatomy, prunable_weights, sparsity_by_layer
from core.data import encode_dataset
from core.recipe_api import JobContext
from core.training.losses import evaluate_classifier, evaluate_perplexity

LATENCY_BATCHES = (1, 32)
LATENCY_MAX_SEQ = 128  # tokens per row in the latency probe (≤ training.max_seq_length)
LATENCY_REPEATS = {1: 10, 32: 3}  # timed forwards per batch size, after one warm-up


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (a tied matrix counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Parameters of ``model`` that are not exactly zero."""
    return sum(int((p != 0).sum()) for p in model.parameters())


def weights_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) in a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def dense_weights_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s weights saved densely as safetensors (shared tensors once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_safetensors(model, str(path))
        return path.stat().st_size


@torch.no_grad()
def cpu_latency_ms(model: Any, *, batch_size: int, seq_len: int, repeats: int) -> float:
    """Median wall time (ms) of one forward pass on CPU, eval mode, current torch threads.

    Input: ``batch_size`` rows of ``seq_len`` random token ids (seeded; no private data).
    """
    model.eval()
    gen = torch.Generator().manual_seed(0)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    model(**inputs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def compression_report(model: Any, base: Any, *, output_dir: Path, seq_len: int) -> dict[str, Any]:
    """Size, sparsity and latency of ``model`` (saved in ``output_dir``) next to ``base``.

    Args:
        model: the compressed model (on any device; measured on CPU).
        base: the uncompressed model of the same family and head (its weights do not
            matter: only its size and speed are measured).
        output_dir: the folder ``model`` was saved to (its bytes on disk are counted).
        seq_len: tokens per row of the latency probe (capped at ``LATENCY_MAX_SEQ``).

    Returns:
        Flat numbers for the model card (``parameters``, ``bytes_on_disk``,
        ``latency_ms_batch1``... with ``base_`` twins and ``*_ratio`` = compressed / base)
        and ``sparsity_per_layer``: fraction of exactly-zero weights of each encoder
        layer's linear weights.
    """
    model, base = model.cpu().eval(), base.cpu().eval()
    weights = {n: p.detach() for n, p in prunable_weights(model).items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    report: dict[str, Any] = {
        "parameters": count_parameters(model),
        "nonzero_parameters": count_nonzero(model),
        "base_parameters": count_parameters(base),
        "bytes_on_disk": weights_bytes(output_dir),
        "base_bytes_on_disk": dense_weights_bytes(base),
        "num_hidden_layers": model.config.num_hidden_layers,
        "base_num_hidden_layers": base.config.num_hidden_layers,
        "intermediate_size": model.config.intermediate_size,
        "base_intermediate_size": base.config.intermediate_size,
        "encoder_linear_sparsity": zeros / max(1, sum(w.numel() for w in weights.values())),
        "sparsity_per_layer": sparsity_by_layer(weights, encoder_anatomy(model)),
    }
    seq_len = min(seq_len, LATENCY_MAX_SEQ)
    report["latency_seq_len"] = seq_len
    for b in LATENCY_BATCHES:
        ms = cpu_latency_ms(model, batch_size=b, seq_len=seq_len, repeats=LATENCY_REPEATS[b])
        base_ms = cpu_latency_ms(base, batch_size=b, seq_len=seq_len, repeats=LATENCY_REPEATS[b])
        report[f"latency_ms_batch{b}"] = round(ms, 3)
        report[f"base_latency_ms_batch{b}"] = round(base_ms, 3)
        report[f"latency_ratio_batch{b}"] = round(ms / base_ms, 4)
    report["parameter_ratio"] = round(report["parameters"] / report["base_parameters"], 4)
    report["size_ratio"] = round(report["bytes_on_disk"] / report["base_bytes_on_disk"], 4)
    report["latency_threads"] = torch.get_num_threads()
    return report


def evaluate_on_eval_set(ctx: JobContext, model: nn.Module, tokenizer: Any) -> dict | None:
    """Accuracy (classification) or perplexity (causal LM) on the user's eval dataset,
    flagged non-private; None when the job names no eval dataset."""
    if ctx.eval is None:
        return None
    task, training = ctx.train.task, ctx.spec.training
    rows = encode_dataset(
        ctx.eval, tokenizer, task=task, max_seq_length=training.max_seq_length,
        labels=ctx.train.labels if task == "classification" else None,
        uses_token_type_ids=getattr(model.config, "type_vocab_size", 0) > 0,
    )  # fmt: skip
    out: dict[str, Any] = {
        "dataset_id": ctx.eval.id, "num_records": len(rows), "non_private_evaluation": True,
    }  # fmt: skip
    if task == "classification":
        out.update(evaluate_classifier(model, rows, device=ctx.device))
        if out["predicted_class_share"] == 1.0 and len(set(rows.labels or [])) > 1:
            ctx.hooks.event(
                "eval.degenerate",
                {"message": "the model predicts a single class on the eval set: DP training "
                 "did not learn; raise the head lr, epochs, batch size or ε"},
            )  # fmt: skip
    else:
        out["perplexity"] = evaluate_perplexity(model, rows, device=ctx.device)
    return out


def phase_run_metrics(result: Any, *, planned: int | None = None) -> dict[str, Any]:
    """Steps, resume point, loss and timing of one DP phase (an engine ``PhaseResult``);
    ``planned_steps`` when ``planned`` is given."""
    out: dict[str, Any] = {"steps": result.last_step}
    if planned is not None:
        out["planned_steps"] = planned
    out.update({
        "steps_run_this_attempt": result.steps_run,
        "resumed_from_step": result.resumed_from,
        "train_loss": result.train_loss,
        "samples_seen": result.samples_seen,
        "train_seconds": round(result.seconds, 3),
    })  # fmt: skip
    return out


def eval_metrics(evaluation: dict | None, prefix: str = "eval") -> dict[str, Any]:
    """``{"eval": {...}, "eval_accuracy": ...}`` flat copies for the model card."""
    if evaluation is None:
        return {}
    out: dict[str, Any] = {prefix: evaluation}
    for key in ("accuracy", "perplexity"):
        if key in evaluation:
            out[f"{prefix}_{key}"] = evaluation[key]
    return out
