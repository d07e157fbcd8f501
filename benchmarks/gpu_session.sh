#!/usr/bin/env bash
# One prepared script for a lent GPU (device tool: 15 minutes in all). Run from the repository root:
#   bash benchmarks/gpu_session.sh            # writes everything under ${OUT:-$PWD/gpu_out}
# 1. training throughput of every recipe on the GPU: bf16 autocast, torch.compile, fraction of the
#    measured bf16 matmul peak;
# 2. the ViT-S teacher (vit_small_scratch: conv stem, no pretrained weights) on the synthetic dataset at
#    the default difficulty, then `medvision evaluate` for its validation AUROC with a 95 % interval;
# 3. the inference bench on the GPU (torch bf16, ORT CUDA provider).
set -euo pipefail
OUT=${OUT:-$PWD/gpu_out}
MINUTES=${TEACHER_MINUTES:-6}
PY=${PY:-python}
mkdir -p "$OUT"
if ! $PY -c "import medvision.training" 2>/dev/null; then
  $PY -m pip install -q -e '.[train,dev,gpu]'
fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY benchmarks/train_throughput.py --device cuda --compile --steps 20 --json "$OUT/throughput.json" | tee "$OUT/throughput.txt"
medvision synth "$OUT/data" --patients 600 --seed 1 --workers 16 --no-progress > "$OUT/synth.json"
medvision data manifest --rsna "$OUT/data/labels.csv" --images "$OUT/data/images" --out "$OUT/m.csv"
medvision data split "$OUT/m.csv" --out "$OUT/split.csv"
medvision train --config vit_small_scratch --manifest "$OUT/m.csv" --split "$OUT/split.csv" --out "$OUT/teacher" \
  --no-progress "train.max_minutes=$MINUTES" train.num_workers=8 "data.cache_dir=$OUT/cache" 2>&1 | tail -30
medvision evaluate "$OUT/teacher" --subset val --out "$OUT/teacher/eval_val" --no-progress | tee "$OUT/teacher_val.json"
medvision evaluate "$OUT/teacher" --no-progress | tee "$OUT/teacher_test.json"
# 3. inference: teachers vs the ViT-Ti student, torch bf16 and ONNX Runtime's CUDA provider (M4 section 5)
medvision bench --device cuda --teacher vit_base_patch16_224 --teacher vit_small_patch16_224 \
  --student vit_tiny_patch16_224 --seconds 2 --out "$OUT/bench_cuda" --no-progress | tee "$OUT/bench_cuda.md"
