import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import LEDGER, REPO, audit_cache, make_images

from pipeline import runtimes
from pipeline.errors import PipelineError
from pipeline.extraction import (
    ConversionStopped,
    ExtractionConfig,
    FeatureModel,
    extract_features,
    extract_shards,
    keep_converted,
    shard_ranges,
)
from pipeline.store import FeatureFile, FeatureStore, ShardSet, check_file


def tiny(dataset: str, cache: Path, **kw) -> ExtractionConfig:
    """MobileNetV2 alpha 0.35, random weights, 32x32 input: seconds on a CPU."""
    defaults = dict(backbone="mobilenet_v2", alpha=0.35, weights="none", image_size=32,
                    batch_size=8, cache_dir=str(cache), shard_rows=16)
    return ExtractionConfig(dataset=dataset, **{**defaults, **kw})



def _features(path):
    with FeatureFile(path) as ff:
        return ff.features("train")[()], ff.features("test")[()]


def test_extract_writes_pooled_features_with_provenance(npz_dataset, tmp_path):
    result = extract_features(tiny(npz_dataset, tmp_path))
    assert result.status == "created"
    with FeatureFile(result.path) as ff:
        assert ff.features("train").shape == (48, 1280)
        assert ff.features("test").dtype == np.float32
        assert list(ff.labels("train")[:4]) == [0, 1, 2, 0]
        assert ff.classes == ["dark", "mid", "bright"]
        parts, prov = ff.attrs["key_parts"], ff.attrs["provenance"]
    assert parts["backbone"] == "mobilenet_v2" and parts["image_size"] == 32
    assert parts["weights"] == "none" and len(parts["fingerprint"]) == 64
    for field in ("versions", "device", "batch_size", "precision", "wall_seconds",
                  "images_per_second", "created"):
        assert field in prov
    assert prov["versions"]["tensorflow"]


def test_same_command_again_is_a_fast_no_op(npz_dataset, tmp_path, caplog):
    first = extract_features(tiny(npz_dataset, tmp_path))
    mtime = first.path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        again = extract_features(tiny(npz_dataset, tmp_path))
    assert again.status == "up-to-date" and "nothing to do" in caplog.messages[0]
    assert again.path == first.path and first.path.stat().st_mtime_ns == mtime


def test_changing_a_key_part_writes_a_new_file_and_leaves_the_old(npz_dataset, tmp_path):
    avg = extract_features(tiny(npz_dataset, tmp_path, image_size=64)).path
    mtime = avg.stat().st_mtime_ns
    mx = extract_features(tiny(npz_dataset, tmp_path, image_size=64, mode="max")).path
    bigger = extract_features(tiny(npz_dataset, tmp_path, image_size=96)).path
    assert len({avg, mx, bigger}) == 3 and avg.stat().st_mtime_ns == mtime
    a, b = _features(avg)[0], _features(mx)[0]
    assert np.abs(a - b).max() > 0.1 * np.abs(a).max()  # a 2x2 map: max differs from mean


def test_shards_are_whole_batches_and_cover_only_the_gaps():
    assert shard_ranges(70, 24, 8) == [(0, 24), (24, 48), (48, 70)]
    assert shard_ranges(70, 20, 8) == [(0, 24), (24, 48), (48, 70)]  # rounded up to batches
    assert shard_ranges(70, 24, 8, gaps=[(24, 48)]) == [(24, 48)]
    assert shard_ranges(100, 34, 8, gaps=[(10, 60)]) == [(10, 40), (40, 60)]
    assert all(lo % 8 == 0 for lo, _ in shard_ranges(1000, 143, 8))


def test_all_shards_of_both_splits_stream_through_one_map_of_the_model(tmp_path):
    """One stream for the whole run: a runtime keeps batches in flight from one shard and split
    into the next (draining it at a split's end idled a core for up to a batch)."""
    class Split:  # image i of a split is the number base + i
        def __init__(self, base):
            self.base = base

        def load(self, idx):
            return (self.base + idx)[:, None].astype(np.float32)

    class Model:
        streams: list = []

        def map(self, batches):
            self.streams.append([])
            for images in batches:
                self.streams[-1].append(images[:, 0].tolist())
                yield images * 2

    shards = ShardSet(tmp_path / "s.shards")
    extract_shards(Model(), shards, {"train": Split(0), "test": Split(1000)},
                   [("train", 0, 16), ("train", 16, 20), ("test", 0, 8)], batch_size=8, key="k",
                   provenance={}, compression="none")
    assert Model.streams == [[list(range(0, 8)), list(range(8, 16)), list(range(16, 20)),
                              list(range(1000, 1008))]]
    assert [p.name for p in shards.files("train")] == ["r0000000000-0000000016.h5",
                                                       "r0000000016-0000000020.h5"]
    assert np.array_equal(np.concatenate(list(shards.read_split("train")))[:, 0], np.arange(20) * 2)
    assert np.array_equal(np.concatenate(list(shards.read_split("test")))[:, 0],
                          (1000 + np.arange(8)) * 2)


@pytest.mark.reliability
@pytest.mark.parametrize("runtime", ["tensorflow", "openvino", "onnxruntime"])
def test_interrupted_run_resumes_to_identical_features(npz_dataset, tmp_path, monkeypatch, caplog,
                                                       runtime):
    if not runtimes.installed(runtime):
        pytest.skip(f"{runtime} is not installed (make install adds it)")
    reference = _features(extract_features(tiny(npz_dataset, tmp_path / "ref", runtime=runtime)).path)
    real_write, calls = ShardSet.write, []

    def crash_on_third(self, split, start, features, **kw):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed between shards
        return real_write(self, split, start, features, **kw)

    monkeypatch.setattr(ShardSet, "write", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny(npz_dataset, tmp_path / "run", runtime=runtime))
    monkeypatch.setattr(ShardSet, "write", real_write)
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        result = extract_features(tiny(npz_dataset, tmp_path / "run", runtime=runtime))
    assert result.status == "resumed" and "resuming: train 32/48" in caplog.messages[0]
    resumed = _features(result.path)
    assert all(np.array_equal(a, b) for a, b in zip(reference, resumed))
    assert result.info["runtime"] == runtime
    LEDGER.update(["interrupted", "resumed", "bit-identical"])


def test_layers_are_pooled_and_concatenated(npz_dataset, tmp_path):
    config = tiny(npz_dataset, tmp_path, layers=("block_5_add", "out_relu"))
    X, _ = _features(extract_features(config).path)
    assert X.shape == (48, 16 + 1280)
    with pytest.raises(PipelineError, match="no layer named.*last layers are"):
        extract_features(tiny(npz_dataset, tmp_path, layers=("block_99",)))


def test_bottleneck_is_a_pca_of_training_maps_stored_in_the_file(npz_dataset, tmp_path):
    config = tiny(npz_dataset, tmp_path, mode="bottleneck", bottleneck_k=4, image_size=64)
    path = extract_features(config).path
    with h5py.File(path) as f:
        comps, mean = f["bottleneck/components"][()], f["bottleneck/mean"][()]
        X = f["train/features"][()]
    assert X.shape == (48, 2 * 2 * 4) and comps.shape == (1280, 4)
    assert np.allclose(comps.T @ comps, np.eye(4), atol=1e-6)
    # The components are the top eigenvectors of the channel covariance of training maps.
    from pipeline.datasets import load_dataset
    from pipeline.extraction import FeatureModel

    ds = load_dataset(npz_dataset)
    model = FeatureModel(config, ds.splits["train"].image_shape)
    maps = model.maps(ds.splits["train"].load(np.arange(48))).reshape(-1, 1280).astype(np.float64)
    assert np.allclose(maps.mean(0), mean, atol=1e-4)
    top = np.linalg.eigh(np.cov(maps.T, bias=True))[1][:, ::-1][:, :4]
    assert np.allclose(np.abs(top.T @ comps), np.eye(4), atol=1e-3)


def test_mixed_precision_gives_float32_features_close_to_full_precision_under_its_own_key(
        npz_dataset, tmp_path):
    full = extract_features(tiny(npz_dataset, tmp_path, runtime="tensorflow"))
    mixed = extract_features(tiny(npz_dataset, tmp_path, precision="mixed_bfloat16"))
    X, reference = _features(mixed.path)[0], _features(full.path)[0]
    assert mixed.path != full.path and X.dtype == np.float32 and np.isfinite(X).all()
    cosine = (X * reference).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() > 0.995 and not np.array_equal(X, reference)  # measured: 0.99966
    assert mixed.info["runtime"] == "tensorflow"  # OpenVINO runs float32 only
    assert mixed.info["precision"] == "mixed_bfloat16"
    import keras

    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_spatial_mode_keeps_the_map_in_float16(npz_dataset, tmp_path):
    X, _ = _features(extract_features(tiny(npz_dataset, tmp_path, mode="spatial", image_size=64)).path)
    assert X.shape == (48, 2, 2, 1280) and X.dtype == np.float16


def test_resizing_happens_in_the_graph_for_grey_28px_images(tmp_path):
    x, y = make_images(20, size=28, channels=None)
    np.savez(tmp_path / "g.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    result = extract_features(tiny(f"npz:{tmp_path / 'g.npz'}", tmp_path, image_size=40))
    assert result.info["image_shape"] == [28, 28, 3]  # stored small; the model resized it
    import tensorflow as tf

    from pipeline.extraction import FeatureModel

    model = FeatureModel(tiny("unused", tmp_path, image_size=40), (28, 28, 3))
    graph = model._features.get_concrete_function().graph
    [images] = [t for t in graph.inputs if t.dtype == tf.uint8]
    assert images.shape.as_list() == [None, 28, 28, 3]  # uint8 28x28 goes in ...
    assert "ResizeBilinear" in {op.type for op in graph.get_operations()}  # ... and is resized inside


@pytest.mark.parametrize("stored, preprocessed_first", [(28, True), (48, False)])
def test_preprocessing_runs_on_the_smaller_of_the_stored_and_the_resized_image(
        tmp_path, stored, preprocessed_first):
    from pipeline.extraction import FeatureModel

    model = FeatureModel(tiny("unused", tmp_path, image_size=40), (stored, stored, 3))
    graph = model._features.get_concrete_function().graph
    [resize] = [op for op in graph.get_operations() if op.type == "ResizeBilinear"]
    resized = resize.inputs[0].op  # the cast uint8 images, or what preprocessing made of them
    assert (resized.type != "Cast") == preprocessed_first, resized.type


@pytest.mark.bad_input
@pytest.mark.parametrize("kw, message", [
    ({"backbone": "resnet51"}, "unknown backbone 'resnet51'; valid: mobilenet, mobilenet_v2"),
    ({"mode": "median"}, "mode = 'median': use one of avg, max, bottleneck"),
    ({"backbone": "resnet50", "alpha": 0.5}, "takes no alpha"),
    ({"image_size": 8}, "cannot be built with input 8x8"),
    ({"precision": "int4"}, "precision = 'int4': use one of float32"),
])
def test_bad_options_get_one_clear_line(npz_dataset, tmp_path, kw, message):
    with pytest.raises(PipelineError, match=message):
        extract_features(tiny(npz_dataset, tmp_path / "c", **kw))
    assert not list((tmp_path / "c").glob("*.h5"))


@pytest.mark.bad_input
def test_weights_for_another_architecture_are_refused(npz_dataset, tmp_path):
    import keras

    other = keras.applications.MobileNetV2(alpha=0.5, include_top=False, weights=None,
                                           input_shape=(32, 32, 3))
    other.save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(PipelineError, match="does not fit mobilenet_v2 alpha 0.35"):
        extract_features(tiny(npz_dataset, tmp_path, weights=str(tmp_path / "other.weights.h5")))


@pytest.mark.bad_input
def test_damaged_cache_file_is_reported_then_rebuilt_on_request(npz_dataset, tmp_path):
    path = extract_features(tiny(npz_dataset, tmp_path)).path
    good = _features(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(PipelineError, match="damaged.*--rebuild"):
        extract_features(tiny(npz_dataset, tmp_path))
    rebuilt = extract_features(tiny(npz_dataset, tmp_path), rebuild=True)
    assert check_file(rebuilt.path, full=True) is None
    assert all(np.array_equal(a, b) for a, b in zip(good, _features(rebuilt.path)))


def test_corrupt_image_skipped_with_skip_bad_is_recorded_in_the_file(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(
                    tmp_path / "d" / split / c / f"{i}.png")
    (tmp_path / "d" / "train" / "a" / "bad.png").write_bytes(b"\x89PNG garbage")
    path = extract_features(tiny(f"folder:{tmp_path / 'd'}", tmp_path, skip_bad=True)).path
    with h5py.File(path) as f:
        assert "bad.png" in f["skipped_files"][0].decode()
        assert f["train/features"].shape[0] == 6


@pytest.mark.bad_input
def test_an_image_changed_mid_run_stops_with_our_message_and_keeps_the_rows_done(tmp_path):
    from PIL import Image

    from pipeline.datasets import load_dataset

    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    spec = f"folder:{tmp_path / 'd'}"
    scanned = load_dataset(spec)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "d" / "b" / "9.png")
    with pytest.raises(PipelineError, match="9.png changed after the dataset was scanned"):
        extract_features(tiny(spec, tmp_path / "cache"), dataset=scanned)
    assert not list((tmp_path / "cache").glob("*.h5"))
    shards = next((tmp_path / "cache").glob("*.shards"))
    assert ShardSet(shards).rows_done("train") > 0  # the rows before it, for the rerun


# ----------------------------------------------------------------------------- processes

def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _cli_args(dataset, cache, *extra):
    return ["extract", "--dataset", dataset, "--backbone", "mobilenet_v2", "--alpha", "0.35",
            "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--cache-dir", str(cache), *extra]


@pytest.fixture
def bigger_npz(tmp_path):
    x, y = make_images(400, size=32, seed=3)
    np.savez(tmp_path / "big.npz", x_train=x, y_train=y, x_test=x[:80], y_test=y[:80])
    return f"npz:{tmp_path / 'big.npz'}"


@pytest.mark.reliability
def test_kill_9_at_many_points_then_resume_is_bit_identical(bigger_npz, tmp_path):
    """Real SIGKILLs during extraction (after 0, 2, 5 and 9 shards of 16 rows), each rerun
    resuming from what the last one left; the final run must have resumed (kept rows) and
    equal an uninterrupted run bit for bit."""
    small = ("--shard-rows", "16")
    ref = _cli(*_cli_args(bigger_npz, tmp_path / "ref", *small))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    reference = _features(next((tmp_path / "ref").glob("*.h5")))
    cache = tmp_path / "killed"
    kills, kept = 0, []
    for shards in (0, 2, 5, 9):
        proc = _cli(*_cli_args(bigger_npz, cache, *small))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and \
                len(list(cache.glob("*.shards/*/r*.h5"))) < shards + sum(kept[-1:]):
            time.sleep(0.02)
        if shards == 0:
            time.sleep(3.0)  # during start-up: TensorFlow loading, the model being built
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert not list(cache.glob("*.h5")), "the run finished before its kill"
        kept.append(len(list(cache.glob("*.shards/*/r*.h5"))))
    assert kept[-1] > 0 and kept == sorted(kept)  # work piled up across the kills
    final = _cli(*_cli_args(bigger_npz, cache, *small))
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert "resuming: train " in err
    result = next(cache.glob("*.h5"))
    with FeatureFile(result) as ff:
        prov = ff.attrs["provenance"]
    assert prov["resumed"] and prov["images_this_run"] < 480  # it did not start over
    assert kills == 4
    resumed = _features(result)
    assert all(np.array_equal(a, b) for a, b in zip(reference, resumed))
    LEDGER.update({"interrupted": kills, "resumed": 1, "bit-identical": 1})
    audit_cache(cache)


@pytest.mark.reliability
def test_kill_during_publish_leaves_a_tmp_file_that_is_never_trusted(bigger_npz, tmp_path):
    proc = _cli(*_cli_args(bigger_npz, tmp_path))
    assert proc.wait(timeout=300) == 0
    final = next(tmp_path.glob("*.h5"))
    reference = _features(final)
    # Rebuild the state a kill during publish leaves: shards kept, a half-written .h5.tmp.
    final.rename(final.with_name(final.name + ".tmp"))
    tmp = final.with_name(final.name + ".tmp")
    tmp.write_bytes(tmp.read_bytes()[:2000])
    again = _cli(*_cli_args(bigger_npz, tmp_path))
    assert again.wait(timeout=300) == 0
    assert all(np.array_equal(a, b) for a, b in zip(reference, _features(final)))
    LEDGER.update(["interrupted", "bit-identical"])  # publish had removed the shards:
    # the rerun extracted afresh (nothing to resume) and must not trust the half file
    audit_cache(tmp_path)


KILL_AT = {  # a real SIGKILL, sent by the process to itself at a chosen point of publishing
    "final checks": "import pipeline.store as m; real = m.check_file\n"
                    "def hook(*a, **k):\n"
                    "    if k.get('full'): os.kill(os.getpid(), signal.SIGKILL)\n"
                    "    return real(*a, **k)\n"
                    "m.check_file = hook",
    "rename": "real = os.replace\n"
              "def hook(a, b):\n"
              "    if str(b).endswith('.h5'): os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(a, b)\n"
              "os.replace = hook",
}


@pytest.mark.reliability
@pytest.mark.parametrize("point", sorted(KILL_AT))
def test_kill_9_during_final_checks_or_rename_then_resume(bigger_npz, tmp_path, point):
    ref = _cli(*_cli_args(bigger_npz, tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0
    reference = _features(next((tmp_path / "ref").glob("*.h5")))
    code = ("import os, signal, sys\n" + KILL_AT[point] + "\nfrom pipeline.cli import main\n"
            f"sys.exit(main({_cli_args(bigger_npz, tmp_path / 'run')!r}))")
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not list((tmp_path / "run").glob("*.h5"))  # nothing half-done was published
    again = _cli(*_cli_args(bigger_npz, tmp_path / "run"))
    assert again.wait(timeout=300) == 0
    resumed = _features(next((tmp_path / "run").glob("*.h5")))
    assert all(np.array_equal(a, b) for a, b in zip(reference, resumed))
    LEDGER.update(["interrupted", "resumed", "bit-identical"])
    audit_cache(tmp_path / "run")


@pytest.mark.reliability
def test_full_disk_keeps_partial_work_and_resumes(bigger_npz, tmp_path):
    import resource

    def small_files():  # every file this process writes is capped at 200 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))

    args = _cli_args(bigger_npz, tmp_path, "--compression", "none", "--shard-rows", "20")
    proc = _cli(*args, preexec_fn=small_files)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left" in lines[0] and "rerun" in lines[0]
    shards = next(tmp_path.glob("*.shards"))
    done = ShardSet(shards).rows_done("train")
    assert done == 400  # every shard landed; only the big final file did not fit
    again = _cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resuming: train 400/400" in err
    ref = _cli(*_cli_args(bigger_npz, tmp_path / "ref", "--compression", "none", "--shard-rows", "20"))
    assert ref.wait(timeout=300) == 0
    resumed = _features(next(tmp_path.glob("*.h5")))
    reference = _features(next((tmp_path / "ref").glob("*.h5")))
    assert all(np.array_equal(a, b) for a, b in zip(reference, resumed))
    LEDGER.update(["interrupted", "resumed", "bit-identical"])
    audit_cache(tmp_path)


@pytest.mark.reliability
def test_two_extractions_of_one_key_have_exactly_one_writer(bigger_npz, tmp_path):
    first = _cli(*_cli_args(bigger_npz, tmp_path))
    time.sleep(0.3)
    second = _cli(*_cli_args(bigger_npz, tmp_path))
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1 + err2
    outputs = err1 + err2  # messages go to stderr
    assert outputs.count("wrote ") == 1 and "written by the process we waited for" in outputs
    audit_cache(tmp_path)


@pytest.mark.reliability
def test_read_only_cache_dir_and_odd_paths(npz_dataset, tmp_path, monkeypatch):
    import errno

    odd = tmp_path / "cache with spaces ü"
    extract_features(tiny(npz_dataset, odd))
    audit_cache(odd)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permission bits: make the folder act read-only
        real_mkdir = Path.mkdir

        def read_only_mkdir(self, *a, **k):
            if str(self).startswith(str(ro)):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    try:
        with pytest.raises(PipelineError, match="choose a writable --cache-dir"):
            extract_features(tiny(npz_dataset, ro))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- real weights

@pytest.mark.slow
def test_real_imagenet_mobilenet_features_on_real_cifar_images(cifar_mini, shared_weights, tmp_path):
    config = ExtractionConfig(dataset=f"folder:{cifar_mini}", backbone="mobilenet", alpha=0.25,
                              weights="imagenet", limit=100, batch_size=50,
                              cache_dir=str(tmp_path))
    result = extract_features(config)
    with FeatureFile(result.path) as ff:
        X, y = ff.features("train")[()], ff.labels("train")
        Xt, yt = ff.features("test")[()], ff.labels("test")
    assert X.shape == (100, 256) and result.info["image_shape"] == [32, 32, 3]
    assert result.info["feature_shape"] == [256]
    from sklearn.linear_model import LogisticRegression

    acc = LogisticRegression(max_iter=2000).fit(X, y).score(Xt, yt)
    assert acc > 0.3  # 10 classes: chance is 0.1; real ImageNet features carry over


@pytest.mark.slow
def test_real_mobilenet_v2_weights_file_given_as_a_path(shared_weights, npz_dataset, tmp_path):
    weights = shared_weights / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    config = tiny(npz_dataset, tmp_path, weights=str(weights), image_size=96)
    result = extract_features(config)
    with FeatureFile(result.path) as ff:
        assert ff.attrs["key_parts"]["weights"].startswith("sha256:d43c70f8")
    imagenet = extract_features(tiny(npz_dataset, tmp_path, weights="imagenet", image_size=96))
    assert np.allclose(_features(result.path)[0], _features(imagenet.path)[0], atol=1e-5)


@pytest.mark.slow
def test_features_equal_the_plain_keras_path_on_real_images(cifar_mini, shared_weights, tmp_path):
    """Our graph against the textbook path written out here on its own: decode with PIL,
    upscale, ``preprocess_input``, ``model.predict``, pool in numpy; the bottleneck as our
    stored projection applied to the plain maps in numpy."""
    import keras
    import tensorflow as tf
    from PIL import Image

    files = {s: sorted((cifar_mini / s).rglob("*.jpg"))[::25] for s in ("train", "test")}
    arrays = {s: np.stack([np.asarray(Image.open(f).convert("RGB")) for f in fs])
              for s, fs in files.items()}
    labels = {s: np.array([sorted(p.name for p in (cifar_mini / s).iterdir()).index(f.parent.name)
                           for f in fs]) for s, fs in files.items()}
    np.savez(tmp_path / "real.npz", x_train=arrays["train"], y_train=labels["train"],
             x_test=arrays["test"], y_test=labels["test"])
    spec = f"npz:{tmp_path / 'real.npz'}"
    layers = ("conv_pw_5_relu", "conv_pw_13_relu")

    def ours(**kw):
        config = ExtractionConfig(dataset=spec, backbone="mobilenet", alpha=0.25, batch_size=16,
                                  runtime="tensorflow", cache_dir=str(tmp_path / "c"), **kw)
        with FeatureFile(extract_features(config).path) as ff:
            extra = {k: ff._file[f"bottleneck/{k}"][()] for k in ("mean", "components")
                     if "bottleneck" in ff._file}
            return ff.features("test")[()], extra

    base = keras.applications.MobileNet(alpha=0.25, include_top=False, weights="imagenet",
                                        input_shape=(224, 224, 3))
    plain = keras.Model(base.input, [base.get_layer(name).output for name in layers])
    x = tf.image.resize(arrays["test"].astype(np.float32), (224, 224)).numpy()
    mid, last = plain.predict(keras.applications.mobilenet.preprocess_input(x), verbose=0)
    avg, _ = ours(mode="avg")
    np.testing.assert_allclose(avg, last.mean(axis=(1, 2)), atol=1e-4)
    multi, _ = ours(mode="avg", layers=layers)
    np.testing.assert_allclose(multi, np.concatenate([mid.mean(axis=(1, 2)), last.mean(axis=(1, 2))],
                                                     axis=1), atol=1e-4)
    projected, projection = ours(mode="bottleneck", bottleneck_k=16)
    expected = ((last - projection["mean"]) @ projection["components"]).reshape(len(last), -1)
    np.testing.assert_allclose(projected, expected, atol=1e-3)


def test_every_key_part_changes_the_key_and_nothing_else_does(npz_dataset, tmp_path, monkeypatch):
    from dataclasses import replace

    from pipeline import options
    from pipeline.datasets import load_dataset
    from pipeline.store import cache_key

    dataset = load_dataset(npz_dataset)
    (tmp_path / "w.h5").write_bytes(b"weights one")
    base = tiny(npz_dataset, tmp_path, weights=str(tmp_path / "w.h5"))

    def key(config):
        return cache_key(config.key_parts(dataset))

    changes = {"alpha": dict(alpha=0.5), "image size": dict(image_size=64),
               "layers": dict(layers=("block_3_expand_relu",)), "mode": dict(mode="max"),
               "bottleneck k": dict(mode="bottleneck", bottleneck_k=8),
               "weights": dict(weights="none"), "precision": dict(precision="mixed_float16"),
               "backbone": dict(backbone="mobilenet")}
    keys = {name: key(replace(base, **kw)) for name, kw in changes.items()}
    assert len(set(keys.values()) | {key(base)}) == len(changes) + 1
    assert key(replace(base, mode="bottleneck", bottleneck_k=16)) != keys["bottleneck k"]
    before = key(base)
    (tmp_path / "w.h5").write_bytes(b"weights two")  # the same path, other bytes
    assert key(base) != before
    (tmp_path / "w.h5").write_bytes(b"weights one")
    monkeypatch.setattr(options, "EXTRACTOR_VERSION", options.EXTRACTOR_VERSION + 1)
    assert key(base) != before
    monkeypatch.undo()
    same = dict(batch_size=3, compression="gzip", cache_dir=str(tmp_path / "other"), shard_rows=5,
                rescan=True, runtime="tensorflow", limit=None)
    assert all(key(replace(base, **{k: v})) == before for k, v in same.items())


def test_the_options_declared_key_parts_are_the_ones_that_change_the_key(npz_dataset, tmp_path):
    from dataclasses import replace

    from pipeline.datasets import load_dataset
    from pipeline.options import option_fields
    from pipeline.store import cache_key

    dataset = load_dataset(npz_dataset)
    base = tiny(npz_dataset, tmp_path, mode="bottleneck", bottleneck_k=4)
    other = {"backbone": "mobilenet", "mode": "avg", "alpha": 0.5, "weights": "imagenet",
             "image_size": 64, "layers": ("block_3_expand_relu",), "bottleneck_k": 8,
             "bottleneck_fit_images": 99, "batch_size": 3, "limit": 5,
             "precision": "mixed_float16", "compression": "gzip", "skip_bad": True,
             "cache_dir": str(tmp_path / "other"), "seed": 1, "shard_rows": 5, "rescan": True,
             "runtime": "tensorflow", "tta": "flip"}
    declared = {name for name, f in option_fields().items() if f.metadata["key_part"]}
    assert set(other) == set(option_fields()) - {"dataset"}  # a new option needs a row here
    changes_key = {name for name, value in other.items()
                   if cache_key(replace(base, **{name: value}).key_parts(dataset))
                   != cache_key(base.key_parts(dataset))}
    assert changes_key == declared - {"dataset"}  # the dataset: its label and fingerprint


@pytest.mark.slow  # real ImageNet weights for one row, 20 graphs built
def test_every_option_that_changes_the_graph_keys_the_converted_graph(npz_dataset, tmp_path):
    """Each option at a second value, the graph built again from the same seeded weights: where
    its output changes, ``model_key`` (a converted graph's folder) must change too, or a kept
    graph would serve the new features; options not declared ``graph`` leave the key alone."""
    from dataclasses import replace

    import keras

    from pipeline.datasets import load_dataset
    from pipeline.extraction import FeatureModel
    from pipeline.options import option_fields
    from pipeline.store import cache_key

    images = load_dataset(npz_dataset).splits["train"].load(np.arange(6))
    # ResNet50: outputs far from 0; 64x64: a 2x2 last map, where max and avg pooling differ
    base = tiny(npz_dataset, tmp_path, backbone="resnet50", alpha=None, image_size=64)
    other = {"backbone": "mobilenet", "mode": "max", "alpha": 0.5, "weights": "imagenet",
             "image_size": 96, "layers": ("conv2_block1_out",), "bottleneck_k": 8,
             "bottleneck_fit_images": 99, "batch_size": 3, "limit": 5,
             "precision": "mixed_float16", "compression": "gzip", "skip_bad": True,
             "cache_dir": str(tmp_path / "other"), "seed": 1, "shard_rows": 5, "rescan": True,
             "runtime": "openvino", "tta": "flip"}
    assert set(other) == set(option_fields()) - {"dataset"}  # a new option needs a row here
    fixes = {"alpha": dict(backbone="mobilenet"), "weights": dict(backbone="mobilenet_v2", alpha=0.35)}

    def output(config):
        keras.utils.set_random_seed(0)
        return FeatureModel(config, images.shape[1:]).graph_features(images)

    def key(config):
        return cache_key(config.model_key(images.shape[1:]))

    reference = {}
    for name, value in other.items():
        before = replace(base, **fixes.get(name, {}))
        after = replace(before, **{name: value})
        if key(before) not in reference:
            reference[key(before)] = output(before)
            assert np.array_equal(reference[key(before)], output(before))  # seeded: repeatable
        a, b = reference[key(before)], output(after)
        graph_changed = a.shape != b.shape or not np.allclose(a, b, rtol=1e-4,
                                                              atol=1e-6 * np.abs(a).max())
        declared = bool((rule := option_fields()[name].metadata["key_part"]) and rule.graph)
        if name == "precision":  # mixed precision never runs a converted graph
            assert graph_changed and not declared
            assert FeatureModel(after, images.shape[1:]).use_runtime(
                "onnxruntime", tmp_path / "m", "test", after.precision) == "tensorflow"
            continue
        assert graph_changed == declared, name
        assert (key(after) != key(before)) == declared, name


@pytest.mark.reliability
def test_rebuild_keeps_the_old_file_until_the_new_one_is_published(npz_dataset, tmp_path,
                                                                   monkeypatch):
    from pipeline.store import FeatureStore

    path = extract_features(tiny(npz_dataset, tmp_path)).path
    old = _features(path)
    real_publish = FeatureStore.publish

    def crash(*a, **k):
        assert path.exists() and check_file(path) is None  # still there, still sound
        raise KeyboardInterrupt  # killed just before publishing the rebuilt file

    monkeypatch.setattr(FeatureStore, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny(npz_dataset, tmp_path), rebuild=True)
    assert all(np.array_equal(a, b) for a, b in zip(old, _features(path)))
    monkeypatch.setattr(FeatureStore, "publish", real_publish)
    rebuilt = extract_features(tiny(npz_dataset, tmp_path), rebuild=True)
    assert rebuilt.path == path and rebuilt.status == "resumed"  # the rebuild's rows were kept
    LEDGER.update(["interrupted", "resumed"])


@pytest.mark.parametrize("mode, runtime", [("avg", "tensorflow"), ("max", "tensorflow"),
                                           ("bottleneck", "tensorflow"), ("spatial", "tensorflow"),
                                           ("avg", "openvino"), ("spatial", "openvino")])
def test_tta_flip_averages_each_image_with_its_mirror(npz_dataset, tmp_path, mode, runtime):
    from pipeline.datasets import load_dataset
    from pipeline.extraction import FeatureModel

    ds = load_dataset(npz_dataset)
    images = ds.splits["train"].load(np.arange(12))
    # ResNet50: random MobileNets give activations near 1e-11, which float16 maps round to 0.
    config = dict(backbone="resnet50", alpha=None, mode=mode, image_size=64)
    plain = FeatureModel(tiny(npz_dataset, tmp_path, **config), images.shape[1:])
    flip = FeatureModel(tiny(npz_dataset, tmp_path, **config, tta="flip"), images.shape[1:])
    if runtime != "tensorflow":
        assert flip.use_runtime(runtime, tmp_path / "converted", "test") == runtime
    if mode == "bottleneck":  # any fixed projection: the flip must commute with it
        rng = np.random.default_rng(0)
        plain.projection = flip.projection = (rng.normal(size=2048), rng.normal(size=(2048, 4)))
    mirrored = plain(images[:, :, ::-1])
    if mode in ("spatial", "bottleneck"):  # a map's columns go back where they came from
        mirrored = mirrored.reshape(len(images), 2, 2, -1)[:, :, ::-1].reshape(mirrored.shape)
    expected = (plain(images).astype(np.float32) + mirrored.astype(np.float32)) / 2
    got = flip(images)
    assert got.dtype == plain(images).dtype and got.shape == expected.shape
    scale = np.abs(expected).max()
    tolerance = (2e-3 if mode == "spatial" else 1e-5) * scale  # float16 maps; float32 rounding
    assert scale > 0.1 and np.abs(got.astype(np.float32) - expected).max() <= tolerance
    assert np.abs(got - plain(images)).max() > 100 * tolerance  # the mirror made a difference


def test_tta_flip_is_a_key_part_and_none_leaves_old_keys_alone(npz_dataset, tmp_path):
    from pipeline.datasets import load_dataset

    ds = load_dataset(npz_dataset)
    none, flip = (tiny(npz_dataset, tmp_path, tta=t).key_parts(ds) for t in ("none", "flip"))
    assert "tta" not in none and flip == {**none, "tta": "flip"}
    path = extract_features(tiny(npz_dataset, tmp_path, tta="flip")).path
    assert path != extract_features(tiny(npz_dataset, tmp_path)).path
    with pytest.raises(PipelineError, match="tta = 'rotate': use one of none, flip"):
        tiny(npz_dataset, tmp_path, tta="rotate").validate()


def test_a_resume_that_only_merges_says_so_instead_of_zero_images_per_second(npz_dataset, tmp_path,
                                                                            monkeypatch, caplog):
    from pipeline.store import FeatureStore

    real_publish = FeatureStore.publish

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed after the last shard, before the file was made

    monkeypatch.setattr(FeatureStore, "publish", crash)
    with pytest.raises(KeyboardInterrupt):
        extract_features(tiny(npz_dataset, tmp_path))
    monkeypatch.setattr(FeatureStore, "publish", real_publish)
    with caplog.at_level("INFO", logger="pipeline"):
        result = extract_features(tiny(npz_dataset, tmp_path))
    assert result.status == "resumed"
    [wrote] = [m for m in caplog.messages if m.startswith("wrote ")]
    assert "every row was extracted before" in wrote and "img/s" not in wrote


def test_renamed_images_keep_their_features_and_get_their_new_names(tmp_path, caplog):
    """Ids are not in the key (the features follow from the images' content and order); a
    rename that keeps both leaves the file current and rewrites only its row ids."""
    from conftest import write_image_folder_split

    from pipeline.store import FeatureFile, check_file

    root = tmp_path / "photos"
    write_image_folder_split(root / "train", 4, seed=1)
    write_image_folder_split(root / "test", 2, seed=2)
    config = ExtractionConfig(dataset=f"folder:{root}", backbone="mobilenet_v2", alpha=0.35,
                              weights="none", image_size=32, cache_dir=str(tmp_path / "cache"))
    first = extract_features(config)
    with FeatureFile(first.path) as ff:
        before, old_ids = ff.features("test")[()], ff.ids("test")
    assert old_ids[0] == "test/c0/0.png"
    (root / "test" / "c0" / "0.png").rename(root / "test" / "c0" / "0 (renamed).png")  # same order
    with caplog.at_level("INFO", logger="pipeline.extraction"):
        again = extract_features(config)
    assert again.status == "up-to-date" and again.path == first.path
    assert "row ids of" in caplog.text and "updated" in caplog.text
    with FeatureFile(again.path) as ff:
        assert ff.ids("test") == ["test/c0/0 (renamed).png", *old_ids[1:]]
        assert np.array_equal(ff.features("test")[()], before)
    assert check_file(again.path, full=True) is None
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.extraction"):
        extract_features(config)
    assert "row ids of" not in caplog.text  # nothing to update the second time


def test_the_first_rerun_after_extracting_a_fresh_copy_reads_no_image_again(tmp_path, monkeypatch,
                                                                           caplog):
    """Copy, then extract, is what users do: the files are too new for the scan to trust by
    their stat, but the extraction reads each one and checks its sha256; the scan index
    records that, so the rerun is a no-op that reads nothing."""
    from conftest import write_image_folder_split

    from pipeline import datasets

    monkeypatch.setattr(datasets.ScanIndex, "RACY_NS", 500_000_000)  # 0.5 s instead of 2 s
    root = tmp_path / "photos"
    write_image_folder_split(root / "train", 4, seed=1)
    write_image_folder_split(root / "test", 2, seed=2)
    just_now = time.time() - 0.2  # copied a moment before the scan: racy
    for path in root.rglob("*.png"):
        os.utime(path, (just_now, just_now))
    config = ExtractionConfig(dataset=f"folder:{root}", backbone="mobilenet_v2", alpha=0.35,
                              weights="none", image_size=32, cache_dir=str(tmp_path / "cache"))
    from pipeline import extraction

    start = extraction.start_model
    monkeypatch.setattr(extraction, "start_model",  # as a real network's start-up takes seconds
                        lambda *a, **k: (time.sleep(0.6), start(*a, **k))[1])
    with caplog.at_level("INFO", logger="pipeline"):
        extract_features(config)
    assert "the scan index now trusts 18 image file(s)" in caplog.text
    read = []
    scan_file = datasets._scan_file
    monkeypatch.setattr(datasets, "_scan_file", lambda item: (read.append(item.path), scan_file(item))[1])
    assert extract_features(config).status == "up-to-date"
    assert read == []  # nothing read again (before, all 18 files were: racy by their stat)


@pytest.mark.skipif(not runtimes.installed("onnxruntime"), reason="needs ONNX Runtime")
def test_a_ray_driver_converts_the_graph_once_into_the_cache_without_loading_tensorflow(
        npz_dataset, tmp_path):
    """``keep_converted``: what the Ray driver runs before its actors start, so that each of
    them only loads the graph."""
    config = tiny(npz_dataset, tmp_path, runtime="onnxruntime")
    code = ("import sys, pickle; from pipeline.extraction import keep_converted; "
            "config = pickle.loads(sys.stdin.buffer.read()); "
            "print(keep_converted(config, (32, 32, 3), 'onnxruntime'), 'tensorflow' in sys.modules)")
    said = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(config), cwd=REPO,
                          capture_output=True, check=True).stdout.decode().split()
    assert said[-2:] == ["onnxruntime", "False"]
    kept = FeatureStore(tmp_path).model_dir(config.model_key((32, 32, 3))) / "onnxruntime"
    stamp = (kept / "manifest.json").stat().st_mtime_ns
    assert keep_converted(config, (32, 32, 3), "onnxruntime") == "onnxruntime"
    assert (kept / "manifest.json").stat().st_mtime_ns == stamp  # kept: not converted again


@pytest.mark.skipif(not runtimes.installed("onnxruntime"), reason="needs ONNX Runtime")
def test_a_conversion_apart_stopped_midway_keeps_nothing_and_leaves_no_process(npz_dataset,
                                                                              tmp_path, monkeypatch):
    """What a Ray driver does when the cluster it reached has GPUs: the conversion it began
    while connecting is stopped."""
    config = tiny(npz_dataset, tmp_path, runtime="onnxruntime")
    stop, children, popen = threading.Event(), [], subprocess.Popen

    def recorded(*args, **kw):
        children.append(popen(*args, **kw))
        threading.Timer(0.5, stop.set).start()  # mid-start: the child imports TensorFlow
        return children[-1]

    monkeypatch.setattr(subprocess, "Popen", recorded)
    with pytest.raises(ConversionStopped):
        keep_converted(config, (32, 32, 3), "onnxruntime", apart=True, stop=stop)
    [child] = children
    assert child.poll() == -signal.SIGKILL  # ended, and reaped
    folder = FeatureStore(tmp_path).model_dir(config.model_key((32, 32, 3)))
    assert not folder.exists() or not any(folder.iterdir())  # no graph kept, nothing half-written
    monkeypatch.undo()
    assert keep_converted(config, (32, 32, 3), "onnxruntime", apart=True) == "onnxruntime"


def test_a_graph_the_runtime_cannot_take_sends_the_ray_workers_to_tensorflow(npz_dataset, tmp_path,
                                                                              monkeypatch, caplog):
    def cannot(*args, **kwargs):
        raise runtimes.ConversionError("openvino cannot convert mobilenet_v2 avg (a test)")

    monkeypatch.setattr(runtimes, "installed", lambda name: True)
    monkeypatch.setattr(runtimes, "load_kept", lambda folder, name: None)
    monkeypatch.setattr(runtimes, "load_or_convert", cannot)
    monkeypatch.setattr(FeatureModel, "_convert_apart", cannot)
    with caplog.at_level("WARNING", logger="pipeline"):
        assert keep_converted(tiny(npz_dataset, tmp_path), (32, 32, 3), "openvino") == "tensorflow"
    assert [m for m in caplog.messages if "cannot convert" in m and "TensorFlow instead" in m]
