#!/bin/bash
# Peak RSS of one process that builds ResNet50 (weights none, our uint8 graph) and exports it
# with tf2onnx, with its per-pass undo copies (TF2ONNX_CATCH_ERRORS unset, tf2onnx's default)
# and without them (set to FALSE, what pipeline/runtimes.py tries first; tf2onnx 1.17 turns
# them off when the variable is set at all, even to TRUE). Run from anywhere.
# Recorded output (session 6, 2026-11-24) is in tf2onnx-undo-copies.txt beside this file.
cd "$(dirname "$0")/.."
export KERAS_HOME=${KERAS_HOME:-$PWD/.keras-home}
for undo in default FALSE default FALSE; do
  if [ $undo = FALSE ]; then export TF2ONNX_CATCH_ERRORS=FALSE; else unset TF2ONNX_CATCH_ERRORS; fi
  .venv/bin/python - 2>/dev/null <<'PY'
import os, time
import tf2onnx
from pipeline.extraction import ExtractionConfig, FeatureModel

def peak_mib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) // 1024

fn = FeatureModel(ExtractionConfig(dataset="npz:x", backbone="resnet50", weights="none"),
                  (32, 32, 3))._features
before, t0 = peak_mib(), time.perf_counter()
proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=17)
print(f"TF2ONNX_CATCH_ERRORS={os.environ.get('TF2ONNX_CATCH_ERRORS', 'unset')}: peak RSS {before} MiB after the "
      f"Keras build, {peak_mib()} MiB after the export ({time.perf_counter() - t0:.1f} s), "
      f"{len(proto.SerializeToString()) / 2**20:.0f} MiB model")
PY
done
