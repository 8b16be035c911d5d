"""Runtimes: OpenVINO and ONNX Runtime run the very graph TensorFlow runs, to float32 rounding,
converted once and kept; what they cannot take runs on TensorFlow with one line saying so."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import types
from dataclasses import asdict

import numpy as np
import pytest
from conftest import REPO, write_npz_dataset

from pipeline import extraction as extract_module
from pipeline import runtimes
from pipeline.errors import PipelineError
from pipeline.extraction import ExtractionConfig, FeatureModel, extract_features
from pipeline.store import FeatureFile

# tf2onnx imports TensorFlow: conversions then run in this process (FeatureModel._converts_apart),
# where the tests' monkeypatches reach them; tests of the converting child start fresh processes.
if os.environ.get("CI"):  # CI installs the extras: these tests must run there
    openvino = runtimes.import_openvino()  # (as the pipeline does: after oneDAL's TBB)
    import tf2onnx
else:  # looked up, not imported: importing OpenVINO before oneDAL breaks oneDAL's import
    for name in ("openvino", "tf2onnx", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed", allow_module_level=True)
    openvino = runtimes.import_openvino()
    import tf2onnx
CONVERTED = ("openvino", "onnxruntime")

# Float32 on both sides; the engines sum in different orders. Features here range to about 6.
ATOL, MIN_COSINE = 1e-3, 0.99999


def tiny(dataset: str, cache, **kw) -> ExtractionConfig:
    defaults = dict(backbone="mobilenet_v2", alpha=0.35, weights="none", image_size=32,
                    batch_size=8, cache_dir=str(cache), shard_rows=16)
    return ExtractionConfig(dataset=dataset, **{**defaults, **kw})


def _rows(path):
    with FeatureFile(path) as ff:
        return {s: ff.features(s)[()] for s in ("train", "test")}, ff.attrs["provenance"]


def assert_close(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    # float16 maps: a float32 difference far below 1e-3 can round to the neighbouring float16,
    # one step apart (0.0039 for values in 4..8), so the bound there is one float16 step.
    atol = max(ATOL, float(np.spacing(np.abs(b).max().astype(np.float16)))) if b.dtype == np.float16 \
        else ATOL
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    diff = float(np.abs(a - b).max())
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.abs(a).max(1) == 0) & (np.abs(b).max(1) == 0)  # equal rows, no direction
    cosine = float(np.where(both_zero, 1.0, (a * b).sum(1) / np.maximum(norms, 1e-30)).min())
    assert diff <= atol and cosine >= MIN_COSINE, (diff, cosine)
    return diff, cosine


@pytest.fixture
def dataset(tmp_path):
    return write_npz_dataset(tmp_path / "d.npz", 40, 16)


@pytest.mark.parametrize("mode", [dict(mode="avg"), dict(mode="max"),
                                  dict(mode="avg", layers=("block_3_expand_relu", "out_relu")),
                                  dict(mode="bottleneck", bottleneck_k=8),
                                  dict(mode="spatial", image_size=64)])
@pytest.mark.parametrize("runtime", CONVERTED)
def test_each_runtime_gives_tensorflows_features_in_every_mode(dataset, tmp_path, mode, runtime):
    tf_rows, tf_prov = _rows(extract_features(tiny(dataset, tmp_path / "tf", runtime="tensorflow",
                                                   **mode)).path)
    ov = extract_features(tiny(dataset, tmp_path / "ov", runtime=runtime, **mode))
    ov_rows, ov_prov = _rows(ov.path)
    assert tf_prov["runtime"] == "tensorflow" and ov_prov["runtime"] == runtime
    assert ov_prov["versions"][runtime] == __import__(runtime).__version__
    for split in ("train", "test"):
        assert ov_rows[split].dtype == tf_rows[split].dtype  # float16 maps stay float16
        assert_close(ov_rows[split], tf_rows[split])


def test_auto_is_the_first_installed_cpu_runtime_and_the_runtime_is_not_a_key_part(
        dataset, tmp_path, monkeypatch):
    # The measured rule (benchmarks/extract.json): ONNX Runtime for the MobileNets,
    # OpenVINO for the rest; the next installed one where the first is missing.
    assert runtimes.choose("auto", "mobilenet_v2") == runtimes.choose("auto", "mobilenet") \
        == "onnxruntime"
    assert runtimes.choose("auto", "resnet50") == runtimes.choose("auto") == "openvino"
    assert runtimes.choose("auto", "efficientnet_b5") == "openvino"
    with monkeypatch.context() as m:
        m.setattr(runtimes, "installed", lambda name: name != "openvino")
        assert runtimes.choose("auto", "resnet50") == "onnxruntime"
        m.setattr(runtimes, "installed", lambda name: name != "onnxruntime")
        assert runtimes.choose("auto", "mobilenet") == "openvino"
    auto = extract_features(tiny(dataset, tmp_path / "a", runtime="auto"))
    assert auto.info["runtime"] == "onnxruntime"
    tf = extract_features(tiny(dataset, tmp_path / "b", runtime="tensorflow"))
    assert auto.path.name == tf.path.name  # the same features, to float32 rounding: one key


def _no_conversion(monkeypatch, runtime, error):
    def fail(*a, **k):
        raise error

    if runtime == "openvino":
        monkeypatch.setattr(openvino, "convert_model", fail)
    else:
        monkeypatch.setattr(tf2onnx.convert, "from_function", fail)


@pytest.mark.parametrize("runtime, files, blob", [
    ("openvino", ["manifest.json", "model.bin", "model.xml"], "model.bin"),
    ("onnxruntime", ["manifest.json", "model.onnx"], "model.onnx")])
def test_the_converted_graph_is_kept_reused_and_rebuilt_when_damaged(dataset, tmp_path, monkeypatch,
                                                                    caplog, runtime, files, blob):
    first = extract_features(tiny(dataset, tmp_path, runtime=runtime))
    [model_dir] = (tmp_path / ".models").iterdir()
    assert sorted(p.name for p in (model_dir / runtime).iterdir()) == files
    reference = _rows(first.path)[0]
    with monkeypatch.context() as m:
        _no_conversion(m, runtime, AssertionError("converted again"))
        again = extract_features(tiny(dataset, tmp_path, runtime=runtime), rebuild=True)
    rows = _rows(again.path)[0]
    assert all(np.array_equal(rows[s], reference[s]) for s in rows)  # same runtime: same bits
    damaged = model_dir / runtime / blob
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # half-written
    with caplog.at_level("WARNING", logger="pipeline"):
        third = extract_features(tiny(dataset, tmp_path, runtime=runtime), rebuild=True)
    assert any("is damaged" in m and "converting again" in m for m in caplog.messages)
    rows = _rows(third.path)[0]
    assert all(np.array_equal(rows[s], reference[s]) for s in rows)


def test_a_half_written_graph_left_by_a_killed_conversion_is_removed(dataset, tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        model_dir = tmp_path / ".models" / "somewhere"
        dead, running = (model_dir / f".openvino.tmp-{pid}" for pid in (2**22 + 1, alive.pid))
        for folder in (dead, running):
            folder.mkdir(parents=True)
            (folder / "model.bin").write_bytes(b"half")
        runtimes.load_or_convert(model_dir, lambda: FeatureModel(
            tiny(dataset, tmp_path), (16, 16, 3))._features, "mobilenet_v2 avg", "openvino")
        assert not dead.exists() and running.exists()  # another process's conversion goes on
        assert (model_dir / "openvino" / "manifest.json").exists()
    finally:
        alive.kill()


def extract_in_a_fresh_process(config: ExtractionConfig) -> str:
    """``extract_features(config)`` in a new Python process: its status, its runtime and
    whether it loaded TensorFlow or Keras."""
    code = ("import json, sys; from pipeline.extraction import ExtractionConfig, extract_features; "
            "r = extract_features(ExtractionConfig(**json.loads(sys.argv[1]))); "
            "print('RESULT', r.status, r.info['runtime'], "
            "sorted({'tensorflow', 'keras'} & set(sys.modules)))")
    options = {k: v for k, v in asdict(config).items() if v != ()}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(options)], capture_output=True,
                          text=True, cwd=REPO)
    return proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_kept_converted_graph_runs_without_keras_or_tensorflow(dataset, tmp_path, runtime):
    extract_features(tiny(dataset, tmp_path, runtime=runtime))  # converts and keeps the graph
    other = write_npz_dataset(tmp_path / "other.npz", 24, 16)  # new features, the same graph
    said = extract_in_a_fresh_process(tiny(other, tmp_path, runtime=runtime))
    assert f"RESULT created {runtime} []" in said, said
    rows = _rows(extract_features(tiny(other, tmp_path, runtime=runtime)).path)[0]  # cached now
    reference = _rows(extract_features(tiny(other, tmp_path / "tf", runtime="tensorflow")).path)[0]
    for split in rows:
        assert_close(rows[split], reference[split])


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_first_run_converts_in_a_child_never_loads_tensorflow_and_gives_the_same_bits(
        dataset, tmp_path, runtime):
    said = extract_in_a_fresh_process(tiny(dataset, tmp_path / "apart", runtime=runtime))
    assert f"RESULT created {runtime} []" in said, said  # converted, and no TensorFlow here
    assert len(list((tmp_path / "apart" / ".models").glob(f"*/{runtime}/manifest.json"))) == 1
    apart = extract_features(tiny(dataset, tmp_path / "apart", runtime=runtime))
    here = extract_features(tiny(dataset, tmp_path / "here", runtime=runtime))  # (tests load TF)
    assert apart.status == "up-to-date" and here.status == "created"
    for split, rows in _rows(apart.path)[0].items():
        assert np.array_equal(rows, _rows(here.path)[0][split])


@pytest.mark.parametrize("child, why", [
    ("import os, pickle, sys; job = pickle.load(sys.stdin.buffer); "  # killed mid-write
     "d = job[4] / f'.{job[3]}.tmp-{os.getpid()}'; d.mkdir(parents=True); "
     "(d / 'half').write_bytes(b'x'); os.kill(os.getpid(), 9)",
     "the converting process failed (killed by signal 9: out of memory?)"),
    ("import sys; print('onnxruntime cannot convert mobilenet_v2 (FancyOp)'); sys.exit(3)",
     "onnxruntime cannot convert mobilenet_v2 (FancyOp)"),
    ("raise MemoryError('std::bad_alloc')",
     "the converting process failed (MemoryError: std::bad_alloc)")])
def test_a_converting_process_that_fails_leaves_nothing_and_the_run_goes_on_on_tensorflow(
        dataset, tmp_path, monkeypatch, caplog, child, why):
    monkeypatch.setattr(FeatureModel, "_converts_apart", lambda self: True)
    monkeypatch.setattr(extract_module, "CONVERT_CHILD", child)
    with caplog.at_level("WARNING", logger="pipeline"):
        result = extract_features(tiny(dataset, tmp_path, runtime="onnxruntime"))
    [line] = [m for m in caplog.messages if "cannot convert" in m]
    assert why in line and line.endswith("running on TensorFlow instead")
    assert result.info["runtime"] == "tensorflow"
    assert not [p for p in (tmp_path / ".models").rglob("*") if p.is_file()]


def test_bad_options_fail_in_the_converting_process_with_their_own_line(dataset, tmp_path,
                                                                      monkeypatch, caplog):
    monkeypatch.setattr(FeatureModel, "_converts_apart", lambda self: True)
    with caplog.at_level("WARNING", logger="pipeline"), pytest.raises(
            PipelineError, match=r"^backbone 'mobilenet_v2' has no layer named in "
                                 r"\['no_such_layer'\]; its last layers are: .*out_relu$"):
        extract_features(tiny(dataset, tmp_path, runtime="onnxruntime", layers=("no_such_layer",)))
    assert not caplog.messages  # raised from the child's line, not by a fallback to TensorFlow


@pytest.mark.parametrize("mode", ["avg", "spatial"])
@pytest.mark.parametrize("runtime", CONVERTED)
def test_efficientnet_runs_on_each_runtime_and_matches_tensorflow(dataset, tmp_path, runtime, mode):
    # Its Normalization layer's mean and variance are tensors the graph captures from outside
    # (not variables): tf2onnx exports them as graph inputs nobody feeds unless we freeze them.
    config = dict(backbone="efficientnet_b0", alpha=None, mode=mode)
    converted = extract_features(tiny(dataset, tmp_path / runtime, runtime=runtime, **config))
    reference = extract_features(tiny(dataset, tmp_path / "tf", runtime="tensorflow", **config))
    assert converted.info["runtime"] == runtime
    rows, tf_rows = _rows(converted.path)[0], _rows(reference.path)[0]
    for split in rows:
        assert_close(rows[split], tf_rows[split])
    if runtime == "openvino":  # OpenVINO's front end made 52 outputs, one per activation: each
        # held for a whole batch, about 1 GiB per image on EfficientNetB5. Only the features
        # (in the spatial mode they are the last activation: two outputs of one tensor).
        [model_xml] = (tmp_path / runtime / ".models").rglob("model.xml")
        assert len(openvino.Core().read_model(model_xml).outputs) == 1


@pytest.mark.parametrize("runtime", CONVERTED)
def test_only_a_graph_kept_by_an_earlier_conversion_is_converted_again(dataset, tmp_path, caplog,
                                                                      runtime):
    first = extract_features(tiny(dataset, tmp_path, runtime=runtime))
    reference = _rows(first.path)[0]
    [manifest] = (tmp_path / ".models").rglob("manifest.json")
    current = runtimes.REGISTRY[runtime].revision
    assert json.loads(manifest.read_text())["revision"] == current
    # None: kept before revisions existed (counts as 1)
    for revision, converted_again in ((current, False), (current - 1, True), (None, True)):
        kept = json.loads(manifest.read_text())
        kept.pop("revision")
        manifest.write_text(json.dumps(kept if revision is None else {**kept, "revision": revision}))
        caplog.clear()
        with caplog.at_level("INFO", logger="pipeline"):
            again = extract_features(tiny(dataset, tmp_path, runtime=runtime), rebuild=True)
        assert any("from an earlier conversion; converting again" in m
                   for m in caplog.messages) == converted_again, revision
        assert json.loads(manifest.read_text()).get("revision") == (current if converted_again
                                                                    else revision)
        rows = _rows(again.path)[0]
        assert all(np.array_equal(rows[s], reference[s]) for s in rows)


def test_efficientnets_normalization_constants_reach_the_onnx_graph(tmp_path):
    # With weights "none" its mean is 0 and its variance 1: set others, so that a graph that
    # lost them (or froze the defaults) would differ.
    x = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
    models = [FeatureModel(tiny("npz:unused", tmp_path, backbone="efficientnet_b0", alpha=None),
                           x.shape[1:]) for _ in range(2)]
    norm = next(layer for layer in models[0].backbone.layers if type(layer).__name__ == "Normalization")
    norm.adapt_mean.assign(np.array([0.3, 0.5, 0.7], np.float32))
    norm.adapt_variance.assign(np.array([0.02, 0.05, 0.09], np.float32))
    norm.finalize_state()
    reference, default = models[0](x), models[1](x)
    assert models[0].use_runtime("onnxruntime", tmp_path / "m", "efficientnet_b0 avg") == "onnxruntime"
    diff, cosine = assert_close(models[0](x), reference)
    assert np.abs(default - reference).max() > 100 * diff  # the constants change the features


@pytest.mark.slow
def test_an_export_onnx_runtime_cannot_load_runs_on_tensorflow_says_why_and_keeps_nothing(
        dataset, tmp_path, caplog):
    # ConvNeXt's grouped convolutions are XLA-compiled TensorFlow calls that tf2onnx keeps as
    # they are: the export "succeeds" and ONNX Runtime refuses the graph (bench conversions).
    config = dict(backbone="convnext_tiny", alpha=None)
    with caplog.at_level("WARNING", logger="pipeline"):
        result = extract_features(tiny(dataset, tmp_path, runtime="onnxruntime", **config))
    [line] = [m for m in caplog.messages if "cannot convert" in m]
    assert "onnxruntime cannot convert convnext_tiny avg" in line
    assert "No Op registered for StatefulPartitionedCall" in line and "on TensorFlow instead" in line
    assert result.info["runtime"] == "tensorflow"
    assert not list((tmp_path / ".models").rglob("*.*"))


def test_the_onnx_export_runs_without_undo_copies_and_with_them_only_if_a_pass_fails(
        dataset, tmp_path, monkeypatch):
    real, seen = tf2onnx.convert.from_function, []

    def a_pass_fails_without_undo(*args, **kwargs):
        seen.append(os.environ.get("TF2ONNX_CATCH_ERRORS"))
        if seen[-1] == "FALSE":
            raise RuntimeError("a pass failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tf2onnx.convert, "from_function", a_pass_fails_without_undo)
    result = extract_features(tiny(dataset, tmp_path, runtime="onnxruntime"))
    assert result.info["runtime"] == "onnxruntime" and seen == ["FALSE", None]  # None: the default
    assert "TF2ONNX_CATCH_ERRORS" not in os.environ


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_graph_a_runtime_cannot_convert_runs_on_tensorflow_and_says_so(dataset, tmp_path,
                                                                        monkeypatch, caplog,
                                                                        runtime):
    _no_conversion(monkeypatch, runtime, RuntimeError("unsupported operation FancyOp"))
    with caplog.at_level("WARNING", logger="pipeline"):
        result = extract_features(tiny(dataset, tmp_path / "ov", runtime=runtime))
    [line] = [m for m in caplog.messages if "cannot convert" in m]
    assert f"{runtime} cannot convert mobilenet_v2 avg" in line
    assert "FancyOp" in line and "running on TensorFlow instead" in line
    rows, prov = _rows(result.path)
    assert prov["runtime"] == "tensorflow" and not list((tmp_path / "ov" / ".models").rglob("*.*"))
    reference = _rows(extract_features(tiny(dataset, tmp_path / "tf", runtime="tensorflow")).path)[0]
    assert all(np.array_equal(rows[s], reference[s]) for s in rows)


class _FirstBatchWaitsForTheThird:
    """A stand-in engine: batch i is an array of i; batch 0 finishes only once batch 2 has
    started, as a long batch still runs while a short one (a split's last) is done."""

    def __init__(self):
        self.started = [threading.Event() for _ in range(4)]

    def run(self, images: np.ndarray) -> np.ndarray:
        i = int(images.flat[0])
        self.started[i].set()
        if i == 0 and not self.started[2].wait(10):
            raise AssertionError("batch 2 did not start while batch 0 ran")
        return images * 2


class _Request:  # an OpenVINO infer request on the stand-in engine
    def __init__(self, engine):
        self.engine, self.thread, self.out, self.error = engine, None, None, None

    def start_async(self, inputs):
        def run():
            try:
                self.out = self.engine.run(inputs[0])
            except AssertionError as exc:
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def wait(self):
        self.thread.join()
        if self.error:
            raise self.error

    def get_output_tensor(self, _):
        return types.SimpleNamespace(data=self.out)


@pytest.mark.parametrize("runtime", CONVERTED)
def test_the_runner_starts_the_next_batches_while_the_oldest_still_runs(monkeypatch, runtime):
    engine, no_projection = _FirstBatchWaitsForTheThird(), (np.zeros(1), np.zeros((1, 1)))
    if runtime == "openvino":
        compiled = types.SimpleNamespace(create_infer_request=lambda: _Request(engine))
        monkeypatch.setattr(openvino, "Core", lambda: types.SimpleNamespace(
            compile_model=lambda *_: compiled))
        runner = runtimes.OpenVINORunner("model", requests=2)
    else:
        runner = runtimes.OnnxRunner.__new__(runtimes.OnnxRunner)
        runner.session = types.SimpleNamespace(run=lambda _, feed: [engine.run(feed["images"])])
        runner.names, runner.workers, runner.rows = ["images"], 2, 64
    batches = [np.full((2, 1), i, np.float32) for i in range(4)]
    out = list(runner.map(batches, *no_projection))
    assert [o.ravel().tolist() for o in out] == [[2 * i, 2 * i] for i in range(4)]  # in order


@pytest.mark.parametrize("runtime", CONVERTED)
def test_a_batch_runs_two_224_images_at_a_time_with_the_same_features(tmp_path, runtime):
    model = FeatureModel(tiny("npz:unused", tmp_path, image_size=224), (32, 32, 3))
    model.use_runtime(runtime, tmp_path / "model", "mobilenet_v2")
    runs = []
    if runtime == "onnxruntime":
        session_run = model.runner.session.run
        model.runner.session = types.SimpleNamespace(
            run=lambda names, feed: runs.append(len(feed["images"])) or session_run(names, feed))
    else:
        for request in model.runner.requests:
            request.start_async = (lambda start: lambda inputs: runs.append(len(inputs[0])) or
                                   start(inputs))(request.start_async)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
    sliced = np.concatenate(list(model.map([images, images[:1]])))
    assert sorted(runs) == [1, 1, 2, 2] and len(sliced) == 6  # (two batches run at once)
    model.runner.rows = 64
    assert np.array_equal(sliced, np.concatenate(list(model.map([images, images[:1]]))))  # bit for bit
    assert sorted(runs[4:]) == [1, 5]
    assert runtimes.rows_per_run(112) == 8 and runtimes.rows_per_run(32) == 98  # smaller: more


def test_slices_of_batches_are_joined_again_batch_by_batch_in_order():
    def batches():
        yield from (np.arange(lo, hi) for lo, hi in [(0, 5), (5, 6), (6, 10)])
        raise OSError("unreadable image")

    seen, out = [], []
    with pytest.raises(OSError, match="unreadable image"):
        for features in runtimes.in_slices(batches(), 2, lambda slices: (
                seen.append(len(s)) or s * 10 for s in slices)):
            out.append(features.tolist())
    assert seen == [2, 2, 1, 1, 2, 2]
    assert out == [[0, 10, 20, 30, 40], [50], [60, 70, 80, 90]]  # every whole batch, then the error


def test_a_batch_that_fails_to_arrive_raises_after_the_results_of_those_before_it():
    def batches():  # the third image batch cannot be read
        yield from (np.full(1, i) for i in range(2))
        raise OSError("unreadable image")

    done = []
    with pytest.raises(OSError, match="unreadable image"):
        for features in runtimes.in_order(batches(), lambda b: b * 2, lambda r: r, depth=4):
            done.append(int(features[0]))
    assert done == [0, 2]  # both started batches finished, so extraction keeps their rows


@pytest.mark.bad_input
def test_a_missing_or_unknown_runtime_is_one_line(monkeypatch):
    with pytest.raises(PipelineError, match="unknown runtime 'onnx'; use one of auto, tensorflow"):
        runtimes.choose("onnx")
    monkeypatch.setattr(runtimes, "installed", lambda name: name == "tensorflow")
    with pytest.raises(PipelineError, match=r"--runtime openvino needs openvino: pip install '\.\[openvino"):
        runtimes.choose("openvino")
    with pytest.raises(PipelineError, match=r"--runtime onnxruntime needs onnxruntime: pip install "
                                            r"'\.\[onnx\]'"):
        runtimes.choose("onnxruntime")
    assert runtimes.choose("auto") == "tensorflow"  # auto never needs what is missing


@pytest.mark.slow
@pytest.mark.parametrize("backbone, alpha", [("mobilenet", 0.25), ("mobilenet_v2", 0.35)])
def test_each_runtime_matches_tensorflow_on_real_images_and_weights(cifar_mini, shared_weights, tmp_path,
                                                                backbone, alpha):
    spec = f"folder:{cifar_mini}"
    layers = {"mobilenet": ("conv_pw_5_relu", "conv_pw_13_relu"),
              "mobilenet_v2": ("block_6_expand_relu", "out_relu")}[backbone]
    worst = []
    for mode in (dict(mode="avg"), dict(mode="avg", layers=layers),
                 dict(mode="bottleneck", bottleneck_k=32), dict(mode="spatial")):
        rows = {}
        for runtime in ("tensorflow", *CONVERTED):
            config = ExtractionConfig(dataset=spec, backbone=backbone, alpha=alpha, limit=200,
                                      batch_size=50, cache_dir=str(tmp_path / runtime), runtime=runtime,
                                      **mode)
            rows[runtime] = _rows(extract_features(config).path)[0]["test"]
        worst += [(runtime, mode["mode"], len(mode.get("layers", ())),
                   *assert_close(rows[runtime], rows["tensorflow"])) for runtime in CONVERTED]
    print(f"\n{backbone}@{alpha} (runtime, mode, layers, max abs diff, min cosine): {worst}")

