"""Shared fixtures: tiny synthetic datasets and feature files, and the offline assets in ../shared.

Keras reads KERAS_HOME when it is first imported, so a writable copy of ../shared/keras is
set up here, before any test imports it (unless KERAS_HOME is already set, as `make` does).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

if not os.environ.get("KERAS_HOME") and (SHARED / "keras" / "models").is_dir():
    _home = Path(tempfile.mkdtemp(prefix="keras-home-"))
    shutil.copytree(SHARED / "keras", _home, dirs_exist_ok=True)
    for p in [_home, *_home.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    os.environ["KERAS_HOME"] = str(_home)


def require(path: Path, why: str) -> Path:
    """Skip (or, in CI, fail) when an offline asset is missing, saying where it comes from."""
    if path.exists():
        return path
    message = f"{path} is missing: {why}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def shared_weights() -> Path:
    return require(Path(os.environ.get("KERAS_HOME", "")) / "models",
                   "the real ImageNet weights come from ../shared/keras (see ../shared/README.md)")


@pytest.fixture
def cifar_mini() -> Path:
    return require(SHARED / "data" / "cifar10-mini",
                   "the CIFAR-10 image folder comes from ../shared/data (see ../shared/README.md)")


@pytest.fixture
def fashion_mnist_dir() -> Path:
    return require(FASHION_MNIST_DIR, "install Debian's dataset-fashion-mnist package "
                   "(.ci/run does: apt-get install dataset-fashion-mnist)")


def make_images(n: int, size: int = 16, channels: int | None = 3, n_classes: int = 3, seed: int = 0):
    """Images whose mean brightness depends on the class, so classes are learnable."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    shape = (n, size, size) + ((channels,) if channels else ())
    base = (y * (200 // max(n_classes - 1, 1))).reshape((n,) + (1,) * (len(shape) - 1))
    x = np.clip(base + rng.integers(0, 50, shape), 0, 255).astype(np.uint8)
    return x, y


def write_npz_dataset(path: Path, n_train: int, n_test: int) -> str:
    """A three-class .npz dataset of learnable images; returns its ``npz:`` spec."""
    x_train, y_train = make_images(n_train, seed=1)
    x_test, y_test = make_images(n_test, seed=2)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             classes=np.array(["dark", "mid", "bright"]))
    return f"npz:{path}"


def write_image_folder_split(folder: Path, per_class: int, seed: int) -> None:
    """``folder/<class>/<i>.png`` for the three classes of ``make_images``."""
    from PIL import Image

    x, y = make_images(3 * per_class, seed=seed)
    for i, (image, label) in enumerate(zip(x, y)):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"c{label}" / f"{i}.png")


@pytest.fixture
def npz_dataset(tmp_path) -> str:
    return write_npz_dataset(tmp_path / "tiny.npz", 48, 24)


def write_feature_file(cache_dir: Path, X_train, y_train, X_test, y_test, classes=None,
                       parts: dict | None = None) -> Path:
    """A complete feature file written through the real store (shards, then publish)."""
    from pipeline.store import FeatureStore, cache_key

    store = FeatureStore(cache_dir)
    parts = parts or {"dataset": "synthetic", "backbone": "none", "mode": "avg",
                      "n": len(y_train), "d": list(X_train.shape[1:]),
                      "seed": float(np.asarray(X_train).ravel()[0])}
    shards, key = store.shards_for(parts), cache_key(parts)
    for split, X in (("train", X_train), ("test", X_test)):
        for lo in range(0, len(X), 100):
            shards.write(split, lo, np.asarray(X[lo:lo + 100]), key=key, attrs={}, compression="none")
    classes = classes or [f"c{i}" for i in range(int(max(y_train.max(), y_test.max())) + 1)]
    return store.publish(shards, parts, classes=classes,
                         labels={"train": np.asarray(y_train), "test": np.asarray(y_test)},
                         attrs={"provenance": {"feature_shape": list(X_train.shape[1:])}})


@pytest.fixture
def blobs_file(tmp_path) -> Path:
    """600/300 rows of 20-d features in 3 well-separated classes."""
    from sklearn.datasets import make_blobs

    X, y = make_blobs(900, n_features=20, centers=3, cluster_std=3.0, random_state=0)
    X = X.astype(np.float32)
    return write_feature_file(tmp_path / "cache", X[:600], y[:600], X[600:], y[600:])


# ----------------------------------------------------------------------------- reliability figures

LEDGER: Counter = Counter()  # what the fault tests did, printed at the end of the run


def audit_cache(folder: Path) -> None:
    """Fully check every published file in ``folder``; a fault must never leave a bad one."""
    from pipeline.store import check_file

    for path in Path(folder).glob("*.h5"):
        problem = check_file(path, full=True)
        assert problem is None, f"{path.name}: {problem}"
        LEDGER["cache files audited"] += 1  # counted once it passed the full check


def pytest_terminal_summary(terminalreporter):
    passed = terminalreporter.stats.get("passed", [])
    faults = sum("reliability" in r.keywords for r in passed)
    bad = sum("bad_input" in r.keywords for r in passed)
    if not (faults or bad or LEDGER):
        return
    terminalreporter.write_sep("=", "reliability figures")
    terminalreporter.write_line(f"fault scenarios passed:           {faults}")
    terminalreporter.write_line(f"interrupted runs (kill -9, crash, full disk): {LEDGER['interrupted']}")
    terminalreporter.write_line(f"interrupted runs resumed to done: {LEDGER['resumed']}")
    terminalreporter.write_line(f"bit-identical to uninterrupted:   {LEDGER['bit-identical']}")
    terminalreporter.write_line(f"bad-input tests passed (a one-line error raised): {bad}")
    terminalreporter.write_line("  of which through the command line (exit 2, one stderr line, "
                                f"cache and results unchanged): {LEDGER['bad input end to end']}")
    terminalreporter.write_line("cache files fully re-checked after faults, all sound: "
                                f"{LEDGER['cache files audited']}")


def h5dump_features(path: Path, split: str, out_dir: Path) -> np.ndarray:
    """``split/features`` as the HDF5 library's own ``h5dump`` reads it (no h5py, no plugins):
    raw little-endian values, flat. Debian's hdf5-tools; .ci/run installs it."""
    import subprocess

    h5dump = require(Path(shutil.which("h5dump") or "/usr/bin/h5dump"),
                     "install Debian's hdf5-tools (.ci/run does: apt-get install hdf5-tools)")
    out = out_dir / f"{path.stem}-{split}.bin"
    proc = subprocess.run([str(h5dump), "-d", f"/{split}/features", "-b", "LE", "-o", str(out),
                           str(path)], capture_output=True, text=True, cwd=out_dir)
    assert proc.returncode == 0 and "error" not in proc.stderr, proc.stderr
    import h5py

    with h5py.File(path, "r") as f:
        dtype = f[f"{split}/features"].dtype
    return np.fromfile(out, dtype=dtype.newbyteorder("<"))


@pytest.fixture
def cifar_full() -> Path:
    return require(SHARED / "data" / "cifar10",
                   "the 52,000-image CIFAR-10 folder comes from ../shared/data (see ../shared/README.md)")
