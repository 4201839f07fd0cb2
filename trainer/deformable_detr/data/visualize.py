"""What inference writes for each image: a KITTI label file and a copy with the boxes drawn.

KITTI lines follow TAO's 16-field form (class, truncation, occlusion, alpha, the 2D box
in pixels of the original image with 3 decimals and not clipped to it, as TAO writes it,
seven zeros for the 3D fields, and the score). A class name with spaces ("potted plant") is
written with underscores ("potted_plant"), the form TAO's KITTI class names take, so every
line keeps 16 fields and `convert` reads it back (it maps an underscore name to the spaced
one of a mapping file); TAO writes the space, which splits the name over two fields.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from PIL import Image, ImageColor, ImageDraw, ImageFont

from ..errors import UsageError
from ..runtime.storage import write_bytes, write_text

# Colours for classes that inference.color_map does not name: distinct hues, readable on photos.
DEFAULT_PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
    "#808000", "#ffd8b1", "#000075", "#808080",
)


@dataclass(frozen=True)
class Detection:
    """One detection in pixels of the original image: box is (x1, y1, x2, y2)."""

    class_name: str
    box: tuple[float, float, float, float]
    score: float


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Clip an xyxy box to the image (0..width, 0..height)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
            min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def kitti_class_name(name: str) -> str:
    """The class name as one KITTI column: runs of whitespace become one underscore."""
    return "_".join(name.split())


def kitti_line(detection: Detection) -> str:
    """TAO's KITTI label line for one detection: the box as predicted (3 decimals, not clipped)."""
    x1, y1, x2, y2 = (float(v) for v in detection.box)
    return (f"{kitti_class_name(detection.class_name)} 0.00 0 0.00 {x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f} "
            f"0.00 0.00 0.00 0.00 0.00 0.00 0.00 {detection.score:.3f}")


def write_kitti_labels(path: str, detections: Sequence[Detection]) -> None:
    """Write one KITTI label file (atomically); an image without detections gets an empty file."""
    lines = [kitti_line(det) for det in detections]
    write_text(path, "".join(line + "\n" for line in lines))


def _parse_color(name: str, value: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(value)[:3]
    except (ValueError, AttributeError):
        raise UsageError(f"inference.color_map.{name}: {value!r} is not a colour; "
                         "accepted: a colour name (red, orange, ...) or #rrggbb") from None


def class_colors(class_names: Sequence[str], color_map: Mapping[str, str]) -> dict[str, tuple[int, int, int]]:
    """RGB colour of every class: from `color_map` where it names the class, else the default palette."""
    unknown = sorted(set(color_map) - set(class_names))
    if unknown:
        raise UsageError(f"inference.color_map: {unknown} are not classes of the classmap; "
                         f"accepted: {list(class_names)}")
    colors = {}
    for index, name in enumerate(class_names):
        if name in color_map:
            colors[name] = _parse_color(name, color_map[name])
        else:
            colors[name] = ImageColor.getrgb(DEFAULT_PALETTE[index % len(DEFAULT_PALETTE)])[:3]
    return colors


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def place_tags(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]],
               width: int, height: int) -> list[tuple[float, float, float, float]]:
    """Where each box's tag (of `sizes` (w, h)) goes: (x1, y1, x2, y2), inside the image.

    Boxes come in priority order (highest score first); each tag takes the first of: above
    its box, inside its top edge, below it, inside its bottom edge, that no earlier tag
    covers, else the one that overlaps earlier tags least. Tags are shifted (never cut) to
    stay within the image, as far as a tag fits in it at all.
    """
    placed: list[tuple[float, float, float, float]] = []
    for (x1, y1, x2, y2), (tag_w, tag_h) in zip(boxes, sizes):
        left = min(max(x1, 0.0), max(0.0, width - tag_w))
        candidates = []
        for top in (y1 - tag_h, y1, y2, y2 - tag_h):
            top = min(max(top, 0.0), max(0.0, height - tag_h))
            candidates.append((left, top, left + tag_w, top + tag_h))
        best = min(candidates, key=lambda c: (sum(_overlap(c, other) for other in placed), candidates.index(c)))
        placed.append(best)
    return placed


def draw_detections(image: Image.Image, detections: Sequence[Detection],
                    colors: Mapping[str, tuple[int, int, int]], outline_width: int = 3) -> Image.Image:
    """A copy of `image` with each box outlined in its class colour (`outline_width` pixels wide:
    inference.outline_width) and tagged `name score`.

    Every box is drawn first, then the tags on filled backgrounds (see `place_tags`), so no
    box line crosses a tag's text; the best-scoring detection's tag is placed first and
    drawn last (on top).
    """
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    # Scale the text with the image so it stays readable on small and large images.
    font_size = max(10, round(min(width, height) / 40))
    font = ImageFont.load_default(size=font_size)
    pad = max(1, font_size // 8)
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)
    boxes = [clip_box(detections[i].box, width - 1, height - 1) for i in order]
    for i, (x1, y1, x2, y2) in zip(order, boxes):
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colors[detections[i].class_name],
                       width=outline_width)
    labels = [f"{detections[i].class_name} {detections[i].score:.2f}" for i in order]
    extents = [draw.textbbox((0, 0), label, font=font) for label in labels]
    sizes = [(right - left + 2 * pad, bottom - top + 2 * pad) for left, top, right, bottom in extents]
    tags = place_tags(boxes, sizes, width, height)
    for i, label, (left, top, _, _), tag in reversed(list(zip(order, labels, extents, tags))):
        color = colors[detections[i].class_name]
        draw.rectangle((tag[0], tag[1], tag[2] - 1, tag[3] - 1), fill=color)
        draw.text((tag[0] - left + pad, tag[1] - top + pad), label, fill=_text_color(color), font=font)
    return canvas


def save_image(image: Image.Image, path: str) -> None:
    """Save atomically (a local path or an s3:// URI), in the format the file extension names."""
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    write_bytes(path, buffer.getvalue())
