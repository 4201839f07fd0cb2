"""onnxruntime on the exported model against PyTorch on the same random inputs (gpu_check step 4).

    python3 scripts/gpu_check_onnx.py SPEC RESULTS_DIR OUT_JSON
"""
import json
import sys

import numpy as np
import onnxruntime as ort
import torch
from deformable_detr.config import load_spec
from deformable_detr.tasks.loading import load_model_for_inference

spec = load_spec(sys.argv[1], results_dir=sys.argv[2])
model, _ = load_model_for_inference(spec, spec.export.checkpoint, spec.encryption_key, torch.device("cpu"))
images = torch.randn(2, 3, spec.export.input_height, spec.export.input_width)
providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
session = ort.InferenceSession(spec.export.onnx_file, providers=providers)
logits, boxes = session.run(["pred_logits", "pred_boxes"], {"inputs": images.numpy()})
with torch.no_grad():
    ref = model(images, torch.zeros(2, *images.shape[-2:], dtype=torch.bool))
diff = float(max(np.abs(logits - ref["pred_logits"].numpy()).max(), np.abs(boxes - ref["pred_boxes"].numpy()).max()))
with open(sys.argv[3], "w") as out:
    json.dump({"providers": session.get_providers(), "max_abs_difference": diff, "tolerance": 1e-3}, out, indent=2)
print(f"onnxruntime ({session.get_providers()[0]}) vs PyTorch, batch 2: max abs difference {diff:.2e}")
sys.exit(0 if diff < 1e-3 else 1)
