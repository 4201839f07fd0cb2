"""A debug record of which images each rank trained on, step by step: to check that a run stopped
and resumed (at the same or another world size) read the same samples as one never stopped.

Off unless DDETR_SAMPLE_RECORD names a folder; each rank then appends one JSON line per optimizer
step to `<folder>/rank<r>.jsonl`: {"epoch", "step", "world_size", "image_ids"}.
"""
from __future__ import annotations

import json
import os
from typing import Optional

FOLDER_ENV = "DDETR_SAMPLE_RECORD"


class SampleRecord:
    def __init__(self, rank: int, world_size: int) -> None:
        folder = os.environ.get(FOLDER_ENV)
        self.path: Optional[str] = os.path.join(folder, f"rank{rank}.jsonl") if folder else None
        self.world_size = world_size
        if folder:
            os.makedirs(folder, exist_ok=True)

    def step(self, epoch: int, step: int, targets: list[dict]) -> None:
        if self.path is None:
            return
        ids = [int(t["image_id"]) for t in targets]
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"epoch": epoch, "step": step, "world_size": self.world_size,
                                  "image_ids": ids}) + "\n")
