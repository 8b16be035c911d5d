"""Measured runs, each in a fresh process (``common.worker_command``): ``python workers.py
JSON`` runs the worker the JSON names (``extract``, the default, ``conversion`` or ``heads``)
and prints ``RESULT`` and its JSON (a conversion prints each ``PART`` as it finishes)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from common import children_peak_rss_mib, peak_rss_mib, reset_peak_rss


def _worker(method: str, npz: str, backbone: str, alpha: float | None, batch_size: int,
            size: int, cache: str) -> dict:
    """One measured run: ``naive``, ``ours:RUNTIME`` (the extract command's code path; with
    ``:kept``, on the graph an earlier run converted into ``cache``), ``raw:RUNTIME`` (the
    same converted graph fed from memory in a tight loop), ``ray:CPUS:SHARDS`` (a local Ray
    instance of CPUS started by the run; SHARDS per split, 0: the engine's default),
    ``running:CPUS:SHARDS`` (the local instance running already) or ``cluster:NODES:SHARDS``
    (a ``ray.cluster_utils.Cluster`` of NODES nodes sharing this machine's cores). ``npz``: an
    .npz file, or a dataset spec (``folder:PATH``) for ``ours`` and Ray."""
    dataset = npz if npz.startswith(("folder:", "npz:")) else f"npz:{npz}"
    t0 = time.perf_counter()
    result: dict = {}
    if method == "naive":
        import keras
        import tensorflow as tf

        from pipeline.backbones import build_backbone, preprocess_input

        x = np.load(npz)["x_train"]
        model = build_backbone(backbone, weights="none", alpha=alpha, input_size=size)
        pooled = keras.Sequential([model, keras.layers.GlobalAveragePooling2D()])
        big = tf.image.resize(x.astype(np.float32), (size, size)).numpy()  # all of it, in RAM
        big = preprocess_input(backbone)(big)
        rows = len(pooled.predict(big, batch_size=batch_size, verbose=0))
    else:
        from pipeline.extraction import ExtractionConfig, FeatureModel, extract_features

        runtime = method.split(":")[1] if method.startswith(("ours:", "raw:")) else "auto"
        config = ExtractionConfig(dataset=dataset, backbone=backbone, alpha=alpha,
                                  weights="none", image_size=size, batch_size=batch_size,
                                  cache_dir=cache, compression="none", runtime=runtime)
        if method.startswith("raw:"):
            x = np.load(npz)["x_train"]
            model = FeatureModel(config, x.shape[1:])
            model.use_runtime(runtime, Path(cache) / "model", backbone)
            batches = [x[lo:lo + batch_size] for lo in range(0, len(x), batch_size)]
            t1 = time.perf_counter()
            rows = sum(len(f) for f in model.map(batches))
            result["extract_seconds"] = time.perf_counter() - t1
        else:
            if method.startswith(("ray:", "running:", "cluster:")):
                done = _on_ray(method, config)
                result["engine"] = done.info["engine"]
            else:
                done = extract_features(config)
            rows = sum(done.info["dataset_splits"].values())
            result.update(extract_seconds=done.info["wall_seconds"], runtime=done.info["runtime"],
                          path=str(done.path))
        result["tensorflow_imported"] = "tensorflow" in sys.modules
    return {"rows": int(rows), "seconds": time.perf_counter() - t0, **result,
            "peak_rss_mib": peak_rss_mib(), "children_peak_rss_mib": children_peak_rss_mib()}


def _on_ray(method: str, config):
    """The extraction on a local Ray instance started here (``ray:CPUS:SHARDS``) or running
    already (``running:CPUS:SHARDS``), or on a cluster of several nodes on this machine
    (``cluster:NODES:SHARDS``)."""
    import os

    from pipeline.engine import RayEngine

    kind, count, shards = method.split(":")
    shards = int(shards) or None
    if kind in ("ray", "running"):
        with _local_engine(kind == "running", int(count), shards) as engine:
            return engine.extract(config)
    from ray.cluster_utils import Cluster

    cpus = max(1, (os.cpu_count() or 1) // int(count))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus,
                                                            "include_dashboard": False})
    try:
        for _ in range(int(count) - 1):
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        with RayEngine(address=cluster.address, shards=shards) as engine:
            return engine.extract(config)
    finally:
        cluster.shutdown()


def _local_engine(running: bool, cpus: int, shards: int | None = None):
    """The Ray engine on a local instance running already (``ray start``: reached at
    ``auto``), or on one of ``cpus`` CPUs it starts itself."""
    from pipeline.engine import RayEngine

    return RayEngine("auto" if running else None, num_cpus=None if running else cpus, shards=shards)


def _heads_worker(method: str, features: list[str], heads: list[str], threads: int,
                  results: str) -> dict:
    """Every head in ``heads`` on each feature file, as ``train`` and ``run`` do: in this
    process (``one process``: ``run_heads``, the one-core heads side by side), or as tasks
    sized by ``cluster_tasks`` on a local Ray instance of ``threads`` CPUs started here
    (``ray``) or running already (``ray, running instance``)."""
    from pipeline.training import cluster_tasks, run_heads, train_call

    calls = [{"feature_path": f, "head": h, "results_dir": results} for f in features for h in heads]
    t0 = time.perf_counter()
    if method.startswith("ray"):
        with _local_engine(method.endswith("running instance"), threads) as engine:
            engine.map(train_call, cluster_tasks(calls))
    else:
        run_heads(calls, threads)
    metrics = {(p.parent.name.split("-")[0] if len(features) == 1 else
                f"{p.parent.parent.name}/{p.parent.name.split('-')[0]}"): json.loads(p.read_text())
               for p in Path(results).glob("*/*/metrics.json")}
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(),
            "test_accuracy": {h: m["test_accuracy"] for h, m in sorted(metrics.items())},
            "fit_seconds": {h: m.get("fit_seconds") for h, m in sorted(metrics.items())}}


def _conversion_worker(backbone: str, npz: str, cache: str, converted: list[str],
                       modes: list[str] = ("avg",)) -> dict:
    """One backbone at its native size, per mode: TensorFlow's features of a few real images,
    then each converted runtime's (falling back if it cannot convert), float32 as the graph
    gives them. Each part is printed when done: a part stopped for its memory leaves the
    earlier ones. Parts are named RUNTIME for avg, RUNTIME:MODE for the others."""
    import logging.handlers

    from pipeline.extraction import ExtractionConfig, FeatureModel

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
                                      "peak_rss_mib": peak_rss_mib(),
                                      "feature_shape": list(reference.shape[1:]),
                                      "max_abs_feature": scale})
        for runtime in converted:
            reset_peak_rss()
            t0 = time.perf_counter()
            ran = model.use_runtime(runtime, Path(cache) / f"model-{mode}", f"{backbone} {mode}")
            row = {"converted": ran == runtime, "convert_and_load_seconds": time.perf_counter() - t0,
                   "peak_rss_mib": peak_rss_mib()}  # the process's peak during this conversion
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


def _part(name: str, row: dict) -> None:
    print("PART", json.dumps({name: row}), flush=True)


def _worker_main() -> None:
    """A worker process's entry: the worker's name and its arguments as JSON in argv[1]."""
    args = json.loads(sys.argv[1])
    workers = {"extract": _worker, "conversion": _conversion_worker, "heads": _heads_worker}
    worker = workers[args.pop("worker", "extract")]
    print("RESULT", json.dumps(worker(**args)))



if __name__ == "__main__":
    _worker_main()
