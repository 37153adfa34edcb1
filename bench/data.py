"""The shared data sets the benchmarks read in place (``$DPC_SHARED_DATA``, else
``../shared/data`` beside the repository; never copied into it)."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTROL_NAMES = {"0": "negative", "1": "positive"}  # SST-2 label → control code


def shared_data() -> Path:
    return Path(os.environ.get("DPC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def sst2_dir() -> Path:
    return shared_data() / "sst2"


def sst2_missing() -> bool:
    """Whether SST-2 is absent; says so (a bench then skips instead of failing)."""
    train = sst2_dir() / "train.tsv"
    if train.exists():
        return False
    print(f"skipped: {train} not found (shared data folder absent)")
    return True


def offline_environment() -> None:
    """Models from the local cache only; jobs' dataset store in a temporary folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DPC_DATA_DIR", str(Path(tempfile.gettempdir()) / "dpc-bench-data"))


def read_sst2(path: Path, rows: int | None = None, *, label_as_control: bool = False
              ) -> list[dict]:  # fmt: skip
    """The first ``rows`` rows ``{"text", "label", "control"}`` of an SST-2 TSV (header
    ``sentence\\tlabel``): the label as label, or as control code (``label_as_control``)."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            text, label = rec["sentence"].strip(), rec["label"]
            if label_as_control:
                out.append({"text": text, "label": None,
                            "control": CONTROL_NAMES.get(label, label)})  # fmt: skip
            else:
                out.append({"text": text, "label": label, "control": None})
            if rows is not None and len(out) == rows:
                break
    return out


def read_wikitext(path: Path, rows: int) -> list[dict]:
    """Non-empty WikiText-2 lines that are not ``= Heading =`` lines, without codes."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text or text.startswith("="):
                continue
            out.append({"text": text, "label": None, "control": None})
            if len(out) == rows:
                break
    return out
