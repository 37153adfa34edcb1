"""Embedding sparsity under DP-SGD: dense vs frozen vs FEST vs DP-AdaFEST word embeddings.

MiniLM-L6 (``bundled:minilm-l6``, mean-pooled classifier) fine-tuned by the real
:func:`core.compress.dp_finetune.run` on the first ``--rows`` SST-2 training rows at each ε,
evaluated on the SST-2 dev rows (all 872 by default). The classifier trains its head and,
in every mode but ``frozen``, the word embedding (densely, FEST rows, or AdaFEST rows); the
rest of the body stays frozen (``--train-body false``) or trains only its biases and norms
(``--train-body bitfit``, dp_finetune's default) in every mode, so the modes differ only in
how the embedding is trained.
Every run of one ε shares the plan of
:func:`core.privacy.planner.plan_job` (σ, q, T: the embedding mode does not change the
accounting, see :mod:`core.privacy.sparse_embedding`). Reports per run: dev accuracy,
rows updated per step, embedding-gradient bytes per step vs dense (rows·h·4 vs V·h·4) and
the reduction factor, seconds per logical step.

FEST's public ranking: token counts on WikiText-2 (public data, read in place from the
shared folder; not available to production workers) passed as ``fest_public_rows``, i.e.
the spec path. ``--fest-source tokenizer`` uses the tokenizer-order proxy instead.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.embedding_sparsity \
        [--rows 2048] [--dev-rows 872] [--epsilons 3,8] [--modes dense,frozen,fest,adafest] \
        [--epochs 3] [--batch-size 256] [--fest-top-k 2048] [--threads 1] [--repeats 3] \
        [--train-body false|bitfit] [--lr 1e-4] [--clip-share 0.1]

Writes ``bench/results/embedding_sparsity.json`` (or ``--out``). Noise and sampling draw from
OS entropy like production (±1-2 points between runs), so every (ε, mode) runs ``--repeats``
times and the summary compares mean accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from bench.data import ROOT, offline_environment, read_sst2, sst2_dir, sst2_missing
from bench.dp_finetune_quality import MemoryHooks

RESULTS = ROOT / "bench" / "results" / "embedding_sparsity.json"


def wikitext_ranking(top_k: int) -> list[int] | None:
    """MiniLM row ids ranked by token counts on WikiText-2 (public), or None if absent."""
    from transformers import AutoTokenizer

    from core.models import bundled
    from core.privacy.embedding_frequencies import rank_rows_by_public_corpus

    path = sst2_dir().parent / "wikitext-2" / "wiki.valid.tokens"
    if not path.exists():
        return None
    tok = AutoTokenizer.from_pretrained(bundled.minilm_dir())
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return rank_rows_by_public_corpus(tok, lines, num_rows=len(tok), max_rows=top_k)


def run_one(mode: str, epsilon: float, repeat: int, args, train_rows, dev_rows, fest_rows) -> dict:
    from core.compress import dp_finetune
    from core.privacy.planner import plan_job
    from core.recipe_api import DatasetView, JobContext
    from core.specs import JobSpec

    embedding: dict = {"mode": mode}
    if mode == "fest":
        embedding["fest_top_k"] = args.fest_top_k
        if fest_rows is not None:
            embedding["fest_public_rows"] = fest_rows
    if mode == "adafest" and args.adafest_ratio:
        embedding["adafest_noise_ratio"] = args.adafest_ratio
    if mode != "frozen" and args.clip_share is not None:
        embedding["clip_share"] = args.clip_share
    # the modes differ only in the word embedding: the rest of the body is frozen
    # (``--train-body false``) or trains its biases and norms (``bitfit``) in every mode
    training = {"max_seq_length": args.max_seq_length, "epochs": args.epochs,
                "batch_size": args.batch_size,
                "train_body": "bitfit" if args.train_body == "bitfit" else False,
                "probe_epochs": 0,  # one phase: the modes differ in it alone (no head probe)
                **({"learning_rate": args.lr} if args.lr is not None else {})}  # fmt: skip
    spec = JobSpec(method="dp_finetune", dataset_id="ds_sst2", eval_dataset_id="ds_dev",
                   model={"base": args.base}, privacy={"epsilon": epsilon},
                   training=training, embedding=embedding)  # fmt: skip
    plan = plan_job(spec, num_records=len(train_rows))
    phase = plan.phase("train")
    with tempfile.TemporaryDirectory(prefix="dpc-embsparse-") as tmp:
        hooks = MemoryHooks(Path(tmp) / "ckpt", {phase.name: phase.steps})
        ctx = JobContext(
            job_id=f"bench_{mode}_{epsilon}", spec=spec, plan=plan,
            train=DatasetView("ds_sst2", "classification", ["0", "1"], train_rows),
            eval=DatasetView("ds_dev", "classification", ["0", "1"], dev_rows),
            output_dir=Path(tmp) / "model", work_dir=Path(tmp) / "work", hooks=hooks,
        )  # fmt: skip
        started = time.perf_counter()
        m = dp_finetune.run(ctx).metrics
        seconds = time.perf_counter() - started
    emb = m.get("embedding") or {}
    return {
        "mode": mode,
        "repeat": repeat,
        "epsilon_target": epsilon,
        "epsilon": plan.epsilon,
        "noise_multiplier": round(phase.noise_multiplier, 4),
        "gradient_noise_multiplier": emb.get("gradient_noise_multiplier"),
        "selection_noise_multiplier": emb.get("selection_noise_multiplier"),
        "selection_threshold": emb.get("selection_threshold"),
        "embedding_mode_run": m["embedding_mode"],
        "embedding_clip_share": m["embedding_clip_share"],
        "steps": m["steps"],
        "accuracy": round(m["eval_accuracy"], 4),
        "predicted_class_share": round(m["eval"]["predicted_class_share"], 4),
        "rows_updated_per_step": emb.get("rows_updated_per_step"),
        "embedding_grad_bytes_per_step": emb.get("embedding_grad_bytes_per_step"),
        "embedding_grad_bytes_dense": emb.get("embedding_grad_bytes_dense"),
        "embedding_grad_reduction": emb.get("embedding_grad_reduction"),
        "fest_rows_source": emb.get("fest_rows_source"),
        "seconds_per_step": m["seconds_per_step"],
        "train_seconds": m["train_seconds"],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--dev-rows", type=int, default=10**9)
    parser.add_argument("--epsilons", default="3,8")
    parser.add_argument("--modes", default="dense,frozen,fest,adafest")
    parser.add_argument("--base", default="bundled:minilm-l6")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-body", choices=["false", "bitfit"], default="bitfit")
    parser.add_argument("--lr", type=float, default=None,
                        help="body + embedding lr; default 1e-4 (--train-body false) or "
                        "BitFit's default")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--fest-top-k", type=int, default=2048)
    parser.add_argument("--fest-source", choices=["wikitext", "tokenizer"], default="wikitext")
    parser.add_argument("--adafest-ratio", type=float, default=None)
    parser.add_argument("--clip-share", type=float, default=None,
                        help="embedding.clip_share (1: flat clipping); default: the spec's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.lr is None and args.train_body == "false":
        args.lr = 1e-4
    if sst2_missing():
        return
    offline_environment()
    import torch

    torch.set_num_threads(args.threads)
    train_rows = read_sst2(sst2_dir() / "train.tsv", args.rows)
    dev_rows = read_sst2(sst2_dir() / "dev.tsv", args.dev_rows)
    fest = wikitext_ranking(args.fest_top_k) if args.fest_source == "wikitext" else None
    results = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for eps in [float(e) for e in args.epsilons.split(",") if e]:
        for repeat in range(args.repeats):  # interleaved: load drift hits every mode alike
            for mode in modes:
                results.append(run_one(mode, eps, repeat, args, train_rows, dev_rows, fest))
                print(json.dumps(results[-1]), flush=True)
    summary = summarize(results)
    report = {
        "bench": "embedding_sparsity",
        "model": f"{args.base} (mean-pooled classifier)",
        "data": f"SST-2 train, first {len(train_rows)} rows; dev {len(dev_rows)} rows",
        "fest_ranking": "WikiText-2 valid token counts (public)" if fest else "tokenizer order",
        "config": {**vars(args), "out": str(args.out)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},  # fmt: skip
        "summary": summary,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\n{'ε':>4} {'mode':>8} {'acc mean':>9} {'sd':>6} {'vs dense':>9} {'vs frozen':>10} "
          f"{'rows/step':>10} {'reduction':>10} {'s/step':>7}")  # fmt: skip
    for r in summary:
        print(f"{r['epsilon_target']:>4g} {r['mode']:>8} {r['accuracy_mean']:>9.4f} "
              f"{r['accuracy_sd']:>6.4f} {r.get('accuracy_minus_dense', '-'):>9} "
              f"{r.get('accuracy_minus_frozen', '-'):>10} {r['rows_updated_per_step'] or '-':>10} "
              f"{r['embedding_grad_reduction'] or '-':>10} "
              f"{r['seconds_per_step']:>7.3f}")  # fmt: skip


def summarize(results: list[dict]) -> list[dict]:
    """Per (ε, mode): mean and sd of accuracy over repeats, differences to dense and frozen."""
    def mean(rs, key):
        values = [r[key] for r in rs if r[key] is not None]
        return round(statistics.fmean(values), 4) if values else None

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["epsilon_target"], r["mode"]), []).append(r)
    summary = []
    for (eps, mode), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        summary.append({
            "epsilon_target": eps, "mode": mode, "runs": len(rs),
            "accuracy_mean": round(statistics.fmean(accs), 4),
            "accuracy_sd": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
            "accuracies": accs,
            "rows_updated_per_step": mean(rs, "rows_updated_per_step"),
            "embedding_grad_reduction": mean(rs, "embedding_grad_reduction"),
            "seconds_per_step": mean(rs, "seconds_per_step"),
        })  # fmt: skip
    for s in summary:
        for ref in ("dense", "frozen"):
            base = next((b for b in summary if b["mode"] == ref
                         and b["epsilon_target"] == s["epsilon_target"]), None)  # fmt: skip
            if base:
                s[f"accuracy_minus_{ref}"] = round(s["accuracy_mean"] - base["accuracy_mean"], 4)
                ratio = s["seconds_per_step"] / base["seconds_per_step"]
                s[f"step_time_vs_{ref}"] = round(ratio, 3)
    return summary


if __name__ == "__main__":
    main()
