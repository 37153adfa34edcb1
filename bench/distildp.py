"""DistilDP vs direct DP-SGD vs DPKD: student perplexity at the same total ε, side by side.

For each private dataset and each ε (planned by :func:`core.privacy.planner.plan_job`,
δ = 1/(10·N), PRV accountant), three ways to get the same ``--student-layers``-layer
student of ``--base``:

* ``distildp``: the real recipe (DP teacher → DP control-code histogram → synthetic text →
  non-private KD student); ε split 95 % teacher / 5 % histogram by the planner;
* ``dp_sgd_student``: the student (the same layer choice as distildp's, read on 64 texts
  sampled from the PUBLIC pre-trained base instead of the DP teacher) trained
  directly with DP-SGD on the private rows at the whole ε (one phase);
* ``dpkd``: the real dpkd recipe (DP teacher, then DP-SGD KD student on the private
  rows), ε split 50/50; its student's layers are chosen on texts sampled from its DP
  teacher.

Private datasets (uploads are all-codes or no-codes, so these are two separate runs):

* ``sst2``: the first ``--rows`` SST-2 training sentences, label as control code
  (``[negative]`` / ``[positive]``); eval = ``--eval-rows`` SST-2 dev sentences (with codes);
* ``wikitext``: the first ``--rows`` non-empty, non-heading WikiText-2 validation lines, no
  codes; eval = ``--eval-rows`` WikiText-2 test lines.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.distildp                      # full size
    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.distildp --base tiny:llama \
        --rows 64 --eval-rows 32 --num-samples 16 --max-new-tokens 12 --epsilons 8 \
        --datasets sst2 --out /tmp/distildp-smoke.json                   # smoke test

Full size (SmolLM2-135M, 2,000 rows × 2 epochs + 2,000 synthetic texts) is ~70 min per
distildp run on 2 CPU threads (DESIGN §8); the whole grid is many hours: run it on a GPU
box (``--device cuda``). Writes ``bench/results/distildp.json`` (or ``--out``). DP noise and
Poisson sampling use OS entropy like production: one seed per run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.data import ROOT, read_sst2, read_wikitext, shared_data

RESULTS = ROOT / "bench" / "results" / "distildp.json"


def datasets(name: str, rows: int, eval_rows: int) -> tuple[list[dict], list[dict]]:
    data = shared_data()
    if name == "sst2":
        return (read_sst2(data / "sst2" / "train.tsv", rows, label_as_control=True),
                read_sst2(data / "sst2" / "dev.tsv", eval_rows, label_as_control=True))  # fmt: skip
    if name == "wikitext":
        return (read_wikitext(data / "wikitext-2" / "wiki.valid.tokens", rows),
                read_wikitext(data / "wikitext-2" / "wiki.test.tokens", eval_rows))  # fmt: skip
    raise SystemExit(f"unknown dataset {name!r}")


class BenchHooks:
    """RecipeHooks in memory: every planned step of every phase allowed; charges counted."""

    def __init__(self, ckpt_root: Path, planned: dict[str, int]):
        self.ckpt_root, self.planned = ckpt_root, planned
        self.charged: dict[str, int] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []

    def begin_phase(self, phase: str, *, resumed_step: int) -> int:
        print(f"  phase {phase} ({self.planned[phase]} steps)", file=sys.stderr, flush=True)
        return self.planned[phase]

    def before_step(self, phase: str, step: int) -> None:
        self.charged[phase] = step

    def after_step(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        if step % 10 == 0 or step == self.planned[phase]:
            loss = metrics.get("loss", float("nan"))
            print(f"  {phase} {step}/{self.planned[phase]} loss {loss:.4f}", file=sys.stderr,
                  flush=True)  # fmt: skip

    def checkpoint_dir(self, phase: str) -> Path:
        return self.ckpt_root / phase

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))
        if kind == "synthetic.progress":
            print(f"  synthetic {data['done']}/{data['total']} ({data['tokens_per_second']} tok/s)",
                  file=sys.stderr, flush=True)  # fmt: skip


def job_spec(method: str, epsilon: float, args) -> Any:
    from core.specs import JobSpec

    return JobSpec.model_validate({
        "method": method, "dataset_id": "ds_bench", "eval_dataset_id": "ds_eval",
        "model": {"base": args.base}, "privacy": {"epsilon": epsilon},
        "compression": {"student_layers": args.student_layers,
                        "student_layer_selection": args.student_layer_selection},
        "training": {"epochs": args.epochs, "batch_size": args.batch_size,
                     "physical_batch_size": args.physical_batch_size,
                     "learning_rate": args.lr, "max_seq_length": args.max_seq_length},
        "synthetic": {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                      **({"student_epochs": args.student_epochs}
                         if method == "distildp" and args.student_epochs else {})},
    })  # fmt: skip


def run_recipe(method: str, epsilon: float, train: list[dict], eval_rows: list[dict], args):
    """One job of ``method`` through the real recipe; returns (metrics, plan, seconds)."""
    from core.compress import load_recipe
    from core.privacy.planner import plan_job
    from core.recipe_api import DatasetView, JobContext

    spec = job_spec(method, epsilon, args)
    plan = plan_job(spec, num_records=len(train))
    with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
        hooks = BenchHooks(Path(tmp) / "ckpt", {p.name: p.steps for p in plan.phases})
        ctx = JobContext(
            job_id="job_bench", spec=spec, plan=plan,
            train=DatasetView("ds_bench", "causal_lm", [], train),
            eval=DatasetView("ds_eval", "causal_lm", [], eval_rows),
            output_dir=Path(tmp) / "out", work_dir=Path(tmp) / "work", hooks=hooks,
            device=args.device,
        )  # fmt: skip
        started = time.monotonic()
        result = load_recipe(method)(ctx)
        return result.metrics, plan, time.monotonic() - started, hooks.charged


def run_dp_sgd_student(epsilon: float, train: list[dict], eval_rows: list[dict], args):
    """The same student shape trained directly with DP-SGD on the private rows."""
    import torch

    from core.compress.causal_distill import BLOCK_SELECTION_TEXTS, student_layers
    from core.compress.pruning import shrink_model
    from core.compress.synthetic import SyntheticSet, generate_synthetic
    from core.data import encode_dataset
    from core.models import load_model, split_trainable
    from core.privacy.engine import DPSGDEngine, EngineConfig
    from core.privacy.planner import plan_job
    from core.recipe_api import DatasetView
    from core.training.losses import causal_lm_loss_per_example, evaluate_perplexity

    spec = job_spec("dp_finetune", epsilon, args)
    plan = plan_job(spec, num_records=len(train))
    started = time.monotonic()
    loaded = load_model(args.base, task="causal_lm", seed=0)
    tok = loaded.tokenizer
    # the same layer choice as distildp's student, read on texts the PUBLIC base samples
    public = (
        generate_synthetic(loaded.model, tok, controls=[None] * BLOCK_SELECTION_TEXTS,
                           max_new_tokens=args.max_new_tokens, device=args.device)
        if args.student_layer_selection == "similar_block" else SyntheticSet(())
    )  # fmt: skip
    layers = student_layers(loaded.model, args.student_layers,
                            selection=args.student_layer_selection, synthetic=public,
                            tokenizer=tok, max_seq_length=args.max_seq_length,
                            device=args.device)  # fmt: skip
    student = shrink_model(loaded.model, keep_layers=layers)
    rows = encode_dataset(DatasetView("ds_bench", "causal_lm", [], train), tok,
                          task="causal_lm", max_seq_length=args.max_seq_length)  # fmt: skip
    body, _ = split_trainable(student)
    with tempfile.TemporaryDirectory(prefix="bench-dpsgd-") as tmp:
        phase = plan.phase("train")
        hooks = BenchHooks(Path(tmp), {"train": phase.steps})
        DPSGDEngine(
            model=student, optimizer=torch.optim.AdamW(body, lr=args.lr, weight_decay=0.0),
            phase=phase, dataset=rows, loss_fn=causal_lm_loss_per_example, hooks=hooks,
            config=EngineConfig(physical_batch_size=args.physical_batch_size,
                                checkpoint_every=10**9),
            device=args.device,
        ).run()  # fmt: skip
    eval_set = encode_dataset(DatasetView("ds_eval", "causal_lm", [], eval_rows), tok,
                              task="causal_lm", max_seq_length=args.max_seq_length)  # fmt: skip
    ppl = evaluate_perplexity(student, eval_set, device=args.device)
    metrics = {"eval_perplexity": ppl, "copied_layers": layers}
    return metrics, plan, time.monotonic() - started, hooks.charged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", default="bundled:smollm2-135m")
    p.add_argument("--datasets", default="sst2,wikitext")
    p.add_argument("--methods", default="distildp,dp_sgd_student,dpkd")
    p.add_argument("--epsilons", default="2,8")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--student-layers", type=int, default=20)
    p.add_argument("--student-layer-selection", default="similar_block",
                   choices=["similar_block", "evenly_spaced"],
                   help="every method's student (similar_block: chosen on texts sampled from "
                   "the DP teacher, or from the public base for dp_sgd_student)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--student-epochs", type=float, default=None,
                   help="distildp: student passes over the synthetic texts (default --epochs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--physical-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    runs = []
    for name in args.datasets.split(","):
        train, eval_rows = datasets(name, args.rows, args.eval_rows)
        for epsilon in [float(e) for e in args.epsilons.split(",")]:
            for method in args.methods.split(","):
                print(f"{name} ε={epsilon} {method}", file=sys.stderr, flush=True)
                if method == "dp_sgd_student":
                    metrics, plan, seconds, charged = run_dp_sgd_student(
                        epsilon, train, eval_rows, args)  # fmt: skip
                else:
                    metrics, plan, seconds, charged = run_recipe(
                        method, epsilon, train, eval_rows, args)  # fmt: skip
                run = {
                    "dataset": name, "epsilon_target": epsilon, "method": method,
                    "epsilon_planned": plan.epsilon, "delta": plan.delta,
                    "phases": [ph.model_dump() for ph in plan.phases], "steps_charged": charged,
                    "student_eval_perplexity": metrics.get("eval_perplexity"),
                    "teacher_eval_perplexity": metrics.get("teacher_eval_perplexity"),
                    "copied_layers": metrics.get("copied_layers"),
                    "seconds": round(seconds, 1),
                }  # fmt: skip
                if method == "distildp":
                    run.update(
                        {
                            k: metrics[k]
                            for k in (
                                "histogram",
                                "synthetic_samples",
                                "synthetic_empty_texts",
                                "timings",
                                "student_parameters",
                                "teacher_parameters",
                                "alpha",
                                "temperature",
                            )
                        }
                    )
                print(
                    json.dumps(
                        {
                            k: run[k]
                            for k in (
                                "dataset",
                                "epsilon_target",
                                "method",
                                "epsilon_planned",
                                "student_eval_perplexity",
                                "seconds",
                            )
                        }
                    ),
                    flush=True,
                )
                runs.append(run)
    ratios = []
    for r in runs:  # side by side: distildp student perplexity / the others' at the same ε
        if r["method"] != "distildp":
            continue
        for other in runs:
            same = (other["dataset"], other["epsilon_target"]) == (
                r["dataset"],
                r["epsilon_target"],
            )
            if same and other["method"] != "distildp" and other["student_eval_perplexity"]:
                ratios.append({
                    "dataset": r["dataset"], "epsilon": r["epsilon_target"],
                    "vs": other["method"],
                    "perplexity_ratio": r["student_eval_perplexity"]
                    / other["student_eval_perplexity"],
                })  # fmt: skip
    out = {
        "bench": "distildp", "base": args.base, "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": args.threads, "device": args.device},
        "runs": runs, "distildp_vs_others_perplexity_ratio": ratios,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    for ratio in ratios:
        print(f"{ratio['dataset']} ε={ratio['epsilon']:g}: distildp / {ratio['vs']} student "
              f"perplexity = {ratio['perplexity_ratio']:.3f}")  # fmt: skip
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
