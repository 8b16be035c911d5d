#!/bin/bash
# Peak RSS of one process that runs our uint8 feature graph (weights none, 32x32 input resized
# in the graph to the native size, mode avg) once on a batch of N images, on TensorFlow and
# on OpenVINO (float32), for EfficientNetB0 and B5. It found OpenVINO's memory growing by
# about 1 GiB per image in a batch at B5's 456 px: OpenVINO's TensorFlow front end made an
# output of every activation (52 on B0), each held for the whole batch. Since bac4e55 only the
# features are an output. Run from anywhere; recorded outputs, before and after, in
# efficientnet-memory.txt. Seconds: the one call (TensorFlow's traces the graph in it; OpenVINO's
# conversion comes before it). Peak RSS: the whole process, conversion included.
cd "$(dirname "$0")/.."
export KERAS_HOME=${KERAS_HOME:-$PWD/.keras-home}
for args in "efficientnet_b0 64" "efficientnet_b5 4" "efficientnet_b5 16"; do
  for runtime in tensorflow openvino; do
    .venv/bin/python - $args $runtime 2>/dev/null <<'PY'
import sys, time
import numpy as np
from pipeline.extraction import ExtractionConfig, FeatureModel

backbone, n, runtime = sys.argv[1], int(sys.argv[2]), sys.argv[3]
x = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), np.uint8)
model = FeatureModel(ExtractionConfig(dataset="npz:x", backbone=backbone, weights="none"), x.shape[1:])
if runtime == "openvino":
    import tempfile
    from pathlib import Path
    model.use_runtime("openvino", Path(tempfile.mkdtemp()), backbone)
t0 = time.perf_counter()
model(x)
with open("/proc/self/status") as f:
    peak = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) // 1024
print(f"{backbone} batch {n} on {runtime}: {time.perf_counter() - t0:.1f} s, peak RSS {peak} MiB")
PY
  done
done
