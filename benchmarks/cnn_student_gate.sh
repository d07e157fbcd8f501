#!/usr/bin/env bash
# M4: can the CNN student's static INT8 pass the gate? After `make demo`: distil ResNet-18 from the demo teacher at
# 128 px (16 epochs, about 9 minutes on 2 cores), export it, quantize (every candidate measured) and gate it against
# the teacher. Prints the candidates and the gate report; everything lands in ${OUT:-cnn_student_out}.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-demo_out}
OUT=${OUT:-cnn_student_out}
[ -d "$DEMO/run" ] || { echo "no teacher run in $DEMO/run: run 'make demo' first (or DEMO=folder)" >&2; exit 2; }
mkdir -p "$OUT"
"$BIN/medvision" distill --teacher "$DEMO/run" --config student_resnet18 --out "$OUT/run" --no-progress \
  preprocess.image_size=128 train.epochs=16 train.max_minutes=12 train.num_workers=0 train.batch_size=32 \
  train.early_stopping=16 "data.cache_dir=$DEMO/cache"
"$BIN/medvision" export "$OUT/run" --out "$OUT/student_fp32.onnx"
code=0
"$BIN/medvision" quantize "$OUT/student_fp32.onnx" --run "$OUT/run" --teacher "$DEMO/run" --out "$OUT/model.onnx" \
  --no-progress > "$OUT/gate.txt" || code=$?
python3 - "$OUT/model.quantize.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, c in r["candidates"].items():
    if "error" in c:
        print(f"{name:36s} error: {c['error']}")
    else:
        print(f"{name:36s} {c['speedup']:5.2f}x fp32  agreement {100 * c['agreement']:6.2f} %  "
              f"AUROC drop {c['auroc_drop']:+.4f}  {'passes' if c['passes'] else 'refused'}")
print(f"chosen: {r['chosen']} ({r['reason']})")
PY
sed -n '/PROMOTED\|REFUSED/,$p' "$OUT/gate.txt"
exit "$code"
