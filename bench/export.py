"""CPU latency per image of the exported ONNX model (onnxruntime) against PyTorch eager, at batch 1 and 4.

`--config small` (ResNet-18, hidden 64, 2+2 layers, 4 levels, box refinement) or `tao_default`
(TAO's default model: ResNet-50, hidden 256, 6+6 layers, 300 queries, 4 levels, box refinement)
is exported with plain-op attention (`export.on_cpu: true`, dynamic batch); both runtimes get the
same batches, timed interleaved (best of the repeats, medians kept in the JSON) so that both see
the same machine load. The PyTorch side runs the reference attention, the same algorithm the
ONNX graph holds; the tao_default run also times eager with the compiled CPU kernel (what
`inference` runs). TensorRT (`gen_trt_engine`) needs a GPU: its figures are left for a GPU run
(scripts/gpu_check.sh).
Prints a table and writes bench/results/export.json (small) or export_tao_default.json.

    OMP_NUM_THREADS=2 python3 bench/export.py [--config small|tao_default] [--image-size 256] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt, machine, ratio_spread, spread  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export.json")


MODELS = {"small": {"backbone": "resnet_18", "num_queries": 100, "hidden_dim": 64, "nheads": 8,
                    "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 256},
          "tao_default": {}}  # the spec's defaults are TAO's


def build(config: str):
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.model import build_model

    spec = spec_from_dict({"model": MODELS[config], "dataset": {"num_classes": 4}})
    torch.manual_seed(0)
    return build_model(spec)[0].eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(MODELS), default="small")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    os.environ["DDETR_MSDA_IMPL"] = "reference"
    import onnxruntime as ort

    from deformable_detr.export.onnx_export import ExportedDetector, export_onnx
    from deformable_detr.runtime.files import write_text_atomic

    load_at_start = os.getloadavg()
    model = build(args.config)
    eager = ExportedDetector(model).eval()
    threads = torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # the same thread budget as PyTorch
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        start = time.perf_counter()
        export_onnx(model, path, batch_size=-1, channels=3, height=args.image_size, width=args.image_size,
                    opset=17, plugin=False)
        export_s = time.perf_counter() - start
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    rows = []
    for batch in (1, 4):
        images = torch.randn(batch, 3, args.image_size, args.image_size)
        feed = {"inputs": images.numpy()}

        def run_eager():
            with torch.inference_mode():
                return eager(images)

        def run_onnx():
            return session.run(None, feed)

        def run_eager_kernel():
            os.environ.pop("DDETR_MSDA_IMPL")
            try:
                return run_eager()
            finally:
                os.environ["DDETR_MSDA_IMPL"] = "reference"

        steps = {"eager": run_eager, "onnxruntime": run_onnx, "eager_kernel": run_eager_kernel}

        expected, got = run_eager(), run_onnx()  # warm-up, and the two must agree
        max_diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        run_eager_kernel()
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        # Best of the repeats: on a shared machine noise only ever adds time. Medians are kept too.
        eager_ms = min(times["eager"]) / batch * 1e3
        onnx_ms = min(times["onnxruntime"]) / batch * 1e3
        rows.append({"batch": batch, "image_size": args.image_size, "eager_ms_per_image": eager_ms,
                     "onnxruntime_ms_per_image": onnx_ms, "speedup": eager_ms / onnx_ms, "max_abs_diff": max_diff,
                     "eager_median_ms_per_image": statistics.median(times["eager"]) / batch * 1e3,
                     "onnxruntime_median_ms_per_image": statistics.median(times["onnxruntime"]) / batch * 1e3,
                     "ms_per_image": {k: spread([t / batch * 1e3 for t in v]) for k, v in times.items()},
                     "speedup_per_round": ratio_spread(times["eager"], times["onnxruntime"]),
                     "speedup_vs_eager_kernel_per_round": ratio_spread(times["eager_kernel"], times["onnxruntime"])})

    print(f"{'batch':>5} {'eager ms/img':>13} {'onnxruntime ms/img':>19} {'x':>6} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['eager_ms_per_image']:>13.1f} {r['onnxruntime_ms_per_image']:>19.1f} "
              f"{r['speedup']:>6.2f} {r['max_abs_diff']:>11.2e}")
    print(f"x = eager time / onnxruntime time (above 1: onnxruntime is faster); export took {export_s:.1f}s")
    for r in rows:
        print(f"batch {r['batch']}: eager with the compiled kernel {fmt(r['ms_per_image']['eager_kernel'], 1, 0)} "
                  f"ms/img; onnxruntime faster by {fmt(r['speedup_vs_eager_kernel_per_round'])} (per round)")
    output = RESULTS if args.config == "small" else RESULTS.replace(".json", f"_{args.config}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    payload = {"threads": threads, "export_s": export_s, "rows": rows, "config": args.config,
               "machine": machine(load_at_start),
               "tensorrt": "not measured: needs a GPU (scripts/gpu_check.sh takes the figures on one)"}
    payload["machine"]["shared"] = "2 cores shared with other engineers' builds and tests"
    write_text_atomic(output, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
