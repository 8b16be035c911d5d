"""Ray Data's ``map_batches`` with an actor pool against our own actor queue (``RayRunner``)
and one process, the same converted graph, the same N images, on a local Ray instance of this
machine's CPUs started once before all three (#30: "measure before you switch"). MobileNet
0.25 at 224, random weights (the same compute), batches of 64, runtime ``auto``. Needs Ray
Data's own requirements (pandas, pyarrow), which the project does not install:
  pip install --target /tmp/raydata pandas pyarrow   # (then remove the numpy it brings)
  PYTHONPATH=/tmp/raydata python benchmarks/ray_data.py 8000 > benchmarks/ray_data.txt
Prints, per variant and round: images/s in the loop (first batch in to last batch out on
the worker) and over the whole call (actors' start included; ours also writes the HDF5 file,
Ray Data leaves the features in the object store). Ray Data's actor gets 64 rows a call (one
batch each: nothing overlaps) or 1,024 (batches of 64 through ``FeatureModel.map``, several in
flight, as our actors run them).
"""
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
from common import sample_images

from pipeline.engine import RayEngine
from pipeline.extraction import ExtractionConfig, extract_features, keep_converted, start_model

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
cpus = os.cpu_count() or 1
x, y, source = sample_images(n)
tmp = Path(tempfile.mkdtemp(prefix="ray-data-"))
np.savez(tmp / "images.npz", x_train=x[0::2], y_train=y[0::2], x_test=x[1::2], y_test=y[1::2])
config = ExtractionConfig(dataset=f"npz:{tmp / 'images.npz'}", backbone="mobilenet", alpha=0.25,
                          weights="none", image_size=224, batch_size=64, compression="none",
                          cache_dir=str(tmp / "cache"), runtime="auto")
SHAPE = x.shape[1:]  # (the actor class refers to this, not to the images)
runtime = keep_converted(config, SHAPE, "auto")  # converted once, as the Ray driver does
config = replace(config, runtime=runtime)


class Extractor:
    """A Ray Data actor: the model started as our actors start it, one batch per call."""

    def __init__(self):
        self.model, _ = start_model(config, SHAPE, runtime, threads=cpus)

    def __call__(self, batch: dict) -> dict:
        """The rows of one call in batches of 64 through ``FeatureModel.map``, which keeps
        several in flight as our actors do (with one call per batch, nothing overlaps)."""
        start, images = time.time(), batch["data"]
        features = np.concatenate(list(self.model.map(
            images[lo:lo + config.batch_size] for lo in range(0, len(images), config.batch_size))))
        return {"features": features, "start": np.full(len(features), start),
                "end": np.full(len(features), time.time())}


def ray_data(rows_per_call: int) -> tuple[float, float]:
    t0 = time.time()
    ds = ray.data.from_numpy(x).map_batches(Extractor, batch_size=rows_per_call,
                                            batch_format="numpy", concurrency=1, num_cpus=cpus)
    out = ds.materialize()
    whole = time.time() - t0
    times = out.select_columns(["start", "end"]).to_pandas()
    assert out.count() == n
    return n / (times["end"].max() - times["start"].min()), n / whole


def ours() -> tuple[float, float]:
    t0 = time.time()
    with RayEngine("auto") as engine:
        done = engine.extract(replace(config, cache_dir=str(tmp / f"ours-{time.time()}")))
    whole = time.time() - t0
    return n / done.info["wall_seconds"], n / whole


def one_process() -> tuple[float, float]:
    t0 = time.time()
    done = extract_features(replace(config, cache_dir=str(tmp / f"one-{time.time()}")))
    return n / done.info["wall_seconds"], n / (time.time() - t0)


ray.init(num_cpus=cpus, include_dashboard=False, logging_level="ERROR")
ray.data.DataContext.get_current().enable_progress_bars = False
print(f"N = {n} ({source}), {cpus} CPUs, runtime {runtime}; images/s: in the loop, whole call")
for rnd in (1, 2):
    variants = [("one process", one_process), ("ours (RayRunner)", ours),
                ("Ray Data, 64 rows a call", lambda: ray_data(64)),
                ("Ray Data, 1,024 rows a call", lambda: ray_data(1024))]
    for name, run in variants if rnd == 1 else variants[::-1]:
        loop, whole = run()
        print(f"round {rnd}  {name:28s} {loop:7.1f} {whole:7.1f}", flush=True)
ray.shutdown()
