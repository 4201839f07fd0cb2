"""Draw a tiny COCO dataset (coloured rectangles, 3 classes, ids 1..3) into a folder.

Runs inside the trainer image on every node of the e2e cluster (only Pillow and the
standard library); seeded, so every node gets the same files.

    python make_dataset.py /data        # writes /data/{train,val}/{images/,annotations.json}
"""
from __future__ import annotations

import json
import os
import random
import sys

from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]


def draw_split(root: str, num_images: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image = Image.new("RGB", (size, size), (rng.randint(0, 60),) * 3)
        pen = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            category = rng.randint(1, len(COLOURS))
            w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
            x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
            pen.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[category - 1])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"{image_id:05d}.jpg"
        image.save(os.path.join(image_dir, name), quality=95)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": f"class_{i}"} for i in range(1, len(COLOURS) + 1)]}
    # Written under a temporary name, then renamed: a reader never sees half a file.
    final = os.path.join(root, "annotations.json")
    with open(final + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(coco, fh)
    os.replace(final + ".tmp", final)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_dataset.py OUTPUT_DIR", file=sys.stderr)
        return 2
    draw_split(os.path.join(argv[0], "train"), num_images=16, size=64, seed=1)
    draw_split(os.path.join(argv[0], "val"), num_images=4, size=64, seed=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
