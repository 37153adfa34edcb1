"""Turn a recipe's HF folder into the downloadable artifact: add the model card,
the privacy-ledger sidecar and metrics.json, then one .tar.gz archive."""

from __future__ import annotations

import hashlib
import json
import tarfile
from importlib.metadata import version
from pathlib import Path

from core.privacy.accounting import accountant_info

MODEL_ARCHIVE = "model.tar.gz"


def write_ledger_sidecar(folder: Path, *, job_id: str, events: list[dict], summary: dict,
                         plan: dict) -> str:
    """privacy_ledger.json: DpEvent-style records, accountant name and version, and
    the sha256 of the canonical ledger body. Returns that sha256."""
    accountant = summary["accountant"]
    body = {"job_id": job_id, "privacy_unit": "one row of the uploaded dataset "
            "(add/remove adjacency)",
            "accountant": accountant_info(accountant) if accountant != "pld" else
            {"name": "pld", "version": version("dp-accounting")},
            "independent_accountant": {"name": "pld", "version": version("dp-accounting")},
            "delta": summary["delta"],
            "epsilon": summary["epsilon"], "epsilon_independent": summary["epsilon_independent"],
            "events": events, "plan": plan}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).hexdigest()
    (folder / "privacy_ledger.json").write_text(
        json.dumps({**body, "sha256": digest}, indent=2, sort_keys=True))
    return digest


def write_model_card(folder: Path, *, job_id: str, spec: dict, summary: dict, metrics: dict,
                     ledger_sha256: str, load_hint: str) -> None:
    comp = spec.get("compression", {})
    eval_lines = "\n".join(f"| {k} | {v} |" for k, v in sorted(metrics.items())
                           if isinstance(v, int | float | str) and not k.startswith("_"))
    card = f"""# DP-compressed model `{job_id}`

## Privacy guarantee
This model was trained with differential privacy: **(ε = {summary['epsilon']:.4g},
δ = {summary['delta']:.3g})-DP**, privacy unit **one row of the uploaded dataset**
(add/remove adjacency), accountant **{summary['accountant']}** (independent
recomputation with dp_accounting PLD: ε = {summary['epsilon_independent']:.4g}).
Every computation that read private rows is listed in `privacy_ledger.json`
(sha256 `{ledger_sha256}`); everything else is post-processing.

| field | value |
| --- | --- |
| method | `{spec.get('method')}` |
| base model | `{spec.get('model', {}).get('base')}` |
| target ε | {spec.get('privacy', {}).get('epsilon')} |
| max_grad_norm | {spec.get('privacy', {}).get('max_grad_norm')} |
| target sparsity | {comp.get('target_sparsity') if 'dpimp' in str(spec.get('method')) else 'n/a'} |

## Metrics
Evaluation metrics are computed on the eval dataset the user named (non-private
evaluation, not part of the guarantee) or are training statistics.

| metric | value |
| --- | --- |
{eval_lines}

## Loading
```python
{load_hint}
```
"""
    (folder / "MODEL_CARD.md").write_text(card)


def write_archive(folder: Path, dest: Path) -> Path:
    """``dest`` = a .tar.gz whose top-level directory is ``model/``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="model")
    return dest
