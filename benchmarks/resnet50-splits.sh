#!/bin/bash
# Why `bench extract` finds our loop at about 0.8x the raw engine on ResNet50 (N = 400) but at
# 0.95-1.0x on the MobileNets: ours extracts two splits of 200 (train and test), the raw engine
# one stream of 400. With OpenVINO's two streams of one core each, the end of a split leaves a
# core idle while the other finishes a 64-image batch (about 4.4 s on ResNet50 here). Here the
# raw engine itself, on the same kept graph, fed both ways. Run after `bench extract`'s
# conditions (weights none, 224, batch 64); recorded output in resnet50-splits.txt.
cd "$(dirname "$0")/.."
export KERAS_HOME=${KERAS_HOME:-$PWD/.keras-home}
.venv/bin/python - 2>/dev/null <<'PY'
import tempfile
import time
from pathlib import Path

from pipeline.bench import _images
from pipeline.extraction import ExtractionConfig, FeatureModel

x = _images(400)[0]
config = ExtractionConfig(dataset="npz:unused", backbone="resnet50", weights="none", batch_size=64,
                          runtime="openvino")
model = FeatureModel(config, x.shape[1:])
model.use_runtime("openvino", Path(tempfile.mkdtemp()), "resnet50 avg")


def images_per_second(parts) -> float:
    t0, n = time.perf_counter(), 0
    for part in parts:
        n += sum(len(f) for f in model.map([part[lo:lo + 64] for lo in range(0, len(part), 64)]))
    return n / (time.perf_counter() - t0)


for _ in range(2):
    print(f"OpenVINO, ResNet50, 400 images: one stream {images_per_second([x]):.1f} img/s, "
          f"two splits of 200 {images_per_second([x[:200], x[200:]]):.1f} img/s")
PY
