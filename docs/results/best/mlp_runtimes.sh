#!/usr/bin/env bash
# The wide MLP (512 units, alpha 1e-3) on the CIFAR-10 fusion of two runs' caches (A: ONNX
# Runtime, B: OpenVINO, each from an empty cache), one network and an average of three
# (seeds = 3). Output: mlp_runtimes.txt. Usage: bash mlp_runtimes.sh RUN_A_DIR RUN_B_DIR
set -euo pipefail
for seeds in 1 3; do
  for run in "$1" "$2"; do
    c=$run/features_cache
    python -m pipeline train --head mlp --param hidden=512 --param alpha=0.001 --param seeds=$seeds \
      --fuse --features $c/folder_cifar10-mobilenet-avg-0f85e693f7e0e9ee.h5 \
      $c/folder_cifar10-mobilenet_v2-avg-3dd9e9d31ac500ef.h5 --cache-dir $c \
      --results-dir "$(mktemp -d)" 2>&1 | grep "test accuracy" | sed "s|^|seeds=$seeds $(basename $run): |"
  done
done
