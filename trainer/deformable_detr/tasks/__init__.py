"""The task table: every task's name, what it does and the spec sections it reads.

The one home of the task list: the CLI's subcommands, `default-spec`, the operator's `spec.task`
(its CRD enum and default) and the docs read it. Each task's code is `deformable_detr.tasks.<name>`
with `run(spec) -> int`; importing this package imports none of them (the operator has no torch).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    help: str
    sections: tuple[str, ...]  # spec sections it reads, besides the top-level keys
    # Runs PyTorch's kernels: its thread pools are sized from the container at start (runtime/cpu_budget.py).
    torch_threads: bool = True


TASKS = {task.name: task for task in (
    Task("train", "train a Deformable DETR model", ("model", "dataset", "train", "evaluate")),
    Task("evaluate", "COCO mAP of a checkpoint on dataset.test_data_sources", ("model", "dataset", "evaluate")),
    Task("inference", "KITTI labels and annotated images for dataset.infer_data_sources",
         ("model", "dataset", "inference")),
    Task("export", "export a checkpoint to ONNX", ("model", "dataset", "export")),
    Task("gen_trt_engine", "build a TensorRT engine from an ONNX file (needs tensorrt and a GPU)",
         ("gen_trt_engine",), torch_threads=False),
    Task("convert", "KITTI label folders -> sharded COCO JSON", ("convert",), torch_threads=False),
)}

# TAO's tasks this project does not have: the CLI answers each in one line (exit 2); their spec
# sections still load and are checked (config/schema.py), so TAO's spec files load as they are.
NOT_PROVIDED = {
    "quantize": "TAO 6's quantize task is not part of deformable-detr (a spec's quantize section is only "
                "checked); for an INT8 TensorRT engine run gen_trt_engine with gen_trt_engine.tensorrt.data_type: "
                "INT8; tasks: " + ", ".join(TASKS),
}

# What a DeformableDetrJob runs when its spec names no task.
DEFAULT_TASK = "train"
