"""Compiled multi-scale deformable attention: building, caching and loading the extensions,
and the autograd Function that calls them.

Each extension ("cpu", "cuda") is built by `torch.utils.cpp_extension` into
`$TORCH_EXTENSIONS_DIR/deformable_detr/msda_<kind>_<digest>/` (default
`~/.cache/torch_extensions`), where the digest covers the sources, the flags and the torch
version, so a stale build is never loaded. A finished build leaves a `BUILT` marker; loading
a marked build only imports the shared library (no compiler, no ninja). A failed build
leaves a `FAILED` marker so that later processes do not pay for it again;
`python -m deformable_detr.ops.build` retries.

Processes that start together (the ranks of a torchrun job) build once: the first takes
`build.lock` in the build folder and compiles; the others log that they wait, wait for it
(up to `DDETR_MSDA_BUILD_WAIT_S`, default 10 min for the CPU kernel and 1 h for CUDA) and
then load what it built, so every rank runs the same implementation. Only a recorded
failure or a timed-out wait makes a waiter give up on the kernel.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from filelock import FileLock, Timeout

from ..runtime.files import write_text_atomic
from ..runtime.logging import get_logger

log = get_logger("ops")

CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = {"cpu": ["msda_cpu.cpp", "msda_bindings.cpp"], "cuda": ["msda_cuda.cu", "msda_bindings.cpp"]}
_HEADERS = ["msda.h", "msda_common.h"]
# -fno-trapping-math: the CPU kernel's corner loop has selects between floating-point values, which
# GCC only turns into vector blends when it may ignore floating-point exception flags (nothing
# reads them); it changes no result. No -march: one build must run on every x86-64 machine (the
# kernel picks its AVX2 code at run time).
_CXX_FLAGS = {"cpu": ("-O3", "-fopenmp", "-fno-trapping-math"), "cuda": ("-O3", "-DMSDA_WITH_CUDA")}
_NVCC_FLAGS = ("-O3", "--use_fast_math", "-lineinfo")
_LD_FLAGS = {"cpu": ("-fopenmp",), "cuda": ()}

_loaded: dict[str, ModuleType] = {}

BUILD_WAIT_ENV = "DDETR_MSDA_BUILD_WAIT_S"
_DEFAULT_BUILD_WAIT_S = {"cpu": 600.0, "cuda": 3600.0}  # well above a build's usual time here


class KernelUnavailable(RuntimeError):
    """The requested extension cannot be built or loaded here; the message says why."""


def cache_root() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "torch_extensions")
    return Path(base) / "deformable_detr"


def cuda_include_dirs() -> list[str]:
    """CUDA headers shipped in the torch wheel (site-packages nvidia/cu*/include), which the
    system toolkit may lack or hold in another version."""
    dirs = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            dirs += [str(p) for p in sorted(nvidia.glob("cu*/include")) if (p / "cuda_runtime_api.h").exists()]
    return dirs


def _is_cuda_toolkit(folder: Optional[str]) -> bool:
    return bool(folder) and (Path(folder) / "bin" / "nvcc").exists() and \
        (Path(folder) / "include" / "cuda_runtime_api.h").exists()


def pypi_cuda_home() -> Optional[Path]:
    """Where scripts/test-deps.d/cuda-nvcc.sh assembles a toolkit from PyPI's nvcc wheels for
    torch's CUDA version: ${DDETR_TOOLS_DIR:-~/.cache/ddetr-tools}/cuda-<major.minor>."""
    if not torch.version.cuda:
        return None
    tools = os.environ.get("DDETR_TOOLS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ddetr-tools")
    return Path(tools) / f"cuda-{torch.version.cuda}"


def find_cuda_home() -> Optional[Path]:
    """The CUDA toolkit: $CUDA_HOME/$CUDA_PATH, else /usr/local/cuda, else the folder of `nvcc` on
    PATH, else the toolkit assembled from PyPI wheels (`pypi_cuda_home`); only a folder with both
    bin/nvcc and the CUDA headers counts (an `nvcc` wrapper script in /usr/local/bin does not
    make /usr/local a toolkit)."""
    nvcc = shutil.which("nvcc")
    pypi = pypi_cuda_home()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  str(Path(nvcc).resolve().parent.parent) if nvcc else None, str(pypi) if pypi else None]
    for candidate in candidates:
        if _is_cuda_toolkit(candidate):
            return Path(candidate)
    return None


def quiet_cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found, using CUDA_HOME=..."
    warning: the CPU kernel needs no CUDA, and a CPU-only first run should not print about it."""
    import logging

    name = "torch.utils.cpp_extension"
    if name not in sys.modules:
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            importlib.import_module(name)
        finally:
            logger.setLevel(level)
    return sys.modules[name]


def nvcc_command(source: Path, output: Path, archs: list[str]) -> list[str]:
    """nvcc invocation compiling one CUDA source to an object with the flags of the extension
    build, for the given compute capabilities (e.g. ["8.0", "9.0"])."""
    cpp_extension = quiet_cpp_extension()

    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise KernelUnavailable("no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)")
    includes = [str(CSRC)] + cpp_extension.include_paths() + cuda_include_dirs() + [str(cuda_home / "include")]
    gencode = []
    for arch in archs:
        number = arch.replace(".", "")
        gencode += ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return ([str(cuda_home / "bin" / "nvcc"), "-c", str(source), "-o", str(output), "-std=c++20",
             "-Xcompiler", "-fPIC", abi] + [f"-I{path}" for path in includes]
            + cpp_extension.COMMON_NVCC_FLAGS + list(_NVCC_FLAGS) + gencode)


def compile_cuda_objects(archs: list[str], out_dir: Path) -> list[Path]:
    """Compile every CUDA source for `archs` (no GPU needed); raises KernelUnavailable with
    nvcc's errors when one does not compile."""
    objects = []
    for source in _SOURCES["cuda"]:
        if not source.endswith(".cu"):
            continue
        output = Path(out_dir) / (Path(source).stem + ".o")
        result = subprocess.run(nvcc_command(CSRC / source, output, archs), capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(f"nvcc failed on {source}:\n{result.stderr[-4000:]}")
        objects.append(output)
    return objects


def extension_name(kind: str) -> str:
    digest = hashlib.sha256()
    for file in _SOURCES[kind] + _HEADERS:
        digest.update(file.encode() + b"\0" + (CSRC / file).read_bytes())
    digest.update(" ".join(_CXX_FLAGS[kind] + _NVCC_FLAGS + _LD_FLAGS[kind]).encode())
    digest.update(torch.__version__.encode() + sys.version.encode())
    return f"msda_{kind}_{digest.hexdigest()[:12]}"


def build_directory(kind: str) -> Path:
    return cache_root() / extension_name(kind)


def _import_library(name: str, directory: Path) -> ModuleType:
    library = directory / f"{name}.so"
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise KernelUnavailable(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as error:  # e.g. a CUDA build on a machine without the CUDA runtime
        raise KernelUnavailable(f"cannot import {library}: {error}") from error
    return module


def _check_toolchain(kind: str) -> None:
    cpp_extension = quiet_cpp_extension()

    if kind == "cuda":
        if not _is_cuda_toolkit(cpp_extension.CUDA_HOME):
            found = find_cuda_home()
            if found is None:
                raise KernelUnavailable("no CUDA toolkit found: set CUDA_HOME to a folder with bin/nvcc "
                                        "and include/cuda_runtime_api.h")
            # torch guessed CUDA_HOME at import from `nvcc` on PATH; use the real toolkit instead.
            log.info("using the CUDA toolkit in %s (torch had guessed %s)", found, cpp_extension.CUDA_HOME)
            cpp_extension.CUDA_HOME = str(found)
        if torch.version.cuda is None:
            raise KernelUnavailable("this torch build has no CUDA support")
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            raise KernelUnavailable("no GPU to build for: set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0')")
    if not cpp_extension.is_ninja_available():
        raise KernelUnavailable("ninja is not installed (pip install ninja)")


def _first_error_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    compiler_errors = [line for line in lines if "error:" in line.lower()]  # file:line: error: ...
    errors = [line for line in lines if "error" in line.lower()]
    return (compiler_errors or errors or lines or [""])[0][:500]


def build_wait_seconds(kind: str) -> float:
    """How long a process waits for another process's build of `kind` before giving up."""
    raw = os.environ.get(BUILD_WAIT_ENV, "").strip()
    if not raw:
        return _DEFAULT_BUILD_WAIT_S[kind]
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise KernelUnavailable(f"{BUILD_WAIT_ENV}={raw!r} is not a number of seconds >= 0")
    return seconds


def build_lock_path(kind: str) -> Path:
    # Not torch's own `lock` file in the same folder: cpp_extension takes that one inside
    # our lock, and two flocks on one file would block each other even in one process.
    return build_directory(kind) / "build.lock"


def _failure_reason(directory: Path) -> Optional[str]:
    failed = directory / "FAILED"
    return failed.read_text().strip() if failed.exists() else None


def _acquire_build_lock(kind: str) -> FileLock:
    """The build lock of `kind`, waiting (bounded, with a log line) while another process holds it."""
    lock = FileLock(str(build_lock_path(kind)))
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        pass
    wait = build_wait_seconds(kind)
    log.info("another process is building the %s kernel in %s; waiting up to %.0f s for it",
             kind.upper(), build_directory(kind), wait)
    try:
        lock.acquire(timeout=wait)
    except Timeout as error:
        raise KernelUnavailable(f"gave up after waiting {wait:.0f} s for another process's build "
                                f"(lock {build_lock_path(kind)}; {BUILD_WAIT_ENV} sets the wait)") from error
    return lock


def build(kind: str, verbose: bool = False) -> ModuleType:
    """Compile the `kind` extension into its cache folder (or reuse a finished build) and import it.

    Serialised across processes by the build lock: a process that finds a build under way waits
    for it and loads its result, or raises KernelUnavailable if that build failed."""
    name = extension_name(kind)
    directory = build_directory(kind)
    if (directory / "BUILT").exists():
        return _import_library(name, directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a read-only home in a container
        raise KernelUnavailable(f"cannot create the build folder {directory}: {error} "
                                "(set TORCH_EXTENSIONS_DIR to a writable folder)") from error
    lock = _acquire_build_lock(kind)
    try:
        # Another process may have finished (or failed) while this one waited for the lock.
        if (directory / "BUILT").exists():
            return _import_library(name, directory)
        reason = _failure_reason(directory)
        if reason is not None:
            raise KernelUnavailable(f"the build by another process failed ({reason}); "
                                    "retry with: python -m deformable_detr.ops.build")
        _check_toolchain(kind)  # only the builder needs one; waiters just import the result
        return _compile(kind, name, directory, verbose)
    finally:
        lock.release()


def _compile(kind: str, name: str, directory: Path, verbose: bool) -> ModuleType:
    """Run the compiler (the caller holds the build lock) and record the outcome as BUILT or FAILED."""
    cpp_extension = quiet_cpp_extension()  # imported late: it probes for CUDA

    log.info("building the %s kernel of multi-scale deformable attention in %s (first use; about %s)",
             kind.upper(), directory, "1-2 min per GPU arch" if kind == "cuda" else "30 s")
    start = time.monotonic()
    try:
        module = cpp_extension.load(
            # Copies: cpp_extension appends to the flag lists it is given, which would change the digest.
            name=name, sources=[str(CSRC / f) for f in _SOURCES[kind]], extra_cflags=list(_CXX_FLAGS[kind]),
            extra_cuda_cflags=list(_NVCC_FLAGS), extra_ldflags=list(_LD_FLAGS[kind]),
            extra_include_paths=[str(CSRC)] + (cuda_include_dirs() if kind == "cuda" else []),
            build_directory=str(directory), verbose=verbose, with_cuda=kind == "cuda")
    except Exception as error:  # compiler errors arrive as RuntimeError/CalledProcessError/OSError
        reason = _first_error_line(str(error)) or type(error).__name__
        try:
            write_text_atomic(str(directory / "FAILED"), f"{reason}\n")
        except OSError:
            pass  # the marker only saves later processes a retry
        raise KernelUnavailable(f"building the {kind} kernel failed: {reason}") from error
    write_text_atomic(str(directory / "BUILT"), f"{name}\n")
    (directory / "FAILED").unlink(missing_ok=True)
    log.info("built the %s kernel in %.0f s (cached for later runs)", kind.upper(), time.monotonic() - start)
    return module


def load(kind: str, build_if_missing: bool = True) -> ModuleType:
    """The `kind` extension: imported from the cache, else built now; KernelUnavailable if it cannot be."""
    if kind in _loaded:
        return _loaded[kind]
    directory = build_directory(kind)
    if not (directory / "BUILT").exists():
        reason = _failure_reason(directory)
        if reason is not None:
            raise KernelUnavailable(f"an earlier build failed ({reason}); "
                                    "retry with: python -m deformable_detr.ops.build")
        if not build_if_missing:
            raise KernelUnavailable(f"the {kind} kernel is not built (python -m deformable_detr.ops.build)")
    _loaded[kind] = build(kind)
    return _loaded[kind]


def is_built(kind: str) -> bool:
    return kind in _loaded or (build_directory(kind) / "BUILT").exists()


def _coordinate_dtype(value: torch.Tensor) -> torch.dtype:
    # Locations and weights stay in float32 (float64 for float64 values) even for half
    # values: half precision would put samples a fraction of a pixel off on large maps.
    return torch.float64 if value.dtype == torch.float64 else torch.float32


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper around a compiled extension's forward/backward."""

    @staticmethod
    def forward(ctx, extension: ModuleType, value: torch.Tensor, spatial_shapes: torch.Tensor,
                level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                attention_weights: torch.Tensor) -> torch.Tensor:
        ctx.extension = extension
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return extension.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = ctx.extension.backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous())
        return None, grad_value.to(value.dtype), None, None, grad_locations, grad_weights


def run_kernel(extension: ModuleType, value: torch.Tensor, spatial_shapes: torch.Tensor,
               level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
               attention_weights: torch.Tensor) -> torch.Tensor:
    """Bring the inputs to the layout and dtypes the kernels take, then run them with autograd."""
    coord = _coordinate_dtype(value)
    return MSDeformAttnFunction.apply(
        extension, value.contiguous(), spatial_shapes.to(value.device, torch.int64).contiguous(),
        level_start_index.to(value.device, torch.int64).contiguous(),
        sampling_locations.to(coord).contiguous(), attention_weights.to(coord).contiguous())
