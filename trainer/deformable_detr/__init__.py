"""Deformable DETR with TAO's tasks and spec format, trained with torchrun."""

__version__ = "0.1.0"
