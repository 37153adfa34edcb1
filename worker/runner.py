"""The job lifecycle: claim → run recipe → charge ε → store artifact → finish.

A message carries only a job id. The claim is a conditional UPDATE, so a
redelivered message for a running or finished job does nothing; a job whose
worker died (lease expired) is claimed again and resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import traceback
from pathlib import Path

from sqlalchemy import select

from core import states
from core.compress import load_recipe
from core.db.datasets import readable_dataset
from core.db.jobs import append_event, claim_job, get_job, set_status
from core.db.session import session_scope
from core.db.tables import Artifact, Dataset, Job, new_id
from core.errors import DomainError, JobCancelled, LeaseLost
from core.privacy import ledger
from core.privacy.plan import PrivacyPlan
from core.recipe_api import DatasetView, JobContext, RecipeResult
from core.settings import Settings, get_settings
from core.specs import JobSpec
from core.storage import artifact_store, dataset_store
from worker.hooks import RunnerHooks, epsilon_of
from worker.package import MODEL_ARCHIVE, write_archive, write_ledger_sidecar, write_model_card

log = logging.getLogger("dpc.worker")


def _dataset_view(ds: Dataset) -> DatasetView:
    return DatasetView(id=ds.id, task=ds.task, labels=list(ds.labels),
                       rows=dataset_store().load(ds.storage_key))


def _job_model_dir(job_id: str) -> Path:
    """An earlier job's model folder (``model.base = job:<id>``)."""
    with session_scope(write=False) as s:
        art = s.scalars(select(Artifact).where(Artifact.job_id == job_id,
                                               Artifact.name == MODEL_ARCHIVE)).first()
        if art is None:
            raise DomainError(f"job {job_id} has no model artifact", param="model.base")
    return artifact_store().path(f"{job_id}/model")


def _device(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    import torch  # in the task process only: no CUDA is initialised before fork

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_job(job_id: str, *, worker_id: str, settings: Settings | None = None) -> str:
    """Run one job to a terminal state (or leave it to whoever holds the lease).
    Returns what happened: ``skipped``, ``lease_lost`` or the final status."""
    settings = settings or get_settings()
    with session_scope() as s:
        if not claim_job(s, job_id=job_id, worker_id=worker_id,
                         lease_seconds=settings.job_lease_seconds):
            log.info("job %s not claimable (redelivered, cancelled or owned); skipping", job_id)
            return "skipped"
        job = get_job(s, tenant_id=None, job_id=job_id)
        spec, plan = JobSpec.model_validate(job.spec), PrivacyPlan.model_validate(job.plan)
        charged = ledger.charged_steps(s, job_id=job_id)
        append_event(s, job_id=job_id, kind="job.running",
                     data={"status": states.RUNNING, "attempt": job.attempts,
                           "worker": worker_id, "resuming": any(charged.values())})
        tenant_id = job.tenant_id
        dataset_ids = {"dataset_id": job.dataset_id, "eval_dataset_id": job.eval_dataset_id,
                       "calibration_dataset_id": spec.calibration_dataset_id}

    work_dir = settings.jobs_dir / job_id
    hooks = RunnerHooks(job_id=job_id, worker_id=worker_id, plan=plan, charged_at_start=charged,
                        work_dir=work_dir, charge_ahead=settings.charge_ahead_steps,
                        lease_seconds=settings.job_lease_seconds,
                        heartbeat_seconds=settings.heartbeat_seconds)
    hooks.start()
    try:
        output_dir = work_dir / "output"
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True)
        with session_scope(write=False) as s:  # the API's checks again, before any row is read
            datasets = {param: readable_dataset(s, tenant_id=tenant_id, dataset_id=ds_id,
                                                param=param,
                                                read_without_dp=param == "calibration_dataset_id")
                        for param, ds_id in dataset_ids.items() if ds_id}  # fmt: skip
        views = {param: _dataset_view(ds) for param, ds in datasets.items()}
        ctx = JobContext(job_id=job_id, spec=spec, plan=plan, train=views["dataset_id"],
                         eval=views.get("eval_dataset_id"),
                         calibration=views.get("calibration_dataset_id"),
                         output_dir=output_dir, work_dir=work_dir, hooks=hooks,
                         device=_device(settings), resolve_job_model=_job_model_dir)
        result = load_recipe(spec.method)(ctx)
        hooks.stop()
        _finish(job_id, hooks, states.SUCCEEDED, result=result, output_dir=output_dir)
        return states.SUCCEEDED
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; stopping without writes", job_id)
        return "lease_lost"
    except JobCancelled:
        hooks.stop()
        _finish(job_id, hooks, states.CANCELLED)
        return states.CANCELLED
    except Exception as e:
        hooks.stop()
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        code = e.code if isinstance(e, DomainError) else "job_failed"
        message = e.message if isinstance(e, DomainError) else f"{type(e).__name__}: {e}"
        _finish(job_id, hooks, states.FAILED,
                error={"code": code, "message": message[:500],
                       "param": getattr(e, "param", None)})
        return states.FAILED
    finally:
        hooks.stop()


def _finish(job_id: str, hooks: RunnerHooks, status: str, *, result: RecipeResult | None = None,
            output_dir: Path | None = None, error: dict | None = None) -> None:
    """Charge exactly the steps that ran, release the rest, store the artifact, and
    set the terminal status — the charges first, so an artifact crash keeps them."""
    with session_scope() as s:
        job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
        if job.worker_id != hooks.worker_id:
            log.warning("job %s: finished by another worker; not touching it", job_id)
            return
        for phase, steps in hooks.executed.items():
            ledger.charge_steps(session=s, job_id=job_id, phase=phase, steps=steps)
        ledger.release_unused(session=s, job_id=job_id)
        job.epsilon_spent = epsilon_of(hooks.plan, hooks.executed)
        append_event(s, job_id=job_id, kind="budget.charged",
                     data={"epsilon_spent": round(job.epsilon_spent, 6),
                           "steps": dict(hooks.executed)})
        append_event(s, job_id=job_id, kind="budget.released",
                     data={"epsilon_planned": hooks.plan.epsilon})
    if status == states.SUCCEEDED and result is not None and output_dir is not None:
        try:
            _store_artifact(job_id, result, output_dir)
        except Exception as e:
            log.exception("job %s: storing the artifact failed", job_id)
            status, error = states.FAILED, {"code": "artifact_failed",
                                            "message": f"{type(e).__name__}: {e}"[:500]}
    with session_scope() as s:
        job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one()
        if result is not None:
            job.metrics = result.metrics
        job.error = error
        set_status(job, status)
        append_event(s, job_id=job_id, kind=f"job.{status}",
                     data={"status": status, "epsilon_spent": round(job.epsilon_spent, 6),
                           **({"error": error} if error else {})})


def _store_artifact(job_id: str, result: RecipeResult, output_dir: Path) -> None:
    with session_scope(write=False) as s:
        job = s.get(Job, job_id)
        rows = ledger.job_ledger(s, job_id=job_id)
        summary = ledger.summarize(rows, delta=job.plan["delta"],
                                   accountant=job.plan["accountant"])
        events = [ledger.event_to_dict(r) for r in rows]
        spec, plan = job.spec, job.plan
    metrics = {**result.metrics, "epsilon": summary["epsilon"], "delta": summary["delta"]}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    digest = write_ledger_sidecar(output_dir, job_id=job_id, events=events, summary=summary,
                                  plan=plan)
    write_model_card(output_dir, job_id=job_id, spec=spec, summary=summary, metrics=metrics,
                     ledger_sha256=digest,
                     load_hint=result.model_card_extra.get("load", "see README"))
    store = artifact_store()
    archive = write_archive(output_dir, output_dir.parent / MODEL_ARCHIVE)
    size, sha = store.put(key=f"{job_id}/{MODEL_ARCHIVE}", source=archive)
    model_copy = store.path(f"{job_id}/model")
    shutil.rmtree(model_copy, ignore_errors=True)
    shutil.copytree(output_dir, model_copy)
    with session_scope() as s:
        s.add(Artifact(id=new_id("art"), job_id=job_id, name=MODEL_ARCHIVE,
                       storage_key=f"{job_id}/{MODEL_ARCHIVE}", bytes=size, sha256=sha))
