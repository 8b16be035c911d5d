import gzip
import os
import pickle
import struct
import time

import numpy as np
import pytest
from conftest import make_images, write_image_folder_split
from PIL import Image

from pipeline.datasets import load_dataset, stratified_subset
from pipeline.errors import PipelineError


def _batches(split, size=7):
    return np.concatenate(list(split.batches(size)))


def test_npz_serves_uint8_rgb_batches_labels_and_classes(npz_dataset):
    ds = load_dataset(npz_dataset)
    assert ds.classes == ["dark", "mid", "bright"]
    assert len(ds.splits["train"]) == 48 and len(ds.splits["test"]) == 24
    x = _batches(ds.splits["train"])
    assert x.dtype == np.uint8 and x.shape == (48, 16, 16, 3)
    assert list(np.bincount(ds.splits["train"].labels)) == [16, 16, 16]


def test_grey_images_are_repeated_into_three_channels(tmp_path):
    x, y = make_images(12, channels=None)
    np.savez(tmp_path / "g.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    batch = next(load_dataset(f"npz:{tmp_path / 'g.npz'}").splits["test"].batches(12))
    assert batch.shape == (12, 16, 16, 3)
    assert (batch[..., 0] == x).all() and (batch[..., 2] == x).all()


def test_fingerprint_is_stable_and_changes_with_one_pixel(tmp_path):
    x, y = make_images(12)
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    first = load_dataset(f"npz:{tmp_path / 'a.npz'}").fingerprint
    assert first == load_dataset(f"npz:{tmp_path / 'a.npz'}").fingerprint
    x[3, 2, 2, 1] ^= 1
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    assert load_dataset(f"npz:{tmp_path / 'a.npz'}").fingerprint != first


@pytest.mark.bad_input
@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": [0, 1]}, "lacks x_test, y_test"),
    ({"x_train": np.zeros((3, 4, 4), np.uint8), "y_train": [0, 1],
      "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": [0, 1]}, "3 images but 2 labels"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": [0, 5],
      "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": [0, 1], "classes": ["a", "b"]},
     "labels must be 0..1"),
    ({"x_train": np.full((2, 4, 4), 300.0), "y_train": [0, 1],
      "x_test": np.zeros((2, 4, 4)), "y_test": [0, 1]}, "give uint8"),
])
def test_bad_npz_gets_one_clear_line(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(PipelineError, match=message) as info:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    assert "\n" not in str(info.value) and "bad.npz" in str(info.value)


@pytest.mark.bad_input
def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(PipelineError, match="cifar10, cifar100, fashion_mnist, mnist.*folder:PATH"):
        load_dataset("imagenet22k")


@pytest.mark.bad_input
def test_missing_path_is_named(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def _write_idx(path, array, magic_dims, magic_type=0x08):
    header = bytes([0, 0, magic_type, magic_dims]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _idx_folder(folder, n=20):
    folder.mkdir()
    x, y = make_images(n, size=8, channels=None, n_classes=10)
    for prefix in ("train", "t10k"):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x, 3)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y, 1)
    return x, y


def test_idx_folder_reads_images_and_labels(tmp_path):
    x, y = _idx_folder(tmp_path / "digits")
    ds = load_dataset(f"idx:{tmp_path / 'digits'}")
    assert (ds.splits["train"].labels == y).all()
    assert (_batches(ds.splits["train"])[..., 1] == x).all()
    assert ds.classes == [str(i) for i in range(10)]


@pytest.mark.bad_input
def test_idx_with_wrong_magic_or_truncated_body_is_refused(tmp_path):
    x, y = _idx_folder(tmp_path / "d")
    _write_idx(tmp_path / "d" / "train-images-idx3-ubyte.gz", x, 3, magic_type=0x0D)
    with pytest.raises(PipelineError, match="magic number 00000d03"):
        load_dataset(f"idx:{tmp_path / 'd'}")
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 20, 8, 8)
    with gzip.open(tmp_path / "d" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + x.tobytes()[:-10])
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        load_dataset(f"idx:{tmp_path / 'd'}")


def test_rows_are_named_by_their_images_and_a_subset_keeps_their_names(tmp_path, npz_dataset):
    _idx_folder(tmp_path / "digits")
    idx = load_dataset(f"idx:{tmp_path / 'digits'}")
    assert idx.splits["train"].row_ids()[:2] == ["train-images-idx3-ubyte.gz:0",
                                                 "train-images-idx3-ubyte.gz:1"]
    assert idx.splits["test"].row_ids()[-1] == "t10k-images-idx3-ubyte.gz:19"
    npz = load_dataset(npz_dataset)
    assert npz.splits["test"].row_ids() == [str(i) for i in range(24)]
    few = load_dataset(npz_dataset, limit=6)
    kept = few.splits["train"].row_ids()
    assert len(kept) == 6 and kept != [str(i) for i in range(6)]  # the rows' own indices
    full = npz.splits["train"]
    assert (_batches(few.splits["train"]) == full.load(np.array([int(i) for i in kept]))).all()
    write_image_folder_split(tmp_path / "pics" / "train", 2, seed=0)
    write_image_folder_split(tmp_path / "pics" / "test", 1, seed=1)
    folder = load_dataset(f"folder:{tmp_path / 'pics'}")
    assert folder.splits["test"].row_ids() == ["test/c0/0.png", "test/c1/1.png", "test/c2/2.png"]


def test_original_images_are_found_again_by_their_row_ids(tmp_path, npz_dataset):
    from pipeline.datasets import original_images

    write_image_folder_split(tmp_path / "pics" / "train", 2, seed=0)
    write_image_folder_split(tmp_path / "pics" / "test", 1, seed=1)
    spec = f"folder:{tmp_path / 'pics'}"
    ds = load_dataset(spec)
    shown = original_images(spec, "test", ["test/c1/1.png", "test/gone.png"])
    assert (shown[0] == ds.splits["test"].load(np.array([1]))[0]).all() and shown[1] is None
    npz = load_dataset(npz_dataset)
    shown = original_images(npz_dataset, "test", ["5", "no-such-row"])
    assert (shown[0] == npz.splits["test"].load(np.array([5]))[0]).all() and shown[1] is None


def test_original_images_of_idx_rows_are_read_from_the_file_their_ids_name(tmp_path,
                                                                            monkeypatch):
    import pipeline.datasets as datasets_module
    from pipeline.datasets import original_images

    _idx_folder(tmp_path / "digits")
    spec = f"idx:{tmp_path / 'digits'}"
    test = load_dataset(spec).splits["test"]
    read, reader = [], datasets_module._read_idx
    monkeypatch.setattr(datasets_module, "_read_idx",
                        lambda spec, path, dims: read.append(path.name) or reader(spec, path, dims))
    ids = ["t10k-images-idx3-ubyte.gz:3", "t10k-images-idx3-ubyte.gz:0", "t10k-images-idx3-ubyte.gz:99",
           "../digits/t10k-images-idx3-ubyte.gz:1", "gone.gz:1"]
    shown = original_images(spec, "test", ids)
    assert (shown[0] == test.load(np.array([3]))[0]).all()
    assert (shown[1] == test.load(np.array([0]))[0]).all()
    assert shown[2:] == [None, None, None]  # no such row; not a file of the folder; gone
    assert read == ["t10k-images-idx3-ubyte.gz"]  # once, and nothing else


def test_cifar_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 10), ("data_batch_2", 6), ("test_batch", 4)):
        data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"labels": list(np.arange(n) % 2)}
        (folder / name).write_bytes(pickle.dumps(data))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat", b"dog"]}))
    ds = load_dataset(f"cifar:{folder}")
    assert ds.classes == ["cat", "dog"] and len(ds.splits["train"]) == 16
    first = pickle.loads((folder / "data_batch_1").read_bytes())[b"data"][0]
    assert (_batches(ds.splits["train"])[0] == first.reshape(3, 32, 32).transpose(1, 2, 0)).all()
    ids = ds.splits["train"].row_ids()
    assert ids[0] == "data_batch_1:0" and ids[10] == "data_batch_2:0" and ids[-1] == "data_batch_2:5"
    assert ds.splits["test"].row_ids()[3] == "test_batch:3"


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def test_image_folder_normalises_modes_and_sizes(tmp_path):
    root = tmp_path / "imgs"
    rgb = np.full((10, 12, 3), 200, np.uint8)
    for i in range(3):
        _save(root / "train" / "a" / f"{i}.png", rgb)
        _save(root / "test" / "a" / f"{i}.png", rgb)
        _save(root / "test" / "b" / f"{i}.png", rgb)
    _save(root / "train" / "b" / "grey.png", np.full((10, 12), 100, np.uint8))
    Image.fromarray(np.full((10, 12, 4), 50, np.uint8), "RGBA").save(root / "train" / "b" / "rgba.png")
    Image.fromarray(np.full((10, 12), 3, np.uint8)).convert("P").save(root / "train" / "b" / "pal.png")
    Image.fromarray(np.full((10, 12), 40000, np.uint16)).save(root / "train" / "b" / "deep.png")
    _save(root / "train" / "b" / "big.jpg", np.full((30, 40, 3), 10, np.uint8))
    ds = load_dataset(f"folder:{root}")
    assert ds.classes == ["a", "b"]
    x = _batches(ds.splits["train"])
    assert x.shape == (8, 10, 12, 3) and x.dtype == np.uint8  # the most common size wins
    by_name = dict(zip(["0", "1", "2", "big", "deep", "grey", "pal", "rgba"], x))
    assert (by_name["grey"] == 100).all()
    assert (by_name["deep"] == 40000 >> 8).all()  # 16-bit scaled, not clipped to 255
    assert abs(int(by_name["big"].mean()) - 10) <= 2
    # RGBA (50, 50, 50) at alpha 50/255 over white: 50 * a + 255 * (1 - a) = 214.8
    assert np.abs(by_name["rgba"].astype(int) - 215).max() <= 1
    assert (by_name["pal"] == 3).all()  # a palette image becomes its colours


@pytest.mark.bad_input
def test_corrupt_image_is_named_or_skipped_and_recorded(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(2):
                _save(root / split / c / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "train" / "b" / "empty.png").write_bytes(b"")
    with pytest.raises(PipelineError, match="broken.jpg.*and 1 more.*--skip-bad"):
        load_dataset(f"folder:{root}")
    ds = load_dataset(f"folder:{root}", skip_bad=True)
    assert len(ds.splits["train"]) == 4
    assert any("broken.jpg" in s for s in ds.skipped) and any("empty.png" in s for s in ds.skipped)


@pytest.mark.bad_input
def test_image_folder_with_one_class_or_test_only_class_is_refused(tmp_path):
    _save(tmp_path / "one" / "only" / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(PipelineError, match="at least two"):
        load_dataset(f"folder:{tmp_path / 'one'}")
    for split, cls in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "c")):
        _save(tmp_path / "two" / split / cls / "0.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(PipelineError, match="class\\(es\\) c have test images but no training"):
        load_dataset(f"folder:{tmp_path / 'two'}")


def test_tree_without_splits_gets_a_seeded_stratified_split(tmp_path):
    for c in ("a", "b"):
        for i in range(10):
            _save(tmp_path / "flat" / c / f"{i}.png", np.full((8, 8, 3), i * 20, np.uint8))
    first = load_dataset(f"folder:{tmp_path / 'flat'}")
    again = load_dataset(f"folder:{tmp_path / 'flat'}")
    assert len(first.splits["test"]) == 4 and list(np.bincount(first.splits["test"].labels)) == [2, 2]
    assert first.fingerprint == again.fingerprint


def test_limit_keeps_n_per_split_stratified(npz_dataset):
    ds = load_dataset(npz_dataset, limit=12)
    assert len(ds.splits["train"]) == 12 and len(ds.splits["test"]) == 12
    assert list(np.bincount(ds.splits["train"].labels)) == [4, 4, 4]
    assert ds.fingerprint != load_dataset(npz_dataset).fingerprint
    with pytest.raises(PipelineError, match="smaller than the 3 classes"):
        stratified_subset(ds.splits["train"].labels, 2)


@pytest.mark.slow
def test_real_cifar10_image_folder(cifar_mini):
    ds = load_dataset(f"folder:{cifar_mini}")
    assert len(ds.classes) == 10 and "airplane" in ds.classes
    assert len(ds.splits["train"]) == 1000 and len(ds.splits["test"]) == 500
    assert next(ds.splits["test"].batches(5)).shape == (5, 32, 32, 3)


@pytest.mark.slow
def test_real_fashion_mnist_idx_from_debian(fashion_mnist_dir):
    ds = load_dataset(f"idx:{fashion_mnist_dir}")
    assert len(ds.splits["train"]) == 60000 and len(ds.splits["test"]) == 10000
    assert ds.classes[0] == "t-shirt_top"
    assert list(np.bincount(ds.splits["test"].labels)) == [1000] * 10


@pytest.mark.slow
def test_keras_datasets_fashion_mnist_offline_via_keras_home(fashion_mnist_dir, shared_weights):
    import os
    import shutil
    from pathlib import Path

    target = Path(os.environ["KERAS_HOME"]) / "datasets" / "fashion-mnist"
    target.mkdir(parents=True, exist_ok=True)
    for f in fashion_mnist_dir.glob("*.gz"):
        shutil.copy(f, target / f.name)
    ds = load_dataset("fashion_mnist", limit=100)
    assert len(ds.splits["train"]) == 100 and ds.classes[-1] == "ankle_boot"


@pytest.mark.bad_input
def test_an_image_changed_or_removed_after_the_scan_is_an_error_not_other_features(tmp_path):
    root = tmp_path / "imgs"
    for label in ("a", "b"):
        for i in range(4):
            _save(root / label / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    ds = load_dataset(f"folder:{root}")
    split = ds.splits["train"]
    assert split.load(np.arange(len(split))).shape[0] == len(split)
    first = sorted(root.rglob("*.png"))[0]
    _save(first, np.full((8, 8, 3), 255, np.uint8))
    with pytest.raises(PipelineError, match="changed after the dataset was scanned"):
        np.concatenate([ds.splits[s].load(np.arange(len(ds.splits[s]))) for s in ("train", "test")])
    first.unlink()
    with pytest.raises(PipelineError, match="cannot be read any more"):
        np.concatenate([ds.splits[s].load(np.arange(len(ds.splits[s]))) for s in ("train", "test")])


def test_an_empty_class_folder_is_dropped_with_a_warning_naming_it(tmp_path, caplog):
    for split in ("train", "test"):
        for c in ("a", "b"):
            value = ord(c) + 100 * (split == "test")  # no test image repeats a training one
            _save(tmp_path / "d" / split / c / "0.png", np.full((8, 8, 3), value, np.uint8))
            _save(tmp_path / "d" / split / c / "1.png", np.full((8, 8, 3), value + 50, np.uint8))
        (tmp_path / "d" / split / "ghost").mkdir()
    with caplog.at_level("WARNING", logger="pipeline"):
        ds = load_dataset(f"folder:{tmp_path / 'd'}")
    assert ds.classes == ["a", "b"]
    assert caplog.messages == [f"dataset 'folder:{tmp_path / 'd'}': class folder(s) ghost hold no "
                               "images; ignored"]


def test_test_images_identical_to_training_images_are_reported(tmp_path, caplog):
    for split in ("train", "test"):
        for i, c in enumerate(("a", "b")):
            _save(tmp_path / "d" / split / c / "0.png", np.full((8, 8, 3), i * 9, np.uint8))
            _save(tmp_path / "d" / "train" / c / "1.png", np.full((8, 8, 3), 50 + i, np.uint8))
    _save(tmp_path / "d" / "test" / "a" / "1.png", np.full((8, 8, 3), 200, np.uint8))
    with caplog.at_level("WARNING", logger="pipeline"):
        load_dataset(f"folder:{tmp_path / 'd'}")
    [message] = caplog.messages
    assert "2 test image(s) are byte-identical to training images" in message


@pytest.mark.bad_input
def test_a_huge_image_gets_one_line_and_is_decoded_without_full_size_copies(tmp_path):
    import subprocess
    import sys

    for split in ("train", "test"):
        for c in ("a", "b"):
            value = ord(c) + 100 * (split == "test")
            _save(tmp_path / "d" / split / c / "0.png", np.full((32, 32, 3), value, np.uint8))
    _save(tmp_path / "d" / "train" / "b" / "1.png", np.full((32, 32, 3), 7, np.uint8))
    side = 12000  # 144 MP: over PIL's 89 MP warning threshold; 432 MB as RGB
    Image.new("RGB", (side, side), (0, 90, 180)).save(tmp_path / "d" / "train" / "a" / "huge.png")
    code = (
        "import logging, warnings\n"
        "warnings.simplefilter('error')\n"  # any raw warning would fail the load
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from pipeline.datasets import load_dataset\n"
        f"ds = load_dataset('folder:{tmp_path / 'd'}')\n"
        "x = next(ds.splits['train'].batches(8))\n"
        "assert x.shape == (4, 32, 32, 3), x.shape\n"
        # VmHWM: this process's own peak (ru_maxrss would include the forking test runner's)
        "with open('/proc/self/status') as f:\n"
        "    hwm = next(line for line in f if line.startswith('VmHWM'))\n"
        "print(int(x[1].mean()), int(hwm.split()[1]) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"{tmp_path / 'd' / 'train' / 'a' / 'huge.png'} is 12000x12000 (144 MP): decoded at reduced size"]
    mean, peak_mib = (int(v) for v in proc.stdout.split())
    assert mean == 90  # (0 + 90 + 180) / 3: the huge image's colour survives the reduction
    assert peak_mib < 1000  # the raw decode is 432 MiB; the old path held ~2.3 GB


@pytest.mark.bad_input
def test_keras_download_failure_names_the_offline_route(monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on https://example.org: None -- Name or service not known")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(PipelineError, match="make all CONFIG=experiments/offline.toml") as info:
        load_dataset("mnist")
    assert "\n" not in str(info.value)


@pytest.mark.bad_input
def test_limit_must_be_positive(npz_dataset):
    for bad in (0, -5):
        with pytest.raises(PipelineError, match=f"--limit {bad}: give a positive number"):
            load_dataset(npz_dataset, limit=bad)


# ----------------------------------------------------------------------------- the scan index

def _scanned(monkeypatch):
    """Record which files the scan reads (hash + decode check)."""
    from pipeline import datasets

    read = []
    real = datasets._scan_file

    def counting(item):
        read.append(item.path.name)
        return real(item)

    monkeypatch.setattr(datasets, "_scan_file", counting)
    return read


def _tree(root, n=3, age_s=60):
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(n):
                path = root / split / c / f"{i}.png"
                _save(path, np.full((8, 8, 3), ord(c) + 10 * i + 100 * (split == "test"), np.uint8))
                past = time.time() - age_s  # older than the racy window
                os.utime(path, (past, past))
    return f"folder:{root}"


def test_a_rerun_reads_only_new_or_changed_files(tmp_path, monkeypatch):
    spec, index = _tree(tmp_path / "d"), tmp_path / "cache" / ".scan"
    read = _scanned(monkeypatch)
    first = load_dataset(spec, scan_index=index)
    assert len(read) == 12 and len(list(index.iterdir())) == 1
    read.clear()
    again = load_dataset(spec, scan_index=index)
    assert read == [] and again.fingerprint == first.fingerprint
    _save(tmp_path / "d" / "train" / "a" / "1.png", np.full((8, 8, 3), 250, np.uint8))  # changed
    (tmp_path / "d" / "test" / "b" / "2.png").unlink()                                 # deleted
    _save(tmp_path / "d" / "train" / "b" / "9.png", np.full((8, 8, 3), 7, np.uint8))    # added
    changed = load_dataset(spec, scan_index=index)
    assert sorted(read) == ["1.png", "9.png"]
    assert changed.fingerprint != first.fingerprint
    assert changed.fingerprint == load_dataset(spec).fingerprint  # what a full read gives
    read.clear()
    load_dataset(spec, scan_index=index, rescan=True)
    assert len(read) == 12


def test_a_file_changed_within_the_timestamp_tick_of_its_scan_is_read_again(tmp_path, monkeypatch):
    spec, index = _tree(tmp_path / "d"), tmp_path / ".scan"
    fresh = tmp_path / "d" / "train" / "a" / "0.png"
    os.utime(fresh)  # modified now: racily clean, as git calls it
    read = _scanned(monkeypatch)
    load_dataset(spec, scan_index=index)
    read.clear()
    load_dataset(spec, scan_index=index)
    assert read == ["0.png"]  # the others are older than the window and trusted


def test_a_damaged_scan_index_is_rebuilt_never_trusted(tmp_path, monkeypatch, caplog):
    spec, index = _tree(tmp_path / "d"), tmp_path / ".scan"
    truth = load_dataset(spec, scan_index=index).fingerprint
    [path] = index.iterdir()
    data = bytearray(path.read_bytes())
    at = data.index(b"0.png")  # a name in the names column: the file still opens
    data[at:at + 5] = b"0.pnG"
    path.write_bytes(bytes(data))
    read = _scanned(monkeypatch)
    with caplog.at_level("WARNING", logger="pipeline"):
        assert load_dataset(spec, scan_index=index).fingerprint == truth
    assert len(read) == 12 and "is damaged" in caplog.messages[0]
    read.clear()
    load_dataset(spec, scan_index=index)
    assert read == []  # rewritten whole and sound


def test_the_scan_index_gives_back_every_entry_as_written(tmp_path):
    from pipeline.datasets import ScanIndex

    names = ["train/a/0.png", "train/ü/ß é.jpg", "odd\nname.png", os.fsdecode(b"raw\xff.png")]
    entries = {name: [100 + i, 10**18 + i, 2**63 + i, 5 + i, (bytes([i]) * 32).hex(),
                      [3 * i, 4 * i], "broken" if i == 2 else "", i % 2 == 1, 7 * i]
               for i, name in enumerate(names)}
    index = ScanIndex(tmp_path, tmp_path / "root")
    index.new, index.changed = {k: list(v) for k, v in entries.items()}, True
    index.save()
    (tmp_path / f"{index.path.stem}.json").write_text("{}")  # version 2's: removed on save
    index.save()
    again = ScanIndex(tmp_path, tmp_path / "root")
    assert {name: again.old.get(name) for name in names} == entries
    assert sorted(again.old.keys()) == sorted(names) and again.old.get("missing") is None
    assert [p.suffix for p in tmp_path.iterdir() if p.is_file()] == [".npz"]


def test_a_truncated_scan_index_is_rebuilt(tmp_path, monkeypatch, caplog):
    spec, index = _tree(tmp_path / "d"), tmp_path / ".scan"
    truth = load_dataset(spec, scan_index=index).fingerprint
    [path] = index.iterdir()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    read = _scanned(monkeypatch)
    with caplog.at_level("WARNING", logger="pipeline"):
        assert load_dataset(spec, scan_index=index).fingerprint == truth
    assert len(read) == 12 and "is damaged" in caplog.text


def test_an_index_of_the_json_version_is_replaced_after_one_full_scan(tmp_path, monkeypatch, caplog):
    spec, index = _tree(tmp_path / "d"), tmp_path / ".scan"
    load_dataset(spec, scan_index=index)
    [path] = index.iterdir()
    path.unlink()
    path.with_suffix(".json").write_text('{"version": 2}')  # what an earlier release wrote
    read = _scanned(monkeypatch)
    with caplog.at_level("INFO", logger="pipeline"):
        load_dataset(spec, scan_index=index)
    assert len(read) == 12 and "earlier version of this program (JSON)" in caplog.text
    assert [p.suffix for p in index.iterdir()] == [".npz"]


def test_decode_failures_are_remembered_too(tmp_path, monkeypatch):
    spec, index = _tree(tmp_path / "d"), tmp_path / ".scan"
    broken = tmp_path / "d" / "train" / "a" / "broken.png"
    broken.write_bytes(b"not an image")
    os.utime(broken, (time.time() - 60,) * 2)
    assert len(load_dataset(spec, scan_index=index, skip_bad=True).skipped) == 1
    read = _scanned(monkeypatch)
    with pytest.raises(PipelineError, match="broken.png"):
        load_dataset(spec, scan_index=index)
    assert read == []


# ----------------------------------------------------------------------------- real-world folders

def _classes_folder(root, classes=("cat", "dog"), n=3, offset=0):
    for i, c in enumerate(classes):
        for j in range(n):
            _save(root / c / f"{j}.png", np.full((8, 8, 3), offset + 40 * i + j, np.uint8))


def test_a_val_folder_is_the_validation_split_kept_as_the_last_training_rows(tmp_path):
    _classes_folder(tmp_path / "d" / "train", n=4)
    _classes_folder(tmp_path / "d" / "val", n=2, offset=100)
    _classes_folder(tmp_path / "d" / "test", n=3, offset=200)
    ds = load_dataset(f"folder:{tmp_path / 'd'}")
    assert ds.classes == ["cat", "dog"] and ds.validation == 4
    train = ds.splits["train"]
    assert len(train) == 12 and list(train.labels[-4:]) == [0, 0, 1, 1]
    assert _batches(train)[-4:, 0, 0, 0].tolist() == [100, 101, 140, 141]  # val/'s own images
    assert len(ds.splits["test"]) == 6
    limited = load_dataset(f"folder:{tmp_path / 'd'}", limit=2)  # N of each, val still last
    assert limited.validation == 2 and _batches(limited.splits["train"])[-2:, 0, 0, 0].min() >= 100


def test_train_and_val_without_test_holds_out_a_test_split_from_train(tmp_path, caplog):
    _classes_folder(tmp_path / "d" / "Train", n=10)
    _classes_folder(tmp_path / "d" / "valid", n=2, offset=100)
    with caplog.at_level("INFO", logger="pipeline"):
        ds = load_dataset(f"folder:{tmp_path / 'd'}", test_fraction=0.2)
    assert ds.classes == ["cat", "dog"]  # never "Train" and "valid"
    assert len(ds.splits["test"]) == 4 and ds.validation == 4 and len(ds.splits["train"]) == 20
    assert _batches(ds.splits["test"])[:, 0, 0, 0].max() < 100  # held out of train/, not val/
    assert any("no test/ folder" in m for m in caplog.messages)


def test_a_lone_train_folder_is_a_split_not_a_class(tmp_path):
    _classes_folder(tmp_path / "d" / "train", n=5)
    ds = load_dataset(f"folder:{tmp_path / 'd'}")
    assert ds.classes == ["cat", "dog"] and len(ds.splits["test"]) == 2 and ds.validation == 0


@pytest.mark.bad_input
@pytest.mark.parametrize("folders, message", [
    (("train", "test", "cat"), "holds split folders \\(test, train\\) beside other folders \\(cat\\)"),
    (("train", "val", "dev"), "dev/ and val/ are both a val split; keep one"),
    (("test", "val"), "but no train/ folder"),
])
def test_ambiguous_split_layouts_are_refused(tmp_path, folders, message):
    for name in folders:
        _classes_folder(tmp_path / "d" / name)
    with pytest.raises(PipelineError, match=message):
        load_dataset(f"folder:{tmp_path / 'd'}")


@pytest.mark.bad_input
def test_a_link_loop_inside_a_class_is_read_once_with_a_warning(tmp_path, caplog):
    _classes_folder(tmp_path / "d", n=3)
    os.symlink("..", tmp_path / "d" / "cat" / "loop")
    with caplog.at_level("WARNING", logger="pipeline"):
        ds = load_dataset(f"folder:{tmp_path / 'd'}", test_fraction=1 / 3)
    assert len(ds.splits["train"]) + len(ds.splits["test"]) == 6
    assert any("loop" in m and "already read or above it" in m for m in caplog.messages)


@pytest.mark.bad_input
def test_one_file_under_two_classes_is_an_error_naming_both_paths(tmp_path):
    _classes_folder(tmp_path / "d", n=3)
    os.symlink(tmp_path / "d" / "cat" / "0.png", tmp_path / "d" / "dog" / "x.png")
    with pytest.raises(PipelineError, match=r"the same file is labelled cat as .*cat/0.png and dog "
                                            r"as .*dog/x.png.*--skip-bad"):
        load_dataset(f"folder:{tmp_path / 'd'}")
    ds = load_dataset(f"folder:{tmp_path / 'd'}", skip_bad=True, test_fraction=0.4)
    assert len(ds.splits["train"]) + len(ds.splits["test"]) == 5  # both copies dropped
    assert sum("under two classes" in s for s in ds.skipped) == 2


def test_a_file_reached_twice_in_one_class_counts_once(tmp_path, caplog):
    _classes_folder(tmp_path / "d", n=3)
    (tmp_path / "d" / "cat" / "sub").mkdir()
    os.symlink(tmp_path / "d" / "cat" / "0.png", tmp_path / "d" / "cat" / "sub" / "again.png")
    with caplog.at_level("WARNING", logger="pipeline"):
        ds = load_dataset(f"folder:{tmp_path / 'd'}", test_fraction=1 / 3)
    assert len(ds.splits["train"]) + len(ds.splits["test"]) == 6
    assert any("reached a second time" in m for m in caplog.messages)


def test_byte_identical_images_under_two_classes_are_called_a_label_conflict(tmp_path, caplog):
    _classes_folder(tmp_path / "d", n=3)
    (tmp_path / "d" / "dog" / "copy.png").write_bytes((tmp_path / "d" / "cat" / "1.png").read_bytes())
    with caplog.at_level("WARNING", logger="pipeline"):
        load_dataset(f"folder:{tmp_path / 'd'}", test_fraction=3 / 7)
    assert any("label conflict" in m and "cat/1.png is cat" in m for m in caplog.messages)


def test_exif_orientation_turns_photos_upright_and_keys_them_apart(tmp_path):
    tall = np.zeros((6, 4, 3), np.uint8)
    tall[0] = 255  # a white top row, as the camera holder saw it
    stored = np.rot90(tall, k=1)  # as a sensor held sideways stores it (4 high, 6 wide)
    for c in ("a", "b"):
        for j in range(2):
            for split in ("train", "test"):
                _save(tmp_path / "d" / split / c / f"{j}.png", np.full((6, 4, 3), j, np.uint8))
    photo = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    plain = tmp_path / "d" / "train" / "a" / "2.jpg"
    photo.save(plain, quality=100)
    before = load_dataset(f"folder:{tmp_path / 'd'}").fingerprint
    photo.save(plain, quality=100, exif=exif)
    ds = load_dataset(f"folder:{tmp_path / 'd'}")
    upright = _batches(ds.splits["train"])[2]
    assert upright.shape == (6, 4, 3)
    assert upright[0].mean() > 200 and upright[-1].mean() < 50  # the white row on top
    assert ds.fingerprint != before


# ----------------------------------------------------------------------------- untrusted arrays

def _npz(path, y_train=(0, 1, 0, 1), y_test=(0, 1), **more):
    x = np.zeros((len(y_train), 4, 4, 3), np.uint8)
    np.savez(path, x_train=x, y_train=np.array(y_train), x_test=x[:len(y_test)],
             y_test=np.array(y_test), **more)
    return f"npz:{path}"


def test_npz_labels_1_to_k_without_names_make_k_classes(tmp_path):
    ds = load_dataset(_npz(tmp_path / "a.npz", (1, 2, 3, 1), (3, 2)))
    assert ds.classes == ["1", "2", "3"]  # no phantom class 0
    assert ds.splits["train"].labels.tolist() == [0, 1, 2, 0] and ds.splits["test"].labels.tolist() == [2, 1]


def test_npz_string_labels_are_class_names(tmp_path):
    ds = load_dataset(_npz(tmp_path / "a.npz", ("dog", "cat", "dog", "cat"), ("cat", "dog")))
    assert ds.classes == ["cat", "dog"] and ds.splits["train"].labels.tolist() == [1, 0, 1, 0]
    named = load_dataset(_npz(tmp_path / "b.npz", ("dog", "cat", "dog", "cat"), ("cat", "dog"),
                              classes=np.array(["dog", "cat"])))
    assert named.classes == ["dog", "cat"] and named.splits["test"].labels.tolist() == [1, 0]


@pytest.mark.bad_input
@pytest.mark.parametrize("make, message", [
    (lambda p: _npz(p, (0, 1, 0, 1), (0, 2), classes=np.array(["a", "b", "c"])),
     "class\\(es\\) c have test rows but no training rows"),
    (lambda p: _npz(p, (1, 2, 1, 2), (1, 3)), "label\\(s\\) 3 appear in the test labels but not"),
    (lambda p: _npz(p, ("a", "b", "a", "b"), ("a", "z"), classes=np.array(["a", "b"])),
     "label\\(s\\) 'z' are not among the class names"),
    (lambda p: _npz(p, classes=np.array([{"a": 1}, "b"], dtype=object)),
     "classes is an object array \\(pickled\\); store it as numbers or fixed-width strings"),
    (lambda p: (np.save(p.with_suffix(".npy"), np.zeros((2, 4, 4, 3))), f"npz:{p.with_suffix('.npy')}")[1],
     "is a single .npy array, not an .npz archive"),
    (lambda p: _npz(p, ((1, 0), (0, 1), (1, 0), (0, 1)), ((1, 0), (0, 1))),
     "train labels have shape \\(4, 2\\) \\(one-hot\\?\\)"),
    (lambda p: _npz(p, (0.5, 1, 0, 1)), "labels are float64; give integer class indices"),
    (lambda p: _npz(p, (0, 1, 0, 1), (0, 1), classes=np.array([["a"], ["b"]])),
     "classes has shape \\(2, 1\\)"),
    (lambda p: _npz(p, (0, 1, 0, 1), (0, 1), classes=np.array(["a", "a"])), "classes repeat a name"),
    (lambda p: (p.write_bytes(b"PK\x03\x04 not really a zip"), f"npz:{p}")[1], "cannot read .* as .npz"),
])
def test_malformed_npz_files_get_one_line(tmp_path, make, message):
    spec = make(tmp_path / "bad.npz")
    with pytest.raises(PipelineError, match=message) as caught:
        load_dataset(spec)
    assert "\n" not in str(caught.value)


def _cifar_folder(root, keys=bytes, meta=None):
    root.mkdir()
    k = (lambda name: name.encode()) if keys is bytes else (lambda name: name)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        batch = {k("data"): rng.integers(0, 255, (4, 3072), dtype=np.uint8), k("labels"): [0, 1, 0, 1]}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps(meta or {k("label_names"): [k("cat"), k("dog")]}))
    return f"cifar:{root}"


def test_cifar_batches_pickled_with_str_keys_are_read(tmp_path):
    a = load_dataset(_cifar_folder(tmp_path / "bytes"))
    b = load_dataset(_cifar_folder(tmp_path / "str", keys=str))
    assert a.classes == b.classes == ["cat", "dog"] and a.fingerprint == b.fingerprint


class _Sneaky:
    """A pickle that runs a command when loaded: it would leave a file behind."""

    def __init__(self, witness):
        self.witness = witness

    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


@pytest.mark.bad_input
@pytest.mark.parametrize("hostile, message", [
    (False, "has no label_names list of class names"),
    (True, "it asks for (posix|os).system, which a CIFAR batch never holds"),
])
def test_malformed_or_hostile_cifar_batches_get_one_line(tmp_path, hostile, message):
    witness = tmp_path / "the-pickle-ran"
    meta = {b"label_names": _Sneaky(witness)} if hostile else {b"names": [b"cat"]}
    spec = _cifar_folder(tmp_path / "c", meta=meta)
    with pytest.raises(PipelineError, match=message):
        load_dataset(spec)
    assert not witness.exists()


def test_large_photos_are_served_near_the_network_input_small_images_as_stored(tmp_path):
    ramp = np.linspace(0, 255, 2000, dtype=np.float32)
    photo = np.stack([np.add.outer(ramp[:1500] / 2, ramp / 2)] * 3, -1).astype(np.uint8)
    for split in ("train", "test"):
        for c, shift in (("a", 0), ("b", 60)):
            (tmp_path / "big" / split / c).mkdir(parents=True)
            for i in range(2):
                image = np.clip(photo.astype(int) + shift + i, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(tmp_path / "big" / split / c / f"{i}.jpg", quality=95)
    full = load_dataset(f"folder:{tmp_path / 'big'}")
    small = load_dataset(f"folder:{tmp_path / 'big'}", fit=224)
    assert full.splits["train"].image_shape == (1500, 2000, 3)
    assert small.splits["train"].image_shape == (250, 333, 3)  # 1/6: still >= 224 both ways
    assert small.fingerprint != full.fingerprint  # other pixels, another key
    served = small.splits["train"].load(np.arange(1))[0].astype(float)
    expected = np.asarray(Image.fromarray(full.splits["train"].load(np.arange(1))[0]).resize(
        (333, 250), Image.Resampling.BOX), dtype=float)
    assert np.abs(served - expected).mean() < 3  # the same picture, decoded small
    cifar_like = tmp_path / "small"
    _classes_folder(cifar_like / "train", n=3)
    _classes_folder(cifar_like / "test", n=2, offset=100)
    a, b = load_dataset(f"folder:{cifar_like}"), load_dataset(f"folder:{cifar_like}", fit=224)
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(_batches(a.splits["train"]), _batches(b.splits["train"]))


def test_files_left_unread_are_counted_and_listed_with_verbose(tmp_path, caplog):
    _classes_folder(tmp_path / "d", n=3)
    (tmp_path / "d" / "cat" / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "gone.png", tmp_path / "d" / "dog" / "dangling.png")
    jfif = tmp_path / "d" / "dog" / "photo.jfif"
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(jfif, format="JPEG")
    with caplog.at_level("DEBUG", logger="pipeline"):
        ds = load_dataset(f"folder:{tmp_path / 'd'}", test_fraction=3 / 7)
    assert len(ds.splits["train"]) + len(ds.splits["test"]) == 7  # the .jfif is a JPEG: read
    text = "\n".join(caplog.messages)
    assert "cat: 1 file(s) not read" in text and "dog: 1 file(s) not read" in text
    assert "notes.txt" in text and "dangling.png (a broken link)" in text


@pytest.mark.bad_input
def test_a_folder_that_cannot_be_listed_is_an_error_not_skipped(tmp_path, monkeypatch):
    _classes_folder(tmp_path / "d", n=3)
    locked = tmp_path / "d" / "cat" / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (tests run as root)
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PipelineError, match="cannot list .*locked \\(Permission denied\\)"):
        load_dataset(f"folder:{tmp_path / 'd'}")


@pytest.mark.bad_input
def test_a_class_with_one_training_image_is_named_when_the_data_is_read(tmp_path, caplog):
    _classes_folder(tmp_path / "d" / "train", classes=("cat", "dog"), n=3)
    _save(tmp_path / "d" / "train" / "owl" / "0.png", np.full((8, 8, 3), 250, np.uint8))
    _classes_folder(tmp_path / "d" / "test", classes=("cat", "dog", "owl"), n=1, offset=100)
    with caplog.at_level("WARNING", logger="pipeline"):
        load_dataset(f"folder:{tmp_path / 'd'}")
    [message] = caplog.messages
    assert "class(es) owl (1) have fewer than 2 training images" in message


def test_files_read_and_checked_after_a_racy_scan_are_trusted_from_then_on(tmp_path, monkeypatch):
    """Files copied just before the scan are "racy" (a change could share their timestamp
    tick) and read again by the next scan, unless a later read checked their sha256 (what
    every extraction does) and the scan index recorded it: then they are trusted."""
    from pipeline import datasets

    monkeypatch.setattr(datasets.ScanIndex, "RACY_NS", 300_000_000)  # 0.3 s instead of 2 s
    spec, index = _tree(tmp_path / "d", age_s=0.1), tmp_path / "index"
    read = _scanned(monkeypatch)
    load_dataset(spec, scan_index=index)
    again = load_dataset(spec, scan_index=index)
    assert len(read) == 12 + 12  # racy: read again by the second scan (nothing recorded yet)
    time.sleep(0.4)
    for split in again.splits.values():  # as an extraction reads them, checking each sha256
        split.load(np.arange(len(split)))
    assert again.remember_checked() == 12
    read.clear()
    load_dataset(spec, scan_index=index)
    assert read == []
    path = tmp_path / "d" / "train" / "a" / "0.png"
    _save(path, np.zeros((8, 8, 3), np.uint8))  # a real change after that is still seen
    load_dataset(spec, scan_index=index)
    assert read == ["0.png"]
