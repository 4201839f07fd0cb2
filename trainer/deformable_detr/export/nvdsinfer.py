"""DeepStream's nvinfer config and labels file beside an exported ONNX file (`export.serialize_nvdsinfer`).

What TAO writes: `labels.txt` (one class name a line, line k naming class id k: `background`
for id 0 when the ids start at 1, `unknown` for ids no category names) and
`nvdsinfer_config.yaml` (the `property` and `class-attrs-all` groups of gst-nvinfer, keys in
DeepStream's dashed spelling, lists joined with `;`), set for TAO's custom box parser of
Deformable DETR. The pixel offsets and scale factor follow dataset.augmentation's mean and std
(TAO's fixed values are those of the default mean and std).
"""
from __future__ import annotations

from typing import Sequence

import yaml

from ..config.schema import ExperimentConfig
from ..data.coco_json import expand_json_files, read_json
from ..data.inference import read_classmap
from ..errors import UsageError
from ..runtime import storage
from .onnx_export import OUTPUT_NAMES

LABELS_FILE = "labels.txt"
CONFIG_FILE = "nvdsinfer_config.yaml"

# TAO's DeepStream settings for Deformable DETR (its custom parser library and function).
PARSER_FUNCTION = "NvDsInferParseCustomDDETRTAO"
PARSER_LIBRARY = "/opt/nvidia/deepstream/deepstream/lib/libnvds_infercustomparser_tao.so"


def class_names_by_id(categories: Sequence[dict]) -> list[str]:
    """Names indexed by category id, 0..max id: TAO's labels file lines."""
    by_id = {int(c["id"]): str(c["name"]) for c in categories}
    names = ["unknown"] * (max(by_id) + 1)
    for cat_id, name in by_id.items():
        names[cat_id] = name
    if min(by_id) > 0:
        names[0] = "background"
    return names


def export_class_names(spec: ExperimentConfig) -> list[str]:
    """The model's class names: the categories of dataset.val_data_sources (as TAO reads them),
    else dataset.infer_data_sources.classmap (line k names id k)."""
    categories: dict[int, dict] = {}
    for k, source in enumerate(spec.dataset.val_data_sources):
        field = f"dataset.val_data_sources[{k}].json_file"
        for path in expand_json_files(source.json_file, field):
            raw = read_json(path)
            for category in raw.get("categories", []) if isinstance(raw, dict) else []:
                categories.setdefault(int(category["id"]), category)
    if categories:
        return class_names_by_id(list(categories.values()))
    infer = spec.dataset.infer_data_sources
    if infer is not None and infer.classmap:
        names = read_classmap(infer.classmap)
        return class_names_by_id([{"id": k + 1, "name": name} for k, name in enumerate(names)])
    raise UsageError("export.serialize_nvdsinfer: the DeepStream labels file needs the class names; set "
                     "dataset.val_data_sources (their categories) or dataset.infer_data_sources.classmap")


def _dashed(group: dict) -> dict:
    return {key.replace("_", "-"): ";".join(map(str, value)) if isinstance(value, list) else value
            for key, value in group.items()}


def nvdsinfer_config(onnx_name: str, num_classes: int, input_shape: Sequence[int],
                     mean: Sequence[float], std: Sequence[float]) -> str:
    """gst-nvinfer's config (YAML) for the ONNX file `onnx_name` with `num_classes` outputs per query."""
    scale = 1.0 / (255.0 * sum(std) / len(std))  # nvinfer has one scale for all channels
    prop = {
        "net_scale_factor": round(scale, 13),
        "offsets": [round(255.0 * m, 6) for m in mean],
        "labelfile_path": LABELS_FILE,
        "onnx_file": onnx_name,
        "cluster_mode": 4,            # no clustering: the model's queries are the detections
        "workspace_size": 1048576,
        "gie_unique_id": 1,
        "network_type": 0,            # detector
        "maintain_aspect_ratio": 1,
        "output_tensor_meta": 1,
        "output_blob_names": list(OUTPUT_NAMES),
        "num_detected_classes": num_classes,
        "network_mode": 2,            # FP16
        "model_color_format": 0,      # RGB
        "infer_dims": list(input_shape),
        "parse_bbox_func_name": PARSER_FUNCTION,
        "custom_lib_path": PARSER_LIBRARY,
    }
    class_attrs = {"pre_cluster_threshold": 0.5, "topk": 20}
    return yaml.safe_dump({"class-attrs-all": _dashed(class_attrs), "property": _dashed(prop)})


def write_deepstream_files(spec: ExperimentConfig, onnx_file: str) -> list[str]:
    """Write labels.txt and nvdsinfer_config.yaml into the ONNX file's folder; returns their paths."""
    names = export_class_names(spec)
    export, aug = spec.export, spec.dataset.augmentation
    folder = onnx_file.rstrip("/").rsplit("/", 1)[0] if "/" in onnx_file else "."
    labels_path, config_path = storage.join(folder, LABELS_FILE), storage.join(folder, CONFIG_FILE)
    text = nvdsinfer_config(onnx_file.rsplit("/", 1)[-1], len(names),
                            (export.input_channel, export.input_height, export.input_width),
                            aug.input_mean, aug.input_std)
    storage.write_text(labels_path, "\n".join(names) + "\n")
    storage.write_text(config_path, text)
    return [labels_path, config_path]
