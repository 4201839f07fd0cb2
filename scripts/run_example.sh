#!/usr/bin/env bash
# Set up a fresh machine and run the whole path on the embedded example:
# make data -> convert (KITTI copy) -> train (on the converted shards) -> evaluate -> inference
# -> export (ONNX, checked with onnxruntime).
#   EPOCHS=30 bash scripts/run_example.sh     # longer training (default 6 epochs: 6 to 10 minutes on 2 cores)
#   PYTHON=.venv/bin/python bash scripts/run_example.sh    # in a virtual environment (no need to activate it)
#   SKIP_INSTALL=1 bash scripts/run_example.sh             # run again without reinstalling
set -euo pipefail
source "$(dirname "$0")/python-env.sh"   # $PY and ddetr (= "$PY" -m deformable_detr)
cd "$(dirname "$0")/.."
[ "${SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
EPOCHS=${EPOCHS:-6}
RUN=example_run
SPEC=examples/tiny/spec.yaml
step() { printf '\n=== %s\n' "$*"; }

step "1/6 example data (seeded, deterministic)"
ddetr make-example-data --out example_data

step "2/6 convert: the KITTI copy of the training images to sharded COCO JSON"
ddetr convert -e "$SPEC" -r "$RUN/results"

step "3/6 train: tiny config, $EPOCHS epochs on the CPU, on the shards convert just wrote"
ddetr train -e "$SPEC" -r "$RUN/results" train.num_epochs="$EPOCHS" \
    train.validation_interval="$EPOCHS" train.checkpoint_interval="$EPOCHS" train.optim.lr_steps="[$EPOCHS]" \
    train.auto_resume=false

step "4/6 evaluate: COCO mAP on the held-out images"
ddetr evaluate -e "$SPEC" -r "$RUN/results"

step "5/6 inference: KITTI labels and annotated images"
ddetr inference -e "$SPEC" -r "$RUN/results"

step "6/6 export: ONNX with plain ops, checked against PyTorch with onnxruntime"
ddetr export -e "$SPEC" -r "$RUN/results"
"$PY" - "$SPEC" "$RUN/results" <<'PY'
import sys
import numpy as np
import onnxruntime as ort
import torch
from deformable_detr.config import load_spec
from deformable_detr.tasks.loading import load_model_for_inference

spec = load_spec(sys.argv[1], results_dir=sys.argv[2])
model, _ = load_model_for_inference(spec, spec.export.checkpoint, spec.encryption_key, torch.device("cpu"))
images = torch.randn(2, 3, spec.export.input_height, spec.export.input_width)
session = ort.InferenceSession(spec.export.onnx_file, providers=["CPUExecutionProvider"])
logits, boxes = session.run(["pred_logits", "pred_boxes"], {"inputs": images.numpy()})
with torch.no_grad():
    ref = model(images, torch.zeros(2, *images.shape[-2:], dtype=torch.bool))
diff = max(np.abs(logits - ref["pred_logits"].numpy()).max(), np.abs(boxes - ref["pred_boxes"].numpy()).max())
print(f"onnxruntime vs PyTorch on random inputs (batch 2): max abs difference {diff:.2e}")
sys.exit(0 if diff < 1e-3 else 1)
PY

step "outputs"
echo "example data (COCO, KITTI, classmap): example_data/"
echo "converted shards and stats.txt:        $RUN/results/convert/"
echo "checkpoints, train_log.jsonl, status:  $RUN/results/train/"
echo "COCO metrics (results.json):           $RUN/results/evaluate/"
echo "KITTI labels, annotated images:        $RUN/results/inference/labels, $RUN/results/inference/images_annotated"
echo "ONNX model:                            $RUN/results/export/model.onnx"
