#!/usr/bin/env bash
# The test set-up's CUDA compiler (for the kernel's compile test): CUDA's nvcc from PyPI, pinned by the
# same lock the trainer image's build uses; scripts/cuda-home-from-pypi.sh says how.
set -uo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
CUDA_WHEELS_LOCK=${CUDA_WHEELS_LOCK:-$here/locks/trainer-cuda-build.txt} exec bash "$here/scripts/cuda-home-from-pypi.sh"
