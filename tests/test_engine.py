"""The Ray engine: sharded extraction equal to the single-process one, resumable per shard,
published as a virtual dataset or a merged file that readers cannot tell apart."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import LEDGER, REPO, audit_cache, h5dump_features, make_images, write_npz_dataset

try:
    import ray
except ImportError:
    if os.environ.get("CI"):  # CI installs the extra: these tests must run there
        raise
    pytest.skip("Ray is an optional extra: make install RAY=1", allow_module_level=True)

from pipeline import runtimes  # noqa: E402
from pipeline.engine import RayEngine  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.extraction import ExtractionConfig, extract_features  # noqa: E402
from pipeline.heads import load_features  # noqa: E402
from pipeline.store import FeatureFile, FeatureStore, check_file  # noqa: E402

# Shards hold whole batches, so each image meets the same batch as in one process; the
# per-actor thread count still changes TensorFlow's summation order, so values are equal
# to float32 rounding, not bit for bit.
RTOL, ATOL = 1e-5, 1e-6



@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def no_cluster():
    """For tests of the engine's own start and stop: no instance left by the tests above."""
    if ray.is_initialized():
        ray.shutdown()


def ray_instance(num_cpus: int):
    """A Ray instance of its own (a ``ray.cluster_utils.Cluster`` head), as `ray start`
    leaves one. Ray gives its node 30 s to come up; twice in 18 runs of the connection tests
    on this shared machine, right after a clean-clone CI run, the node's raylet never
    started (no log of it) and Ray gave up: tried once more, as a user would."""
    from ray.cluster_utils import Cluster

    for attempt in (1, 2):
        try:
            return Cluster(initialize_head=True,
                           head_node_args={"num_cpus": num_cpus, "include_dashboard": False})
        except Exception as exc:  # Ray raises a bare Exception for it
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise


@pytest.fixture
def dataset(tmp_path):
    return write_npz_dataset(tmp_path / "data.npz", 70, 30)


def tiny(dataset: str, cache, **kw) -> ExtractionConfig:
    defaults = dict(backbone="mobilenet_v2", alpha=0.35, weights="none", image_size=32,
                    batch_size=8, cache_dir=str(cache))
    return ExtractionConfig(dataset=dataset, **{**defaults, **kw})


def _rows(path):
    with FeatureFile(path) as ff:
        return {s: (ff.features(s)[()], ff.labels(s)) for s in ("train", "test")}


def _rows_provenance(path):
    with FeatureFile(path) as ff:
        return ff.attrs["provenance"]


def _extract_and_list_shards(engine, dataset, cache):
    """Extract; return the result, its rows, and its shard set."""
    result = engine.extract(tiny(dataset, cache))
    with FeatureFile(result.path) as ff:
        parts = ff.attrs["key_parts"]
    return result, _rows(result.path), FeatureStore(cache).shards_for(parts)


def _assert_same(a, b):
    for split in ("train", "test"):
        np.testing.assert_allclose(a[split][0], b[split][0], rtol=RTOL, atol=ATOL)
        assert (a[split][1] == b[split][1]).all()


@pytest.mark.parametrize("layout", ["vds", "merge"])
def test_sharded_extraction_equals_the_single_process_one(cluster, dataset, tmp_path, layout):
    single = extract_features(tiny(dataset, tmp_path / "single"))
    with RayEngine(shards=3, layout=layout) as engine:
        result = engine.extract(tiny(dataset, tmp_path / "ray"))
    assert result.path.name == single.path.name  # the same cache key: the same features
    _assert_same(_rows(result.path), _rows(single.path))
    assert check_file(result.path, full=True) is None
    rows = _rows(result.path)
    for split in ("train", "test"):  # the HDF5 library's own tool reads it, no h5py filters
        assert np.array_equal(h5dump_features(result.path, split, tmp_path), rows[split][0].ravel())
    with FeatureFile(result.path) as ff:  # what the heads read
        prov = ff.attrs["provenance"]
        assert ff.features("train").is_virtual == (layout == "vds")
        data = load_features(ff, "logreg")
    assert data.X_train.shape == (70, 1280) and len(data.y_test) == 30
    assert prov["engine"]["layout"] == layout and prov["engine"]["shard_count"] == 3 + 2
    runtime = runtimes.choose("auto", "mobilenet_v2")  # the actors run what the driver would
    assert prov["runtime"] == runtime == _rows_provenance(single.path)["runtime"]
    assert prov["versions"]["tensorflow"] and prov["device"].startswith("CPU")
    assert (tmp_path / "ray" / result.path.name.replace(".h5", ".shards")).exists() == (layout == "vds")


def test_without_gpus_one_actor_holds_the_nodes_cores_and_shards_are_as_big_as_one_process_writes(
        cluster, dataset, tmp_path):
    with RayEngine() as engine:
        result = engine.extract(tiny(dataset, tmp_path))
    engine_info = result.info["engine"]
    assert engine_info["actors"] == 1 and engine_info["cpus_per_actor"] == 2  # ray.init(num_cpus=2)
    # 70 + 30 rows of 1,280 floats are far under 8 MiB: one shard per split, as in one process
    assert engine_info["shards_this_run"] == 2
    runtime = runtimes.choose("auto", "mobilenet_v2")
    assert result.info["runtime"] == runtime
    if runtime != "tensorflow":  # the graph the driver converted, kept for the actors to load
        assert len(list(tmp_path.glob(f".models/*/{runtime}/manifest.json"))) == 1


@pytest.mark.bad_input
def test_an_actor_whose_start_failed_answers_each_shard_with_the_same_one_line(cluster, dataset,
                                                                             tmp_path):
    """A replacement actor's start is not awaited: its first shard must still get the one
    line, not an attribute error from a model that was never built."""
    from pipeline.datasets import load_dataset
    from pipeline.engine import ShardExtractor, _get

    bad = tiny(dataset, tmp_path, mode="bottleneck", bottleneck_k=5000)  # over the map's channels
    actor = ShardExtractor.options(num_cpus=1).remote(1)
    with pytest.raises(PipelineError) as started:
        _get(actor.start.remote(bad, load_dataset(dataset)))
    with pytest.raises(PipelineError) as shard:
        _get(actor.extract.remote("train", 0, 8, str(tmp_path / "shards"), "k", None, "none"))
    assert str(shard.value) == str(started.value) and "\n" not in str(shard.value)
    assert "--bottleneck-k 5000 exceeds" in str(shard.value)
    ray.kill(actor)


def test_head_fits_on_ray_hold_a_nodes_cores_or_the_threads_asked_for(cluster):
    with RayEngine() as engine:  # dict(**call): each call as the task gave it to the head
        calls = engine.map(dict, [{"threads": None}, {"threads": 1}, {"threads": 64}])
    assert [c["threads"] for c in calls] == [2, 1, 2]  # 2 CPUs: never more than the node's cores


def _spans():
    """A task that records when it ran (a file per task: the driver reads them after); made
    here, so that Ray sends it by value (its workers cannot import this test module)."""
    def span(name: str, seconds: float, threads: int, marks: str, fail: bool = False):
        start = time.time()
        time.sleep(seconds)
        Path(marks, name).write_text(json.dumps([start, time.time(), threads]))
        if fail:
            raise PipelineError(f"{name} failed")
        return name
    return span


def test_head_fits_on_ray_start_in_the_order_given_none_ahead_of_a_wider_one(cluster, tmp_path):
    """Ray left to itself starts a later one-core task beside a running one while an
    every-core task queued before it waits for a whole node (a core idle meanwhile)."""
    calls = [{"name": "narrow-1", "seconds": 2.0, "threads": 1}, {"name": "wide", "seconds": 0.3}] + \
        [{"name": f"narrow-{i}", "seconds": 0.3, "threads": 1} for i in (2, 3, 4)]
    with RayEngine() as engine:
        assert engine.map(_spans(), [{**c, "marks": str(tmp_path)} for c in calls]) == \
            [c["name"] for c in calls]
    ran = {c["name"]: json.loads((tmp_path / c["name"]).read_text()) for c in calls}
    assert ran["wide"][2] == 2 and ran["narrow-2"][2] == 1
    wide_start, wide_end = ran["wide"][:2]
    assert ran["narrow-1"][1] <= wide_start  # the wide one had the node to itself ...
    assert all(ran[f"narrow-{i}"][0] >= wide_end for i in (2, 3, 4))  # ... before the later ones


@pytest.mark.bad_input
def test_a_failed_head_fit_on_ray_stops_the_fits_not_started_and_says_it_in_one_line(cluster,
                                                                                    tmp_path):
    calls = [{"name": "fails", "seconds": 0.2, "threads": 1, "fail": True},
             {"name": "runs", "seconds": 1.0, "threads": 1},
             {"name": "never", "seconds": 0.2, "threads": 1}]
    with RayEngine() as engine, pytest.raises(PipelineError, match="^fails failed$"):
        engine.map(_spans(), [{**c, "marks": str(tmp_path)} for c in calls])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fails", "runs"]


def test_the_bottleneck_is_fitted_once_on_the_cluster_and_applied_to_every_shard(cluster, dataset,
                                                                                 tmp_path):
    config = dict(mode="bottleneck", bottleneck_k=4, bottleneck_fit_images=40)
    single = extract_features(tiny(dataset, tmp_path / "single", **config))
    with RayEngine(shards=3) as engine:
        result = engine.extract(tiny(dataset, tmp_path / "ray", **config))
    _assert_same(_rows(result.path), _rows(single.path))
    with FeatureFile(result.path) as ff:
        assert ff.features("train").shape == (70, 1 * 1 * 4)  # 32x32 input: a 1x1 grid


@pytest.mark.reliability
def test_a_lost_shard_is_the_only_work_redone(cluster, dataset, tmp_path, caplog):
    with RayEngine(shards=4, layout="vds") as engine:
        first, reference, shards = _extract_and_list_shards(engine, dataset, tmp_path)
        kept = {p: p.stat().st_mtime_ns for s in ("train", "test") for p in shards.files(s)}
        lost = shards.files("train")[1]
        first.path.unlink()       # as if the driver died before finalizing ...
        lost.unlink()             # ... and one worker before renaming its shard
        (lost.parent / f".{lost.name}.tmp-999").write_bytes(b"half a shard")
        with caplog.at_level("INFO", logger="pipeline"):
            again = engine.extract(tiny(dataset, tmp_path))
    assert again.status == "resumed" and again.info["images_this_run"] == 24
    assert any(m.startswith("1 shard(s) on ") for m in caplog.messages)
    _assert_same(_rows(again.path), reference)
    redone = [p for p in kept if p.stat().st_mtime_ns != kept[p]]
    assert redone == [lost]
    assert not list(lost.parent.glob(".*.tmp-*"))  # the half shard is cleaned up
    LEDGER["interrupted"] += 1
    LEDGER["resumed"] += 1
    audit_cache(tmp_path)


def test_a_missing_shard_makes_the_virtual_file_untrusted_not_zeros(cluster, dataset, tmp_path):
    with RayEngine(shards=2, layout="vds") as engine:
        result = engine.extract(tiny(dataset, tmp_path))
    shard = next((tmp_path / result.path.name.replace(".h5", ".shards") / "test").glob("r*.h5"))
    shard.unlink()
    assert "missing" in check_file(result.path)
    with pytest.raises(PipelineError, match="cannot be used: test: shard .* is missing"):
        FeatureFile(result.path)


@pytest.mark.reliability
def test_a_damaged_shard_is_moved_aside_and_redone(cluster, dataset, tmp_path):
    with RayEngine(shards=2, layout="vds") as engine:
        first, reference, shards = _extract_and_list_shards(engine, dataset, tmp_path)
        damaged = shards.files("train")[0]
        with h5py.File(damaged, "r+") as f:
            f["features"][0, :5] = 7.0  # bit rot: the shard's sha256 no longer matches
        first.path.unlink()
        with pytest.raises(PipelineError, match="does not match its sha256 .* rerun"):
            engine.extract(tiny(dataset, tmp_path))
        assert not damaged.exists() and list((shards.path / ".quarantine").iterdir())
        again = engine.extract(tiny(dataset, tmp_path))
    _assert_same(_rows(again.path), reference)


def test_second_run_is_a_no_op_and_rebuild_redoes_every_shard(cluster, dataset, tmp_path):
    with RayEngine(shards=2) as engine:
        first = engine.extract(tiny(dataset, tmp_path))
        assert engine.extract(tiny(dataset, tmp_path)).status == "up-to-date"
        rebuilt = engine.extract(tiny(dataset, tmp_path), rebuild=True)
    assert rebuilt.status == "created" and rebuilt.info["images_this_run"] == 100
    assert rebuilt.path == first.path and check_file(rebuilt.path, full=True) is None


@pytest.mark.bad_input
def test_an_image_that_changed_after_the_scan_stops_the_worker_in_one_line(cluster, tmp_path):
    from PIL import Image

    from pipeline.datasets import load_dataset

    x, y = make_images(24, seed=3)
    for i, (image, label) in enumerate(zip(x, y)):
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / f"c{label}" / f"{i:03d}.png")
    spec = f"folder:{tmp_path / 'imgs'}"
    scanned = load_dataset(spec)  # what the driver saw (and keyed the file by) ...
    victim = sorted((tmp_path / "imgs").rglob("*.png"))[0]
    Image.fromarray(255 - x[0]).save(victim)  # ... is not what a worker would read
    with RayEngine(shards=2) as engine:
        with pytest.raises(PipelineError, match=f"{victim.name} changed after the dataset was scanned"):
            engine.extract(tiny(spec, tmp_path / "cache"), dataset=scanned)
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_image_files_the_actors_checked_are_trusted_by_the_next_scan(cluster, tmp_path,
                                                                      monkeypatch, caplog):
    """Files copied just before the scan are "racy"; the actors read each one and check its
    sha256, and the driver records those checks in the scan index as one process does: the
    first rerun reads nothing again."""
    from PIL import Image

    from pipeline import datasets

    monkeypatch.setattr(datasets.ScanIndex, "RACY_NS", 300_000_000)  # 0.3 s instead of 2 s
    x, y = make_images(24, seed=5)
    for i, (image, label) in enumerate(zip(x, y)):
        (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "imgs" / f"c{label}" / f"{i:03d}.png")
    spec, cache = f"folder:{tmp_path / 'imgs'}", tmp_path / "cache"
    with caplog.at_level("INFO", logger="pipeline"), RayEngine(shards=2) as engine:
        engine.extract(tiny(spec, cache))  # the actors read every file > 0.3 s after the copy
    assert any("the scan index now trusts 24 image file(s)" in m for m in caplog.messages)
    read = []
    scan_file = datasets._scan_file
    monkeypatch.setattr(datasets, "_scan_file", lambda item: read.append(item.name) or scan_file(item))
    datasets.load_dataset(spec, scan_index=FeatureStore(cache).scan_dir)
    assert read == []


def test_a_folder_scan_runs_as_cluster_tasks_and_gives_the_local_key(cluster, tmp_path):
    from PIL import Image

    with RayEngine(shards=2) as engine:
        pids = engine.scan_map(lambda _: os.getpid(), list(range(7)), chunk=3)  # by value
        assert len(pids) == 7 and os.getpid() not in pids  # the driver ran none of it
        x, y = make_images(24, seed=4)
        for i, (image, label) in enumerate(zip(x, y)):
            (tmp_path / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(tmp_path / "imgs" / f"c{label}" / f"{i:03d}.png")
            os.utime(tmp_path / "imgs" / f"c{label}" / f"{i:03d}.png", (time.time() - 60,) * 2)
        spec = f"folder:{tmp_path / 'imgs'}"
        calls = []
        real = engine.scan_map
        engine.scan_map = lambda fn, items: calls.append(len(items)) or real(fn, items)
        result = engine.extract(tiny(spec, tmp_path / "cache"))
        again = engine.extract(tiny(spec, tmp_path / "cache"))
    assert calls == [24]  # every file once, on the cluster; the rerun read none (scan index)
    assert again.status == "up-to-date"
    single = extract_features(tiny(spec, tmp_path / "single"))
    assert single.path.name == result.path.name  # same fingerprint, same key
    _assert_same(_rows(result.path), _rows(single.path))


@pytest.mark.reliability
def test_killing_the_driver_keeps_finished_shards_and_the_rerun_does_the_rest(no_cluster, dataset,
                                                                              tmp_path):
    script = (
        "import sys, ray\n"
        "from pipeline.engine import RayEngine\n"
        "from pipeline.extraction import ExtractionConfig\n"
        "ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR')\n"
        f"c = ExtractionConfig(dataset={dataset!r}, backbone='mobilenet_v2', alpha=0.35,\n"
        f"    weights='none', image_size=96, batch_size=8, cache_dir={str(tmp_path)!r})\n"
        "with RayEngine(shards=10) as e: e.extract(c)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    shards_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("*.shards/*/r*.h5"))
        if found:
            shards_dir = found[0].parent.parent
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    LEDGER["interrupted"] += 1
    time.sleep(2)  # let workers orphaned by the kill finish or die
    assert shards_dir is not None, "no shard was finished before the deadline"
    assert not list(tmp_path.glob("*.h5")), "killed before finalizing: no published file"
    before = {p: p.stat().st_mtime_ns for p in shards_dir.glob("*/r*.h5")}
    config = ExtractionConfig(dataset=dataset, backbone="mobilenet_v2", alpha=0.35,
                              weights="none", image_size=96, batch_size=8, cache_dir=str(tmp_path))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with RayEngine(shards=10) as engine:
            result = engine.extract(config)
    finally:
        ray.shutdown()
    assert result.status == "resumed"
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished work kept
    # Workers orphaned by the kill may still finish a shard or two: never more work, only less.
    covered = sum(int(p.stem.split("-")[1]) - int(p.stem.split("-")[0][1:]) for p in before)
    assert 0 < result.info["images_this_run"] <= 100 - covered
    LEDGER["resumed"] += 1
    audit_cache(tmp_path)
    single = extract_features(config.__class__(**{**config.__dict__,
                                                  "cache_dir": str(tmp_path / "single")}))
    _assert_same(_rows(result.path), _rows(single.path))


def _shard_workers() -> dict[int, int]:
    """{pid: parent pid} of every Ray worker process busy extracting a shard right now (Ray
    titles a worker after the method it runs)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith(b"ray::ShardExtractor.extract"):
            found[int(entry)] = parent
    return found


def _when_mid_run(cache, act, pick=lambda workers: next(iter(workers), None), timeout=600):
    """In a thread: once a shard is finished and ``pick`` finds a worker busy with another,
    call ``act(pid)``. Returns the thread and what it saw (the finished shards' mtimes, pid);
    setting ``seen["stop"]`` ends the watch."""
    import threading

    seen = {}

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not seen.get("stop"):
            done = list(Path(cache).glob("*.shards/*/r*.h5"))
            pid = pick(_shard_workers()) if done else None
            if pid is not None:
                seen["kept"] = {p: p.stat().st_mtime_ns for p in done}
                seen["pid"] = pid
                act(pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen


def _check_only_the_lost_shard_was_redone(result, seen, dataset, tmp_path, caplog):
    assert "pid" in seen, "no worker was caught mid-shard"
    engine = result.info["engine"]
    assert engine["shards_redone"] == 1  # the one shard the lost worker held, nothing else
    assert sum("goes back in the queue" in m for m in caplog.messages) == 1
    assert engine["shard_count"] == engine["shards_this_run"]  # each range published once
    assert all(p.stat().st_mtime_ns == t for p, t in seen["kept"].items())  # not redone
    assert result.info["images_this_run"] == 100
    [lost] = [m for m in caplog.messages if "goes back in the queue" in m]
    split, lo, hi = re.search(r"shard (\w+) rows (\d+)-(\d+)", lost).groups()
    [redone] = Path(tmp_path).glob(f"*.shards/{split}/r{int(lo):010d}-*.h5")
    with h5py.File(redone) as f:  # finished by a live worker, not the lost one
        assert json.loads(f.attrs["provenance"])["pid"] != seen["pid"]
        assert len(f["features"]) == int(hi) - int(lo)
    single = extract_features(tiny(dataset, tmp_path / "single", image_size=96,
                                   runtime="tensorflow"))
    _assert_same(_rows(result.path), _rows(single.path))
    LEDGER["interrupted"] += 1
    LEDGER["resumed"] += 1
    audit_cache(tmp_path)


@pytest.mark.reliability
def test_a_worker_killed_mid_shard_costs_only_that_shard(cluster, dataset, tmp_path, caplog):
    thread, seen = _when_mid_run(tmp_path, lambda pid: os.kill(pid, signal.SIGKILL))
    with caplog.at_level("INFO", logger="pipeline"), RayEngine(shards=10) as engine:
        result = engine.extract(tiny(dataset, tmp_path, image_size=96, runtime="tensorflow"))
    seen["stop"] = True
    thread.join()
    _check_only_the_lost_shard_was_redone(result, seen, dataset, tmp_path, caplog)


@pytest.mark.reliability
def test_a_node_removed_mid_run_costs_only_its_shard(no_cluster, dataset, tmp_path, caplog):
    cluster = ray_instance(num_cpus=1)
    node = cluster.add_node(num_cpus=1)
    raylet = node.all_processes["raylet"][0].process.pid
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        thread, seen = _when_mid_run(  # a worker of the second node, busy with a shard
            tmp_path, lambda pid: cluster.remove_node(node),
            pick=lambda workers: next((p for p, parent in workers.items() if parent == raylet), None))
        with caplog.at_level("INFO", logger="pipeline"), RayEngine(shards=10) as engine:
            result = engine.extract(tiny(dataset, tmp_path, image_size=96, runtime="tensorflow"))
        seen["stop"] = True
        thread.join()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.info["engine"]["actors"] == 2
    _check_only_the_lost_shard_was_redone(result, seen, dataset, tmp_path, caplog)


def _experiment(tmp_path, dataset, name):
    text = "\n".join([
        f'cache_dir = "{tmp_path / name / "cache"}"', f'results_dir = "{tmp_path / name / "results"}"',
        "batch_size = 8", "[[datasets]]", 'name = "tiny"', f'source = "{dataset}"',
        "[[backbones]]", 'name = "mobilenet_v2"', "alpha = 0.35", 'weights = "none"',
        "image_size = 32", "[[features]]", 'mode = "avg"',
        "[[heads]]", 'name = "logreg"', "[[heads]]", 'name = "mlp"', "params = { max_epochs = 5 }",
    ]) + "\n"
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def _metrics(results_dir):
    return {p.parent.name.split("-")[0]: json.loads(p.read_text())
            for p in results_dir.glob("*/*/metrics.json")}


def test_run_on_ray_gives_the_single_process_results(no_cluster, dataset, tmp_path):
    from pipeline.cli import main

    assert main(["run", "--config", str(_experiment(tmp_path, dataset, "local"))]) == 0
    assert main(["run", "--config", str(_experiment(tmp_path, dataset, "ray")), "--engine", "ray",
                 "--num-cpus", "2", "--shards", "2"]) == 0
    local, on_ray = _metrics(tmp_path / "local" / "results"), _metrics(tmp_path / "ray" / "results")
    assert set(on_ray) == {"logreg", "mlp"} == set(local)
    assert len(on_ray["logreg"]["sweep"]) >= 8  # the C sweep ran (through Ray's joblib backend)
    assert on_ray["logreg"]["threads"] == on_ray["mlp"]["threads"] == 1  # one-core heads: a core
    for head in local:  # features equal to float32 rounding: the same choices, and at most
        assert on_ray[head]["best_params"] == local[head]["best_params"]  # one test image apart
        n_test = local[head]["n_test"]
        assert abs(on_ray[head]["test_accuracy"] - local[head]["test_accuracy"]) * n_test <= 1 + 1e-9
    assert not ray.is_initialized()  # the engine shuts down the local instance it started


def test_without_engine_ray_is_never_imported(dataset, tmp_path):
    config = _experiment(tmp_path, dataset, "plain")
    code = ("import sys\nfrom pipeline.cli import main\n"
            f"assert main(['run', '--config', {str(config)!r}]) == 0\n"
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')], 'ray imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_no_op_rerun_never_starts_ray(no_cluster, dataset, tmp_path):
    with RayEngine(num_cpus=2) as engine:
        engine.extract(tiny(dataset, tmp_path))
        assert ray.is_initialized()  # there was work: Ray started for it ...
    assert not ray.is_initialized()  # ... and stopped with the engine
    with RayEngine(num_cpus=2) as engine:
        assert engine.extract(tiny(dataset, tmp_path)).status == "up-to-date"
        assert not ray.is_initialized()  # nothing to do: no start, no stop (about 3.5 s here)


def test_stopping_a_local_instance_leaves_none_of_its_processes_running(no_cluster):
    with RayEngine(num_cpus=2) as engine:
        engine.slots()  # work that needs Ray: the engine starts a local instance
        processes = {kind: [info.process for info in infos] for kind, infos
                     in ray._private.worker._global_node.all_processes.items()}
    assert not ray.is_initialized()
    assert "monitor" in processes and "raylet" in processes  # the ones the engine stops itself too
    running = {kind: [p.pid for p in ps if p.poll() is None] for kind, ps in processes.items()}
    assert not any(running.values()), running


@pytest.mark.parametrize("instance", ["started", "running"])
def test_ray_starts_or_is_reached_while_the_driver_converts_the_graph(no_cluster, dataset, tmp_path,
                                                                      monkeypatch, instance):
    import tensorflow  # noqa: F401 - as in a notebook: the driver could convert in-process

    import pipeline.engine as engine_module

    spans = {}

    def timed(name, fn):
        def run(*args, **kw):
            start = time.monotonic()
            try:
                return fn(*args, **kw)
            finally:
                spans[name] = (start, time.monotonic())
        return run

    monkeypatch.setattr(ray, "init", timed("ray.init", ray.init))
    monkeypatch.setattr(engine_module, "keep_converted",
                        timed("conversion", engine_module.keep_converted))
    alone = _rows(extract_features(tiny(dataset, tmp_path / "one")).path)  # one process first
    running = ray_instance(num_cpus=2) if instance == "running" else None  # as `ray start` leaves one
    try:
        with RayEngine(running and running.address, num_cpus=None if running else 2) as engine:
            result = engine.extract(tiny(dataset, tmp_path / "ray"))
    finally:
        if running:
            running.shutdown()
    (init_start, init_end), (conv_start, conv_end) = spans["ray.init"], spans["conversion"]
    assert conv_start < init_end and init_start < conv_end  # the two overlapped
    assert result.info["runtime"] == runtimes.choose("auto", "mobilenet_v2") != "tensorflow"
    for split, (features, labels) in _rows(result.path).items():
        np.testing.assert_allclose(features, alone[split][0], rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(labels, alone[split][1])


@pytest.mark.bad_input
def test_an_unreachable_cluster_gets_one_line(no_cluster, tmp_path, dataset, capsys):
    from pipeline.cli import main

    code = main(["extract", "--dataset", dataset, "--weights", "none", "--image-size", "32",
                 "--cache-dir", str(tmp_path), "--engine", "ray", "--address", "ray://127.0.0.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot reach the Ray cluster" in err[0]
    assert not list(tmp_path.glob("*.h5"))


@pytest.mark.bad_input
def test_num_cpus_beside_a_running_instance_says_to_drop_it_or_stop_that_instance(
        no_cluster, tmp_path, dataset, capsys, monkeypatch):
    from pipeline.cli import main

    running = ray_instance(num_cpus=1)
    monkeypatch.setenv("RAY_ADDRESS", running.address)  # what ray.init finds without --address
    try:
        code = main(["extract", "--dataset", dataset, "--weights", "none", "--image-size", "32",
                     "--cache-dir", str(tmp_path), "--engine", "ray", "--num-cpus", "2"])
    finally:
        running.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "already running" in err[0] and "leave out --num-cpus" in err[0] and "ray stop" in err[0]
    assert not list(tmp_path.glob("*.h5"))


@pytest.mark.bad_input
@pytest.mark.parametrize("ray_address, error, says", [
    ("127.0.0.1:1", ConnectionError("Could not connect to 127.0.0.1:1"),
     ["cannot reach the Ray cluster that RAY_ADDRESS names, 127.0.0.1:1", "unset RAY_ADDRESS"]),
    (None, RuntimeError("Failed to start the GCS"),
     ["cannot start a local Ray instance (Failed to start the GCS)", "--address"]),
], ids=["RAY_ADDRESS-unreachable", "local-start-fails"])
def test_without_address_a_failing_ray_gets_one_line_naming_what_failed(
        no_cluster, tmp_path, dataset, capsys, monkeypatch, ray_address, error, says):
    from pipeline.cli import main

    def fails(**kw):
        raise error

    monkeypatch.setattr(ray, "init", fails)  # Ray's own failures, without waiting on them
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["extract", "--dataset", dataset, "--weights", "none", "--image-size", "32",
                 "--cache-dir", str(tmp_path), "--engine", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(part in err[0] for part in says), err[0]
    assert "leave out --address" not in err[0]  # no --address was given
    assert not list(tmp_path.glob("*.h5"))
