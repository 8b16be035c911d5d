"""Inference runtimes: the frozen feature graph run by TensorFlow, OpenVINO or ONNX Runtime.

The Keras model stays the source of truth: ``extract.FeatureModel`` builds one graph (uint8
input, in-graph resize, ``preprocess_input``, the backbone, pooling or projection) as a
``tf.function``; OpenVINO (``convert_model``) or tf2onnx (an ONNX export for ONNX Runtime)
converts that very graph once per model, and the result is kept in the cache folder, written
whole or not at all, so later runs load it instead of converting again. Inference is float32
on every runtime (OpenVINO is told ``INFERENCE_PRECISION_HINT=f32``: it would otherwise pick
bf16 on CPUs that have it, and bf16 features are not the same features). Speeds are in
``benchmarks/extract.json`` (``make bench-extract``).

This module sits on the ground floor: it imports nothing of ours but the error type.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

GRAPH_INPUTS = ("images", "mean", "components")  # the feature graph's arguments, by name
# What ``auto`` prefers on a CPU, per backbone where measured. In six side-by-side runs of
# ``make bench-extract`` (benchmarks/extract.json) ONNX Runtime ran the MobileNets faster
# than OpenVINO, in the loop and as whole processes, but ResNet50 slower, with far more memory
# to convert: so ONNX Runtime first for the MobileNets, OpenVINO first for the others
# (unmeasured ones too; EfficientNetB0 measured: benchmarks/extract-efficientnet.json).
CPU_PREFERENCE = ("openvino", "onnxruntime")
CPU_PREFERENCE_BY_BACKBONE = {"mobilenet": ("onnxruntime", "openvino"),
                              "mobilenet_v2": ("onnxruntime", "openvino")}
log = logging.getLogger(__name__)


def installed(name: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in REGISTRY[name].modules)


def choose(name: str, backbone: str = "") -> str:
    """The runtime that will run: ``auto`` is, on a CPU, the first installed of what measured
    best for ``backbone`` (see above); TensorFlow on an NVIDIA GPU or when none is installed."""
    if name not in RUNTIMES:
        raise PipelineError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    if name == "auto":
        if os.path.exists("/proc/driver/nvidia/version"):
            return "tensorflow"
        preference = CPU_PREFERENCE_BY_BACKBONE.get(backbone, CPU_PREFERENCE)
        return next((r for r in preference if installed(r)), "tensorflow")
    if not installed(name):
        raise PipelineError(f"--runtime {name} needs {name}: pip install '.[{REGISTRY[name].extra}]' "
                            "(make install adds it on a CPU machine)")
    return name


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- converted graphs

def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("model.*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def import_openvino():
    """openvino, imported after oneDAL where the ``intel`` extra is installed. Both load Intel's
    TBB into the process and whichever loads first serves both: OpenVINO's bundled copy is
    older than what oneDAL needs (OpenVINO first: oneDAL's import fails with an undefined TBB
    symbol), while OpenVINO runs on the newer one (its tests pass with oneDAL loaded first)."""
    with contextlib.suppress(ImportError, OSError):
        import daal4py  # noqa: F401  (its TBB, the newer, first)
    import openvino

    return openvino


def _openvino_format():
    ov = import_openvino()

    def save(model, folder: Path) -> None:
        ov.save_model(model, folder / "model.xml", compress_to_fp16=False)  # float32 weights

    def convert(fn):
        # OpenVINO's TensorFlow front end also makes outputs of the graph's inputs and of the
        # Identity ops Keras puts after activations (51 extra on EfficientNetB0): each output
        # is kept whole for every image of a batch, so memory grew by about 1 GiB per image
        # on EfficientNetB5 (benchmarks/efficientnet-memory.txt). Keep the function's own.
        # (The same tensor can be two outputs: in the spatial mode the last activation's.)
        model = ov.convert_model(fn)
        wanted = [t.name for t in fn.get_concrete_function(*fn.input_signature).outputs]
        outputs = [next((o for o in model.outputs if name in o.get_names()), None) for name in wanted]
        if None in outputs:
            raise ValueError(f"the converted model lacks outputs {wanted}")
        return ov.Model(outputs, model.get_parameters(), model.get_friendly_name())

    return (convert, save,
            lambda folder: ov.Core().read_model(folder / "model.xml"), ov.__version__)


def _onnx_format():
    from importlib.metadata import version

    import onnxruntime

    def export(fn) -> bytes:
        import tf2onnx  # imports TensorFlow: only when there is something to convert

        def onnx_bytes() -> bytes:
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature,
                                                     opset=17)
            _freeze_captured_tensors(proto, fn)
            unknown = [i.name for i in proto.graph.input if i.name not in GRAPH_INPUTS]
            if unknown:
                raise ValueError(f"the exported graph has inputs it cannot be fed: {unknown}")
            return proto.SerializeToString()

        # tf2onnx copies the whole graph before each of its optimizer passes, to undo one that
        # fails: most of its peak memory (benchmarks/tf2onnx-undo-copies.txt). Setting
        # TF2ONNX_CATCH_ERRORS turns the copies off, whatever its value (tf2onnx 1.17 compares
        # the variable's name, not its value, with "TRUE"). So first without them; only if a
        # pass fails, again with tf2onnx's default.
        try:
            with _environ("TF2ONNX_CATCH_ERRORS", "FALSE"):
                model = onnx_bytes()
        except Exception as exc:
            log.debug("tf2onnx failed without its undo copies (%s); again with them", exc)
            with _environ("TF2ONNX_CATCH_ERRORS", None):
                model = onnx_bytes()
        try:  # tf2onnx keeps what it cannot convert (ConvNeXt's XLA-compiled grouped
            # convolutions stay TensorFlow calls): ONNX Runtime refuses such a graph on loading
            onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ValueError("ONNX Runtime cannot load the export: "
                             + str(exc).rsplit(", Error ", 1)[-1]) from None
        return model

    return (export, lambda model, folder: (folder / "model.onnx").write_bytes(model),
            lambda folder: (folder / "model.onnx").read_bytes(),
            f"onnxruntime {onnxruntime.__version__}, tf2onnx {version('tf2onnx')}")


def _freeze_captured_tensors(proto, fn) -> None:
    """tf2onnx leaves the constant tensors a graph captured from outside it (EfficientNet's
    Normalization mean and variance) as graph inputs: make them the constants they are."""
    from onnx import numpy_helper

    concrete = fn.get_concrete_function(*fn.input_signature)
    values = {inside.name: outside.numpy() for outside, inside in concrete.graph.captures
              if hasattr(outside, "numpy") and outside.dtype.name != "resource"}
    used = {name for node in proto.graph.node for name in node.input}
    for graph_input in [i for i in proto.graph.input if i.name in values]:
        proto.graph.input.remove(graph_input)
        if graph_input.name in used:
            proto.graph.initializer.append(numpy_helper.from_array(values[graph_input.name],
                                                                   graph_input.name))


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    """``os.environ[name]`` set to ``value`` (None: unset) for the block."""
    before = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if before is not None:
            os.environ[name] = before


def load_kept(folder: Path, runtime: str):
    """The graph kept in ``folder/<runtime>/`` by an earlier conversion, or None where there
    is none; a damaged one or one from an earlier conversion revision is removed (and said)."""
    _, _, load, _ = REGISTRY[runtime].format()
    folder = folder / runtime
    manifest = folder / "manifest.json"
    if not manifest.exists():
        return None
    try:
        kept = json.loads(manifest.read_text())
        if kept.get("revision", 1) != REGISTRY[runtime].revision:
            log.info("converted model %s is from an earlier conversion; converting again", folder)
        elif kept["sha256"] == _files_digest(folder):
            return load(folder)
        else:
            raise ValueError("its files do not match their checksum")
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
        log.warning("converted model %s is damaged (%s); converting again", folder, exc)
    shutil.rmtree(folder, ignore_errors=True)
    return None


def load_or_convert(folder: Path, convert, label: str, runtime: str = "openvino"):
    """The graph converted for ``runtime``, kept in ``folder/<runtime>/``; ``convert()``
    returns the ``tf.function`` to convert when it is missing or damaged. The folder is
    written under a temporary name and renamed whole, with a checksum of its files; a
    half-written or damaged one is removed and converted again, never used."""
    kept = load_kept(folder, runtime)
    if kept is not None:
        return kept
    export, save, _, version = REGISTRY[runtime].format()
    folder = folder / runtime
    remove_stale(folder.parent, runtime)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    fn = convert()  # building the graph: bad options fail here with their own message
    try:
        model = export(fn)
    except Exception as exc:  # converters raise many types; the caller falls back
        raise ConversionError(f"{runtime} cannot convert {label} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc
    try:
        tmp.mkdir(parents=True)
        save(model, tmp)
        (tmp / "manifest.json").write_text(json.dumps({"sha256": _files_digest(tmp),
                                                       "converter": version,
                                                       "revision": REGISTRY[runtime].revision}))
        os.replace(tmp, folder)
    except (OSError, RuntimeError) as exc:  # a read-only or full disk (OpenVINO raises
        log.debug("converted model not kept (%s)", exc)  # RuntimeError): use it, keep nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def remove_stale(folder: Path, runtime: str) -> None:
    """Remove the half-written ``.<runtime>.tmp-PID`` folders of conversions killed (or of
    this process: ours counts as not running)."""
    for stale in folder.glob(f".{runtime}.tmp-*"):
        if not _process_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: str) -> bool:
    """Whether process ``pid`` (a number as text) runs on this machine; ours counts as not."""
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


class ConversionError(Exception):
    """A graph a runtime cannot take: extraction falls back to TensorFlow and says so."""


def in_order(batches: Iterable, start, finish, depth: int) -> Iterator:
    """``finish(start(batch))`` of each batch, in order, with up to ``depth`` started and not
    finished. A batch that fails to arrive (an unreadable image) raises only after the results
    of those started before it: the rows done are kept."""
    running: deque = deque()
    source = iter(batches)
    while True:
        try:
            images = next(source)
        except StopIteration:
            break
        except Exception:
            while running:
                yield finish(running.popleft())
            raise
        if len(running) >= depth:
            yield finish(running.popleft())
        running.append(start(images))
    while running:
        yield finish(running.popleft())


RUN_PIXELS = 2 * 224 * 224  # input pixels (at the backbone's size) per run of a converted graph


def rows_per_run(image_size: int) -> int:
    """How many images one run of a converted graph takes: two at 224x224, more when smaller.
    Runs of two at 224 (eight at 112) ran the MobileNets 1.12-1.32x as fast as whole batches
    of 64, whose activations outgrow the CPU's caches, on both runtimes; ResNet50 ran the
    same. The features are the same bit for bit (benchmarks/rows_per_run.txt)."""
    return max(1, RUN_PIXELS // max(1, image_size) ** 2)


def in_slices(batches: Iterable[np.ndarray], rows: int, run_slices) -> Iterator[np.ndarray]:
    """Each batch's features from runs of at most ``rows`` images: ``run_slices`` maps the
    slices, in order, to their features, joined again here batch by batch."""
    sizes: deque = deque()

    def slices():
        for images in batches:
            sizes.append(len(images))
            yield from (images[lo:lo + rows] for lo in range(0, len(images), rows))

    parts, done = [], 0
    for features in run_slices(slices()):
        parts.append(features)
        done += len(features)
        if done == sizes[0]:
            sizes.popleft()
            yield parts[0] if len(parts) == 1 else np.concatenate(parts)
            parts, done = [], 0


class OpenVINORunner:
    """A converted feature graph compiled for the CPU in float32, ``requests`` runs of
    ``rows`` images at once (OpenVINO's THROUGHPUT hint gives each its own stream of cores)."""

    def __init__(self, model, requests: int = 2, threads: int | None = None, rows: int = 64):
        ov = import_openvino()

        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        # Twice as many in flight as run at once: a stream done with a short batch (a split's
        # last) takes the next while the oldest still runs (waiting on the oldest before
        # starting more idled a core: ResNet50 ran 23 img/s on two splits of 200, 29 so).
        self.requests = [self.compiled.create_infer_request() for _ in range(2 * max(1, requests))]
        self.rows = max(1, rows)

    def __call__(self, images: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
        return next(self.map([images], mean, components))

    def map(self, batches: Iterable[np.ndarray], mean: np.ndarray,
            components: np.ndarray) -> Iterator[np.ndarray]:
        """Features of each batch, in order, with up to ``len(requests)`` runs in flight."""
        free = deque(self.requests)

        def start(images):
            request = free.popleft()
            request.start_async([np.ascontiguousarray(images), mean, components])
            return request

        def finish(request) -> np.ndarray:
            request.wait()
            out = request.get_output_tensor(0).data.copy()
            free.append(request)
            return out

        return in_slices(batches, self.rows,
                         lambda slices: in_order(slices, start, finish, len(self.requests)))


class OnnxRunner:
    """An exported feature graph in one ONNX Runtime session (float32 on the CPU), called
    from ``workers`` threads on alternate batches, each run on ``threads`` cores (on 2 cores
    2 x 1 beat 1 x 2 in the measurements reported in issue #11); a thread runs its batch
    ``rows`` images at a time (one call per slice: a future per batch, not per slice)."""

    def __init__(self, model: bytes, workers: int = 2, threads: int = 1, rows: int = 64):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.workers, self.rows = max(1, workers), max(1, rows)

    def __call__(self, images: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
        def run(part: np.ndarray) -> np.ndarray:
            feed = dict(zip(GRAPH_INPUTS, (np.ascontiguousarray(part), mean, components)))
            return self.session.run(None, {name: feed[name] for name in self.names})[0]

        return next(in_slices([images], self.rows, lambda slices: map(run, slices)))

    def map(self, batches: Iterable[np.ndarray], mean: np.ndarray,
            components: np.ndarray) -> Iterator[np.ndarray]:
        """Features of each batch, in order, with up to ``workers`` running at once and as many
        queued: a worker done with a short batch takes the next while the oldest still runs."""
        with ThreadPoolExecutor(self.workers) as pool:
            yield from in_order(batches, lambda images: pool.submit(self, images, mean, components),
                                lambda future: future.result(), 2 * self.workers)


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Runtime:
    """One way to run the feature graph, declared once: every place that needs to know about
    a runtime reads it here (adding one, e.g. ONNX Runtime's CUDA provider, is one entry).

    ``format()``: (convert, save, load, converter version) of its converted graph, None for
    TensorFlow, which runs the ``tf.function`` itself. ``revision``: bumped when the
    conversion changes what it makes, so graphs kept by an earlier one (those without a
    revision are 1) are converted again. ``runner(converted, threads, rows)``: what runs a
    converted graph (``threads``: a Ray actor's share of its node; None: every core)."""

    name: str
    modules: tuple[str, ...]  # what must be importable for it to be installed
    extra: str = ""  # pip install '.[EXTRA]'
    format: Callable | None = None
    revision: int = 0
    runner: Callable | None = None
    device: str = "CPU"  # what provenance calls where it ran (TensorFlow says its GPU itself)


def _openvino_runner(converted, threads: int | None, rows: int) -> OpenVINORunner:
    return OpenVINORunner(converted, requests=1 if threads else 2, threads=threads, rows=rows)


def _onnx_runner(converted, threads: int | None, rows: int) -> OnnxRunner:
    """One session, one single-threaded run per core (one in all on a Ray actor)."""
    cores = threads or cpu_cores()
    return OnnxRunner(converted, workers=min(cores, 8), threads=max(1, cores // 8), rows=rows)


REGISTRY: dict[str, Runtime] = {r.name: r for r in (
    Runtime("tensorflow", modules=("tensorflow",)),
    # 2: only the function's output is an output (see _openvino_format); 3: the graph
    # preprocesses before it upscales (extract.FeatureModel._maps_graph).
    Runtime("openvino", modules=("openvino",), extra="openvino", format=_openvino_format,
            revision=3, runner=_openvino_runner),
    # exporting the graph needs tf2onnx as well; 2: preprocessing before the upscale.
    Runtime("onnxruntime", modules=("onnxruntime", "tf2onnx"), extra="onnx", format=_onnx_format,
            revision=2, runner=_onnx_runner),
)}
RUNTIMES = ("auto", *REGISTRY)  # what --runtime takes
