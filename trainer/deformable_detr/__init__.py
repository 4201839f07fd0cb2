"""Deformable DETR with TAO's tasks and spec format, trained with torchrun."""
from importlib.metadata import PackageNotFoundError, version

try:  # the version has one home: the distribution's metadata (trainer/pyproject.toml)
    __version__ = version("deformable-detr")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "unknown"
