"""Stage 1: run a frozen backbone over a dataset and cache its features.

uint8 batches go to the device as they are; casting, resizing to the backbone's input and
its own preprocessing (on the smaller of the two images) happen inside the graph, so the
dataset is never upscaled in host memory. The next batches decode in threads while the model
runs, and a writer thread saves each finished shard (a row range, see ``store.ShardSet``)
while the model runs on.

One flow does every extraction (``extract_features``): find what is cached or half done, fit
the bottleneck, extract the missing shards, publish one file. Where the shards are extracted
is a runner: ``LocalRunner`` (this process, the default) or the Ray engine's actor pool.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import queue
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline import SPLITS, runtimes
from pipeline import backbones as bb
from pipeline.datasets import Dataset, Split, load_dataset, parse_dataset, stratified_subset
from pipeline.errors import PipelineError
from pipeline.options import MODES, ExtractionConfig  # (ExtractionConfig: also re-exported)
from pipeline.store import (
    NEWER_FORMAT,
    FeatureStore,
    ShardSet,
    cache_key,
    check_file,
)

log = logging.getLogger(__name__)


@dataclass
class ExtractionResult:
    path: Path
    status: str  # created | resumed | up-to-date
    seconds: float
    images_per_second: float = 0.0
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- progress

class Progress:
    """One-line progress with images/s and ETA (a line every few seconds when not a TTY)."""

    def __init__(self, label: str, total: int, done: int = 0, stream=None):
        self.label, self.total, self.start_done = label, total, done
        self.done, self.stream = done, stream or sys.stderr  # the stderr of now, not of import
        self.t0 = self.last = time.monotonic()
        self.tty = self.stream.isatty()
        self.shown = log.isEnabledFor(logging.INFO)  # --quiet hides progress too

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.shown and (now - self.last >= (0.2 if self.tty else 5.0) or self.done >= self.total):
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
            self.stream.flush()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "--:--:--"
        return (f"{self.label}: {self.done:,}/{self.total:,} images  {rate:,.1f} img/s  "
                f"ETA {eta_text}")

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")


# ----------------------------------------------------------------------------- the model

class FeatureModel:
    """uint8 batch -> features, with resize and preprocessing inside one compiled graph.

    The Keras model is built on first use: a run on a converted graph kept from an earlier
    run neither builds it nor imports TensorFlow (seconds and about half a GiB at start-up).
    ``threads`` caps TensorFlow's threads (a Ray actor's share of its node)."""

    def __init__(self, config: ExtractionConfig, image_shape: tuple[int, int, int],
                 threads: int | None = None):
        self.config, self.image_shape, self.threads = config, tuple(image_shape), threads
        self.size = config.input_size
        self.backbone_name, self.mode, self.tta = config.backbone, MODES[config.mode], config.tta
        self.projection = None  # (mean, components) for the bottleneck mode
        self.runtime, self.runner = "tensorflow", None

    @functools.cached_property
    def backbone(self):
        """The frozen Keras model, its outputs the chosen ``layers`` (default: the last map)."""
        import keras
        import tensorflow as tf

        if self.threads:
            tf.config.threading.set_intra_op_parallelism_threads(self.threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        config = self.config
        policy = keras.config.dtype_policy()
        if config.precision != "float32":
            keras.config.set_dtype_policy(config.precision)
        try:
            backbone = bb.build_backbone(config.backbone, weights=config.weights,
                                         alpha=config.alpha, input_size=self.size)
        finally:
            keras.config.set_dtype_policy(policy)
        if not config.layers:
            return backbone
        try:
            outputs = [backbone.get_layer(name).output for name in config.layers]
        except ValueError:
            names = ", ".join(layer.name for layer in backbone.layers[-12:])
            raise PipelineError(f"backbone {config.backbone!r} has no layer named in "
                                f"{list(config.layers)}; its last layers are: {names}") from None
        return keras.Model(backbone.inputs, outputs)

    @functools.cached_property
    def _maps(self):
        return self._graph(self._maps_graph)

    @functools.cached_property
    def _features(self):
        import tensorflow as tf

        return self._graph(self._features_graph, tf.TensorSpec((None,), tf.float32),
                           tf.TensorSpec((None, None), tf.float32))

    @property
    def graph(self):
        """The traced feature graph (a ``tf.function`` of images, mean, components): what a
        runtime converts."""
        return self._features

    def _graph(self, fn, *more_inputs):
        """``fn`` traced over uint8 batches of these images. No autograph: the graphs branch
        on options, never on tensors, and its rewrite cost about 0.25 s of each start."""
        import tensorflow as tf

        self.backbone  # noqa: B018 - built before tracing: bad options fail with our message
        images = tf.TensorSpec((None, *self.image_shape), tf.uint8)
        return tf.function(fn, input_signature=[images, *more_inputs], autograph=False)

    def _maps_graph(self, images):
        import tensorflow as tf

        # preprocess_input is one affine map of each pixel (scale, shift, RGB to BGR) and the
        # bilinear resize takes weighted means of pixels (weights summing to one), so the two
        # commute to float32 rounding: preprocess the smaller image. Upscaling 32x32 to 224,
        # ONNX Runtime ran the MobileNets 2.7-5.3% faster (benchmarks/preprocess_order.txt).
        preprocess = bb.preprocess_input(self.backbone_name)
        x, (height, width) = tf.cast(images, tf.float32), self.image_shape[:2]
        if height * width <= self.size * self.size:
            x = tf.image.resize(preprocess(x), (self.size, self.size))
        else:
            x = preprocess(tf.image.resize(x, (self.size, self.size)))
        maps = self.backbone(x, training=False)
        return [tf.cast(m, tf.float32) for m in (maps if isinstance(maps, list) else [maps])]

    def _features_graph(self, images, mean, components):
        import tensorflow as tf

        if self.tta == "flip":  # the images and their mirrors as one batch: one graph, 2x work
            n = tf.shape(images)[0]
            both = self._view_features(tf.concat([images, tf.reverse(images, axis=[2])], 0),
                                       mean, components)
            plain, mirrored = both[:n], both[n:]
            if len(both.shape) == 4:  # a map: put the mirror's columns back in place first
                mirrored = tf.reverse(mirrored, axis=[2])
            features = (plain + mirrored) / 2
        else:
            features = self._view_features(images, mean, components)
        if self.mode.projection:  # flattened to vectors
            return tf.reshape(features, (tf.shape(features)[0], -1))
        return features

    def _view_features(self, images, mean, components):
        """Pooled vectors, or a map (spatial; bottleneck before flattening) for one view."""
        import tensorflow as tf

        maps = self._maps_graph(images)
        if self.mode.pool:
            pool = getattr(tf, self.mode.pool)
            return tf.concat([pool(m, axis=(1, 2)) for m in maps], axis=1)
        last = maps[-1]
        if self.mode.projection:
            return tf.tensordot(last - mean, components, axes=[[3], [0]])  # the 1x1 conv
        return last  # the map itself (cast to its stored dtype on the host: see _stored)

    def use_runtime(self, name: str, folder: Path, label: str, precision: str = "float32") -> str:
        """Run the graph on runtime ``name`` (``auto`` chooses); the converted graph is kept in
        ``folder`` (loaded from there, the Keras model is never built). A graph the runtime
        cannot take runs on TensorFlow, with one line saying so. Returns the runtime that will
        run."""
        requested, name = name, runtimes.choose(name, self.backbone_name)
        if name != "tensorflow" and precision != "float32":  # a warning if asked for by name
            (log.warning if requested == name else log.info)(
                "%s: %s runs float32 here; --precision %s runs on TensorFlow", label, name,
                precision)
            name = "tensorflow"
        if name != "tensorflow":
            try:
                converted = runtimes.load_kept(folder, name)
                if converted is None and self._converts_apart():
                    self._convert_apart(name, folder, label)
                    converted = runtimes.load_kept(folder, name)
                if converted is None:  # here (also where the child kept nothing: read-only)
                    converted = runtimes.load_or_convert(folder, lambda: self._features, label, name)
            except runtimes.ConversionError as exc:
                log.warning("%s; running on TensorFlow instead", exc)
                return self._on("tensorflow")
            self.runner = runtimes.REGISTRY[name].runner(converted, self.threads,
                                                         runtimes.rows_per_run(self.size))
        return self._on(name)

    def _converts_apart(self) -> bool:
        """Whether to convert in a process of its own: where TensorFlow is not loaded here
        yet and the bottleneck fit will not load it, this one never loads it (its start-up,
        and the converter's memory, stay in the child)."""
        return "tensorflow" not in sys.modules and not self.mode.projection

    def _convert_apart(self, runtime: str, folder: Path, label: str,
                       stop: threading.Event | None = None) -> None:
        """Convert and keep the graph in a child process (``convert_main``); its errors are
        raised here as the same one line. ``stop``, once set, kills the child: ``ConversionStopped``."""
        import pickle
        import subprocess

        job = pickle.dumps((self.config, self.image_shape, self.threads, runtime, folder, label))
        with subprocess.Popen([sys.executable, "-c", CONVERT_CHILD], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as child:
            try:
                while True:  # (with ``stop``, asked every 0.1 s)
                    try:
                        outputs = child.communicate(job, timeout=None if stop is None else 0.1)
                        break
                    except subprocess.TimeoutExpired:
                        job = None  # sent: a retry only reads
                        if stop.is_set():
                            raise ConversionStopped(label) from None
            except BaseException:  # stopped, or this process interrupted: the child ends too
                child.kill()
                child.wait()
                runtimes.remove_stale(folder, runtime)
                raise
        said, errors = (out.decode(errors="replace").strip() for out in outputs)
        if child.returncode == 0:
            return
        runtimes.remove_stale(folder, runtime)  # what it left half-written, if it was killed
        log.debug("the converting process said on stderr:\n%s", errors[-4000:])
        said = (said.splitlines() or [""])[-1]  # the one line (Keras prints its downloads)
        if child.returncode == 2:
            raise PipelineError(said)
        if child.returncode == 3:
            raise runtimes.ConversionError(said)
        if child.returncode < 0:
            why = f"killed by signal {-child.returncode}{': out of memory?' * (child.returncode == -9)}"
        else:
            why = errors.rsplit("\n", 1)[-1][:200] or f"status {child.returncode}"
        raise runtimes.ConversionError(f"{runtime} cannot convert {label}: the converting process "
                                       f"failed ({why})")

    def _on(self, name: str) -> str:
        self.runtime = name
        if name == "tensorflow":
            self.runner = None
            self._features  # noqa: B018 - built now: bad options fail before any work starts
        return name

    def _inputs(self) -> tuple[np.ndarray, np.ndarray]:
        mean, comps = self.projection if self.projection is not None else (np.zeros(1), np.zeros((1, 1)))
        return mean.astype(np.float32), comps.astype(np.float32)

    def _stored(self, features: np.ndarray) -> np.ndarray:
        # Spatial maps are stored as float16. numpy's cast rounds exactly as tf.cast does (to
        # nearest even), and TensorFlow's CPU kernel for it prints a misleading oneDNN "E" line.
        return features.astype(self.mode.stored, copy=False)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._stored(self.graph_features(images))

    def graph_features(self, images: np.ndarray) -> np.ndarray:
        """The graph's float32 output on the chosen runtime, before it is stored."""
        mean, comps = self._inputs()
        if self.runner is not None:
            return self.runner(np.asarray(images), mean, comps)
        return self._features(images, mean, comps).numpy()

    def map(self, batches) -> Iterator[np.ndarray]:
        """Features of each batch in order; a converted graph keeps several in flight."""
        if self.runner is None:
            yield from (self(b) for b in batches)
            return
        mean, comps = self._inputs()
        numpy_batches = (b.numpy() if hasattr(b, "numpy") else b for b in batches)
        yield from (self._stored(f) for f in self.runner.map(numpy_batches, mean, comps))

    def maps(self, images: np.ndarray) -> np.ndarray:
        return self._maps(images)[-1].numpy()


# The converting child: Keras imports scikit-learn and matplotlib when they are installed
# (1.1-1.5 s of its 3-3.7 s start-up here); a process that only converts needs neither.
CONVERT_CHILD = ("import sys; sys.modules.update(sklearn=None, matplotlib=None); "
                 "from pipeline.extraction import convert_main; convert_main()")


def convert_main() -> None:
    """A converting child's entry: the job pickled on stdin; exit status 0 (kept), 2 (bad
    options) or 3 (the runtime cannot take the graph), the one line on stdout."""
    import pickle

    config, image_shape, threads, runtime, folder, label = pickle.load(sys.stdin.buffer)
    model, status = FeatureModel(config, image_shape, threads), 0
    try:
        runtimes.load_or_convert(folder, lambda: model._features, label, runtime)
    except runtimes.ConversionError as exc:
        print(exc)
        status = 3
    except PipelineError as exc:
        print(exc)
        status = 2
    sys.stdout.flush()
    os._exit(status)  # TensorFlow's teardown is slow and nothing is left to tidy


def check_bottleneck_k(model: FeatureModel, k: int) -> None:
    channels = model.backbone.output_shape[-1]
    if k > channels:
        raise PipelineError(f"--bottleneck-k {k} exceeds the {channels} channels of the map; "
                            f"use at most {channels}")


def fit_bottleneck(model: FeatureModel, dataset: Dataset, k: int, n_images: int, batch_size: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of the last map's channel vectors over positions, on training images only.

    The top-k principal directions are the 1x1 convolution that keeps the most variance
    of the map: a label-free choice, so it cannot leak test information.
    """
    check_bottleneck_k(model, k)
    train = dataset.splits["train"]
    idx = stratified_subset(train.labels, min(n_images, len(train)), seed)
    total, outer, count = None, None, 0
    progress = Progress("bottleneck fit", len(idx))
    for lo in range(0, len(idx), batch_size):
        maps = model.maps(train.load(idx[lo:lo + batch_size])).astype(np.float64)
        vectors = maps.reshape(-1, maps.shape[-1])
        if total is None:
            total, outer = np.zeros(vectors.shape[1]), np.zeros((vectors.shape[1],) * 2)
        total += vectors.sum(0)
        outer += vectors.T @ vectors
        count += len(vectors)
        progress.update(min(batch_size, len(idx) - lo))
    progress.close()
    mean = total / count
    cov = outer / count - np.outer(mean, mean)
    _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    components = vectors[:, ::-1][:, :k]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(k)])
    return mean, components * signs  # sign-fixed: deterministic across runs


# ----------------------------------------------------------------------------- the loop

def _version(module: str, *packages: str) -> str | None:
    """A library's version: from the module if imported, else from its installed package
    (importing TensorFlow only to read its version would cost seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    if module in sys.modules:
        return sys.modules[module].__version__
    for package in packages or (module,):
        try:
            return version(package)
        except PackageNotFoundError:
            pass
    return None


def _cpu_name() -> str:
    """The CPU's model name (Linux), else its architecture (platform.processor() gives ''
    on Linux here, or the architecture)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def runtime_info(runtime: str = "tensorflow") -> dict:
    """Library versions and the device, for the provenance of what this process computes.
    A run on a converted graph need not import TensorFlow; OpenVINO and ONNX Runtime run here
    on the CPU."""
    device = f"{runtimes.REGISTRY[runtime].device}: {_cpu_name()}"
    if runtime == "tensorflow":
        import tensorflow as tf

        if gpus := tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpus[0])
            device = f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "tensorflow": _version("tensorflow", "tensorflow", "tensorflow-cpu"),
                "keras": _version("keras"), "h5py": _version("h5py"),
                "scikit-learn": _version("sklearn", "scikit-learn")}
    for name in sorted({m for r in runtimes.REGISTRY.values() for m in r.modules} - {"tensorflow"}):
        # a converted runtime's modules, where this process loaded them (tf2onnx: it converted here)
        if name in sys.modules:
            versions[name] = sys.modules[name].__version__
    return {"versions": versions, "device": device}


def worker_provenance(config: ExtractionConfig, runtime: str) -> dict:
    """What each shard records about the process that computed it."""
    return {"config": asdict(config), **runtime_info(runtime), "runtime": runtime,
            "host": socket.gethostname(), "pid": os.getpid()}


def requested(config: ExtractionConfig) -> dict:
    """What was asked for, as a feature file's provenance and its shards record it: the
    options and the dataset's absolute source (``store.lineage`` reads both)."""
    return {"config": asdict(config), "dataset_source": parse_dataset(config.dataset).absolute()}


def extraction_provenance(config: ExtractionConfig, dataset: Dataset, feature_shape, feature_dtype,
                          seconds: float, images: int, resumed: bool, **more) -> dict:
    """What a feature file records about how it was made (``more``: versions, device, ...)."""
    return {
        **requested(config),
        "dataset_splits": {s: len(dataset.splits[s]) for s in SPLITS},
        "image_shape": list(dataset.splits["train"].image_shape),
        "feature_shape": list(feature_shape), "feature_dtype": str(feature_dtype),
        **more, "batch_size": config.batch_size, "precision": config.precision,
        "wall_seconds": round(seconds, 3),
        "images_per_second": round(images / seconds if seconds > 0 else 0.0, 2),
        "images_this_run": images, "resumed": resumed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped_files": dataset.skipped,
    }


def shard_ranges(n: int, rows: int, batch_size: int,
                 gaps: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Cut rows 0..n into shards of about ``rows`` rows on batch boundaries, kept to ``gaps``
    (shards start at multiples of their size: every image sees the batch it would see in an
    uninterrupted run, whatever ran before)."""
    size = -(-max(rows, 1) // batch_size) * batch_size
    out = []
    for lo, hi in gaps if gaps is not None else [(0, n)]:
        at = lo
        while at < hi:
            stop = min(hi, (at // size + 1) * size)
            out.append((at, stop))
            at = stop
    return out


def prefetched(load, batches: list, depth: int = 2) -> Iterator[np.ndarray]:
    """``load(b)`` for each batch, decoding up to ``depth`` ahead in threads while the model runs."""
    with ThreadPoolExecutor(depth) as pool:
        yield from runtimes.in_order(batches, lambda b: pool.submit(load, b),
                                     lambda future: future.result(), depth)


def extract_shards(model: FeatureModel, shards: ShardSet, splits: dict[str, Split],
                   todo: list[tuple[str, int, int]], *, batch_size: int, key: str, provenance: dict,
                   compression: str, progress: Progress | None = None,
                   decode_threads: int = 2) -> None:
    """Extract rows [lo, hi) of each (split, lo, hi) in ``todo`` into one shard each. All of
    it is one stream of batches: the next batches decode in threads while the model runs, the
    runtime keeps batches in flight across shards and splits (draining it at each split's end
    idled a core for up to a batch), and a writer thread writes each finished shard meanwhile."""
    batches = [(split, lo, np.arange(b, min(b + batch_size, hi)))
               for split, lo, hi in todo for b in range(lo, hi, batch_size)]
    writes: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def writer() -> None:
        while (item := writes.get()) is not None:
            if not errors:
                split, start, block = item
                try:
                    shards.write(split, start, block, key=key, compression=compression,
                                 attrs={"provenance": {**provenance, "rows": [start, start + len(block)],
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}})
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    pending: list[np.ndarray] = []
    ends, shard = {(split, lo): hi for split, lo, hi in todo}, None
    try:
        images = prefetched(lambda item: splits[item[0]].load(item[1]),
                            [(split, idx) for split, _, idx in batches], decode_threads)
        for (split, start, idx), features in zip(batches, model.map(images)):
            shard = (split, start)
            pending.append(features)
            if progress:
                progress.update(len(features))
            if idx[-1] + 1 == ends[shard]:  # the shard's last batch
                writes.put((*shard, np.concatenate(pending)))
                pending = []
            if errors:
                break
    except BaseException:  # an unreadable image, Ctrl-C: keep the whole batches done before it
        if pending and not errors:
            writes.put((*shard, np.concatenate(pending)))
        raise
    finally:
        writes.put(None)
        thread.join()
    if errors:
        raise errors[0]  # the shards written before it are kept for the rerun


class Runner(Protocol):
    """Where the shards of one extraction run (``extract_features`` drives it): ``LocalRunner``
    in this process, or the Ray engine's actor pool (``engine.RayRunner``)."""

    name: str  # recorded in the provenance
    layout: str  # how the shards become one file: "merge" or "vds"

    def start(self, config: ExtractionConfig, dataset: Dataset, runtime: str) -> None: ...
    def fit_bottleneck(self) -> tuple[np.ndarray, np.ndarray]: ...
    def shard_rows(self, n: int, projection) -> int: ...
    def run(self, todo: list[tuple[str, int, int]], shards: ShardSet, key: str, projection,
            progress: Progress) -> dict: ...
    def stop(self) -> None: ...


def start_model(config: ExtractionConfig, image_shape: tuple[int, int, int], runtime: str,
                threads: int | None = None) -> tuple[FeatureModel, str]:
    """The model set up to extract, and the runtime that will run it: the same start in this
    process and on every Ray actor. Bad options (alpha, image size, layers, weights file,
    bottleneck k) fail here, before anything is written, unless a converted graph kept for
    these very options shows them good (then no Keras model is built, but in the bottleneck
    mode, whose k is checked against the map's channels)."""
    model = FeatureModel(config, image_shape, threads=threads)
    if MODES[config.mode].projection:
        check_bottleneck_k(model, config.bottleneck_k)
    runtime = model.use_runtime(
        runtime, FeatureStore(config.cache_dir).model_dir(config.model_key(image_shape)),
        f"{config.backbone} {config.mode}", config.precision)
    return model, runtime


class ConversionStopped(Exception):
    """A conversion in a child process stopped by its caller (``keep_converted``'s ``stop``)."""


def keep_converted(config: ExtractionConfig, image_shape: tuple[int, int, int],
                   runtime: str, apart: bool = False, stop: threading.Event | None = None) -> str:
    """The runtime workers of ``config`` should run, its graph converted and kept in the cache
    folder if it is not yet: what a Ray driver does once, so that each worker only loads it
    (converting per worker would cost every worker the converter's time and memory). The
    graph is not loaded here; where it cannot be converted, TensorFlow (said once).
    ``apart``: in a child process, as a driver that has not imported TensorFlow converts,
    even where it has (a notebook's): for a conversion beside other work in this process;
    ``stop``, once set, kills that process (``ConversionStopped``; nothing kept)."""
    model = FeatureModel(config, image_shape)
    name = runtimes.choose(runtime, config.backbone)
    if name == "tensorflow" or config.precision != "float32":
        return runtime  # the workers say why a precision runs on TensorFlow
    folder = FeatureStore(config.cache_dir).model_dir(config.model_key(image_shape))
    label = f"{config.backbone} {config.mode}"
    try:
        if runtimes.load_kept(folder, name) is None:
            if "tensorflow" in sys.modules and not apart:  # a notebook's: no second start-up
                runtimes.load_or_convert(folder, lambda: model._features, label, name)
            else:
                model._convert_apart(name, folder, label, stop)
    except runtimes.ConversionError as exc:
        log.warning("%s; running on TensorFlow instead", exc)
        return "tensorflow"
    return name


def fit_projection(model: FeatureModel, dataset: Dataset, config: ExtractionConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The bottleneck's (mean, components) for ``config``, fitted on its training images."""
    return fit_bottleneck(model, dataset, config.bottleneck_k, config.bottleneck_fit_images,
                          config.batch_size, config.seed)


def feature_row_bytes(model: FeatureModel, dataset: Dataset, projection) -> int:
    """The bytes of one row of features: one image through the model."""
    model.projection = projection
    return model(dataset.splits["train"].load(np.arange(1)))[0].nbytes


def rows_of_8_mib(row_bytes: int, batch_size: int) -> int:
    """The rows of a shard of about 8 MiB of features: big enough that its own costs (a
    file, its fsync, the runtime's pipeline drained) are about 1% of extracting it, small
    enough that a resume loses little."""
    return max(batch_size, (8 << 20) // max(row_bytes, 1))


class LocalRunner:
    """Extraction in this process: shard after shard, merged into one file when all are done."""

    name, layout = "local", "merge"

    def start(self, config: ExtractionConfig, dataset: Dataset, runtime: str) -> None:
        self.config, self.dataset, self._row_bytes = config, dataset, None
        self.model, self.runtime = start_model(config, dataset.splits["train"].image_shape, runtime)

    def fit_bottleneck(self) -> tuple[np.ndarray, np.ndarray]:
        return fit_projection(self.model, self.dataset, self.config)

    def shard_rows(self, n: int, projection) -> int:
        """``shard_rows``, or about 8 MiB of features: resume loses at most one shard."""
        if self.config.shard_rows:
            return self.config.shard_rows
        if self._row_bytes is None:  # once for both splits
            self._row_bytes = feature_row_bytes(self.model, self.dataset, projection)
        return rows_of_8_mib(self._row_bytes, self.config.batch_size)

    def run(self, todo: list[tuple[str, int, int]], shards: ShardSet, key: str, projection,
            progress: Progress) -> dict:
        self.model.projection = projection
        provenance = worker_provenance(self.config, self.runtime)
        extract_shards(self.model, shards, self.dataset.splits, todo,
                       batch_size=self.config.batch_size, key=key, provenance=provenance,
                       compression="none", progress=progress)  # merged, then compressed
        return {}

    def stop(self) -> None:
        pass


def extract_features(config: ExtractionConfig, *, rebuild: bool = False,
                     dataset: Dataset | None = None, runner: Runner | None = None,
                     scan_map=None) -> ExtractionResult:
    """Extract (or resume, or find cached) the features ``config`` names.

    ``runner`` is where the shards are extracted: ``LocalRunner()`` (this process) by default;
    the Ray engine passes its actor pool (and ``scan_map``, which scans image folders as
    cluster tasks).
    """
    t0 = time.monotonic()
    config.validate()
    store = FeatureStore(config.cache_dir)
    dataset = dataset or open_dataset(config, scan_map=scan_map)
    parts = config.key_parts(dataset)
    final = store.path_for(parts)
    if not rebuild and (done := cached_result(final, t0)):
        _refresh_ids(store, final, parts, dataset)
        return done
    with store.lock(parts):
        if not rebuild and (done := cached_result(final, t0, waited=True)):
            return done
        return _extract_locked(config, dataset, parts, store, t0, rebuild, runner or LocalRunner())


def open_dataset(config: ExtractionConfig, scan_map=None) -> Dataset:
    """The dataset as ``config`` reads it: the same rows (and so the same key) in a plan, an
    extraction and on a worker. Large photos are served at a size near the network's input."""
    return load_dataset(config.dataset, limit=config.limit, skip_bad=config.skip_bad,
                        seed=config.seed, scan_index=FeatureStore(config.cache_dir).scan_dir,
                        rescan=config.rescan, scan_map=scan_map,
                        fit=config.input_size)


def _refresh_ids(store: FeatureStore, final: Path, parts: dict, dataset: Dataset) -> None:
    """An up-to-date file whose images were renamed (same bytes, same order) or that was
    written before rows named their images gets the dataset's current row ids."""
    if store.refresh_ids(final, parts, {s: dataset.splits[s].row_ids() for s in SPLITS}):
        log.info("row ids of %s updated (images renamed since the extraction, or a file "
                 "written before rows named their images); the features are unchanged", final.name)


def cached_result(final: Path, t0: float, waited: bool = False) -> ExtractionResult | None:
    """The result for an already published, sound ``final``; None if there is none. A damaged
    one is an error, never silently replaced."""
    if not final.exists():
        return None
    problem = check_file(final)
    if problem is None:
        log.info("up to date: %s %s", final, "(written by the process we waited for)" if waited
                 else "(nothing to do)")
        return ExtractionResult(final, "up-to-date", time.monotonic() - t0)
    if problem.startswith(NEWER_FORMAT):
        raise PipelineError(f"cached file {final} is {problem}")
    raise PipelineError(f"cached file {final} is damaged ({problem}); rerun with --rebuild "
                        "to replace it, or `python -m pipeline verify --repair`")


def report_skipped(dataset: Dataset, path: Path) -> None:
    """--skip-bad must not skip silently: say how many and where the list is."""
    if dataset.skipped:
        log.warning("skipped %d undecodable file(s), e.g. %s; the list is in %s (dataset "
                    "'skipped_files'; `python -m pipeline inspect` prints it)",
                    len(dataset.skipped), dataset.skipped[0], path)


def _extract_locked(config: ExtractionConfig, dataset: Dataset, parts: dict, store: FeatureStore,
                    t0: float, rebuild: bool, runner: Runner) -> ExtractionResult:
    """Holding the key's lock: resume what is done, run the rest, publish one file."""
    shards, final = store.shards_for(parts), store.path_for(parts)
    start_over, done, runtime = _resume_point(config, store, shards, final, rebuild)
    runner.start(config, dataset, runtime)
    try:
        if start_over:
            final.unlink()
            shutil.rmtree(shards.path, ignore_errors=True)
            log.info("rebuild: removed %s and its shards", final.name)
        if done:
            sizes = {s: len(dataset.splits[s]) for s in SPLITS}
            log.info("resuming: %s", ", ".join(f"{s} {done.get(s, 0):,}/{sizes[s]:,}" for s in SPLITS))
        projection = _projection(config, shards, runner)
        todo = _missing_shards(config, dataset, shards, runner, projection)
        if todo:  # so that `gc` can tell these shards apart once the data changes
            shards.record_identity({"key_parts": parts, "provenance": requested(config)})
        images = sum(hi - lo for _, lo, hi in todo)
        progress = Progress(dataset.spec, images)
        t_extract = time.monotonic()
        try:
            engine = runner.run(todo, shards, cache_key(parts), projection, progress) if todo else {}
        finally:
            progress.close()
        seconds = time.monotonic() - t_extract
    finally:
        runner.stop()
    engine = {"name": runner.name, "layout": runner.layout, "shards_this_run": len(todo),
              "shard_count": sum(len(shards.files(s)) for s in SPLITS), **engine}
    path, provenance = _publish(config, dataset, parts, store, shards, runner.layout, projection,
                                engine, images, seconds, resumed=bool(done))
    confirmed = dataset.remember_checked()
    if confirmed:
        log.info("the scan index now trusts %s image file(s) modified just before the scan: "
                 "their sha256 was checked when they were read", f"{confirmed:,}")
    rate = images / seconds if seconds > 0 else 0.0
    if images:
        log.info("wrote %s (%s images in %.1f s, %s img/s)", path, f"{images:,}", seconds, f"{rate:,.1f}")
    else:  # a resume that found every shard done
        log.info("wrote %s (every row was extracted before: the shards made one file)", path)
    report_skipped(dataset, path)
    return ExtractionResult(path, "resumed" if done else "created", time.monotonic() - t0,
                            rate, provenance)


def _resume_point(config: ExtractionConfig, store: FeatureStore, shards: ShardSet, final: Path,
                  rebuild: bool) -> tuple[bool, dict[str, int], str]:
    """(start over, rows done per split, the runtime to run on). A rebuild keeps the old file
    until the new one is published, and resumes its own work in progress; but a virtual
    file's shards are its rows, so rebuilding one starts over. Rows done are finished on the
    runtime they came from."""
    start_over = rebuild and final.exists() and store.reads_shards(final)
    done = {} if start_over else {s: n for s in SPLITS if (n := shards.rows_done(s))}
    runtime = config.runtime
    if done:
        started_with = shards.first_shard()[2].get("runtime", "tensorflow")
        runtime = started_with if runtimes.installed(started_with) else runtime
    return start_over, done, runtime


def _projection(config: ExtractionConfig, shards: ShardSet, runner: Runner):
    """The bottleneck's (mean, components), fitted once and kept with the shards (a resume
    uses the same); None in the other modes."""
    if not MODES[config.mode].projection:
        return None
    projection = (shards.load_array("bottleneck_mean"), shards.load_array("bottleneck_components"))
    if projection[0] is None or projection[1] is None:
        projection = runner.fit_bottleneck()
        shards.save_array("bottleneck_mean", projection[0])
        shards.save_array("bottleneck_components", projection[1])
    return projection


def _missing_shards(config: ExtractionConfig, dataset: Dataset, shards: ShardSet, runner: Runner,
                    projection) -> list[tuple[str, int, int]]:
    """(split, start, stop) of every shard no complete shard covers yet."""
    sizes = {s: len(dataset.splits[s]) for s in SPLITS}
    gaps = {s: shards.missing(s, sizes[s]) for s in SPLITS}
    return [(s, lo, hi) for s in SPLITS if gaps[s]
            for lo, hi in shard_ranges(sizes[s], runner.shard_rows(sizes[s], projection),
                                       config.batch_size, gaps[s])]


def _publish(config: ExtractionConfig, dataset: Dataset, parts: dict, store: FeatureStore,
             shards: ShardSet, layout: str, projection, engine: dict, images: int, seconds: float,
             resumed: bool) -> tuple[Path, dict]:
    """One checked file of the complete shards, with its provenance."""
    import h5py

    feature_shape, feature_dtype, worker = shards.first_shard()  # what a worker computed, and how
    provenance = extraction_provenance(
        config, dataset, feature_shape, feature_dtype, seconds, images, resumed, engine=engine,
        versions=worker["versions"], device=worker["device"], runtime=worker["runtime"])
    extra = {} if projection is None else {"bottleneck/mean": projection[0],
                                           "bottleneck/components": projection[1]}
    if dataset.skipped:
        extra["skipped_files"] = np.array(dataset.skipped, dtype=h5py.string_dtype())
    attrs = {"provenance": provenance}
    if dataset.validation:
        attrs["validation_rows"] = dataset.validation
    path = store.publish(shards, parts, classes=dataset.classes,
                         labels={s: dataset.splits[s].labels for s in SPLITS}, attrs=attrs,
                         layout=layout, compression=config.file_compression(), extra=extra,
                         ids={s: dataset.splits[s].row_ids() for s in SPLITS})
    return path, provenance
