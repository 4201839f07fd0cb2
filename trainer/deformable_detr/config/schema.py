"""The experiment spec: TAO deformable_detr's tables as dataclasses.

These dataclasses are the single source of truth. The CLI validates against them,
`default-spec` prints them with their help text, and the operator's CRD schema is
generated from them (see `jsonschema.py`).

Every field carries metadata: `help` (shown in the commented default spec),
optionally `choices`, `min`, `max`, `case_insensitive` (choices match in any
case and are stored in the canonical spelling), and `aliases` (other names a spec may
use for the same field, e.g. TAO's code name where its documentation names it otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def spec_field(default: Any = None, help: str = "", *, choices=None, min=None, max=None,
               case_insensitive: bool = False, aliases=None, factory=None):
    """A dataclass field with the validation metadata the loader reads."""
    meta = {"help": help}
    if aliases:
        meta["aliases"] = list(aliases)
    if choices is not None:
        meta["choices"] = list(choices)
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if case_insensitive:
        meta["case_insensitive"] = True
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


BACKBONES = [
    "resnet_18", "resnet_34", "resnet_50", "resnet_101",
    "gc_vit_xxtiny", "gc_vit_xtiny", "gc_vit_tiny", "gc_vit_small", "gc_vit_base",
]


@dataclass
class DataSource:
    """One COCO-format source: an image folder and its annotation file."""

    image_dir: str = spec_field(None, "folder holding the images that json_file names")
    json_file: str = spec_field(None, "COCO-format annotation JSON")


@dataclass
class InferDataSource:
    """Bare image folders for inference, with the class names of the model's ids."""

    image_dir: List[str] = spec_field([], "image folder, or a list of folders")
    classmap: Optional[str] = spec_field(None, "text file: one class name a line, line i is category id i+1")


@dataclass
class AugmentationConfig:
    scales: List[int] = spec_field(
        [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
        "shorter-side sizes for the random multi-scale resize in training")
    input_mean: List[float] = spec_field([0.485, 0.456, 0.406], "per-channel pixel mean (RGB, 0..1)")
    input_std: List[float] = spec_field([0.229, 0.224, 0.225], "per-channel pixel standard deviation")
    train_random_resize: List[int] = spec_field(
        [400, 500, 600], "shorter-side sizes of the resize that precedes the random crop")
    horizontal_flip_prob: float = spec_field(0.5, "probability of a horizontal flip", min=0.0, max=1.0)
    train_random_crop_min: int = spec_field(384, "smallest side of the random crop", min=1)
    train_random_crop_max: int = spec_field(600, "largest side of the random crop", min=1)
    random_resize_max_size: int = spec_field(1333, "cap on the longer side after any resize", min=1)
    test_random_resize: int = spec_field(800, "shorter-side size for evaluation and inference", min=1)
    fixed_padding: bool = spec_field(
        True, "pad every image to (random_resize_max_size, random_resize_max_size) so batch shapes are constant")
    fixed_random_crop: Optional[int] = spec_field(
        None, "large-scale jitter output size (ViT backbones); divisible by 32; null = off", min=32)


@dataclass
class DatasetConfig:
    train_sampler: str = spec_field(
        "default_sampler", "sampler over the training sources",
        choices=["default_sampler", "non_uniform_sampler", "uniform_sampler"])
    train_data_sources: List[DataSource] = spec_field([], "training sources: list of {image_dir, json_file}")
    val_data_sources: List[DataSource] = spec_field([], "validation sources: list of {image_dir, json_file}")
    test_data_sources: Optional[DataSource] = spec_field(None, "evaluation source: {image_dir, json_file}")
    infer_data_sources: Optional[InferDataSource] = spec_field(
        None, "inference source: {image_dir: [folders], classmap: file}")
    batch_size: int = spec_field(4, "images per GPU (per process) and step", min=1)
    workers: int = spec_field(8, "data-loader worker processes per GPU", min=0)
    pin_memory: bool = spec_field(True, "pin host memory for faster copies to the GPU")
    num_classes: int = spec_field(91, "number of classes: max category id + 1 (id 0 is background)", min=2)
    dataset_type: str = spec_field(
        "serialized", "serialized: annotations in shared flat buffers; default: Python objects",
        choices=["serialized", "default"])
    eval_class_ids: Optional[List[int]] = spec_field(None, "category ids to evaluate; null = all")
    augmentation: AugmentationConfig = spec_field(factory=AugmentationConfig, help="training and test augmentation")


@dataclass
class ModelConfig:
    pretrained_backbone_path: Optional[str] = spec_field(
        None, "backbone state dict (torchvision or timm naming) to start from")
    backbone: str = spec_field("resnet_50", "backbone network", choices=BACKBONES)
    num_queries: int = spec_field(300, "number of object queries", min=1)
    num_feature_levels: int = spec_field(4, "feature levels fed to the transformer", min=1, max=4)
    return_interm_indices: List[int] = spec_field(
        [1, 2, 3, 4], "backbone stages to use (1..4 for ResNet layer1..layer4); "
        "length must equal num_feature_levels")
    with_box_refine: bool = spec_field(True, "iterative bounding-box refinement in the decoder")
    two_stage: bool = spec_field(False, "two-stage Deformable DETR (encoder proposals seed the queries)")
    cls_loss_coef: float = spec_field(2.0, "weight of the focal classification loss and cost", min=0.0)
    bbox_loss_coef: float = spec_field(5.0, "weight of the L1 box loss and cost", min=0.0)
    giou_loss_coef: float = spec_field(2.0, "weight of the GIoU loss and cost", min=0.0)
    focal_alpha: float = spec_field(0.25, "alpha of the sigmoid focal loss", min=0.0, max=1.0)
    clip_max_norm: float = spec_field(0.1, "kept for TAO compatibility; train.clip_grad_norm is used", min=0.0)
    dropout_ratio: float = spec_field(0.3, "dropout in the transformer", min=0.0, max=1.0)
    hidden_dim: int = spec_field(256, "transformer width", min=8)
    nheads: int = spec_field(8, "attention heads", min=1)
    enc_layers: int = spec_field(6, "encoder layers", min=1)
    dec_layers: int = spec_field(6, "decoder layers", min=1)
    dim_feedforward: int = spec_field(1024, "feed-forward width in the transformer", min=1)
    dec_n_points: int = spec_field(4, "sampling points per level and head in the decoder", min=1)
    enc_n_points: int = spec_field(4, "sampling points per level and head in the encoder", min=1)
    num_select: int = spec_field(100, "detections kept per image by the post-processor", min=1)
    aux_loss: bool = spec_field(True, "losses on every decoder layer")
    dilation: bool = spec_field(False, "dilate the last ResNet stage instead of striding")
    train_backbone: bool = spec_field(True, "train the backbone (false freezes it)")
    loss_types: List[str] = spec_field(["labels", "boxes"], "loss terms", )
    backbone_names: List[str] = spec_field(["backbone.0"], "parameter-name prefixes trained at lr_backbone")
    linear_proj_names: List[str] = spec_field(
        ["reference_points", "sampling_offsets"], "parameter-name parts trained at lr * lr_linear_proj_mult")


@dataclass
class OptimConfig:
    optimizer: str = spec_field("AdamW", "optimizer", choices=["AdamW", "SGD"])
    # TAO's table names this lr_monitor, TAO's code monitor_name: both spellings load, into this one field.
    lr_monitor: str = spec_field(
        "val_loss", "quantity the AutoReduce schedule watches: val_loss (loss on val_data_sources at each "
        "validation) or train_loss (the epoch's mean training loss); MultiStep and StepLR ignore it",
        choices=["val_loss", "train_loss"], aliases=["monitor_name"])
    lr: float = spec_field(2e-4, "learning rate of the transformer and heads", min=0.0)
    lr_backbone: float = spec_field(2e-5, "learning rate of the backbone", min=0.0)
    lr_linear_proj_mult: float = spec_field(0.1, "lr multiplier of sampling_offsets and reference_points", min=0.0)
    momentum: float = spec_field(0.9, "SGD momentum", min=0.0, max=1.0)
    weight_decay: float = spec_field(1e-4, "weight decay", min=0.0)
    lr_scheduler: str = spec_field(
        "MultiStep", "learning-rate schedule: MultiStep decays by lr_decay at lr_steps, StepLR every "
        "lr_step_size epochs, AutoReduce when lr_monitor has not improved by 0.1% for patience checks",
        choices=["MultiStep", "StepLR", "AutoReduce"])
    lr_steps: List[int] = spec_field([40], "epochs at which MultiStep decays the lr")
    lr_step_size: int = spec_field(40, "StepLR period in epochs", min=1)
    lr_decay: float = spec_field(0.1, "decay factor of every schedule (AutoReduce: below 1)", min=0.0)
    patience: int = spec_field(
        1, "AutoReduce: checks of lr_monitor (epochs; validations for val_loss) without improvement "
        "that are tolerated; the next one decays the lr", min=0)


@dataclass
class TrainConfig:
    freeze: List[str] = spec_field([], "module-name prefixes to freeze, e.g. [backbone, input_proj]")
    num_gpus: int = spec_field(1, "processes (GPUs) per node", min=1)
    num_nodes: int = spec_field(1, "nodes in the gang", min=1)
    seed: int = spec_field(1234, "random seed (data order, initialisation, augmentation)", min=0)
    resume_training_checkpoint_path: Optional[str] = spec_field(None, "checkpoint to resume training from exactly")
    auto_resume: bool = spec_field(True, "resume from the newest checkpoint in the results directory")
    pretrained_model_path: Optional[str] = spec_field(
        None, "checkpoint to fine-tune from (class heads re-initialised if num_classes differs)")
    validation_interval: int = spec_field(1, "validate every N epochs", min=1)
    clip_grad_norm: float = spec_field(0.1, "gradient-norm clip; 0 = off", min=0.0)
    is_dry_run: bool = spec_field(False, "build everything, run no step")
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/train")
    num_epochs: int = spec_field(50, "training epochs", min=1)
    checkpoint_interval: int = spec_field(1, "save a checkpoint every N epochs", min=1)
    optim: OptimConfig = spec_field(factory=OptimConfig, help="optimizer and schedule")
    precision: str = spec_field("fp32", "numeric precision", choices=["fp32", "fp16", "bf16"],
                                case_insensitive=True)
    distributed_strategy: str = spec_field(
        "ddp", "ddp: DistributedDataParallel; ddp_sharded: optimizer state and gradients sharded",
        choices=["ddp", "ddp_sharded"])
    activation_checkpoint: bool = spec_field(True, "recompute encoder/decoder layers in backward to save memory")
    metrics_port: int = spec_field(0, "Prometheus /metrics port on rank 0; 0 = off (DDETR_METRICS_PORT overrides)",
                                   min=0, max=65535)
    verbose: bool = spec_field(False, "more log output")


@dataclass
class EvaluateConfig:
    num_gpus: int = spec_field(1, "processes that share the images", min=1)
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/evaluate")
    input_width: Optional[int] = spec_field(None, "TensorRT engine input width", min=1)
    input_height: Optional[int] = spec_field(None, "TensorRT engine input height", min=1)
    checkpoint: Optional[str] = spec_field(None, "model checkpoint (.pth) to evaluate")
    trt_engine: Optional[str] = spec_field(None, "TensorRT engine to evaluate instead of a checkpoint")
    conf_threshold: float = spec_field(0.0, "drop detections scoring below this before COCO scoring",
                                       min=0.0, max=1.0)


@dataclass
class InferenceConfig:
    num_gpus: int = spec_field(1, "processes that share the images", min=1)
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/inference")
    checkpoint: Optional[str] = spec_field(None, "model checkpoint (.pth)")
    trt_engine: Optional[str] = spec_field(None, "TensorRT engine to run instead of a checkpoint")
    color_map: Dict[str, str] = spec_field({}, "class name -> box colour (name or #rrggbb)")
    conf_threshold: float = spec_field(0.5, "detections scoring below this are not written", min=0.0, max=1.0)
    is_internal: bool = spec_field(False, "TAO internal layout of output folders")
    input_width: Optional[int] = spec_field(None, "TensorRT engine input width", min=1)
    input_height: Optional[int] = spec_field(None, "TensorRT engine input height", min=1)


@dataclass
class ExportConfig:
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/export")
    gpu_id: int = spec_field(0, "GPU used for export", min=0)
    checkpoint: Optional[str] = spec_field(None, "model checkpoint (.pth) to export")
    onnx_file: Optional[str] = spec_field(None, "ONNX file to write")
    # TAO's table: true (TAO's code says false). Plain ops run in any ONNX runtime and TensorRT alike.
    on_cpu: bool = spec_field(
        True, "true: deformable attention as plain ONNX ops (GridSample), traced on the CPU; "
        "false: one MultiscaleDeformableAttnPlugin_TRT node per attention layer (needs TAO's TensorRT plugin)")
    input_channel: int = spec_field(3, "input channels (only 3)", choices=[3])
    input_width: int = spec_field(960, "input width", min=32)
    input_height: int = spec_field(544, "input height", min=32)
    # TAO's table lists 12, but the plain-op export needs GridSample (opset 16+): 17 as TAO's own code uses.
    opset_version: int = spec_field(17, "ONNX opset (16..20); 12 of the TAO table cannot express GridSample",
                                    min=16, max=20)
    batch_size: int = spec_field(-1, "batch dimension; -1 = dynamic", min=-1)
    verbose: bool = spec_field(False, "print the exported graph")


@dataclass
class CalibrationConfig:
    cal_image_dir: List[str] = spec_field([], "INT8 calibration image folders")
    cal_cache_file: Optional[str] = spec_field(None, "INT8 calibration cache")
    cal_batch_size: int = spec_field(1, "calibration batch size", min=1)
    cal_batches: int = spec_field(1, "calibration batches", min=1)


@dataclass
class TensorRTConfig:
    data_type: str = spec_field("fp32", "engine precision", choices=["fp32", "fp16"], case_insensitive=True)
    workspace_size: int = spec_field(1024, "builder workspace in MiB", min=1)
    min_batch_size: int = spec_field(1, "smallest batch of the optimisation profile", min=1)
    opt_batch_size: int = spec_field(1, "batch the profile optimises for", min=1)
    max_batch_size: int = spec_field(1, "largest batch of the optimisation profile", min=1)
    calibration: CalibrationConfig = spec_field(factory=CalibrationConfig, help="INT8 calibration (unused for fp32/fp16)")


@dataclass
class GenTrtEngineConfig:
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/gen_trt_engine")
    gpu_id: int = spec_field(0, "GPU that builds the engine", min=0)
    onnx_file: Optional[str] = spec_field(None, "ONNX file to build from")
    trt_engine: Optional[str] = spec_field(None, "engine file to write")
    input_channel: int = spec_field(3, "input channels", choices=[3])
    input_width: int = spec_field(960, "input width", min=32)
    input_height: int = spec_field(544, "input height", min=32)
    opset_version: int = spec_field(17, "opset of the ONNX file", min=16, max=20)
    batch_size: int = spec_field(-1, "batch dimension; -1 = dynamic", min=-1)
    verbose: bool = spec_field(False, "verbose TensorRT log")
    tensorrt: TensorRTConfig = spec_field(factory=TensorRTConfig, help="TensorRT builder settings")


@dataclass
class ConvertConfig:
    input_source: Optional[str] = spec_field(None, ".txt file listing KITTI data-source folders, one a line")
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/convert")
    # TAO's table has no default (None): its converter cannot run without the names. KITTI's usual
    # folder names as defaults let that layout convert as is; a spec naming them behaves as in TAO.
    image_dir_name: str = spec_field("images", "image folder name under each source (TAO: no default)")
    label_dir_name: str = spec_field("labels", "KITTI label folder name under each source (TAO: no default)")
    image_extension: str = spec_field(".jpg", "extension of the image files")
    num_shards: int = spec_field(32, "COCO JSON shards per partition", min=1)
    num_partitions: int = spec_field(1, "random partitions (folds) of each source", min=1)
    mapping_path: Optional[str] = spec_field(None, "JSON {target class: [source classes]}; null = TAO's default")


@dataclass
class ExperimentConfig:
    model: ModelConfig = spec_field(factory=ModelConfig, help="the detector")
    dataset: DatasetConfig = spec_field(factory=DatasetConfig, help="data sources, loading and augmentation")
    train: TrainConfig = spec_field(factory=TrainConfig, help="the train task")
    evaluate: EvaluateConfig = spec_field(factory=EvaluateConfig, help="the evaluate task")
    inference: InferenceConfig = spec_field(factory=InferenceConfig, help="the inference task")
    export: ExportConfig = spec_field(factory=ExportConfig, help="the export task")
    gen_trt_engine: GenTrtEngineConfig = spec_field(factory=GenTrtEngineConfig, help="the gen_trt_engine task")
    convert: ConvertConfig = spec_field(factory=ConvertConfig, help="the convert task (KITTI -> sharded COCO)")
    results_dir: Optional[str] = spec_field(None, "root output folder; each task writes under {results_dir}/{task}")
    encryption_key: Optional[str] = spec_field(None, "key that encrypts written checkpoints and decrypts read ones")
