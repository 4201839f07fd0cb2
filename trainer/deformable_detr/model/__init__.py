"""Deformable DETR: `build_model(spec) -> (model, criterion, postprocessor)`."""
from .build import apply_freeze, build_model
from .criterion import SetCriterion
from .detector import DeformableDETR
from .matcher import HungarianMatcher
from .postprocess import PostProcess

__all__ = ["build_model", "apply_freeze", "DeformableDETR", "SetCriterion", "HungarianMatcher", "PostProcess"]
