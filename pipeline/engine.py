"""Scale-out on Ray: sharded extraction on a pool of backbone actors, head fits as Ray tasks.

Only ``--engine ray`` imports this module (and so Ray). Extraction is ``extract_features``'
one flow with a ``RayRunner`` as the place the shards run: actors, one per GPU (or, without
GPUs, one per node using all its cores as one process does), each load the graph the driver
converted once and write one HDF5 shard per task, the same shard files a single process
writes. The flow then publishes one logical feature file: a
virtual dataset over the shards (``--layout vds``) or a merged copy. Shards are written whole
or not at all, so a lost worker or a killed driver costs only the unfinished shards, and a
rerun does only those.

Every node must see the cache and results folders, and image folders, at the same paths (a
shared filesystem). Actors get the driver's dataset through Ray's object store (arrays, or
image paths with their sha256, nothing scanned twice) and check each image file against its
sha256 as they read it, so a node that sees other bytes stops with a clear error. Head fits
are tasks of a node's cores each, run as one process runs them there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray

from pipeline.datasets import Dataset, parse_dataset
from pipeline.errors import PipelineError
from pipeline.extraction import (
    ExtractionResult,
    Progress,
    extract_features,
    extract_shards,
    feature_row_bytes,
    fit_projection,
    keep_converted,
    rows_of_8_mib,
    start_model,
    worker_provenance,
)
from pipeline.options import ExtractionConfig
from pipeline.runtimes import cpu_cores
from pipeline.store import LAYOUTS, ShardSet

log = logging.getLogger(__name__)


def _absolute(config: ExtractionConfig) -> ExtractionConfig:
    """Paths as every worker must read them (a worker's working folder is not the driver's)."""
    dataset = parse_dataset(config.dataset).absolute()
    weights = config.weights
    if weights not in ("imagenet", "none") and Path(weights).expanduser().exists():
        weights = str(Path(weights).expanduser().resolve())
    return replace(config, dataset=dataset, weights=weights,
                   cache_dir=str(Path(config.cache_dir).resolve()))


@ray.remote
class ShardExtractor:
    """Holds one backbone (built once), the dataset and its provenance; extracts shard after
    shard. Sized to its node (``RayEngine.slots``): it runs as one process runs there."""

    def __init__(self, threads: int, decode_threads: int = 2):
        # Started empty: its process spawns and imports while the driver converts the graph.
        self.threads, self.decode_threads = threads, decode_threads
        self.failed: PipelineError | None = None

    def start(self, config: ExtractionConfig, dataset: Dataset) -> str:
        """Build (or load) the backbone: the driver's runtime, its graph converted once, by
        the driver, started as in one process. Returns the runtime. A failure is kept: each
        shard sent after it gets the same one line (a replacement actor's start is not
        awaited)."""
        self.config = config
        self.dataset = dataset  # the driver's: arrays, or image paths with their sha256
        try:
            self.model, self.runtime = start_model(config, dataset.splits["train"].image_shape,
                                                   config.runtime, threads=self.threads or None)
        except PipelineError as exc:
            self.failed = exc
            raise
        self.provenance = worker_provenance(config, self.runtime)  # once per actor, not per shard
        return self.runtime

    def row_bytes(self, projection) -> int:
        return feature_row_bytes(self.model, self.dataset, projection)

    def fit_bottleneck(self) -> tuple[np.ndarray, np.ndarray]:
        return fit_projection(self.model, self.dataset, self.config)

    def extract(self, split: str, start: int, stop: int, shards_path: str, key: str,
                projection, compression: str) -> dict:
        if self.failed:
            raise self.failed
        t0 = time.monotonic()
        self.model.projection = projection
        extract_shards(self.model, ShardSet(Path(shards_path)), self.dataset.splits,
                       [(split, start, stop)], batch_size=self.config.batch_size, key=key,
                       provenance=self.provenance, compression=compression,
                       decode_threads=self.decode_threads)
        checked = self.dataset.checked  # image files read and found unchanged: for the driver's
        read, checked[:] = checked[:], []  # scan index, as one process records them
        return {"split": split, "rows": stop - start, "seconds": time.monotonic() - t0,
                "host": self.provenance["host"], "checked": read}


def _run_shards(new_actor, actors: list, todo: list[tuple[str, int, int]], shards: ShardSet,
                key: str, projection, compression: str,
                progress: Progress) -> tuple[list[dict], int]:
    """Keep every actor busy with the next shard until all are done. A worker that is lost
    (its process killed, its node gone) costs only the shard it was on: that shard goes back
    in the queue, and a new actor takes the lost one's place where the cluster has room.
    Returns each shard's stats and how many shards were redone. On any other failure the
    running shards are stopped (the finished ones stay on disk)."""
    pending, running, free, stats = list(todo), {}, list(actors), []
    alive, redone, replacements = list(actors), 0, 2 * len(actors)
    try:
        while pending or running:
            while pending and free:
                task = pending.pop(0)
                actor = free.pop()
                ref = actor.extract.remote(*task, str(shards.path), key, projection, compression)
                running[ref] = (actor, task)
            ready, _ = ray.wait(list(running), num_returns=1)
            actor, task = running.pop(ready[0])
            try:
                stats.append(_get(ready[0], lost_worker=True))
            except WorkerLost as exc:
                redone += 1
                pending.insert(0, task)
                alive.remove(actor)
                ray.kill(actor)
                log.warning("a worker was lost (%s); shard %s rows %d-%d goes back in the queue",
                            exc, *task)
                if not alive or new_actor.has_room():
                    if replacements == 0:
                        raise PipelineError(
                            f"Ray workers keep dying ({exc}); the complete shards are kept: "
                            "rerun the same command to do the rest") from None
                    replacements -= 1
                    alive.append(new_actor())
                    free.append(alive[-1])
                continue
            free.append(actor)
            progress.update(stats[-1]["rows"])
    finally:  # killing the actors also stops their running shards (on a failure)
        for actor in alive:
            ray.kill(actor)
    return stats, redone


class _ActorFactory:
    """Starts one more ``ShardExtractor`` like the others, and says whether one would fit."""

    def __init__(self, cpus: int, gpus: float, threads: int, decode_threads: int):
        self.cpus, self.gpus, self.args = cpus, gpus, None  # args: (config, dataset ref)
        self.options = ShardExtractor.options(num_cpus=cpus, num_gpus=gpus)
        self.threads, self.decode_threads = threads, decode_threads

    def spawn(self):
        """An actor not started yet (its process comes up meanwhile)."""
        return self.options.remote(self.threads, self.decode_threads)

    def start(self, actor):
        """``actor.start`` queued: the shards sent after it run once it is done."""
        return actor.start.remote(*self.args)

    def __call__(self):
        actor = self.spawn()
        self.start(actor)
        return actor

    def has_room(self) -> bool:
        free = ray.available_resources()
        return free.get("CPU", 0) >= self.cpus and free.get("GPU", 0) >= self.gpus


class RayRunner:
    """Extraction on a pool of ``ShardExtractor`` actors (an ``extract.Runner``): the graph
    converted once by the driver into the cache folder, then every actor started, each
    building (or loading) its backbone once and writing whole shards."""

    name = "ray"

    def __init__(self, engine: RayEngine):
        self.engine, self.layout = engine, engine.layout
        self.actors: list = []
        self._row_bytes = None

    def start(self, config: ExtractionConfig, dataset: Dataset, runtime: str) -> None:
        t0 = time.monotonic()
        shape = dataset.splits["train"].image_shape
        stop = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            # The graph CPU workers run is converted while Ray starts (2.2-3.9 s here) or is
            # reached (0.7 s), not after, in a child process as a CLI driver does (in a thread
            # beside Ray's start, weights "none" gave other features); stopped if Ray cannot be
            # reached or the cluster has GPUs, whose actors run TensorFlow. (On a GPU machine
            # `auto` converts nothing.)
            early = (pool.submit(keep_converted, config, shape, runtime, apart=True, stop=stop)
                     if not ray.is_initialized() else None)
            try:
                self.wanted, cpus, gpus, threads, decode_threads = self.engine.slots()
            except BaseException:
                stop.set()
                raise
            if gpus:
                stop.set()  # (its ConversionStopped is left in the future, unread)
            self.new_actor = _ActorFactory(cpus, gpus, threads, decode_threads)
            self.actors = [self.new_actor.spawn() for _ in range(self.wanted)]
            try:
                if not gpus:  # CPU workers run what this driver would choose: converted here, once
                    runtime = early.result() if early else keep_converted(config, shape, runtime)
                self.config, self.dataset = replace(config, runtime=runtime), dataset
                # The driver's dataset goes to the actors through the object store, once:
                # nothing is scanned again, each image file is checked against its sha256.
                self.new_actor.args = (self.config, ray.put(dataset))
                for ref in [self.new_actor.start(actor) for actor in self.actors]:
                    _get(ref)  # bad options fail here, before any work, as in one process
            except BaseException:
                self.stop()
                raise
        self.start_seconds = time.monotonic() - t0
        log.info("%d actor(s) of %d CPU(s)%s ready in %.1f s", self.wanted, cpus,
                 f" and {gpus:g} GPU" * bool(gpus), self.start_seconds)

    def fit_bottleneck(self) -> tuple[np.ndarray, np.ndarray]:
        return _get(self.actors[0].fit_bottleneck.remote())

    def shard_rows(self, n: int, projection) -> int:
        """``--shards`` in all per split (or ``shard_rows`` each); else up to four per actor
        (work stays balanced), of at least 8 MiB of features as in one process (where their
        own costs vanish), but never fewer shards than actors."""
        if self.engine.shards:
            return -(-n // self.engine.shards)
        if self.config.shard_rows:
            return self.config.shard_rows
        if self._row_bytes is None:
            self._row_bytes = _get(self.actors[0].row_bytes.remote(projection))
        floor = rows_of_8_mib(self._row_bytes, self.config.batch_size)
        return max(-(-n // (4 * self.wanted)), min(floor, -(-n // self.wanted)))

    def run(self, todo: list[tuple[str, int, int]], shards: ShardSet, key: str, projection,
            progress: Progress) -> dict:
        actors, self.actors = self.actors, []
        log.info("%d shard(s) on %d actor(s)", len(todo), len(actors))
        compression = self.config.file_compression() if self.layout == "vds" else "none"
        stats, redone = _run_shards(self.new_actor, actors, todo, shards, key, projection,
                                    compression, progress)  # which stops the actors in the end
        for shard in stats:  # the extraction's end records them in the scan index
            self.dataset.checked.extend(shard.pop("checked"))
        return {"ray": ray.__version__, "address": self.engine.address or "local",
                "actors": len(actors), "cpus_per_actor": self.new_actor.cpus,
                "gpus_per_actor": self.new_actor.gpus, "shards_redone": redone,
                "actors_start_seconds": round(self.start_seconds, 3),
                "hosts": sorted({s["host"] for s in stats})}

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def stop_ray() -> None:
    """``ray.shutdown()``, less the second a local instance waits on its autoscaler monitor.
    Ray stops a local instance's processes one kind at a time, the GCS before the monitor,
    whose SIGTERM handler then tries to report to the stopped GCS until Ray kills it a second
    later: 1.1-1.4 s in all here, 0.15-0.35 s with the monitor stopped first
    (benchmarks/ray_fixed_costs.txt). A local instance has no nodes to scale, so its monitor
    is killed first (SIGKILL, as ``ray stop --force`` does). Reaching a cluster started
    elsewhere, this process holds none of its processes and only disconnects. Ray's node
    object is private API, so a Ray without it just gets ``ray.shutdown()``."""
    node = getattr(ray._private.worker, "_global_node", None)
    monitor = ray._private.ray_constants.PROCESS_TYPE_MONITOR
    if monitor in (getattr(node, "all_processes", None) or {}):
        node._kill_process_type(monitor, allow_graceful=False, check_alive=False)
    ray.shutdown()


class RayEngine:
    """Runs extraction and head fits on a Ray cluster (a local one when ``address`` is None)."""

    def __init__(self, address: str | None = None, *, shards: int | None = None,
                 layout: str = "vds", num_cpus: int | None = None):
        if layout not in LAYOUTS:
            raise PipelineError(f"unknown --layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        if shards is not None and shards < 1:
            raise PipelineError("--shards must be at least 1")
        self.address, self.shards, self.layout = address, shards, layout
        self.num_cpus = num_cpus
        self._started = False

    # the cluster ----------------------------------------------------------------------
    def __enter__(self) -> RayEngine:
        return self  # Ray is started (or reached) by the first work that needs it: see _connect

    def _connect(self) -> None:
        """Start a local instance, or reach the cluster, once. Only work that needs Ray calls
        it, so a no-op rerun (the file cached, every image known to the scan index) never
        pays Ray's start and stop (about 3.5 s on a local instance here)."""
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PipelineError(self._cannot_connect(str(exc).splitlines()[0][:160] if str(exc)
                                                     else type(exc).__name__)) from None
        self._started = True

    def __exit__(self, *exc) -> None:
        if self._started:
            stop_ray()

    def _cannot_connect(self, reason: str) -> str:
        """The one line for a Ray that cannot be started or reached, with what to do. Without
        an address, ray.init joins the cluster RAY_ADDRESS names, else an instance `ray
        start` left running here (whose CPUs were fixed when it started), else starts one."""
        if self.address:
            return (f"cannot reach the Ray cluster at {self.address} ({reason}); start one with "
                    "`ray start --head` or leave out --address")
        if "existing cluster" in reason:  # --num-cpus given
            return ("--num-cpus sizes a Ray instance this command starts, but one is already "
                    "running here (`ray start`, or RAY_ADDRESS): leave out --num-cpus to use it, "
                    "or stop it with `ray stop`")
        named = os.environ.get("RAY_ADDRESS")
        if named:
            return (f"cannot reach the Ray cluster that RAY_ADDRESS names, {named} ({reason}); "
                    "start it, or unset RAY_ADDRESS to start a local instance")
        return (f"cannot start a local Ray instance ({reason}); check that `ray start --head` "
                "works here, or give --address of a running cluster")

    def slots(self) -> tuple[int, int, float, int, int]:
        """(actors, CPUs and GPUs per actor, TensorFlow threads, decode threads per actor).
        With GPUs: one actor per GPU, decoding with the CPU cores that come with it. Without:
        one actor per node, holding and using all its cores as one process does there (on
        unequal nodes, actors of the smallest node's size, so a big node runs several)."""
        self._connect()
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(int(resources.get("CPU", 1)), 1)
        if gpus:
            return gpus, 1, 1.0, 0, max(2, cpus // gpus)
        alive = _alive_cpus()
        per_node = node_cpus(alive)
        return max(1, sum(c // per_node for c in alive)), per_node, 0.0, per_node, 2

    # extraction -----------------------------------------------------------------------
    def extract(self, config: ExtractionConfig, *, rebuild: bool = False,
                dataset: Dataset | None = None) -> ExtractionResult:
        """``extract_features`` on the cluster: the same file, the same rows, shard by shard."""
        return extract_features(_absolute(config), rebuild=rebuild, dataset=dataset,
                                runner=RayRunner(self), scan_map=self.scan_map)

    def scan_map(self, fn, items: list, chunk: int = 500) -> list:
        """``fn`` over ``items`` as Ray tasks of ``chunk`` items each, results in order: the
        first scan of an image folder spread over the cluster (the driver reads no image)."""
        self._connect()
        task = ray.remote(num_cpus=1, max_retries=2)(_map_chunk)
        refs = [task.remote(fn, items[lo:lo + chunk]) for lo in range(0, len(items), chunk)]
        log.info("scanning %s file(s) as %d cluster task(s)", f"{len(items):,}", len(refs))
        return [result for ref in refs for result in _get(ref)]

    # head fits and anything else ------------------------------------------------------
    def map(self, fn, calls: list[dict]) -> list:
        """``fn(**call)`` for every call as Ray tasks, each holding a node's cores (or the
        call's ``threads``, if fewer) and using them as one process does there: its sweep's
        joblib workers times their BLAS threads within them (training's thread budget).

        Started in the order given: a task is submitted once the cluster's CPUs have room for
        it beside those submitted before it (Ray's pattern of limiting pending tasks with
        ``ray.wait``). Submitted all at once, Ray started one-core heads before an every-core
        head queued ahead of them and left a core idle while that head waited for a whole node
        (benchmarks/ray_heads_timeline.txt). The first error stops what has not started; it
        is raised once the started tasks finish."""
        self._connect()
        per_node, task = node_cpus(), ray.remote(max_retries=2)(_on_cores)  # registered once
        total = max(per_node, int(ray.cluster_resources().get("CPU", per_node)))
        refs, running, failed = [], {}, False
        for call in calls:
            cpus = min(call.get("threads") or per_node, per_node)
            while running and sum(running.values()) + cpus > total and not failed:
                [done], _ = ray.wait(list(running), num_returns=1)
                running.pop(done)
                failed = _failed(done)
            if failed:
                break
            refs.append(task.options(num_cpus=cpus).remote(fn, {**call, "threads": cpus}))
            running[refs[-1]] = cpus
        ray.wait(refs, num_returns=len(refs))  # every started task finished (results written)
        return [_get(ref) for ref in refs]


def _failed(ref) -> bool:
    """Whether a finished task raised (its error is raised later, in the calls' order)."""
    try:
        ray.get(ref)
    except Exception:  # noqa: BLE001 - any task error: _get says it in one line
        return True
    return False


def _alive_cpus() -> list[int]:
    return [int(n["Resources"].get("CPU", 0)) for n in ray.nodes()
            if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]


def node_cpus(alive: list[int] | None = None) -> int:
    """The CPUs of the cluster's smallest node (one task or actor of this size fits on any);
    ``alive``: the nodes' CPUs as ``_alive_cpus`` read them, where the caller has them."""
    return min(_alive_cpus() if alive is None else alive, default=1)


def _map_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def _on_cores(fn, call: dict):
    """``fn(**call)`` on a worker, its threads no more than the cores of the node it landed
    on (a local instance may declare more CPUs than the machine has)."""
    return fn(**{**call, "threads": min(call["threads"], cpu_cores())})


class WorkerLost(Exception):
    """A Ray worker process (or its node) went away while it held a task."""


def _get(ref, lost_worker: bool = False):
    """ray.get, with our one-line errors passed through from the worker; with ``lost_worker``
    a worker that died raises ``WorkerLost`` (the caller redoes its task) instead."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(getattr(exc, "cause", None), PipelineError):
            raise PipelineError(str(exc.cause)) from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError) as exc:
        text = str(exc)
        if "PipelineError: " in text:  # raised while the actor was being built (e.g. data check)
            raise PipelineError(text.split("PipelineError: ", 1)[1].splitlines()[0]) from None
        if lost_worker:
            raise WorkerLost(f"{type(exc).__name__}: {text.splitlines()[0][:120]}") from None
        raise PipelineError(f"a Ray worker died ({text.splitlines()[0][:160]}); the complete "
                            "shards are kept: rerun the same command to do the rest") from None
