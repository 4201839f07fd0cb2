"""The images' dependency locks (locks/*.txt, written by locks/generate.py) against the pyproject files
they are resolved from, and the Dockerfiles installing from them with hashes required."""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("locks_generate", REPO / "locks" / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

# Where the images run: Debian's 3.11 (the stand-ins built here), Ubuntu 24.04's / python:3.12-slim's 3.12.
TARGETS = [{"python_version": v, "python_full_version": f"{v}.0", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "os_name": "posix", "extra": ""} for v in ("3.11", "3.12")]


def parse_lock(text: str) -> list[tuple[str, str, str, list[str]]]:
    """(name, version, marker, hashes) for each pin of a uv/pip-compile lock."""
    entries, current = [], None
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line[0].isspace():
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)\s*(?:;\s*(.*?))?\s*\\?", line.strip())
            assert match, f"not an exact pin: {line!r}"
            current = (canonicalize_name(match.group(1)), match.group(2), match.group(3) or "", [])
            entries.append(current)
        else:
            for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
                current[3].append(digest)
    return entries


def pins_for(entries, environment) -> dict[str, str]:
    return {name: version for name, version, marker, _ in entries if not marker or Marker(marker).evaluate(environment)}


@pytest.mark.parametrize("lock", generate.LOCK_NAMES)
def test_lock_was_generated_from_the_current_pyproject_inputs(lock):
    assert generate.recorded_digest(lock) == generate.input_digest(lock), (
        f"locks/{lock}.txt does not match the pyproject.toml dependencies; run: python3 locks/generate.py")


@pytest.mark.parametrize("lock", generate.LOCK_NAMES)
def test_every_input_is_pinned_with_hashes_to_a_version_it_accepts(lock):
    entries = parse_lock((REPO / "locks" / f"{lock}.txt").read_text())
    assert entries and all(hashes for _, _, _, hashes in entries), f"locks/{lock}.txt: a pin without hashes"
    own = generate.inputs(lock)
    if lock == "trainer-cuda-build":  # only the compiler's wheels are kept from the joint resolution
        own = [line for line in own if canonicalize_name(Requirement(line).name).startswith("nvidia-")]
    for environment in TARGETS:
        pins = pins_for(entries, environment)
        for line in own:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"locks/{lock}.txt pins no {name} for Python {environment['python_version']}"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"locks/{lock}.txt pins {name}=={pins[name]}, pyproject wants {requirement.specifier}")


def test_the_cuda_compiler_matches_torchs_cuda_runtime():
    trainer = pins_for(parse_lock((REPO / "locks" / "trainer.txt").read_text()), TARGETS[0])
    cuda = pins_for(parse_lock((REPO / "locks" / "trainer-cuda-build.txt").read_text()), TARGETS[0])
    runtime = trainer["nvidia-cuda-runtime"].split(".")[:2]
    for name in ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-cccl"):
        assert cuda[name].split(".")[:2] == runtime, f"{name}=={cuda[name]} but torch's CUDA runtime is {'.'.join(runtime)}"


def test_a_changed_pyproject_makes_the_lock_stale(tmp_path):
    """The check above can fail: bump one dependency in a copy of the pyproject files."""
    for package in ("trainer", "operator"):
        (tmp_path / package).mkdir()
        shutil.copy(REPO / package / "pyproject.toml", tmp_path / package / "pyproject.toml")
    assert generate.input_digest("operator", tmp_path) == generate.recorded_digest("operator")
    text = (tmp_path / "operator" / "pyproject.toml").read_text()
    (tmp_path / "operator" / "pyproject.toml").write_text(text.replace('"kopf>=', '"kopf>=99', 1))
    assert generate.input_digest("operator", tmp_path) != generate.recorded_digest("operator")
    assert generate.input_digest("trainer", tmp_path) == generate.recorded_digest("trainer")


@pytest.mark.parametrize("dockerfile,locks", [("Dockerfile.trainer", ["trainer.txt"]), ("Dockerfile.operator", ["operator.txt"])])
def test_dockerfiles_install_dependencies_only_from_the_locks_with_hashes(dockerfile, locks):
    text = (REPO / dockerfile).read_text()
    installs = re.findall(r"pip install ([^\n&]*)", text)
    for lock in locks:
        assert f"pip install --require-hashes -r /tmp/locks/{lock}" in text
        assert f"COPY locks/{lock} /tmp/locks/" in text
    for words in installs:  # anything else is the project's own packages, without their dependencies
        assert "--require-hashes" in words or "--no-deps" in words, f"{dockerfile}: pip install {words}"
