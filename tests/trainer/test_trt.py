"""The TensorRT engine runner's parts that need no GPU: input size, batching, resize, plugin
library and the exit-3 refusals. The engine itself is exercised in test_trt_engine.py (GPU)."""
from __future__ import annotations

import sys

import pytest
import torch
from torchvision import tv_tensors

from deformable_detr.cli import main
from deformable_detr.config.loader import spec_from_dict
from deformable_detr.errors import UsageError
from deformable_detr.export.trt import (PLUGIN_LIB_ENV, EngineIO, _tensorrt_import_error, batch_chunks,
                                        engine_transform, load_plugins, missing_requirements, resolve_input_size,
                                        run_in_chunks, unavailable_reasons, without_fixed_padding)

OUTPUTS = ("pred_logits", "pred_boxes")


def engine_io(min_shape, max_shape) -> EngineIO:
    return EngineIO("inputs", torch.float32, tuple(min_shape), tuple(max_shape), OUTPUTS)


FIXED_SIZE = engine_io((1, 3, 544, 960), (8, 3, 544, 960))


def test_input_size_defaults_to_the_engines():
    assert resolve_input_size(None, None, FIXED_SIZE, "evaluate") == (544, 960)
    assert resolve_input_size(960, 544, FIXED_SIZE, "evaluate") == (544, 960)
    assert resolve_input_size(960, None, FIXED_SIZE, "inference") == (544, 960)


def test_input_size_outside_the_engine_is_refused_naming_the_field():
    with pytest.raises(UsageError, match=r"inference\.input_width: 640, but the engine was built for 960"):
        resolve_input_size(640, None, FIXED_SIZE, "inference")
    with pytest.raises(UsageError, match=r"evaluate\.input_height: 512.*accepted: 544"):
        resolve_input_size(None, 512, FIXED_SIZE, "evaluate")


def test_dynamic_engine_size_must_be_given_and_in_range():
    dynamic = engine_io((1, 3, 256, 256), (4, 3, 1024, 1024))
    with pytest.raises(UsageError, match=r"evaluate\.input_height: not set, and the engine accepts 256\.\.1024"):
        resolve_input_size(None, None, dynamic, "evaluate")
    assert resolve_input_size(512, 384, dynamic, "evaluate") == (384, 512)
    with pytest.raises(UsageError, match=r"evaluate\.input_width: 2048.*256\.\.1024"):
        resolve_input_size(2048, 384, dynamic, "evaluate")


@pytest.mark.parametrize("batch, low, high, expected", [
    (10, 1, 4, [(0, 4, 4), (4, 8, 4), (8, 10, 2)]),  # dynamic: split at the profile's maximum
    (3, 1, 4, [(0, 3, 3)]),
    (3, 2, 2, [(0, 2, 2), (2, 3, 2)]),  # fixed batch 2: split, and pad the last chunk
    (1, 4, 4, [(0, 1, 4)]),  # fixed batch larger than the images: pad
    (1, 2, 8, [(0, 1, 2)]),  # below the profile's minimum: pad up to it
    (0, 1, 4, []),
])
def test_batch_chunks(batch, low, high, expected):
    chunks = batch_chunks(batch, low, high)
    assert chunks == expected
    assert sum(stop - start for start, stop, _ in chunks) == batch
    assert all(low <= run <= high for _, _, run in chunks)


def test_batch_chunks_rejects_an_empty_range():
    with pytest.raises(ValueError):
        batch_chunks(3, 4, 2)


def _per_image_heads(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs that depend on each image alone (as a detector's do), in float16 like an fp16 engine's."""
    means = images.mean(dim=(2, 3))  # [B, 3]
    return {"pred_logits": means[:, None, :].repeat(1, 5, 1).half(),
            "pred_boxes": means[:, None, :1].repeat(1, 5, 4).sigmoid().half()}


@pytest.mark.parametrize("low, high, expected_calls", [(2, 2, [2, 2, 2]), (1, 4, [4, 1]), (3, 8, [5]),
                                                       (4, 4, [4, 4])])
def test_run_in_chunks_splits_pads_and_drops_the_padding(low, high, expected_calls):
    images = torch.randn(5, 3, 8, 8) + 1.0  # nonzero means: padding (blank images) would show
    calls = []

    def run(chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        calls.append(len(chunk))
        return _per_image_heads(chunk)

    outputs = run_in_chunks(images, low, high, run)
    expected = _per_image_heads(images)
    assert calls == expected_calls
    for name in ("pred_logits", "pred_boxes"):
        assert outputs[name].dtype == torch.float32 and outputs[name].shape == expected[name].shape
        assert torch.equal(outputs[name], expected[name].float())


def test_engine_transform_resizes_exactly_and_keeps_boxes_relative_to_the_image():
    """Aspect is not kept, so normalised boxes of the resized image are those of the original."""
    aug = spec_from_dict({}).dataset.augmentation
    image = tv_tensors.Image(torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8))
    box = [8.0, 5.0, 40.0, 45.0]
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([box]), format="XYXY", canvas_size=(50, 80)),
              "labels": torch.tensor([1])}
    resized, out = engine_transform(aug, 32, 48)(image, target)
    assert tuple(resized.shape) == (3, 32, 48) and resized.dtype == torch.float32
    assert out["size"].tolist() == [32, 48]
    x1, y1, x2, y2 = box
    expected = torch.tensor([[(x1 + x2) / 2 / 80, (y1 + y2) / 2 / 50, (x2 - x1) / 80, (y2 - y1) / 50]])
    assert torch.allclose(out["boxes"], expected, atol=1e-6)


def test_fixed_padding_is_turned_off_for_engine_inputs():
    spec = spec_from_dict({"dataset": {"augmentation": {"fixed_padding": True}}})
    assert without_fixed_padding(spec).dataset.augmentation.fixed_padding is False
    assert spec.dataset.augmentation.fixed_padding is True


def test_reasons_name_what_is_missing():
    assert unavailable_reasons(None, True) == []
    assert unavailable_reasons(None, False) == ["no CUDA GPU is visible"]
    assert unavailable_reasons("the tensorrt package is not installed", True) == [
        "the tensorrt package is not installed"]
    assert len(unavailable_reasons("the tensorrt package is not installed", False)) == 2


def test_a_tensorrt_that_fails_to_import_is_reported(tmp_path, monkeypatch):
    """An installed tensorrt whose libraries do not load says so, unlike a missing package."""
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    error = _tensorrt_import_error()
    assert error.startswith("the tensorrt package does not import") and "libnvinfer.so.10" in error


def test_extra_plugin_library_must_exist_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv(PLUGIN_LIB_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(UsageError, match=f"{PLUGIN_LIB_ENV}: .*missing.so does not exist"):
        load_plugins(None)
    not_a_library = tmp_path / "plugin.so"
    not_a_library.write_text("not an ELF file")
    monkeypatch.setenv(PLUGIN_LIB_ENV, str(not_a_library))
    with pytest.raises(UsageError, match=f"{PLUGIN_LIB_ENV}: .*plugin.so does not load"):
        load_plugins(None)


def _cli_error_line(stderr: str, task: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"deformable-detr {task}:")]
    assert len(lines) == 1, stderr
    return lines[0]


needs_missing_runtime = pytest.mark.skipif(not missing_requirements(),
                                           reason="tensorrt and CUDA are both here: the engine runs instead")


@needs_missing_runtime
@pytest.mark.parametrize("task", ["evaluate", "inference"])
def test_trt_engine_without_tensorrt_or_gpu_exits_3_naming_what_is_missing(task, tiny_coco, write_spec,
                                                                          results_dir, capsys):
    section = {"trt_engine": str(results_dir / "model.engine")}
    dataset = {"num_classes": 4, "test_data_sources": tiny_coco["val"],
               "infer_data_sources": {"image_dir": [tiny_coco["val"]["image_dir"]]}}
    spec = write_spec({"results_dir": str(results_dir), "dataset": dataset, task: section})
    assert main([task, "-e", spec]) == 3
    line = _cli_error_line(capsys.readouterr().err, task)
    assert line.startswith(f"deformable-detr {task}: error: {task}.trt_engine: a TensorRT engine cannot run here: ")
    for reason in missing_requirements():
        assert reason in line
    assert f"set {task}.checkpoint instead" in line
    assert not (results_dir / task / "results.json").exists() and not (results_dir / task / "labels").exists()
