"""TAO's fixed_padding canvas (issue 29 item 5): it follows each image's orientation, and a batch
pads to the larger of each side. Expected shapes are derived by hand from TAO's rule:
landscape (h <= w) -> (across, along), portrait -> (along, across), with across = max(scales) in
training, test_random_resize in evaluation, and along = random_resize_max_size."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from deformable_detr.config.schema import AugmentationConfig
from deformable_detr.data import transforms as tf
from deformable_detr.data.collate import collate_fn

AUG = dict(scales=[48, 64], train_random_resize=[56, 60], train_random_crop_min=30, train_random_crop_max=50,
           random_resize_max_size=96, test_random_resize=40, fixed_padding=True)


def item(height: int, width: int, image_id: int = 1):
    return torch.full((3, height, width), float(image_id)), {"image_id": torch.tensor(image_id)}


def test_train_and_eval_canvases_follow_orientation():
    canvas = tf.fixed_pad_size(AugmentationConfig(**AUG), training=True)
    assert canvas.for_image(30, 50) == (64, 96)  # landscape: max(scales) high, random_resize_max_size wide
    assert canvas.for_image(50, 30) == (96, 64)  # portrait: the other way round
    assert canvas.for_image(40, 40) == (64, 96)  # square counts as landscape (TAO pads height to the min side)
    assert tf.fixed_pad_size(AugmentationConfig(**AUG)).for_image(30, 50) == (40, 96)


def test_large_scale_jitter_pads_training_square_even_without_fixed_padding():
    lsj = AugmentationConfig(**{**AUG, "fixed_random_crop": 64, "fixed_padding": False})
    assert tf.fixed_pad_size(lsj, training=True) == (64, 64)
    assert tf.fixed_pad_size(lsj) is None


@pytest.mark.parametrize("shapes, expected", [
    ([(30, 50), (20, 96)], (64, 96)),   # both landscape
    ([(50, 30), (96, 10)], (96, 64)),   # both portrait
    ([(30, 50), (50, 30)], (96, 96)),   # mixed: the larger of each side
])
def test_batch_pads_to_the_larger_of_each_canvas_side(shapes, expected):
    canvas = tf.FixedCanvas(64, 96)
    images, masks, _ = collate_fn([item(h, w, k + 1) for k, (h, w) in enumerate(shapes)], pad_to=canvas)
    assert tuple(images.shape[-2:]) == expected and tuple(masks.shape[-2:]) == expected
    for k, (h, w) in enumerate(shapes):
        assert not masks[k, :h, :w].any() and int(masks[k].sum()) == expected[0] * expected[1] - h * w
        assert (images[k, :, :h, :w] == k + 1).all() and int(images[k].count_nonzero()) == 3 * h * w


def test_image_past_its_canvas_is_one_clear_error():
    from deformable_detr.errors import UsageError

    # Fits a square 96 x 96 canvas, but not its portrait canvas (96 high, 64 wide).
    with pytest.raises(UsageError, match=r"image_id 7 is larger than its fixed canvas \(96, 64\)"):
        collate_fn([item(90, 70, 7)], pad_to=tf.FixedCanvas(64, 96))


@pytest.mark.parametrize("height, width", [(120, 300), (300, 120), (200, 200), (20, 400), (401, 19), (97, 95)])
def test_every_augmented_image_fits_its_canvas(height, width):
    aug = AugmentationConfig(**AUG)
    train, evaluate = tf.build_train_transform(aug), tf.build_eval_transform(aug)
    train_canvas, eval_canvas = tf.fixed_pad_size(aug, training=True), tf.fixed_pad_size(aug)
    image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[1.0, 1.0, 15.0, 15.0]]), format="XYXY",
                                                canvas_size=(height, width)), "labels": torch.tensor([1])}
    for seed in range(25):
        torch.manual_seed(seed)
        out, _ = train(image, target)
        h, w = out.shape[-2:]
        assert h <= train_canvas.for_image(h, w)[0] and w <= train_canvas.for_image(h, w)[1]
    out, _ = evaluate(image, target)
    h, w = out.shape[-2:]
    assert h <= eval_canvas.for_image(h, w)[0] and w <= eval_canvas.for_image(h, w)[1]
