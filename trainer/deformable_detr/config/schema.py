"""The experiment spec: TAO deformable_detr's tables as dataclasses.

These dataclasses are the single source of truth. The CLI validates against them,
`default-spec` prints them with their help text, and the operator's CRD schema is
generated from them (see `jsonschema.py`).

Every field carries metadata: `help` (shown in the commented default spec),
optionally `choices`, `min`, `max`, `case_insensitive` (choices match in any
case and are stored in the canonical spelling), `aliases` (other names a spec may
use for the same field, e.g. TAO's code name where its documentation names it otherwise) and
`value_aliases` (another spelling of a value, stored as the value it names: TAO 6's `fsdp`).

Sections and fields of TAO's schema that drive work this project does not do (the
`quantize` task, `dataset.quant_calibration_data_sources`) are held here too, so TAO's spec
files load and are checked; a task that would need them says so in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def spec_field(default: Any = None, help: str = "", *, choices=None, min=None, max=None,
               case_insensitive: bool = False, aliases=None, value_aliases=None, factory=None):
    """A dataclass field with the validation metadata the loader reads."""
    meta = {"help": help}
    if aliases:
        meta["aliases"] = list(aliases)
    if value_aliases:
        meta["value_aliases"] = dict(value_aliases)
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
    "gc_vit_xxtiny", "gc_vit_xtiny", "gc_vit_tiny", "gc_vit_small", "gc_vit_base", "gc_vit_large", "gc_vit_large_384",
]


@dataclass
class DataSource:
    """One COCO-format source: an image folder and its annotation file."""

    image_dir: str = spec_field(None, "folder holding the images that json_file names")
    json_file: str = spec_field(None, "COCO-format annotation JSON")


@dataclass
class QuantCalibrationDataSource:
    """TAO 6's images for quantization calibration (the quantize task, not part of this project)."""

    image_dir: Optional[str] = spec_field(None, "folder of calibration images")
    json_file: Optional[str] = spec_field(None, "COCO-format annotation JSON (optional)")


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
        True, "pad every image to TAO's fixed canvas, which follows its orientation: max(scales) x "
        "random_resize_max_size in training, test_random_resize x random_resize_max_size in evaluation and "
        "inference (landscape; portrait the other way round; a batch mixing both pads to the larger of each side)")
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
    quant_calibration_data_sources: Optional[QuantCalibrationDataSource] = spec_field(
        None, "TAO's quantize task's calibration images {image_dir, json_file}; loaded and checked only "
        "(this project has no quantize task)")
    batch_size: int = spec_field(4, "images per GPU (per process) and step", min=1)
    workers: int = spec_field(8, "data-loader worker processes per GPU", min=0)
    pin_memory: bool = spec_field(True, "pin host memory for faster copies to the GPU")
    num_classes: int = spec_field(91, "number of classes: max category id + 1 (id 0 is background)", min=2)
    dataset_type: str = spec_field(
        "serialized", "serialized: annotations in shared flat buffers; default: Python objects",
        choices=["serialized", "default"])
    eval_class_ids: Optional[List[int]] = spec_field(None, "category ids to evaluate; null = all")
    verify_images: bool = spec_field(
        False, "train: decode every training image and check its size against the annotation file before the "
        "first step, and refuse the run in one line listing the unusable ones (else each is skipped when read)")
    max_skipped_share: float = spec_field(
        0.05, "train: an unusable training image (unreadable, empty, a size unlike the annotation file's) is "
        "skipped with a warning and replaced by the next usable one; training stops, after saving a "
        "checkpoint, once more than this share of the training images were skipped", min=0.0, max=1.0)
    augmentation: AugmentationConfig = spec_field(factory=AugmentationConfig, help="training and test augmentation")


@dataclass
class ModelConfig:
    pretrained_backbone_path: Optional[str] = spec_field(
        None, "backbone state dict (torchvision or timm naming) to start from")
    dld_model_dir_path: Optional[str] = spec_field(
        None, "TAO 6: a model edited by TAO's DLD tool; not supported here (null only)")
    backbone: str = spec_field("resnet_50", "backbone network", choices=BACKBONES)
    num_queries: int = spec_field(300, "number of object queries", min=1)
    num_feature_levels: int = spec_field(4, "feature levels fed to the transformer", min=1, max=4)
    return_interm_indices: List[int] = spec_field(
        [1, 2, 3, 4], "backbone stages to use (1..4 for ResNet layer1..layer4); "
        "length must equal num_feature_levels")
    with_box_refine: bool = spec_field(True, "iterative bounding-box refinement in the decoder")
    two_stage: bool = spec_field(False, "two-stage Deformable DETR (encoder proposals seed the queries)")
    attention_padding: str = spec_field(
        "auto", "what deformable attention samples at padded pixels: unmasked (TAO's: their values as computed), "
        "masked (the original Deformable-DETR's: zeros); auto follows the checkpoint (TAO's unmasked, original "
        "and earlier ones of this project masked, ours as recorded) and TAO's for a fresh model",
        choices=["auto", "unmasked", "masked"])
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
class CudnnConfig:
    benchmark: bool = spec_field(False, "torch.backends.cudnn.benchmark: let cuDNN pick the fastest kernels")
    deterministic: bool = spec_field(True, "torch.backends.cudnn.deterministic: deterministic cuDNN kernels only")


@dataclass
class WandbConfig:
    """TAO's Weights & Biases settings (the top-level `wandb` section)."""

    enable: bool = spec_field(True, "log training to Weights & Biases (the wandb extra): online when logged in and "
                                    "W&B answers, else offline under the train results folder")
    project: str = spec_field("TAO Toolkit", "W&B project")
    entity: Optional[str] = spec_field("", "W&B entity (team or user); empty = the default")
    group: Optional[str] = spec_field("", "W&B run group")
    tags: List[str] = spec_field(["training", "tao-toolkit"], "W&B run tags")
    reinit: bool = spec_field(False, "allow several runs in one process")
    sync_tensorboard: bool = spec_field(False, "sync TensorBoard logs to W&B")
    save_code: bool = spec_field(False, "save the code with the run")
    name: str = spec_field("TAO Toolkit training experiment", "W&B run name")
    run_id: str = spec_field("", "W&B run id to resume; empty = a new run")


@dataclass
class TrainConfig:
    freeze: List[str] = spec_field([], "module-name prefixes to freeze, e.g. [backbone, input_proj]")
    num_gpus: int = spec_field(1, "processes (GPUs) per node", min=1)
    gpu_ids: List[int] = spec_field(
        [0], "GPU indices to train on; as TAO, num_gpus and gpu_ids are reconciled (the larger count wins, "
        "ids 0..N-1 when their count differs)")
    num_nodes: int = spec_field(1, "nodes in the gang", min=1)
    seed: int = spec_field(1234, "random seed (data order, initialisation, augmentation); -1 = pick one at "
                                 "random (recorded in the effective spec)", min=-1)
    cudnn: CudnnConfig = spec_field(factory=CudnnConfig, help="cuDNN flags")
    resume_training_checkpoint_path: Optional[str] = spec_field(None, "checkpoint to resume training from exactly")
    auto_resume: bool = spec_field(True, "resume from the newest checkpoint in the results directory")
    pretrained_model_path: Optional[str] = spec_field(
        None, "checkpoint to fine-tune from (class heads re-initialised if num_classes differs)")
    validation_interval: int = spec_field(1, "validate every N epochs", min=1)
    clip_grad_norm: float = spec_field(0.1, "gradient-norm clip; 0 = off", min=0.0)
    is_dry_run: bool = spec_field(False, "build everything, run no step")
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/train")
    num_epochs: int = spec_field(50, "training epochs", min=1)
    checkpoint_interval: int = spec_field(1, "save a checkpoint every N epochs (or steps)", min=1)
    checkpoint_interval_unit: str = spec_field("epoch", "unit of checkpoint_interval", choices=["epoch", "step"])
    optim: OptimConfig = spec_field(factory=OptimConfig, help="optimizer and schedule")
    precision: str = spec_field("fp32", "numeric precision", choices=["fp32", "fp16", "bf16"],
                                case_insensitive=True)
    distributed_strategy: str = spec_field(
        "ddp", "ddp: DistributedDataParallel; ddp_sharded (TAO 6: fsdp): parameters, gradients and optimizer "
        "state sharded", choices=["ddp", "ddp_sharded"], value_aliases={"fsdp": "ddp_sharded"})
    activation_checkpoint: bool = spec_field(True, "recompute encoder/decoder layers in backward to save memory")
    metrics_port: int = spec_field(0, "Prometheus /metrics port on rank 0; 0 = off (DDETR_METRICS_PORT overrides)",
                                   min=0, max=65535)
    verbose: bool = spec_field(False, "more log output")
    step_timeout_s: Optional[int] = spec_field(
        None, "step watchdog: a rank that finishes no step for this many seconds (counted from the start of "
        "training; validation and checkpoint saves included) logs every thread's stack, saves it under hangs/ and "
        "exits 200 (retried from the newest checkpoint); collectives then time out after twice this unless "
        "DDETR_DIST_TIMEOUT_S is set; null = off", min=1)
    input_width: Optional[int] = spec_field(None, "TAO 6: input width (recorded; training sizes come from "
                                                  "dataset.augmentation)", min=1)
    input_height: Optional[int] = spec_field(None, "TAO 6: input height (as input_width)", min=1)


_GPU_IDS_HELP = ("GPU indices to run on (CUDA_VISIBLE_DEVICES); as TAO, num_gpus and gpu_ids are reconciled "
                 "(the larger count wins, ids 0..N-1 when their count differs)")
_BATCH_HELP = "images per forward pass; -1 = dataset.batch_size"


@dataclass
class EvaluateConfig:
    num_gpus: int = spec_field(1, "processes that share the images", min=1)
    gpu_ids: List[int] = spec_field([0], _GPU_IDS_HELP)
    num_nodes: int = spec_field(1, "nodes (evaluation runs on one node: more is refused when it runs)", min=1)
    batch_size: int = spec_field(-1, _BATCH_HELP, min=-1)
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
    gpu_ids: List[int] = spec_field([0], _GPU_IDS_HELP)
    num_nodes: int = spec_field(1, "nodes (inference runs on one node: more is refused when it runs)", min=1)
    batch_size: int = spec_field(-1, _BATCH_HELP, min=-1)
    outline_width: int = spec_field(3, "line width in pixels of the boxes drawn on images_annotated", min=1)
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/inference")
    checkpoint: Optional[str] = spec_field(None, "model checkpoint (.pth)")
    trt_engine: Optional[str] = spec_field(None, "TensorRT engine to run instead of a checkpoint")
    color_map: Dict[str, str] = spec_field({}, "class name -> box colour (name or #rrggbb)")
    conf_threshold: float = spec_field(0.5, "detections scoring below this are not written", min=0.0, max=1.0)
    is_internal: bool = spec_field(False, "TAO internal layout of output folders")
    input_width: Optional[int] = spec_field(
        None, "with input_height: every image is stretched to exactly this size (TAO's; the checkpoint's "
        "PyTorch model and a TensorRT engine alike); unset: the checkpoint's images are resized as in "
        "evaluation, an engine's to its input size", min=1)
    input_height: Optional[int] = spec_field(None, "with input_width: the height images are stretched to", min=1)


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
    format: str = spec_field("onnx", "file format to write (TAO 6 also lists xdl, which this project does "
                                     "not write)", choices=["onnx", "xdl"])
    serialize_nvdsinfer: bool = spec_field(
        False, "also write DeepStream's nvinfer config (nvdsinfer_config.yaml) and labels.txt beside the ONNX file")


@dataclass
class CalibrationConfig:
    cal_image_dir: List[str] = spec_field([], "INT8 calibration image folders")
    cal_cache_file: Optional[str] = spec_field(None, "INT8 calibration cache")
    cal_batch_size: int = spec_field(1, "calibration batch size", min=1)
    cal_batches: int = spec_field(1, "calibration batches", min=1)


@dataclass
class TensorRTConfig:
    data_type: str = spec_field("fp32", "engine precision (int8 calibrates with `calibration`)",
                                choices=["fp32", "fp16", "int8"], case_insensitive=True)
    workspace_size: int = spec_field(1024, "builder workspace in MiB", min=1)
    min_batch_size: int = spec_field(1, "smallest batch of the optimisation profile", min=1)
    opt_batch_size: int = spec_field(1, "batch the profile optimises for", min=1)
    max_batch_size: int = spec_field(1, "largest batch of the optimisation profile", min=1)
    layers_precision: List[str] = spec_field(
        [], "per-layer precision, `layer_name:fp32|fp16|int8` (a name ending in * matches a prefix)")
    calibration: CalibrationConfig = spec_field(factory=CalibrationConfig, help="INT8 calibration (unused for fp32/fp16)")


@dataclass
class GenTrtEngineConfig:
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/gen_trt_engine")
    gpu_id: int = spec_field(0, "GPU that builds the engine", min=0)
    onnx_file: Optional[str] = spec_field(None, "ONNX file to build from")
    trt_engine: Optional[str] = spec_field(None, "engine file to write")
    timing_cache: Optional[str] = spec_field(None, "TensorRT timing cache file: read if present, written after "
                                                   "the build (speeds up later builds)")
    input_channel: int = spec_field(3, "input channels", choices=[3])
    input_width: int = spec_field(960, "input width", min=32)
    input_height: int = spec_field(544, "input height", min=32)
    opset_version: int = spec_field(17, "opset of the ONNX file", min=16, max=20)
    batch_size: int = spec_field(-1, "batch dimension; -1 = dynamic", min=-1)
    verbose: bool = spec_field(False, "verbose TensorRT log")
    tensorrt: TensorRTConfig = spec_field(factory=TensorRTConfig, help="TensorRT builder settings")


@dataclass
class ConvertConfig:
    """TAO writes these at the top level of a convert spec; the loader moves them here."""

    input_source: Optional[str] = spec_field(None, ".txt file listing KITTI data-source folders, one a line")
    data_root: Optional[str] = spec_field(
        None, "folder the input_source lines are relative to (null: relative to the .txt file's folder); "
        "the shards' file_name is relative to it: use it as image_dir")
    results_dir: Optional[str] = spec_field(None, "output folder; default {results_dir}/convert")
    # TAO's table has no default (None): its converter cannot run without the names. KITTI's usual
    # folder names as defaults let that layout convert as is; a spec naming them behaves as in TAO.
    image_dir_name: str = spec_field("images", "image folder name under each source (TAO: no default)")
    label_dir_name: str = spec_field("labels", "KITTI label folder name under each source (TAO: no default)")
    image_extension: str = spec_field(".jpg", "extension of the image files")
    num_shards: int = spec_field(32, "COCO JSON shards per partition (0: one shard)", min=0)
    num_partitions: int = spec_field(1, "partitions (folds) of each source", min=1)
    partition_mode: Optional[str] = spec_field(
        None, "null: one partition; random: 2 partitions, fold 0 holds val_split percent of the images; "
        "sequence: num_partitions partitions, whole sources (sequences) dealt out in turn",
        choices=["random", "sequence"])
    val_split: int = spec_field(0, "percent of the images in the validation fold (partition_mode random)",
                                min=0, max=99)
    mapping_path: Optional[str] = spec_field(None, "JSON {target class: [source classes]}; null = TAO's default")


@dataclass
class QuantizerConfig:
    """How one quantized tensor (weights or activations) is computed: TAO 6.26's quantize schema."""

    dtype: str = spec_field("", "int8, fp8_e4m3fn, fp8_e5m2 or native")
    observer_or_fake_quant: str = spec_field("", "observer (PTQ) or fake quantizer (QAT) name")
    quant_axis: Optional[int] = spec_field(None, "per-channel axis; null = per tensor")
    observer_or_fake_quant_kwargs: Dict[str, Any] = spec_field({}, "arguments of the observer")


@dataclass
class QuantizeLayerConfig:
    module_name: str = spec_field("", "module name or pattern (fnmatch) to quantize")
    weights: Optional[QuantizerConfig] = spec_field(None, "weight quantization; null = not quantized")
    activations: Optional[QuantizerConfig] = spec_field(None, "activation quantization; null = not quantized")


@dataclass
class QuantizeConfig:
    """TAO 6.26's `quantize` task settings: loaded and checked so TAO spec files load; this project
    has no quantize task (running it says so)."""

    backend: Optional[str] = spec_field("torchao", "quantization backend",
                                        choices=["modelopt.pytorch", "torchao", "modelopt.onnx"])
    mode: Optional[str] = spec_field("weight_only_ptq", "quantization mode", choices=["static_ptq", "weight_only_ptq"])
    algorithm: Optional[str] = spec_field("minmax", "calibration algorithm (ModelOpt backends)",
                                          choices=["minmax", "max", "entropy", "awq_clip", "awq_lite", "awq_full",
                                                   "rtn_dq"])
    layers: List[QuantizeLayerConfig] = spec_field([], "per-module quantization settings")
    skip_names: List[str] = spec_field([], "module names or patterns left unquantized")
    model_path: Optional[str] = spec_field("", "model to quantize")
    results_dir: Optional[str] = spec_field("", "output folder")
    backend_kwargs: Dict[str, Any] = spec_field({}, "backend arguments")
    device: str = spec_field("cuda", "calibration device: cuda, cpu, trt or cuda:N")


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
    quantize: QuantizeConfig = spec_field(factory=QuantizeConfig, help="TAO 6's quantize task: checked, not run "
                                                                       "(this project has no quantize task)")
    wandb: WandbConfig = spec_field(factory=WandbConfig, help="Weights & Biases logging of training")
    model_name: Optional[str] = spec_field("deformable_detr", "the model the spec is for (TAO 6)",
                                           choices=["deformable_detr"])
    results_dir: Optional[str] = spec_field(None, "root output folder; each task writes under {results_dir}/{task}")
    encryption_key: Optional[str] = spec_field(None, "key that encrypts written checkpoints and decrypts read ones")
