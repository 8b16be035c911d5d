"""How many images one run of a converted graph should take: side by side in one process,
the same converted graph (random weights, resized in the graph from real 32x32 CIFAR-10-mini
images, batches of 64, the runners ``extract`` makes: ONNX Runtime one session called from 2
threads x 1 core, OpenVINO 2 streams with 2 requests each) split into runs of 1 to 64 images,
rounds alternating; and whether the features depend on it (bit for bit).

    KERAS_HOME=$PWD/.keras-home .venv/bin/python benchmarks/rows_per_run.py \
        > benchmarks/rows_per_run.txt
"""
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import sample_images

from pipeline import runtimes
from pipeline.extraction import ExtractionConfig, FeatureModel

CASES = [("mobilenet", 0.25, 224, 2048), ("mobilenet_v2", 0.35, 224, 2048),
         ("mobilenet_v2", 0.35, 112, 4096), ("resnet50", None, 224, 128)]
ROWS, ROUNDS = (1, 2, 4, 8, 16, 64), 5
NO_PROJECTION = (np.zeros(1, np.float32), np.zeros((1, 1), np.float32))


def main() -> None:
    print("rows_per_run(224) =", runtimes.rows_per_run(224), "; rows_per_run(112) =",
          runtimes.rows_per_run(112))
    for backbone, alpha, size, n in CASES:
        x = sample_images(n)[0]
        batches = [x[lo:lo + 64] for lo in range(0, n, 64)]
        for runtime in ("onnxruntime", "openvino"):
            with tempfile.TemporaryDirectory() as tmp:
                config = ExtractionConfig(dataset="npz:unused", backbone=backbone, alpha=alpha,
                                          weights="none", image_size=size, cache_dir=tmp)
                model = FeatureModel(config, x.shape[1:])
                model.use_runtime(runtime, Path(tmp), backbone)
            label = f"{backbone}{'' if alpha is None else f' {alpha}'} at {size}, {n} images, {runtime}"
            compare(label, model.runner, batches, n)


def compare(label: str, runner, batches: list, n: int) -> None:
    runner.rows = 64
    whole = np.concatenate(list(runner.map(batches, *NO_PROJECTION)))
    rates: dict[int, list[float]] = {rows: [] for rows in ROWS}
    for _ in range(ROUNDS):
        for rows in ROWS:
            runner.rows = rows
            t0 = time.perf_counter()
            out = np.concatenate(list(runner.map(batches, *NO_PROJECTION)))
            rates[rows].append(n / (time.perf_counter() - t0))
            assert np.array_equal(out, whole), f"{label}: features differ with {rows} rows per run"
    print(f"\n{label}: img/s per round (median; vs 64 rows); features bit-identical to 64 rows")
    base = statistics.median(rates[64])
    for rows in ROWS:
        med = statistics.median(rates[rows])
        print(f"  {rows:>2} rows per run: {' '.join(f'{r:6.0f}' for r in rates[rows])}"
              f"  (median {med:.0f}; {med / base:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
