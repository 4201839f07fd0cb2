"""Decoding image files, with one clear error for a file that cannot be read.

EXIF orientation is applied, everywhere, as TAO does it (PIL's exif_transpose in its data
loaders, inference drawing and KITTI converter): an image is read as it is shown, so a COCO/KITTI
file's boxes, width and height refer to the shown frame (what `convert` records); drawn images
and inference labels use the same frame.
"""
from __future__ import annotations

import os

import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import to_dtype

from ..errors import UsageError
from . import remote


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
    """The image as uint8 RGB [3, H, W]; a 16-bit PNG is scaled to 8 bits (not clipped to white), here, so
    training, evaluation and inference's drawings all see the same pixels."""
    try:
        with remote.open_file(path) as fh:  # an s3:// image: its copy in the node's cache
            raw = fh.read()
    except OSError as err:
        raise UnreadableImageError(f"{path}: cannot read image file ({err.strerror or err})") from None
    if not raw:
        raise UnreadableImageError(f"{path}: the file is empty (0 bytes); expected an image (JPEG, PNG, BMP, ...)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        decoded = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        pass
    else:
        if decoded.dtype != torch.uint8:
            decoded = to_dtype(decoded, torch.uint8, scale=True)
        return tv_tensors.Image(decoded)
    try:  # formats torchvision's decoders lack (BMP, TIFF, ...)
        with Image.open(remote.local_copy(path)) as stored:
            pil = ImageOps.exif_transpose(stored).convert("RGB")
            array = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8)
            return tv_tensors.Image(array.view(pil.height, pil.width, 3).permute(2, 0, 1).contiguous())
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{path}: cannot decode image ({err})") from None


def load_shown_image(path: str) -> Image.Image:
    """The image as a PIL RGB image of the pixels the model sees (EXIF orientation applied, 16 bits
    scaled to 8): what inference draws its boxes on."""
    return Image.fromarray(load_image(path).permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def verify_image(path: str) -> None:
    """Check a file decodes as an image (header and data) without keeping it."""
    local = remote.local_copy(path)
    if os.path.isfile(local) and os.path.getsize(local) == 0:
        raise UnreadableImageError(f"{path}: the file is empty (0 bytes); expected an image (JPEG, PNG, BMP, ...)")
    try:
        with Image.open(local) as pil:
            pil.verify()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"{path}: cannot decode image ({err})") from None
