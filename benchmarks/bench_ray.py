"""The same extraction in one process and on a local Ray instance, side by side, each in a
fresh process. ``make bench-ray``; JSON beside this script."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from common import HERE, commit, machine, parser, run, run_worker, sample_images, sizes, write


def bench_ray(out: str | None = None, n: int = 2000, backbone: str = "mobilenet_v2",
              alpha: float | None = None, workers: int = 2, shards: int = 8,
              batch_size: int = 64, size: int = 224) -> dict:
    """The same extraction in one process and on a local Ray instance with ``workers``
    single-threaded actors, side by side in one run (each in a fresh worker process)."""
    import tensorflow as tf

    x, y, source = sample_images(n)
    report = {"what": f"extraction: one process vs Ray with {workers} workers (local instance)",
              "backbone": backbone, "alpha": alpha, "image_size": size, "batch_size": batch_size,
              "n": n, "shards_per_split": shards, "images": source,
              "weights": "none (same compute as imagenet)", "machine": machine(tf), "runs": [],
              "commit": commit(),
              "peak_rss_mib": "the driver process only: Ray's raylet and workers are not counted"}
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "bench.npz")
        np.savez(npz, x_train=x[: n // 2], y_train=y[: n // 2], x_test=x[n // 2:], y_test=y[n // 2:])
        for method in ("ours", f"ray:{workers}:{shards}"):
            print(f"bench ray: {method}, N={n} ...", flush=True)
            r = run_worker(method, npz, backbone, alpha, batch_size, size,
                            str(Path(tmp, method.split(":")[0])))
            r["method"] = "one process" if method == "ours" else f"ray, {workers} workers"
            r["extract_images_per_second"] = r["rows"] / r["extract_seconds"]
            print(f"  {r['images_per_second']:.1f} img/s end to end, "
                  f"{r['extract_images_per_second']:.1f} img/s extracting", flush=True)
            report["runs"].append(r)
    one, on_ray = report["runs"]
    report["summary"] = {
        "speedup_end_to_end": on_ray["images_per_second"] / one["images_per_second"],
        "speedup_extracting": on_ray["extract_images_per_second"] / one["extract_images_per_second"],
        "note": "end to end includes starting Ray, its actors and the finalize step",
    }
    write(report, out or HERE / "ray.json")
    return report



def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--sizes", default=None, help="images (the first of a comma-separated list)")
    p.add_argument("--backbone", default="mobilenet_v2", help="the backbone")
    p.add_argument("--alpha", type=float, default=None, help="its MobileNet width")
    args = p.parse_args(argv)
    return run(lambda: bench_ray(out=args.out, n=sizes(args.sizes, [2000])[0],
                                 backbone=args.backbone, alpha=args.alpha))


if __name__ == "__main__":
    sys.exit(main())
