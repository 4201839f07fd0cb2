"""Data: COCO datasets, TAO augmentation, samplers, loaders, inference images, KITTI convert."""
from .collate import collate_fn
from .dataset import CocoDetection, build_dataset
from .images import UnreadableImageError
from .inference import InferenceImages, read_classmap
from .loader import build_dataloader
from .transforms import build_eval_transform, build_train_transform, fixed_pad_size

__all__ = ["CocoDetection", "InferenceImages", "UnreadableImageError", "build_dataloader", "build_dataset",
           "build_eval_transform", "build_train_transform", "collate_fn", "fixed_pad_size", "read_classmap"]
