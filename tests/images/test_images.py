"""The two images as built by scripts/build-images.sh: what they hold, what they leave out, and that
what the operator and the trainer do in a cluster works inside them (read-only root, image user)."""
from __future__ import annotations

import json
import re
import tarfile
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import yaml

import imagetools
from imagetools import REPO, run_in_image

# A cold build takes tens of minutes (the set-up does it); here it is a no-op or a partial rebuild.
pytestmark = pytest.mark.timeout(3600)

VERSION = tomllib.loads((REPO / "trainer" / "pyproject.toml").read_text())["project"]["version"]
IMAGE_UID = "10001"


def _ok(result, what: str) -> str:
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _inputs(stderr: str) -> dict[str, str]:
    """The inputs hash each image was found or built with, from build-images.sh's progress lines."""
    return dict(re.findall(r"^build-images: (operator|trainer): .*?\(inputs ([0-9a-f]{12})", stderr, re.M))


def test_build_prints_the_four_lines_and_a_rebuild_with_nothing_changed_is_a_noop(images):
    assert list(imagetools.parse_outputs(images["stdout"])) == [
        "OPERATOR_IMAGE", "TRAINER_IMAGE", "OPERATOR_ARCHIVE", "TRAINER_ARCHIVE"]
    assert images["stdout"].strip().splitlines()[-4:] == [
        f"{key}={images[key]}" for key in ("OPERATOR_IMAGE", "TRAINER_IMAGE", "OPERATOR_ARCHIVE", "TRAINER_ARCHIVE")]
    previous = _inputs(images["stderr"])
    assert set(previous) == {"operator", "trainer"}, images["stderr"][-2000:]
    # On a shared working tree another commit or edit may land between two runs: a rebuild is then
    # right, but only with other inputs; the run after it must do nothing.
    for _ in range(3):
        start = time.monotonic()
        again = imagetools.build(env={"KERNELS": "all"})
        seconds = time.monotonic() - start
        assert again.returncode == 0, again.stderr[-3000:]
        assert imagetools.parse_outputs(again.stdout) == imagetools.parse_outputs(images["stdout"])
        keys = _inputs(again.stderr)
        rebuilt = [name for name in keys if f"build-images: {name}: building" in again.stderr]
        if not rebuilt:
            assert again.stderr.count("nothing to do") == 2, again.stderr
            assert seconds < 60, f"a run with nothing changed took {seconds:.0f} s"
            return
        for name in rebuilt:
            assert keys[name] != previous[name], f"{name} was rebuilt although its inputs did not change:\n{again.stderr[-3000:]}"
        previous = keys
    pytest.fail("the images' inputs changed during each of three runs")


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_archives_are_docker_archives_of_the_tagged_images(images, name):
    ref = images[f"{name.upper()}_IMAGE"]
    with tarfile.open(images[f"{name.upper()}_ARCHIVE"]) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))
        (entry,) = manifest
        assert entry["RepoTags"] == [ref]
        config = json.load(archive.extractfile(entry["Config"]))
        assert set(entry["Layers"]) <= set(archive.getnames())
    assert config["config"]["Labels"]["org.opencontainers.image.version"] == VERSION


def test_default_references_are_what_the_chart_and_the_examples_name(images):
    """The chart's operator image (repository:appVersion) and the e2e trainer default, as a kubelet
    resolves a short name (docker.io/library/...), are the references the script tags."""
    values = yaml.safe_load((REPO / "charts" / "deformable-detr-operator" / "values.yaml").read_text())
    chart = yaml.safe_load((REPO / "charts" / "deformable-detr-operator" / "Chart.yaml").read_text())
    assert images["OPERATOR_IMAGE"] == f"docker.io/library/{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    assert images["TRAINER_IMAGE"] == f"docker.io/library/deformable-detr-trainer:{VERSION}"


@pytest.mark.parametrize("name,entrypoint,workdir", [("operator", ["ddetr-operator"], "/tmp"),
                                                     ("trainer", ["deformable-detr"], "/workspace")])
def test_image_config_user_entrypoint_workdir_labels(images, name, entrypoint, workdir):
    config = imagetools.image_config(images[f"{name.upper()}_IMAGE"])
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}", "a numeric non-root user (runAsNonRoot accepts it)"
    assert config["Entrypoint"] == entrypoint
    assert config["WorkingDir"] == workdir
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", labels["org.opencontainers.image.revision"])
    assert labels["org.opencontainers.image.source"]
    assert re.fullmatch(r"[0-9a-f]{64}", labels["io.github.ddetr.inputs"])
    if name == "trainer":
        assert labels["io.github.ddetr.kernels"] == "all", "the tests' images carry the CUDA kernel"


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_runtime_holds_no_compiler_pip_cache_or_sources_and_nothing_world_writable(images, name):
    with imagetools.mounted(images[f"{name.upper()}_IMAGE"]) as root:
        for tool in ("gcc", "g++", "cc", "c++", "nvcc", "ld"):
            for folder in ("usr/bin", "usr/local/bin", "usr/local/cuda/bin", "opt/venv/bin"):
                assert not (root / folder / tool).exists(), f"{name}: /{folder}/{tool} in the runtime image"
        for path in ("src", "root/.cache/pip", "opt/ddetr-tools", "tmp/locks", "tmp/cuda", "etc/pip.conf"):
            assert not (root / path).exists(), f"{name}: /{path} in the runtime image"
        caches = [p for p in root.glob("**/.cache/pip") if p.is_dir()]
        assert not caches, f"{name}: pip caches {caches}"
        sticky = {"tmp", "var/tmp", "run/lock", "dev/shm", "dev/mqueue"}  # world-writable by design, sticky
        writable = []
        for path in root.rglob("*"):
            if path.is_symlink() or path.relative_to(root).parts[:1] in (("proc",), ("sys",)):
                continue
            mode = path.lstat().st_mode
            if mode & 0o002 and str(path.relative_to(root)) not in sticky:
                writable.append(str(path.relative_to(root)))
        assert not writable, f"{name}: world-writable {writable[:10]}"


def test_operator_runs_its_command_imports_its_handlers_and_has_no_torch(images):
    ref = images["OPERATOR_IMAGE"]
    assert "usage" in _ok(run_in_image(ref, ["ddetr-operator", "--help"]), "ddetr-operator --help").lower()
    assert _ok(run_in_image(ref, ["ddetr-operator", "--version"]), "ddetr-operator --version").split() == [
        "ddetr-operator", VERSION]
    probe = ("import importlib.util, os, sys, ddetr_operator.handlers; "
             "assert importlib.util.find_spec('torch') is None and 'torch' not in sys.modules; "
             "print(os.getuid(), os.getgid())")
    assert _ok(run_in_image(ref, ["python", "-c", probe]), "importing the handlers").split() == [IMAGE_UID, IMAGE_UID]


def test_trainer_runs_its_command_as_the_image_user(images):
    ref = images["TRAINER_IMAGE"]
    help_text = _ok(run_in_image(ref, ["deformable-detr", "--help"]), "deformable-detr --help")
    assert "train" in help_text and "make-example-data" in help_text
    assert _ok(run_in_image(ref, ["deformable-detr", "--version"]), "deformable-detr --version").split() == [
        "deformable-detr", VERSION]


KERNEL_PROBE = textwrap.dedent("""
    import os, sys, torch
    from deformable_detr.ops import kernels
    from deformable_detr.ops.reference import ms_deform_attn_reference
    for kind in ("cpu", "cuda"):
        folder = kernels.build_directory(kind)
        assert (folder / "BUILT").exists(), f"{kind} kernel not built in {folder}"
        library = folder / (kernels.extension_name(kind) + ".so")
        assert library.stat().st_size > 0, library
        print(kind, library)
    # Loading must import the prebuilt library: no compiler exists here, and the root is read-only.
    extension = kernels.load("cpu", build_if_missing=False)
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(2, S, 2, 8, dtype=torch.float64, requires_grad=True)
    locations = torch.rand(2, 5, 2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 5, 2, 2, 3, dtype=torch.float64).softmax(-1).requires_grad_()
    ours = kernels.run_kernel(extension, value, shapes, starts, locations, weights)
    reference = ms_deform_attn_reference(value, shapes, locations, weights)
    assert torch.allclose(ours, reference, atol=1e-10), (ours - reference).abs().max()
    grads = torch.autograd.grad(ours.sum(), (value, locations, weights))
    grads_ref = torch.autograd.grad(reference.sum(), (value, locations, weights))
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-8), (a - b).abs().max()
    print("cpu kernel matches the reference", tuple(ours.shape))
""")


def test_trainer_carries_both_kernels_and_the_cpu_one_loads_without_compiling(images):
    out = _ok(run_in_image(images["TRAINER_IMAGE"], ["python", "-c", KERNEL_PROBE]), "the kernel probe")
    assert "cpu kernel matches the reference (2, 5, 16)" in out, out
    assert re.search(r"^cuda /opt/ddetr/torch_extensions/deformable_detr/msda_cuda_\w+/msda_cuda_\w+\.so$", out, re.M), out


def test_trainer_makes_example_data_and_trains_an_epoch_with_two_workers(images):
    spec = yaml.safe_load((REPO / "examples" / "tiny" / "spec.yaml").read_text())
    spec["results_dir"] = "results"
    spec["dataset"].update(workers=2, batch_size=4,
                           train_data_sources=[{"image_dir": "data/train/images", "json_file": "data/train/annotations.json"}],
                           val_data_sources=[{"image_dir": "data/val/images", "json_file": "data/val/annotations.json"}])
    spec["train"].update(num_epochs=1, checkpoint_interval=1, validation_interval=1)
    with imagetools.writable_workdir() as work:
        work = Path(work)
        (work / "spec.yaml").write_text(yaml.safe_dump(spec))
        script = ("deformable-detr make-example-data --out data --num-train 16 --num-val 4 --image-size 96"
                  " && deformable-detr train -e spec.yaml")
        result = run_in_image(images["TRAINER_IMAGE"], ["/bin/sh", "-c", script], workdir_from=work, timeout=900)
        _ok(result, "make-example-data + a 1-epoch train")
        train = work / "results" / "train"
        assert (train / "dd_model_latest.pth").exists(), sorted(p.name for p in train.iterdir())
        assert json.loads((train / "status.json").read_text())["epoch"] == 1
        log = result.stdout + result.stderr
        assert "multi-scale deformable attention on cpu: compiled cpu kernel" in log, log[-3000:]
        assert "building the CPU kernel" not in log, "the prebuilt kernel must load as it is"
