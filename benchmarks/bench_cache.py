"""The cost of knowing a dataset: the first scan of an image folder, no-op extract reruns,
the stat per file, and what the checksum and each HDF5 filter cost. ``make bench-cache``;
JSON beside this script."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import HERE, SHARED_CIFAR, commit, machine, parser, run, write

from pipeline.errors import PipelineError


def bench_cache(out: str | None = None, folder: str | None = None) -> dict:
    """The cost of knowing a dataset: first scan of an image folder (one thread against the
    default pool), a no-op ``extract`` rerun as a whole process (the scan index at work), the
    per-file stat cost, and what the Fletcher-32 checksum and each filter cost on write and
    read of real features."""
    import h5py

    from pipeline.datasets import load_dataset

    folder = Path(folder or SHARED_CIFAR.parent / "cifar10")
    if not folder.is_dir():
        raise PipelineError(f"bench cache: {folder} is not a folder; pass --folder PATH")
    spec = f"folder:{folder}"
    report = {"what": "cache: folder scans, no-op reruns, checksum and filter costs",
              "folder": str(folder), "machine": machine(None), "commit": commit(), "runs": {}}
    for workers in (1, os.cpu_count()):
        t0 = time.perf_counter()
        ds = load_dataset(spec, scan_workers=workers)
        report["runs"][f"first_scan_{workers}_processes_s"] = time.perf_counter() - t0
        print(f"bench cache: first scan with {workers} process(es): "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    files = sum(len(s) for s in ds.splits.values())
    paths = [p for p in folder.rglob("*") if p.is_file()]
    t0 = time.perf_counter()
    for path in paths:
        os.stat(path)
    stat_s = (time.perf_counter() - t0) / len(paths)
    report["runs"].update({"files": files, "stat_us_per_file": stat_s * 1e6,
                           "projected_stat_s_for_1_28M_files": stat_s * 1.28e6})
    with tempfile.TemporaryDirectory() as cache:
        args = [sys.executable, "-m", "pipeline", "extract", "--dataset", spec, "--backbone",
                "mobilenet", "--alpha", "0.25", "--weights", "none", "--image-size", "32",
                "--batch-size", "256", "--cache-dir", cache, "-q"]
        for run in ("first_extract", "noop_rerun_1", "noop_rerun_2", "noop_rerun_rescan"):
            t0 = time.perf_counter()
            proc = subprocess.run(args + (["--rescan"] if run.endswith("rescan") else []),
                                  capture_output=True, text=True)
            if proc.returncode:
                raise PipelineError(f"bench cache: extract failed: {proc.stderr.strip()[-300:]}")
            report["runs"][f"{run}_s"] = time.perf_counter() - t0
            print(f"bench cache: {run}: {report['runs'][f'{run}_s']:.2f} s (whole process)", flush=True)
        [features] = Path(cache).glob("*.h5")
        with h5py.File(features, "r") as f:
            X = f["train/features"][()]
        report["filters"] = _filter_costs(X, "pooled float32 (MobileNet 0.25 avg, random weights)")
        # Maps compress by their zeros: real weights where Keras can find them (KERAS_HOME).
        weights = "imagenet" if os.environ.get("KERAS_HOME") else "none"
        maps = [*args[:5], f"folder:{SHARED_CIFAR}", *args[6:10], "--weights", weights,
                "--image-size", "224", "--mode", "spatial", "--limit", "500", "--cache-dir", cache]
        proc = subprocess.run(maps, capture_output=True, text=True)
        if proc.returncode:
            raise PipelineError(f"bench cache: extract failed: {proc.stderr.strip()[-300:]}")
        [spatial] = Path(cache).glob("*spatial*.h5")
        with h5py.File(spatial, "r") as f:
            X = f["train/features"][()]
        report["filters"] += _filter_costs(X, f"spatial float16 (MobileNet 0.25 7x7x256, weights {weights})")
    write(report, out or HERE / "cache.json")
    return report


def _filter_costs(X: np.ndarray, what: str) -> list[dict]:
    """Write and read ``X`` with each filter choice, side by side (chunking as the store's)."""
    import h5py

    from pipeline.store import chunk_rows, filters

    rows = chunk_rows(X[0].nbytes)
    out = []
    for name, options in (("plain", {}), ("fletcher32", filters("none", X.shape[1:])),
                          ("fletcher32+shuffle+gzip1", filters("gzip", X.shape[1:])),
                          ("lzf (h5py only)", {"compression": "lzf"})):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "f.h5"
            t0 = time.perf_counter()
            with h5py.File(path, "w") as f:
                f.create_dataset("x", data=X, chunks=(min(rows, len(X)), *X.shape[1:]), **options)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with h5py.File(path, "r") as f:
                f["x"][()]
            read_s = time.perf_counter() - t0
            out.append({"features": what, "filters": name, "shape": list(X.shape),
                        "size_ratio": path.stat().st_size / X.nbytes,
                        "write_mb_s": X.nbytes / write_s / 2**20, "read_mb_s": X.nbytes / read_s / 2**20})
        print(f"  {name:26} size {out[-1]['size_ratio']:.3f}  write {out[-1]['write_mb_s']:6.0f} MB/s"
              f"  read {out[-1]['read_mb_s']:6.0f} MB/s", flush=True)
    return out



def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--folder", default=None, help="an image folder (default ../shared/data/cifar10)")
    args = p.parse_args(argv)
    return run(bench_cache, out=args.out, folder=args.folder)


if __name__ == "__main__":
    sys.exit(main())
