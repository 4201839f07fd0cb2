"""Batching images of different sizes: pad, and mark the padding in a mask."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import UsageError
from .transforms import FixedCanvas


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
               pad_to: Optional[FixedCanvas] = None) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """(images [B, 3, H, W], masks [B, H, W] bool True on padding, targets).

    Images keep their top-left corner. Without `pad_to`, (H, W) is the largest height and width
    in the batch; with it (fixed padding), each image's canvas follows its orientation and the
    batch takes the largest canvas height and width, as TAO's collate pads its padded images.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    if pad_to is None:
        height = max(image.shape[-2] for image in images)
        width = max(image.shape[-1] for image in images)
    else:
        height = width = 0
        for image, target in batch:
            canvas = pad_to.for_image(*image.shape[-2:])
            if image.shape[-2] > canvas[0] or image.shape[-1] > canvas[1]:
                raise UsageError(f"dataset.augmentation.fixed_padding: image {tuple(image.shape[-2:])} of image_id "
                                 f"{int(target['image_id'])} is larger than its fixed canvas {canvas}")
            height, width = max(height, canvas[0]), max(width, canvas[1])
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool)
    for k, image in enumerate(images):
        h, w = image.shape[-2:]
        padded[k, :, :h, :w] = image
        masks[k, :h, :w] = False
    return padded, masks, targets
