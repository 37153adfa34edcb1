"""The privacy plan: what every DP phase of a job will do, and its composed ε.

Field names follow Opacus and the REST contract so that auditors can recompute ε.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class PhasePlan(BaseModel):
    name: str  # "train", "teacher", "student", "histogram", ...
    mechanism: str  # "poisson_gaussian" | "gaussian" | "laplace"
    sample_rate: float = 1.0  # q = expected batch / N
    noise_multiplier: float  # σ (noise std / sensitivity)
    steps: int = 1
    max_grad_norm: float | None = None  # C for DP-SGD phases
    sensitivity: float = 1.0
    epsilon: float | None = None  # ε of this phase alone at the plan's δ
    batch_size: int | None = None  # expected logical batch (DP-SGD phases)


class PrivacyPlan(BaseModel):
    accountant: str
    accountant_version: str = ""
    delta: float
    epsilon: float  # composed over all phases
    epsilon_independent: float | None = None  # dp_accounting PLD recomputation
    phases: list[PhasePlan] = Field(default_factory=list)

    def phase(self, name: str) -> PhasePlan:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)
