"""Compression methods side by side: dense DP fine-tuning vs DPKD vs DP-IMP (structured and
unstructured), at ε = 8 and ε = 3, on the same rows with the same steps per DP phase.

MiniLM-L6 (``bundled:minilm-l6``, mean-pooled classifier) on the first ``--rows`` SST-2
training rows; accuracy on the SST-2 dev set (872 rows, a separate public eval set). Every
method runs through its real recipe with a plan from the real planner (σ calibrated to
the target ε; dpkd splits ε between its teacher and student phases, each with the same q
and steps as the single phase of the others). Reported per ε and method:

* dev accuracy, and its ratio to dp_finetune (dense) at the same ε;
* bytes of the weight files on disk, parameters, and CPU latency at batch 1 and 32 — each
  as measured by the recipe's report next to the dense base model in the same process
  (ratio = compressed / dense).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.compression [--rows 8192] [--epochs 12]
        [--repeats 3] [--epsilons 8 3] [--methods dp_finetune dpkd ...] [--threads 1]
        [--train-body | --bitfit | --head-only] [--calibration wikitext|random|none]

Training options are the methods' defaults (core.training.optim): dp_finetune trains the
head and the body's biases and norms (BitFit, body lr 1e-3), the compression recipes only
the head; ``--train-body`` (whole body), ``--bitfit`` or ``--head-only`` apply to every
method, ``--lr`` overrides the body lr. Use ``--head-only`` or ``--bitfit`` for a
like-for-like table.

Sizing: each DP phase processes rows × epochs samples. BitFit backpropagates through the
whole body (~40 samples/s on one thread); a head-only phase runs the frozen body once per
row (~120 rows/s, :mod:`core.training.frozen_body`) and its steps then cost almost nothing,
so ``--head-only`` at 8,192 rows × 12 epochs takes ~7 minutes per ε and repeat.

dpimp_unstructured refits its pruned layers on public text (core.compress.reconstruction):
by default the first 256 WikiText-2 validation lines, passed as the job's public
``calibration_dataset_id``.

Writes ``bench/results/compression.json``. Reads SST-2 and WikiText-2 in place from
``../shared/data/`` (or ``$DPC_SHARED_DATA``); never copies them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

from bench.data import ROOT, offline_environment, read_sst2, read_wikitext, shared_data, sst2_dir

RESULTS = ROOT / "bench" / "results" / "compression.json"
METHODS = ("dp_finetune", "dpkd", "dpimp_structured", "dpimp_unstructured")
REPORTED = (
    "eval_accuracy", "teacher_eval_accuracy", "train_body", "parameters", "base_parameters",
    "bytes_on_disk", "base_bytes_on_disk", "size_ratio", "parameter_ratio",
    "latency_ms_batch1", "base_latency_ms_batch1", "latency_ratio_batch1",
    "latency_ms_batch32", "base_latency_ms_batch32", "latency_ratio_batch32",
    "achieved_sparsity", "num_hidden_layers", "intermediate_size", "train_loss",
    "noise_multiplier",
)  # fmt: skip


def public_calibration() -> list[dict]:
    """dpimp_unstructured's public calibration text: WikiText-2 validation lines."""
    from core.compress.reconstruction import CALIBRATION_SEQUENCES

    return read_wikitext(shared_data() / "wikitext-2" / "wiki.valid.tokens",
                         CALIBRATION_SEQUENCES)  # fmt: skip


class BenchHooks:
    """RecipeHooks that run every planned step, charge nothing and count steps per phase."""

    def __init__(self, plan, ckpt_dir: Path):
        self.planned = {p.name: p.steps for p in plan.phases}
        self.ckpt_dir, self.steps = ckpt_dir, dict.fromkeys(self.planned, 0)

    def begin_phase(self, phase, *, resumed_step):
        return self.planned[phase]

    def before_step(self, phase, step):
        self.steps[phase] += 1

    def after_step(self, phase, step, metrics):
        pass

    def checkpoint_dir(self, phase):
        return self.ckpt_dir / phase

    def event(self, kind, data):
        if kind.startswith("prune.") or kind == "eval.degenerate":
            print(f"    {kind}: {json.dumps(data, default=str)[:160]}", flush=True)


def run_method(method: str, epsilon: float, args, train, dev, seed: int = 0) -> dict:
    """One recipe run; returns the reported metrics, the plan and the wall time."""
    from core.compress import load_recipe
    from core.privacy.planner import plan_job
    from core.recipe_api import DatasetView, JobContext
    from core.specs import JobSpec

    spec = JobSpec.model_validate({
        "method": method, "dataset_id": "ds_sst2", "eval_dataset_id": "ds_sst2dev",
        "model": {"base": "bundled:minilm-l6"},
        "privacy": {"epsilon": epsilon, "delta": args.delta},
        "compression": {"target_sparsity": 0.5, "student_layers": 3, "prune_rounds": args.rounds,
                        "prune_schedule": "cubic", "reconstruct": args.calibration != "none"},
        **({"calibration_dataset_id": "ds_wikitext"}
           if method == "dpimp_unstructured" and args.calibration == "wikitext" else {}),
        "training": {"epochs": args.epochs, "batch_size": args.batch,
                     "physical_batch_size": args.physical, "max_seq_length": args.seq,
                     "head_learning_rate": args.head_lr, "seed": seed,
                     "train_body": True if args.train_body else False if args.head_only
                     else "bitfit" if args.bitfit else None,
                     **({"learning_rate": args.lr} if args.lr is not None else {})},
        "distill": {"alpha": 0.5, "temperature": 2.0},
    })  # fmt: skip
    plan = plan_job(spec, num_records=len(train))
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        hooks = BenchHooks(plan, Path(tmp) / "ckpt")
        ctx = JobContext(
            job_id=f"job_bench_{method}", spec=spec, plan=plan,
            train=DatasetView("ds_sst2", "classification", ["0", "1"], train),
            eval=DatasetView("ds_sst2dev", "classification", ["0", "1"], dev),
            calibration=(DatasetView("ds_wikitext", "causal_lm", [], public_calibration())
                         if spec.calibration_dataset_id else None),
            output_dir=Path(tmp) / "out", work_dir=Path(tmp) / "work", hooks=hooks,
        )  # fmt: skip
        start = time.perf_counter()
        metrics = load_recipe(method)(ctx).metrics
        seconds = time.perf_counter() - start
        if method == "dp_finetune":  # no compression report: dense by definition
            metrics["bytes_on_disk"] = sum(
                f.stat().st_size for f in ctx.output_dir.glob("*.safetensors")
            )
    row = {k: metrics[k] for k in REPORTED if k in metrics}
    row.update(
        seconds=round(seconds, 1),
        steps={name: hooks.steps[name] for name in hooks.steps},
        plan={"epsilon": round(plan.epsilon, 4), "delta": plan.delta,
              "phases": [{"name": p.name, "noise_multiplier": round(p.noise_multiplier, 4),
                          "sample_rate": p.sample_rate, "steps": p.steps,
                          "epsilon": round(p.epsilon or 0.0, 4)} for p in plan.phases]},
    )  # fmt: skip
    return row


def summarise_runs(runs: list[dict]) -> dict:
    """One cell from its repeats: the first run's sizes and plan; accuracy as the mean (with
    the runs and their sd); latency ratios as the median; seconds summed."""
    if len(runs) == 1:
        return runs[0]
    row = dict(runs[0])
    accuracies = [r["eval_accuracy"] for r in runs]
    row["eval_accuracy"] = statistics.fmean(accuracies)
    row["eval_accuracy_runs"] = accuracies
    row["eval_accuracy_sd"] = statistics.stdev(accuracies)
    for key in ("latency_ratio_batch1", "latency_ratio_batch32"):
        if key in row:
            row[key] = statistics.median(r[key] for r in runs)
    row["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192, help="SST-2 training rows (N)")
    parser.add_argument("--epochs", type=float, default=12.0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per cell (training.seed 0..R-1, fresh DP noise each)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=256, help="expected logical batch")
    parser.add_argument("--physical", type=int, default=32, help="physical batch")
    parser.add_argument("--seq", type=int, default=64, help="max_seq_length (tokens)")
    parser.add_argument("--lr", type=float, default=None, help="body lr (default: method's)")
    parser.add_argument("--head-lr", type=float, default=2e-2, help="head learning rate")
    parser.add_argument("--rounds", type=int, default=3, help="prune_rounds of dpimp_*")
    parser.add_argument("--delta", type=float, default=None, help="δ; default 1/(10·N)")
    parser.add_argument("--eval-rows", type=int, default=None, help="dev rows (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--train-body", action="store_true", help="train the whole body")
    parser.add_argument("--head-only", action="store_true", help="train only the head")
    parser.add_argument("--bitfit", action="store_true",
                        help="train the head + the body's biases and norms in every method")
    parser.add_argument("--calibration", choices=["wikitext", "random", "none"],
                        default="wikitext", help="dpimp_unstructured's public refit text: "
                        "WikiText-2 lines, random token ids, or no refit")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    offline_environment()
    import torch

    torch.set_num_threads(args.threads)
    train = read_sst2(sst2_dir() / "train.tsv", args.rows)
    dev = read_sst2(sst2_dir() / "dev.tsv", args.eval_rows)
    results: dict = {}
    started = time.perf_counter()
    for epsilon in args.epsilons:
        per_method = results.setdefault(f"epsilon={epsilon:g}", {})
        for method in args.methods:
            print(f"ε={epsilon:g} {method} ...", flush=True)
            try:
                row = summarise_runs([run_method(method, epsilon, args, train, dev, seed=r)
                                      for r in range(args.repeats)])  # fmt: skip
            except Exception as e:  # one failed method must not lose the others' numbers
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {e}"}
            per_method[method] = row
            shown = ("eval_accuracy", "size_ratio", "latency_ratio_batch1",
                     "latency_ratio_batch32", "seconds", "error")  # fmt: skip
            print("  " + json.dumps({k: row[k] for k in shown if k in row}), flush=True)
        dense = per_method.get("dp_finetune", {}).get("eval_accuracy")
        for row in per_method.values():
            if dense and row.get("eval_accuracy") is not None:
                row["accuracy_ratio_to_dense"] = round(row["eval_accuracy"] / dense, 4)
    payload = {
        "bench": "compression",
        "model": "bundled:minilm-l6 (mean-pooled classifier)",
        "data": {
            "train": f"SST-2 train, first {len(train)} rows",
            "eval": f"SST-2 dev, {len(dev)} rows (non-private evaluation)",
        },  # fmt: skip
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "torch_threads": args.threads,
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "results": results,
        "total_seconds": round(time.perf_counter() - started, 1),
        "notes": [
            "ratios are compressed / dense, measured side by side in the same process",
            "latency: CPU forward pass on random token ids of length min(seq, 128)",
            "dpkd runs two DP phases (teacher + student) with ε composed by the planner",
            "accuracy: mean over --repeats runs (each its own noise draw and head init)",
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out} in {payload['total_seconds']} s")


if __name__ == "__main__":
    main()
