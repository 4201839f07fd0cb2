"""The steps of scripts/gpu_check.sh (read its header). Each step runs as a subprocess with a
time limit, its output in OUT_DIR/<step>.log and its figures in OUT_DIR/<step>.json; the
summary goes to OUT_DIR/summary.json and the terminal. Exit status 0 when no step failed
(skipped steps do not fail the check)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Seconds per step on the GPU machine, within TOTAL_S (8 minutes) for the whole check; a step
# that would run past the total is cut there (and fails). A dry run on a CPU gets 3x per step
# and no total (tiny sizes, but a shared 2-core machine).
BUDGET_S = {"build": 150, "pytest_gpu": 60, "msda_bench": 90, "model_throughput": 150, "example": 120}
TOTAL_S = 470
DRY_RUN_FACTOR = 3
NOT_RUN = {
    "tensorrt": "TensorRT engine build and the TensorRT plugin (export with the plugin node): TensorRT is not "
                "installed on the GPU machine and cannot be fetched without network; tests/trainer/test_trt*.py "
                "cover the CPU-side parts",
    "multi_gpu_nccl": "multi-GPU training over NCCL: the machine has one GPU; multi-process training is tested "
                      "with torchrun on gloo (tests/trainer/test_train_distributed.py)",
}


class Check:
    def __init__(self, out_dir: Path, dry_run: bool, wheels: Path | None):
        self.out_dir, self.dry_run, self.wheels = out_dir, dry_run, wheels
        self.results: dict[str, dict] = {}
        self.deadline = time.monotonic() + TOTAL_S
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.setdefault("OMP_NUM_THREADS", str(min(8, os.cpu_count() or 1)))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "trainer"), self.env.get("PYTHONPATH")]))
        import torch

        self.gpu = torch.cuda.is_available()
        self.gpu_name = torch.cuda.get_device_name() if self.gpu else None
        if self.gpu:
            major, minor = torch.cuda.get_device_capability()
            self.env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")

    def run(self, name: str, command: list[str], cwd: Path = REPO, timeout: float | None = None,
            json_file: Path | None = None) -> dict:
        timeout = timeout or BUDGET_S.get(name, 120) * (DRY_RUN_FACTOR if self.dry_run else 1)
        if not self.dry_run:
            timeout = max(5.0, min(timeout, self.deadline - time.monotonic()))
        log = self.out_dir / f"{name}.log"
        start = time.monotonic()
        with open(log, "a") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            try:
                rc = subprocess.run(command, cwd=cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
                out.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
        seconds = time.monotonic() - start
        result = {"status": "passed" if rc == 0 else "failed", "returncode": rc, "seconds": round(seconds, 1),
                  "log": str(log)}
        if json_file is not None and json_file.exists():
            result["json"] = str(json_file)
        return result

    def record(self, name: str, result: dict) -> None:
        self.results[name] = result
        print(f"[gpu_check] {name}: {result['status']}"
              + (f" ({result['seconds']:.0f} s)" if "seconds" in result else "")
              + (f": {result['reason']}" if result.get("reason") else ""), flush=True)

    def skip(self, name: str, reason: str) -> None:
        self.record(name, {"status": "skipped", "reason": reason})

    # 0. what a machine without network needs, from the wheels folder
    def install_wheels(self) -> None:
        if self.wheels is None or not self.wheels.is_dir():
            return
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(self.wheels)]
        missing = [name for name in ("ninja", "pytest", "onnxruntime") if shutil.which(name) is None
                   and not _importable(name)]
        if missing:
            self.run("wheels", pip + missing, timeout=120)
        self.env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(self.wheels))

    # 1. build the CUDA kernel, then the GPU tests
    def build(self) -> None:
        from deformable_detr.ops import kernels

        if kernels.find_cuda_home() is None:
            # The PyPI toolkit, from the wheels folder when there is no network.
            self.run("build", ["bash", str(REPO / "scripts/test-deps.d/cuda-nvcc.sh")], timeout=120)
        cuda_home = kernels.find_cuda_home()
        if self.dry_run or not self.gpu:
            reason = "needs a GPU" + (f" (toolkit found here: {cuda_home})" if cuda_home else
                                      " (and no CUDA toolkit here)")
            self.skip("build", reason + "; tests/trainer/test_msda_cuda.py builds it for sm_80+sm_90 on CPUs")
            return
        result = self.run("build", [sys.executable, "-m", "deformable_detr.ops.build", "--kind", "cuda"])
        result["cuda_home"] = str(cuda_home)
        result["arch"] = self.env.get("TORCH_CUDA_ARCH_LIST")
        self.record("build", result)

    def pytest_gpu(self) -> None:
        files = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                       if "mark.gpu" in path.read_text(errors="replace"))
        report = self.out_dir / "pytest_gpu.xml"
        # Without a GPU every gpu test skips itself: collecting them is the check that is left.
        mode = ["--collect-only"] if not self.gpu else []
        result = self.run("pytest_gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p",
                                         "no:cacheprovider", f"--junitxml={report}", *mode, *files])
        if result["returncode"] == 5:  # nothing selected
            result["status"] = "failed" if self.gpu else "skipped"
        result.update(_junit_counts(report))
        if not self.gpu and result["status"] == "passed":
            result["status"], result["reason"] = "skipped", "no GPU: the gpu tests were only collected"
        self.record("pytest_gpu", result)

    # 2. the kernel benchmark
    def msda_bench(self) -> None:
        out = self.out_dir / "msda.json"
        args = ["--device", "cuda", "--repeats", "7"] if self.gpu and not self.dry_run else \
            ["--device", "cpu", "--tiny", "--repeats", "1"]
        result = self.run("msda_bench", [sys.executable, "bench/msda.py", *args, "--output", str(out)], json_file=out)
        if self.dry_run or not self.gpu:
            result["note"] = "CPU at a tiny size (dry run); the CUDA figures need a GPU"
        self.record("msda_bench", result)

    # 3. training throughput at real size, beside transformers
    def model_throughput(self) -> None:
        out = self.out_dir / "model_throughput.json"
        args = ["--device", "cuda", "--steps", "8", "--warmup", "3"] if self.gpu and not self.dry_run else \
            ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--checkpointing", "off"]
        result = self.run("model_throughput", [sys.executable, "bench/model_throughput.py", *args,
                                               "--output", str(out)], json_file=out)
        if self.dry_run or not self.gpu:
            result["note"] = "CPU at a tiny size (dry run); the real-size figures need a GPU"
        self.record("model_throughput", result)

    # 4. the tiny example on the GPU: train a little, evaluate, inference, export, onnxruntime
    def example(self) -> None:
        work = self.out_dir / "example"
        work.mkdir(exist_ok=True)
        tiny = self.dry_run or not self.gpu
        spec = str(REPO / "examples/tiny/spec.yaml")
        ddetr = [sys.executable, "-m", "deformable_detr"]
        counts = ["--num-train", "8", "--num-val", "4"] if tiny else ["--num-train", "400", "--num-val", "50"]
        overrides = ["train.num_epochs=1", "train.validation_interval=1", "train.checkpoint_interval=1",
                     "train.optim.lr_steps=[1]", "train.auto_resume=false"] + \
            (["dataset.batch_size=4", "dataset.workers=0"] if tiny else ["dataset.workers=2"])
        steps = [("data", ddetr + ["make-example-data", "--out", "example_data", *counts]),
                 ("convert", ddetr + ["convert", "-e", spec, "-r", "example_run/results"]),
                 ("train", ddetr + ["train", "-e", spec, "-r", "example_run/results", *overrides]),
                 ("evaluate", ddetr + ["evaluate", "-e", spec, "-r", "example_run/results"]),
                 ("inference", ddetr + ["inference", "-e", spec, "-r", "example_run/results"]),
                 ("export", ddetr + ["export", "-e", spec, "-r", "example_run/results"]),
                 ("onnxruntime", [sys.executable, str(REPO / "scripts/gpu_check_onnx.py"), spec, "example_run/results",
                                  str(self.out_dir / "onnxruntime.json")])]
        start, parts = time.monotonic(), {}
        for name, command in steps:
            remaining = BUDGET_S["example"] * (DRY_RUN_FACTOR if tiny else 1) - (time.monotonic() - start)
            part = self.run("example", command, cwd=work, timeout=max(remaining, 5))
            parts[name] = part["status"]
            if part["returncode"] != 0:
                break
        log = (self.out_dir / "example.log").read_text(errors="replace")
        ran_on = "cuda" if "attention on cuda" in log else "cpu"
        status = "passed" if all(v == "passed" for v in parts.values()) and len(parts) == len(steps) else "failed"
        self.record("example", {"status": status, "steps": parts, "seconds": round(time.monotonic() - start, 1),
                                "device": ran_on, "log": str(self.out_dir / "example.log"),
                                **({"note": "on the CPU with 8 images (dry run)"} if tiny else {})})


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _junit_counts(report: Path) -> dict:
    if not report.exists():
        return {}
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="on a CPU: every step that needs no GPU, tiny sizes")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels", help="folder of wheels (no network)")
    parser.add_argument("--steps", default="1,2,3,4", help="which of the steps 1-4 to run (comma list)")
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "trainer"))
    check = Check(out_dir, args.dry_run, args.wheels if args.wheels.is_dir() else None)
    start = time.monotonic()
    if not check.gpu and not args.dry_run:
        print("[gpu_check] no GPU here: running as --dry-run", flush=True)
        check.dry_run = True
    check.install_wheels()
    wanted = set(args.steps.split(","))
    plan = {"1": [check.build, check.pytest_gpu], "2": [check.msda_bench], "3": [check.model_throughput],
            "4": [check.example]}
    for number, functions in plan.items():
        for function in functions:
            if number in wanted:
                try:
                    function()
                except Exception as error:  # a broken step must not hide the others
                    check.record(function.__name__, {"status": "failed", "reason": f"{type(error).__name__}: {error}"})
            else:
                check.skip(function.__name__, "not selected (--steps)")
    for name, reason in NOT_RUN.items():
        check.results[name] = {"status": "not run", "reason": reason}
    import platform

    import torch

    summary = {"dry_run": check.dry_run, "gpu": check.gpu_name, "seconds": round(time.monotonic() - start, 1),
               "load_at_start": list(os.getloadavg()), "python": platform.python_version(),
               "torch": torch.__version__, "torch_cuda": torch.version.cuda, "steps": check.results}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n[gpu_check] summary ({'dry run, ' if check.dry_run else ''}{check.gpu_name or 'no GPU'}, "
          f"{summary['seconds']:.0f} s) -> {out_dir / 'summary.json'}")
    for name, result in check.results.items():
        print(f"  {name:18s} {result['status']:8s} {result.get('reason') or result.get('note') or ''}")
    failed = [n for n, r in check.results.items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
