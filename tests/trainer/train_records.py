"""What a training run left in its results folder, read raw for the tests' assertions."""
from __future__ import annotations

import json
import os
from typing import Any

from deformable_detr.runtime.status_file import STATUS_NAME
from deformable_detr.runtime.training_log import LOG_NAME


def read_status(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, STATUS_NAME), encoding="utf-8") as fh:
        return json.load(fh)


def read_log(folder: str) -> list[dict[str, Any]]:
    with open(os.path.join(folder, LOG_NAME), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
