"""TAO's deformable_detr augmentation, on torchvision's detection-aware v2 transforms.

Images are `tv_tensors.Image` (uint8 [3, H, W]) and boxes `tv_tensors.BoundingBoxes`
(absolute XYXY), so torchvision's functional ops move boxes with every resize, crop
and flip. Random choices come from torch's global generator, which the training loader
seeds per sample (data.loader.SeededSamples), so a seeded loader gives the same
augmentation every run, with any number of workers.

Training (TAO's pipeline):
    horizontal flip (horizontal_flip_prob), then with probability 1/2
      resize the shorter side to one of `scales` (longer side capped at random_resize_max_size)
    otherwise
      resize the shorter side to one of `train_random_resize`, crop a random region with
      sides in [train_random_crop_min, train_random_crop_max], resize to one of `scales` (capped)
    then normalise.
With `fixed_random_crop: S` (large-scale jitter, for ViT backbones) the middle part is
instead: scale the image so its longer side is S times a factor drawn from [0.1, 2.0],
then crop a random S x S window (smaller images are kept whole and padded later).
Evaluation: resize the shorter side to `test_random_resize` (capped), normalise.
Boxes cut down to nothing by a crop are dropped. Pixels are resized by PIL, as TAO resizes
its PIL images, so the normalised pixels are TAO's within float rounding.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors

from ..config.schema import AugmentationConfig

Target = dict[str, Any]
Sample = tuple[tv_tensors.Image, Target]
Transform = Callable[[tv_tensors.Image, Target], Sample]

# Large-scale jitter's scale range, from "Simple Copy-Paste" (Ghiasi et al., 2021).
LSJ_SCALE_RANGE = (0.1, 2.0)


def resized_shape(height: int, width: int, size: int, max_size: Optional[int] = None) -> tuple[int, int]:
    """(h, w) with the shorter side `size`, shrunk so the longer side is at most `max_size`.

    DETR's rule (int() truncation, `size` rounded when capped), plus a final clamp:
    that rule's rounding can overshoot `max_size` on extreme aspect ratios, and a fixed
    padding of max_size x max_size relies on it never doing so.
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if max_size is not None:
        new_h, new_w = min(new_h, max_size), min(new_w, max_size)
    return max(new_h, 1), max(new_w, 1)


def _pick(options: Sequence[int]) -> int:
    return int(options[int(torch.randint(len(options), ()).item())])


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, ()).item())


def resize_pixels(image: torch.Tensor, height: int, width: int) -> tv_tensors.Image:
    """uint8 [3, H, W] resized by PIL's bilinear filter, as TAO resizes its PIL images: torchvision's
    tensor resize rounds some pixels one level apart (0.0175 after normalisation)."""
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")
    resized = np.array(pil.resize((width, height), Image.BILINEAR))  # a writable copy, for torch
    return tv_tensors.Image(torch.from_numpy(resized).permute(2, 0, 1))


def resize(image: tv_tensors.Image, target: Target, height: int, width: int) -> Sample:
    image = resize_pixels(image, height, width)
    target = {**target, "boxes": F.resize(target["boxes"], [height, width])}
    return image, target


def crop(image: tv_tensors.Image, target: Target, top: int, left: int, height: int, width: int) -> Sample:
    """Crop, clip boxes to the window, and drop boxes with no width or height left."""
    image = F.crop(image, top, left, height, width)
    boxes = F.crop(target["boxes"], top, left, height, width)
    clipped = boxes.as_subclass(torch.Tensor).clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    out = {**target, "labels": target["labels"][keep],
           "boxes": tv_tensors.wrap(clipped[keep], like=boxes, canvas_size=(height, width))}
    return image, out


class Compose:
    def __init__(self, steps: Sequence[Transform]) -> None:
        self.steps = list(steps)

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        for step in self.steps:
            image, target = step(image, target)
        return image, target


class RandomSelect:
    """`first` with probability p, else `second` (TAO/DETR's RandomSelect)."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        if torch.rand(()).item() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class RandomResize:
    """Shorter side to one of `sizes` (picked at random), longer side capped at `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None) -> None:
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        height, width = image.shape[-2:]
        new_h, new_w = resized_shape(height, width, _pick(self.sizes), self.max_size)
        return resize(image, target, new_h, new_w)


class RandomSizeCrop:
    """A random window with each side drawn from [min_size, max_size] (clipped to the image)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        height, width = image.shape[-2:]
        crop_w = _randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = _randint(min(self.min_size, height), min(height, self.max_size))
        top, left = _randint(0, height - crop_h), _randint(0, width - crop_w)
        return crop(image, target, top, left, crop_h, crop_w)


class LargeScaleJitter:
    """Scale so the longer side is S * U(0.1, 2.0), then a random window of at most S x S."""

    def __init__(self, output_size: int, scale_range: tuple[float, float] = LSJ_SCALE_RANGE) -> None:
        self.output_size, self.scale_range = output_size, scale_range

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        height, width = image.shape[-2:]
        low, high = self.scale_range
        scale = low + (high - low) * torch.rand(()).item()
        factor = self.output_size * scale / max(height, width)
        new_h, new_w = max(int(height * factor), 1), max(int(width * factor), 1)
        image, target = resize(image, target, new_h, new_w)
        crop_h, crop_w = min(new_h, self.output_size), min(new_w, self.output_size)
        top, left = _randint(0, new_h - crop_h), _randint(0, new_w - crop_w)
        return crop(image, target, top, left, crop_h, crop_w)


class ResizeTo:
    """Exactly (height, width), aspect ratio not kept: TAO's inference at inference.input_width/height
    and its TensorRT inputs."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        return resize(image, target, self.height, self.width)


class Normalize:
    """uint8 image -> float normalised with mean/std; boxes -> cxcywh relative to the image size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: tv_tensors.Image, target: Target) -> Sample:
        height, width = image.shape[-2:]
        image = F.normalize(F.to_dtype(image, torch.float32, scale=True), self.mean, self.std)
        # Plain tensor arithmetic: cheaper per item than a format conversion through the v2 dispatcher.
        xyxy = target["boxes"].as_subclass(torch.Tensor).float()
        boxes = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                             xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=1)
        boxes = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, {**target, "boxes": boxes, "size": torch.tensor([height, width], dtype=torch.int64)}


def build_train_transform(aug: AugmentationConfig) -> Transform:
    if aug.fixed_random_crop:
        middle: Transform = LargeScaleJitter(aug.fixed_random_crop)
    else:
        middle = RandomSelect(
            RandomResize(aug.scales, max_size=aug.random_resize_max_size),
            Compose([RandomResize(aug.train_random_resize),
                     RandomSizeCrop(aug.train_random_crop_min, aug.train_random_crop_max),
                     RandomResize(aug.scales, max_size=aug.random_resize_max_size)]))
    return Compose([T.RandomHorizontalFlip(aug.horizontal_flip_prob), middle,
                    Normalize(aug.input_mean, aug.input_std)])


def build_eval_transform(aug: AugmentationConfig) -> Transform:
    if aug.fixed_random_crop:
        # The ViT input is S x S: fit the longer side to S.
        resize_step: Transform = RandomResize([aug.fixed_random_crop], max_size=aug.fixed_random_crop)
    else:
        resize_step = RandomResize([aug.test_random_resize], max_size=aug.random_resize_max_size)
    return Compose([resize_step, Normalize(aug.input_mean, aug.input_std)])


class FixedCanvas(NamedTuple):
    """TAO's fixed_padding canvas, which follows each image's orientation: a landscape (or square)
    image pads to `across` high and `along` wide, a portrait one to `along` high and `across` wide."""

    across: int  # the side across the image's longer side: max(scales), test_random_resize, or S
    along: int  # the side along it: random_resize_max_size, or S

    def for_image(self, height: int, width: int) -> tuple[int, int]:
        return (self.along, self.across) if height > width else (self.across, self.along)


def build_fixed_size_transform(aug: AugmentationConfig, height: int, width: int) -> Transform:
    """Every image stretched to exactly height x width, then normalised (nothing to pad)."""
    return Compose([ResizeTo(height, width), Normalize(aug.input_mean, aug.input_std)])


def fixed_pad_size(aug: AugmentationConfig, training: bool = False) -> Optional[FixedCanvas]:
    """The canvas each image pads to with fixed_padding, or None to pad per batch.

    TAO's: max(scales) x random_resize_max_size in training, test_random_resize x
    random_resize_max_size in evaluation and inference (the resizes cap the shorter side at
    the first, the longer at the second), S x S with large-scale jitter (S = fixed_random_crop).
    A batch pads to the largest canvas side of its images (data.collate). Large-scale jitter
    pads its training crops to S x S even without fixed_padding, as TAO's pipeline does.
    """
    if aug.fixed_random_crop and (aug.fixed_padding or training):
        return FixedCanvas(aug.fixed_random_crop, aug.fixed_random_crop)
    if not aug.fixed_padding:
        return None
    across = max(aug.scales) if training else aug.test_random_resize
    return FixedCanvas(int(across), int(aug.random_resize_max_size))
