"""The spec schema against TAO's deformable_detr tables, held here as data.

Each row: (field path, type, default, accepted values) as TAO documents them. Sources:
- "doc": TAO's documentation tables for deformable_detr (the rows quoted in issue 20:
  train.optim.lr_monitor, export.on_cpu, convert.image_dir_name/label_dir_name) and the
  TAO Deploy table for gen_trt_engine;
- "code": TAO's config dataclasses (tao_pytorch_backend,
  nvidia_tao_pytorch/cv/deformable_detr/config/default_config.py and deploy.py), whose
  defaults the tables document;
- "issue": the table's value as issue 20's field-by-field check of the tables states it,
  where TAO's code at hand says otherwise (the row notes the code's value): the table wins.
A default of None in the table for a list or a mapping means "none given"; the schema
holds an empty one. accepted: a list of choices, a (low, high) range (None = open), or
None when the table names no constraint beyond the type.

Where this project differs on purpose, DIFFERENCES says how and why (the README lists the
same); fields the tables lack are ADDITIONS, with their reason. A schema change that
drifts from a row, or a new field in neither list, fails here.
"""
from __future__ import annotations

import dataclasses
import typing

import pytest

from deformable_detr.config import ExperimentConfig, SpecError, spec_from_dict

GC_VIT = ["gc_vit_xxtiny", "gc_vit_xtiny", "gc_vit_tiny", "gc_vit_small", "gc_vit_base"]

# (path, type, default, accepted, source)
TABLE = [
    # model
    ("model.pretrained_backbone_path", "string", None, None, "code"),
    ("model.backbone", "string", "resnet_50", ["resnet_50", *GC_VIT], "code"),
    ("model.num_queries", "int", 300, (1, None), "code"),
    ("model.num_feature_levels", "int", 4, (1, 4), "code"),
    ("model.return_interm_indices", "list", [1, 2, 3, 4], None, "code"),
    ("model.with_box_refine", "bool", True, None, "code"),
    ("model.cls_loss_coef", "float", 2.0, (0.0, None), "code"),
    ("model.bbox_loss_coef", "float", 5.0, (0.0, None), "code"),
    ("model.giou_loss_coef", "float", 2.0, (0.0, None), "code"),
    ("model.focal_alpha", "float", 0.25, None, "code"),
    ("model.clip_max_norm", "float", 0.1, None, "code"),
    ("model.dropout_ratio", "float", 0.3, (0.0, 1.0), "code"),
    ("model.hidden_dim", "int", 256, None, "code"),
    ("model.nheads", "int", 8, None, "code"),
    ("model.enc_layers", "int", 6, (1, None), "code"),
    ("model.dec_layers", "int", 6, (1, None), "code"),
    ("model.dim_feedforward", "int", 1024, (1, None), "code"),
    ("model.dec_n_points", "int", 4, (1, None), "code"),
    ("model.enc_n_points", "int", 4, (1, None), "code"),
    ("model.num_select", "int", 100, (1, None), "issue"),  # TAO's newer code: 300
    ("model.aux_loss", "bool", True, None, "code"),
    ("model.dilation", "bool", False, None, "code"),
    ("model.train_backbone", "bool", True, None, "code"),
    ("model.loss_types", "list", ["labels", "boxes"], None, "code"),
    ("model.backbone_names", "list", ["backbone.0"], None, "code"),
    ("model.linear_proj_names", "list", ["reference_points", "sampling_offsets"], None, "code"),
    # dataset
    ("dataset.train_sampler", "string", "default_sampler",
     ["default_sampler", "non_uniform_sampler", "uniform_sampler"], "code"),
    ("dataset.train_data_sources", "list", None, None, "code"),
    ("dataset.val_data_sources", "list", None, None, "code"),
    ("dataset.test_data_sources", "dict", None, None, "code"),
    ("dataset.infer_data_sources", "dict", None, None, "code"),
    ("dataset.batch_size", "int", 4, (1, None), "code"),
    ("dataset.workers", "int", 8, None, "code"),
    ("dataset.pin_memory", "bool", True, None, "code"),
    ("dataset.num_classes", "int", 91, (1, None), "code"),
    ("dataset.dataset_type", "string", "serialized", ["serialized", "default"], "code"),
    ("dataset.eval_class_ids", "list", None, None, "code"),
    ("dataset.augmentation", "collection", None, None, "code"),
    ("dataset.augmentation.scales", "list", [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], None, "code"),
    ("dataset.augmentation.input_mean", "list", [0.485, 0.456, 0.406], None, "code"),
    ("dataset.augmentation.input_std", "list", [0.229, 0.224, 0.225], None, "code"),
    ("dataset.augmentation.train_random_resize", "list", [400, 500, 600], None, "code"),
    ("dataset.augmentation.horizontal_flip_prob", "float", 0.5, (0.0, 1.0), "code"),
    ("dataset.augmentation.train_random_crop_min", "int", 384, (1, None), "code"),
    ("dataset.augmentation.train_random_crop_max", "int", 600, (1, None), "code"),
    ("dataset.augmentation.random_resize_max_size", "int", 1333, (1, None), "code"),
    ("dataset.augmentation.test_random_resize", "int", 800, (1, None), "code"),
    ("dataset.augmentation.fixed_padding", "bool", True, None, "code"),
    ("dataset.augmentation.fixed_random_crop", "int", None, None, "code"),
    # train
    ("train.freeze", "list", [], None, "code"),
    ("train.num_gpus", "int", 1, (1, None), "code"),
    ("train.num_nodes", "int", 1, (1, None), "code"),
    ("train.resume_training_checkpoint_path", "string", None, None, "code"),
    ("train.pretrained_model_path", "string", None, None, "code"),
    ("train.validation_interval", "int", 1, (1, None), "code"),
    ("train.clip_grad_norm", "float", 0.1, (0.0, None), "code"),
    ("train.is_dry_run", "bool", False, None, "code"),
    ("train.results_dir", "string", None, None, "code"),
    ("train.num_epochs", "int", 50, (1, None), "code"),
    ("train.checkpoint_interval", "int", 1, (1, None), "code"),
    ("train.optim", "collection", None, None, "code"),
    ("train.optim.optimizer", "string", "AdamW", ["AdamW", "SGD"], "code"),
    ("train.optim.lr_monitor", "string", "val_loss", ["val_loss", "train_loss"], "doc"),
    ("train.optim.lr", "float", 2e-4, (0.0, None), "code"),
    ("train.optim.lr_backbone", "float", 2e-5, (0.0, None), "code"),
    ("train.optim.lr_linear_proj_mult", "float", 0.1, (0.0, None), "code"),
    ("train.optim.momentum", "float", 0.9, (0.0, 1.0), "code"),
    ("train.optim.weight_decay", "float", 1e-4, (0.0, None), "code"),
    ("train.optim.lr_scheduler", "string", "MultiStep", ["MultiStep", "StepLR"], "code"),
    ("train.optim.lr_steps", "list", [40], None, "code"),
    ("train.optim.lr_step_size", "int", 40, (1, None), "code"),
    ("train.optim.lr_decay", "float", 0.1, (0.0, None), "code"),
    ("train.precision", "string", "fp32", ["fp32", "fp16"], "code"),
    ("train.distributed_strategy", "string", "ddp", ["ddp", "ddp_sharded"], "issue"),  # TAO's newer code: fsdp
    ("train.activation_checkpoint", "bool", True, None, "code"),
    ("train.verbose", "bool", False, None, "code"),
    # evaluate
    ("evaluate.num_gpus", "int", 1, (1, None), "code"),
    ("evaluate.results_dir", "string", None, None, "code"),
    ("evaluate.input_width", "int", None, (1, None), "code"),
    ("evaluate.input_height", "int", None, (1, None), "code"),
    ("evaluate.checkpoint", "string", None, None, "code"),
    ("evaluate.trt_engine", "string", None, None, "code"),
    ("evaluate.conf_threshold", "float", 0.0, (0.0, 1.0), "code"),
    # inference
    ("inference.num_gpus", "int", 1, (1, None), "code"),
    ("inference.results_dir", "string", None, None, "code"),
    ("inference.checkpoint", "string", None, None, "code"),
    ("inference.trt_engine", "string", None, None, "code"),
    ("inference.color_map", "dict", None, None, "code"),
    ("inference.conf_threshold", "float", 0.5, (0.0, 1.0), "code"),
    ("inference.is_internal", "bool", False, None, "code"),
    ("inference.input_width", "int", None, (1, None), "code"),
    ("inference.input_height", "int", None, (1, None), "code"),
    # export
    ("export.results_dir", "string", None, None, "code"),
    ("export.gpu_id", "int", 0, (0, None), "code"),
    ("export.checkpoint", "string", None, None, "code"),
    ("export.onnx_file", "string", None, None, "code"),
    ("export.on_cpu", "bool", True, None, "doc"),  # TAO's code says False; the table True
    ("export.input_channel", "int", 3, [3], "code"),
    ("export.input_width", "int", 960, None, "code"),
    ("export.input_height", "int", 544, None, "code"),
    ("export.opset_version", "int", 12, None, "code"),
    ("export.batch_size", "int", -1, (-1, None), "code"),
    ("export.verbose", "bool", False, None, "code"),
    # gen_trt_engine (TAO Deploy)
    ("gen_trt_engine.results_dir", "string", None, None, "code"),
    ("gen_trt_engine.gpu_id", "int", 0, (0, None), "code"),
    ("gen_trt_engine.onnx_file", "string", None, None, "doc"),
    ("gen_trt_engine.trt_engine", "string", None, None, "doc"),
    ("gen_trt_engine.input_channel", "int", 3, [3], "doc"),
    ("gen_trt_engine.input_width", "int", 960, (1, None), "doc"),
    ("gen_trt_engine.input_height", "int", 544, (1, None), "doc"),
    ("gen_trt_engine.opset_version", "int", 12, None, "code"),
    ("gen_trt_engine.batch_size", "int", -1, (-1, None), "doc"),
    ("gen_trt_engine.verbose", "bool", False, None, "code"),
    ("gen_trt_engine.tensorrt", "collection", None, None, "doc"),
    ("gen_trt_engine.tensorrt.data_type", "string", "fp32", ["fp32", "fp16"], "doc"),
    ("gen_trt_engine.tensorrt.workspace_size", "int", 1024, (1024, None), "doc"),
    ("gen_trt_engine.tensorrt.min_batch_size", "int", 1, (1, None), "doc"),
    ("gen_trt_engine.tensorrt.opt_batch_size", "int", 1, (1, None), "doc"),
    ("gen_trt_engine.tensorrt.max_batch_size", "int", 1, (1, None), "doc"),
    ("gen_trt_engine.tensorrt.calibration", "collection", None, None, "doc"),
    ("gen_trt_engine.tensorrt.calibration.cal_image_dir", "list", None, None, "code"),
    ("gen_trt_engine.tensorrt.calibration.cal_cache_file", "string", None, None, "code"),
    ("gen_trt_engine.tensorrt.calibration.cal_batch_size", "int", 1, (1, None), "code"),
    ("gen_trt_engine.tensorrt.calibration.cal_batches", "int", 1, (1, None), "code"),
    # convert
    ("convert.input_source", "string", None, None, "doc"),
    ("convert.results_dir", "string", None, None, "code"),
    ("convert.image_dir_name", "string", None, None, "doc"),
    ("convert.label_dir_name", "string", None, None, "doc"),
    ("convert.image_extension", "string", ".jpg", None, "code"),
    ("convert.num_shards", "int", 32, (1, None), "issue"),  # TAO's code: 20
    ("convert.num_partitions", "int", 1, (1, None), "code"),
    ("convert.mapping_path", "string", None, None, "code"),
    # top level
    *[(section, "collection", None, None, "code") for section in
      ("model", "dataset", "train", "evaluate", "inference", "export", "gen_trt_engine", "convert")],
    ("results_dir", "string", None, None, "code"),
    ("encryption_key", "string", None, None, "code"),
]

# path -> how this project differs on purpose, and why. `default` / `choices_added` /
# `accepted` give the schema's side; `documented_value_loads` says whether a spec that
# writes the table's default still loads.
DIFFERENCES = {
    "export.opset_version": dict(
        default=17, accepted=(16, 20), documented_value_loads=False,
        reason="the plain-op export needs GridSample, opset 16+; TAO's own export code uses 17"),
    "gen_trt_engine.opset_version": dict(
        default=17, accepted=(16, 20), documented_value_loads=False,
        reason="the ONNX files export writes are opset 16+ (GridSample); TAO Deploy's code uses 17"),
    "convert.image_dir_name": dict(
        default="images", documented_value_loads=False,
        reason="TAO's converter cannot run without the folder names (None is no folder); KITTI's usual "
               "names as defaults let that layout convert as is, and a spec naming them behaves as in TAO"),
    "convert.label_dir_name": dict(
        default="labels", documented_value_loads=False,
        reason="as convert.image_dir_name"),
    "train.precision": dict(
        choices_added=["bf16"], reason="bfloat16 autocast on GPUs (and CPUs) that have it"),
    "model.backbone": dict(
        choices_added=["resnet_18", "resnet_34", "resnet_101"],
        reason="the other torchvision ResNets, for small and large models"),
    "train.optim.lr_scheduler": dict(
        choices_added=["AutoReduce"],
        reason="the schedule lr_monitor serves (TAO's table documents lr_monitor 'for the AutoReduce "
               "scheduler'): ReduceLROnPlateau on lr_monitor by lr_decay after `patience` checks"),
    "dataset.num_classes": dict(
        accepted=(2, None), reason="category id 0 is the background: one class needs num_classes 2"),
    "gen_trt_engine.input_width": dict(
        accepted=(32, None), reason="the backbone's stride-32 level needs 32 pixels (TAO Deploy's code: 32)"),
    "gen_trt_engine.input_height": dict(accepted=(32, None), reason="as gen_trt_engine.input_width"),
    "dataset.augmentation.fixed_random_crop": dict(
        accepted=(32, None), reason="the crop must be divisible by 32 (the backbone's stride)"),
}

# Schema fields that TAO's tables lack, and why they exist.
ADDITIONS = {
    "train.seed": "reproducible runs; TAO seeds internally",
    "train.auto_resume": "restarted pods continue from their newest checkpoint",
    "train.metrics_port": "Prometheus /metrics for the operator and dashboards",
    "train.optim.patience": "AutoReduce: checks without improvement tolerated before a decay (TAO's AutoReduce "
                            "schedulers name it so)",
    "model.two_stage": "two-stage Deformable DETR from the original repository",
}

_SCALARS = {str: "string", int: "int", float: "float", bool: "bool"}


def _schema_fields(cls=ExperimentConfig, prefix: str = "") -> dict:
    """Every schema field: dotted path -> (type hint, dataclasses.Field, default value)."""
    out = {}
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, hints[f.name]
        out[path] = (hint, f, getattr(instance, f.name))
        if dataclasses.is_dataclass(hint):
            out.update(_schema_fields(hint, path + "."))
    return out


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return _type_name(args[0])
    if typing.get_origin(hint) is list:
        return "list"
    if typing.get_origin(hint) is dict:
        return "dict"
    if dataclasses.is_dataclass(hint):
        return "collection" if hint.__name__.endswith("Config") else "dict"
    return _SCALARS[hint]


def _none_given(documented, ours) -> bool:
    """The table's None for a list or mapping: none given, which the schema holds as an empty one."""
    return documented is None and isinstance(ours, (list, dict)) and not ours


def _same(documented, ours) -> bool:
    if _none_given(documented, ours):
        return True
    if isinstance(documented, float):
        return isinstance(ours, float) and documented == pytest.approx(ours)
    return type(documented) is type(ours) and documented == ours


FIELDS = _schema_fields()


def test_rows_are_unique_and_differences_name_rows():
    paths = [row[0] for row in TABLE]
    assert len(paths) == len(set(paths))
    assert set(DIFFERENCES) <= set(paths)
    assert all(d["reason"] for d in DIFFERENCES.values()) and all(ADDITIONS.values())
    assert {row[4] for row in TABLE} == {"doc", "code", "issue"}


@pytest.mark.parametrize("path, kind, default, accepted, source", TABLE, ids=[row[0] for row in TABLE])
def test_schema_field_matches_the_table(path, kind, default, accepted, source):
    assert path in FIELDS, f"{path}: documented by TAO but missing from the schema"
    hint, field, ours = FIELDS[path]
    assert _type_name(hint) == kind
    difference = DIFFERENCES.get(path, {})
    meta = field.metadata
    if kind != "collection":
        expected = difference.get("default", default)
        assert _same(expected, ours), f"{path}: default {ours!r}, the table says {default!r}"
    if isinstance(accepted, list):
        choices = meta.get("choices")
        assert choices is not None, f"{path}: the table accepts only {accepted}"
        assert choices == [*accepted, *difference.get("choices_added", [])] or (
            set(choices) == {*accepted, *difference.get("choices_added", [])})
    elif "accepted" in difference:
        assert (meta.get("min"), meta.get("max")) == difference["accepted"]
    elif isinstance(accepted, tuple):
        # Every value the table accepts loads: the schema's range holds the table's.
        low, high = accepted
        assert meta.get("min") is None or meta["min"] <= low, f"{path}: minimum {meta.get('min')} > {low}"
        assert meta.get("max") is None or (high is not None and meta["max"] >= high), \
            f"{path}: maximum {meta.get('max')}, the table allows up to {high}"


def test_every_schema_field_is_documented_or_an_addition():
    documented = {row[0] for row in TABLE}
    undeclared = [p for p in FIELDS if p not in documented and p not in ADDITIONS]
    assert not undeclared, f"fields in neither TAO's table nor ADDITIONS: {undeclared}"
    assert set(ADDITIONS) <= set(FIELDS)


def _nested(path: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def test_a_spec_written_from_the_table_loads_with_the_documented_values():
    raw: dict = {}
    written = []
    for path, kind, default, _accepted, _source in TABLE:
        if kind == "collection" or not DIFFERENCES.get(path, {}).get("documented_value_loads", True):
            continue
        if _none_given(default, FIELDS[path][2]):
            continue  # written as nothing
        _merge(raw, _nested(path, default))
        written.append(path)
    spec = spec_from_dict(raw)
    for path in written:
        value = spec
        for part in path.split("."):
            value = getattr(value, part)
        documented = next(row[2] for row in TABLE if row[0] == path)
        assert _same(documented, value), f"{path}: loaded as {value!r}, written as {documented!r}"


@pytest.mark.parametrize("path", [p for p, d in DIFFERENCES.items() if not d.get("documented_value_loads", True)])
def test_a_refused_documented_value_says_what_is_accepted(path):
    documented = next(row[2] for row in TABLE if row[0] == path)
    with pytest.raises(SpecError, match=rf"^{path.replace('.', '[.]')}: "):
        spec_from_dict(_nested(path, documented))


def test_tao_code_spelling_of_lr_monitor_loads():
    assert spec_from_dict(_nested("train.optim.monitor_name", "train_loss")).train.optim.lr_monitor == "train_loss"
