#!/usr/bin/env bash
# A CUDA toolkit for building the CUDA kernel on machines without one (no /usr/local/cuda):
# nvcc, cicc (nvvm), the CUDA C runtime headers and CCCL from PyPI, at the CUDA version torch
# was built for, assembled into ${DDETR_TOOLS_DIR:-~/.cache/ddetr-tools}/cuda-<major.minor>
# (bin/nvcc, nvvm/, include/, lib/ + lib64/), together with the headers and libcudart that the
# torch wheel already installed (nvidia-cuda-runtime). deformable_detr.ops.kernels.find_cuda_home()
# looks there after CUDA_HOME, /usr/local/cuda and nvcc on PATH.
# CUDA_WHEELS_LOCK names a hashed requirements file (locks/trainer-cuda-build.txt) to install the
# compiler's wheels from, with --require-hashes; without it, the newest of torch's CUDA series.
# Two callers: scripts/test-deps.d/cuda-nvcc.sh (the test set-up) and Dockerfile.trainer's kernels stage.
# Idempotent; exits 1 naming the piece it could not get (a torch without CUDA is no failure: the
# CUDA build test then says so).
set -uo pipefail

python=${PYTHON:-python3}
tools_dir=${DDETR_TOOLS_DIR:-$HOME/.cache/ddetr-tools}

cuda_version=$("$python" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
if [ -z "$cuda_version" ]; then
  echo "cuda-home-from-pypi.sh: this torch has no CUDA; the CUDA build test will skip" >&2
  exit 0
fi
home="$tools_dir/cuda-$cuda_version"
if [ -x "$home/bin/nvcc" ] && [ -x "$home/nvvm/bin/cicc" ] && [ -f "$home/include/cuda_runtime_api.h" ] && \
   [ -f "$home/READY" ]; then
  exit 0
fi

# The torch wheel's CUDA runtime (headers + libcudart) lives in site-packages/nvidia/cu<major>.
runtime=$("$python" - <<'PY' 2>/dev/null
import pathlib, sys
for entry in sys.path:
    for folder in sorted(pathlib.Path(entry).glob("nvidia/cu*")):
        if (folder / "include" / "cuda_runtime_api.h").exists():
            print(folder)
            raise SystemExit
PY
)
if [ -z "$runtime" ]; then
  echo "cuda-home-from-pypi.sh: the torch wheel's CUDA runtime headers (nvidia-cuda-runtime) are not installed" >&2
  exit 1
fi

series="${cuda_version}.*"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
lock=${CUDA_WHEELS_LOCK:-}
if [ -n "$lock" ]; then
  pinned=$(sed -n 's/^nvidia-cuda-nvcc==\([0-9]*\.[0-9]*\)\..*/\1/p' "$lock" 2>/dev/null)
  if [ "$pinned" != "$cuda_version" ]; then
    echo "cuda-home-from-pypi.sh: $lock pins nvcc ${pinned:-(none)}, torch is built for CUDA $cuda_version (python3 locks/generate.py)" >&2
    exit 1
  fi
  wheels=(--require-hashes -r "$lock")
  series="from $(basename "$lock")"
else
  wheels=("nvidia-cuda-nvcc==$series" "nvidia-nvvm==$series" "nvidia-cuda-crt==$series" "nvidia-cuda-cccl==$series")
fi
echo "cuda-home-from-pypi.sh: assembling CUDA $cuda_version's nvcc ($series) from PyPI wheels into $home" >&2
if ! PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$work/wheels" \
    "${wheels[@]}"; then
  echo "cuda-home-from-pypi.sh: pip could not install nvcc $series from PyPI" >&2
  exit 1
fi
built=$(find "$work/wheels/nvidia" -maxdepth 3 -path '*/bin/nvcc' -printf '%h\n' | head -n 1)
[ -n "$built" ] || { echo "cuda-home-from-pypi.sh: no bin/nvcc in the nvcc wheel" >&2; exit 1; }
top=$(dirname "$built")
# The runtime's headers and libraries next to nvcc's: one folder is the toolkit.
cp -rn "$runtime/include/." "$top/include/" && cp -rn "$runtime/lib/." "$top/lib/" || { echo "cuda-home-from-pypi.sh: copying the CUDA runtime into $top failed" >&2; exit 1; }
# Linkers look for libcudart.so; the wheel only has the versioned name.
(cd "$top/lib" && for lib in libcudart.so.*; do [ -e libcudart.so ] || ln -s "$lib" libcudart.so; done)
ln -sfn lib "$top/lib64"
echo "nvcc $series from PyPI + the CUDA runtime of $runtime" > "$top/READY"
mkdir -p "$tools_dir"
rm -rf "$home.partial" "$home"
mv "$top" "$home.partial" && mv "$home.partial" "$home"
exit 0
