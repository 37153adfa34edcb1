"""DP fine-tuning quality: the real ``dp_finetune`` recipe at ε ∈ {8, 3} vs non-private.

MiniLM-L6 (``bundled:minilm-l6``, mean-pooled classifier) trained by
:func:`core.compress.dp_finetune.run` on the first ``--rows`` SST-2 training rows, evaluated
on all 872 SST-2 dev rows. Each ε is planned by :func:`core.privacy.planner.plan_job`
(δ = 1/(10·N), PRV accountant, q = batch/N, T = ⌈epochs·N/batch⌉). The non-private
baseline is the *same recipe* on the same rows, the same phases (the linear probe and the
fine-tuning), Poisson logical steps and expected batch, with σ = 0 and C = 1e6 (no noise,
no clipping in effect: the update is the plain mean gradient). Training options left unset
on the command line take the ``TrainingSpec`` defaults, so with no flags this measures
what a user who gives only method/dataset/model/ε gets.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.dp_finetune_quality \
        [--rows 4096] [--epsilons 8,3] [--no-baseline] [--train-body true|false|bitfit] \
        [--lr 5e-4] [--head-lr 2e-2] [--batch-size 1024] [--epochs 3] [--probe-epochs 12]
        [--max-grad-norm 1.0] [--embedding-mode frozen|dense] [--threads 1]

Writes ``bench/results/dp_finetune_quality.json`` (or ``--out``). Reads SST-2 in place
from ``../shared/data/sst2/{train,dev}.tsv`` (or ``$DPC_SHARED_DATA/sst2/``). DP noise and
Poisson sampling draw from OS entropy like production: one seed per run, so expect ±1-2
points between repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.data import ROOT, offline_environment, read_sst2, sst2_dir, sst2_missing

RESULTS = ROOT / "bench" / "results" / "dp_finetune_quality.json"
NON_PRIVATE = "non_private"


class MemoryHooks:
    """RecipeHooks in memory: every planned step allowed, nothing charged, events kept."""

    def __init__(self, ckpt_root: Path, steps: dict[str, int]):
        self.ckpt_root, self.steps = ckpt_root, steps  # planned steps per phase
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.losses: list[float] = []

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        return self.steps[phase]

    def before_step(self, phase: str, step: int) -> None:
        pass

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        if step % 8 == 0 or step == self.steps[phase]:
            loss = metrics.get("loss", float("nan"))
            print(f"  {phase} step {step}/{self.steps[phase]} loss {loss:.4f}", file=sys.stderr,
                  flush=True)  # fmt: skip
        if phase != "train":
            return
        if "loss" in metrics:
            self.losses.append(metrics["loss"])

    def checkpoint_dir(self, phase: str) -> Path:
        return self.ckpt_root / phase

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))


def parse_train_body(text: str) -> bool | str:
    """``--train-body``: ``bitfit``, or a boolean (true/false/yes/no/1/0)."""
    text = text.lower()
    return "bitfit" if text == "bitfit" else text in ("1", "true", "yes")


def training_overrides(args) -> dict[str, Any]:
    """TrainingSpec fields given on the command line (the rest keep the spec defaults)."""
    out: dict[str, Any] = {"max_seq_length": args.max_seq_length}
    for flag, field in (("epochs", "epochs"), ("batch_size", "batch_size"),
                        ("lr", "learning_rate"), ("head_lr", "head_learning_rate"),
                        ("train_body", "train_body"), ("lr_schedule", "lr_schedule"),
                        ("probe_epochs", "probe_epochs")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            out[field] = value
    return out


def run_one(label: str, args, train_rows: list[dict], dev_rows: list[dict]) -> dict:
    """One recipe run: ``label`` is an ε (as text) or ``non_private``."""
    from core.compress import dp_finetune
    from core.privacy.plan import PrivacyPlan
    from core.privacy.planner import plan_job
    from core.recipe_api import DatasetView, JobContext
    from core.specs import JobSpec

    epsilon = 8.0 if label == NON_PRIVATE else float(label)  # non-private: ε unused
    spec = JobSpec(
        method="dp_finetune", dataset_id="ds_sst2", eval_dataset_id="ds_sst2dev",
        model={"base": "bundled:minilm-l6"},
        privacy={"epsilon": epsilon, "max_grad_norm": args.max_grad_norm},
        training=training_overrides(args),
        embedding={"mode": args.embedding_mode},
    )  # fmt: skip
    plan = plan_job(spec, num_records=len(train_rows), task="classification")
    if label == NON_PRIVATE:  # the same phases and steps without noise or clipping
        phases = [p.model_copy(update={"noise_multiplier": 0.0, "max_grad_norm": 1e6})
                  for p in plan.phases]  # fmt: skip
        plan = PrivacyPlan(accountant="none", delta=0.0, epsilon=float("inf"), phases=phases)
    phase = plan.phase("train")
    with tempfile.TemporaryDirectory(prefix="dpc-quality-") as tmp:
        hooks = MemoryHooks(Path(tmp) / "ckpt", {p.name: p.steps for p in plan.phases})
        ctx = JobContext(
            job_id=f"bench_{label}", spec=spec, plan=plan,
            train=DatasetView("ds_sst2", "classification", ["0", "1"], train_rows),
            eval=DatasetView("ds_sst2dev", "classification", ["0", "1"], dev_rows),
            output_dir=Path(tmp) / "model", work_dir=Path(tmp) / "work", hooks=hooks,
        )  # fmt: skip
        started = time.perf_counter()
        metrics = dp_finetune.run(ctx).metrics
        seconds = time.perf_counter() - started
    tail = hooks.losses[-max(1, len(hooks.losses) // 5) :]
    return {
        "run": label,
        "epsilon": None if label == NON_PRIVATE else plan.epsilon,
        "delta": None if label == NON_PRIVATE else plan.delta,
        "accuracy": round(metrics["eval_accuracy"], 4),
        "predicted_class_share": round(metrics["eval"]["predicted_class_share"], 4),
        "steps": metrics["steps"],
        "noise_multiplier": round(phase.noise_multiplier, 4),
        "max_grad_norm": phase.max_grad_norm,
        "sample_rate": round(phase.sample_rate, 6),
        "expected_batch_size": metrics["expected_batch_size"],
        "learning_rate": metrics["learning_rate"],
        "head_learning_rate": metrics["head_learning_rate"],
        "train_body": spec.training.train_body,
        "epochs": spec.training.epochs,
        "train_seconds": metrics["train_seconds"],
        "samples_per_second": metrics["samples_per_second"],
        "seconds": round(seconds, 1),  # load + tokenise + train + eval + save
        "train_loss_last_fifth": round(sum(tail) / len(tail), 4) if tail else None,
        "probe": None if metrics["probe"] is None else {
            k: metrics["probe"][k] for k in ("epochs", "steps", "noise_multiplier",
                                             "train_seconds", "frozen_body_features_cached")
        },  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096, help="first N SST-2 training rows")
    parser.add_argument("--epochs", type=float, help="default: TrainingSpec")
    parser.add_argument("--batch-size", type=int, help="expected logical batch; default: spec")
    parser.add_argument("--lr", type=float, help="body learning rate; default: TrainingSpec")
    parser.add_argument("--head-lr", type=float, help="head learning rate; default: recipe's")
    parser.add_argument("--train-body", type=parse_train_body,
                        help="true/false/bitfit; default: the recipe's")  # fmt: skip
    parser.add_argument("--lr-schedule", choices=["constant", "linear"], default=None)
    parser.add_argument("--probe-epochs", type=float, default=None,
                        help="epochs of the linear-probe phase (0: none); default: the spec's")
    parser.add_argument("--embedding-mode", choices=["dense", "frozen"], default=None,
                        help="the word embedding; default: it follows --train-body")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--epsilons", default="8,3", help="comma-separated ε values")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private run")
    parser.add_argument("--baseline-only", action="store_true", help="only the non-private run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if sst2_missing():
        return
    offline_environment()
    import torch

    torch.set_num_threads(args.threads)
    train_rows = read_sst2(sst2_dir() / "train.tsv", args.rows)
    dev_rows = read_sst2(sst2_dir() / "dev.tsv", 10**9)
    labels = [] if args.baseline_only else [e.strip() for e in args.epsilons.split(",") if e]
    if not args.no_baseline:
        labels.append(NON_PRIVATE)
    results = []
    for label in labels:
        results.append(run_one(label, args, train_rows, dev_rows))
        print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if r["run"] == NON_PRIVATE), None)
    for r in results:
        r["gap_to_non_private"] = round(base["accuracy"] - r["accuracy"], 4) if base else None
    report = {
        "bench": "dp_finetune_quality",
        "model": "bundled:minilm-l6 (mean-pooled classifier)",
        "data": f"SST-2 train, first {len(train_rows)} rows; dev {len(dev_rows)} rows",
        "non_private": "same recipe, same Poisson steps and batch, σ = 0, C = 1e6",
        "config": {**vars(args), "out": str(args.out)},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },  # fmt: skip
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'run':>12} {'acc':>7} {'share':>6} {'steps':>5} {'σ':>6} {'q':>7} "
          f"{'sec':>6} {'smp/s':>6} {'gap':>6}")  # fmt: skip
    for r in results:
        gap = "" if r["gap_to_non_private"] is None else f"{100 * r['gap_to_non_private']:.1f}"
        print(f"{r['run']:>12} {100 * r['accuracy']:7.1f} {r['predicted_class_share']:6.2f} "
              f"{r['steps']:5d} {r['noise_multiplier']:6.3f} {r['sample_rate']:7.4f} "
              f"{r['seconds']:6.0f} {r['samples_per_second'] or 0:6.1f} {gap:>6}")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
