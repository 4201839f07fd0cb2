"""Shared fixtures: temporary results folders and a tiny generated COCO dataset."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest
import yaml

# The default spec enables TAO's wandb section: no test run logs to Weights & Biases, online or offline,
# unless it says so (tests/trainer/test_wandb.py).
os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture
def results_dir(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    return path


def _draw_dataset(root, num_images: int, size: int, seed: int, num_classes: int = 3):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    colors = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img = Image.new("RGB", (size, size), (rng.randint(0, 60),) * 3)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            cat = rng.randint(1, num_classes)
            w, h = rng.randint(size // 6, size // 2), rng.randint(size // 6, size // 2)
            x, y = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colors[(cat - 1) % len(colors)])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        name = f"{image_id:05d}.jpg"
        img.save(image_dir / name, quality=95)
        images.append({"id": image_id, "file_name": name, "width": size, "height": size})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": f"class_{i}"} for i in range(1, num_classes + 1)]}
    json_file = root / "annotations.json"
    json_file.write_text(json.dumps(coco))
    return {"image_dir": str(image_dir), "json_file": str(json_file)}


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A handful of 64x64 images of coloured rectangles (3 classes, ids 1..3), COCO JSON."""
    root = tmp_path_factory.mktemp("tiny_coco")
    return {"train": _draw_dataset(root / "train", 8, 64, seed=1),
            "val": _draw_dataset(root / "val", 4, 64, seed=2),
            "num_classes": 4}


@pytest.fixture
def write_spec(tmp_path):
    """Write a spec dict as YAML and return its path."""
    def _write(spec: dict, name: str = "spec.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        return str(path)
    return _write


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores: keep each test process from oversubscribing them.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    # A task run in this process sizes torch's threads from OMP_NUM_THREADS (runtime/cpu_budget.py):
    # a test that changes it leaves the next tests the count they started with.
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    if threads is not None:
        torch.set_num_threads(threads)


# What a 2-core CPU machine of this project's kind cannot have: the only skips allowed once the set-up has
# run (scripts/test.sh sets DDETR_SETUP_COMPLETE). Any other skip means the set-up failed to provide a tool.
MACHINE_KIND_SKIPS = ("CUDA device", "GPU", "TensorRT", "tensorrt")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("DDETR_SETUP_COMPLETE") == "1") or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(word in reason for word in MACHINE_KIND_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped after a complete set-up (scripts/test.sh), which owes this test its tools: {reason}"
