"""The newcomer's path (issue 19): the scripts run the interpreter they install into, the example
trains on what convert wrote, the first run is quiet, and the outputs read well."""
from __future__ import annotations

import fnmatch
import os
import re
import site
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
SPEC = os.path.join(ROOT, "examples", "tiny", "spec.yaml")


def _executable(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture
def poisoned_path(tmp_path) -> str:
    """PATH whose first folder has a `deformable-detr` and a `python3` that fail loudly if called."""
    bare = tmp_path / "bare-bin"
    for name in ("deformable-detr", "python3"):
        _executable(bare / name, f"#!/bin/sh\necho 'bare {name} called' >&2\nexit 97\n")
    return f"{bare}{os.pathsep}{os.environ['PATH']}"


def test_run_example_uses_only_the_given_interpreter(tmp_path, poisoned_path):
    """The whole script, with a recording stand-in for a not-activated venv's python, given relative."""
    log = tmp_path / "calls.log"
    _executable(tmp_path / "venv" / "bin" / "python", f'#!/bin/sh\necho "$0 $*" >> {log}\nexit 0\n')
    env = {**os.environ, "PATH": poisoned_path, "PYTHON": "venv/bin/python", "EPOCHS": "1"}
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "run_example.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "bare" not in result.stderr
    calls = log.read_text().splitlines()
    python = str(tmp_path / "venv" / "bin" / "python")
    assert all(call.startswith(python + " ") for call in calls), calls
    commands = [call[len(python) + 1:] for call in calls]
    assert commands[0].startswith("-m pip install") and "-e ./trainer" in commands[0]
    tasks = [c.split()[2] for c in commands if c.startswith("-m deformable_detr ")]
    assert tasks == ["make-example-data", "convert", "train", "evaluate", "inference", "export"]
    assert commands[-1].startswith("- examples/tiny/spec.yaml")  # the onnxruntime check


def test_a_missing_interpreter_is_one_line(tmp_path):
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "run_example.sh")], cwd=tmp_path,
                            env={**os.environ, "PYTHON": "nope/bin/python"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"PYTHON=nope/bin/python: no such interpreter (relative to {tmp_path})"


def test_command_resolution_with_a_real_venv_that_is_not_activated(tmp_path, poisoned_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The new venv sees the packages of the interpreter running the tests (itself a venv or not, editable
    # installs included): a .pth line that adds those folders as site folders, so their own .pth files run too.
    # --system-site-packages would see only the base interpreter's.
    (site_packages,) = venv.glob("lib/python*/site-packages")
    dirs = ", ".join(repr(d) for d in site.getsitepackages())
    (site_packages / "tests-parent.pth").write_text(f"import site; list(map(site.addsitedir, ({dirs},)))\n")
    script = f'source {SCRIPTS}/python-env.sh && "$PY" -c "import sys; print(sys.prefix)" && ddetr default-spec train'
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PATH": poisoned_path, "PYTHON": "venv/bin/python"})
    assert result.returncode == 0, result.stderr
    prefix, first = result.stdout.splitlines()[:2]
    assert prefix == str(venv)
    assert first.startswith("# Deformable DETR experiment spec for train")


def test_install_script_uses_the_given_interpreter(tmp_path, poisoned_path):
    log = tmp_path / "calls.log"
    python = _executable(tmp_path / "py" / "python", f'#!/bin/sh\necho "$*" >> {log}\nexit 0\n')
    result = subprocess.run(["bash", os.path.join(SCRIPTS, "install.sh")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PATH": poisoned_path, "PYTHON": python})
    assert result.returncode == 0 and "bare" not in result.stderr, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0].startswith("-m pip install") and calls[0].endswith("-e ./trainer")
    # test.sh (which also sets up system tools, not run here) goes through the same resolution.
    test_sh = open(os.path.join(SCRIPTS, "test.sh")).read()
    assert 'source "$(dirname "$0")/python-env.sh"' in test_sh and '"$PY" -m pytest' in test_sh


def test_the_test_run_stops_first_when_the_disk_is_too_full(tmp_path):
    """scripts/test.sh checks the free space before pytest: one line naming the folder and the bar."""
    script = os.path.join(SCRIPTS, "check-free-disk.sh")
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "DDETR_REAL_NODE_CACHE": str(tmp_path / "cache")}
    free_gb = int(subprocess.run(["df", "-P", "-k", str(tmp_path)], capture_output=True, text=True,
                                 check=True).stdout.splitlines()[1].split()[3]) // 1048576
    run = lambda bar: subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,  # noqa: E731
                                     env={**env, "MIN_FREE_GB": bar})
    # A GB of slack each way: other work on the machine may write or free some meanwhile.
    enough, short, bad = run(str(max(free_gb - 1, 0))), run(str(free_gb + 2)), run("ten")
    assert enough.returncode == 0 and enough.stderr == "", enough.stderr
    assert short.returncode == 1
    assert re.fullmatch(rf"check-free-disk: only (?:{free_gb - 1}|{free_gb}|{free_gb + 1}) GB free on the disk holding "
                        rf"{re.escape(str(tmp_path / 'tmp'))}; the tests need at least {free_gb + 2} GB \(MIN_FREE_GB\)\n",
                        short.stderr), short.stderr
    assert bad.returncode == 2 and bad.stderr.strip() == "check-free-disk: MIN_FREE_GB=ten: expected a whole number of GB"
    test_sh = open(os.path.join(SCRIPTS, "test.sh")).read()
    assert test_sh.index("bash scripts/check-free-disk.sh") < test_sh.index('"$PY" -m pytest')


# ------------------------------------------------------------- the example itself

def test_example_trains_on_the_shards_convert_writes():
    from deformable_detr.config.loader import load_spec
    from deformable_detr.data.shards import shard_file_name

    spec = load_spec(SPEC)
    (train,) = spec.dataset.train_data_sources
    sources = ["train", "val"]  # what make-example-data lists in kitti/sources.txt
    written = [os.path.join(spec.results_dir, "convert", source,
                            shard_file_name(source, 0, spec.convert.num_partitions, shard,
                                            spec.convert.num_shards))
               for source in sources for shard in range(spec.convert.num_shards)]
    matched = [path for path in written if fnmatch.fnmatch(path, train.json_file)]
    assert matched == written[:spec.convert.num_shards]  # all the training shards, none of val's
    assert train.image_dir == "example_data/kitti"  # the shards name files as train/images/<file>, as TAO's


def test_readme_states_the_example_defaults():
    script = open(os.path.join(SCRIPTS, "run_example.sh")).read()
    epochs = int(re.search(r"EPOCHS=\$\{EPOCHS:-(\d+)\}", script).group(1))
    threshold = yaml.safe_load(open(SPEC))["inference"]["conf_threshold"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"for {epochs} epochs" in readme
    assert f"scores of at least {threshold}" in readme


# ------------------------------------------------------------- quiet first run

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the warning is for machines without CUDA")
def test_kernel_build_does_not_print_about_cuda_on_a_cpu(tmp_path):
    code = "from deformable_detr.ops.kernels import quiet_cpp_extension; print(quiet_cpp_extension().CUDA_HOME)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path)  # torch did look
    assert "CUDA" not in result.stderr


# ------------------------------------------------------------- outputs

def test_onnx_has_a_static_query_axis_and_a_batch_axis_named_batch():
    import onnx
    import torch

    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.export.onnx_export import export_to_bytes
    from deformable_detr.model import build_model

    model_spec = {"backbone": "resnet_18", "num_queries": 7, "num_feature_levels": 1, "return_interm_indices": [3],
                  "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1, "dim_feedforward": 64,
                  "enc_n_points": 2, "dec_n_points": 2}
    torch.manual_seed(0)
    model, _, _ = build_model(spec_from_dict({"model": model_spec, "dataset": {"num_classes": 3}}))
    data = export_to_bytes(model.eval(), batch_size=-1, channels=3, height=64, width=64, opset=17, plugin=False)
    graph = onnx.load_from_string(data).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(graph.input) + list(graph.output)}
    assert shapes == {"inputs": ["batch", 3, 64, 64], "pred_logits": ["batch", 7, 3], "pred_boxes": ["batch", 7, 4]}


def test_tags_stay_inside_the_image_and_apart():
    from deformable_detr.data.visualize import place_tags

    width, height = 128, 96
    boxes = [(0, 0, 40, 30), (2, 2, 44, 34), (100, 80, 127, 95), (60, 0, 127, 95), (-5, 90, 10, 95)]
    sizes = [(50, 12)] * len(boxes)
    tags = place_tags(boxes, sizes, width, height)
    for x1, y1, x2, y2 in tags:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert tags[0] != tags[1]  # two boxes at the same corner: the second tag goes elsewhere
    assert tags[0][1] == 0  # no room above the first box: inside its top edge
    assert tags[2][2] <= width  # a box at the right edge: its tag is shifted left


def test_drawn_tags_keep_their_text_readable():
    """Two overlapping boxes: each tag is a filled block that no other tag or box line crosses."""
    from PIL import Image

    from deformable_detr.data.visualize import Detection, draw_detections

    image = Image.new("RGB", (128, 128), (0, 0, 0))
    colors = {"circle": (255, 0, 0), "square": (0, 0, 255)}
    detections = [Detection("circle", (10, 2, 70, 60), 0.9), Detection("square", (12, 4, 72, 62), 0.8)]
    drawn = draw_detections(image, detections, colors)
    pixels = drawn.load()
    red = sum(pixels[x, y] == (255, 0, 0) for x in range(128) for y in range(128))
    blue = sum(pixels[x, y] == (0, 0, 255) for x in range(128) for y in range(128))
    # Each tag's block (about 60 x 12 px) is drawn whole: far more than the box outlines alone.
    assert red > 400 and blue > 400
