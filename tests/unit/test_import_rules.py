"""The zones of DESIGN.md section 3: api never imports torch, transformers,
opacus or worker; worker never imports api; core never imports api or worker;
core.privacy.accounting imports neither torch nor the database."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "opacus", "transformers"}
TORCH_FREE_CORE = ["core/settings.py", "core/errors.py", "core/specs.py", "core/states.py",
                   "core/storage.py", "core/uploads.py", "core/queue.py", "core/model_refs.py",
                   "core/recipe_api.py", "core/privacy/plan.py", "core/privacy/accounting.py",
                   "core/privacy/planner.py", "core/privacy/ledger.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module.startswith("core.db"):
                names.add("core.db")
    return names


def _files(zone: str) -> list[Path]:
    return sorted((ROOT / zone).rglob("*.py"))


def test_api_imports_no_torch_and_no_worker():
    for f in _files("api"):
        assert not (_imports(f) & (HEAVY | {"worker"})), f


def test_worker_never_imports_api_and_core_never_imports_api_or_worker():
    for f in _files("worker"):
        assert "api" not in _imports(f), f
    for f in _files("core"):
        assert not (_imports(f) & {"api", "worker"}), f


def test_torch_free_core_modules():
    for rel in TORCH_FREE_CORE:
        assert not (_imports(ROOT / rel) & HEAVY), rel
    assert "core.db" not in _imports(ROOT / "core/privacy/accounting.py")


def test_importing_api_main_leaves_torch_out():
    code = ("import sys, api.main; bad = sorted(m for m in ('torch', 'transformers', 'opacus') "
            "if m in sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
