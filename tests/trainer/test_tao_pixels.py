"""TAO's pixels (issue 29 item 6): images read as shown (EXIF orientation), resized as PIL images,
and, with inference.input_width/height, stretched to exactly that size for the PyTorch model.

The reference is written here from TAO's recipe: PIL opens the file, applies the EXIF
orientation, converts to RGB, resizes with its bilinear filter, then to_tensor (/255) and
normalise with the spec's mean and std."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from deformable_detr.config.schema import AugmentationConfig
from deformable_detr.data import transforms as tf
from deformable_detr.data.images import load_image

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def reference_pixels(path: str, height: int, width: int) -> torch.Tensor:
    with Image.open(path) as stored:
        pil = ImageOps.exif_transpose(stored).convert("RGB")
    array = np.asarray(pil.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
    array = (array - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def textured_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Noise plus gradients: every rounding difference of a resize shows somewhere."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    return Image.fromarray(((noise.astype(np.float32) + ramp) / 2).astype(np.uint8), "RGB")


def target_for(height: int, width: int) -> dict:
    from torchvision import tv_tensors

    return {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[2.0, 2.0, 10.0, 10.0]]), format="XYXY",
                                              canvas_size=(height, width)), "labels": torch.tensor([1])}


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("size", [(57, 76), (160, 213)])  # down- and upscaling of a 96 x 128 image
def test_eval_pixels_are_taos_within_float_rounding(tmp_path, suffix, size):
    path = str(tmp_path / f"image{suffix}")
    textured_image(96, 128).save(path, quality=90) if suffix == ".jpg" else textured_image(96, 128).save(path)
    height, width = size
    aug = AugmentationConfig(test_random_resize=min(size), random_resize_max_size=1333, input_mean=MEAN,
                             input_std=STD)
    ours, _ = tf.build_eval_transform(aug)(load_image(path), target_for(96, 128))
    assert tuple(ours.shape[-2:]) == (height, width)
    assert (ours - reference_pixels(path, height, width)).abs().max() < 1e-5


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise (portrait)
    textured_image(60, 100, seed=1).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert tuple(image.shape[-2:]) == (100, 60)
    ours, _ = tf.build_fixed_size_transform(AugmentationConfig(input_mean=MEAN, input_std=STD), 50, 30)(
        image, target_for(100, 60))
    assert (ours - reference_pixels(path, 50, 30)).abs().max() < 1e-5


def test_fixed_size_transform_stretches_and_keeps_boxes_relative():
    aug = AugmentationConfig(input_mean=MEAN, input_std=STD)
    image = torch.from_numpy(np.array(textured_image(40, 80))).permute(2, 0, 1).contiguous()
    out, target = tf.build_fixed_size_transform(aug, 30, 20)(image, target_for(40, 80))
    assert tuple(out.shape) == (3, 30, 20)  # aspect ratio not kept
    # box (2, 2, 10, 10) of an 80 x 40 image: centre (6/80, 6/40), size (8/80, 8/40), whatever the stretch.
    assert torch.allclose(target["boxes"], torch.tensor([[6 / 80, 6 / 40, 8 / 80, 8 / 40]]), atol=1e-6)


def test_pytorch_inference_stretches_to_input_size(tiny_coco, write_spec, results_dir, tmp_path, monkeypatch):
    """With inference.input_width/height the checkpoint's model sees exactly that size, unpadded
    (TAO's FixedResize), fixed_padding or not; without, the evaluation resize and canvas."""
    from test_inference import TINY_MODEL

    from deformable_detr.cli import main
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.model import build_model
    from deformable_detr.model.detector import DeformableDETR
    from deformable_detr.runtime.checkpoint_io import save_object

    torch.manual_seed(0)
    model, _, _ = build_model(spec_from_dict({"model": TINY_MODEL, "dataset": {"num_classes": 4}}))
    checkpoint = str(tmp_path / "model.pth")
    save_object({"model": model.state_dict()}, checkpoint)
    classmap = tmp_path / "classmap.txt"
    classmap.write_text("car\nperson\nbicycle\n")
    seen = []
    original_forward = DeformableDETR.forward

    def recording_forward(self, images, masks):
        seen.append((tuple(images.shape[-2:]), bool(masks.any())))
        return original_forward(self, images, masks)

    monkeypatch.setattr(DeformableDETR, "forward", recording_forward)

    def run(**inference) -> list:
        seen.clear()
        spec = {"results_dir": str(results_dir), "model": dict(TINY_MODEL),
                "dataset": {"num_classes": 4, "batch_size": 2, "workers": 0, "pin_memory": False,
                            "infer_data_sources": {"image_dir": [tiny_coco["val"]["image_dir"]],
                                                   "classmap": str(classmap)},
                            "augmentation": {"test_random_resize": 48, "random_resize_max_size": 64,
                                             "fixed_padding": True}},
                "inference": {"checkpoint": checkpoint, "conf_threshold": 0.0, **inference}}
        assert main(["inference", "-e", write_spec(spec)]) == 0
        assert seen
        return list(seen)

    assert set(run(input_width=40, input_height=24)) == {((24, 40), False)}
    canvases = {shape for shape, _ in run()}  # TAO's eval canvas: 48 across, 64 along the longer side
    assert canvases and canvases <= {(48, 64), (64, 48), (64, 64)}
