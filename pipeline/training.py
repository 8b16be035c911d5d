"""Training: one head fitted on one cached feature file (or several side by side, a fusion),
evaluated on the test split, written as one result folder (``results``) whole or not at all.

It sits above ``heads`` (the estimators), ``reports`` (the confusion plot) and ``results``
(where results live and what a result record holds); ``experiments`` plans grids of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import queue
import threading
import time
from pathlib import Path

import joblib
import numpy as np

from pipeline import results
from pipeline.errors import LANE, PipelineError
from pipeline.heads import (
    HEADS,
    FeatureSet,
    check_params,
    check_threads,
    evaluate,
    head_ran,
    head_versions,
    load_features,
    load_fused_features,
    make_head,
    solver,
    solver_threads,
)
from pipeline.reports import plot_confusion, plot_mistakes, result_title, write_mistakes
from pipeline.results import (
    DEFAULT_RESULTS_DIR,
    ResultRecord,
    check_results_dir,
    curve_point_dir,
    head_label,
    legacy_result_dir,
    result_dir,
)
from pipeline.store import DEFAULT_CACHE_DIR, FeatureFile, FeatureStore, reading

log = logging.getLogger(__name__)


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        if "=" not in item:
            raise PipelineError(f"--param {item!r}: write NAME=VALUE, e.g. --param C=0.1")
        name, value = item.split("=", 1)
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


def _features_summary(ff: FeatureFile) -> dict:
    """What a result says about the features it was fitted on (copied from the file)."""
    parts, prov = ff.attrs["key_parts"], ff.attrs.get("provenance", {})
    return {"dataset": parts["dataset"], "backbone": parts["backbone"], "alpha": parts.get("alpha"),
            "mode": parts["mode"], "layers": parts.get("layers", []),
            "image_size": parts.get("image_size"), "tta": parts.get("tta", "none"),
            "width": int(np.prod(prov.get("feature_shape", [0])))}


def result_identity(files: list[FeatureFile], checksums: list[str]) -> tuple[dict, str]:
    """(key parts naming the result folder, checksum the result is current for). A fusion's
    checksum covers every file's, so re-extracting any one of them makes the result stale."""
    if len(files) == 1:
        return files[0].attrs["key_parts"], checksums[0]
    parts = {"dataset": files[0].attrs["key_parts"]["dataset"], "backbone": "fusion",
             "mode": f"{len(files)}files", "files": [ff.key for ff in files]}
    return parts, hashlib.sha256("".join(checksums).encode()).hexdigest()


def _open_features(stack: contextlib.ExitStack, feature_path: Path | list[Path]
                   ) -> tuple[list[FeatureFile], list[str], dict, str]:
    """The feature file(s) ``feature_path`` names (several: a fusion), opened on ``stack``:
    (files, their checksums, the result's key parts and checksum: ``result_identity``)."""
    paths = [Path(feature_path)] if isinstance(feature_path, (str, Path)) else list(feature_path)
    files = [stack.enter_context(FeatureFile(p)) for p in paths]
    checksums = [ff.checksum() for ff in files]
    return (files, checksums, *result_identity(files, checksums))


def _load(files: list[FeatureFile], head: str, memory_budget_gb: float | None) -> FeatureSet:
    if len(files) == 1:
        return load_features(files[0], head, memory_budget_gb=memory_budget_gb)
    return load_fused_features(files, head, memory_budget_gb=memory_budget_gb)


def train_one(feature_path: Path | list[Path], head: str, params: dict | None = None, *,
              results_dir: str | Path = DEFAULT_RESULTS_DIR, memory_budget_gb: float | None = None,
              force: bool = False, threads: int | None = None) -> tuple[str, Path]:
    """Fit one head on one feature file (or on several side by side: a fusion) and write
    model, metrics.json and confusion.png. ``threads``: what the head may use in all (its
    sweep's workers times their BLAS threads, and BLAS/OpenMP in this process)."""
    params = dict(params or {})
    check_params(head, params)
    threads = check_threads(threads)
    check_results_dir(results_dir)
    with contextlib.ExitStack() as stack:
        files, checksums, parts, checksum = _open_features(stack, feature_path)
        out = result_dir(results_dir, parts, head, params)
        legacy = legacy_result_dir(results_dir, files[0].key, head, params) \
            if len(files) == 1 else None
        versions = head_versions()
        with results.locked(out, legacy, checksum, params, versions):
            why = "" if force else results.stale_because(out, checksum, params, versions)
            if why is None:
                log.info("up to date: %s", out)
                return "up-to-date", out
            if why:  # a result is there, no longer current ("": none, or --force)
                log.info("retraining %s: %s", head_label(head, params), why)
            for ff in files:  # the streaming head reads rows during fit and predict
                stack.enter_context(reading(ff.path))
            data = _load(files, head, memory_budget_gb)
            ran, _, note = head_ran(head, params, len(data.y_train))
            model = make_head(head, params, n_train=len(data.y_train))
            if note:
                log.info(note)
            if data.validation_rows:  # the user's own val/ split: every head chooses on it
                model.set_params(validation_rows=data.validation_rows)
            else:
                counts = np.bincount(data.y_train, minlength=len(data.classes))
                few = [f"{data.classes[c]} ({counts[c]})" for c in np.flatnonzero(counts == 1)]
                if few:
                    raise PipelineError(
                        f"{head}: class(es) {', '.join(few)} have a single training row in "
                        f"{files[0].path.name}; carving a validation split needs at least 2 per class: "
                        "add images (or a val/ folder) and extract again")
            log.info("training %s on %s (%s train rows) ...", head_label(head, params),
                     " + ".join(ff.path.name for ff in files), f"{len(data.y_train):,}")
            with _thread_budget(model, params, threads):
                t0 = time.perf_counter()
                model.fit(data.X_train, data.y_train)
                fit_seconds = time.perf_counter() - t0
                scores = evaluate(model, data.X_test, data.y_test, data.classes, data.test_ids)
            mistakes = scores.pop("mistakes")
            record = _record(model, scores, files, checksums, checksum, head=head, ran=ran,
                             head_version=versions[ran], note=note, params=params, threads=threads,
                             fit_seconds=fit_seconds, n_train=len(data.y_train),
                             n_test=len(data.y_test),
                             validation=({"given": "the dataset's own validation split",
                                          "rows": data.validation_rows} if data.validation_rows else
                                         {"carved": "a seeded stratified share of the training rows",
                                          "fraction": model.get_params().get("validation_fraction")}))
            try:
                _write_result(out, model, record, data.classes, mistakes,
                              files[0].attrs.get("provenance", {}).get("dataset_source"))
            except OSError as exc:  # the results folder's disk, not the feature file
                raise PipelineError(f"cannot write the result to {out.parent}: "
                                    f"{exc.strerror or exc}; free space there (or pass "
                                    "--results-dir), then rerun: the features are fine") from None
    log.info("%s: test accuracy %.2f%% (fit %.1f s) -> %s", head, 100 * record.test_accuracy,
             fit_seconds, out)
    return "trained", out


# ----------------------------------------------------------------------------- learning curves

ALL = "all"  # a learning curve's full-data point: the head's ordinary result
DEFAULT_TRIES = 5  # seeded draws per k


def check_shots(shots) -> list:
    """Images per class for a learning curve: positive whole numbers and ``"all"``, sorted,
    each once (a comma-separated string as the command line gives it, or a list)."""
    items = shots.split(",") if isinstance(shots, str) else list(shots) if isinstance(
        shots, (list, tuple)) else [shots]
    out = set()
    for item in items:
        text = str(item).strip()
        if text == ALL:
            out.add(ALL)
        elif text.isdigit() and int(text) > 0 and not isinstance(item, (bool, float)):
            out.add(int(text))
        else:
            raise PipelineError(f"shots {item!r}: give images per class as positive whole numbers "
                                "or 'all', e.g. --shots 1,5,10,25,100,all")
    if not out:
        raise PipelineError("shots: give at least one number of images per class, e.g. 1,5,10,all")
    return sorted(k for k in out if k != ALL) + ([ALL] if ALL in out else [])


def check_curve_head(head: str, params: dict) -> None:
    check_params(head, params)
    if HEADS[head].takes != "pooled":
        raise PipelineError(f"learning curves take the heads on pooled vectors "
                            f"({', '.join(h for h, s in HEADS.items() if s.takes == 'pooled')}); "
                            f"{head!r} is not one")


def check_tries(tries) -> int:
    if tries is None:
        return DEFAULT_TRIES
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise PipelineError(f"tries {tries!r}: give a whole number of draws per k, at least 1")
    return tries


def k_shot_rows(y: np.ndarray, k: int, draw: int) -> np.ndarray:
    """Sorted indices of ``k`` rows per class (every row of a class with ``k`` or fewer),
    drawn by a generator seeded with (k, draw) alone: every head, every feature file of the
    same data, and every rerun get the same images."""
    rng = np.random.default_rng([k, draw])
    per_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    return np.sort(np.concatenate([rng.choice(rows, min(k, len(rows)), replace=False)
                                   for rows in per_class]))


def curve_points(shots: list, tries: int) -> list[tuple[int, int]]:
    """(k, draw) of every point a curve needs (``"all"`` is the full-data result, apart)."""
    return [(k, t) for k in shots if k != ALL for t in range(tries)]


def train_curve(feature_path: Path | list[Path], head: str, params: dict | None = None, *,
                shots, tries: int | None = None, results_dir: str | Path = DEFAULT_RESULTS_DIR,
                memory_budget_gb: float | None = None, force: bool = False,
                threads: int | None = None) -> list[tuple[str, Path]]:
    """A learning curve of ``head`` on cached features: for each k in ``shots``, ``tries``
    seeded draws of k training images per class (``k_shot_rows``), each fitted and scored
    on the whole test split; ``"all"`` is the head's full-data result (``train_one``).
    Nothing is extracted: the rows come from the file. Each point is a result of its own
    (``results.curve_point_dir``): adding a k or a draw trains only that.

    No leakage: a draw's validation split is carved from its own k-shot rows only (the
    head's usual carve, on those rows; a dataset's own val/ rows are never drawn). A draw
    with a class of one image has nothing to carve: the head then fits its
    ``HeadSpec.fixed`` setting on every row and chooses nothing (the record says so)."""
    params = dict(params or {})
    check_curve_head(head, params)
    shots, tries, threads = check_shots(shots), check_tries(tries), check_threads(threads)
    check_results_dir(results_dir)
    done = []
    with contextlib.ExitStack() as stack:
        files, checksums, parts, checksum = _open_features(stack, feature_path)
        todo, versions = [], head_versions()
        for k, t in curve_points(shots, tries):
            out = curve_point_dir(results_dir, parts, head, params, k, t)
            if not force and results.is_current(out, checksum, params, versions):
                done.append(("up-to-date", out))
            else:
                todo.append((k, t, out))
        if todo:
            data = _load(files, head, memory_budget_gb)
            pool = np.arange(len(data.y_train) - data.validation_rows)  # val/ rows: never drawn
        for k, t, out in todo:
            with results.locked(out):
                if not force and results.is_current(out, checksum, params, versions):  # meanwhile
                    done.append(("up-to-date", out))
                    continue
                rows = pool[k_shot_rows(data.y_train[pool], k, t)]
                done.append(_fit_point(files, checksums, checksum, data, rows, head, params, k, t,
                                       tries, threads, out))
    if ALL in shots:
        done.append(train_one(feature_path, head, params,
                              results_dir=results_dir, memory_budget_gb=memory_budget_gb,
                              force=force, threads=threads))
    accuracy: dict = {}
    for _, out in done:
        record = ResultRecord.load(out)
        accuracy.setdefault(record.shots or ALL, []).append(100 * record.test_accuracy)
    log.info("%s learning curve on %s: %s", head_label(head, params),
             " + ".join(ff.path.name for ff in files), ", ".join(  # every file of a fusion
                 f"{k}{'-shot' if k != ALL else ''} {np.mean(a):.2f}%"
                 + (f" ± {np.std(a, ddof=1):.2f}" if len(a) > 1 else "")
                 for k, a in accuracy.items()))
    return done


def _fit_point(files, checksums, checksum, data, rows: np.ndarray, head: str, params: dict,
               k: int, draw: int, tries: int, threads: int, out: Path) -> tuple[str, Path]:
    y = data.y_train[rows]
    fixed = np.unique(y, return_counts=True)[1].min() < 2  # nothing to carve a validation from
    setting = {**(HEADS[head].fixed or {}), **params} if fixed else params
    model = make_head(head, setting)
    if fixed:
        model.set_params(validation_fraction=0.0)
    with _thread_budget(model, params, threads):
        t0 = time.perf_counter()
        model.fit(data.X_train[rows], y)
        fit_seconds = time.perf_counter() - t0
        scores = evaluate(model, data.X_test, data.y_test, data.classes)
    scores.pop("mistakes")
    validation = ({"none": "a class has one image: nothing chosen, the head's fixed setting",
                   "fixed": setting} if fixed else
                  {"carved": "a seeded stratified share of this draw's k-shot rows",
                   "fraction": model.get_params().get("validation_fraction")})
    record = _record(model, scores, files, checksums, checksum, head=head, ran=head, note="",
                     head_version=HEADS[head].version, params=params, threads=threads,
                     fit_seconds=fit_seconds, n_train=len(rows), n_test=len(data.y_test),
                     validation=validation, shots=k, draw=draw)
    with results.writing(out) as tmp:
        record.save(tmp)
    log.info("%s %d-shot, draw %d/%d: test accuracy %.2f%% (%d rows, fit %.1f s)",
             head_label(head, params), k, draw + 1, tries, 100 * record.test_accuracy, len(rows),
             fit_seconds)
    return "trained", out


def _record(model, scores: dict, files: list[FeatureFile], checksums: list[str], checksum: str,
            **fields) -> ResultRecord:
    """The record of ``model`` fitted on ``files``: its test ``scores``, what it chose and
    what it was fitted on (``fields``: head, params, sizes, ... as ``ResultRecord`` names them)."""
    summaries = [_features_summary(ff) for ff in files]
    return ResultRecord(
        **scores, head=fields.pop("head"), head_ran=fields.pop("ran"),
        best_params=_jsonable(getattr(model, "best_params_", {})),
        sweep=_jsonable(getattr(model, "sweep_", [])),
        sweep_skipped_past_peak=_jsonable(getattr(model, "skipped_", [])),
        converged=getattr(model, "converged_", None),
        validation_accuracy=getattr(model, "validation_score_", None),
        sweep_rows=getattr(model, "sweep_rows_", None),
        features_file=str(files[0].path), features_key=files[0].key, features_checksum=checksum,
        features_files=[{"path": str(ff.path), "key": ff.key, "checksum": c}
                        for ff, c in zip(files, checksums)],
        features=summaries[0] if len(files) == 1 else {
            "dataset": summaries[0]["dataset"], "fused": summaries,
            "width": sum(f["width"] for f in summaries)},
        versions={**files[0].attrs.get("provenance", {}).get("versions", {}),
                  "python": platform.python_version()},
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), solver=solver(model), **fields)


@contextlib.contextmanager
def _thread_budget(model, params: dict, threads: int):
    """At most ``threads`` busy at once: the sweep's joblib workers (at most 4, as before)
    times their BLAS threads, and every BLAS/OpenMP pool of this process (the refit, the
    MLP, prediction: scikit-learn's float64 L-BFGS and numpy's and scipy's OpenBLAS each
    start one thread per core otherwise), also inside a Ray task (it holds a node's cores)."""
    from joblib import parallel_config
    from joblib.parallel import get_active_backend

    workers = min(4, threads)
    if "n_jobs" in model.get_params() and "n_jobs" not in params:
        model.set_params(n_jobs=workers)
    local = type(get_active_backend()[0]).__name__ == "LokyBackend"
    with contextlib.ExitStack() as stack:
        if local:
            stack.enter_context(parallel_config(backend="loky",
                                                inner_max_num_threads=max(1, threads // workers)))
        stack.enter_context(solver_threads(threads))
        yield


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _write_result(out: Path, model, record: ResultRecord, classes: list[str],
                  mistakes: list[dict], source: str | None) -> None:
    """The result folder, whole or not at all: the model, metrics.json, confusion.png,
    mistakes.csv and (where the original images can still be read) mistakes.png."""
    with results.writing(out) as tmp:
        if hasattr(model, "model_") and type(model.model_).__module__.startswith("keras"):
            model.model_.save(tmp / "model.keras")
            keras_model, model.model_ = model.model_, None
            joblib.dump(model, tmp / "model.joblib")  # the wrapper (classes, params); net in .keras
            model.model_ = keras_model
        else:
            joblib.dump(model, tmp / "model.joblib")
        plot_confusion(record.confusion_matrix, classes, result_title(record), tmp / "confusion.png")
        write_mistakes(mistakes, tmp / "mistakes.csv")
        why_not = (plot_mistakes(mistakes, source, result_title(record), tmp / "mistakes.png")
                   if source else "the feature file does not record its dataset's source")
        if why_not and mistakes:
            log.info("no mistakes.png: %s", why_not)
        record.save(tmp)


def train_heads(heads: list[str], *, features: list[str] | None = None,
                cache_dir: str = DEFAULT_CACHE_DIR, results_dir: str = DEFAULT_RESULTS_DIR,
                params: list[str] | None = None, memory_budget_gb: float | None = None,
                force: bool = False, fuse: bool = False, threads: int | None = None,
                shots=None, tries: int | None = None) -> None:
    """``pipeline train``: each head on each given (or every complete) feature file, or with
    ``fuse`` on the given files side by side; with ``shots``, learning curves; sharing the
    cores as ``run_heads`` does."""
    parsed = _parse_params(params or [])
    check_threads(threads)
    if shots is not None:
        check_shots(shots)
        for head in heads:
            check_curve_head(head, parsed)
    elif tries is not None:
        raise PipelineError("--tries goes with --shots (draws per number of images per class)")
    check_tries(tries)
    for head in heads:
        check_params(head, parsed)
    check_results_dir(results_dir)
    store = FeatureStore(cache_dir)
    files = [store.find(f) for f in features] if features else store.complete_files()
    older = len(store.superseded_keys()) if not features else 0
    if older:
        log.info("ignoring %d feature file(s) of older data (superseded by a newer extraction "
                 "of the same request; `python -m pipeline ls` marks them, `python -m pipeline gc` "
                 "removes them, --features names one to train on it anyway)", older)
    if not files:
        raise PipelineError(f"no complete feature files in {cache_dir}/; extract features first "
                            "(python -m pipeline extract ... or make features)")
    if fuse and len(files) < 2:
        raise PipelineError("--fuse needs at least two feature files: --features A B (paths, "
                            "or keys as `python -m pipeline ls` prints them)")
    calls = [{"feature_path": path, "head": head, "params": parsed, "results_dir": results_dir,
              "memory_budget_gb": memory_budget_gb, "force": force,
              **({} if shots is None else {"shots": shots, "tries": tries})}
             for path in ([files] if fuse else files) for head in heads]
    run_heads(calls, threads)


def train_call(**call) -> tuple[str, Path] | list:
    """One head entry: its result (``train_one``'s arguments), or its learning curve (with
    ``shots``: ``train_curve``'s)."""
    return train_curve(**call) if "shots" in call else train_one(**call)


def _file_names(feature_path) -> str:
    paths = feature_path if isinstance(feature_path, (list, tuple)) else [feature_path]
    return " + ".join(Path(p).stem for p in paths)


def _one_core(call: dict) -> bool:
    return bool(HEADS[call["head"]].lane_seconds) and "shots" not in call


def _one_core_last(calls: list[dict]) -> tuple[list[int], list[int]]:
    """Indices of the entries that use every core, in order, and of the one-core entries
    (``HeadSpec.lane_seconds``), the longest first."""
    narrow = sorted((i for i, call in enumerate(calls) if _one_core(call)),
                    key=lambda i: -HEADS[calls[i]["head"]].lane_seconds)
    return [i for i in range(len(calls)) if i not in narrow], narrow


def cluster_tasks(calls: list[dict], threads: int | None = None) -> list[dict]:
    """Head entries as cluster tasks (``--engine ray``), sized as ``run_heads`` runs them on one
    machine: a one-core head asks one core (two share a 2-core node, side by side), the others
    ``threads`` (None: a whole node); in the same order, the one-core heads last."""
    wide, narrow = _one_core_last(calls)
    return [{**calls[i], "threads": 1 if i in narrow else threads} for i in wide + narrow]


def run_heads(calls: list[dict], threads: int | None = None,
              announce: list[str] | None = None) -> None:
    """Head entries (``train_call``'s arguments) on ``threads`` cores: those whose solvers use
    every core one after another on all of them, then the one-core heads (``HeadSpec.lane_seconds``)
    side by side, one core each, longest first, in threads of this process (their solvers
    release the GIL).
    Measured in one process, 2 cores, the same answers: logreg, linear_svm, mlp and sgd_linear
    side by side 19.8-20.1 s against 34.5-35.0 s one after another on the 60,000 x 256
    Fashion-MNIST file, 13.9-14.5 s against 21.5-22.4 s on 45,000 x 256 CIFAR-10
    (benchmarks/lanes.txt). Side by side, two heads' features are in memory at once: with a
    ``memory_budget_gb`` given, every head trains alone. ``announce``: a line to log as each
    entry starts. The first error stops what has not started and is raised once the running
    entries finish."""
    threads = check_threads(threads)
    lines = announce or [""] * len(calls)
    wide, narrow = _one_core_last(calls)
    if threads < 2 or len(narrow) < 2 or any(calls[i].get("memory_budget_gb") for i in narrow):
        # in the order given (a memory budget the user gives is for one head's features at a time)
        wide, narrow = list(range(len(calls))), []
    several_files = len({str(call["feature_path"]) for call in calls}) > 1
    for i in wide:
        if lines[i]:
            log.info("%s", lines[i])
        train_call(**{**calls[i], "threads": threads})
    if not narrow:
        return
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i in narrow:
        todo.put(i)
    failed: list[BaseException] = []

    def lane() -> None:
        while not failed:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            call = calls[i]
            threading.current_thread().name = LANE + head_label(call["head"], call.get("params")) \
                + (f" on {_file_names(call['feature_path'])}" if several_files else "")
            if lines[i]:
                log.info("%s", lines[i])
            try:
                train_call(**{**call, "threads": 1})
            except BaseException as exc:  # noqa: BLE001 - raised again by the caller's thread
                failed.append(exc)

    # Every pool at one thread for as long as the lanes run: each head's own limit (one) then
    # sets and restores one, whatever the other lane does meanwhile. Daemon lanes: Ctrl-C ends
    # the process without waiting for their fits (a result is written whole or not at all).
    with solver_threads(1):
        lanes = [threading.Thread(target=lane, daemon=True)
                 for _ in range(min(threads, len(narrow)))]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
    if failed:
        raise failed[0]
