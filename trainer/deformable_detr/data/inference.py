"""Bare image folders for the inference task, and the class map that names model ids."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..config.schema import ExperimentConfig
from ..errors import UsageError, relative_to_cwd
from ..runtime.logging import get_logger
from ..runtime.progress import progress
from . import remote
from .prefetch import fetch_all
from .images import UnreadableImageError, load_image, verify_image
from .transforms import build_eval_transform

log = get_logger("data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_classmap(path: str) -> list[str]:
    """Class names, one a line: line i names category id i + 1."""
    try:
        with remote.open_file(path, "r", encoding="utf-8") as fh:
            names = [line.strip() for line in fh]
    except (FileNotFoundError, remote.ArtifactNotFound):
        raise UsageError(f"dataset.infer_data_sources.classmap: file not found: {path}"
                         + relative_to_cwd(path)) from None
    except IsADirectoryError:
        raise UsageError(f"dataset.infer_data_sources.classmap: {path} is a folder, expected a file "
                         "(class names, one a line)") from None
    while names and not names[-1]:
        names.pop()
    if not names:
        raise UsageError(f"dataset.infer_data_sources.classmap: {path} is empty; expected one class name a line")
    for k, name in enumerate(names):
        if not name:
            raise UsageError(f"{path}: line {k + 1} is empty; expected one class name a line")
    return names


def list_images(folders: list[str]) -> list[str]:
    paths = []
    for folder in folders:
        if remote.is_file(folder):
            raise UsageError(f"dataset.infer_data_sources.image_dir: {folder} is a file, expected a folder of images")
        if not remote.is_dir(folder):
            raise UsageError(f"dataset.infer_data_sources.image_dir: folder not found: {folder}"
                             + relative_to_cwd(folder))
        paths += sorted(os.path.join(folder, name) for name in remote.files_in(folder)
                        if name.lower().endswith(IMAGE_EXTENSIONS))
    return paths


class InferenceImages(Dataset):
    """Every image in `dataset.infer_data_sources.image_dir`, with the evaluation resize.

    Files that do not open as images are logged and skipped up front (`skipped` lists
    them); a file that passes that header check but fails to decode later raises
    `UnreadableImageError` naming it. Target: `orig_size`, `size` (int64 h, w),
    `path`, and `image_id` (the index).
    """

    def __init__(self, spec: ExperimentConfig) -> None:
        source = spec.dataset.infer_data_sources
        if source is None or not source.image_dir:
            raise UsageError("dataset.infer_data_sources.image_dir: not set; expected image folder(s)")
        folders = [source.image_dir] if isinstance(source.image_dir, str) else list(source.image_dir)
        self.paths: list[str] = []
        self.skipped: list[str] = []
        paths = list_images(folders)
        fetch_all(paths)  # s3:// images: into the node cache, concurrently, before each is checked
        for path in progress(paths, desc="checking images"):
            try:
                verify_image(path)
            except UnreadableImageError as err:
                log.warning("skipping %s", err)
                self.skipped.append(path)
            else:
                self.paths.append(path)
        if self.skipped:
            log.warning("skipped %d unreadable image(s) of %d", len(self.skipped), len(self.skipped) + len(self.paths))
        if not self.paths:
            raise UsageError(f"dataset.infer_data_sources.image_dir: no readable image ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"in {', '.join(folders)}")
        self.transform = build_eval_transform(spec.dataset.augmentation)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.paths[index]
        image = load_image(path)
        height, width = image.shape[-2:]
        empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
                 "labels": torch.zeros(0, dtype=torch.int64)}
        image, target = self.transform(image, empty)
        return image.as_subclass(torch.Tensor), {
            "orig_size": torch.tensor([height, width], dtype=torch.int64), "size": target["size"],
            "path": path, "image_id": torch.tensor(index, dtype=torch.int64)}
