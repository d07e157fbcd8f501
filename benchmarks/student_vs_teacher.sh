#!/usr/bin/env bash
# M4 section 5: the INT8 students against ViT-B and ViT-S teachers (224 px) on this machine, one run, same
# threads, batch sizes and seeded inputs (random weights: speed does not depend on training):
#   ViT-Ti at 224 px and at 192 px (144 patch tokens instead of 196), dynamic INT8 with fused attention;
#   ResNet-18 at 224 px, static QDQ INT8.
# Prints the table and the ratios; writes bench.json / bench.md / bench.png under ${OUT:-bench_out}. About
# 12 minutes on 2 cores (3 interleaved rounds, the median kept; ROUNDS=1 for one).
set -euo pipefail
BIN=${BIN:-.venv/bin}
"$BIN/medvision" bench --teacher vit_base_patch16_224 --teacher vit_small_patch16_224 --student vit_tiny_patch16_224 \
  --student vit_tiny_patch16_224@192 --student resnet18 \
  --seconds "${SECONDS_PER_BATCH:-3}" --rounds "${ROUNDS:-3}" --out "${OUT:-bench_out}" "$@"
