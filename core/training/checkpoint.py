"""Resume checkpoints at logical-step boundaries: tensors + a small typed JSON sidecar.

Layout inside ``hooks.checkpoint_dir(phase)``::

    step-00000050/model.safetensors   full model state (shared tensors saved once)
    step-00000050/state.pt            optimizer state + RNG states (tensors and plain
                                      containers only; loaded with weights_only=True)
    step-00000050/resume.json         ResumeState
    latest.json                       {"dir": "step-00000050"}, replaced atomically last

A crash while saving leaves ``latest.json`` pointing at the previous complete checkpoint.
Nothing is ever unpickled beyond tensors (DESIGN section 5, rule 8).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

LATEST = "latest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ResumeState:
    """What a DP phase needs besides tensors to resume exactly where it stopped.

    Attributes:
        phase: phase name ("train", "teacher", ...).
        step: last completed logical step (1-based); the next run starts at ``step + 1``.
        sample_rate: q the phase ran with.
        noise_multiplier: σ the phase ran with.
        max_grad_norm: C the phase ran with.
        grad_sample_mode: "ghost" or "hooks".
        loss_sum: sum over completed non-empty steps of the mean train loss (nats).
        loss_steps: number of steps in ``loss_sum``.
        samples_seen: rows processed so far (sum of logical batch sizes).
        format_version: layout version of this checkpoint.
    """

    phase: str
    step: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str
    loss_sum: float = 0.0
    loss_steps: int = 0
    samples_seen: int = 0
    format_version: int = FORMAT_VERSION


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_states: dict[str, torch.Tensor],
    state: ResumeState,
) -> Path:
    """Write a complete checkpoint for ``state.step``, then point ``latest.json`` at it.

    Args:
        ckpt_dir: the phase's checkpoint folder.
        model: the plain HF model (no Opacus wrapper).
        optimizer: the optimizer whose ``state_dict`` is saved (a DPOptimizer forwards to
            the wrapped one).
        rng_states: ByteTensor generator states (sampler, noise, torch global).
        state: the sidecar.

    Returns:
        The new checkpoint folder. Older checkpoint folders are removed afterwards.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:08d}"
    folder = ckpt_dir / name
    if folder.exists():  # a crashed earlier attempt at the same step: rewrite it
        shutil.rmtree(folder)
    tmp = ckpt_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng_states}, tmp / "state.pt")
    (tmp / "resume.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
    os.replace(tmp, folder)
    _write_json_atomic(ckpt_dir / LATEST, {"dir": name, "step": state.step})
    for old in ckpt_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def find_checkpoint(ckpt_dir: Path) -> tuple[Path, ResumeState] | None:
    """The latest complete checkpoint of a phase and its sidecar, or None."""
    pointer = Path(ckpt_dir) / LATEST
    if not pointer.exists():
        return None
    folder = Path(ckpt_dir) / json.loads(pointer.read_text())["dir"]
    raw = json.loads((folder / "resume.json").read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {folder} has format {raw.get('format_version')}")
    return folder, ResumeState(**raw)


def load_checkpoint(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Restore model and optimizer in place from ``folder``; return the RNG states.

    Tensors only: ``model.safetensors`` via safetensors and ``state.pt`` via
    ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
    """
    load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
    payload = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(payload["optimizer"])
    return payload["rng"]
