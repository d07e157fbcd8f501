#!/usr/bin/env bash
# The main job on the built-in synthetic dataset: synth -> train -> export -> serve -> score held-out images.
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${DEMO_DIR:-demo_out}
PATIENTS=${DEMO_PATIENTS:-400}
MINUTES=${DEMO_MINUTES:-7}
DIFFICULTY=${DEMO_DIFFICULTY:-0.1}
PORT=${DEMO_PORT:-8765}
EPOCHS=${DEMO_EPOCHS:-45}
URL="http://127.0.0.1:${PORT}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"
step "1/7 synthetic mammograms: $PATIENTS patients x 4 views (difficulty $DIFFICULTY)"
"$BIN/medvision" synth "$OUT/data" --patients "$PATIENTS" --difficulty "$DIFFICULTY"

step "2/7 manifest, patient-level split (leakage-checked) and data card"
"$BIN/medvision" data manifest --rsna "$OUT/data/labels.csv" --images "$OUT/data/images" --out "$OUT/manifest.csv"
"$BIN/medvision" data split "$OUT/manifest.csv" --out "$OUT/split.csv"
"$BIN/medvision" data card "$OUT/manifest.csv" --name synthetic_demo --out-dir "$OUT/data_card" --split "$OUT/split.csv" \
  --intended-use "Synthetic mammograms for demonstrating and testing medvision end to end. No patient data went in; results on it say nothing about real mammograms."

step "3/7 train a ViT from scratch (at most $MINUTES min; images decoded once into $OUT/cache)"
"$BIN/medvision" train --config demo --manifest "$OUT/manifest.csv" --split "$OUT/split.csv" \
  --out "$OUT/run" "train.epochs=$EPOCHS" "train.max_minutes=$MINUTES" "data.cache_dir=$OUT/cache"

step "4/7 evaluate: calibration and operating point on validation; held-out report with 95 % CIs"
"$BIN/medvision" evaluate "$OUT/run" --no-progress > "$OUT/evaluation.json"
cat "$OUT/evaluation.json"

step "5/7 export ONNX with embedded metadata and calibration (parity-checked against torch)"
"$BIN/medvision" export "$OUT/run" --out "$OUT/model.onnx"

step "6/7 start the service on $URL"
"$BIN/medvision" serve --model "$OUT/model.onnx" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$URL/readyz', timeout=1)" 2>/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then cat "$OUT/serve.log"; echo "service failed to start" >&2; exit 1; fi
  sleep 0.5
done

step "7/7 score the held-out test patients over HTTP"
"$BIN/medvision" predict "$OUT/data/images" --url "$URL" --labels "$OUT/data/labels.csv" \
  --split "$OUT/run/split.csv" --subset test --out "$OUT/test_scores.csv" | tee "$OUT/test_summary.json"

"$BIN/python" - "$OUT" "$BIN" <<'PY'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/test_summary.json"))
m = json.load(open(f"{out}/run/metrics.json"))
e = json.load(open(f"{out}/evaluation.json"))
lo, hi = e["auroc_ci95"]
print(f"\nheld-out test AUROC {s['auroc']:.3f} (95 % CI {lo:.3f}-{hi:.3f}, patient bootstrap) on {s['labelled']} "
      f"images ({s['positives']} cancer), scored over HTTP; sensitivity {s['sensitivity']:.2f} / specificity "
      f"{s['specificity']:.2f} at the validation operating point ({m['operating_point']}, calibrated); "
      f"validation AUROC {m['val_auroc']:.3f}")
print(f"artifacts in {out}/: model.onnx, run/ (checkpoint, config, metrics), test_scores.csv, "
      "data_card/synthetic_demo.md, run/evaluation/report.md")
print(f"serve it again: {sys.argv[2]}/medvision serve --model {out}/model.onnx  (OpenAPI docs at /docs)")
PY
