"""Preprocessing before or after the upscale, side by side (issue #11, commit 1ec635f).

One process exports both graphs for ONNX Runtime (``preprocess_input`` after the resize, as
before 1ec635f, and before it, as now), then runs each on the same 3,000 images in four
alternating rounds (one session, 2 threads x 1 core, batch 64, as ``extract`` does), and
prints the features' largest difference on real CIFAR-10-mini test images with ImageNet
weights. Run from the repository root, alone on the machine:

    KERAS_HOME=$PWD/.keras-home .venv/bin/python benchmarks/preprocess_order.py
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tensorflow as tf  # noqa: E402
from common import sample_images  # noqa: E402

from pipeline import backbones as bb  # noqa: E402
from pipeline import extraction as extract  # noqa: E402
from pipeline import runtimes


class ResizeFirst(extract.FeatureModel):
    """The graph before 1ec635f: resize, then preprocess the 224x224 image."""

    def _maps_graph(self, images):
        x = tf.image.resize(tf.cast(images, tf.float32), (self.size, self.size))
        maps = self.backbone(bb.preprocess_input(self.backbone_name)(x), training=False)
        return [tf.cast(m, tf.float32) for m in (maps if isinstance(maps, list) else [maps])]


def main() -> None:
    x = sample_images(3000)[0]
    mean, comps = np.zeros(1, np.float32), np.zeros((1, 1), np.float32)
    export = runtimes.REGISTRY["onnxruntime"].format()[0]
    for backbone, alpha in (("mobilenet_v2", 0.35), ("mobilenet", 0.25)):
        config = extract.ExtractionConfig(dataset="npz:unused", backbone=backbone, alpha=alpha,
                                          weights="imagenet")
        models = {"resize first": ResizeFirst(config, x.shape[1:]),
                  "preprocess first": extract.FeatureModel(config, x.shape[1:])}
        test = x[:500]
        tf_features = {k: np.concatenate([m(test[i:i + 50]) for i in range(0, len(test), 50)])
                       for k, m in models.items()}
        diff = np.abs(tf_features["preprocess first"] - tf_features["resize first"]).max()
        print(f"{backbone} {alpha}: TensorFlow features, preprocess first vs resize first, "
              f"500 real images: max abs diff {diff:.2g} (features up to "
              f"{tf_features['resize first'].max():.2f})")
        runners = {k: runtimes.OnnxRunner(export(m.graph), workers=2, threads=1)
                   for k, m in models.items()}
        batches = [x[i:i + 64] for i in range(0, len(x), 64)]
        rates: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(4):
            for k, runner in runners.items():
                t0 = time.perf_counter()
                n = sum(len(f) for f in runner.map(batches, mean, comps))
                rates[k].append(n / (time.perf_counter() - t0))
        for k, r in rates.items():
            print(f"  ONNX Runtime, {k}: {', '.join(f'{v:.0f}' for v in r)} img/s "
                  f"(median {np.median(r):.0f})")
        ratio = np.median(rates["preprocess first"]) / np.median(rates["resize first"])
        print(f"  ratio of medians: {ratio:.3f}")


if __name__ == "__main__":
    main()
