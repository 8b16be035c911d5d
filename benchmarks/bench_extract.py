"""Extraction side by side, one fresh process per run on the same images: the naive way
(upscale everything to float32 in RAM, then model.predict), our extract on each installed
runtime (converting, then on the kept graph), and each runtime's raw engine. ``make
bench-extract``; JSON beside this script."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import HERE, commit, machine, parser, run, run_worker, sample_images, sizes, write

# (backbone, alpha, N or None for the --sizes): the two offline ImageNet models, and a
# compute-bound one the offline weights do not cover (random weights: the same compute).
BENCH_MODELS = (("mobilenet", 0.25, None), ("mobilenet_v2", 0.35, None), ("resnet50", None, 400))


def bench_extract(out: str | None = None, sizes: list[int] | None = None,
                  models=BENCH_MODELS, batch_size: int = 64, size: int = 224) -> dict:
    """Side by side, one fresh process each, on the same images: the naive way, our extract
    on each installed runtime (for a converted one: first converting the graph, then again on
    the graph kept from that run, new features), and each runtime's raw engine (the same
    converted graph fed from memory in a tight loop). Whole-process images/s include start-up
    and model build or load."""
    from pipeline import runtimes

    sizes = sizes or [8000]
    installed = [r for r in runtimes.RUNTIMES[1:] if runtimes.installed(r)]
    methods = ["naive", *[f"ours:{r}" for r in installed],
               *[f"ours:{r}:kept" for r in installed if r != "tensorflow"],
               *[f"raw:{r}" for r in installed]]
    report = {"what": "extraction: naive (upscale all in RAM + model.predict) vs our extract "
                      "per runtime vs each runtime's raw engine",
              "image_size": size, "batch_size": batch_size, "commit": commit(),
              "weights": "none (same compute as imagenet)", "compression": "none",
              "auto_runtime": {b: runtimes.choose("auto", b) for b, _, _ in models},
              "machine": machine(None), "runs": []}
    for backbone, alpha, fixed_n in models:
        for n in ([fixed_n] if fixed_n else sizes):
            x, y, source = sample_images(n)
            with tempfile.TemporaryDirectory() as tmp:
                npz = str(Path(tmp) / "bench.npz")
                # Ours extracts train + test: give it n/2 of each so both process n images.
                np.savez(npz, x_train=x[: n // 2], y_train=y[: n // 2], x_test=x[n // 2:],
                         y_test=y[n // 2:])
                np.savez(Path(tmp) / "all.npz", x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
                for method in methods:
                    path = npz if method.startswith("ours") else str(Path(tmp) / "all.npz")
                    cache = Path(tmp, method.removesuffix(":kept").replace(":", "-"))
                    if method.endswith(":kept"):  # the features go; the converted graph stays
                        for old in cache.iterdir():
                            if old.name != ".models":
                                shutil.rmtree(old) if old.is_dir() else old.unlink()
                    print(f"bench extract: {backbone}@{alpha} {method}, N={n} ...", flush=True)
                    r = run_worker(method, path, backbone, alpha, batch_size, size, str(cache))
                    r.update({"backbone": backbone, "alpha": alpha, "method": method, "n": n,
                              "images": source})
                    print(f"  {r['images_per_second']:.1f} img/s whole process"
                          + (f", {r['in_loop_images_per_second']:.1f} in the loop"
                             if "in_loop_images_per_second" in r else "")
                          + f", peak RSS {r['peak_rss_mib']:.0f} MiB"
                          + (f" (a child's {r['children_peak_rss_mib']:.0f} MiB)"
                             if r.get("children_peak_rss_mib") else ""), flush=True)
                    report["runs"].append(r)
    report["summary"] = _extract_summary(report["runs"], report["auto_runtime"])
    write(report, out or HERE / "extract.json")
    return report


def _extract_summary(runs: list[dict], autos: dict[str, str]) -> list[dict]:
    """Per model and N: ours (auto runtime) against naive, and against its raw engine."""
    out = []
    for key in dict.fromkeys((r["backbone"], r["alpha"], r["n"]) for r in runs):
        by = {r["method"]: r for r in runs if (r["backbone"], r["alpha"], r["n"]) == key}
        auto = autos[key[0]]
        ours, naive, raw = by.get(f"ours:{auto}"), by["naive"], by.get(f"raw:{auto}")
        kept = by.get(f"ours:{auto}:kept", ours)  # TensorFlow converts nothing
        out.append({
            "backbone": key[0], "alpha": key[1], "n": key[2], "runtime": auto,
            "whole_process_speedup_vs_naive": ours["images_per_second"] / naive["images_per_second"],
            "peak_rss_mib": ours["peak_rss_mib"],  # flat in N: compare the rows of one model
            "converting_child_peak_rss_mib": ours.get("children_peak_rss_mib", 0.0),
            # the sum: a bound on the memory of the run at any one time, child included
            "peak_rss_fraction_of_naive": (ours["peak_rss_mib"] + ours.get("children_peak_rss_mib", 0.0))
            / naive["peak_rss_mib"],
            "converted_graph_kept": {
                "whole_process_speedup_vs_naive": kept["images_per_second"]
                / naive["images_per_second"],
                "peak_rss_mib": kept["peak_rss_mib"],
                "peak_rss_fraction_of_naive": kept["peak_rss_mib"] / naive["peak_rss_mib"]},
            "in_loop_fraction_of_raw_engine": (ours["in_loop_images_per_second"]
                                               / raw["in_loop_images_per_second"]) if raw else None,
            "in_loop_over_tensorflow": {
                m.split(":")[1]: r["in_loop_images_per_second"]
                / by["ours:tensorflow"]["in_loop_images_per_second"]
                for m, r in by.items()
                if m.startswith("ours:") and m != "ours:tensorflow" and not m.endswith(":kept")},
        })
    return out



def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--sizes", default=None, help="comma-separated dataset sizes")
    p.add_argument("--backbone", default=None,
                   help="one backbone (default: MobileNet 0.25, MobileNetV2 0.35 and ResNet50)")
    p.add_argument("--alpha", type=float, default=None, help="its MobileNet width")
    args = p.parse_args(argv)
    models = [(args.backbone, args.alpha, None)] if args.backbone else BENCH_MODELS
    return run(lambda: bench_extract(out=args.out, sizes=sizes(args.sizes, None), models=models))


if __name__ == "__main__":
    sys.exit(main())
