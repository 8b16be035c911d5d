"""One process against Ray on the same cores, side by side, each run in a fresh process:
extraction (N images and the 52,000-image folder, per backbone), Ray's per-shard cost, a
two-node cluster on this machine, and a grid of heads. ``make bench-ray``; JSON beside this
script."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from common import (
    HERE,
    SHARED_CIFAR,
    commit,
    machine,
    parser,
    run,
    run_worker,
    sample_images,
    sizes,
    worker_result,
    write,
)

from pipeline.errors import PipelineError

BACKBONES = {"mobilenet": 0.25, "mobilenet_v2": 0.35}  # the weights ../shared holds
HEADS = ["logreg", "linear_svm", "rbf_svm", "mlp", "sgd_linear", "knn"]  # the pooled defaults
FOLDER = SHARED_CIFAR.parent / "cifar10"


def _pair(label: str, data: str, backbone: str, cpus: int, tmp: str, batch_size: int,
          size: int, rounds: int) -> dict:
    """The same extraction in one process, on a local Ray instance of ``cpus`` CPUs that the
    command starts (and stops), and on one running already (as a cluster is: ``ray start``),
    one right after the other, each into a cache of its own; ``rounds`` times, interleaved.
    Ratios of the best of each (the machine is shared: the best is the least disturbed)."""
    methods = {"one process": "ours", "ray": f"ray:{cpus}:0",
               "ray, running instance": f"running:{cpus}:0"}
    runs: dict[str, list] = {name: [] for name in methods}
    for round_ in range(rounds):
        for name, method in methods.items():
            print(f"bench ray: {label}, {backbone}, {name}, round {round_ + 1} ...", flush=True)
            with _running_instance(cpus) if method.startswith("running") else nullcontext():
                r = run_worker(method, data, backbone, BACKBONES[backbone], batch_size, size,
                               str(Path(tmp, f"{label}-{backbone}-{method}-{round_}")))
            print(f"  {r['images_per_second']:.1f} img/s end to end, "
                  f"{r['in_loop_images_per_second']:.1f} img/s in the loop", flush=True)
            runs[name].append(r)
    best = {name: {"end_to_end": max(r["images_per_second"] for r in rs),
                   "in_loop": max(r["in_loop_images_per_second"] for r in rs)}
            for name, rs in runs.items()}
    one = best["one process"]
    return {"images": label, "backbone": backbone, "alpha": BACKBONES[backbone], "runs": runs,
            "best_images_per_second": best,
            "ratios": {name: {k: b[k] / one[k] for k in b} for name, b in best.items()
                       if name != "one process"}}


@contextmanager
def _running_instance(cpus: int):
    """A local Ray instance of ``cpus`` CPUs, started before the timed run and stopped after."""
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*ray, "stop", "--force"], check=False, capture_output=True)


def _shard_cost(npz: str, backbone: str, cpus: int, counts: tuple[int, int], tmp: str,
                batch_size: int, size: int) -> dict:
    """Ray's cost per shard: the same extraction cut into few and into many shards."""
    runs = {}
    for shards in counts:
        print(f"bench ray: {shards} shards per split ...", flush=True)
        runs[shards] = run_worker(f"ray:{cpus}:{shards}", npz, backbone, BACKBONES[backbone],
                                  batch_size, size, str(Path(tmp, f"shards-{shards}")))
    few, many = (runs[c] for c in counts)
    extra = many["engine"]["shards_this_run"] - few["engine"]["shards_this_run"]
    return {"backbone": backbone, "runs": {str(c): r for c, r in runs.items()},
            "seconds_per_shard": (many["extract_seconds"] - few["extract_seconds"]) / extra
                                 if extra else None,  # too few images to cut finer
            "rows_per_shard": {str(c): r["rows"] / r["engine"]["shards_this_run"]
                               for c, r in runs.items()}}


def _heads(features: list[str], heads: list[str], cpus: int, tmp: str, rounds: int = 1) -> dict:
    """Every head on each feature file in one process and as Ray tasks, interleaved rounds;
    the ratios from each method's fastest round."""
    methods = ["one process", "ray", "ray, running instance"]
    runs: dict[str, list] = {m: [] for m in methods}
    for rnd in range(rounds):
        for method in methods if rnd % 2 == 0 else methods[::-1]:
            print(f"bench ray: heads, {method}, round {rnd + 1} ...", flush=True)
            results = Path(tmp, f"results-{method.replace(' ', '-').replace(',', '')}-{rnd}")
            args = {"worker": "heads", "method": method, "features": features, "heads": heads,
                    "threads": cpus, "results": str(results)}
            with _running_instance(cpus) if method.endswith("running instance") else nullcontext():
                runs[method].append(worker_result(args, f"heads ({method})"))
            print(f"  {runs[method][-1]['seconds']:.1f} s", flush=True)
    best = {m: min(r["seconds"] for r in rs) for m, rs in runs.items()}
    return {"heads": heads, "features": [Path(f).name for f in features], "runs": runs,
            "ratios": {m: best["one process"] / s for m, s in best.items() if m != "one process"}}


PARTS = ("extraction", "shards", "cluster", "heads")


def bench_ray(out: str | None = None, n: int = 8000, folder: Path | None = FOLDER,
              backbones: list[str] = tuple(BACKBONES), heads: list[str] = tuple(HEADS),
              features: list[str] | None = None, parts: list[str] = PARTS,
              shard_counts: tuple[int, int] = (1, 32), rounds: int = 2, batch_size: int = 64,
              size: int = 224) -> dict:
    """Per node, Ray against one process on the same cores (a local instance of
    ``os.cpu_count()`` CPUs): ``n`` tiled CIFAR-10-mini images and ``folder`` (when there),
    for each backbone; the cost per shard; a two-node cluster sharing the cores; the heads on
    ``features`` (default: the folder's file from the first backbone)."""
    import tensorflow as tf

    cpus = os.cpu_count() or 1
    x, y, source = sample_images(n)
    report = {"what": f"one process against Ray on the same {cpus} cores (per node)",
              "image_size": size, "batch_size": batch_size, "runtime": "auto",
              "weights": "none (the same compute as imagenet)", "machine": machine(tf),
              "commit": commit(), "extraction": [],
              "in_loop": "wall_seconds of the extraction: actors (or the model) already started",
              "end_to_end": "the fresh process's whole run: Ray's start, the folder scan, the "
                            "conversion, the publish step",
              "peak_rss_mib": "the driver process only: Ray's raylet and workers are not counted"}
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "bench.npz")
        np.savez(npz, x_train=x[0::2], y_train=y[0::2], x_test=x[1::2], y_test=y[1::2])  # all classes
        data = [(f"{n} ({source})", npz)]
        if folder is not None and folder.is_dir():
            data.append((f"{folder.name} folder", f"folder:{folder}"))
        if "extraction" in parts:
            for label, spec in data:
                for backbone in backbones:
                    report["extraction"].append(_pair(label, spec, backbone, cpus, tmp,
                                                      batch_size, size, rounds))
        if "shards" in parts:
            report["shard_cost"] = _shard_cost(npz, backbones[0], cpus, shard_counts, tmp,
                                               batch_size, size)
        if "cluster" in parts:
            print("bench ray: two-node cluster ...", flush=True)
            cluster = run_worker("cluster:2:0", npz, backbones[0], BACKBONES[backbones[0]],
                                 batch_size, size, str(Path(tmp, "cluster")))
            report["two_node_cluster"] = {"backbone": backbones[0], "nodes": 2,
                                          "cpus_per_node": max(1, cpus // 2), **cluster}
        if "heads" in parts:
            if features is None:
                pairs = report["extraction"]
                if not pairs:
                    raise PipelineError("--parts heads without extraction needs --features FILE")
                on_folder = [p for p in pairs if "folder" in p["images"]] or pairs
                features = [on_folder[0]["runs"]["one process"][0]["path"]]
            report["heads"] = _heads(features, list(heads), cpus, tmp, rounds)
    write(report, out or HERE / "ray.json")
    return report


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--sizes", default=None, help="images (the first of a comma-separated list)")
    p.add_argument("--backbones", default=",".join(BACKBONES), help="of: " + ", ".join(BACKBONES))
    p.add_argument("--folder", default=str(FOLDER), help="an image folder ('' for none)")
    p.add_argument("--heads", default=",".join(HEADS), help="heads trained both ways")
    p.add_argument("--features", default=None,
                   help="the feature files the heads train on, comma-separated (default: the "
                        "folder's, extracted)")
    p.add_argument("--parts", default=",".join(PARTS), help="of: " + ", ".join(PARTS))
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds of each extraction and of the heads")
    args = p.parse_args(argv)
    backbones = [b for b in args.backbones.split(",") if b]
    parts = [b for b in args.parts.split(",") if b]
    for given, names, chosen in (("backbones", BACKBONES, backbones), ("parts", PARTS, parts)):
        if not chosen or set(chosen) - set(names):
            print(f"error: --{given} {getattr(args, given)!r}: use some of {', '.join(names)}",
                  file=sys.stderr)
            return 2
    features = [f for f in (args.features or "").split(",") if f] or None
    for f in features or []:
        if not Path(f).is_file():
            print(f"error: --features {f}: no such file", file=sys.stderr)
            return 2
    return run(lambda: bench_ray(out=args.out, n=sizes(args.sizes, [8000])[0],
                                 folder=Path(args.folder) if args.folder else None,
                                 backbones=backbones, heads=args.heads.split(","),
                                 features=features, parts=parts,
                                 rounds=max(1, args.rounds)))


if __name__ == "__main__":
    sys.exit(main())
