"""Experiments: plan a grid (datasets x backbones x feature modes x heads), run what is stale.

A head result is up to date when its ``metrics.json`` names the same feature checksum and the
same head parameters; a feature file is up to date when its cache key (which includes the
dataset's content fingerprint and the weights' identity) exists and passes its checks. So a
rerun does only the work whose inputs changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import results
from pipeline.backbones import missing_imagenet_weights
from pipeline.datasets import KERAS_DATASETS, Dataset, keras_dataset_is_local
from pipeline.errors import PipelineError
from pipeline.extraction import extract_features, open_dataset
from pipeline.heads import (
    HEADS,
    check_params,
    check_threads,
    head_versions,
)
from pipeline.options import MODES, ExtractionConfig, describe, option_fields, option_problem
from pipeline.reports import compare
from pipeline.results import (
    DEFAULT_RESULTS_DIR,
    check_results_dir,
    curve_point_dir,
    head_label,
    legacy_result_dir,
    result_dir,
)
from pipeline.store import (
    DEFAULT_CACHE_DIR,
    FeatureFile,
    FeatureStore,
    check_file,
)
from pipeline.training import (
    ALL,
    check_curve_head,
    check_shots,
    check_tries,
    cluster_tasks,
    curve_points,
    result_identity,
    run_heads,
    train_call,
)

DEFAULT_CONFIG = Path("experiments", "default.toml")  # in the project folder, as make has it
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the grid

@dataclass
class Experiment:
    datasets: list[dict]
    backbones: list[dict]
    features: list[dict]
    heads: list[dict]
    options: dict = field(default_factory=dict)  # top-level extraction options (cache_dir, ...)
    results_dir: str = DEFAULT_RESULTS_DIR
    source: str = ""
    fusions: list[dict] = field(default_factory=list)  # heads on several feature files at once
    threads: int | None = None  # cores the heads may use in all (``--threads`` beats it)

    @property
    def cache_dir(self) -> str:
        return self.options.get("cache_dir", DEFAULT_CACHE_DIR)

    @property
    def limit(self) -> int | None:
        return self.options.get("limit")


# The grid's own keys, beside the extraction options each place takes (``option``'s ``where``).
_GRID_KEYS = {
    "top": {"datasets": list, "backbones": list, "features": list, "heads": list,
            "fusions": list, "results_dir": str, "description": str, "threads": int},
    "datasets": {"name": str},
    "backbones": {},
    "features": {"name": str, "backbones": list, "datasets": list, "heads": list},
    "heads": {"name": str, "params": dict, "modes": list, "shots": list, "tries": int},
}


def _option_keys(place: str) -> dict[str, str]:
    """{key in the file: option name} of the extraction options ``place`` may set, with their
    old spellings."""
    return {k: f.name for f in option_fields().values() if place in f.metadata["where"]
            for k in (f.metadata["key"] or f.name, *f.metadata["aliases"])}


def _check_entry(path: str, place: str, entry: dict) -> None:
    """Known keys only, each of its declared type and range: one line naming the mistake."""
    where = "top level" if place == "top" else f"[[{place}]]"
    grid, options = _GRID_KEYS[place], _option_keys(place)
    bad = set(entry) - set(grid) - set(options)
    if bad:
        raise PipelineError(f"{path}: {where} unknown key(s) {', '.join(sorted(bad))}; "
                            f"allowed: {', '.join(sorted({*grid, *options}))}")
    for key, value in entry.items():
        if key in options:
            problem = option_problem(options[key], value)
        else:
            problem = None if isinstance(value, grid[key]) else f"should be {grid[key].__name__}"
        if problem:
            raise PipelineError(f"{path}: {where} {key} = {value!r}: {problem}")


def _renamed(place: str, entry: dict) -> dict:
    """The entry with old spellings of option keys under their current key (``pooling`` ->
    ``mode``, ``k`` -> ``bottleneck_k``): the grid reads current names only."""
    current = {alias: f.metadata["key"] or f.name for f in option_fields().values()
               if place in f.metadata["where"] for alias in f.metadata["aliases"]}
    return {current.get(k, k): v for k, v in entry.items()}


def _options(place: str, entry: dict) -> dict:
    """The extraction options an entry (or the top level) sets, by option name."""
    keys = _option_keys(place)
    return {keys[k]: v for k, v in entry.items() if k in keys}


def load_experiment(path: str | None = None, *, datasets: str | None = None,
                    backbones: str | None = None, heads: str | None = None,
                    limit: int | None = None) -> Experiment:
    """Read and check an experiment TOML; the overrides are what make's variables pass."""
    path = str(path or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"experiment file {path!r} not found; run from the project folder "
                            "(experiments/*.toml) or pass --config FILE") from None
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"experiment file {path}: not valid TOML ({exc})") from None
    _check_entry(path, "top", raw)
    raw = _renamed("top", raw)
    for section in ("datasets", "backbones", "features", "heads"):
        entries = raw.get(section, [])
        if not entries or not all(isinstance(e, dict) for e in entries):
            raise PipelineError(f"{path}: [[{section}]] must list at least one entry")
        for entry in entries:
            _check_entry(path, section, entry)
            if "name" not in entry and section != "features":
                raise PipelineError(f"{path}: [[{section}]] entry without a name: {entry}")
        raw[section] = [_renamed(section, entry) for entry in entries]
    for entry in raw["features"]:
        if "mode" not in entry:
            raise PipelineError(f"{path}: [[features]] entry without a mode; use one of "
                                f"{', '.join(MODES)}")
    for entry in raw["heads"]:
        if entry.get("name") not in HEADS:
            raise PipelineError(f"{path}: [[heads]] name = {entry.get('name')!r}; "
                                f"use one of {', '.join(HEADS)}")
        try:
            check_params(entry["name"], entry.get("params", {}))
            if "shots" in entry:  # a learning curve (train --shots): its points, checked now
                entry["shots"] = check_shots(entry["shots"])
                check_curve_head(entry["name"], entry.get("params", {}))
            elif "tries" in entry:
                raise PipelineError("tries goes with shots (draws per number of images per class)")
            check_tries(entry.get("tries"))
        except PipelineError as exc:
            raise PipelineError(f"{path}: [[heads]] {exc}") from None
    fusions = raw.get("fusions", [])
    for entry in fusions:
        _check_fusion(path, entry, raw)
    if "threads" in raw:
        try:
            check_threads(raw["threads"])
        except PipelineError as exc:
            raise PipelineError(f"{path}: top level threads = {raw['threads']!r}: "
                                f"{str(exc).split(': ', 1)[1]}") from None
    exp = Experiment(datasets=raw["datasets"], backbones=raw["backbones"], features=raw["features"],
                     heads=raw["heads"], options=_options("top", raw),
                     results_dir=raw.get("results_dir", DEFAULT_RESULTS_DIR), source=path, fusions=fusions,
                     threads=raw.get("threads"))
    return _override(exp, datasets, backbones, heads, limit)


def _override(exp: Experiment, datasets: str | None, backbones: str | None, heads: str | None,
              limit: int | None) -> Experiment:
    """make's DATASETS, BACKBONES, HEADS and LIMIT over the file's grid."""
    if datasets:
        known = {d["name"]: d for d in exp.datasets}
        exp.datasets = [known.get(n, {"name": n, "source": n}) for n in datasets.split()]
    if backbones:
        known = {b["name"]: b for b in exp.backbones}
        exp.backbones = [known.get(n, {"name": n}) for n in backbones.split()]
    if heads:  # entries of the file keep their params; other names run with defaults
        exp.heads = [h for n in heads.split()
                     for h in ([e for e in exp.heads if e["name"] == n] or [{"name": n}])]
        for h in exp.heads:
            check_params(h["name"], {})
    if limit is not None:
        if limit < 1:
            raise PipelineError(f"--limit {limit}: give a positive number of images per split")
        exp.options["limit"] = limit
    return exp


_FUSION_KEYS = {"name", "features", "datasets", "heads"}


def _check_fusion(path: str, entry: dict, raw: dict) -> None:
    """A [[fusions]] entry names at least two "BACKBONE/FEATURES" parts of the grid, where
    FEATURES is a [[features]] entry's ``name`` (its mode when it has none)."""
    where = f"{path}: [[fusions]] {entry.get('name', '')}".rstrip()
    bad = set(entry) - _FUSION_KEYS
    if bad:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(bad))}; "
                            f"allowed: {', '.join(sorted(_FUSION_KEYS))}")
    for key in ("datasets", "heads"):
        if not isinstance(entry.get(key, []), list):
            raise PipelineError(f"{where}: {key} = {entry[key]!r}: should be a list of names")
    parts = entry.get("features")
    if not isinstance(parts, list) or len(parts) < 2 or not all(isinstance(p, str) for p in parts):
        raise PipelineError(f"{where}: features = [\"BACKBONE/FEATURES\", ...] must name at "
                            "least two feature files, e.g. [\"mobilenet/avg\", \"mobilenet_v2/avg\"]")
    backbones = {b["name"] for b in raw["backbones"]}
    for part in parts:
        backbone, _, name = part.partition("/")
        matches = [f for f in raw["features"] if f.get("name", f["mode"]) == name]
        if backbone not in backbones or len(matches) != 1:
            raise PipelineError(
                f"{where}: {part!r} names no single feature file; write BACKBONE/FEATURES with a "
                f"backbone of [[backbones]] ({', '.join(sorted(backbones))}) and the name (or mode) "
                "of one [[features]] entry (give entries distinct `name`s)")
    for head in entry.get("heads", []):
        check_params(head, {})


@dataclass
class Job:
    config: ExtractionConfig
    dataset: Dataset
    label: str
    heads: list[dict] = field(default_factory=list)
    path: Path | None = None
    state: str = "missing"  # missing | partial | cached | damaged | download
    names: tuple[str, str, str] = ("", "", "")  # dataset, backbone, features entry in the TOML


@dataclass
class FusionJob:
    """Heads trained on several feature files of one dataset side by side."""

    label: str
    parts: list[Job]
    heads: list[dict]

    @property
    def state(self) -> str:
        return "cached" if all(j.state == "cached" for j in self.parts) else "missing"

    @property
    def paths(self) -> list[Path]:
        return [j.path for j in self.parts]


def plan(exp: Experiment, *, fetch: bool = True, scan_map=None) -> list[Job]:
    """Every extraction of the grid, with the heads to run on it and whether it is cached.

    ``fetch=False`` (a dry run) never downloads: a ``keras.datasets`` name whose files are not
    on this machine is planned as "download", without its key.
    """
    jobs = []
    store = FeatureStore(exp.cache_dir)
    for d in exp.datasets:
        source = d.get("source", d["name"])
        if not fetch and source in KERAS_DATASETS and not keras_dataset_is_local(source):
            jobs += [Job(None, None, f"{d['name']} / {b['name']} / {f['mode']}  (dataset not "
                     "available locally: would download it)", [], None, "download",
                         (d["name"], b["name"], f.get("name", f["mode"])))
                     for b in exp.backbones for f in exp.features if _applies(f, d, b)]
            continue
        datasets: dict[int, Dataset] = {}
        for b in exp.backbones:
            for f in exp.features:
                if not _applies(f, d, b):
                    continue
                config = ExtractionConfig(**{"dataset": d["name"], **exp.options,
                                             **_options("datasets", d), **_options("backbones", b),
                                             **_options("features", f)})
                config.validate()
                fit = config.input_size
                if fit not in datasets:  # the same rows for every input size but large photos'
                    datasets[fit] = open_dataset(config, scan_map=scan_map)
                dataset = datasets[fit]
                parts = config.key_parts(dataset)
                path = store.path_for(parts)
                if path.exists():
                    state = "cached" if check_file(path) is None else "damaged"
                else:
                    state = "partial" if store.shards_for(parts).path.exists() else "missing"
                takes = MODES[f["mode"]].heads  # "spatial" maps, or "pooled" (streamed too)
                heads = [h for h in exp.heads
                         if (HEADS[h["name"]].takes == "spatial") == (takes == "spatial")
                         and (not h.get("modes") or f["mode"] in h["modes"])
                         and ("heads" not in f or h["name"] in f["heads"])]
                label = f"{d['name']} / " + " / ".join(describe(parts))
                if not fetch and state != "cached" and config.weights == "imagenet":
                    missing = missing_imagenet_weights(config.backbone, config.alpha)
                    label += f"  (ImageNet weights: {missing})" if missing else ""
                jobs.append(Job(config, dataset, label, heads, path, state,
                                (d["name"], b["name"], f.get("name", f["mode"]))))
    return jobs


def plan_fusions(exp: Experiment, jobs: list[Job]) -> list[FusionJob]:
    """The [[fusions]] of the grid, one per dataset its parts are all extracted for."""
    fused = []
    for entry in exp.fusions:
        heads = [h for h in exp.heads if HEADS[h["name"]].takes != "spatial"
                 and ("heads" not in entry or h["name"] in entry["heads"])]
        for d in exp.datasets:
            if entry.get("datasets") and d["name"] not in entry["datasets"]:
                continue
            parts = []
            for part in entry["features"]:
                backbone, _, name = part.partition("/")
                found = [j for j in jobs if j.names == (d["name"], backbone, name)]
                if not found:
                    if entry.get("datasets"):
                        raise PipelineError(f"[[fusions]] {part!r} is not extracted for dataset "
                                            f"{d['name']!r} (see that entry's backbones/datasets)")
                    break
                parts.append(found[0])
            else:
                label = f"{d['name']} / fusion: " + " + ".join(
                    j.label.split(" / ", 1)[1] for j in parts)
                fused.append(FusionJob(label, parts, heads))
    return fused


def _applies(features: dict, dataset: dict, backbone: dict) -> bool:
    """Whether a [[features]] entry is extracted for this dataset and backbone."""
    return not ((features.get("backbones") and backbone["name"] not in features["backbones"])
                or (features.get("datasets") and dataset["name"] not in features["datasets"]))


def _head_key(job: Job, head: dict) -> tuple:
    return (id(job), head["name"], json.dumps(head.get("params", {}), sort_keys=True),
            json.dumps(head.get("shots")), head.get("tries"))


def _is_current(h: dict, results_dir: str, parts: dict, checksum: str, legacy_key: str | None
                ) -> bool:
    """Whether head entry ``h`` is done: its result (at its readable or its legacy place) and,
    for a learning curve, every point it asks for."""
    params, shots, versions = h.get("params", {}), h.get("shots"), head_versions()
    places = [result_dir(results_dir, parts, h["name"], params)]
    if legacy_key:
        places.append(legacy_result_dir(results_dir, legacy_key, h["name"], params))
    full = (shots is not None and ALL not in shots) or any(
        results.is_current(out, checksum, params, versions) for out in places)
    return full and all(
        results.is_current(curve_point_dir(results_dir, parts, h["name"], params, k, t), checksum,
                           params, versions)
        for k, t in curve_points(shots or [], check_tries(h.get("tries"))))


def _head_states(job: Job, results_dir: str) -> dict[tuple, str]:
    """cached / to train / after extraction for each head of ``job`` (one file open)."""
    if job.state != "cached":
        return {_head_key(job, h): "after extraction" for h in job.heads}
    with FeatureFile(job.path) as ff:
        key, parts, checksum = ff.key, ff.attrs["key_parts"], ff.checksum()
    return {_head_key(job, h): "cached" if _is_current(h, results_dir, parts, checksum, key)
            else "to train" for h in job.heads}


def _fusion_head_states(job: FusionJob, results_dir: str) -> dict[tuple, str]:
    if job.state != "cached":
        return {_head_key(job, h): "after extraction" for h in job.heads}
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(FeatureFile(p)) for p in job.paths]
        parts, checksum = result_identity(files, [ff.checksum() for ff in files])
    return {_head_key(job, h): "cached" if _is_current(h, results_dir, parts, checksum, None)
            else "to train" for h in job.heads}


def run_experiment(exp: Experiment, *, stage: str = "all", dry_run: bool = False,
                   extract=extract_features, map_calls=None, scan_map=None,
                   threads: int | None = None) -> int:
    """Plan, then extract what is missing and train what is stale (heads on ``threads``
    cores in all: ``heads.check_threads``).

    ``extract``, ``map_calls(fn, calls)`` and ``scan_map(fn, items)`` are where the work runs:
    in this process by default, or on a cluster (``pipeline.engine.RayEngine.extract`` /
    ``.map`` / ``.scan_map``).
    """
    t0 = time.monotonic()
    threads = threads or exp.threads
    if not dry_run and stage in ("heads", "all"):
        check_results_dir(exp.results_dir)
        if map_calls is None:
            check_threads(threads)
    jobs = plan(exp, fetch=not dry_run, scan_map=scan_map)
    fusions = plan_fusions(exp, jobs)
    head_states = {k: v for j in jobs for k, v in _head_states(j, exp.results_dir).items()}
    for fj in fusions:
        head_states.update(_fusion_head_states(fj, exp.results_dir))
    extract_todo = [j for j in jobs if j.state != "cached"] if stage in ("features", "all") else []
    runnable = {"all": ("to train", "after extraction"), "heads": ("to train",)}.get(stage, ())
    heads_todo = sum(s in runnable for s in head_states.values())
    _print_plan(exp, jobs, fusions, head_states)
    if dry_run:
        print(f"dry run: would extract {len(extract_todo)} feature file(s) and train "
              f"{heads_todo} head(s)")
        return 0
    if not extract_todo and not heads_todo and stage != "compare":
        print(f"nothing to do: everything is up to date ({time.monotonic() - t0:.1f} s)")
        if stage == "all":
            compare(exp.results_dir, cache_dir=exp.cache_dir)
        return 0
    steps = _Steps(len(extract_todo) + heads_todo)
    _extract_missing(extract_todo, extract, steps)
    if stage in ("heads", "all"):
        _train_stale(exp, [*jobs, *fusions], head_states, map_calls, steps, threads)
    if stage in ("compare", "all"):
        compare(exp.results_dir, cache_dir=exp.cache_dir)
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


def _print_plan(exp: Experiment, jobs: list[Job], fusions: list[FusionJob], head_states: dict) -> None:
    cached_files = sum(j.state == "cached" for j in jobs)
    cached_heads = sum(s == "cached" for s in head_states.values())
    print(f"experiment {exp.source}: {len(jobs)} feature files ({cached_files} cached), "
          f"{len(fusions)} fusions, {len(head_states)} head results ({cached_heads} cached)")
    for j in [*jobs, *fusions]:
        heads = ", ".join(f"{head_label(h['name'], h.get('params'))}"
                          f"{' curve ' + ','.join(map(str, h['shots'])) if 'shots' in h else ''}:"
                          f"{head_states[_head_key(j, h)]}" for h in j.heads)
        print(f"  [{j.state:8}] {j.label}  heads: {heads or '-'}")


class _Steps:
    """``[3/7]`` before each step's line."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def next(self) -> str:
        self.done += 1
        return f"[{self.done}/{self.total}]"


def _extract_missing(todo: list[Job], extract, steps: _Steps) -> None:
    for job in todo:
        log.info("%s extract %s", steps.next(), job.label)
        if job.state == "damaged":
            raise PipelineError(f"{job.path} is damaged; `python -m pipeline verify --repair` "
                                "moves it aside, then rerun")
        result = extract(job.config, dataset=job.dataset)
        job.path, job.state = result.path, "cached"


def _train_stale(exp: Experiment, jobs: list, head_states: dict, map_calls, steps: _Steps,
                 threads: int | None) -> None:
    """Every head result not up to date, fusions last (their parts are extracted by then): here
    on this machine's cores (``run_heads``), or all at once as cluster tasks (``map_calls``)."""
    calls, announce = [], []
    for job in jobs:
        if job.state != "cached":
            log.warning("skipping heads on %s: features not extracted (make features)", job.label)
            continue
        for h in job.heads:
            if head_states[_head_key(job, h)] == "cached":
                continue
            path = job.paths if isinstance(job, FusionJob) else job.path
            call = {"feature_path": path, "head": h["name"], "params": h.get("params", {}),
                    "results_dir": exp.results_dir}  # threads: set by run_heads or cluster_tasks
            if "shots" in h:
                call.update(shots=h["shots"], tries=h.get("tries"))
            calls.append(call)
            announce.append(f"{steps.next()} {head_label(h['name'], h.get('params'))} on {job.label}")
    if map_calls is None:
        run_heads(calls, threads, announce)
    elif calls:
        log.info("training %d head(s) as cluster tasks", len(calls))
        map_calls(train_call, cluster_tasks(calls, threads))
