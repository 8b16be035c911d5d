"""Inference runtimes: the frozen feature graph run by TensorFlow or by OpenVINO.

The Keras model stays the source of truth: ``extract.FeatureModel`` builds one graph (uint8
input, in-graph resize, ``preprocess_input``, the backbone, pooling or projection) as a
``tf.function``; OpenVINO converts that very graph once per model (``convert_model``) and the
result is kept in the cache folder, written whole or not at all, so later runs load it
instead of converting again. Inference is float32 (``INFERENCE_PRECISION_HINT=f32``):
OpenVINO would otherwise pick bf16 on CPUs that have it, and bf16 features are not the same
features. Measured on a 2-core CPU (``make bench-extract``): OpenVINO with two requests in
flight ran MobileNet 0.25 and MobileNetV2 0.35 1.88x and 2.09x faster than TensorFlow on the
same graph, inside our extraction loop.

This module sits on the ground floor: it imports nothing of ours but the error type.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

RUNTIMES = ("auto", "tensorflow", "openvino")
log = logging.getLogger(__name__)


def installed(name: str) -> bool:
    return name == "tensorflow" or importlib.util.find_spec(name) is not None


def choose(name: str) -> str:
    """The runtime that will run: ``auto`` is OpenVINO on a CPU where it is installed (the
    faster one measured here), TensorFlow on an NVIDIA GPU or when OpenVINO is missing."""
    if name not in RUNTIMES:
        raise PipelineError(f"unknown runtime {name!r}; use one of {', '.join(RUNTIMES)}")
    if name == "auto":
        gpu = os.path.exists("/proc/driver/nvidia/version")
        return "openvino" if installed("openvino") and not gpu else "tensorflow"
    if not installed(name):
        raise PipelineError(f"--runtime {name} needs {name}: pip install '.[{name}]' "
                            "(make install adds it on a CPU machine)")
    return name


# ----------------------------------------------------------------------------- OpenVINO

def _files_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("model.*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def load_or_convert(folder: Path, convert, label: str):
    """The converted OpenVINO model in ``folder``, converting it with ``convert()`` (which
    returns a ``tf.function``) when it is missing or damaged. The folder is written under a
    temporary name and renamed whole, with a checksum of its files; a half-written or
    damaged one is removed and converted again, never used."""
    import openvino as ov

    manifest = folder / "manifest.json"
    if manifest.exists():
        try:
            if json.loads(manifest.read_text())["sha256"] == _files_digest(folder):
                return ov.Core().read_model(folder / "model.xml")
            raise ValueError("its files do not match their checksum")
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            log.warning("converted model %s is damaged (%s); converting again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = ov.convert_model(convert())
    except Exception as exc:  # OpenVINO raises many types; the caller falls back
        raise ConversionError(f"OpenVINO cannot convert {label} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from exc
    try:
        tmp.mkdir(parents=True)
        ov.save_model(model, tmp / "model.xml", compress_to_fp16=False)  # keep float32 weights
        (tmp / "manifest.json").write_text(json.dumps({"sha256": _files_digest(tmp),
                                                       "openvino": ov.__version__}))
        os.replace(tmp, folder)
    except (OSError, RuntimeError) as exc:  # a read-only or full disk (OpenVINO raises
        log.debug("converted model not kept (%s)", exc)  # RuntimeError): use it, keep nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model


class ConversionError(Exception):
    """A graph OpenVINO cannot take: extraction falls back to TensorFlow and says so."""


class OpenVINORunner:
    """A converted feature graph compiled for the CPU in float32, ``requests`` batches in
    flight (OpenVINO's THROUGHPUT hint gives each its own stream of cores)."""

    def __init__(self, model, requests: int = 2, threads: int | None = None):
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.requests = [self.compiled.create_infer_request() for _ in range(max(1, requests))]

    def __call__(self, images: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
        request = self.requests[0]
        request.infer([images, mean, components])
        return request.get_output_tensor(0).data.copy()

    def map(self, batches: Iterable[np.ndarray], mean: np.ndarray,
            components: np.ndarray) -> Iterator[np.ndarray]:
        """Features of each batch, in order, with up to ``len(requests)`` running at once."""
        free, running = deque(self.requests), deque()
        for images in batches:
            if not free:
                yield self._collect(running.popleft(), free)
            request = free.popleft()
            request.start_async([np.ascontiguousarray(images), mean, components])
            running.append(request)
        while running:
            yield self._collect(running.popleft(), free)

    @staticmethod
    def _collect(request, free: deque) -> np.ndarray:
        request.wait()
        out = request.get_output_tensor(0).data.copy()
        free.append(request)
        return out
