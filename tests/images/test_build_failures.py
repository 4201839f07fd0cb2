"""scripts/build-images.sh fails loudly: a Dockerfile that does not build, or a bad argument, ends the
script non-zero with one line naming what failed, and tags nothing."""
from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

import imagetools
from imagetools import REPO

pytestmark = pytest.mark.timeout(1800)

CONTEXT = [".dockerignore", "Dockerfile.operator", "locks", "trainer/pyproject.toml", "trainer/README.md",
           "trainer/deformable_detr", "operator/pyproject.toml", "operator/ddetr_operator"]


@pytest.fixture
def context_copy(tmp_path):
    """A copy of the files the operator image is built from."""
    missing = imagetools.tools_missing()
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (scripts/test-deps.d/zz-images.sh installs the image tools)")
    context = tmp_path / "context"
    for path in CONTEXT:
        source, target = REPO / path, context / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(source, target)
    return context


@pytest.fixture
def broken_context(context_copy):
    context = context_copy
    dockerfile = context / "Dockerfile.operator"
    text = dockerfile.read_text()
    assert "RUN python3 -m venv /opt/venv" in text
    # The first RUN of the build stage: it fails within seconds, on top of the cached base.
    dockerfile.write_text(text.replace("RUN python3 -m venv /opt/venv", "RUN python3 -m no_such_module /opt/venv", 1))
    return context


def test_a_dockerfile_that_does_not_build_fails_the_script_naming_the_step(broken_context, tmp_path):
    ref = "localhost/ddetr-test/broken-operator:1"
    result = imagetools.build("operator", env={"DDETR_IMAGES_CONTEXT": str(broken_context),
                                               "DDETR_IMAGES_DIR": str(tmp_path / "out"), "OPERATOR_IMAGE": ref},
                              timeout=1500)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("build-images: error: operator: buildah could not build Dockerfile.operator:"), last
    assert "no_such_module" in last, last
    assert "OPERATOR_IMAGE=" not in result.stdout and not (tmp_path / "out" / "operator.tar").exists()
    tagged = subprocess.run(["buildah", "inspect", "--type", "image", ref], capture_output=True,
                            env=imagetools.storage_env())
    assert tagged.returncode != 0, f"{ref} was tagged although its build failed"


def test_a_bad_kernels_argument_fails_before_building(tmp_path):
    result = imagetools.build("trainer", env={"KERNELS": "gpu", "DDETR_IMAGES_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "build-images: error: KERNELS=gpu: expected all or cpu"


def test_an_unknown_image_name_fails(tmp_path):
    result = imagetools.build("worker", env={"DDETR_IMAGES_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "build-images: error: no image named 'worker' (operator, trainer)"


def _cache_use(log: str) -> dict[str, bool]:
    """For each RUN step buildah ran, whether it came from the layer cache."""
    lines = log.splitlines()
    steps = {}
    for index, line in enumerate(lines):
        if "STEP " in line and ": RUN " in line:
            after = next((later for later in lines[index + 1:] if later.startswith("-->") or "STEP " in later), "")
            steps[line.split(": RUN ", 1)[1]] = "Using cache" in after
    return steps


def _image_ids() -> list[str]:
    listed = subprocess.run(["buildah", "images", "--all", "--quiet", "--no-trunc"], capture_output=True, text=True,
                            env=imagetools.storage_env(), check=True)
    return listed.stdout.split()


def test_a_source_edit_rebuilds_only_the_layers_after_the_source_copy(context_copy, tmp_path):
    """The operator image (small: cheap to rebuild) from a context whose operator source differs from
    the repository's by one line: the locked dependencies come from the layer cache, the package
    install runs again."""
    context = context_copy
    main = context / "operator" / "ddetr_operator" / "__main__.py"
    # A line no earlier run wrote: a fixed one is in the layer cache from the previous run.
    main.write_text(main.read_text() + f"\n# edited by tests/images/test_build_failures.py, run {uuid.uuid4().hex}\n")
    ref = "localhost/ddetr-test/edited-operator:1"
    before = _image_ids()
    result = imagetools.build("operator", env={"DDETR_IMAGES_CONTEXT": str(context),
                                               "DDETR_IMAGES_DIR": str(tmp_path / "out"), "OPERATOR_IMAGE": ref},
                              timeout=1500)
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        steps = _cache_use(result.stderr)
        locked = [cached for step, cached in steps.items() if "--require-hashes -r /tmp/locks/operator.txt" in step]
        package = [cached for step, cached in steps.items() if "./trainer ./operator" in step]
        assert locked == [True], f"the locked dependencies were installed again: {steps}"
        assert package == [False], f"the edited package was not reinstalled: {steps}"
    finally:
        # The layers this run made can never be reused (its edit is unique): remove them, the newest first.
        subprocess.run(["buildah", "rmi", ref], capture_output=True, env=imagetools.storage_env())
        for image in reversed(_image_ids()):
            if image not in before:
                subprocess.run(["buildah", "rmi", image], capture_output=True, env=imagetools.storage_env())
