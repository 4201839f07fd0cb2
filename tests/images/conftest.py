"""The images, built (or found up to date) once per session by scripts/build-images.sh."""
from __future__ import annotations

import time

import pytest

import imagetools


@pytest.fixture(scope="session")
def images() -> dict:
    """OPERATOR_IMAGE, TRAINER_IMAGE, OPERATOR_ARCHIVE, TRAINER_ARCHIVE, plus the run's output and time.
    The test set-up (scripts/test-deps.d/zz-images.sh) built them with the CUDA kernel; here the same
    command finds them up to date unless an input changed since (then it rebuilds what changed)."""
    missing = imagetools.tools_missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/test-deps.d/zz-images.sh installs the image tools)")
    start = time.monotonic()
    result = imagetools.build(env={"KERNELS": "all"})
    if result.returncode != 0:
        pytest.fail(f"scripts/build-images.sh failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    outputs = imagetools.parse_outputs(result.stdout)
    return {**outputs, "stdout": result.stdout, "stderr": result.stderr, "seconds": time.monotonic() - start}
