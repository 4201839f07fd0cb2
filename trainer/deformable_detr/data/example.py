"""The embedded example dataset: small images of coloured shapes, in COCO and KITTI form.

`make_example_data(out)` draws seeded, deterministic images of five shape classes
(circle, cross, diamond, square, triangle) with varied size, colour and overlap,
plus unlabelled clutter, on textured backgrounds, and writes:

    out/train/images/*.jpg, out/train/annotations.json   COCO (dataset.train_data_sources)
    out/val/images/*.jpg,   out/val/annotations.json     COCO (val / test sources)
    out/kitti/{train,val}/images|labels                  KITTI (convert's input)
    out/kitti/sources.txt, out/kitti/mapping.json        convert.input_source / mapping_path
    out/classmap.txt                                     infer_data_sources.classmap

Running it again on the same folder replaces those image and label folders.

Category ids follow `convert`'s rule (1..N over the names in reverse alphabetical
order), so the COCO copy and the converted KITTI copy train the same model.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..runtime.files import write_text_atomic
from ..runtime.progress import progress
from .kitti import category_ids_for

CLASS_NAMES = ("circle", "cross", "diamond", "square", "triangle")
# Each class has its own hue (degrees), jittered per object: shape and colour both tell classes apart.
CLASS_HUES = {"circle": 0, "cross": 55, "diamond": 120, "square": 210, "triangle": 290}
HUE_JITTER = 18
MAX_OBJECTS = 5
MAX_COVERED = 0.4  # objects may overlap, but at most this fraction of the smaller one is covered


@dataclass
class DrawnObject:
    name: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    h = (hue % 360) / 60.0
    c = value * saturation
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = value - c
    return int(255 * (r + m)), int(255 * (g + m)), int(255 * (b + m))


@functools.lru_cache(maxsize=4)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return y, x


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, textured background: a base grey-ish colour times stripes, checks or blotches."""
    base = (rng.uniform(70, 170) + rng.uniform(-20, 20, size=3)).astype(np.float32)
    y, x = _unit_grid(size)
    kind = rng.integers(3)
    if kind == 0:  # stripes at a random angle and frequency
        angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 12)
        pattern = np.sin(np.float32(2 * math.pi * freq) * (x * np.float32(math.cos(angle))
                                                           + y * np.float32(math.sin(angle))))
    elif kind == 1:  # checks
        cells = rng.integers(4, 12)
        pattern = (((x * cells).astype(int) + (y * cells).astype(int)) % 2) * np.float32(2.0) - np.float32(1.0)
    else:  # blotches: coarse noise, upsampled
        coarse = rng.uniform(-1, 1, size=(6, 6)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    amplitude = np.float32(rng.uniform(10, 35))
    noise = rng.integers(-10, 11, size=(size, size, 3), dtype=np.int16)  # uniform grain: far cheaper than normal
    image = base + (amplitude * pattern)[..., None] + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_points(name: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    if name == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if name == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if name == "triangle":
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if name == "cross":
        arm = half / 3
        return [(cx - arm, cy - half), (cx + arm, cy - half), (cx + arm, cy - arm), (cx + half, cy - arm),
                (cx + half, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + half), (cx - arm, cy + half),
                (cx - arm, cy + arm), (cx - half, cy + arm), (cx - half, cy - arm), (cx - arm, cy - arm)]
    raise ValueError(name)


def _covered_fraction(a: tuple, b: tuple) -> float:
    """Intersection over the smaller box's area: how much of the smaller one the other can hide."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller if smaller > 0 else 0.0


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """Thin lines and small dots in muted colours: texture the detector must learn to ignore."""
    for _ in range(rng.integers(2, 7)):
        grey = int(rng.uniform(40, 220))
        colour = tuple(int(np.clip(grey + rng.uniform(-25, 25), 0, 255)) for _ in range(3))
        x1, y1 = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            x2, y2 = x1 + rng.uniform(-size / 3, size / 3), y1 + rng.uniform(-size / 3, size / 3)
            draw.line([(x1, y1), (x2, y2)], fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, max(2.0, size / 40))
            draw.ellipse([x1 - r, y1 - r, x1 + r, y1 + r], fill=colour)


def draw_image(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[DrawnObject]]:
    """One image and its objects' tight boxes."""
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, size)
    objects: list[DrawnObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        name = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        half = rng.uniform(0.07, 0.2) * size
        for _attempt in range(10):
            cx, cy = rng.uniform(half + 1, size - half - 1, 2)
            box = (cx - half, cy - half, cx + half, cy + half)
            if all(_covered_fraction(box, other.box) <= MAX_COVERED for other in objects):
                break
        else:
            continue
        colour = _hsv_to_rgb(CLASS_HUES[name] + rng.uniform(-HUE_JITTER, HUE_JITTER),
                             rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
        if name == "circle":
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon(_shape_points(name, cx, cy, half), fill=colour)
        # Pixel-aligned, tight box of what was drawn.
        objects.append(DrawnObject(name, tuple(float(v) for v in (
            math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])))))
    return image, objects


def _kitti_line(obj: DrawnObject) -> str:
    x1, y1, x2, y2 = obj.box
    # class truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y: the 3D fields are unused.
    return f"{obj.name.capitalize()} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 0.00 0.00 0.00 0.00 0.00 0.00 0.00"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_split(out: str, split: str, count: int, size: int, seed: int, category_ids: dict[str, int]) -> dict:
    image_dir = os.path.join(out, split, "images")
    kitti_images = os.path.join(out, "kitti", split, "images")
    kitti_labels = os.path.join(out, "kitti", split, "labels")
    # Regenerating replaces a split: stale images from a larger earlier run would otherwise reach convert.
    for folder in (image_dir, kitti_images, kitti_labels):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    split_key = {"train": 0, "val": 1}[split]
    images, annotations = [], []
    for index in progress(range(count), desc=f"drawing {split} images"):
        rng = np.random.default_rng([seed, split_key, index])
        image, objects = draw_image(rng, size)
        name = f"{split}_{index:06d}"
        path = os.path.join(image_dir, f"{name}.jpg")
        image.save(path, quality=92)
        _link_or_copy(path, os.path.join(kitti_images, f"{name}.jpg"))
        write_text_atomic(os.path.join(kitti_labels, f"{name}.txt"),
                          "".join(_kitti_line(obj) + "\n" for obj in objects))
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": size, "width": size})
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_ids[obj.name], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": cid, "name": name} for name, cid in sorted(category_ids.items(), key=lambda kv: kv[1])]
    json_file = os.path.join(out, split, "annotations.json")
    write_text_atomic(json_file, json.dumps({"images": images, "annotations": annotations,
                                             "categories": categories}))
    return {"image_dir": image_dir, "json_file": json_file, "images": len(images), "boxes": len(annotations)}


def make_example_data(out: str, num_train: int = 2000, num_val: int = 200, image_size: int = 128,
                      seed: int = 0, quiet: bool = False) -> dict:
    """Draw the example dataset into `out` (see the module doc); returns where things are."""
    if image_size < 32:
        from ..errors import UsageError
        raise UsageError(f"--image-size: {image_size} is too small; accepted: 32 or more")
    out = os.path.abspath(out)
    category_ids = category_ids_for(CLASS_NAMES)
    splits = {split: _write_split(out, split, count, image_size, seed, category_ids)
              for split, count in (("train", num_train), ("val", num_val))}
    classmap = os.path.join(out, "classmap.txt")
    write_text_atomic(classmap, "".join(f"{name}\n" for name, _ in sorted(category_ids.items(),
                                                                           key=lambda kv: kv[1])))
    sources_txt = os.path.join(out, "kitti", "sources.txt")
    write_text_atomic(sources_txt, "train\nval\n")
    mapping = os.path.join(out, "kitti", "mapping.json")
    write_text_atomic(mapping, json.dumps({name: [name] for name in CLASS_NAMES}, indent=2) + "\n")
    summary = {"out": out, "train": splits["train"], "val": splits["val"], "classmap": classmap,
               "kitti_sources": sources_txt, "kitti_mapping": mapping, "num_classes": len(CLASS_NAMES) + 1}
    if not quiet:
        _print_summary(summary)
    return summary


def _print_summary(summary: dict, file: Optional[object] = None) -> None:
    lines = [f"example data in {summary['out']} (num_classes: {summary['num_classes']})"]
    for split in ("train", "val"):
        s = summary[split]
        lines.append(f"  {split}: {s['images']} images, {s['boxes']} boxes: image_dir {s['image_dir']}, "
                     f"json_file {s['json_file']}")
    lines.append(f"  classmap: {summary['classmap']}")
    lines.append(f"  KITTI copy for convert: input_source {summary['kitti_sources']}, "
                 f"mapping_path {summary['kitti_mapping']}")
    print("\n".join(lines), file=file)
