"""TAO's augmentation steps: boxes checked against hand-computed results."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from deformable_detr.config.schema import AugmentationConfig
from deformable_detr.data import transforms as tf


def sample(height: int, width: int, boxes: list[list[float]], labels: list[int] | None = None):
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                                format="XYXY", canvas_size=(height, width)),
              "labels": torch.tensor(labels if labels is not None else list(range(1, len(boxes) + 1)))}
    return image, target


def painted(height: int, width: int, box: list[int]):
    """An image that is white exactly inside `box` (xyxy), black elsewhere, and its target."""
    image, target = sample(height, width, [box])
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    return image, target


def white_extent(image: torch.Tensor) -> list[int]:
    """xyxy of the white pixels."""
    ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_resized_shape_follows_detr_rule_and_caps_the_longer_side():
    assert tf.resized_shape(480, 640, 800, 1333) == (800, 1066)
    assert tf.resized_shape(640, 480, 800, 1333) == (1066, 800)
    # 10:1 image: the shorter side shrinks to round(1333 * 100 / 1000) = 133, the longer to 1330.
    assert tf.resized_shape(100, 1000, 800, 1333) == (133, 1330)
    # Rounding up the shorter side would overshoot 1333 (14 * 100 = 1400): clamped.
    assert tf.resized_shape(10, 1000, 800, 1333) == (13, 1300)
    assert tf.resized_shape(7, 1000, 800, 1333) == (9, 1285)
    assert max(tf.resized_shape(3, 1000, 800, 1333)) <= 1333
    assert tf.resized_shape(64, 64, 128) == (128, 128)


def test_random_resize_scales_boxes():
    image, target = sample(10, 20, [[2, 4, 6, 8]])
    out_image, out = tf.RandomResize([20])(image, target)
    assert tuple(out_image.shape) == (3, 20, 40)
    assert out["boxes"].tolist() == [[4, 8, 12, 16]]
    # With the cap: 20x10 -> shorter 30 would make the longer 60 > 40: shorter = 20.
    image, target = sample(10, 20, [[2, 4, 6, 8]])
    out_image, out = tf.RandomResize([30], max_size=40)(image, target)
    assert tuple(out_image.shape) == (3, 20, 40)
    assert out["boxes"].tolist() == [[4, 8, 12, 16]]


def test_horizontal_flip_mirrors_boxes():
    aug = AugmentationConfig(horizontal_flip_prob=1.0)
    flip = tf.build_train_transform(aug).steps[0]
    image, target = painted(10, 20, [2, 4, 6, 8])
    out_image, out = flip(image, target)
    assert out["boxes"].tolist() == [[14, 4, 18, 8]]
    assert white_extent(out_image) == [14, 4, 18, 8]
    never = tf.build_train_transform(AugmentationConfig(horizontal_flip_prob=0.0)).steps[0]
    assert never(image, target)[1]["boxes"].tolist() == [[2, 4, 6, 8]]


def test_crop_shifts_clips_and_drops_boxes():
    image, target = sample(10, 20, [[2, 4, 6, 8], [15, 0, 20, 1], [0, 0, 2, 3]], labels=[1, 2, 3])
    out_image, out = tf.crop(image, target, top=2, left=3, height=5, width=10)
    assert tuple(out_image.shape) == (3, 5, 10)
    # [2,4,6,8] - (3,2) = [-1,2,3,6] -> clipped to [0,2,3,5]; the other two fall outside.
    assert out["boxes"].tolist() == [[0, 2, 3, 5]]
    assert out["labels"].tolist() == [1]
    assert tuple(out["boxes"].canvas_size) == (5, 10)


def test_random_size_crop_sides_in_range_and_boxes_follow_pixels():
    torch.manual_seed(0)
    cropper = tf.RandomSizeCrop(12, 16)
    for _ in range(20):
        image, target = painted(20, 30, [10, 6, 18, 14])
        out_image, out = cropper(image, target)
        h, w = out_image.shape[-2:]
        assert 12 <= h <= 16 and 12 <= w <= 16
        if len(out["boxes"]):
            assert out["boxes"].tolist() == [white_extent(out_image)]
        else:
            assert not (out_image > 127).any()


def test_random_size_crop_keeps_small_images_whole():
    image, target = sample(8, 9, [[1, 1, 4, 4]])
    out_image, out = tf.RandomSizeCrop(384, 600)(image, target)
    assert tuple(out_image.shape) == (3, 8, 9)
    assert out["boxes"].tolist() == [[1, 1, 4, 4]]


def test_random_select_picks_by_probability():
    image, target = sample(10, 20, [[2, 4, 6, 8]])
    double, half = tf.RandomResize([20]), tf.RandomResize([5])
    assert tf.RandomSelect(double, half, p=1.0)(image, target)[0].shape[-1] == 40
    assert tf.RandomSelect(double, half, p=0.0)(image, target)[0].shape[-1] == 10


def test_normalize_makes_relative_cxcywh_and_normalised_pixels():
    image, target = sample(20, 40, [[4, 8, 12, 16]])
    image[0] = 255
    out_image, out = tf.Normalize([0.5, 0.0, 0.0], [0.5, 1.0, 2.0])(image, target)
    # centre (8, 12), size (8, 8), divided by (w, h) = (40, 20)
    assert torch.allclose(out["boxes"], torch.tensor([[0.2, 0.6, 0.2, 0.4]]))
    assert out["size"].tolist() == [20, 40]
    assert out_image.dtype == torch.float32
    assert torch.allclose(out_image[0], torch.ones(20, 40))       # (1 - 0.5) / 0.5
    assert torch.allclose(out_image[1], torch.zeros(20, 40))


def test_large_scale_jitter_scales_then_crops_to_output_size():
    image, target = sample(100, 200, [[50, 25, 100, 75]])
    # factor = 64 * 0.5 / 200 = 0.16 -> 16 x 32, smaller than 64: kept whole.
    out_image, out = tf.LargeScaleJitter(64, scale_range=(0.5, 0.5))(image, target)
    assert tuple(out_image.shape) == (3, 16, 32)
    assert torch.allclose(out["boxes"], torch.tensor([[8.0, 4.0, 16.0, 12.0]]))
    torch.manual_seed(1)
    for _ in range(10):
        # factor = 64 * 2 / 200 = 0.64 -> 64 x 128, then a 64 x 64 window.
        image, target = painted(100, 200, [50, 25, 100, 75])
        out_image, out = tf.LargeScaleJitter(64, scale_range=(2.0, 2.0))(image, target)
        assert tuple(out_image.shape) == (3, 64, 64)
        if len(out["boxes"]):
            assert [round(v) for v in out["boxes"][0].tolist()] == white_extent(out_image)


def test_train_pipeline_respects_sizes_and_keeps_boxes_valid():
    aug = AugmentationConfig(scales=[40, 48], train_random_resize=[50, 60], train_random_crop_min=30,
                             train_random_crop_max=45, random_resize_max_size=64, horizontal_flip_prob=0.5)
    transform = tf.build_train_transform(aug)
    torch.manual_seed(0)
    for _ in range(30):
        image, target = sample(32, 48, [[4, 4, 20, 16], [30, 10, 46, 30]])
        out_image, out = transform(image, target)
        h, w = out_image.shape[-2:]
        assert max(h, w) <= 64 and (min(h, w) in (40, 48) or max(h, w) == 64)
        assert out["size"].tolist() == [h, w]
        boxes = out["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        assert len(out["labels"]) == len(boxes)


def test_eval_pipeline_resizes_shorter_side_with_cap():
    aug = AugmentationConfig(test_random_resize=96, random_resize_max_size=128)
    image, target = sample(32, 64, [[8, 8, 24, 16]])
    out_image, out = tf.build_eval_transform(aug)(image, target)
    assert tuple(out_image.shape) == (3, 64, 128)  # 96 would make the longer side 192 > 128
    assert torch.allclose(out["boxes"], torch.tensor([[16 / 64, 12 / 32, 16 / 64, 8 / 32]]))


def test_fixed_pad_size():
    aug = AugmentationConfig(fixed_padding=True, random_resize_max_size=512, scales=[320, 384], test_random_resize=352)
    assert tf.fixed_pad_size(aug, training=True) == (384, 512) and tf.fixed_pad_size(aug) == (352, 512)
    assert tf.fixed_pad_size(AugmentationConfig(fixed_padding=False)) is None
    assert tf.fixed_pad_size(AugmentationConfig(fixed_padding=True, fixed_random_crop=256)) == (256, 256)


@pytest.mark.parametrize("lsj", [None, 64])
def test_lsj_eval_fits_output_size(lsj):
    aug = AugmentationConfig(fixed_random_crop=lsj, test_random_resize=48, random_resize_max_size=80)
    image, target = sample(50, 100, [[10, 10, 20, 20]])
    out_image, _ = tf.build_eval_transform(aug)(image, target)
    assert tuple(out_image.shape[-2:]) == ((32, 64) if lsj else (40, 80))
