"""Where each task writes: `{task}.results_dir` if set, else `{results_dir}/{task}` (TAO's layout)."""
from __future__ import annotations

import os

from ..config.loader import SpecError
from ..config.schema import ExperimentConfig


def task_results_dir(spec: ExperimentConfig, task: str) -> str:
    section = getattr(spec, task, None)
    own = getattr(section, "results_dir", None) if section is not None else None
    if own:
        return own
    if not spec.results_dir:
        raise SpecError(f"results_dir: not set; pass -r RESULTS_DIR or set results_dir (or {task}.results_dir)")
    return os.path.join(spec.results_dir, task) if "://" not in spec.results_dir else f"{spec.results_dir.rstrip('/')}/{task}"
