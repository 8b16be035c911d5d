import json
import multiprocessing
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_feature_file

from pipeline.errors import PipelineError
from pipeline.store import FeatureFile, FeatureStore, check_file, chunk_rows


def _features(n=250, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % 3


def _file(tmp_path, seed=0):
    X, y = _features(seed=seed)
    return write_feature_file(tmp_path / "cache", X[:200], y[:200], X[200:], y[200:])


def test_published_file_holds_features_labels_classes_and_key(tmp_path):
    path = _file(tmp_path)
    assert check_file(path, full=True) is None
    with FeatureFile(path) as ff:
        X, _ = _features()
        assert np.array_equal(ff.features("train")[()], X[:200])
        assert ff.labels("test").shape == (50,)
        assert ff.classes == ["c0", "c1", "c2"]
        assert ff.key in path.name


@pytest.mark.parametrize("row_bytes", [4 * 64, 4 * 1280, 4 * 1568, 2 * 7 * 7 * 1280])
def test_chunks_hold_a_tenth_to_one_mib(row_bytes):
    size = chunk_rows(row_bytes) * row_bytes
    assert 0.1 * 2**20 <= size <= 2**20


def test_chunking_is_applied_and_vectors_stay_uncompressed_by_default(tmp_path):
    path = _file(tmp_path)
    with h5py.File(path) as f:
        assert f["train/features"].chunks[0] == 200  # whole split (smaller than one chunk)
        assert f["train/features"].compression is None and f["train/features"].fletcher32


@pytest.mark.bad_input
def test_truncated_zero_length_and_foreign_files_are_never_trusted(tmp_path):
    path = _file(tmp_path)
    data = path.read_bytes()
    truncated = path.with_name(path.name.replace(".h5", "") + ".h5")
    truncated.write_bytes(data[: len(data) // 2])
    assert "unreadable" in check_file(truncated)
    truncated.write_bytes(b"")
    assert "empty" in check_file(truncated)
    foreign = tmp_path / "cache" / "other-0123456789abcdef.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    assert "not a feature file" in check_file(foreign)
    with pytest.raises(PipelineError, match="cannot be used: not a feature file"):
        FeatureFile(foreign)


@pytest.mark.bad_input
def test_tampered_key_or_data_is_detected(tmp_path):
    path = _file(tmp_path)
    with h5py.File(path, "r+") as f:
        parts = json.loads(f.attrs["key_parts"])
        parts["backbone"] = "resnet50"
        f.attrs["key_parts"] = json.dumps(parts)
    assert "do not match the key" in check_file(path)

    other = _file(tmp_path / "b", seed=1)
    with h5py.File(other, "r+") as f:
        f["train/features"][0, 0] += 1.0
    assert check_file(other) is None  # the quick check reads metadata only ...
    assert "stored sha256" in check_file(other, full=True)  # ... verify re-hashes the rows


@pytest.mark.bad_input
def test_nan_features_are_refused_at_publish(tmp_path):
    X, y = _features()
    X[7, 3] = np.nan
    with pytest.raises(PipelineError, match="NaN or Inf in row 7"):
        write_feature_file(tmp_path, X[:200], y[:200], X[200:], y[200:])
    assert not list(tmp_path.glob("*.h5"))


def test_resume_covers_only_the_rows_no_complete_shard_holds(tmp_path):
    shards = FeatureStore(tmp_path).shards_for({"dataset": "d", "backbone": "b", "mode": "avg"})
    X, _ = _features(40)
    for lo, hi in ((0, 10), (10, 20), (25, 30)):
        shards.write("train", lo, X[lo:hi], key="k", attrs={})
    (shards.path / "train" / ".r0000000020-0000000025.h5.tmp-1").write_bytes(b"half")
    unfinished = shards.shard_path("train", 30, 35)
    unfinished.write_bytes(shards.shard_path("train", 25, 30).read_bytes()[:1000])  # cut short
    assert shards.missing("train", 40) == [(20, 25), (30, 40)]
    assert shards.rows_done("train") == 25 and shards.missing("test", 5) == [(0, 5)]
    assert [next(shards.read_split("train"))[i].tolist() for i in (0, 9)] == [X[0].tolist(), X[9].tolist()]


def _hold_lock(cache_dir, parts, seconds):
    with FeatureStore(cache_dir).lock(parts):
        time.sleep(seconds)


def test_a_second_writer_on_the_same_key_waits_or_says_who_holds_it(tmp_path, caplog):
    parts = {"dataset": "d", "backbone": "b", "mode": "avg"}
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock,
                                                          args=(tmp_path, parts, 1.5))
    holder.start()
    time.sleep(0.5)
    store = FeatureStore(tmp_path)
    with pytest.raises(PipelineError, match=f"being written by pid {holder.pid}"):
        with store.lock(parts, wait=False):
            pass
    t0 = time.monotonic()
    with caplog.at_level("INFO", logger="pipeline"), store.lock(parts):
        waited = time.monotonic() - t0
    holder.join()
    assert waited > 0.5 and "waiting for pid" in caplog.messages[0]
    assert not list((tmp_path / ".locks").iterdir())  # lock files go with their holders


def test_entries_report_complete_partial_and_corrupt_and_what_to_do_with_partial_work(tmp_path):
    good = _file(tmp_path)
    store = FeatureStore(tmp_path / "cache")
    bad = tmp_path / "cache" / "broken-00000000000000ff.h5"
    bad.write_bytes(b"garbage")
    store.shards_for({"dataset": "x", "backbone": "y", "mode": "avg"}).write(
        "train", 0, np.zeros((4, 2), np.float32), key="k", attrs={})
    (tmp_path / "cache" / "old-00000000000000aa.partial").mkdir()  # an older version's work
    states = {e.path.name: e.state for e in store.entries()}
    assert states[good.name] == "complete" and states[bad.name] == "corrupt"
    details = sorted(e.detail for e in store.entries() if e.state == "partial")
    assert len(details) == 2
    assert details[0].startswith("an older version's") and details[0].endswith("delete it")
    assert details[1] == "train 1 shard done, test 0 shards done; rerun its extract command to resume"
    moved = store.quarantine(bad)
    assert moved.exists() and not bad.exists()


def test_lock_files_go_with_their_holder_and_a_waiter_locks_the_file_that_is_there(tmp_path):
    import threading

    from pipeline.store import file_lock

    path = tmp_path / "x.lock"
    held, release, inodes = threading.Event(), threading.Event(), []

    def waiter():
        with file_lock(path):
            inodes.append(os.stat(path).st_ino)  # fails if it held a removed file
            held.set()
            release.wait(10)

    with file_lock(path):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.5)  # the waiter has opened this very file and blocks on it
        assert not held.is_set()
    assert held.wait(10) and os.stat(path).st_ino == inodes[0]
    with pytest.raises(PipelineError, match="being written"):  # still exclusive
        with file_lock(path, wait=False):
            pass
    release.set()
    thread.join()
    assert not path.exists()


def test_find_takes_a_key_a_file_name_or_a_path(tmp_path):
    good = _file(tmp_path)
    store = FeatureStore(good.parent)
    key = good.stem.rsplit("-", 1)[1]
    assert store.find(key) == good and store.find(good.stem) == good and store.find(str(good)) == good
    with pytest.raises(PipelineError, match="no feature file with key or name 'feed'"):
        store.find("feed")


def _flip_a_byte_inside_the_data(path, split="train", chunk=0):
    with h5py.File(path, "r") as f:
        info = f[f"{split}/features"].id.get_chunk_info(chunk)
    raw = bytearray(path.read_bytes())
    raw[info.byte_offset + info.size // 2] ^= 0xFF  # the middle of the rows, not a header
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("compression, filters", [
    ("auto", (None, False)), ("none", (None, False)), ("gzip", ("gzip", True))])
def test_features_carry_chunk_checksums_and_only_built_in_filters(tmp_path, compression, filters):
    from pipeline.store import FeatureStore

    X, y = _features()
    store = FeatureStore(tmp_path)
    parts = {"dataset": "d", "backbone": "b", "mode": "avg"}
    shards = store.shards_for(parts)
    shards.write("train", 0, X[:200], key="k", attrs={})
    shards.write("test", 0, X[200:], key="k", attrs={})
    path = store.publish(shards, parts, classes=["c0", "c1", "c2"], compression=compression,
                         labels={"train": y[:200], "test": y[200:]}, attrs={})
    with h5py.File(path, "r") as f:
        d = f["train/features"]
        assert d.fletcher32 and (d.compression, d.shuffle) == filters
        assert f.attrs["chunk_checksums"] == "fletcher32"


def test_spatial_maps_are_compressed_by_default_and_vectors_are_not():
    from pipeline.store import filters

    assert filters("auto", (7, 7, 1280)) == {"fletcher32": True, "compression": "gzip",
                                              "compression_opts": 1, "shuffle": True}
    assert filters("auto", (1280,)) == {"fletcher32": True}
    assert filters("lzf", (1280,))["compression"] == "lzf"  # h5py's own: only when asked for


def test_h5dump_reads_a_published_file(tmp_path):
    from conftest import h5dump_features

    path = _file(tmp_path)
    X, _ = _features()
    assert np.array_equal(h5dump_features(path, "train", tmp_path), X[:200].ravel())
    assert np.array_equal(h5dump_features(path, "test", tmp_path), X[200:].ravel())


@pytest.mark.reliability
def test_a_damaged_chunk_fails_every_read_and_verify_names_it(tmp_path):
    path = _file(tmp_path)
    _flip_a_byte_inside_the_data(path)
    assert check_file(path) is None  # metadata is intact: the quick check cannot know
    problem = check_file(path, full=True)
    assert problem.startswith("train: rows 0-") and "fails its checksum" in problem
    with FeatureFile(path) as ff, pytest.raises(OSError):
        ff.features("train")[()]


def test_a_file_written_before_chunk_checksums_is_still_read_and_said_to_have_none(tmp_path, capsys):
    from pipeline.cli import main

    path = _file(tmp_path)
    with h5py.File(path, "r+") as f:  # rewrite as the older format did: lzf, no Fletcher-32
        for split in ("train", "test"):
            data = f[f"{split}/features"][()]
            attrs = dict(f[f"{split}/features"].attrs)
            del f[f"{split}/features"]
            d = f.create_dataset(f"{split}/features", data=data, chunks=True, compression="lzf")
            d.attrs.update(attrs)
        del f.attrs["chunk_checksums"]
    assert check_file(path, full=True) is None
    with FeatureFile(path) as ff:
        assert np.array_equal(ff.features("train")[()], _features()[0][:200])
    assert main(["ls", "--cache-dir", str(path.parent)]) == 0
    assert "no chunk checksums: an older file" in capsys.readouterr().out
    assert main(["verify", "--cache-dir", str(path.parent)]) == 0
    assert "verified  " in capsys.readouterr().out


FORMATS = Path(__file__).parent / "fixtures" / "formats"


@pytest.mark.parametrize("written_by", sorted(p.name for p in FORMATS.iterdir() if p.is_dir()))
def test_feature_files_every_release_wrote_stay_readable_and_current(written_by, tmp_path):
    """tests/fixtures/formats/<commit>/: the tiny file that commit's `extract` wrote (from
    tests/fixtures/formats/tiny.npz; MobileNetV2 0.35, weights none, 32x32). Today's code reads
    it whole and finds it up to date: no upgrade calls a cache damaged or re-extracts it."""
    import shutil

    from pipeline.extraction import ExtractionConfig, extract_features
    from pipeline.store import FeatureFile, check_file

    cache = tmp_path / "cache"
    shutil.copytree(FORMATS / written_by, cache)
    shutil.copy(FORMATS / "tiny.npz", tmp_path / "tiny.npz")
    [path] = cache.glob("*.h5")
    assert check_file(path, full=True) is None
    with FeatureFile(path) as ff:
        assert ff.features("train").shape == (6, 1280) and ff.features("test").shape == (4, 1280)
        assert ff.labels("train").tolist() == [0, 1, 0, 1, 0, 1] and ff.classes == ["a", "b"]
        assert np.isfinite(ff.features("train")[()]).all() and ff.validation_rows == 0
        assert ff.ids("train") is None  # written before rows named their images: said, not guessed
        before = ff.features("train")[()]
    config = ExtractionConfig(dataset=f"npz:{tmp_path / 'tiny.npz'}", backbone="mobilenet_v2",
                              alpha=0.35, weights="none", image_size=32, cache_dir=str(cache))
    result = extract_features(config)
    assert result.status == "up-to-date" and result.path == path
    with FeatureFile(path) as ff:  # the next extract names its rows; the features stay as they were
        assert ff.ids("train") == [str(i) for i in range(6)] and ff.ids("test") == ["0", "1", "2", "3"]
        assert np.array_equal(ff.features("train")[()], before)
    assert check_file(path, full=True) is None


@pytest.mark.bad_input
def test_a_file_of_a_newer_format_is_not_called_damaged_nor_moved_aside(tmp_path, capsys):
    import shutil

    import h5py

    from pipeline.cli import main

    cache = tmp_path / "cache"
    shutil.copytree(FORMATS / "e7147b8", cache)
    [path] = cache.glob("*.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    assert main(["verify", "--cache-dir", str(cache)]) == 0  # not a bad file
    assert main(["verify", "--repair", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "NEWER" in out and "written by a newer version of this tool (format version 99" in out
    assert path.exists() and "damaged" not in out
