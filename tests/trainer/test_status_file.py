"""The status.json format's one home: written, parsed and read the same way by trainer and operator."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from deformable_detr.runtime.status_file import (STATUS_FIELDS, STATUS_NAME, TrainStatus, parse_status, read_status,
                                                 write_status)


def test_written_status_parses_back(tmp_path):
    status = TrainStatus(num_epochs=4, epoch=2, epochs_completed=2, epoch_index=1, step=40, last_loss=math.nan,
                         last_map=0.25, last_checkpoint="s3://b/run/train/model_epoch_001_step_00040.pth")
    write_status(str(tmp_path), status)
    raw = json.loads((tmp_path / STATUS_NAME).read_text())
    assert raw["last_loss"] is None and raw["state"] == "running" and set(raw) == set(STATUS_FIELDS)
    assert read_status(str(tmp_path)) == {k: v for k, v in raw.items() if v is not None}


def test_parse_keeps_only_known_fields_of_their_type():
    parsed = parse_status(b'{"epoch": 1, "num_epochs": true, "step": "7", "last_loss": 2, "last_map": 0.5,'
                          b' "state": "completed", "extra": 1}')
    assert parsed == {"epoch": 1, "last_loss": 2, "last_map": 0.5, "state": "completed"}
    assert parse_status(b'{"epoch": 1,') is None and parse_status("[1]") is None
    assert STATUS_FIELDS["last_loss"][0] == (int, float) and STATUS_FIELDS["last_checkpoint"][0] == (str,)


def test_unknown_state_is_refused(tmp_path):
    with pytest.raises(ValueError, match="accepted: running, completed, stopped, failed"):
        write_status(str(tmp_path), TrainStatus(num_epochs=1, state="finished"))
    assert read_status(str(tmp_path)) is None


def test_importing_it_needs_no_torch():
    """The operator reads status.json with this module, and its image has no torch."""
    code = ("import sys; import deformable_detr.runtime.status_file, deformable_detr.runtime.storage; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
