#!/bin/bash
# Why bench conversions cannot judge EfficientNetV2-M and -L with random weights: their
# features explode (largest 8.8e5 and 2.1e10), and rounding differences grow with them. Here
# TensorFlow against itself on the same 16 CIFAR-10 images: oneDNN on (the default) against
# oneDNN off (TF_ENABLE_ONEDNN_OPTS=0, other kernels, another summation order), and one batch
# of 16 against two of 8. A relative difference near 1 between two TensorFlow runs means the
# runtimes' 0.8-0.95 (benchmarks/conversions-efficientnet.json) says nothing about their
# conversion. Run from anywhere; recorded output in efficientnet-v2-random-weights.txt.
cd "$(dirname "$0")/.."
export KERAS_HOME=${KERAS_HOME:-$PWD/.keras-home}
tmp=$(mktemp -d)
for backbone in efficientnet_v2_b0 efficientnet_v2_m efficientnet_v2_l; do
  for run in "whole 1" "whole 0" "split 1"; do
    set -- $run
    TF_ENABLE_ONEDNN_OPTS=$2 .venv/bin/python - $backbone $1 "$tmp/$backbone-$1-$2.npy" 2>/dev/null <<'PY'
import sys
import numpy as np
from pipeline.bench import _images
from pipeline.extraction import ExtractionConfig, FeatureModel

backbone, how, out = sys.argv[1:]
x = _images(16)[0]
model = FeatureModel(ExtractionConfig(dataset="npz:x", backbone=backbone, weights="none"), x.shape[1:])
np.save(out, np.concatenate([model(x[:8]), model(x[8:])]) if how == "split" else model(x))
PY
  done
  .venv/bin/python - "$tmp/$backbone" $backbone <<'PY'
import sys
import numpy as np
prefix, backbone = sys.argv[1:]
ref, plain, split = (np.load(f"{prefix}-{n}.npy").astype(np.float64) for n in ("whole-1", "whole-0", "split-1"))
scale = np.abs(ref).max()
print(f"{backbone}: largest feature {scale:.3g}; largest difference / largest feature: "
      f"oneDNN on vs off {np.abs(ref - plain).max() / scale:.2g}, "
      f"one batch of 16 vs two of 8 {np.abs(ref - split).max() / scale:.2g}")
PY
done
rm -rf "$tmp"
