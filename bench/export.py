"""CPU latency per image of the exported ONNX model (onnxruntime) against PyTorch eager, at batch 1 and 4.

A small configuration (ResNet-18, hidden 64, 2+2 layers, 4 levels, box refinement) is exported
with plain-op attention (`export.on_cpu: true`, dynamic batch); both runtimes get the same
batches, timed interleaved (best of the repeats, medians kept in the JSON) so that both see the same machine load. The
PyTorch side runs the reference attention, the same algorithm the ONNX graph holds.
Prints a table and writes bench/results/export.json.

    OMP_NUM_THREADS=2 python3 bench/export.py [--image-size 256] [--repeats 5]
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export.json")


def small_model():
    from deformable_detr.config.loader import spec_from_dict
    from deformable_detr.model import build_model

    spec = spec_from_dict({"model": {"backbone": "resnet_18", "num_queries": 100, "hidden_dim": 64, "nheads": 8,
                                     "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 256},
                           "dataset": {"num_classes": 4}})
    torch.manual_seed(0)
    return build_model(spec)[0].eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    os.environ["DDETR_MSDA_IMPL"] = "reference"
    import onnxruntime as ort

    from deformable_detr.export.onnx_export import ExportedDetector, export_onnx
    from deformable_detr.runtime.files import write_text_atomic

    model = small_model()
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

        expected, got = run_eager(), run_onnx()  # warm-up, and the two must agree
        max_diff = max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))
        times = {"eager": [], "onnxruntime": []}
        for _ in range(args.repeats):
            for name, step in (("eager", run_eager), ("onnxruntime", run_onnx)):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        # Best of the repeats: on a shared machine noise only ever adds time. Medians are kept too.
        eager_ms = min(times["eager"]) / batch * 1e3
        onnx_ms = min(times["onnxruntime"]) / batch * 1e3
        rows.append({"batch": batch, "image_size": args.image_size, "eager_ms_per_image": eager_ms,
                     "onnxruntime_ms_per_image": onnx_ms, "speedup": eager_ms / onnx_ms, "max_abs_diff": max_diff,
                     "eager_median_ms_per_image": statistics.median(times["eager"]) / batch * 1e3,
                     "onnxruntime_median_ms_per_image": statistics.median(times["onnxruntime"]) / batch * 1e3})

    print(f"{'batch':>5} {'eager ms/img':>13} {'onnxruntime ms/img':>19} {'x':>6} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['eager_ms_per_image']:>13.1f} {r['onnxruntime_ms_per_image']:>19.1f} "
              f"{r['speedup']:>6.2f} {r['max_abs_diff']:>11.2e}")
    print(f"x = eager time / onnxruntime time (above 1: onnxruntime is faster); export took {export_s:.1f}s")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    write_text_atomic(RESULTS, json.dumps({"threads": threads, "export_s": export_s, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
