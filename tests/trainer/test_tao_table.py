"""The spec schema against TAO's deformable_detr tables, held here as data.

Each row: (field path, type, default, accepted values) as TAO documents them. Sources:
- "doc": TAO's documentation tables for deformable_detr (the rows quoted in issue 20:
  train.optim.lr_monitor, export.on_cpu, convert.image_dir_name/label_dir_name) and the
  TAO Deploy table for gen_trt_engine;
- "code": TAO's config dataclasses (tao_pytorch_backend,
  nvidia_tao_pytorch/cv/deformable_detr/config/default_config.py and deploy.py), whose
  defaults the tables document;
- "issue": the table's value as issue 20's field-by-field check of the tables states it,
  where TAO's code at hand says otherwise (the row notes the code's value): the table wins;
- "tao5.5" / "tao6": fields of TAO's current schema that the tables lack (issue 29), as the
  config dataclasses of TAO 5.5 (tao_pytorch_backend, nvidia_tao_pytorch/core/common_config.py
  and cv/deformable_detr/config/) and TAO 6.x (the shared nvidia_tao_core/config package:
  common/common_config.py, common/mlops.py, common/quantization/, deformable_detr/) define
  them; the tag names the first release that has the field.
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

GC_VIT = ["gc_vit_xxtiny", "gc_vit_xtiny", "gc_vit_tiny", "gc_vit_small", "gc_vit_base",
          "gc_vit_large", "gc_vit_large_384"]

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
    ("gen_trt_engine.tensorrt.data_type", "string", "fp32", ["fp32", "fp16", "int8"], "tao6"),  # table: no int8
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
    # TAO 5.5's code schema beyond the tables: the common train/evaluate/inference fields, cudnn, wandb
    ("train.gpu_ids", "list", [0], None, "tao5.5"),
    ("train.seed", "int", 1234, (-1, None), "tao5.5"),
    ("train.cudnn", "collection", None, None, "tao5.5"),
    ("train.cudnn.benchmark", "bool", False, None, "tao5.5"),
    ("train.cudnn.deterministic", "bool", True, None, "tao5.5"),
    ("evaluate.gpu_ids", "list", [0], None, "tao5.5"),
    ("evaluate.num_nodes", "int", 1, (1, None), "tao5.5"),
    ("inference.gpu_ids", "list", [0], None, "tao5.5"),
    ("inference.num_nodes", "int", 1, (1, None), "tao5.5"),
    ("inference.outline_width", "int", 3, (1, None), "tao5.5"),
    ("wandb", "collection", None, None, "tao5.5"),
    ("wandb.enable", "bool", True, None, "tao5.5"),
    ("wandb.project", "string", "TAO Toolkit", None, "tao5.5"),
    ("wandb.entity", "string", "", None, "tao5.5"),
    ("wandb.tags", "list", ["training", "tao-toolkit"], None, "tao5.5"),
    ("wandb.reinit", "bool", False, None, "tao5.5"),
    ("wandb.sync_tensorboard", "bool", False, None, "tao5.5"),
    ("wandb.save_code", "bool", False, None, "tao5.5"),
    ("wandb.name", "string", "TAO Toolkit training experiment", None, "tao5.5"),
    # TAO 5.5's convert spec (flat at the top level in TAO's files; the convert section here)
    ("convert.data_root", "string", None, None, "tao5.5"),
    ("convert.val_split", "int", 0, (0, None), "tao5.5"),
    ("convert.partition_mode", "string", None, None, "tao5.5"),
    # TAO 6.x
    ("model_name", "string", "deformable_detr", None, "tao6"),
    ("model.dld_model_dir_path", "string", None, None, "tao6"),
    ("wandb.group", "string", "", None, "tao6"),
    ("wandb.run_id", "string", "", None, "tao6"),
    ("train.checkpoint_interval_unit", "string", "epoch", ["epoch", "step"], "tao6"),
    ("train.input_width", "int", None, (1, None), "tao6"),
    ("train.input_height", "int", None, (1, None), "tao6"),
    ("evaluate.batch_size", "int", -1, (-1, None), "tao6"),
    ("inference.batch_size", "int", -1, (-1, None), "tao6"),
    ("export.format", "string", "onnx", ["onnx", "xdl"], "tao6"),
    ("export.serialize_nvdsinfer", "bool", False, None, "tao6"),
    ("gen_trt_engine.timing_cache", "string", None, None, "tao6"),
    ("gen_trt_engine.tensorrt.layers_precision", "list", [], None, "tao6"),
    ("dataset.quant_calibration_data_sources", "dict", None, None, "tao6"),
    ("quantize", "collection", None, None, "tao6"),
    ("quantize.backend", "string", "torchao", ["modelopt.pytorch", "torchao", "modelopt.onnx"], "tao6"),
    ("quantize.mode", "string", "weight_only_ptq", ["static_ptq", "weight_only_ptq"], "tao6"),
    ("quantize.algorithm", "string", "minmax",
     ["minmax", "max", "entropy", "awq_clip", "awq_lite", "awq_full", "rtn_dq"], "tao6"),
    ("quantize.layers", "list", [], None, "tao6"),
    ("quantize.skip_names", "list", [], None, "tao6"),
    ("quantize.model_path", "string", "", None, "tao6"),
    ("quantize.results_dir", "string", "", None, "tao6"),
    ("quantize.backend_kwargs", "dict", {}, None, "tao6"),
    ("quantize.device", "string", "cuda", None, "tao6"),
]

# Values TAO's schema accepts beyond a row's default, each with the value this project holds after
# loading it (TAO's other spelling of a value is stored in this project's).
TAO_VALUES = [
    ("train.distributed_strategy", "fsdp", "ddp_sharded"),
    ("train.distributed_strategy", "ddp", "ddp"),
    ("gen_trt_engine.tensorrt.data_type", "INT8", "int8"),
    ("gen_trt_engine.tensorrt.data_type", "FP16", "fp16"),
    ("model.backbone", "gc_vit_large", "gc_vit_large"),
    ("model.backbone", "gc_vit_large_384", "gc_vit_large_384"),
    ("train.checkpoint_interval_unit", "step", "step"),
    ("train.cudnn.benchmark", True, True),
    ("train.gpu_ids", [0, 1, 3], [0, 1, 3]),
    ("inference.outline_width", 1, 1),
    ("evaluate.batch_size", 16, 16),
    ("convert.partition_mode", "sequence", "sequence"),
    ("convert.num_shards", 0, 0),
    ("export.format", "xdl", "xdl"),
    ("gen_trt_engine.tensorrt.layers_precision", ["/backbone/*:fp32"], ["/backbone/*:fp32"]),
    ("quantize.device", "cuda:1", "cuda:1"),
    ("quantize.backend_kwargs", {"opset": 17, "calibrate_per_node": True}, {"opset": 17, "calibrate_per_node": True}),
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
    "convert.val_split": dict(
        accepted=(0, 99), reason="TAO's converter asserts val_split < 100 when it runs; refused at load here"),
    "convert.partition_mode": dict(
        choices_added=["random", "sequence"],
        reason="TAO's schema takes any string and its converter refuses all but null and random when it runs; "
               "the two modes TAO documents are the accepted values here"),
    "model_name": dict(
        choices_added=["deformable_detr"],
        reason="TAO takes any name (for its model-agnostic entry point); a spec for another model is refused"),
    "wandb.name": dict(
        default="TAO Toolkit training experiment",
        reason="the default TAO's experiment config sets (its WandBConfig class default is "
               "'TAO Toolkit Training')"),
    "quantize.device": dict(reason="TAO's pattern (cuda, cpu, trt, cuda:N) is checked by the loader, not "
                                   "as a list of choices"),
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
    "train.auto_resume": "restarted pods continue from their newest checkpoint",
    "train.metrics_port": "Prometheus /metrics for the operator and dashboards",
    "train.step_timeout_s": "the step watchdog: a hung rank exits (retryably) instead of holding its GPUs forever",
    "train.optim.patience": "AutoReduce: checks without improvement tolerated before a decay (TAO's AutoReduce "
                            "schedulers name it so)",
    "model.two_stage": "two-stage Deformable DETR from the original repository",
    "dataset.verify_images": "check every training image before the first step, for those who want problems "
                             "found up front",
    "dataset.max_skipped_share": "how many unusable training images are skipped before training stops",
    "model.attention_padding": "whether deformable attention masks padded pixels: TAO's models were trained "
                               "unmasked, the original's masked; auto follows the checkpoint",
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
    assert {row[4] for row in TABLE} == {"doc", "code", "issue", "tao5.5", "tao6"}


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
    if "choices_added" in difference and accepted is None:
        assert meta.get("choices") == difference["choices_added"]
    elif isinstance(accepted, list):
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


@pytest.mark.parametrize("path, value, held", TAO_VALUES, ids=[f"{p}={v}" for p, v, _ in TAO_VALUES])
def test_values_of_taos_schema_load(path, value, held):
    loaded = spec_from_dict(_nested(path, value))
    for part in path.split("."):
        loaded = getattr(loaded, part)
    assert loaded == held


# A train spec as TAO 5.5 writes one out: every section of its experiment config, with TAO's spellings.
TAO_5_5_SPEC = """
encryption_key: tlt_encode
results_dir: /results
wandb:
  enable: true
  project: TAO Toolkit
  entity: ''
  tags: [training, tao-toolkit]
  reinit: false
  sync_tensorboard: false
  save_code: false
  name: TAO Toolkit training experiment
model:
  pretrained_backbone_path: /results/pretrained/resnet50_nvimagenetv2.pth.tar
  backbone: resnet_50
  num_queries: 300
  num_feature_levels: 4
  cls_loss_coef: 2.0
  bbox_loss_coef: 5.0
  giou_loss_coef: 2.0
  with_box_refine: true
  num_select: 100
  return_interm_indices: [1, 2, 3, 4]
  focal_alpha: 0.25
  clip_max_norm: 0.1
  nheads: 8
  dropout_ratio: 0.3
  hidden_dim: 256
  enc_layers: 6
  dec_layers: 6
  dim_feedforward: 1024
  dec_n_points: 4
  enc_n_points: 4
  aux_loss: true
  dilation: false
  train_backbone: true
  loss_types: [labels, boxes]
  backbone_names: [backbone.0]
  linear_proj_names: [reference_points, sampling_offsets]
dataset:
  train_sampler: default_sampler
  train_data_sources:
    - image_dir: /data/train2017/
      json_file: /data/annotations/instances_train2017.json
  val_data_sources:
    - image_dir: /data/val2017/
      json_file: /data/annotations/instances_val2017.json
  test_data_sources:
    image_dir: /data/val2017/
    json_file: /data/annotations/instances_val2017.json
  infer_data_sources:
    image_dir: [/data/val2017/]
    classmap: /data/annotations/classmap.txt
  batch_size: 4
  workers: 8
  pin_memory: true
  dataset_type: serialized
  num_classes: 91
  eval_class_ids: null
  augmentation:
    scales: [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    input_mean: [0.485, 0.456, 0.406]
    input_std: [0.229, 0.224, 0.225]
    train_random_resize: [400, 500, 600]
    horizontal_flip_prob: 0.5
    train_random_crop_min: 384
    train_random_crop_max: 600
    random_resize_max_size: 1333
    test_random_resize: 800
    fixed_padding: TRUE
    fixed_random_crop: null
train:
  num_gpus: 1
  gpu_ids: [0]
  num_nodes: 1
  seed: 1234
  cudnn:
    benchmark: false
    deterministic: true
  num_epochs: 50
  checkpoint_interval: 1
  validation_interval: 1
  resume_training_checkpoint_path: null
  results_dir: null
  freeze: []
  pretrained_model_path: null
  clip_grad_norm: 0.1
  is_dry_run: false
  optim:
    optimizer: AdamW
    monitor_name: val_loss
    lr: 2e-4
    lr_backbone: 2e-5
    lr_linear_proj_mult: 0.1
    momentum: 0.9
    weight_decay: 1e-4
    lr_scheduler: MultiStep
    lr_steps: [40]
    lr_step_size: 40
    lr_decay: 0.1
  precision: fp32
  distributed_strategy: ddp
  activation_checkpoint: true
  verbose: false
evaluate:
  num_gpus: 1
  gpu_ids: [0]
  num_nodes: 1
  checkpoint: /results/train/model_epoch_049.pth
  results_dir: null
  input_width: null
  input_height: null
  trt_engine: null
  conf_threshold: 0.0
inference:
  num_gpus: 1
  gpu_ids: [0]
  num_nodes: 1
  checkpoint: /results/train/model_epoch_049.pth
  results_dir: null
  trt_engine: null
  color_map: {person: green, car: red}
  conf_threshold: 0.5
  is_internal: false
  input_width: 960
  input_height: 544
  outline_width: 3
export:
  results_dir: null
  gpu_id: 0
  checkpoint: /results/train/model_epoch_049.pth
  onnx_file: /results/export/model.onnx
  on_cpu: false
  input_channel: 3
  input_width: 960
  input_height: 544
  opset_version: 17
  batch_size: -1
  verbose: false
gen_trt_engine:
  results_dir: null
  gpu_id: 0
  onnx_file: /results/export/model.onnx
  trt_engine: /results/gen_trt_engine/model.engine
  input_channel: 3
  input_width: 960
  input_height: 544
  opset_version: 17
  batch_size: -1
  verbose: false
  tensorrt:
    data_type: FP32
    workspace_size: 1024
    min_batch_size: 4
    opt_batch_size: 4
    max_batch_size: 4
    calibration:
      cal_image_dir: [/data/val2017/]
      cal_cache_file: /results/gen_trt_engine/cal.bin
      cal_batch_size: 1
      cal_batches: 1
"""

# What TAO 6.x adds and changes (nvidia_tao_core's schema): model_name, wandb group/run_id, the
# checkpoint unit, fsdp, seed -1 and the rest, over the same file.
TAO_6_CHANGES = {
    "model_name": "deformable_detr",
    "wandb": {"group": "", "run_id": ""},
    "model": {"backbone": "gc_vit_large", "dld_model_dir_path": None, "num_select": 300},
    "dataset": {"quant_calibration_data_sources": {"image_dir": "/data/calib", "json_file": "/data/calib.json"},
                "augmentation": {"fixed_padding": True}},
    "train": {"seed": -1, "checkpoint_interval_unit": "step", "distributed_strategy": "fsdp",
              "input_width": 960, "input_height": 544, "cudnn": {"benchmark": True, "deterministic": False}},
    "evaluate": {"batch_size": -1},
    "inference": {"batch_size": 8, "input_width": 640, "input_height": 640},
    "export": {"format": "onnx", "serialize_nvdsinfer": True, "input_width": 640, "input_height": 640},
    "gen_trt_engine": {"timing_cache": "/results/gen_trt_engine/timing.cache",
                       "tensorrt": {"data_type": "INT8", "layers_precision": ["/transformer/*:fp32"],
                                    "min_batch_size": 1, "opt_batch_size": 1, "max_batch_size": 1}},
    "quantize": {"backend": "modelopt.pytorch", "mode": "static_ptq", "algorithm": "max",
                 "layers": [{"module_name": "*", "weights": {"dtype": "fp8_e4m3fn"},
                             "activations": {"dtype": "fp8_e4m3fn", "observer_or_fake_quant": "minmax",
                                             "quant_axis": None, "observer_or_fake_quant_kwargs": {}}}],
                 "skip_names": ["*head*"], "model_path": "", "results_dir": "", "backend_kwargs": {},
                 "device": "cuda"},
}


def _spec_file(tmp_path, text: str, changes: dict | None = None):
    import yaml

    raw = yaml.safe_load(text)
    if changes:
        _merge(raw, changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_full_tao_5_5_spec_file_loads_with_its_values(tmp_path):
    from deformable_detr.config import load_spec

    spec = load_spec(str(_spec_file(tmp_path, TAO_5_5_SPEC)))
    assert spec.gen_trt_engine.tensorrt.data_type == "fp32"          # TAO writes FP32
    assert spec.train.optim.lr_monitor == "val_loss"                 # TAO's code name, monitor_name
    assert spec.train.cudnn.deterministic is True and spec.train.gpu_ids == [0]
    assert spec.inference.outline_width == 3 and spec.inference.color_map == {"person": "green", "car": "red"}
    assert spec.wandb.name == "TAO Toolkit training experiment" and spec.wandb.tags == ["training", "tao-toolkit"]
    assert spec.dataset.augmentation.fixed_padding is True and spec.train.seed == 1234
    assert spec.gen_trt_engine.tensorrt.calibration.cal_cache_file == "/results/gen_trt_engine/cal.bin"


def test_a_full_tao_6_spec_file_loads_with_its_values(tmp_path):
    from deformable_detr.config import load_spec

    spec = load_spec(str(_spec_file(tmp_path, TAO_5_5_SPEC, TAO_6_CHANGES)))
    assert spec.model_name == "deformable_detr" and spec.model.backbone == "gc_vit_large"
    assert spec.train.distributed_strategy == "ddp_sharded"
    assert spec.train.checkpoint_interval_unit == "step"
    assert (spec.train.cudnn.benchmark, spec.train.cudnn.deterministic) == (True, False)
    assert 0 <= spec.train.seed < 2 ** 31                        # -1: one picked at random
    assert spec.gen_trt_engine.tensorrt.data_type == "int8"
    assert spec.gen_trt_engine.tensorrt.layers_precision == ["/transformer/*:fp32"]
    assert spec.gen_trt_engine.timing_cache == "/results/gen_trt_engine/timing.cache"
    assert spec.export.serialize_nvdsinfer is True and spec.inference.batch_size == 8
    assert spec.dataset.quant_calibration_data_sources.image_dir == "/data/calib"
    layer = spec.quantize.layers[0]
    assert (layer.module_name, layer.weights.dtype, layer.activations.observer_or_fake_quant) == (
        "*", "fp8_e4m3fn", "minmax")


def test_seed_minus_one_is_picked_at_random_and_recorded(tmp_path):
    from deformable_detr.config import dump_spec, load_spec
    from deformable_detr.config.loader import pick_seed

    path = _spec_file(tmp_path, "train: {seed: -1}")
    seeds = {load_spec(str(path)).train.seed for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s < 2 ** 31 for s in seeds)
    spec = load_spec(str(path))
    assert f"seed: {spec.train.seed}\n" in dump_spec(spec)      # the effective spec records the pick
    # Ranks started on their own agree: the seed comes from what they share.
    minus_one = spec_from_dict({"train": {"seed": -1}})
    env = {"WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "DDETR_JOB_NAME": "j"}
    assert pick_seed(minus_one, env).train.seed == pick_seed(minus_one, dict(env)).train.seed
    assert pick_seed(minus_one, env).train.seed != pick_seed(minus_one, {**env, "DDETR_JOB_NAME": "k"}).train.seed
    assert pick_seed(spec_from_dict({"train": {"seed": 7}}), env).train.seed == 7


def test_taos_flat_convert_spec_loads_into_the_convert_section():
    flat = {"input_source": "/data/sources.txt", "results_dir": "/data/converted", "data_root": "/data",
            "image_dir_name": "image_2", "label_dir_name": "label_2", "val_split": 10, "num_shards": 20,
            "num_partitions": 2, "partition_mode": "random", "image_extension": ".png", "mapping_path": None}
    convert = spec_from_dict(flat).convert
    assert dataclasses.asdict(convert) == {**flat}                # TAO writes into results_dir itself
    with pytest.raises(SpecError, match=r"^num_shards: 20 conflicts with convert.num_shards: 4; "):
        spec_from_dict({**flat, "convert": {"num_shards": 4}})


@pytest.mark.parametrize("raw, message", [
    ({"train": {"seed": -2}}, r"^train.seed: -2 is out of range; accepted: >= -1$"),
    ({"train": {"distributed_strategy": "deepspeed"}},
     r"^train.distributed_strategy: 'deepspeed' is not accepted; choose one of ddp, ddp_sharded, fsdp \(= ddp_sharded\)"),
    ({"train": {"checkpoint_interval_unit": "epochs"}},
     r"^train.checkpoint_interval_unit: 'epochs' is not accepted; choose one of epoch, step"),
    ({"train": {"gpu_ids": [0, 0]}}, r"^train.gpu_ids: \[0, 0\]; accepted: distinct GPU indices >= 0$"),
    ({"inference": {"outline_width": 0}}, r"^inference.outline_width: 0 is out of range; accepted: >= 1$"),
    ({"model_name": "dino"}, r"^model_name: 'dino' is not accepted; choose one of deformable_detr"),
    ({"model": {"dld_model_dir_path": "/dld"}}, r"^model.dld_model_dir_path: '/dld'; models edited by TAO's DLD"),
    ({"quantize": {"device": "gpu"}}, r"^quantize.device: 'gpu' is not accepted; choose one of cuda, cpu, trt, "),
    ({"quantize": {"layers": [{"module_name": "*", "weights": {"dtype": 8}}]}},
     r"^quantize.layers\[0\].weights.dtype: got 8; expected a string$"),
    ({"wandb": {"tags": "x", "enabled": True}}, r"^wandb.enabled: unknown field; did you mean 'wandb.enable'"),
    ({"convert": {"partition_mode": "random"}},
     r"^convert.num_partitions: 1 with partition_mode random; accepted: 2 "),
    ({"convert": {"num_partitions": 3}}, r"^convert.num_partitions: 3 needs convert.partition_mode; "),
    ({"convert": {"val_split": 100}}, r"^convert.val_split: 100 is out of range; accepted: 0..99$"),
])
def test_bad_values_of_taos_new_fields_are_one_clear_line(raw, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(raw)
