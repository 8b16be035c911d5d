"""Benchmarks with JSON results beside this script: ``python benchmarks/bench.py WHAT`` (``make
bench``). Not part of the installed package; it uses the package's public names only.

Our extractor against the naive way, runtime conversions, head fit costs, Ray, the cache.

``bench_extract`` runs each (method, N) in a fresh worker process on the same images, so
each peak RSS (from ``wait4``) is that method's own; the command is one run, side by side.
The naive way is what course material does: upscale the whole set to float32 224x224x3 in
RAM, then ``model.predict``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

HERE = Path(__file__).resolve().parent  # results are written beside this script
# The shared data beside the checkout (../shared from the repository root).
SHARED_CIFAR = HERE.parent.parent / "shared" / "data" / "cifar10-mini"


def sample_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """n real 32x32 RGB images (CIFAR-10-mini, tiled) or, without it, seeded noise."""
    from pipeline.datasets import load_dataset

    if SHARED_CIFAR.is_dir():
        split = load_dataset(f"folder:{SHARED_CIFAR}").splits["train"]
        x = np.concatenate(list(split.batches(500)))
        reps = -(-n // len(x))
        return np.tile(x, (reps, 1, 1, 1))[:n], np.tile(split.labels, reps)[:n], "cifar10-mini (tiled)"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 32, 32, 3), np.uint8), np.arange(n) % 10, "random uint8"


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). ``wait4``'s ru_maxrss would also count the
    benchmark driver's memory, which the child inherits at fork until it execs."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def _children_peak_rss_mib() -> float:
    """The largest peak of this process's finished children: the converting child, or else
    the `uname -p` that importing h5py runs (through platform), about 45 MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _worker(method: str, npz: str, backbone: str, alpha: float | None, batch_size: int,
            size: int, cache: str) -> dict:
    """One measured run: ``naive``, ``ours:RUNTIME`` (the extract command's code path; with
    ``:kept``, on the graph an earlier run converted into ``cache``), ``raw:RUNTIME`` (the
    same converted graph fed from memory in a tight loop) or ``ray:WORKERS:SHARDS``."""
    data = np.load(npz)
    x = data["x_train"]
    t0 = time.perf_counter()
    result: dict = {}
    if method == "naive":
        import keras
        import tensorflow as tf

        from pipeline.backbones import build_backbone, preprocess_input

        model = build_backbone(backbone, weights="none", alpha=alpha, input_size=size)
        pooled = keras.Sequential([model, keras.layers.GlobalAveragePooling2D()])
        big = tf.image.resize(x.astype(np.float32), (size, size)).numpy()  # all of it, in RAM
        big = preprocess_input(backbone)(big)
        rows = len(pooled.predict(big, batch_size=batch_size, verbose=0))
    else:
        from pipeline.extract import ExtractionConfig, FeatureModel, extract_features

        runtime = method.split(":")[1] if method.startswith(("ours:", "raw:")) else "auto"
        config = ExtractionConfig(dataset=f"npz:{npz}", backbone=backbone, alpha=alpha,
                                  weights="none", image_size=size, batch_size=batch_size,
                                  cache_dir=cache, compression="none", runtime=runtime)
        if method.startswith("raw:"):
            model = FeatureModel(config, x.shape[1:])
            model.use_runtime(runtime, Path(cache) / "model", backbone)
            batches = [x[lo:lo + batch_size] for lo in range(0, len(x), batch_size)]
            t1 = time.perf_counter()
            rows = sum(len(f) for f in model.map(batches))
            result["extract_seconds"] = time.perf_counter() - t1
        else:
            if method.startswith("ray:"):  # ray:WORKERS:SHARDS
                from pipeline.engine import RayEngine

                workers, shards = (int(v) for v in method.split(":")[1:])
                with RayEngine(num_cpus=workers, shards=shards) as engine:
                    done = engine.extract(config)
            else:
                done = extract_features(config)
            rows = sum(done.info["dataset_splits"].values())
            result.update(extract_seconds=done.info["wall_seconds"], runtime=done.info["runtime"])
        result["tensorflow_imported"] = "tensorflow" in sys.modules
    return {"rows": int(rows), "seconds": time.perf_counter() - t0, **result,
            "peak_rss_mib": _peak_rss_mib(), "children_peak_rss_mib": _children_peak_rss_mib()}


def _worker_main() -> None:
    """A worker process's entry: the worker's name and its arguments as JSON in argv[2]."""
    args = json.loads(sys.argv[2])
    worker = {"extract": _worker, "conversion": _conversion_worker}[args.pop("worker", "extract")]
    print("RESULT", json.dumps(worker(**args)))


def _worker_command(args: dict) -> list[str]:
    """A fresh Python process running ``_worker_main`` on ``args``."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(args)]


def _run_worker(method: str, npz: str, backbone: str, alpha, batch_size: int, size: int,
                cache: str) -> dict:
    args = dict(method=method, npz=npz, backbone=backbone, alpha=alpha, batch_size=batch_size,
                size=size, cache=cache)
    proc = subprocess.run(_worker_command(args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if proc.returncode != 0 or "RESULT" not in proc.stdout:
        raise PipelineError(f"benchmark worker {method} failed (status {proc.returncode})")
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    result["images_per_second"] = result["rows"] / result["seconds"]
    if "extract_seconds" in result:
        result["in_loop_images_per_second"] = result["rows"] / result["extract_seconds"]
    return result


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM starts again from VmRSS
        f.write("5")


def _conversion_worker(backbone: str, npz: str, cache: str, converted: list[str],
                       modes: list[str] = ("avg",)) -> dict:
    """One backbone at its native size, per mode: TensorFlow's features of a few real images,
    then each converted runtime's (falling back if it cannot convert), float32 as the graph
    gives them. Each part is printed when done: a part stopped for its memory leaves the
    earlier ones. Parts are named RUNTIME for avg, RUNTIME:MODE for the others."""
    import logging.handlers

    from pipeline.extract import ExtractionConfig, FeatureModel

    warnings = logging.handlers.BufferingHandler(100)  # a fallback's one line
    logging.getLogger("pipeline").addHandler(warnings)
    x = np.load(npz)["x_train"]
    for mode in modes:
        t0 = time.perf_counter()
        model = FeatureModel(ExtractionConfig(dataset=f"npz:{npz}", backbone=backbone,
                                              weights="none", cache_dir=cache,
                                              **_mode_options(backbone, mode)), x.shape[1:])
        if mode == "bottleneck":  # any projection will do: the graph takes it as an input
            channels = model.backbone.output_shape[-1]
            rng = np.random.default_rng(0)
            model.projection = (rng.random(channels), rng.standard_normal((channels, 8)) / channels)
        reference = _float32_features(model, x)
        scale = float(np.abs(reference).max())
        suffix = "" if mode == "avg" else f":{mode}"
        _part(f"tensorflow{suffix}", {"seconds": time.perf_counter() - t0,
                                      "peak_rss_mib": _peak_rss_mib(),
                                      "feature_shape": list(reference.shape[1:]),
                                      "max_abs_feature": scale})
        for runtime in converted:
            _reset_peak_rss()
            t0 = time.perf_counter()
            ran = model.use_runtime(runtime, Path(cache) / f"model-{mode}", f"{backbone} {mode}")
            row = {"converted": ran == runtime, "convert_and_load_seconds": time.perf_counter() - t0,
                   "peak_rss_mib": _peak_rss_mib()}  # the process's peak during this conversion
            if ran != runtime:
                row["warning"] = warnings.buffer[-1].getMessage() if warnings.buffer else ""
            row.update(_agreement(_float32_features(model, x), reference, scale))
            _part(runtime + suffix, row)
    return {}


def _mode_options(backbone: str, mode: str) -> dict:
    """The extraction options of ``mode``; ``layers``: avg over two maps, one halfway through
    the network and its last (named by the Keras model built for it)."""
    if mode == "layers":
        from pipeline.backbones import build_backbone

        model = build_backbone(backbone, weights="none")
        maps = [layer.name for layer in model.layers if _output_rank(layer) == 4]
        return {"mode": "avg", "layers": (maps[len(maps) // 2], maps[-1])}
    return {"mode": mode, "bottleneck_k": 8} if mode == "bottleneck" else {"mode": mode}


def _output_rank(layer) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError, TypeError):  # no single output
        return 0


def _float32_features(model, images: np.ndarray) -> np.ndarray:
    """The graph's output before ``extract`` stores it (spatial maps go to float16 after)."""
    return np.asarray(model.graph_features(images), np.float64).reshape(len(images), -1)


def _agreement(features: np.ndarray, reference: np.ndarray, scale: float) -> dict:
    row = {"max_abs_diff": float(np.abs(features - reference).max())}
    if scale == 0:  # random weights silence some networks: only the zeros can agree
        return {**row, "matches": row["max_abs_diff"] == 0,
                "note": "TensorFlow's features are all zero with random weights"}
    norms = np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1)
    row["min_cosine"] = float(((features * reference).sum(1) / np.maximum(norms, 1e-300)).min())
    row["max_rel_diff"] = row["max_abs_diff"] / scale  # relative: some scales are tiny
    row["matches"] = row["max_rel_diff"] <= 2e-4 and row["min_cosine"] >= 0.99999
    return row


_MODE_NOTES = {"avg": "global average pooling of the last map (parts named RUNTIME)",
               "max": "global max pooling (RUNTIME:max)",
               "layers": "avg of two maps, the first halfway through the network's 4-d "
                         "outputs, and the last (RUNTIME:layers)",
               "bottleneck": "the last map through a random 1x1 projection to 8 channels, "
                             "flattened (RUNTIME:bottleneck)",
               "spatial": "the last map whole, float32 as the graph gives it (RUNTIME:spatial)"}


def _part(name: str, row: dict) -> None:
    print("PART", json.dumps({name: row}), flush=True)


def bench_conversions(out: str | None = None, backbones: list[str] | None = None,
                      modes: list[str] | None = None, images: int = 16, max_rss_gib: float = 12.0,
                      timeout: float = 900) -> dict:
    """Every registered backbone (``weights none``, native input size, ``modes``, default
    avg): does each installed runtime convert it, how long, how much memory, and do its
    features match TensorFlow's on ``images`` real images? One fresh process per backbone,
    stopped past ``max_rss_gib`` or ``timeout`` seconds (recorded as such)."""
    from pipeline import runtimes
    from pipeline.backbones import BACKBONES

    modes, backbones = modes or ["avg"], backbones or list(BACKBONES)
    for what, asked, known in (("--modes", modes, _MODE_NOTES), ("--backbone", backbones, BACKBONES)):
        if set(asked) - set(known):
            raise PipelineError(f"{what}: unknown {', '.join(sorted(set(asked) - set(known)))}; "
                                f"use some of {', '.join(known)}")
    converted = [r for r in ("openvino", "onnxruntime") if runtimes.installed(r)]
    names = [f"{r}{'' if m == 'avg' else ':' + m}" for m in modes for r in ("tensorflow", *converted)]
    x, y, source = sample_images(images)
    report = {"what": "conversion of every registered backbone (weights none, native input size, "
                      "uint8 32x32 input resized in the graph)",
              "modes": {m: _MODE_NOTES[m] for m in modes},
              "images": f"{images} {source}", "commit": _commit(), "machine": _machine(None),
              "matches_when": "max_rel_diff (max_abs_diff / max_abs_feature) <= 2e-4 and "
                              "min_cosine >= 0.99999 (the tests' 1e-3 on features to about 6)",
              "peak_rss_mib": "the worker process's peak while that runtime converted and "
                              "loaded the graph (the Keras model and TensorFlow included)",
              "limits": {"peak_rss_gib": max_rss_gib, "seconds": timeout}, "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "images.npz")
        np.savez(npz, x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
        for backbone in backbones:
            print(f"bench conversions: {backbone} ...", flush=True)
            args = dict(worker="conversion", backbone=backbone, npz=npz,
                        cache=str(Path(tmp, backbone)), converted=converted, modes=modes)
            parts, stopped = _watched_worker(args, max_rss_gib, timeout)
            for name in names:
                if name not in parts:  # the first part the worker did not finish
                    parts[name] = {"error": stopped}
                    break
            print("  " + json.dumps(parts), flush=True)
            report["backbones"][backbone] = parts
            shutil.rmtree(Path(tmp, backbone), ignore_errors=True)
    rows = report["backbones"].values()
    report["summary"] = {r: {
        "converted_and_matching": sum(bool(b.get(r, {}).get("converted") and b[r]["matches"])
                                      for b in rows),
        "falls_back": [k for k, b in report["backbones"].items()
                       if b.get(r, {}).get("converted") is False],
        "not_matching": [k for k, b in report["backbones"].items()
                         if b.get(r, {}).get("converted") and not b[r]["matches"]],
        "not_finished": [k for k, b in report["backbones"].items() if "converted" not in b.get(r, {})],
        "of": len(report["backbones"])} for r in names if not r.startswith("tensorflow")}
    _write(report, out or HERE / "conversions.json")
    return report


def _watched_worker(args: dict, max_rss_gib: float, timeout: float) -> tuple[dict, str | None]:
    """A worker's parts, and why it stopped early (past ``max_rss_gib`` of RSS or ``timeout``
    seconds: killed; or failed), None if it finished."""
    proc = subprocess.Popen(_worker_command(args), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    stopped, t0 = None, time.monotonic()
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = int(next(line for line in f if line.startswith("VmRSS")).split()[1]) << 10
        except (OSError, StopIteration):
            continue
        if rss > max_rss_gib * 2**30 or time.monotonic() - t0 > timeout:
            stopped = f"stopped at {rss / 2**30:.1f} GiB RSS after {time.monotonic() - t0:.0f} s"
            proc.kill()
    output = proc.stdout.read()
    parts = {k: v for line in output.splitlines() if line.startswith("PART ")
             for k, v in json.loads(line[5:]).items()}
    if not stopped and (proc.returncode != 0 or "RESULT" not in output):
        stopped = f"worker failed (status {proc.returncode})"
    return parts, stopped


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
              "image_size": size, "batch_size": batch_size, "commit": _commit(),
              "weights": "none (same compute as imagenet)", "compression": "none",
              "auto_runtime": {b: runtimes.choose("auto", b) for b, _, _ in models},
              "machine": _machine(None), "runs": []}
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
                    r = _run_worker(method, path, backbone, alpha, batch_size, size, str(cache))
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
    _write(report, out or HERE / "extract.json")
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


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


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
              "weights": "none (same compute as imagenet)", "machine": _machine(tf), "runs": [],
              "commit": _commit(),
              "peak_rss_mib": "the driver process only: Ray's raylet and workers are not counted"}
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "bench.npz")
        np.savez(npz, x_train=x[: n // 2], y_train=y[: n // 2], x_test=x[n // 2:], y_test=y[n // 2:])
        for method in ("ours", f"ray:{workers}:{shards}"):
            print(f"bench ray: {method}, N={n} ...", flush=True)
            r = _run_worker(method, npz, backbone, alpha, batch_size, size,
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
    _write(report, out or HERE / "ray.json")
    return report


def bench_heads(out: str | None = None, features: str | None = None,
                heads: tuple[str, ...] = ("logreg", "linear_svm", "rbf_svm", "mlp", "sgd_linear"),
                min_rows: int = 20_000) -> dict:
    """Fit seconds and accuracy per head on ``min_rows`` stratified training rows of one
    feature file, plus the logistic-regression sweep on 50,000 x 1,280 synthetic features."""
    from sklearn.datasets import make_classification

    from pipeline.datasets import stratified_subset
    from pipeline.heads import evaluate, load_features, make_head
    from pipeline.store import DEFAULT_CACHE_DIR, FeatureFile, FeatureStore

    if features is None:
        candidates = []
        for path in FeatureStore().complete_files():
            with FeatureFile(path) as ff:
                if ff.features("train").shape[0] >= min_rows:
                    candidates.append(path)
        if not candidates:
            raise PipelineError(f"no feature file with {min_rows:,}+ training rows in {DEFAULT_CACHE_DIR}/; "
                                "extract one (e.g. make features CONFIG=experiments/offline.toml) "
                                "or pass --features FILE")
        features = str(min(candidates, key=lambda p: p.stat().st_size))
    report = {"what": "head fit cost", "features": features, "machine": _machine(None),
              "commit": _commit(), "runs": []}
    with FeatureFile(features) as ff:
        for head in heads:
            data = load_features(ff, head)
            if head != "sgd_linear":  # the streaming head reads the whole file from disk
                keep = stratified_subset(data.y_train, min_rows)
                data.X_train, data.y_train = data.X_train[keep], data.y_train[keep]
            model, note = make_head(head, n_train=len(data.y_train))
            t0 = time.perf_counter()
            model.fit(data.X_train, data.y_train)
            fit = time.perf_counter() - t0
            m = evaluate(model, data.X_test, data.y_test, data.classes)
            row = {"head": head, "note": note, "n_train": len(data.y_train),
                   "width": int(np.prod(data.X_train.shape[1:])), "fit_seconds": fit,
                   "fits_in_sweep": len(getattr(model, "sweep_", [])) + 1,
                   "test_accuracy": m["test_accuracy"], "best_params": model.best_params_}
            print(f"bench heads: {head}: {fit:.1f} s, {100 * m['test_accuracy']:.2f}%", flush=True)
            report["runs"].append(json.loads(json.dumps(row, default=float)))
    X, y = make_classification(55_000, n_features=1280, n_informative=200, n_classes=10,
                               random_state=0)
    X = X.astype(np.float32)
    model, _ = make_head("logreg")
    t0 = time.perf_counter()
    model.fit(X[:50_000], y[:50_000])
    fit = time.perf_counter() - t0
    report["logreg_sweep_50000x1280"] = {
        "fit_seconds": fit, "fits": len(model.sweep_) + 1, "best_params": model.best_params_,
        "test_accuracy": float(model.score(X[50_000:], y[50_000:])),
        "data": "make_classification(55,000 x 1,280, 200 informative, 10 classes), 50,000 train"}
    print(f"bench heads: logreg sweep on 50,000 x 1,280: {fit:.1f} s", flush=True)
    _write(report, out or HERE / "heads.json")
    return report


def _machine(tf) -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if tf is not None:
        info["tensorflow"] = tf.__version__
        info["gpus"] = [g.name for g in tf.config.list_physical_devices("GPU")]
    return info


def _write(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {path}")


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
              "folder": str(folder), "machine": _machine(None), "commit": _commit(), "runs": {}}
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
    _write(report, out or HERE / "cache.json")
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
    import argparse

    p = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=("extract", "conversions", "heads", "ray", "cache"),
                   help="which benchmark to run")
    p.add_argument("--folder", default=None,
                   help="image folder (cache; default ../shared/data/cifar10)")
    p.add_argument("--out", default=None, help="the JSON results (default: benchmarks/WHAT.json)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated dataset sizes (extract; ray takes the first)")
    p.add_argument("--features", default=None, help="feature file (heads)")
    p.add_argument("--backbone", default=None,
                   help="backbone (extract: default MobileNet 0.25, MobileNetV2 0.35 and ResNet50;"
                        " conversions: comma-separated, default all registered)")
    p.add_argument("--alpha", type=float, default=None, help="MobileNet width (extract, ray)")
    p.add_argument("--modes", default=None,
                   help="comma-separated feature modes (conversions: avg, max, layers, bottleneck, "
                        "spatial; default avg)")
    args = p.parse_args(argv)
    try:
        sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else None
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: write whole numbers, e.g. 2000,8000")
    try:
        if args.what == "extract":
            models = [(args.backbone, args.alpha, None)] if args.backbone else BENCH_MODELS
            bench_extract(out=args.out, sizes=sizes, models=models)
        elif args.what == "conversions":
            bench_conversions(out=args.out,
                              backbones=args.backbone.split(",") if args.backbone else None,
                              modes=args.modes.split(",") if args.modes else None)
        elif args.what == "ray":
            bench_ray(out=args.out, n=sizes[0] if sizes else 2000,
                      backbone=args.backbone or "mobilenet_v2", alpha=args.alpha)
        elif args.what == "cache":
            bench_cache(out=args.out, folder=args.folder)
        else:
            bench_heads(out=args.out, features=args.features)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker_main()
    else:
        sys.exit(main())
