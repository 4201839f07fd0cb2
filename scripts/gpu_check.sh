#!/usr/bin/env bash
# Everything this project must prove on a GPU, in one command (about 8 minutes on one H200):
#   1. build the CUDA kernel for this GPU; pytest -m gpu (float64 gradcheck against the reference,
#      float16/bfloat16 accuracy)
#   2. bench/msda.py --device cuda: forward and forward+backward, fp32/fp16/bf16, encoder and
#      decoder shapes, against the PyTorch reference in the same run, with the achieved bytes/s as
#      a fraction of the device-to-device copy bandwidth measured in the same run
#   3. bench/model_throughput.py: training images/s and peak memory at real size (ResNet-50,
#      800x1333, batch 2; fp32/fp16/bf16; with and without activation checkpointing) beside
#      transformers' DeformableDetr on the same GPU and inputs
#   4. the tiny example on the GPU: a few training steps, evaluate, inference, export, and
#      onnxruntime on the exported model
#   5. what cannot run there (TensorRT, multi-GPU NCCL) is listed as not run
# It writes summary.json, one JSON and one log per step into OUT_DIR and prints a summary.
#
#   bash scripts/gpu_check.sh OUT_DIR [--wheels DIR] [--dry-run] [--steps 1,2,3,4]
#
# The GPU machine has CUDA 13, PyTorch and transformers but no network. Whatever else it needs
# travels as wheels in DIR (--wheels, default ./gpu-wheels); fill it beforehand on a machine with
# network (same Python version and platform):
#   python3 -m pip download -d gpu-wheels ./trainer ".[cuda-build]"   # from trainer/: the package's deps
#   python3 -m pip download -d gpu-wheels --no-deps "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
#       "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" ninja pytest pytest-timeout onnxruntime
# (only the nvcc wheels are needed where the machine lacks /usr/local/cuda/bin/nvcc).
# --dry-run runs on a CPU every step that needs no GPU (tiny sizes, about 1-2 minutes) and
# reports the rest as skipped; tests/trainer/test_gpu_check.py runs it.
set -euo pipefail
source "$(dirname "$0")/python-env.sh"   # $PY (PYTHON may be an unactivated venv's interpreter)
exec "$PY" "$(dirname "$0")/gpu_check.py" "$@"
