"""Decoding image files, with one clear error for a file that cannot be read.

EXIF orientation is applied, everywhere, as TAO does it (PIL's exif_transpose in its data
loaders, inference drawing and KITTI converter): an image is read as it is shown, so a COCO/KITTI
file's boxes, width and height refer to the shown frame (what `convert` records); drawn images
and inference labels use the same frame.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file

from ..errors import UsageError


class UnreadableImageError(UsageError):
    """An image file that is missing or cannot be decoded.

    A DataLoader worker's exception comes back to the main process re-created from
    a message that carries the worker's whole traceback; `str()` gives back only the
    one line naming the file, so the CLI still prints one line.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if "Traceback" not in text:
            return text
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        return last.split(f"{type(self).__name__}: ", 1)[-1]


class ImageSizeMismatch(UnreadableImageError):
    """An image whose pixels do not have the width/height its annotation file lists."""


def load_image(path: str) -> tv_tensors.Image:
    """The image as uint8 RGB [3, H, W]."""
    try:
        data = read_file(path)
    except (RuntimeError, OSError) as err:
        raise UnreadableImageError(f"{path}: cannot read image file ({err})") from None
    try:
        return tv_tensors.Image(decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))
    except RuntimeError:
        pass
    try:  # formats torchvision's decoders lack (BMP, TIFF, ...)
        with Image.open(path) as stored:
            pil = ImageOps.exif_transpose(stored).convert("RGB")
            array = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
            return tv_tensors.Image(array.view(pil.height, pil.width, 3).permute(2, 0, 1).contiguous())
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{path}: cannot decode image ({err})") from None


def verify_image(path: str) -> None:
    """Check a file decodes as an image (header and data) without keeping it."""
    try:
        with Image.open(path) as pil:
            pil.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{path}: cannot decode image ({err})") from None
