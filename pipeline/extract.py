"""Stage 1: run a frozen backbone over a dataset and cache its features.

uint8 batches go to the device as they are; casting, resizing to the backbone's input and
its own preprocessing happen inside the graph, so the dataset is never upscaled in host
memory. A ``tf.data`` pipeline prefetches the next batches while the model runs, and a writer
thread saves finished segments while the model runs on.
"""

from __future__ import annotations

import logging
import platform
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import backbones as bb
from pipeline import runtimes
from pipeline.datasets import SPLITS, Dataset, load_dataset, stratified_subset
from pipeline.errors import PipelineError
from pipeline.store import FeatureStore, PartialEntry, check_file

EXTRACTOR_VERSION = 1
MODES = ("avg", "max", "bottleneck", "spatial")
TTAS = ("none", "flip")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
log = logging.getLogger(__name__)


@dataclass
class ExtractionConfig:
    dataset: str
    backbone: str = "mobilenet_v2"
    pooling: str = "avg"  # avg | max | bottleneck | spatial
    alpha: float | None = None
    weights: str = "imagenet"
    image_size: int | None = None  # default: the backbone's native size
    layers: tuple[str, ...] = ()  # pool these layers' outputs (concatenated) instead of the last
    bottleneck_k: int = 32
    bottleneck_fit_images: int = 2000
    batch_size: int = 64
    limit: int | None = None
    precision: str = "float32"
    compression: str = "auto"
    skip_bad: bool = False
    cache_dir: str = "features_cache"
    seed: int = 0
    segment_rows: int | None = None  # rows per resumable segment; default about 8 MiB
    rescan: bool = False  # read every image file again instead of trusting the scan index
    runtime: str = "auto"  # auto | tensorflow | openvino: which engine runs the graph
    tta: str = "none"  # flip: average each image's features with its mirror's (not for digits)

    def validate(self) -> None:
        spec = bb.get_spec(self.backbone)
        if self.pooling not in MODES:
            raise PipelineError(f"unknown feature mode {self.pooling!r}; use one of {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        if self.alpha is not None and not spec.has_alpha:
            raise PipelineError(f"backbone {self.backbone!r} takes no alpha; only the MobileNets do")
        if self.layers and self.pooling not in ("avg", "max"):
            raise PipelineError("--layer works with --pooling avg or max")
        if self.batch_size < 1 or (self.image_size is not None and self.image_size < 1):
            raise PipelineError("--batch-size and --image-size must be positive")
        if self.bottleneck_k < 1:
            raise PipelineError("--bottleneck-k must be positive")
        if self.tta not in TTAS:
            raise PipelineError(f"unknown --tta {self.tta!r}; use one of {', '.join(TTAS)}")
        runtimes.choose(self.runtime)  # an unknown or missing runtime fails before any work

    def model_key(self, image_shape: tuple[int, int, int]) -> dict:
        """What a converted graph depends on (not the data): its cache folder's key."""
        return {"backbone": self.backbone, "alpha": self.alpha,
                "weights": bb.weights_identity(self.weights),
                "image_size": self.image_size or bb.get_spec(self.backbone).input_size,
                "layers": list(self.layers), "mode": self.pooling, "input": list(image_shape),
                "extractor_version": EXTRACTOR_VERSION, **self._tta_part()}

    def _tta_part(self) -> dict:
        # Only a flip is recorded, so every key written before the option existed still holds.
        return {"tta": self.tta} if self.tta != "none" else {}

    def key_parts(self, dataset: Dataset) -> dict:
        """Everything the features depend on: change any part and a new file is written."""
        spec = bb.get_spec(self.backbone)
        parts = {
            "dataset": dataset_label(self.dataset), "fingerprint": dataset.fingerprint,
            "backbone": self.backbone, "alpha": self.alpha,
            "weights": bb.weights_identity(self.weights),
            "image_size": self.image_size or spec.input_size,
            "layers": list(self.layers), "mode": self.pooling,
            "precision": self.precision, "extractor_version": EXTRACTOR_VERSION,
            **self._tta_part(),
        }
        if self.pooling == "bottleneck":
            parts["bottleneck"] = {"k": self.bottleneck_k, "fit_images": self.bottleneck_fit_images,
                                   "seed": self.seed, "method": "pca"}
        return parts


def dataset_label(spec: str) -> str:
    """A short, path-independent name: the content fingerprint, not the path, identifies data."""
    if ":" in spec:
        kind, path = spec.split(":", 1)
        return f"{kind}:{Path(path).expanduser().resolve().name}"
    return spec


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
    """uint8 batch -> features, with resize and preprocessing inside one compiled graph."""

    def __init__(self, config: ExtractionConfig, image_shape: tuple[int, int, int]):
        import keras
        import tensorflow as tf

        spec = bb.get_spec(config.backbone)
        self.size = config.image_size or spec.input_size
        policy = keras.config.dtype_policy()
        if config.precision != "float32":
            keras.config.set_dtype_policy(config.precision)
        try:
            backbone = bb.build_backbone(config.backbone, weights=config.weights,
                                         alpha=config.alpha, input_size=self.size)
        finally:
            keras.config.set_dtype_policy(policy)
        if config.layers:
            try:
                outputs = [backbone.get_layer(name).output for name in config.layers]
            except ValueError:
                names = ", ".join(layer.name for layer in backbone.layers[-12:])
                raise PipelineError(f"backbone {config.backbone!r} has no layer named in "
                                    f"{list(config.layers)}; its last layers are: {names}") from None
            backbone = keras.Model(backbone.inputs, outputs)
        self.backbone = backbone
        self.mode, self.tta = config.pooling, config.tta
        self.preprocess = bb.preprocess_input(config.backbone)
        self.projection = None  # (mean, components) for the bottleneck mode
        self.runtime, self.runner = "tensorflow", None
        self._tf = tf
        images = tf.TensorSpec((None, *image_shape), tf.uint8)
        self._maps = tf.function(self._maps_graph, input_signature=[images])
        self._features = tf.function(self._features_graph, input_signature=[
            images, tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None, None), tf.float32)])

    def _maps_graph(self, images):
        tf = self._tf
        x = tf.image.resize(tf.cast(images, tf.float32), (self.size, self.size))
        maps = self.backbone(self.preprocess(x), training=False)
        return [tf.cast(m, tf.float32) for m in (maps if isinstance(maps, list) else [maps])]

    def _features_graph(self, images, mean, components):
        tf = self._tf
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
        if self.mode == "bottleneck":
            return tf.reshape(features, (tf.shape(features)[0], -1))
        return features

    def _view_features(self, images, mean, components):
        """Pooled vectors, or a map (spatial; bottleneck before flattening) for one view."""
        tf = self._tf
        maps = self._maps_graph(images)
        if self.mode in ("avg", "max"):
            pool = tf.reduce_mean if self.mode == "avg" else tf.reduce_max
            return tf.concat([pool(m, axis=(1, 2)) for m in maps], axis=1)
        last = maps[-1]
        if self.mode == "spatial":  # cast to float16 on the host (see __call__)
            return last
        return tf.tensordot(last - mean, components, axes=[[3], [0]])  # the 1x1 conv

    def use_runtime(self, name: str, folder: Path, label: str, precision: str = "float32",
                    threads: int | None = None) -> str:
        """Run the graph on runtime ``name`` (``auto`` chooses); the converted graph is kept in
        ``folder``. A graph the runtime cannot take runs on TensorFlow, with one line saying
        so. Returns the runtime that will run."""
        requested, name = name, runtimes.choose(name)
        if name != "tensorflow" and precision != "float32":  # a warning if asked for by name
            (log.warning if requested == name else log.info)(
                "%s: %s runs float32 here; --precision %s runs on TensorFlow", label, name,
                precision)
            name = "tensorflow"
        if name != "tensorflow":
            try:
                converted = runtimes.load_or_convert(folder, lambda: self._features, label, name)
            except runtimes.ConversionError as exc:
                log.warning("%s; running on TensorFlow instead", exc)
                return self._on("tensorflow")
            if name == "openvino":
                self.runner = runtimes.OpenVINORunner(converted, requests=1 if threads else 2,
                                                      threads=threads)
            else:  # one session, one single-threaded run per core (one in all on a Ray actor)
                cores = threads or runtimes.cpu_cores()
                self.runner = runtimes.OnnxRunner(converted, workers=min(cores, 8),
                                                  threads=max(1, cores // 8))
        return self._on(name)

    def _on(self, name: str) -> str:
        self.runtime = name
        if name == "tensorflow":
            self.runner = None
        return name

    def _inputs(self) -> tuple[np.ndarray, np.ndarray]:
        mean, comps = self.projection if self.projection is not None else (np.zeros(1), np.zeros((1, 1)))
        return mean.astype(np.float32), comps.astype(np.float32)

    def _stored(self, features: np.ndarray) -> np.ndarray:
        # Spatial maps are stored as float16. numpy's cast rounds exactly as tf.cast does (to
        # nearest even), and TensorFlow's CPU kernel for it prints a misleading oneDNN "E" line.
        return features.astype(np.float16) if self.mode == "spatial" else features

    def __call__(self, images: np.ndarray) -> np.ndarray:
        mean, comps = self._inputs()
        if self.runner is not None:
            return self._stored(self.runner(np.asarray(images), mean, comps))
        return self._stored(self._features(images, mean, comps).numpy())

    def map(self, batches) -> Iterator[np.ndarray]:
        """Features of each batch in order; OpenVINO keeps several batches in flight."""
        if self.runner is None:
            yield from (self(b) for b in batches)
            return
        mean, comps = self._inputs()
        numpy_batches = (b.numpy() if hasattr(b, "numpy") else b for b in batches)
        yield from (self._stored(f) for f in self.runner.map(numpy_batches, mean, comps))

    def maps(self, images: np.ndarray) -> np.ndarray:
        return self._maps(images)[-1].numpy()


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

def runtime_info() -> dict:
    """Library versions and the device, for the provenance of what this process computes."""
    import h5py
    import keras
    import sklearn
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU: {details.get('device_name', gpus[0].name)} x{len(gpus)}"
    else:
        device = f"CPU: {platform.processor() or platform.machine()}"
    versions = {"python": platform.python_version(), "tensorflow": tf.__version__,
                "keras": keras.__version__, "numpy": np.__version__,
                "h5py": h5py.__version__, "scikit-learn": sklearn.__version__}
    for runtime in ("openvino", "onnxruntime", "tf2onnx"):
        if runtime in sys.modules:
            versions[runtime] = sys.modules[runtime].__version__
    return {"versions": versions, "device": device}


def extraction_provenance(config: ExtractionConfig, dataset: Dataset, feature_shape, feature_dtype,
                          seconds: float, images: int, resumed: bool, **more) -> dict:
    """What a feature file records about how it was made (``more``: versions, device, ...)."""
    return {
        "config": asdict(config), "dataset_splits": {s: len(dataset.splits[s]) for s in SPLITS},
        "image_shape": list(dataset.splits["train"].image_shape),
        "feature_shape": list(feature_shape), "feature_dtype": str(feature_dtype),
        **more, "batch_size": config.batch_size, "precision": config.precision,
        "wall_seconds": round(seconds, 3),
        "images_per_second": round(images / seconds if seconds > 0 else 0.0, 2),
        "images_this_run": images, "resumed": resumed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped_files": dataset.skipped,
    }


def _run_split(model: FeatureModel, partial: PartialEntry, split_name: str, dataset: Dataset,
               batch_size: int, segment_rows: int) -> int:
    """Extract one split from where the partial entry stopped; returns images processed."""
    import tensorflow as tf

    split = dataset.splits[split_name]
    partial.discard_after(split_name)
    start = partial.rows_done(split_name)
    if start >= len(split):
        return 0
    h, w, c = split.image_shape
    failures: list[BaseException] = []

    def batches():
        try:
            yield from split.batches(batch_size, start)
        except Exception as exc:  # tf.data would bury it in its own error: keep ours, stop here
            failures.append(exc)

    source = tf.data.Dataset.from_generator(
        batches,
        output_signature=tf.TensorSpec((None, h, w, c), tf.uint8)).prefetch(2)
    writes: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []

    def writer() -> None:
        while (item := writes.get()) is not None:
            if not errors:
                try:
                    partial.write_segment(split_name, *item)
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    progress = Progress(f"{dataset.spec} {split_name}", len(split), start)
    pending, pending_start = [], start
    try:
        for features in model.map(source):
            pending.append(features)
            progress.update(len(features))
            if sum(len(p) for p in pending) >= segment_rows:
                block = np.concatenate(pending)
                writes.put((pending_start, block))
                pending_start, pending = pending_start + len(block), []
            if errors:
                break
        if pending and not errors:
            writes.put((pending_start, np.concatenate(pending)))
    finally:
        writes.put(None)
        thread.join()
        progress.close()
    if errors or failures:
        raise (errors or failures)[0]  # the rows extracted before it are kept for the rerun
    return len(split) - start


def extract_features(config: ExtractionConfig, *, rebuild: bool = False,
                     dataset: Dataset | None = None, extract_locked=None,
                     scan_map=None) -> ExtractionResult:
    """Extract (or resume, or find cached) the features ``config`` names.

    ``extract_locked`` does the work once the key is locked: in this process by default; the
    Ray engine passes its sharded version (and ``scan_map``, which scans image folders as
    cluster tasks).
    """
    t0 = time.monotonic()
    config.validate()
    store = FeatureStore(config.cache_dir)
    dataset = dataset or load_dataset(config.dataset, limit=config.limit, skip_bad=config.skip_bad,
                                      seed=config.seed, scan_index=store.scan_dir,
                                      rescan=config.rescan, scan_map=scan_map)
    parts = config.key_parts(dataset)
    final = store.path_for(parts)
    if not rebuild and (done := cached_result(final, t0)):
        return done
    with store.lock(parts):
        if not rebuild and (done := cached_result(final, t0, waited=True)):
            return done
        return (extract_locked or _extract_locked)(config, dataset, parts, store, t0, rebuild)


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
    raise PipelineError(f"cached file {final} is damaged ({problem}); rerun with --rebuild "
                        "to replace it, or `python -m pipeline verify --repair`")


def report_skipped(dataset: Dataset, path: Path) -> None:
    """--skip-bad must not skip silently: say how many and where the list is."""
    if dataset.skipped:
        log.warning("skipped %d undecodable file(s), e.g. %s; the list is in %s (dataset "
                    "'skipped_files'; `python -m pipeline inspect` prints it)",
                    len(dataset.skipped), dataset.skipped[0], path)


def _extract_locked(config: ExtractionConfig, dataset: Dataset, parts: dict, store: FeatureStore,
                    t0: float, rebuild: bool) -> ExtractionResult:
    import h5py

    # Everything that can fail on bad options (alpha, image size, layers, weights file,
    # bottleneck k) fails here, before any work folder exists.
    image_shape = dataset.splits["train"].image_shape
    model = FeatureModel(config, image_shape)
    if config.pooling == "bottleneck":
        check_bottleneck_k(model, config.bottleneck_k)
    partial = store.partial_for(parts)
    resumed = any(partial.rows_done(s) for s in SPLITS)
    runtime = config.runtime
    if resumed:
        log.info("resuming: %s", ", ".join(f"{s} {partial.rows_done(s):,}/{len(dataset.splits[s]):,}"
                                            for s in SPLITS))
        started_with = partial.load_array("runtime")  # finish on the runtime the rows came from
        if started_with is not None and runtimes.installed(str(started_with[0])):
            runtime = str(started_with[0])
    runtime = model.use_runtime(runtime, store.model_dir(config.model_key(image_shape)),
                                f"{config.backbone} {config.pooling}", config.precision)
    partial.save_array("runtime", np.array([runtime]))
    extra = {}
    if config.pooling == "bottleneck":
        mean, comps = partial.load_array("bottleneck_mean"), partial.load_array("bottleneck_components")
        if mean is None or comps is None:
            mean, comps = fit_bottleneck(model, dataset, config.bottleneck_k,
                                         config.bottleneck_fit_images, config.batch_size, config.seed)
            partial.save_array("bottleneck_mean", mean)
            partial.save_array("bottleneck_components", comps)
        model.projection = (mean, comps)
        extra = {"bottleneck/mean": mean, "bottleneck/components": comps}
    row = model(dataset.splits["train"].load(np.arange(1)))
    row_bytes = row[0].nbytes
    segment_rows = config.segment_rows or max(config.batch_size, (8 << 20) // max(row_bytes, 1))
    t_extract = time.monotonic()
    images = sum(_run_split(model, partial, s, dataset, config.batch_size, segment_rows)
                 for s in SPLITS)
    seconds = time.monotonic() - t_extract
    rate = images / seconds if seconds > 0 else 0.0
    provenance = extraction_provenance(config, dataset, row.shape[1:], row.dtype, seconds, images,
                                       resumed, runtime=runtime, **runtime_info())
    if dataset.skipped:
        extra["skipped_files"] = np.array(dataset.skipped, dtype=h5py.string_dtype())
    path = store.publish(partial, parts, classes=dataset.classes,
                         labels={s: dataset.splits[s].labels for s in SPLITS},
                         attrs={"provenance": provenance}, compression=config.compression,
                         extra=extra)
    log.info("wrote %s (%s images in %.1f s, %s img/s)", path, f"{images:,}", seconds, f"{rate:,.1f}")
    report_skipped(dataset, path)
    return ExtractionResult(path, "resumed" if resumed else "created", time.monotonic() - t0,
                            rate, provenance)
