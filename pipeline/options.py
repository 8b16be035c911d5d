"""Extraction options, declared once: each option with its type, default, help, checks, where
it goes in an experiment file and how it enters the cache keys (``KeyPart``), and the feature
modes (``FeatureMode``). The command line, experiment files and Python all read these
declarations; ``extract`` runs what they describe.

It sits above the ground floor (datasets, backbones, runtimes, store), below ``extract``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields

from pipeline import backbones as bb
from pipeline import runtimes
from pipeline.datasets import Dataset, parse_dataset
from pipeline.errors import PipelineError
from pipeline.store import COMPRESSIONS, DEFAULT_CACHE_DIR

EXTRACTOR_VERSION = 1


@dataclass(frozen=True)
class FeatureMode:
    """What a feature file holds (the key's ``mode``), declared once: every place that
    behaves differently per mode reads it here.

    ``pool``: the reduction over a map's rows and columns (pooled modes; these alone take
    ``--layer``); ``projection``: a 1x1 projection fitted on training maps is applied (and its
    fit needs the Keras model); ``stored``: the dtype rows are stored in (maps as float16,
    half the bytes); ``heads``: which heads take the rows (``heads.HeadSpec.takes``: flat
    "pooled" vectors, or "spatial" maps); ``compression``: what ``--compression auto`` writes
    (shuffle + gzip shrinks float16 ReLU maps to 0.35 of their size but writes float32 vectors
    at 48 MB/s against 1,431 for 0.66: ``make bench-cache``)."""

    name: str
    pool: str = ""  # a tf reduction: reduce_mean | reduce_max
    projection: bool = False
    stored: str = "float32"
    heads: str = "pooled"
    compression: str = "none"


MODES: dict[str, FeatureMode] = {m.name: m for m in (
    FeatureMode("avg", pool="reduce_mean"),
    FeatureMode("max", pool="reduce_max"),
    FeatureMode("bottleneck", projection=True),  # flattened: (h * w * k) vectors
    FeatureMode("spatial", stored="float16", heads="spatial", compression="gzip"),
)}
TTAS = ("none", "flip")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class KeyPart:
    """How an option enters the cache key (``ExtractionConfig.key_parts``), declared beside
    the option so that both keys are built from the declarations, never listed by hand.

    ``graph``: it changes the backbone's graph, so it also keys a converted graph
    (``model_key``): forgetting this would let a stale converted graph serve new features.
    ``value(config)``: what is recorded (default: the option's value). ``when(config)``: whether
    it is recorded at all (an option left out at its default keeps every key written before the
    option existed, as ``tta`` does). A dotted ``name`` nests (``bottleneck.k``)."""

    graph: bool = False
    name: str = ""
    value: Callable | None = None
    when: Callable | None = None


def _bottleneck(config) -> bool:
    return MODES[config.mode].projection


def option(default=MISSING, help: str = "", *, key_part: KeyPart | None = None,
           where: tuple[str, ...] = (), choices: tuple = (), positive: bool = False,
           flag: str | None = "", aliases: tuple[str, ...] = (), key: str = ""):
    """An ``ExtractionConfig`` field, declared once with what the command line and experiment
    files need: how the features depend on it (``key_part``, see ``KeyPart``), ``where`` it
    may be set in an experiment file (``datasets`` / ``backbones`` / ``features`` entries,
    ``top`` level) and under which ``key`` there (default: its name); its ``flag`` (default
    ``--field-name``; None: not an ``extract`` flag); ``aliases``: older spellings, accepted
    for one release."""
    return field(default=default, metadata={
        "help": help, "key_part": key_part, "where": where, "choices": tuple(choices),
        "positive": positive, "flag": flag, "aliases": aliases, "key": key})


@dataclass
class ExtractionConfig:
    """Every extraction option: ``cli`` makes its flags from these fields, ``experiments``
    its file checks and grid, ``validate`` checks them, and both cache keys are built from
    their ``key_part`` declarations (``limit`` and ``skip_bad`` enter through the dataset's
    fingerprint). Tests hold the declarations to what really changes the features and the
    graph."""

    dataset: str = option(
        help="cifar10 | cifar100 | fashion_mnist | mnist | folder:PATH | idx:PATH | cifar:PATH | "
        "npz:PATH", key_part=KeyPart(value=lambda c: parse_dataset(c.dataset).label),
        where=("datasets",), key="source")  # + its fingerprint
    backbone: str = option("mobilenet_v2", "a name `python -m pipeline backbones` lists",
                           key_part=KeyPart(graph=True), where=("backbones",), key="name")
    mode: str = option("avg", "global average or max pooling of the last map, a 1x1 bottleneck "
                       "of it (PCA on training maps), or the map itself", key_part=KeyPart(graph=True),
                       where=("features",), choices=tuple(MODES), aliases=("pooling",))
    alpha: float | None = option(None, "width multiplier (MobileNets)", key_part=KeyPart(graph=True),
                                 where=("backbones",), positive=True)
    weights: str = option("imagenet", "imagenet | none | PATH to a weights file (by its content)",
                          key_part=KeyPart(graph=True, value=lambda c: bb.weights_identity(c.weights)),
                          where=("backbones",))
    image_size: int | None = option(None, "model input size (default: the backbone's native)",
                                    key_part=KeyPart(graph=True, value=lambda c: c.input_size),
                                    where=("backbones",), positive=True)
    layers: tuple[str, ...] = option((), "pool this layer instead of the last (repeat to "
                                     "concatenate layers)", where=("features",), flag="--layer",
                                     key_part=KeyPart(graph=True, value=lambda c: list(c.layers)))
    bottleneck_k: int = option(32, "channels the bottleneck keeps",
                               key_part=KeyPart(name="bottleneck.k", when=_bottleneck),
                               where=("features",), positive=True, aliases=("k",))
    bottleneck_fit_images: int = option(2000, "training images the bottleneck is fitted on",
                                        key_part=KeyPart(name="bottleneck.fit_images", when=_bottleneck),
                                        where=("features",), positive=True)
    batch_size: int = option(64, "images per batch", where=("backbones", "top"), positive=True)
    limit: int | None = option(None, "images per split (stratified, at least one per class)",
                               where=("datasets", "top"), positive=True)  # in the fingerprint
    precision: str = option("float32", "mixed precision runs on TensorFlow", key_part=KeyPart(),
                            where=("backbones",), choices=PRECISIONS)
    compression: str = option("auto", "auto (gzip for spatial maps, none for vectors) | none | "
                              "gzip | lzf (h5py's own filter: other HDF5 readers cannot open it)",
                              where=("features",), choices=COMPRESSIONS)
    skip_bad: bool = option(False, "skip undecodable images (counted in a warning, listed in "
                            "the file)", where=("datasets",))  # what it skips: in the fingerprint
    cache_dir: str = option(DEFAULT_CACHE_DIR, "feature cache folder", where=("top",),
                            flag=None)  # a flag of every command
    seed: int = option(0, "seed of --limit's subset and the bottleneck's fitting images",
                       key_part=KeyPart(name="bottleneck.seed", when=_bottleneck), flag=None)
    shard_rows: int | None = option(None, "rows per resumable shard (default: about 8 MiB)",
                                    positive=True, aliases=("segment_rows",))
    rescan: bool = option(False, "read every image file again instead of trusting the scan "
                          "index")
    runtime: str = option("auto", "what runs the backbone, float32 on every one: auto (on a "
                          "CPU: ONNX Runtime for the MobileNets, OpenVINO for the others, where "
                          "installed; else TensorFlow) | tensorflow | openvino | onnxruntime",
                          where=("top",), choices=runtimes.RUNTIMES)
    tta: str = option("none", "flip: average each image's features with its mirror's (one "
                      "more forward pass). Off for digits or text, where a mirror changes what "
                      "the image shows", key_part=KeyPart(graph=True, when=lambda c: c.tta != "none"),
                      where=("features",), choices=TTAS)

    def __post_init__(self):
        self.layers = tuple(self.layers)

    @property
    def input_size(self) -> int:
        """The side of the model's input: ``image_size``, else the backbone's native one."""
        return self.image_size or bb.get_spec(self.backbone).input_size

    def validate(self) -> None:
        """Every option's type and range, then what depends on the backbone (one line each)."""
        for f in fields(self):
            problem = option_problem(f.name, getattr(self, f.name))
            if problem:
                raise PipelineError(f"{f.name} = {getattr(self, f.name)!r}: {problem}")
        spec = bb.get_spec(self.backbone)
        if self.alpha is not None and not spec.has_alpha:
            raise PipelineError(f"backbone {self.backbone!r} takes no alpha; only the MobileNets do")
        if self.layers and not MODES[self.mode].pool:
            raise PipelineError(f"layers (--layer) work with mode "
                                f"{' or '.join(m.name for m in MODES.values() if m.pool)}")
        runtimes.choose(self.runtime)  # a runtime that is not installed fails before any work

    def model_key(self, image_shape: tuple[int, int, int]) -> dict:
        """What a converted graph depends on (not the data): its cache folder's key."""
        return {**self._declared_parts(graph_only=True), "input": list(image_shape),
                "extractor_version": EXTRACTOR_VERSION}

    def key_parts(self, dataset: Dataset) -> dict:
        """Everything the features depend on: change any part and a new file is written."""
        parts = {**self._declared_parts(graph_only=False), "fingerprint": dataset.fingerprint,
                 "extractor_version": EXTRACTOR_VERSION}
        if "bottleneck" in parts:
            parts["bottleneck"]["method"] = "pca"
        return parts

    def file_compression(self) -> str:
        """The HDF5 filter feature files get: ``auto`` is the mode's (see ``FeatureMode``)."""
        return MODES[self.mode].compression if self.compression == "auto" else self.compression

    def _declared_parts(self, graph_only: bool) -> dict:
        parts: dict = {}
        for name, f in option_fields().items():
            rule = f.metadata["key_part"]
            if rule is None or (graph_only and not rule.graph) or (rule.when and not rule.when(self)):
                continue
            *groups, last = (rule.name or name).split(".")
            target = parts
            for group in groups:
                target = target.setdefault(group, {})
            target[last] = rule.value(self) if rule.value else getattr(self, name)
        return parts


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


@functools.cache
def option_fields() -> dict[str, Field]:
    """The declared options by name (see ``option``); the same dict every call."""
    return {f.name: f for f in fields(ExtractionConfig)}


def option_type(name: str) -> tuple[type, bool]:
    """(str | int | float | bool | tuple, whether None is allowed) of option ``name``."""
    text = str(option_fields()[name].type)
    base = text.split(" | ")[0]
    return (tuple if base.startswith("tuple") else _TYPES[base]), "None" in text


def option_problem(name: str, value) -> str | None:
    """What is wrong with ``value`` for option ``name`` (None if nothing): one check for the
    command line, experiment files and the Python API."""
    meta, (kind, optional) = option_fields()[name].metadata, option_type(name)
    if value is None:
        return None if optional else "a value is required"
    if kind is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return None if ok else "should be a list of names"
    if isinstance(value, bool) != (kind is bool) or not isinstance(
            value, (int, float) if kind is float else kind):
        return f"should be {'a number' if kind is float else kind.__name__}"
    if meta["choices"] and value not in meta["choices"]:
        return f"use one of {', '.join(meta['choices'])}"
    if meta["positive"] and value <= 0:
        return "must be a positive number"
    return None


def describe(parts: dict) -> tuple[str, str]:
    """("mobilenet@0.25", "avg[6 layers]@112px+flip"): the words that tell two feature files
    apart, from their key parts (or a result's summary of them, which uses the same names).
    Every label people read, in plans, progress, tables and plots, is made here."""
    layers = parts.get("layers") or []
    features = parts.get("mode", "?") + (f"[{len(layers)} layers]" if layers else "")
    if parts.get("image_size") not in (None, 224):
        features += f"@{parts['image_size']}px"
    if parts.get("tta", "none") != "none":
        features += f"+{parts['tta']}"
    backbone = parts.get("backbone", "?")
    if parts.get("alpha"):
        backbone += f"@{parts['alpha']:g}"
    return backbone, features
