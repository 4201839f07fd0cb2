"""Write the images' Python dependency locks from the packages' own metadata on PyPI.

    python3 locks/generate.py            # rewrite every lock
    python3 locks/generate.py --check    # exit 1 naming the lock whose inputs no longer match

Each lock pins every package an image installs (the whole dependency tree, exact versions, the
sha256 of every file of that version) for Python 3.11 and newer on every platform (uv's universal
resolution), so `pip install --require-hashes -r locks/<name>.txt` installs the same files on
Debian's Python 3.11 (the stand-in bases built here) and on Ubuntu 24.04's or python:3.12-slim's
3.12 (the registry bases). The inputs come from the pyproject files:

    trainer.txt             trainer/pyproject.toml dependencies + the extras the image carries
                            (IMAGE_EXTRAS: TensorBoard's writer, so jobs write curves) + its build-system requires
    trainer-cuda-build.txt  the trainer's `cuda-build` extra (nvcc, nvvm, crt, CCCL: the build stage's
                            CUDA compiler where the base image has none)
    operator.txt            operator/pyproject.toml dependencies less the trainer package, plus what the
                            trainer modules the operator imports need (TRAINER_FOR_OPERATOR), plus the
                            build-system requires

Each lock's first lines name its inputs and their sha256 (`input-sha256`); tests/images/test_locks.py
fails when a pyproject no longer gives the same inputs, or a pin no longer satisfies them.
uv (pinned below) resolves, keeping a lock's existing pins where they still fit (a new input adds
its own tree without moving the rest); it is installed into ${DDETR_TOOLS_DIR:-~/.cache/ddetr-tools}/uv.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
UV_VERSION = "0.13.9"
PYTHON_MIN = "3.11"
# The operator imports deformable_detr.config and .storage (installed with --no-deps): these of the
# trainer's dependencies are what those modules import.
TRAINER_FOR_OPERATOR = ("boto3", "pyyaml")
# The trainer's optional extras its image installs: jobs on a cluster write TensorBoard event files.
IMAGE_EXTRAS = ("tensorboard",)


def _pyproject(package: str, repo: Path = REPO) -> dict:
    return tomllib.loads((repo / package / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement
    return Requirement(requirement).name.lower().replace("_", "-")


def inputs(lock: str, repo: Path = REPO) -> list[str]:
    """The requirement lines a lock is resolved from (the pyproject files under `repo`), in a fixed order."""
    trainer = _pyproject("trainer", repo)
    if lock == "trainer":
        extras = trainer["project"]["optional-dependencies"]
        lines = (trainer["project"]["dependencies"] + [r for extra in IMAGE_EXTRAS for r in extras[extra]]
                 + trainer["build-system"]["requires"])
    elif lock == "trainer-cuda-build":
        lines = trainer["project"]["optional-dependencies"]["cuda-build"]
        # Resolved together with the trainer's own (the same CUDA runtime as torch's), kept alone below.
        return sorted(dict.fromkeys(line.strip() for line in lines)) + inputs("trainer", repo)
    elif lock == "operator":
        operator = _pyproject("operator", repo)
        own = [r for r in operator["project"]["dependencies"] if _name(r) != "deformable-detr"]
        have = {_name(r) for r in own}
        borrowed = [r for r in trainer["project"]["dependencies"]
                    if _name(r) in TRAINER_FOR_OPERATOR and _name(r) not in have]
        lines = own + borrowed + operator["build-system"]["requires"]
    else:
        raise KeyError(lock)
    return sorted(dict.fromkeys(line.strip() for line in lines))


LOCK_NAMES = ("trainer", "trainer-cuda-build", "operator")


def input_digest(lock: str, repo: Path = REPO) -> str:
    return hashlib.sha256("\n".join(inputs(lock, repo)).encode()).hexdigest()


def header(lock: str) -> str:
    lines = [f"# {lock}.txt: written by `python3 locks/generate.py` (uv {UV_VERSION}, universal, Python >= {PYTHON_MIN}); do not edit.",
             f"# input-sha256: {input_digest(lock)}"]
    lines += [f"# input: {line}" for line in inputs(lock)]
    return "\n".join(lines) + "\n"


def recorded_digest(lock: str, locks: Path = LOCKS) -> str | None:
    path = locks / f"{lock}.txt"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("# input-sha256: "):
            return line.split(": ", 1)[1].strip()
    return None


def _only(lock_text: str, names: set[str]) -> str:
    """The entries (a pin at column 0 and its indented hash lines) of `lock_text` for `names`."""
    kept, keep = [], False
    for line in lock_text.splitlines():
        if line and not line[0].isspace():
            keep = _name(line.split(";")[0].split("==")[0].strip()) in names
        if keep:
            kept.append(line)
    return "\n".join(kept) + "\n"


def _uv() -> Path:
    tools = Path(os.environ.get("DDETR_TOOLS_DIR") or Path.home() / ".cache" / "ddetr-tools")
    venv = tools / "uv"
    uv = venv / "bin" / "uv"
    probe = subprocess.run([str(uv), "--version"], capture_output=True, text=True) if uv.exists() else None
    if probe is None or probe.returncode != 0 or UV_VERSION not in probe.stdout:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}"], check=True)
    return uv


def generate(lock: str) -> None:
    uv = _uv()
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "requirements.in"
        source.write_text("\n".join(inputs(lock)) + "\n")
        out = Path(work) / "lock.txt"
        if (LOCKS / f"{lock}.txt").exists():  # uv prefers the pins of an existing output file
            out.write_text((LOCKS / f"{lock}.txt").read_text())
        command = [str(uv), "pip", "compile", str(source), "--output-file", str(out), "--universal",
                   "--python-version", PYTHON_MIN, "--generate-hashes", "--no-header", "--no-annotate",
                   "--quiet"]
        # Only PyPI's own metadata: no local wheel folder or extra index of this machine.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"locks/generate.py: uv could not resolve {lock}: {result.stderr.strip()[-2000:]}")
        text = out.read_text()
        if lock == "trainer-cuda-build":  # only the compiler's wheels: the rest is trainer.txt
            text = _only(text, {_name(r) for r in _pyproject("trainer")["project"]["optional-dependencies"]["cuda-build"]})
        (LOCKS / f"{lock}.txt").write_text(header(lock) + text)
    print(f"wrote locks/{lock}.txt")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that each lock's inputs are current")
    parser.add_argument("locks", nargs="*", help=f"which locks: {', '.join(LOCK_NAMES)} (default: all)")
    args = parser.parse_args()
    names = args.locks or list(LOCK_NAMES)
    unknown = sorted(set(names) - set(LOCK_NAMES))
    if unknown:
        parser.error(f"no lock named {', '.join(unknown)}; the locks are {', '.join(LOCK_NAMES)}")
    if args.check:
        stale = [n for n in names if recorded_digest(n) != input_digest(n)]
        for name in stale:
            print(f"locks/{name}.txt is stale: its inputs changed in a pyproject.toml; run python3 locks/generate.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for name in names:
        generate(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
