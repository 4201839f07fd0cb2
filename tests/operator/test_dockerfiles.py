"""The Dockerfiles, read: lint them with hadolint, and check that every path, module, function and
command they name exists in the repository (or in the packages they install), and that they keep
their promises (stages, kernel archs, non-root user, entrypoints, ports matching the chart). The
images themselves are built and run by tests/images/."""
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
        value = re.sub(r"^(\s*--mount=\S+\s+)+", "", value)  # RUN --mount=... flags, not the command
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
            if choices and value and not value.startswith("$"):  # a build argument: checked where it is set
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


def _global_args(name: str) -> dict[str, str]:
    """The ARGs before the first FROM (the base images), with their defaults."""
    args = {}
    for instruction in _instructions(name):
        if instruction["instruction"] == "FROM":
            break
        if instruction["instruction"] == "ARG":
            key, _, value = shlex.split(instruction["value"])[0].partition("=")
            args[key] = value
    return args


def _named_stages(name: str) -> dict[str, list[dict]]:
    return {stage[0]["value"].split()[-1]: stage for stage in _stages(name)}


def _args(instructions: list[dict]) -> dict[str, str]:
    return dict(shlex.split(v)[0].partition("=")[::2] for v in _values(instructions, "ARG"))


def test_trainer_image_builds_the_kernels_for_the_usual_archs_and_runs_non_root():
    stages = _named_stages("trainer")
    assert list(stages) == ["deps", "kernels", "app", "runtime"]
    bases = _global_args("trainer")
    # The defaults are what a user with a registry builds from; scripts/build-images.sh passes stand-ins.
    assert bases["BUILD_BASE"] == "nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU_FLAVOUR}"
    assert bases["RUNTIME_BASE"] == "nvidia/cuda:${CUDA_VERSION}-base-${UBUNTU_FLAVOUR}"
    assert stages["deps"][0]["value"] == "${BUILD_BASE} AS deps"
    assert stages["runtime"][0]["value"] == "${RUNTIME_BASE} AS runtime", "the runtime stage must not carry the CUDA toolchain"
    assert stages["kernels"][0]["value"] == stages["app"][0]["value"].replace("app", "kernels") == "deps AS kernels"
    kernel_args = _args(stages["kernels"])
    assert kernel_args["TORCH_CUDA_ARCH_LIST"] == USUAL_ARCHS and kernel_args["KERNELS"] == "all"
    kernel_env = _env(stages["kernels"])
    assert kernel_env["TORCH_CUDA_ARCH_LIST"] == "${TORCH_CUDA_ARCH_LIST}"
    # Kernels compiled into TORCH_EXTENSIONS_DIR in the kernels stage are what the runtime loads.
    extensions_dir = kernel_env["TORCH_EXTENSIONS_DIR"]
    assert _env(stages["runtime"])["TORCH_EXTENSIONS_DIR"] == extensions_dir
    copied = [shlex.split(v) for v in _values(stages["runtime"], "COPY")]
    assert copied == [["--from=deps", "/opt/venv", "/opt/venv"], ["--from=kernels", extensions_dir, extensions_dir],
                      ["--from=app", "/opt/app", "/opt/app"]], "the runtime takes the venv, the kernels and the package"
    assert ["python", "-m", "deformable_detr.ops.build", "--kind", "$KERNELS"] in _run_segments(stages["kernels"]), (
        "the kernels stage must compile the kernels KERNELS names")
    # Where the base has no nvcc, the compiler comes from the same script and lock as the test set-up's.
    assert any("CUDA_WHEELS_LOCK=/tmp/cuda/trainer-cuda-build.txt bash /tmp/cuda/cuda-home-from-pypi.sh" in run
               for run in _values(stages["kernels"], "RUN"))
    assert any("is_built(k)" in s for s in (w[2] for w in _run_segments(stages["runtime"]) if w[:2] == ["python", "-c"]))
    user = _values(stages["runtime"], "USER")[-1]
    assert re.fullmatch(r"[1-9][0-9]*:[0-9]+", user), "a numeric non-root uid:gid (runAsNonRoot needs a number)"
    assert _values(stages["runtime"], "ENTRYPOINT") == ['["deformable-detr"]']
    assert "deformable-detr" in _console_scripts(REPO / "trainer" / "pyproject.toml")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_version_label_default_is_the_packages_version(name):
    version = tomllib.loads((REPO / "trainer" / "pyproject.toml").read_text())["project"]["version"]
    runtime = _stages(name)[-1]
    assert _args(runtime)["VERSION"] == version
    assert 'org.opencontainers.image.version="${VERSION}"' in " ".join(_values(runtime, "LABEL"))


def test_trainer_image_has_the_commands_the_operator_runs_in_it():
    """render.py runs `/bin/sh -c '... python3 ... deformable-detr train ...'` in this image (the CLI then
    starts torchrun, `python -m torch.distributed.run`, itself)."""
    render = pytest.importorskip("ddetr_operator.render", reason="the operator package is not installed")
    api = pytest.importorskip("ddetr_operator.api")
    job = {"metadata": {"name": "demo", "namespace": "default", "uid": "1"},
           "spec": {"image": "trainer", "nodes": 2, "experiment": {}}}
    command = render.render_worker_job(api.resolve(job), attempt=0)["spec"]["template"]["spec"]["containers"][0]["command"]
    script = command[-1]
    assert command[0] == "/bin/sh"
    assert re.search(r"\bpython3 -c\b", script) and re.search(r"\bexec deformable-detr train\b", script)
    assert importlib.util.find_spec("torch.distributed.run"), "the CLI's launcher runs python -m torch.distributed.run"
    # The venv is first on PATH, so python3/torchrun resolve to it (deformable-detr is in /opt/app/bin).
    assert _env(_stages("trainer")[-1])["PATH"].startswith("/opt/venv/bin:/opt/app/bin:")


def test_operator_image_runs_the_operator_non_root_on_the_charts_ports():
    stages = _named_stages("operator")
    assert list(stages) == ["build", "runtime"]
    assert "slim" in _global_args("operator")["PYTHON_BASE"]
    stage = stages["runtime"]
    assert _values(stage, "ENTRYPOINT") == ['["ddetr-operator"]']
    assert "ddetr-operator" in _console_scripts(REPO / "operator" / "pyproject.toml")
    assert re.fullmatch(r"[1-9][0-9]*:[0-9]+", _values(stage, "USER")[-1])
    exposed = {int(port) for value in _values(stage, "EXPOSE") for port in value.split()}
    chart_values = yaml.safe_load((REPO / "charts" / "deformable-detr-operator" / "values.yaml").read_text())
    assert exposed == {chart_values["operator"]["healthPort"], chart_values["operator"]["metricsPort"]}
    # torch stays out of the operator image: the trainer package goes in without its dependencies.
    installs = [w for w in _run_segments(stages["build"]) if w[:2] == ["pip", "install"]]
    local = [w for w in installs if any(word.startswith("./") for word in w)]
    assert local == [["pip", "install", "--no-deps", "--no-build-isolation", "--no-cache-dir", "./trainer", "./operator"]]
    assert [shlex.split(v) for v in _values(stage, "COPY")] == [["--from=build", "/opt/venv", "/opt/venv"]]


HADOLINT = find_tool("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="no hadolint (scripts/test-deps.d/helm.sh installs it from PyPI)")
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, "--config", str(REPO / ".hadolint.yaml"), "--no-color",
                             *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
