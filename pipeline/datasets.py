"""Data sources: every source serves uint8 RGB batches, integer labels and a fingerprint.

A dataset is named by a spec string: a `keras.datasets` name (``cifar10``, ``cifar100``,
``fashion_mnist``, ``mnist``) or a local source ``KIND:PATH`` with KIND one of ``folder``,
``idx``, ``cifar``, ``npz``. Images stay at their stored size: resizing to the backbone's
input happens later, inside the model graph, one batch at a time.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import SPLITS
from pipeline.errors import PipelineError

KERAS_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist")
log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                  ".ppm", ".pgm"}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
DIGIT_CLASSES = [str(d) for d in range(10)]
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]


@dataclass
class Split:
    """One split: labels in memory, images produced on demand by ``load(indices)``."""

    labels: np.ndarray
    image_shape: tuple[int, int, int]
    load: Callable[[np.ndarray], np.ndarray]
    content_digests: Callable[[], Iterator[bytes]]
    ids: list[str] | None = None  # what each row is (see ``row_ids``)

    def __len__(self) -> int:
        return len(self.labels)

    def row_ids(self) -> list[str]:
        """One id per row, naming its image: the path relative to an image folder's root,
        ``FILE:ROW`` inside CIFAR batches and IDX files, else the row's index in its array.
        A subset (``--limit``) keeps the ids of the rows it keeps."""
        return self.ids if self.ids is not None else [str(i) for i in range(len(self))]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
        """uint8 batches of shape (b, h, w, 3), from row ``start`` to the end."""
        for lo in range(start, len(self), batch_size):
            yield self.load(np.arange(lo, min(lo + batch_size, len(self))))


@dataclass
class Dataset:
    """``validation``: the last rows of the train split that are the user's own validation
    split (an image folder's ``val/``); every head then chooses on them instead of carving
    its own. 0: none given."""

    spec: str
    classes: list[str]
    splits: dict[str, Split]
    skipped: list[str] = field(default_factory=list)
    validation: int = 0
    # An image folder's: the scan index (its folder and the dataset's root), and each image
    # file read since the scan and found unchanged (name, stat signature, sha256, stat time).
    scan_index: tuple[Path, Path] | None = None
    checked: list = field(default_factory=list)
    _fingerprint: str | None = None

    def remember_checked(self) -> int:
        """Record in the scan index that the image files read since the scan (every read
        checks the file's sha256) were unchanged at that time, so a file the scan found too
        recently modified to trust by its stat ("racy") is trusted from then on, as git's
        index does after a refresh: the first rerun after an extraction is as cheap as every
        later one. Returns how many entries that confirmed."""
        if self.scan_index is None or not self.checked:
            return 0
        index = ScanIndex(*self.scan_index)
        confirmed = index.confirm(self.checked)
        index.save()
        return confirmed

    @property
    def fingerprint(self) -> str:
        """sha256 of the class names, labels and image bytes served, split by split."""
        if self._fingerprint is None:
            h = hashlib.sha256("\n".join(self.classes).encode())
            if self.validation:  # only then: the keys of every dataset without one stay
                h.update(f"|validation|{self.validation}|".encode())
            for name in SPLITS:
                split = self.splits[name]
                h.update(f"|{name}|{len(split)}|{split.image_shape}|".encode())
                h.update(split.labels.astype("<i8").tobytes())
                for digest in split.content_digests():
                    h.update(digest)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


@dataclass(frozen=True)
class DatasetSource:
    """A dataset spec, parsed once: a ``keras.datasets`` name, or ``KIND:PATH``."""

    spec: str
    kind: str  # "keras", or a key of LOCAL_KINDS
    path: Path | None = None

    @property
    def label(self) -> str:
        """A short, path-independent name: the content fingerprint, not the path, identifies
        the data (the cache key holds both)."""
        return self.spec if self.path is None else f"{self.kind}:{self.path.resolve().name}"

    def absolute(self) -> str:
        """The spec as any process reads it, whatever its working folder."""
        return self.spec if self.path is None else f"{self.kind}:{self.path.resolve()}"


def parse_dataset(spec: str) -> DatasetSource:
    if spec in KERAS_DATASETS:
        return DatasetSource(spec, "keras")
    kind, colon, path = spec.partition(":")
    if colon and kind in LOCAL_KINDS:
        return DatasetSource(spec, kind, Path(path).expanduser())
    raise PipelineError(
        f"unknown dataset {spec!r}; use one of {', '.join(KERAS_DATASETS)} "
        f"or a local source {', '.join(k + ':PATH' for k in LOCAL_KINDS)}")


def load_dataset(spec: str, *, limit: int | None = None, skip_bad: bool = False,
                 test_fraction: float = 0.2, seed: int = 0, scan_index: Path | None = None,
                 rescan: bool = False, scan_workers: int | None = None,
                 scan_map: Callable | None = None, fit: int | None = None) -> Dataset:
    """Open the dataset named by ``spec``; ``limit`` keeps N images per split, stratified.

    ``fit``: the side of the network's input. Image-folder photos at least twice as large
    in both directions are decoded at reduced size (JPEG's DCT scaling), never as
    full-size arrays; smaller images are served exactly as stored.

    ``scan_index``: a folder where image-folder scans are remembered (file stat -> sha256 and
    decode check), so a rerun reads only new or changed files; ``rescan`` reads them all.
    ``scan_map(fn, items)``, where given, runs the scan elsewhere (the Ray engine's tasks).
    """
    source = parse_dataset(spec)
    if source.kind == "keras":
        arrays, classes = _load_keras_dataset(spec)
        dataset = _from_arrays(spec, arrays, classes)
    else:
        if not source.path.exists():
            raise PipelineError(f"dataset {spec!r}: path {str(source.path)!r} does not exist; "
                                f"check the path after '{source.kind}:'")
        dataset = LOCAL_KINDS[source.kind](
            spec, source.path, skip_bad=skip_bad, test_fraction=test_fraction, seed=seed,
            scan_index=scan_index, rescan=rescan, workers=scan_workers, scan_map=scan_map,
            fit=fit)
    if limit is not None:
        dataset = _limit(dataset, limit, seed)
    _warn_few_per_class(dataset)
    return dataset


# Where keras.datasets keeps each download under $KERAS_HOME/datasets (keras 3).
_KERAS_FILES = {"mnist": ["mnist.npz"], "cifar10": ["cifar-10-batches-py-target*"],
                "cifar100": ["cifar-100-python-target*"],
                "fashion_mnist": [f"fashion-mnist/{n}-{k}-idx{d}-ubyte.gz" for n in ("train", "t10k")
                                  for k, d in (("images", 3), ("labels", 1))]}


def keras_dataset_is_local(name: str) -> bool:
    """Whether ``keras.datasets`` would find ``name`` without downloading it."""
    home = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser() / "datasets"
    return all(any(home.glob(pattern)) for pattern in _KERAS_FILES[name])


# ----------------------------------------------------------------------------- array sources

def _to_rgb(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif images.shape[-1] == 4:
        images = images[..., :3]
    return np.ascontiguousarray(images)


def _array_split(x: np.ndarray, y: np.ndarray, ids: list[str] | None = None) -> Split:
    def digests() -> Iterator[bytes]:
        for lo in range(0, len(x), 4096):
            yield hashlib.sha256(np.ascontiguousarray(x[lo:lo + 4096]).tobytes()).digest()

    shape = _to_rgb(x[:1]).shape[1:]
    return Split(labels=y, image_shape=shape, load=lambda idx: _to_rgb(x[idx]),
                 content_digests=digests, ids=ids)


def _check_images(spec: str, x: np.ndarray, split: str) -> np.ndarray:
    """Images as uint8 (floats 0-1 and integers 0-255 converted), or one line saying why not."""
    if len(x) == 0:
        raise PipelineError(f"dataset {spec!r}: {split} split is empty")
    if x.dtype.kind not in "uifb":
        raise PipelineError(f"dataset {spec!r}: {split} images are {x.dtype}, not numbers; give "
                            "uint8 pixels (or integers 0-255, floats 0-1)")
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3, 4))):
        raise PipelineError(f"dataset {spec!r}: {split} images have shape {x.shape}; expected "
                            "(n, h, w), or (n, h, w, c) with c in 1, 3, 4")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
        raise PipelineError(f"dataset {spec!r}: {split} images contain NaN or Inf (first in image "
                            f"{bad}); replace them, e.g. with np.nan_to_num, before extracting")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.min() >= 0 and x.max() <= 1:
            x = np.round(x * 255).astype(np.uint8)
        elif np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.max() <= 255:
            x = x.astype(np.uint8)
        else:
            raise PipelineError(f"dataset {spec!r}: {split} images are {x.dtype} in "
                                f"[{x.min()}, {x.max()}]; give uint8, integers 0-255 or floats 0-1")
    return x


def _check_arrays(spec: str, x: np.ndarray, y: np.ndarray, split: str, n_classes: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise PipelineError(f"dataset {spec!r}: {split} has {len(x)} images but {len(y)} labels; "
                            "they must match")
    x = _check_images(spec, x, split)
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise PipelineError(f"dataset {spec!r}: {split} labels are {y.dtype}; "
                                "give integer class indices")
    if y.min() < 0 or y.max() >= n_classes:
        raise PipelineError(f"dataset {spec!r}: {split} labels range over [{y.min()}, {y.max()}] "
                            f"but there are {n_classes} classes; labels must be 0..{n_classes - 1}")
    return x, y.astype(np.int64)


def as_images(x, fit: int | None = None) -> np.ndarray:
    """uint8 RGB images (n, h, w, 3) from what a notebook holds: an image array (uint8, ints
    0-255 or floats 0-1; grey or RGBA made RGB, as every source is) or a list of image file
    paths (decoded upright; sizes that differ are resized to the most common one, as an image
    folder's are; ``fit``: the network's input side, see ``_decode``)."""
    if isinstance(x, (str, os.PathLike)):
        x = [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, os.PathLike)) for p in x):
        decoded = []
        for p in x:
            try:
                decoded.append(_decode(Path(p).read_bytes(), (fit, fit) if fit else None,
                                       turned=True))
            except Exception as exc:
                raise PipelineError(f"image {str(p)!r} cannot be read ({_reason(exc)}); give "
                                    "paths of image files") from None
        size = Counter(a.shape[1::-1] for a in decoded).most_common(1)[0][0]
        Image = _pil()
        return np.stack([a if a.shape[1::-1] == size else
                         np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR))
                         for a in decoded])
    try:
        array = np.asarray(x)
    except Exception:
        array = np.asarray([], dtype=object)
    if array.dtype == object or array.ndim == 0:
        raise PipelineError(f"images: got {type(x).__name__}; give an array of images (n, h, w) or "
                            "(n, h, w, c), or a list of image file paths")
    return _to_rgb(_check_images("images", array, "given"))


def _from_arrays(spec: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                 classes: list[str] | None, ids: dict[str, list[str]] | None = None) -> Dataset:
    arrays, classes = _index_labels(spec, arrays, classes)
    splits = {}
    for name in SPLITS:
        x, y = _check_arrays(spec, *arrays[name], name, len(classes))
        splits[name] = _array_split(x, y, (ids or {}).get(name))
    only_test = sorted(set(splits["test"].labels.tolist()) - set(splits["train"].labels.tolist()))
    if only_test:
        raise PipelineError(f"dataset {spec!r}: class(es) {', '.join(classes[i] for i in only_test[:5])} "
                            "have test rows but no training rows; no head could predict them: "
                            "add training rows or drop those test rows")
    return Dataset(spec=spec, classes=classes, splits=splits)


def _load_keras_dataset(name: str) -> tuple[dict, list[str]]:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as exc:  # keras raises bare Exception for failed downloads
        home = os.environ.get("KERAS_HOME", "~/.keras")
        raise PipelineError(
            f"dataset {name!r}: keras.datasets could not load it ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:160]}); without a network, put the files in "
            f"{home}/datasets/ (KERAS_HOME), name a local copy (e.g. idx:PATH or cifar:PATH), or "
            "run the offline experiment: make all CONFIG=experiments/offline.toml"
        ) from None
    classes = {"cifar10": CIFAR10_CLASSES, "cifar100": CIFAR100_CLASSES,
               "fashion_mnist": FASHION_MNIST_CLASSES, "mnist": DIGIT_CLASSES}[name]
    return {"train": (x_train, y_train), "test": (x_test, y_test)}, classes


def _read_idx(spec: str, path: Path, want_dims: int) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise PipelineError(f"dataset {spec!r}: cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != want_dims:
        raise PipelineError(f"dataset {spec!r}: {path.name} has magic number "
                            f"{raw[:4].hex() or 'none'}, expected 0000080{want_dims} "
                            "(IDX unsigned bytes); is it the right file?")
    dims = struct.unpack(f">{want_dims}I", raw[4:4 + 4 * want_dims])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * want_dims)
    if body.size != int(np.prod(dims)):
        raise PipelineError(f"dataset {spec!r}: {path.name} header says {dims} "
                            f"({int(np.prod(dims))} bytes) but holds {body.size} bytes; "
                            "the file is truncated or corrupt")
    return body.reshape(dims)


def _load_idx(spec: str, path: Path) -> tuple[dict, list[str], dict[str, list[str]]]:
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    arrays, ids = {}, {}
    for split, (images, labels) in names.items():
        found = []
        for stem in (images, labels):
            candidates = [path / (stem + ".gz"), path / stem]
            hit = next((c for c in candidates if c.exists()), None)
            if hit is None:
                raise PipelineError(f"dataset {spec!r}: {candidates[0]} not found; an IDX folder "
                                    "holds train-/t10k- images and labels files (.gz or raw)")
            found.append(hit)
        x, y = _read_idx(spec, found[0], 3), _read_idx(spec, found[1], 1)
        arrays[split] = (x, y)
        ids[split] = [f"{found[0].name}:{i}" for i in range(len(x))]
    n_classes = int(max(arrays["train"][1].max(), arrays["test"][1].max())) + 1
    classes_file = path / "classes.txt"
    if classes_file.exists():
        classes = classes_file.read_text().split()
    elif "fashion" in path.resolve().name.lower() and n_classes == 10:
        classes = FASHION_MNIST_CLASSES
    else:
        classes = None  # the distinct training labels (_index_labels)
    return arrays, classes, ids


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles: only what they hold (dicts, lists, bytes, numpy
    arrays) is rebuilt. Any other class a pickle asks for (code that would run) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never holds")


def _unpickle(spec: str, path: Path) -> dict:
    """A batch as a dict with bytes keys (pickled under Python 2 they are bytes; re-pickled
    under Python 3 often str: both are read)."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise PipelineError(f"dataset {spec!r}: cannot read CIFAR batch {path}: "
                            f"{type(exc).__name__}: {str(exc)[:160]}") from None
    if not isinstance(batch, dict):
        raise PipelineError(f"dataset {spec!r}: CIFAR batch {path} holds a {type(batch).__name__}, "
                            "not the dict of a CIFAR python batch")
    return {k.encode() if isinstance(k, str) else k: v for k, v in batch.items()}


def _cifar_images(batch: dict) -> np.ndarray:
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _names(spec: str, meta: dict, key: bytes, path: Path) -> list[str]:
    try:
        return [c.decode() if isinstance(c, bytes) else str(c) for c in meta[key]]
    except (KeyError, TypeError):
        raise PipelineError(f"dataset {spec!r}: {path} has no {key.decode()} list of class "
                            "names; is it a CIFAR python batches folder?") from None


def _load_cifar_batches(spec: str, path: Path) -> tuple[dict, list[str], dict[str, list[str]]]:
    if (path / "data_batch_1").exists():  # CIFAR-10 python layout
        train_files = sorted(path.glob("data_batch_*"))
        test_file = path / "test_batch"
        classes = _names(spec, _unpickle(spec, path / "batches.meta"), b"label_names",
                         path / "batches.meta")
        label_key = b"labels"
    elif (path / "train").exists():  # CIFAR-100 python layout
        train_files, test_file = [path / "train"], path / "test"
        classes = _names(spec, _unpickle(spec, path / "meta"), b"fine_label_names", path / "meta")
        label_key = b"fine_labels"
    else:
        raise PipelineError(f"dataset {spec!r}: {path} holds neither data_batch_1 (CIFAR-10) "
                            "nor train (CIFAR-100) python batches")
    train, test = [_unpickle(spec, p) for p in train_files], _unpickle(spec, test_file)
    try:
        arrays = {
            "train": (np.concatenate([_cifar_images(b) for b in train]),
                      np.concatenate([np.asarray(b[label_key]) for b in train])),
            "test": (_cifar_images(test), np.asarray(test[label_key])),
        }
    except (KeyError, ValueError, TypeError) as exc:
        raise PipelineError(f"dataset {spec!r}: CIFAR batches in {path} are malformed "
                            f"({type(exc).__name__}: {str(exc)[:120]})") from None
    ids = {"train": [f"{p.name}:{i}" for p, b in zip(train_files, train)
                     for i in range(len(b[label_key]))],
           "test": [f"{test_file.name}:{i}" for i in range(len(test[label_key]))]}
    return arrays, classes, ids


def _load_npz(spec: str, path: Path) -> tuple[dict, list[str] | None]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise PipelineError(f"dataset {spec!r}: cannot read {path} as .npz: "
                            f"{str(exc).splitlines()[0][:160]}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise PipelineError(f"dataset {spec!r}: {path.name} is a single .npy array, not an .npz "
                            "archive; save the arrays together: np.savez(PATH, x_train=..., "
                            "y_train=..., x_test=..., y_test=...)")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data.files]
    if missing:
        raise PipelineError(f"dataset {spec!r}: {path.name} lacks {', '.join(missing)}; an .npz "
                            "needs x_train, y_train, x_test, y_test (and optionally classes)")
    name = ""
    try:
        arrays = {}
        for split in SPLITS:
            arrays[split] = tuple(data[name := f"{k}_{split}"] for k in ("x", "y"))
        classes = None
        if "classes" in data.files:
            classes = data[name := "classes"]
    except ValueError:  # an object array: np.load refuses pickle, which could run code
        raise PipelineError(f"dataset {spec!r}: {path.name}'s {name} is an object array (pickled); "
                            "store it as numbers or fixed-width strings, e.g. "
                            "np.array(names, dtype=str)") from None
    except Exception as exc:  # a damaged member of the zip archive
        raise PipelineError(f"dataset {spec!r}: {path.name}'s {name} cannot be read "
                            f"({type(exc).__name__}: {str(exc)[:120]}); the file is damaged") from None
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "UuiS":
            raise PipelineError(f"dataset {spec!r}: {path.name}'s classes has shape {classes.shape} "
                                f"and dtype {classes.dtype}; give a 1-D array of names")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
        if len(set(classes)) != len(classes):
            raise PipelineError(f"dataset {spec!r}: {path.name}'s classes repeat a name; "
                                "give each class once")
    return arrays, classes


def _index_labels(spec: str, arrays: dict, classes: list[str] | None
                  ) -> tuple[dict, list[str]]:
    """Labels as class indices. Without class names, the classes are the distinct training
    labels (numbers or strings), so labels 1..K make K classes, not a phantom class 0; string
    labels with names are looked up by name."""
    for s in SPLITS:
        y = np.asarray(arrays[s][1])
        if y.ndim == 2 and y.shape[1] > 1:
            raise PipelineError(f"dataset {spec!r}: {s} labels have shape {y.shape} (one-hot?); "
                                "give one class index per image, e.g. y.argmax(axis=1)")
    labels = {s: np.asarray(arrays[s][1]).reshape(-1) for s in SPLITS}
    kinds = {labels[s].dtype.kind for s in SPLITS}
    if not kinds <= set("iufUSb") or (kinds & set("US") and kinds - set("US")):
        raise PipelineError(f"dataset {spec!r}: labels are {', '.join(str(labels[s].dtype) for s in SPLITS)};"
                            " give integer class indices or class names, the same kind in both splits")
    if kinds & set("US"):
        labels = {s: np.array([v.decode() if isinstance(v, bytes) else v for v in y.tolist()])
                  for s, y in labels.items()}
        names = classes or sorted(set(labels["train"].tolist()))
        unknown = sorted(set().union(*(set(y.tolist()) for y in labels.values())) - set(names))
        if unknown:
            raise PipelineError(f"dataset {spec!r}: label(s) {', '.join(map(repr, unknown[:5]))} are "
                                "not among the class names; every label must name a class")
        lookup = {n: i for i, n in enumerate(names)}
        return {s: (arrays[s][0], np.array([lookup[v] for v in labels[s].tolist()], np.int64))
                for s in SPLITS}, list(names)
    if classes is not None:
        return arrays, classes
    for s in SPLITS:  # the range and integer checks come later (_check_arrays)
        y = labels[s]
        if y.size and (y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y)))):
            return arrays, []
        labels[s] = y.astype(np.int64)
    values = np.unique(labels["train"])
    if not values.size or values.min() < 0 or np.array_equal(values, np.arange(len(values))):
        top = max(int(labels[s].max()) for s in SPLITS if labels[s].size) if values.size else -1
        return arrays, [str(i) for i in range(top + 1)]  # (negative labels: refused later)
    only_test = sorted(set(np.unique(labels["test"]).tolist()) - set(values.tolist()))
    if only_test:
        raise PipelineError(f"dataset {spec!r}: label(s) {', '.join(map(str, only_test[:5]))} appear "
                            "in the test labels but not in the training labels; no head could "
                            "predict them: add training rows or drop those test rows")
    log.info("dataset %r: labels %s are classes 0..%d (no class names given)", spec,
             ", ".join(map(str, values[:10].tolist())) + (" ..." if len(values) > 10 else ""),
             len(values) - 1)
    return {s: (arrays[s][0], np.searchsorted(values, labels[s]).astype(np.int64)) for s in SPLITS}, \
        [str(v) for v in values.tolist()]


# ----------------------------------------------------------------------------- image folders

@dataclass
class _ImageFile:
    path: Path
    label: int
    digest: bytes = b""
    size: tuple[int, int] = (0, 0)  # (width, height) as shown upright, from the file's header
    error: str = ""
    turned: bool = False  # an EXIF orientation tag turns (or mirrors) it upright on decode
    real: str = ""  # its path with every link resolved: one file reached twice is one file
    name: str = ""  # its path under the dataset's root: its row id and its scan-index key


@functools.cache
def _pil():
    """PIL, with its decompression-bomb warning off: big images are handled here (decoded at
    reduced size, one line each), not reported as raw multi-line warnings."""
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def _decode(data: bytes, fit: tuple[int, int] | None = None, shrink: bool = False,
            turned: bool = False) -> np.ndarray:
    """Any still image -> uint8 RGB (grey, palette, RGBA and 16-bit included); ``turned``
    (what the scan read from its EXIF orientation tag): shown upright, as a viewer does.

    An image at least twice ``fit`` (width, height) in both directions, if it is over PIL's
    decompression-bomb threshold (89 MP) or ``shrink`` is asked for, is decoded at reduced
    size (JPEG's DCT scaling, then PIL's ``reduce``), never as full-size RGB copies: a
    12000x12000 PNG costs its native decode, not gigabytes. Others decode exactly as they are.
    """
    Image = _pil()
    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as img:
        large = fit and (shrink or img.size[0] * img.size[1] > Image.MAX_IMAGE_PIXELS)
        if large and min(img.size[0] // fit[0], img.size[1] // fit[1]) >= 2:
            img.draft("RGB", fit)  # JPEG only: decodes at 1/2, 1/4 or 1/8 scale, >= fit
        img.load()
        if turned:
            from PIL import ImageOps

            img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        factor = min(img.size[0] // fit[0], img.size[1] // fit[1]) if large else 1
        if factor >= 2 and img.mode in ("L", "RGB", "RGBA", "LA", "I", "F", "CMYK"):
            img = img.reduce(factor)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(img, dtype=np.int64)
            if arr.ndim == 2:
                arr = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=-1)
        if img.mode == "F":
            img = img.convert("L")
        if img.mode in ("RGBA", "LA", "PA"):
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _orientation(img) -> int:
    """The EXIF orientation tag (1: stored upright; 2-8: turned and/or mirrored), read once,
    at the scan, from the file's header. A PNG whose header holds no eXIf chunk counts as
    upright: Pillow would decode the whole image to look further (one after the pixels is
    rare)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the pixels are still the image
        return 1
    return value if value in range(1, 9) else 1


def _reason(exc: Exception) -> str:
    """Why a file could not be decoded, in words (no object reprs, no multi-line text)."""
    Image = _pil()
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image PIL can read (unknown format or damaged header)"
    if isinstance(exc, Image.DecompressionBombError):
        return (f"too large to decode safely ({str(exc).split('(')[1].split(')')[0]}); "
                "shrink it or remove it")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


_SCAN_FIT = (256, 256)  # the scan decodes to check a file, at reduced size where it can


def _scan_file(item: _ImageFile) -> _ImageFile:
    Image = _pil()
    try:
        data = item.path.read_bytes()
        item.digest = hashlib.sha256(data).digest()
        if data:
            with Image.open(io.BytesIO(data)) as img:
                orientation = _orientation(img)
                item.size = img.size[::-1] if orientation in (5, 6, 7, 8) else img.size
                item.turned = orientation != 1
        _decode(data, _SCAN_FIT, shrink=True, turned=item.turned)
    except Exception as exc:
        item.error = _reason(exc)
    return item


_PROCESS_SCAN_MIN = 2000  # below this, starting processes costs more than it saves


def scan_files(items: list[_ImageFile], index: ScanIndex | None = None,
               workers: int | None = None, scan_map: Callable | None = None) -> list[_ImageFile]:
    """Hash and check every file the index cannot vouch for, on every core: small images
    are decoded faster than Python hands them out, so threads would share one core (measured
    with threads, cold cache: 1 thread 20.5 s, 8 threads 19.1 s on 52,000 CIFAR JPEGs); many
    files go to processes."""
    todo = [i for i, f in enumerate(items) if index is None or not index.recall(f)]
    workers = workers or os.cpu_count() or 1
    if scan_map is not None and todo:
        done = scan_map(_scan_file, [items[i] for i in todo])
    elif workers > 1 and len(todo) >= _PROCESS_SCAN_MIN:
        import multiprocessing

        # spawn: the caller may hold TensorFlow's threads, which fork would copy mid-state
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_scan_file, [items[i] for i in todo], chunksize=256))
    else:
        done = [_scan_file(items[i]) for i in todo]
    Image = _pil()
    for i, item in zip(todo, done):
        items[i] = item
        if index is not None:
            index.remember(item)
        if not item.error and item.size[0] * item.size[1] > Image.MAX_IMAGE_PIXELS:
            log.warning("%s is %dx%d (%.0f MP): decoded at reduced size", item.path, *item.size,
                        item.size[0] * item.size[1] / 1e6)
    if todo and index is not None and len(todo) < len(items):
        log.info("scanned %d new or changed file(s); %d known from the scan index",
                 len(todo), len(items) - len(todo))
    return items


def _relative_name(root: Path, path: Path) -> str:
    """``path``'s name under ``root`` (a folder it is in), computed once per image file
    (``_ImageFile.name``). 2.6x faster than ``Path.relative_to``, which a no-op rerun of a
    52,000-image folder would pay 0.24 s for."""
    return str(path)[len(str(root)) + 1:]


class _Entries:
    """A scan index's entries as columns (one numpy array per field), each read back as the
    entry list ``ScanIndex`` works with only when asked for: 1.28M entries load in 0.78 s,
    where the same as JSON took 10.3 s (``benchmarks/scan_index_scale.py``)."""

    def __init__(self, columns: dict, errors: dict[int, str]):
        blob = columns["names"].tobytes()
        names = blob.decode("utf-8", "surrogateescape").split("\0") if blob else []
        self.rows = dict(zip(names, range(len(names))))
        self.stat, self.inode = columns["stat"], columns["inode"]
        self.sha256, self.size = columns["sha256"], columns["size"]
        self.turned, self.checked = columns["turned"], columns["checked_ns"]
        self.errors = errors

    def get(self, name: str) -> list | None:
        row = self.rows.get(name)
        return None if row is None else self._entry(row)

    def items(self):
        return ((name, self._entry(row)) for name, row in self.rows.items())

    def keys(self):
        return self.rows.keys()

    @functools.cached_property
    def _lists(self) -> tuple:
        """Every column as Python values at once, on the first lookup (a scan looks up every
        file): one conversion per column, not several numpy scalars per entry."""
        return (self.stat.tolist(), self.inode.tolist(), self.sha256.tobytes().hex(),
                self.size.tolist(), self.turned.tolist(), self.checked.tolist())

    def _entry(self, row: int) -> list:
        stat, inode, hexes, size, turned, checked = self._lists
        return [stat[row][0], stat[row][1], inode[row], stat[row][2],
                hexes[64 * row:64 * row + 64], list(size[row]), self.errors.get(row, ""),
                turned[row], checked[row]]

    @staticmethod
    def columns(entries: dict[str, list]) -> tuple[dict, dict[int, str]]:
        """The arrays (and the few decode errors, by row) that hold ``entries``."""
        values = list(entries.values())
        n = len(values)
        columns = {
            "names": np.frombuffer("\0".join(entries).encode("utf-8", "surrogateescape"), np.uint8),
            "stat": np.array([(e[0], e[1], e[3]) for e in values], np.int64).reshape(n, 3),
            "inode": np.array([e[2] for e in values], np.uint64),
            "sha256": np.frombuffer(bytes.fromhex("".join(e[4] for e in values)),
                                    np.uint8).reshape(n, 32),
            "size": np.array([e[5] for e in values], np.int64).reshape(n, 2),
            "turned": np.array([e[7] for e in values], bool),
            "checked_ns": np.array([e[8] for e in values], np.int64)}
        return columns, {row: e[6] for row, e in enumerate(values) if e[6]}


class ScanIndex:
    """What an earlier scan of an image folder found, per file: (size, mtime_ns, inode,
    ctime_ns) -> sha256, header size, decode error. A rerun stats each file and reads only
    those whose stat changed, as git's index does. A file modified within ``RACY_NS`` of
    the scan that recorded it is read again (its change could share a timestamp tick with the
    recording). Written whole (temporary file, rename) as columns (an uncompressed ``.npz``)
    with a checksum of its own: a damaged index is rebuilt, never trusted.
    """

    VERSION = 3  # 2: records whether an EXIF tag turns the image; 3: columns, not JSON
    RACY_NS = 2_000_000_000  # coarser than any filesystem's timestamps (FAT: 2 s)
    COLUMNS = ("names", "stat", "inode", "sha256", "size", "turned", "checked_ns")
    # An entry: [size, mtime_ns, inode, ctime_ns, sha256 hex, [w, h], error, turned, checked_ns]
    # where checked_ns is when its content was last found to be that sha256 (the scan's start,
    # or a later read: ``confirm``).

    def __init__(self, folder: Path, root: Path, *, rescan: bool = False):
        root = Path(root).expanduser().resolve()
        self.root = root
        self.path = Path(folder) / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.npz"
        self.started_ns = time.time_ns()
        self.old: _Entries | dict = {} if rescan else self._load()
        self.new: dict[str, list] = {}
        self.changed = rescan

    @classmethod
    def _checksum(cls, meta: bytes, columns: dict) -> str:
        h = hashlib.sha256(meta)
        for name in cls.COLUMNS:
            h.update(f"|{name}|{columns[name].dtype.str}|{columns[name].shape}|".encode())
            h.update(np.ascontiguousarray(columns[name]).data)
        return h.hexdigest()

    def _load(self) -> _Entries | dict:
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                meta_bytes = stored["meta"].tobytes()
                meta = json.loads(meta_bytes)
                if meta.get("version") != self.VERSION:
                    log.info("scan index %s is from another version of this program; scanning "
                             "the folder again", self.path)
                    return {}
                columns = {name: stored[name] for name in self.COLUMNS}
                if meta["root"] != str(self.root) or \
                        self._checksum(meta_bytes, columns) != stored["sha256sum"].tobytes().decode():
                    raise ValueError("checksum or root differ")
            entries = _Entries(columns, {int(k): v for k, v in meta["errors"].items()})
            if len(entries.rows) != len(columns["stat"]):
                raise ValueError("names and entries differ in number")
            return entries
        except FileNotFoundError:
            if self.path.with_suffix(".json").exists():
                log.info("scan index %s is from an earlier version of this program (JSON); "
                         "scanning the folder again, once", self.path.with_suffix(".json"))
            return {}
        except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises: rebuild it
            log.warning("scan index %s is damaged (%s); scanning the folder again",
                        self.path, str(exc)[:80])
            return {}

    @staticmethod
    def _signature(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def recall(self, item: _ImageFile) -> bool:
        """Fill ``item`` from the index if its file is unchanged since it was recorded."""
        entry = self.old.get(item.name)
        try:
            signature = self._signature(item.path)
        except OSError:
            return False  # let the scan report it
        if entry is None or entry[:4] != signature or signature[1] >= entry[8] - self.RACY_NS:
            self.changed = True
            return False
        item.digest, item.size, item.error = bytes.fromhex(entry[4]), tuple(entry[5]), entry[6]
        item.turned = bool(entry[7])
        self.new[item.name] = entry
        return True

    def confirm(self, checked: list) -> int:
        """Mark as confirmed at time ``t`` each entry whose file had, just before a read at
        ``t`` found its sha256 unchanged, the very stat the entry records. Returns how many
        entries became trusted."""
        self.new = dict(self.old.items())
        confirmed = 0
        for name, signature, digest, t_ns in checked:
            entry = self.new.get(name)
            if entry is None or entry[:4] != signature or entry[4] != digest or t_ns <= entry[8]:
                continue
            racy_before = signature[1] >= entry[8] - self.RACY_NS
            entry[8] = t_ns
            confirmed += racy_before and signature[1] < t_ns - self.RACY_NS
            self.changed = True
        return confirmed

    def remember(self, item: _ImageFile) -> None:
        try:
            signature = self._signature(item.path)
        except OSError:
            return
        self.new[item.name] = [*signature, item.digest.hex(), list(item.size),
                                               item.error, item.turned, self.started_ns]

    def save(self) -> None:
        """Write the index if anything changed (best effort: a read-only cache just rescans)."""
        if not self.changed and self.new.keys() == self.old.keys():
            return
        columns, errors = _Entries.columns(self.new)
        meta = json.dumps({"version": self.VERSION, "root": str(self.root),
                           "scanned_ns": self.started_ns, "errors": errors}).encode()
        checksum = self._checksum(meta, columns)
        tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}.npz")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, meta=np.frombuffer(meta, np.uint8),
                     sha256sum=np.frombuffer(checksum.encode(), np.uint8), **columns)
            os.replace(tmp, self.path)
            self.path.with_suffix(".json").unlink(missing_ok=True)  # version 2's, superseded
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.debug("scan index %s not written (%s)", self.path, exc)


def _list_class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# Top-level folder names read as splits, never as classes (the name's case does not matter).
SPLIT_FOLDERS = {"train": "train", "training": "train", "test": "test", "testing": "test",
                 "val": "val", "valid": "val", "validation": "val", "dev": "val"}


def _split_folders(spec: str, root: Path) -> dict[str, Path]:
    """Which top-level folders are splits: {role: folder} with roles train, test and val, or
    {"all": root} for a tree of class folders. Split-like names are never taken as classes."""
    tops = _list_class_dirs(root)
    named = [d for d in tops if d.name.lower() in SPLIT_FOLDERS]
    if not named:
        return {"all": root}
    others = [d.name for d in tops if d.name.lower() not in SPLIT_FOLDERS]
    if others:
        raise PipelineError(
            f"dataset {spec!r}: {root} holds split folders ({', '.join(d.name for d in named)}) "
            f"beside other folders ({', '.join(others[:5])}); put the class folders inside "
            "train/ (and test/, val/), or rename the split-like folders")
    roles: dict[str, Path] = {}
    for d in named:
        role = SPLIT_FOLDERS[d.name.lower()]
        if role in roles:
            raise PipelineError(f"dataset {spec!r}: {roles[role].name}/ and {d.name}/ are both a "
                                f"{role} split; keep one")
        roles[role] = d
    if "train" not in roles:
        raise PipelineError(f"dataset {spec!r}: {root} has {', '.join(d.name + '/' for d in named)} "
                            "but no train/ folder; the training images go in train/<class>/")
    return roles


def _list_images(class_dir: Path, seen: set[str]) -> list[tuple[Path, str]]:
    """(path, real path) of the image files under ``class_dir``, in path order (as
    ``sorted(Path)`` orders them, part by part). Links to folders are followed once per real
    folder (``seen``, shared by the whole walk) and never into a folder above them (a loop such
    as ``cat/all -> ..``). One ``scandir`` per folder and no call per file but for links: a
    no-op rerun lists every file."""
    found, unread = [], []
    top = os.path.realpath(class_dir)
    seen.add(top)
    stack = [(str(class_dir), top)]
    while stack:
        folder, real_folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:  # os.walk would skip a folder it cannot list, silently
            raise PipelineError(f"cannot list {folder} ({exc.strerror}); fix its permissions or "
                                "move it out of the dataset") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            link = entry.is_symlink()
            real = os.path.realpath(entry.path) if link else os.path.join(real_folder, entry.name)
            if entry.is_dir():
                if real in seen or top.startswith(real + os.sep):
                    log.warning("%s: skipped %s, a link to a folder already read or above it (%s)",
                                class_dir, entry.path, real)
                    continue
                seen.add(real)
                stack.append((entry.path, real))
            elif os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                unread.append(entry.path)
            elif entry.is_file():
                found.append((entry.path, real))
            else:
                unread.append(entry.path + (" (a broken link)" if link else " (not a file)"))
    if unread:
        log.info("%s: %d file(s) not read (not an image suffix %s, or a broken link)%s", class_dir,
                 len(unread), "/".join(sorted(IMAGE_SUFFIXES)),
                 "; -v lists them" if not log.isEnabledFor(logging.DEBUG) else "")
        log.debug("not read: %s", ", ".join(sorted(unread)))
    return [(Path(p), real) for p, real in sorted(found, key=lambda f: f[0].split(os.sep))]


def _folder_classes(spec: str, root: Path, split_roots: dict[str, Path]
                    ) -> tuple[list[str], dict[str, dict[str, list[Path]]]]:
    """Class names (folders holding at least one image) and the image paths per split and
    class. Empty class folders are dropped with a warning; a class with test images and no
    training images is an error (no head could ever predict it)."""
    seen: set[str] = set()
    found = {s: {d.name: _list_images(d, seen) for d in _list_class_dirs(r)}
             for s, r in split_roots.items()}  # (path, real path) per class
    names = sorted({c for per_class in found.values() for c in per_class})
    empty = [c for c in names if not any(per_class.get(c) for per_class in found.values())]
    if empty:
        log.warning("dataset %r: class folder(s) %s hold no images; ignored", spec, ", ".join(empty))
    classes = [c for c in names if c not in empty]
    if len(classes) < 2:
        raise PipelineError(f"dataset {spec!r}: found {len(classes)} class folder(s) with images "
                            f"in {root}; an image folder needs at least two, as "
                            "ROOT[/train|/test|/val]/<class>/*")
    return classes, found


def _one_label_per_file(spec: str, classes: list[str], files: dict[str, list[_ImageFile]],
                        skip_bad: bool) -> tuple[dict[str, list[_ImageFile]], list[str]]:
    """A file reached twice (links) counts once; reached under two classes it is an error
    naming both paths (``skip_bad`` drops it, recorded as skipped)."""
    first: dict[str, _ImageFile] = {}
    conflicts: dict[str, list[_ImageFile]] = {}
    dropped: set[int] = set()  # id() of every item left out: a second link, or a conflict
    again = 0
    for item in (i for items in files.values() for i in items):
        seen = first.setdefault(item.real, item)
        if seen is item:
            continue
        dropped.add(id(item))
        if seen.label != item.label:
            conflicts.setdefault(item.real, [seen]).append(item)
            dropped.add(id(seen))
        else:
            again += 1
    if conflicts and not skip_bad:
        a, b = next(iter(conflicts.values()))[:2]
        raise PipelineError(f"dataset {spec!r}: the same file is labelled {classes[a.label]} as "
                            f"{a.path} and {classes[b.label]} as {b.path}"
                            + (f" ({len(conflicts) - 1} more such files)" if len(conflicts) > 1 else "")
                            + "; remove one of the links, or rerun with --skip-bad to drop them")
    skipped = [f"{i.path}: labelled {' and '.join(classes[j.label] for j in items)} "
               "(the same file under two classes)" for items in conflicts.values() for i in items]
    if again:
        log.warning("dataset %r: %d image file(s) reached a second time through a link in the "
                    "same class; each is read once", spec, again)
    if skipped:
        log.warning("dataset %r: dropped %d file(s) reached under two classes, e.g. %s",
                    spec, len(skipped), skipped[0])
    kept = {s: [i for i in items if id(i) not in dropped] for s, items in files.items()}
    return kept, skipped


def _check_train_covers(spec: str, classes: list[str], files: dict[str, list[_ImageFile]],
                        why: str = "") -> None:
    if "train" not in files:  # one tree of class folders: split later, stratified
        return
    train = {f.label for f in files["train"]}
    for split in ("test", "val"):
        only = sorted({classes[f.label] for f in files.get(split, [])} - {classes[i] for i in train})
        if only:
            raise PipelineError(f"dataset {spec!r}: class(es) {', '.join(only)} have {split} "
                                f"images but no training images{why}; add training images or "
                                "remove them")


def _warn_few_per_class(dataset: Dataset) -> None:
    """Every head carves a stratified validation split from the training rows (unless one is
    given), so each class needs two: said when the data is read, not first in train."""
    labels, n = dataset.splits["train"].labels, len(dataset.classes)
    counts = np.bincount(labels[:len(labels) - dataset.validation], minlength=n)
    in_val = np.bincount(labels[len(labels) - dataset.validation:], minlength=n)
    need = 1 if dataset.validation else 2
    few = [f"{dataset.classes[c]} ({counts[c]})" for c in np.flatnonzero(counts < need)
           if counts[c] or in_val[c]]
    if few:
        log.warning("dataset %r: class(es) %s have fewer than %d training images; the features "
                    "can be extracted, but no head can be trained on them (its validation split "
                    "needs %d per class): add images or remove the class", dataset.spec,
                    ", ".join(few), need, need)


def _warn_duplicates(spec: str, classes: list[str], files: dict[str, list[_ImageFile]]) -> None:
    """Byte-identical images: under two classes, a label conflict; a test image equal to a
    training image makes test accuracy optimistic."""
    by_digest: dict[bytes, _ImageFile] = {}
    clashes = []
    for item in (f for items in files.values() for f in items):
        other = by_digest.setdefault(item.digest, item)
        if other is not item and other.label != item.label:
            clashes.append((other, item))
    if clashes:
        a, b = clashes[0]
        log.warning("dataset %r: %d image(s) are byte-identical to an image of another class "
                    "(e.g. %s is %s, %s is %s): a label conflict; remove the wrong copy",
                    spec, len(clashes), a.path, classes[a.label], b.path, classes[b.label])
    train = {f.digest: f.path for f in files["train"]}
    twins = [(f.path, train[f.digest]) for f in files["test"] if f.digest in train]
    if twins:
        log.warning("dataset %r: %d test image(s) are byte-identical to training images (e.g. %s "
                    "and %s); test accuracy will be optimistic: remove them from one split",
                    spec, len(twins), twins[0][0], twins[0][1])


def _load_image_folder(spec: str, root: Path, *, skip_bad: bool, test_fraction: float,
                       seed: int, scan_index: Path | None = None, rescan: bool = False,
                       workers: int | None = None, scan_map: Callable | None = None,
                       fit: int | None = None) -> Dataset:
    if not root.is_dir():
        raise PipelineError(f"dataset {spec!r}: {root} is not a folder")
    root = root.resolve()  # absolute paths: the dataset can be handed to other processes
    index = ScanIndex(scan_index, root, rescan=rescan) if scan_index else None
    split_roots = _split_folders(spec, root)
    classes, found = _folder_classes(spec, root, split_roots)
    files = {s: [_ImageFile(p, classes.index(c), real=real, name=_relative_name(root, p))
                 for c, paths in per_class.items()
                 if c in classes for p, real in paths] for s, per_class in found.items()}
    files, conflicts = _one_label_per_file(spec, classes, files, skip_bad)
    _check_train_covers(spec, classes, files)
    files = {s: scan_files(items, index, workers, scan_map) for s, items in files.items()}
    if index is not None:
        index.save()
    bad = [f for items in files.values() for f in items if f.error]
    if bad and not skip_bad:
        raise PipelineError(f"dataset {spec!r}: cannot decode {bad[0].path} ({bad[0].error})"
                            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                            + "; remove it or rerun with --skip-bad to skip and record bad files")
    files = {s: [f for f in items if not f.error] for s, items in files.items()}
    if "all" in files:
        files = _split_files(files["all"], test_fraction, seed)
    elif "test" not in files:
        log.info("dataset %r: no test/ folder; %.0f%% of train/ is held out as the test split "
                 "(seeded, stratified)", spec, 100 * test_fraction)
        files.update(_split_files(files["train"], test_fraction, seed))
    for s in files:
        if not files[s]:
            raise PipelineError(f"dataset {spec!r}: no readable images in the {s} split of {root}")
    _check_train_covers(spec, classes, files, " once undecodable files are skipped")
    _warn_duplicates(spec, classes, files)
    size, shrink = _served_size(files, fit)
    validation, checked = len(files.get("val", [])), []
    splits = {"train": _folder_split(files["train"] + files.get("val", []), size, shrink, checked),
              "test": _folder_split(files["test"], size, shrink, checked)}
    return Dataset(spec=spec, classes=classes, splits=splits, validation=validation,
                   skipped=[f"{f.path}: {f.error}" for f in bad] + conflicts,
                   scan_index=(scan_index, root) if scan_index else None, checked=checked)


def _served_size(files: dict[str, list[_ImageFile]], fit: int | None) -> tuple[tuple[int, int], bool]:
    """(width, height) every image is served at: the most common size, divided by a whole
    factor where that is at least twice the network's input (``fit``) both ways (then each
    image is decoded at reduced size: ``shrink``). The network resizes to its input anyway."""
    width, height = Counter(f.size for items in files.values() for f in items).most_common(1)[0][0]
    factor = min(width // fit, height // fit) if fit else 1
    if factor < 2:
        return (width, height), False
    log.info("images of %dx%d are decoded at 1/%d size (%dx%d) for a %dx%d input", width, height,
             factor, width // factor, height // factor, fit, fit)
    return (width // factor, height // factor), True


def _split_files(items: list[_ImageFile], test_fraction: float, seed: int) -> dict:
    from sklearn.model_selection import train_test_split

    labels = [f.label for f in items]
    try:
        train_idx, test_idx = train_test_split(np.arange(len(items)), test_size=test_fraction,
                                               stratify=labels, random_state=seed)
    except ValueError as exc:
        raise PipelineError(f"cannot split the image folder into train and test ({exc}); "
                            "give it train/ and test/ subfolders or add images") from None
    return {"train": [items[i] for i in sorted(train_idx)],
            "test": [items[i] for i in sorted(test_idx)]}


def _folder_split(items: list[_ImageFile], size: tuple[int, int], shrink: bool,
                  checked: list) -> Split:
    """``checked``: where each read records that its file was unchanged (``Dataset.checked``)."""
    Image = _pil()

    def load_one(item: _ImageFile) -> np.ndarray:
        try:
            checked_ns, stat = time.time_ns(), os.stat(item.path)
            data = item.path.read_bytes()
        except OSError as exc:
            raise PipelineError(f"{item.path} cannot be read any more ({exc.strerror}); it was "
                                "there when the dataset was scanned: restore it or rerun") from None
        if hashlib.sha256(data).digest() != item.digest:  # the features must match the key
            raise PipelineError(f"{item.path} changed after the dataset was scanned (its sha256 "
                                "differs); rerun to extract the new content")
        checked.append((item.name, [stat.st_size, stat.st_mtime_ns, stat.st_ino,
                                         stat.st_ctime_ns], item.digest.hex(), checked_ns))
        try:
            arr = _decode(data, size, shrink, item.turned)
        except Exception as exc:  # decoded at the scan; fails now only if PIL itself changed
            raise PipelineError(f"cannot decode {item.path} ({_reason(exc)})") from exc
        if arr.shape[1::-1] != size:
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR))
        return arr

    def load(idx: np.ndarray) -> np.ndarray:
        return np.stack([load_one(items[i]) for i in idx])

    return Split(labels=np.array([f.label for f in items], dtype=np.int64),
                 image_shape=(size[1], size[0], 3), load=load,
                 # a turned photo's pixels are not its bytes': marked, so that its features
                 # are keyed apart from those extracted before EXIF tags were applied
                 content_digests=lambda: (f.digest + b"upright" * f.turned for f in items),
                 ids=[f.name for f in items])


def original_images(source: str, split: str, ids: list[str]) -> list[np.ndarray | None]:
    """The images rows named by ``ids`` came from, as uint8 RGB (shown upright), read from
    the dataset's original ``source`` (an absolute spec); None for an image that is gone or
    unreadable now. For pictures of results (mistakes), never for features: nothing here
    checks that the content is what was extracted."""
    parsed = parse_dataset(source)
    if parsed.kind == "folder":
        found = []
        for name in ids:
            try:
                found.append(_decode((parsed.path / name).read_bytes(), (256, 256), True, True))
            except Exception:  # gone, moved, or no longer an image
                found.append(None)
        return found
    if parsed.kind in FILE_READERS:  # ids name their file: only those files are read
        return _rows_of_named_files(source, parsed.path, ids, FILE_READERS[parsed.kind])
    dataset = load_dataset(source)
    where = {row_id: i for i, row_id in enumerate(dataset.splits[split].row_ids())}
    rows = [where.get(name) for name in ids]
    known = [i for i in rows if i is not None]
    images = iter(dataset.splits[split].load(np.array(known, dtype=np.int64)) if known else [])
    return [None if i is None else next(images) for i in rows]


# Sources whose row ids are ``FILE:ROW``: how to read one such file's images, as the loader
# reads them. A head's mistakes.png on Fashion-MNIST read the whole dataset (0.31 s) for a
# few dozen images of its test file, a seventh of it.
FILE_READERS = {
    "idx": lambda spec, path: _read_idx(spec, path, 3),
    "cifar": lambda spec, path: _cifar_images(_unpickle(spec, path)),
}


def _rows_of_named_files(spec: str, folder: Path, ids: list[str], read: Callable
                         ) -> list[np.ndarray | None]:
    """The images ``FILE:ROW`` ids name, each file in ``folder`` read once; None for an id
    whose file or row is not there."""
    wanted: dict[str, list[tuple[int, str]]] = {}
    for i, row_id in enumerate(ids):
        name, _, row = row_id.rpartition(":")
        wanted.setdefault(name, []).append((i, row))
    found: list[np.ndarray | None] = [None] * len(ids)
    for name, rows in wanted.items():
        if not name or Path(name).name != name or not (folder / name).is_file():
            continue  # not a file of this dataset's folder
        images = read(spec, folder / name)
        for i, row in rows:
            if row.isdigit() and int(row) < len(images):
                found[i] = _to_rgb(images[int(row)][None])[0]  # as the split serves it
    return found


# ----------------------------------------------------------------------------- subsets

def _arrays(loader: Callable) -> Callable:
    """An array source as a dataset loader (the image-folder options do not apply)."""
    def load(spec: str, path: Path, **_) -> Dataset:  # (fit: arrays are served as stored)
        return _from_arrays(spec, *loader(spec, path))
    return load


# Local sources, ``KIND:PATH``: one row per kind (``load(spec, path, **options) -> Dataset``).
LOCAL_KINDS = {
    "folder": _load_image_folder,  # CLASS/IMAGE files, or train/ and test/ with CLASS/ inside
    "idx": _arrays(_load_idx),     # MNIST-layout IDX files, gzipped or not
    "cifar": _arrays(_load_cifar_batches),  # CIFAR-10/100 python batches
    "npz": _arrays(_load_npz),     # x_train, y_train, x_test, y_test
}


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded, stratified subset of ``n`` rows (all rows if n >= len)."""
    from sklearn.model_selection import train_test_split

    if n < 1:
        raise PipelineError(f"--limit {n}: give a positive number of images per split")
    if n >= len(labels):
        return np.arange(len(labels))
    n_classes = len(np.unique(labels))
    if n < n_classes:
        raise PipelineError(f"--limit {n} is smaller than the {n_classes} classes; "
                            f"use at least {n_classes}")
    try:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels,
                                   random_state=seed)
    except ValueError:  # a class with a single member cannot be stratified
        keep = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    return np.sort(keep)


def _limit(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """N images per split; a given validation split (the train split's last rows) keeps N
    of its own, still last."""
    splits, validation = {}, dataset.validation
    for name, split in dataset.splits.items():
        if name == "train" and validation:
            n_fit = len(split) - validation
            fit = stratified_subset(split.labels[:n_fit], limit, seed)
            val = n_fit + stratified_subset(split.labels[n_fit:], limit, seed)
            keep, validation = np.concatenate([fit, val]), len(val)
        else:
            keep = stratified_subset(split.labels, limit, seed)
        splits[name] = _subset_split(split, keep)
    return Dataset(spec=dataset.spec, classes=dataset.classes, splits=splits,
                   skipped=dataset.skipped, validation=validation,
                   scan_index=dataset.scan_index, checked=dataset.checked)


def _subset_split(split: Split, keep: np.ndarray) -> Split:
    def digests() -> Iterator[bytes]:
        for lo in range(0, len(keep), 4096):
            yield hashlib.sha256(split.load(keep[lo:lo + 4096]).tobytes()).digest()

    ids = split.row_ids()
    return Split(labels=split.labels[keep], image_shape=split.image_shape,
                 load=lambda idx: split.load(keep[idx]), content_digests=digests,
                 ids=[ids[i] for i in keep])
