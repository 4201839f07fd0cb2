"""Quality gates of a training run, set by the operator's runPolicy (or by hand) through the environment:
stop as completed once a validation mAP reaches a target, and how many steps in a row the loss may be
NaN or infinite before the run fails as diverged (exit 4, never retried). Names and parsing live here;
the training loop acts on them. No torch here (the operator imports the names)."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Optional

from ..errors import UsageError

TARGET_MAP_ENV = "DDETR_TARGET_MAP"
MAX_NON_FINITE_STEPS_ENV = "DDETR_MAX_NONFINITE_LOSS_STEPS"


@dataclasses.dataclass(frozen=True)
class QualityGates:
    target_map: Optional[float] = None  # None: train every epoch
    max_non_finite_steps: int = 1  # 1: the first NaN/inf loss fails the run

    def target_reached(self, validation_map: Optional[float]) -> bool:
        return self.target_map is not None and validation_map is not None and validation_map >= self.target_map


def gates_from_env(environ: Optional[Mapping[str, str]] = None) -> QualityGates:
    """The gates this process runs with; a value that is not accepted is one line naming the variable."""
    environ = os.environ if environ is None else environ
    target, steps = environ.get(TARGET_MAP_ENV, "").strip(), environ.get(MAX_NON_FINITE_STEPS_ENV, "").strip()
    target_map = None
    if target:
        try:
            target_map = float(target)
        except ValueError:
            target_map = math.nan
        if not 0.0 <= target_map <= 1.0:
            raise UsageError(f"{TARGET_MAP_ENV}: {target!r} is not accepted; accepted: a mAP from 0 to 1")
    max_steps = 1
    if steps:
        if not steps.isdigit() or int(steps) < 1:
            raise UsageError(f"{MAX_NON_FINITE_STEPS_ENV}: {steps!r} is not accepted; accepted: an integer >= 1")
        max_steps = int(steps)
    return QualityGates(target_map=target_map, max_non_finite_steps=max_steps)
