"""Stage 2: classifier heads on cached features, scikit-learn style.

Every head chooses its hyper-parameters on a stratified validation split carved from the
training rows it is given (never from test), the way linear probes are evaluated in the
literature (CLIP, Radford et al. 2021, appendix A.3): sweep C over a wide log range, refine
around the best, refit on train + validation. Standardisation (and optional L2
normalisation / PCA) is part of each head's pipeline, so it is fitted on training data only.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.metaestimators import available_if
from threadpoolctl import threadpool_limits

from pipeline import SPLITS, runtimes
from pipeline.errors import PipelineError
from pipeline.store import FeatureFile, memory_budget

# Exact SVC costs O(n^2) memory and O(n^2..n^3) time: beyond these rows ``rbf_svm`` runs as its
# Nystroem approximation. oneDAL's SVC (scikit-learn-intelex) fits the 45,000 x 256 CIFAR-10
# file in 19 s where stock scikit-learn takes 82-93 s (predict 2.8 s against 53-80 s), so with
# it (or cuML on a GPU, not measured here: no GPU lent) the exact head goes further.
EXACT_RBF_LIMIT = 20_000
EXACT_RBF_LIMIT_ACCELERATED = 60_000
NYSTROEM_COMPONENTS = 1000
log = logging.getLogger(__name__)


def _arrays(X, y) -> tuple[np.ndarray, np.ndarray]:
    """What scikit-learn estimators accept (lists, arrays of any dtype, string labels), as the
    arrays the heads index."""
    return np.asarray(X), np.asarray(y)


def _two_classes_at_least(head: str, classes: np.ndarray) -> None:
    """Our own heads' check before a fit (scikit-learn's refuse one class themselves, but its
    MLP fits one and then answers two probability columns)."""
    if len(classes) < 2:
        raise PipelineError(f"{head} needs at least two classes in its training rows")


def _no_validation(head) -> bool:
    """``validation_fraction=0`` (and no given validation rows): data too small to carve a
    validation split from (a 1-shot draw); the head then fits its ``HeadSpec.fixed`` setting
    on every row and chooses nothing. Users cannot ask for it (``FRACTION`` is open)."""
    return not head.validation_fraction and not head.validation_rows


def _validation_split(y: np.ndarray, fraction: float, seed: int, given: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): the user's own validation split where one is ``given``
    (the last ``given`` rows: an image folder's ``val/``), else a seeded stratified carve."""
    if given:
        return np.arange(len(y) - given), np.arange(len(y) - given, len(y))
    counts = np.bincount(np.unique(y, return_inverse=True)[1])
    if counts.min() < 2:
        few = ", ".join(str(c) for c in np.unique(y)[counts < 2][:10])
        raise PipelineError(f"cannot carve a validation split: class(es) {few} have a single "
                            "training row; every class needs at least 2 (add images, or give a "
                            "val/ folder)")
    idx = np.arange(len(y))
    n_val = max(int(round(fraction * len(y))), len(np.unique(y)))
    try:
        fit_idx, val_idx = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
    except ValueError as exc:
        raise PipelineError(f"cannot carve a validation split from {len(y)} training rows ({exc}); "
                            "use more training images") from None
    return np.sort(fit_idx), np.sort(val_idx)


def preprocessing(normalize: str = "none", pca: int = 0, seed: int = 0) -> list:
    """Steps fitted on training rows only: standardise, then optional L2 norm and PCA."""
    if normalize not in ("none", "l2"):
        raise PipelineError(f"normalize={normalize!r}: use 'none' or 'l2'")
    steps: list = [("flatten", FunctionTransformer(_flatten)), ("scale", StandardScaler())]
    if normalize == "l2":
        steps.append(("l2", Normalizer()))
    if pca:
        steps.append(("pca", PCA(n_components=pca, random_state=seed)))
    return steps


def _flatten(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X)
    return X.reshape(len(X), -1).astype(np.float32, copy=False)


def _fit_with_patience(model, run_epoch, score, max_epochs: int, patience: int):
    """Epochs until the validation score has not improved for ``patience`` epochs; returns a
    copy of the best model, its score and the score history."""
    return _fit_together({0: model}, lambda running: run_epoch(), lambda _: score(),
                         max_epochs, patience)[0]


def _fit_together(models: dict, run_epoch, score, max_epochs: int, patience: int) -> dict:
    """Several models trained epoch by epoch in lockstep, each until its validation score
    has not improved for ``patience`` epochs: ``run_epoch(names)`` trains the models still
    running on one epoch (one pass over the data serves them all), ``score(name)`` scores
    one. Returns {name: (copy of its best model, best score, score history)}."""
    best = {name: (None, -1.0) for name in models}
    history: dict = {name: [] for name in models}
    since = dict.fromkeys(models, 0)
    running = list(models)
    for _ in range(max_epochs):
        if not running:
            break
        run_epoch(running)
        for name in list(running):
            history[name].append(score(name))
            if history[name][-1] > best[name][1]:
                best[name], since[name] = (copy.deepcopy(models[name]), history[name][-1]), 0
            else:
                since[name] += 1
                if since[name] >= patience:
                    running.remove(name)
    return {name: (*best[name], history[name]) for name in models}


def _blas_threads(threads: int | None):
    """BLAS/OpenMP capped at ``threads`` for a head's own fits (None: as the process allows)."""
    return threadpool_limits(limits=threads) if threads else contextlib.nullcontext()


@contextlib.contextmanager
def solver_threads(threads: int):
    """Every thread pool a head's solvers use capped at ``threads``: BLAS/OpenMP (threadpoolctl)
    and oneDAL's TBB, which threadpoolctl does not see (daal4py's setting serves sklearnex)."""
    try:
        import daal4py
    except (ImportError, OSError):  # no intel extra (or one that cannot load: said by its heads)
        daal4py = None
    before = daal4py.num_threads() if daal4py else None
    with threadpool_limits(limits=threads):
        if daal4py:
            daal4py.daalinit(threads)
        try:
            yield
        finally:
            if daal4py:
                daal4py.daalinit(before)


class _TbbLargeBlocks:
    """oneDAL's allocator (TBB's scalable malloc) keeping freed blocks of over 64 MiB while a
    fit runs, as it keeps smaller ones. By default TBB unmaps them at once, and oneDAL's SVC
    allocates and frees such blocks (576 MiB at 60,000 rows) at every step, so each one is
    faulted in page by page again. rbf_svm's refit on Fashion-MNIST's 60,000 x 256 rows: 2.2
    million page faults and 7.2-7.8 s of system time, kept 0.19 million and 0.6-0.7 s; the
    whole head 38.8-41.5 s against 44.8-46.9 s, peak RSS 110-145 MiB higher
    (benchmarks/svc_page_faults.txt). Entered per fit; TBB's setting is the process's, so
    threads count who is inside, and when the last one leaves TBB's default comes back and
    what it kept is released. A no-op where oneDAL's TBB allocator is not loaded."""

    MODE_HUGE_SIZE_THRESHOLD, CLEAN_ALL_BUFFERS = 2, 0  # oneTBB's scalable_allocation_* codes
    KEEP_FROM, DEFAULT = 64 << 20, 1 << 40  # the largest it keeps by default; its default

    def __init__(self):
        self._lock, self._inside = threading.Lock(), 0

    @staticmethod
    def _library():
        try:  # only the copy already loaded (by oneDAL), never one loaded for this
            return ctypes.CDLL("libtbbmalloc.so.2", mode=getattr(os, "RTLD_NOLOAD", 0))
        except OSError:
            return None

    def __enter__(self):
        with self._lock:
            self._inside += 1
            if self._inside == 1 and (lib := self._library()):
                lib.scalable_allocation_mode(self.MODE_HUGE_SIZE_THRESHOLD,
                                             ctypes.c_ssize_t(self.KEEP_FROM))
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and (lib := self._library()):
                lib.scalable_allocation_mode(self.MODE_HUGE_SIZE_THRESHOLD,
                                             ctypes.c_ssize_t(self.DEFAULT))
                lib.scalable_allocation_command(self.CLEAN_ALL_BUFFERS, None)


tbb_large_blocks_kept = _TbbLargeBlocks()


def _fit_converged(model, X, y) -> bool:
    """Fit; False if the solver stopped at its iteration cap (recorded, not hidden)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _same(setting: dict) -> str:
    """A setting's key, equal for values equal but for float rounding (3.16 x 10^-0.5 is 1)."""
    return repr(sorted((k, float(f"{v:.9g}") if isinstance(v, float) else v)
                       for k, v in setting.items()))


def _setting(row: dict) -> dict:
    """The parameters of one sweep row, without what was measured."""
    return {k: v for k, v in row.items() if k not in ("val_accuracy", "converged")}


class _KeepsLastAnswer:
    """The last rows' scores kept, keyed by the rows' bytes: ``evaluate`` asks a head for the
    labels, then for the scores of the same test rows, and where scoring is most of a head's
    cost (a neighbour search, a kernel SVC's 45,000 x 7,000 kernel: 3.5 s) it pays once.
    ``_DERIVED`` names what is computed from the fitted model on demand: forgotten by a new
    fit, never saved with the model."""

    _DERIVED: tuple[str, ...] = ("_last",)

    def _answer(self, X: np.ndarray, compute) -> np.ndarray:
        key = (X.shape, hashlib.blake2b(np.ascontiguousarray(X).tobytes(), digest_size=16).digest())
        if self.__dict__.get("_last", (None,))[0] != key:
            self._last = (key, compute(X))
        return self._last[1].copy()

    def _forget_derived(self) -> None:
        for name in self._DERIVED:
            self.__dict__.pop(name, None)

    def __getstate__(self) -> dict:
        return {k: v for k, v in super().__getstate__().items() if k not in self._DERIVED}


def _vote_winner(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """SVC's label read from its decision values: scikit-learn's one-against-the-rest values
    are each class's one-against-one votes plus a confidence term within +-1/3, so rounding
    gives the votes and the first class with the most wins, as libsvm's vote (measured: the
    same labels as ``predict`` on 3,000 CIFAR-10 test rows, oneDAL and stock); two classes:
    one column, the second class where positive."""
    return classes[(scores > 0).astype(int) if scores.ndim == 1 else np.rint(scores).argmax(1)]


class SweepClassifier(_KeepsLastAnswer, ClassifierMixin, BaseEstimator):
    """Pick hyper-parameters on a validation split, then refit on all rows.

    ``grid`` is a list of parameter dicts for the final step; ``refine`` names a log-scale
    parameter to refine around the best with half-decade steps. With its defaults it is a
    standardised logistic regression, fitted once (no grid). ``vote_from_scores`` (SVC):
    the labels are read from the decision values, one kernel pass for both.
    ``refit_from_sweep`` (warm-startable estimators): the refit on all rows starts from the
    sweep's nearest solution instead of from zero (``_refit_start``).
    """

    _DERIVED = ("_last", "_starts")

    def __init__(self, estimator=None, grid=None, refine: str | None = None,
                 normalize: str = "none", pca: int = 0, validation_fraction: float = 0.1,
                 max_sweep_rows: int = 10_000, n_jobs: int | None = None, random_state: int = 0,
                 validation_rows: int = 0, fit_threads: int | None = None,
                 vote_from_scores: bool = False, refit_from_sweep: bool = False):
        self.refit_from_sweep = refit_from_sweep
        self.vote_from_scores = vote_from_scores
        self.validation_rows = validation_rows
        self.fit_threads = fit_threads
        self.estimator = estimator
        self.grid = grid
        self.refine = refine
        self.normalize = normalize
        self.pca = pca
        self.validation_fraction = validation_fraction
        self.max_sweep_rows = max_sweep_rows
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _pipeline(self, params: dict) -> Pipeline:
        clf = clone(self.estimator_).set_params(**params)
        return Pipeline(preprocessing(self.normalize, self.pca, self.random_state) + [("clf", clf)])

    def _score_chain(self, chain: list[dict], X, y, fit_idx, val_idx,
                     stop_past_peak: bool = False) -> list[tuple[float, bool]]:
        """Fit a chain of settings in order, each warm-started from the last where possible;
        (validation accuracy, converged) per setting tried: with ``stop_past_peak``, the
        chain ends at the first setting that scores below the best before it. A warm-started
        setting's solution is kept in ``self._starts`` for the refit to start from."""
        model = self._pipeline(chain[0])
        warm = "warm_start" in model.named_steps["clf"].get_params()
        if warm:
            model.set_params(clf__warm_start=True)
        # (not behind a PCA: refit on all rows, it may turn or flip its axes)
        keep = warm and self.refit_from_sweep and "pca" not in model.named_steps
        scores: list[tuple[float, bool]] = []
        for params in chain:
            model.set_params(**{f"clf__{k}": v for k, v in params.items()})
            converged = self._fit(model, X[fit_idx], y[fit_idx])
            scores.append((float(accuracy_score(y[val_idx], self._labels(model, X[val_idx]))),
                           converged))
            if keep:
                clf = model.named_steps["clf"]
                self._starts.append((dict(params), clf.coef_.copy(), clf.intercept_.copy()))
            if stop_past_peak and scores[-1][0] < max(s for s, _ in scores):
                break
        return scores

    def _fit(self, model, X, y) -> bool:
        """``_fit_converged`` with BLAS/OpenMP capped at ``fit_threads`` where given, and
        oneDAL's large blocks kept while it runs (``tbb_large_blocks_kept``)."""
        with _blas_threads(self.fit_threads), tbb_large_blocks_kept:
            return _fit_converged(model, X, y)

    def fit(self, X, y):
        self._forget_derived()
        X, y = _arrays(X, y)
        self.estimator_ = self.estimator if self.estimator is not None else \
            LogisticRegression(max_iter=1000)
        grid = list(self.grid) if self.grid else [{}]
        if _no_validation(self):  # nothing to choose on: the first setting, on every row
            self.sweep_, self.skipped_, self.sweep_rows_ = [], [], 0
            self.best_params_, self.validation_score_ = dict(grid[0]), None
            self.model_ = self._pipeline(self.best_params_)
            self.converged_ = self._fit(self.model_, X, y)
            self.classes_ = self.model_.classes_
            return self
        fit_idx, val_idx = _validation_split(y, self.validation_fraction, self.random_state,
                                             self.validation_rows)
        if len(fit_idx) > self.max_sweep_rows and len(grid) > 1:
            # Selection on a stratified subsample bounds the sweep's cost; the final model
            # is still refit on every training row.
            fit_idx, _ = train_test_split(fit_idx, train_size=self.max_sweep_rows,
                                          stratify=y[fit_idx], random_state=self.random_state)
            fit_idx = np.sort(fit_idx)
        self.sweep_rows_ = len(fit_idx)
        n_jobs = self.n_jobs or min(4, os.cpu_count() or 1)
        tried: dict[str, float] = {}

        # Warm-startable estimators (logreg, linear_svm) go up the grid as one chain in this
        # process, each fit starting from the last (a second chain starting cold at a high C
        # cost more iterations than the whole chain below it, and settings warm-started past
        # the peak barely move), and stop once past the validation peak. So do solvers that
        # use every core themselves (oneDAL, cuML: a 10,000-row SVC fit took 3.0 s on two
        # threads against 6.0 s on one, and a worker pays its start). The others (stock
        # kernel SVMs, one thread each) go up the grid n_jobs settings at a time in parallel
        # and stop once past the peak.
        in_process = ("warm_start" in self.estimator_.get_params()
                      or solver(self.estimator_) != "scikit-learn")

        def record(settings: list[dict], scored: list[tuple[float, bool]], left: int) -> None:
            for c, (score, converged) in zip(settings, scored):
                tried[_same(c)] = score
                self.sweep_.append({**c, "val_accuracy": score, "converged": converged})
            best = max(self.sweep_, key=lambda r: r["val_accuracy"])
            log.info("  sweep: %d setting(s) tried, %d more planned, %.0f s, best so far %s "
                     "(validation %.2f%%)", len(self.sweep_), left, time.perf_counter() - t0,
                     _setting(best), 100 * best["val_accuracy"])

        def sweep(candidates: list[dict], stop_past_peak: bool) -> None:
            todo = [c for c in candidates if _same(c) not in tried]
            if in_process and todo:
                scored = self._score_chain(todo, X, y, fit_idx, val_idx, stop_past_peak)
                record(todo, scored, 0)
                self.skipped_ += [dict(c) for c in todo[len(scored):]]
                return
            for start in range(0, len(todo), n_jobs):
                part = todo[start:start + n_jobs]
                results = Parallel(n_jobs=min(n_jobs, len(part)))(
                    delayed(self._score_chain)([c], X, y, fit_idx, val_idx) for c in part)
                record(part, [r for res in results for r in res], len(todo) - start - len(part))
                scores = [r["val_accuracy"] for r in self.sweep_]
                if stop_past_peak and scores[-1] < max(scores) and start + n_jobs < len(todo):
                    self.skipped_ += [dict(c) for c in todo[start + n_jobs:]]
                    return

        self.sweep_, self.skipped_, self._starts = [], [], []
        t0 = time.perf_counter()
        sweep(grid, stop_past_peak=True)
        best = max(self.sweep_, key=lambda r: r["val_accuracy"])
        if self.refine and len(grid) > 1:
            base = _setting(best)
            sweep([{**base, self.refine: base[self.refine] * f} for f in (10 ** -0.5, 10 ** 0.5)],
                  stop_past_peak=False)
            best = max(self.sweep_, key=lambda r: r["val_accuracy"])
        self.best_params_ = _setting(best)
        self.validation_score_ = best["val_accuracy"]
        self.model_ = self._pipeline(self.best_params_)
        start = self._refit_start(len(y) / self.sweep_rows_)
        log.info("  refit %s on all %s rows%s", self.best_params_, f"{len(y):,}",
                 f", from the sweep's solution at {start[0]}" if start else "")
        if start:
            clf = self.model_.named_steps["clf"]
            clf.set_params(warm_start=True)
            _, clf.coef_, clf.intercept_ = start
        self.converged_ = self._fit(self.model_, X, y)
        if start:
            clf.set_params(warm_start=False)  # a later fit by the user starts afresh
        self._forget_derived()
        self.classes_ = self.model_.classes_
        return self

    def _refit_start(self, rows_ratio: float):
        """Where the refit on all rows starts (None: from zero): the sweep's solution nearest
        to the chosen setting's on all rows. The heads' problems are 0.5 |w|^2 + C x (a sum
        over rows), so on ``rows_ratio`` times the rows, C weighs ``rows_ratio`` times more:
        the sweep's solution at C x rows_ratio is the nearest, the one at C itself is not.
        On Fashion-MNIST's 60,000 x 256 features, logreg at C = 0.01 started from the sweep's
        solution at C = 0.1: 72 L-BFGS iterations against 133 from zero (from C = 0.01 itself:
        114); linear_svm's squared hinge took more iterations from there (167 against 129) and
        a few fewer from its own C (122), so it refits from zero (benchmarks/warm_refit.txt)."""
        same = [s for s in self._starts if {k: v for k, v in s[0].items() if k != self.refine}
                == {k: v for k, v in self.best_params_.items() if k != self.refine}]
        if not same or self.refine not in self.best_params_:
            return None
        target = np.log(self.best_params_[self.refine] * rows_ratio)
        return min(same, key=lambda s: abs(np.log(s[0][self.refine]) - target))

    def _labels(self, model, X) -> np.ndarray:
        if self.vote_from_scores:
            return _vote_winner(model.decision_function(X), model.classes_)
        return model.predict(X)

    def predict(self, X):
        if self.vote_from_scores:
            return _vote_winner(self.decision_function(X), self.classes_)
        return self.model_.predict(X)

    def _fitted_or_estimator(self):
        """What answers for the chosen model: itself once fitted, else the estimator it will fit
        (so that ``hasattr`` tells the truth before ``fit``, as scikit-learn's meta-estimators do)."""
        return getattr(self, "model_", None) or self.estimator or LogisticRegression()

    @available_if(lambda self: hasattr(self._fitted_or_estimator(), "predict_proba"))
    def predict_proba(self, X) -> np.ndarray:
        return self.model_.predict_proba(X)

    @available_if(lambda self: hasattr(self._fitted_or_estimator(), "decision_function"))
    def decision_function(self, X) -> np.ndarray:
        if self.vote_from_scores:
            return self._answer(np.asarray(X), self.model_.decision_function)
        return self.model_.decision_function(X)


class EarlyStoppingMLP(ClassifierMixin, BaseEstimator):
    """One hidden layer (100 units, as in the course material), stopped on our validation split.

    Trained on ``fit_threads`` BLAS threads (default one): its products are small (a batch of
    256 rows), and a BLAS thread pool that meets another process on the cores collapses on
    them. Measured on the 45,000 x 256 CIFAR-10 file, the whole head, with a single-threaded
    job on one of the 2 cores: 5.7 s on one thread against 40.8-53.2 s on two; on a quiet
    machine 5.9 s against 5.1 s (``benchmarks/heads.json``, ``heads-final.json``)."""

    def __init__(self, hidden: int = 100, alpha: float = 1e-4, learning_rate: float = 1e-3,
                 batch_size: int = 256, max_epochs: int = 200, patience: int = 10,
                 normalize: str = "none", pca: int = 0, validation_fraction: float = 0.1,
                 random_state: int = 0, validation_rows: int = 0, fit_threads: int | None = 1,
                 seeds: int = 1):
        self.fit_threads = fit_threads
        self.validation_rows = validation_rows
        self.hidden = hidden
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.normalize = normalize
        self.pca = pca
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.seeds = seeds

    def fit(self, X, y):
        with _blas_threads(self.fit_threads):
            return self._fit(*_arrays(X, y))

    def _fit(self, X, y):
        """``seeds`` networks from different random starts (random_state, +1, ...), each
        stopped on the same validation rows; their probabilities are averaged. One network's
        test accuracy moves by half a point with float32 rounding in its input (measured:
        docs/results/best.md); an average of several moves less."""
        self.classes_ = np.unique(y)
        _two_classes_at_least("mlp", self.classes_)
        if _no_validation(self):  # no early stopping: max_epochs epochs on every row
            fit_idx = val_idx = np.arange(len(y))
        else:
            fit_idx, val_idx = _validation_split(y, self.validation_fraction, self.random_state,
                                                 self.validation_rows)
        prep = Pipeline(preprocessing(self.normalize, self.pca, self.random_state)).fit(X[fit_idx])
        Xf, Xv = prep.transform(X[fit_idx]), prep.transform(X[val_idx])
        self.members_, epochs, self.history_ = [], [], []
        for seed in range(self.random_state, self.random_state + self.seeds):
            mlp = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=self.alpha,
                                learning_rate_init=self.learning_rate,
                                batch_size=min(self.batch_size, len(fit_idx)),  # (few-shot draws)
                                random_state=seed)
            if _no_validation(self):
                for _ in range(self.max_epochs):
                    mlp.partial_fit(Xf, y[fit_idx], classes=self.classes_)
                best, history = mlp, []
                epochs.append(self.max_epochs)
            else:
                best, _, history = _fit_with_patience(
                    mlp, lambda m=mlp: m.partial_fit(Xf, y[fit_idx], classes=self.classes_),
                    lambda m=mlp: float(accuracy_score(y[val_idx], m.predict(Xv))),
                    self.max_epochs, self.patience)
                epochs.append(int(np.argmax(history)) + 1)
            self.members_.append(Pipeline(list(prep.steps) + [("clf", best)]))
            self.history_ = self.history_ or history  # the first network's, as before
        self.model_ = self.members_[0]
        self.best_params_ = {"epochs": epochs[0] if self.seeds == 1 else epochs,
                             "hidden": self.hidden, "alpha": self.alpha}
        self.validation_score_ = None if _no_validation(self) else \
            float(accuracy_score(y[val_idx], self.predict(X[val_idx])))
        return self

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]

    def predict_proba(self, X) -> np.ndarray:
        return np.mean([m.predict_proba(X) for m in self.members_], axis=0)


class Conv1x1MLP(ClassifierMixin, BaseEstimator):
    """For spatial maps (h x w x C): a trainable 1x1 conv bottleneck, then an MLP (Keras)."""

    def __init__(self, filters: int = 128, hidden: int = 100, dropout: float = 0.3,
                 learning_rate: float = 1e-3, batch_size: int = 128, max_epochs: int = 50,
                 patience: int = 5, validation_fraction: float = 0.1, random_state: int = 0,
                 validation_rows: int = 0):
        self.validation_rows = validation_rows
        self.filters = filters
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, X, y):
        X, y = _arrays(X, y)
        import keras

        if X.ndim != 4:
            raise PipelineError(f"conv1x1_mlp needs spatial features (n, h, w, C), got shape "
                                f"{X.shape}; extract with --mode spatial")
        keras.utils.set_random_seed(self.random_state)
        fit_idx, val_idx = _validation_split(y, self.validation_fraction, self.random_state,
                                             self.validation_rows)
        self.classes_ = np.unique(y)
        norm = keras.layers.Normalization(axis=-1)  # maps stay float16 in RAM: cast per batch
        norm.adapt(X[fit_idx][: min(len(fit_idx), 5000)].astype(np.float32))
        model = keras.Sequential([
            keras.Input(X.shape[1:]), norm,
            keras.layers.Conv2D(self.filters, 1, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(self.hidden, activation="relu"),
            keras.layers.Dropout(self.dropout),
            keras.layers.Dense(len(self.classes_), activation="softmax"),
        ])
        model.compile(keras.optimizers.Adam(self.learning_rate),
                      "sparse_categorical_crossentropy", metrics=["accuracy"])
        labels = np.searchsorted(self.classes_, y)
        stop = keras.callbacks.EarlyStopping("val_accuracy", patience=self.patience,
                                             restore_best_weights=True)
        history = model.fit(X[fit_idx], labels[fit_idx],
                            validation_data=(X[val_idx], labels[val_idx]),
                            epochs=self.max_epochs, batch_size=self.batch_size, callbacks=[stop],
                            verbose=0, shuffle=True)
        val = history.history["val_accuracy"]
        self.model_ = model
        self.best_params_ = {"epochs": int(np.argmax(val)) + 1, "filters": self.filters,
                             "hidden": self.hidden}
        self.validation_score_ = float(max(val))
        return self

    def predict_proba(self, X) -> np.ndarray:
        return self.model_.predict(np.asarray(X), batch_size=512, verbose=0)

    def predict(self, X):
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class StreamingLinear(ClassifierMixin, BaseEstimator):
    """Linear head trained with ``partial_fit`` over row blocks: features never all in RAM.

    ``X`` may be an h5py dataset, read a piece at a time. Files come sorted by class (an image
    folder is), and SGD fed one class after another forgets the others (41.7% against
    logreg's 74.0% on 45,000 CIFAR-10 rows before this): so each epoch visits the pieces in
    a new random order, ``shuffle_pieces`` at a time, their rows shuffled together (a buffer
    of at most ``buffer_mb``). Standardisation uses statistics streamed over the training
    rows; SGD is averaged with a constant step (``eta0``); ``alpha`` (unless given) and the
    number of epochs are chosen on the validation rows. Measured on those 45,000 rows (in
    memory, one run each): constant steps of 0.01 with averaging reached 73.2-73.4% validation
    accuracy over alpha 3e-4..3e-3, sklearn's default "optimal" schedule 72.8-73.3%.
    Each alpha stops ``patience`` epochs past its validation peak: 3 chose what 5 chose on
    the 256-wide CIFAR-10 and Fashion-MNIST files (the same alpha, epochs and test accuracy)
    in 16.1 s against 18.9 s and 18.5 s against 25.1 s; on the 1,280-wide MobileNetV2 file
    alpha 3e-3 for 4 epochs instead of 1e-3 for 12, 74.07% against 74.13%, in 51 s against
    102 s (benchmarks/sgd_patience.txt). 2 changed CIFAR-10's choice (72.80% against 73.06%).
    """

    # Fashion-MNIST chooses the lowest: with 1e-5 and 3e-5 added it still does (validation
    # 88.30 / 88.32 / 88.33% at 1e-5 / 3e-5 / 1e-4, a plateau), as CIFAR-10 its 3e-4
    # (benchmarks/sgd_alphas.txt).
    ALPHAS = (1e-4, 3e-4, 1e-3, 3e-3)

    def __init__(self, loss: str = "log_loss", alpha: float | None = None, block_rows: int = 256,
                 shuffle_pieces: int = 64, buffer_mb: int = 256, eta0: float = 0.01,
                 max_epochs: int = 30, patience: int = 3, validation_fraction: float = 0.1,
                 max_validation_rows: int = 10_000, max_sweep_rows: int = 20_000,
                 random_state: int = 0, validation_rows: int = 0, n_jobs: int | None = None):
        self.max_sweep_rows = max_sweep_rows
        self.validation_rows = validation_rows
        self.n_jobs = n_jobs
        self.loss = loss
        self.alpha = alpha
        self.eta0 = eta0
        self.block_rows = block_rows
        self.shuffle_pieces = shuffle_pieces
        self.buffer_mb = buffer_mb
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.max_validation_rows = max_validation_rows
        self.random_state = random_state

    def _piece_rows(self, X) -> int:
        row_bytes = 4 * int(np.prod(X.shape[1:]))
        return max(16, min(self.block_rows, (self.buffer_mb << 20) // (self.shuffle_pieces * row_bytes)))

    def _blocks(self, X, mask, starts=None):
        step = self._piece_rows(X)
        for lo in (range(0, X.shape[0], step) if starts is None else starts):
            rows = _flatten(np.asarray(X[lo:lo + step]))
            yield rows[mask[lo:lo + len(rows)]], lo, len(rows)

    def _sgd(self, alpha: float) -> SGDClassifier:
        """The model the sweep tries and the refit trains: one definition for both. Its
        one-vs-rest problems run ``n_jobs`` at a time in threads (the SGD loop releases the
        GIL; each class's seed is drawn before, so the answer does not depend on it)."""
        return SGDClassifier(loss=self.loss, alpha=alpha, average=True, learning_rate="constant",
                             eta0=self.eta0, random_state=self.random_state, n_jobs=self.n_jobs)

    def fit(self, X, y):
        y = np.asarray(y)
        X = X if hasattr(X, "shape") else np.asarray(X)  # an h5py dataset stays on disk
        rng = np.random.default_rng(self.random_state)
        n_val = min(max(int(self.validation_fraction * len(y)), 1), self.max_validation_rows)
        val = np.zeros(len(y), bool)
        if self.validation_rows:  # the user's own validation split: the last rows
            val[len(y) - self.validation_rows:] = True
        else:
            val[rng.choice(len(y), n_val, replace=False)] = True
        self.classes_ = np.unique(y)
        self.scaler_ = StandardScaler()
        for rows, _, _ in self._blocks(X, ~val):
            self.scaler_.partial_fit(rows)
        Xv = self.scaler_.transform(np.concatenate([r for r, _, _ in self._blocks(X, val)]))
        yv = y[val]
        starts = np.arange(0, X.shape[0], self._piece_rows(X))

        def epoch(clfs: list, order: np.random.Generator, held_out: np.ndarray = val) -> None:
            """One pass over the training rows in a fresh order; each buffer of rows is read
            and standardised once and trains every model in ``clfs``."""
            shuffled = order.permutation(starts)
            for at in range(0, len(shuffled), self.shuffle_pieces):
                pieces = list(self._blocks(X, ~held_out, shuffled[at:at + self.shuffle_pieces]))
                rows = np.concatenate([r for r, _, _ in pieces])
                labels = np.concatenate([y[lo:lo + n][~held_out[lo:lo + n]] for _, lo, n in pieces])
                mix = order.permutation(len(rows))
                rows, labels = self.scaler_.transform(rows[mix]), labels[mix]
                for clf in clfs:
                    clf.partial_fit(rows, labels, classes=self.classes_)

        # Every alpha in lockstep on one stream of epochs: the same rows in the same order
        # as each would see alone (one seeded order), read and standardised once for all; on
        # a stratified ``max_sweep_rows`` of the training rows, as the other heads sweep: on
        # 20,000, 73.06% (CIFAR-10) and 87.51% (Fashion-MNIST) against 73.11% and 87.49% on
        # every row, fit 9.3 s and 14.8 s against 22.6 s and 28.5 s; on 10,000 CIFAR-10 lost
        # half a point (benchmarks/sgd_sweep_rows.txt).
        alphas = [self.alpha] if self.alpha is not None else list(self.ALPHAS)
        models = {alpha: self._sgd(alpha) for alpha in alphas}
        order = np.random.default_rng(self.random_state)
        t0, epochs_run = time.perf_counter(), [0]
        left_out = val.copy()
        if (~val).sum() > self.max_sweep_rows:
            kept, _ = train_test_split(np.flatnonzero(~val), train_size=self.max_sweep_rows,
                                       stratify=y[~val], random_state=self.random_state)
            left_out[:] = True
            left_out[kept] = False

        def sweep_epoch(running: list) -> None:
            epoch([models[a] for a in running], order, left_out)
            epochs_run[0] += 1
            log.info("  sgd_linear: epoch %d for alpha %s, %.0f s", epochs_run[0],
                     ", ".join(f"{a:g}" for a in running), time.perf_counter() - t0)

        fitted = _fit_together(
            models, sweep_epoch, lambda alpha: float(accuracy_score(yv, models[alpha].predict(Xv))),
            self.max_epochs, self.patience)
        self.sweep_ = []
        best = None
        for alpha, (model, score, history) in fitted.items():
            self.sweep_.append({"alpha": alpha, "epochs": int(np.argmax(history)) + 1,
                                "val_accuracy": score})
            log.info("  sgd_linear: alpha %g, %d epoch(s), validation %.2f%%", alpha,
                     len(history), 100 * score)
            if best is None or score > best[1]:
                best = (model, score, alpha, history)
        _, self.validation_score_, alpha, self.history_ = best
        epochs = int(np.argmax(self.history_)) + 1
        # Refit on every training row (validation rows included) for the chosen alpha and
        # epochs, as the other heads refit on train + validation.
        self.model_ = self._sgd(alpha)
        order, everything = np.random.default_rng(self.random_state), np.zeros(len(y), bool)
        for _ in range(epochs):
            epoch([self.model_], order, everything)
        self.best_params_ = {"epochs": epochs, "alpha": alpha, "loss": self.loss}
        return self

    def predict(self, X):
        return self._by_block(self.model_.predict, X)

    def decision_function(self, X) -> np.ndarray:
        return self._by_block(self.model_.decision_function, X)

    def _by_block(self, method, X) -> np.ndarray:
        X = X if hasattr(X, "shape") else np.asarray(X)
        return np.concatenate([method(self.scaler_.transform(rows))
                               for rows, _, _ in self._blocks(X, np.ones(X.shape[0], bool))])


class WeightedKNN(_KeepsLastAnswer, ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity, each voting with exp(similarity / T): the
    weighted k-NN DINOv2 evaluates frozen features with (Oquab et al. 2023; T = 0.07). ``k``
    (unless given) is chosen on the validation rows among ``KS``: one neighbour search for
    the largest serves them all. Fitting keeps every training row (validation included);
    prediction runs ``block_rows`` query rows at a time, so memory stays at one block of
    similarities whatever the sizes."""

    KS = (10, 20, 100, 200)
    _DERIVED = ("_last", "_index")

    def __init__(self, k: int | None = None, temperature: float = 0.07,
                 validation_fraction: float = 0.1, random_state: int = 0,
                 validation_rows: int = 0, block_rows: int = 256):
        self.k = k
        self.temperature = temperature
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.validation_rows = validation_rows
        self.block_rows = block_rows

    def fit(self, X, y):
        self._forget_derived()
        X, y = _arrays(X, y)
        X = _unit_rows(X)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if self.k is not None and self.k > len(y):
            raise PipelineError(f"head 'knn': k={self.k} is more than the {len(y):,} training rows; "
                                f"the largest k possible is {len(y):,}")
        if _no_validation(self):  # nothing to choose on: k (default: the smallest of KS) as given
            self.k_, self.validation_score_, self.sweep_ = min(self.k or self.KS[0], len(y)), None, []
            self.best_params_ = {"k": self.k_, "temperature": self.temperature}
            self.X_, self.codes_ = X, codes
            return self
        fit_idx, val_idx = _validation_split(y, self.validation_fraction, self.random_state,
                                             self.validation_rows)
        ks = [self.k] if self.k is not None else [k for k in self.KS if k <= len(fit_idx)]
        ks = [min(k, len(fit_idx)) for k in ks or [len(fit_idx)]]
        sims, idx = self._neighbours(X[val_idx], _search_index(X[fit_idx]), max(ks))
        neighbour_codes = codes[fit_idx][idx]
        self.sweep_ = []
        for k in ks:
            votes = self._votes(sims[:, :k], neighbour_codes[:, :k])
            score = float(np.mean(votes.argmax(1) == codes[val_idx]))
            self.sweep_.append({"k": k, "val_accuracy": score})
        best = max(self.sweep_, key=lambda r: r["val_accuracy"])  # the smallest k on a tie
        self.k_, self.validation_score_ = best["k"], best["val_accuracy"]
        self.best_params_ = {"k": self.k_, "temperature": self.temperature}
        self.X_, self.codes_ = X, codes  # every training row, the validation rows included
        return self

    @property
    def index_(self):
        """The neighbour index over ``X_``, built on first use and never saved: oneDAL's
        pickled index held three copies of the rows (a 691 MB model.joblib for 230 MB of
        1,280-wide rows)."""
        if "_index" not in self.__dict__:
            self._index = _search_index(self.X_)
        return self._index

    def _neighbours(self, queries: np.ndarray, index, k: int):
        """(similarities, indices) of each query's k most similar rows in ``index``
        (``_search_index`` of unit rows), most similar first."""
        sims, idx = [], []
        for lo in range(0, len(queries), self.block_rows):
            distances, found = index.kneighbors(queries[lo:lo + self.block_rows], n_neighbors=k)
            sims.append(1 - np.square(distances, dtype=np.float32) / 2)
            idx.append(found)
        return np.concatenate(sims), np.concatenate(idx)

    def _votes(self, sims: np.ndarray, codes: np.ndarray) -> np.ndarray:
        weights = np.exp((sims - 1) / self.temperature)  # the -1 keeps exp() in range; ratios hold
        votes = np.zeros((len(sims), len(self.classes_)))
        np.add.at(votes, (np.arange(len(sims))[:, None], codes), weights)
        return votes

    def predict_proba(self, X) -> np.ndarray:
        return self._answer(_unit_rows(X), self._probabilities)

    def _probabilities(self, queries: np.ndarray) -> np.ndarray:
        sims, idx = self._neighbours(queries, self.index_, self.k_)
        votes = self._votes(sims, self.codes_[idx])
        return votes / np.maximum(votes.sum(1, keepdims=True), np.finfo(float).tiny)

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


def _search_index(unit_rows: np.ndarray):
    """A brute-force Euclidean neighbour index over rows of length one, whose distances give
    the cosine similarities: 1 - d^2 / 2."""
    return neighbours_class()(algorithm="brute").fit(unit_rows)


def _unit_rows(X) -> np.ndarray:
    """float32 rows of length one: their dot products are cosine similarities."""
    X = _flatten(np.asarray(X))
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- registry

def _log_grid(name: str, lo: int, hi: int) -> list[dict]:
    return [{name: float(10.0 ** e)} for e in range(lo, hi + 1)]


def _logreg(**kw):
    # Its sweep on 10,000 rows, as linear_svm's: against 20,000, measured on the 45,000 x 256
    # CIFAR-10 file the same C and 74.03% both, fit 5.7 s against 9.0 s; Fashion-MNIST
    # 60,000 x 256 C = 0.01 against 0.03, 88.08% against 88.07%, 12.7 s against 21.0 s
    # (linear_svm: 73.26% both, 5.0 s against 9.2 s; 87.97% against 88.01%, 11.8 s against 30.1 s).
    C = kw.pop("C", None)
    est = LogisticRegression(max_iter=kw.pop("max_iter", 1000), tol=1e-4)
    grid = [{"C": float(C)}] if C is not None else _log_grid("C", -4, 2)
    # L-BFGS on one BLAS thread: its products are tall and thin, and a second thread only
    # costs. Measured on the 45,000-row CIFAR-10 files, 2 cores, quiet: refit at C = 0.01
    # 2.6 s against 3.9 s (256 wide), 16.0 s against 19.2 s (736 wide); the sweep's fits
    # on 18,000 rows took half the time on one thread.
    # Its refit starts from the sweep's solution (``SweepClassifier._refit_start``): whole
    # head on one core, two rounds, Fashion-MNIST 7.5-7.9 s against 10.7-11.9 s from zero,
    # CIFAR-10 256 wide 4.2-4.4 s against 4.9-5.0 s, 1,280 wide 33.2-33.3 s against 37.9 s;
    # test accuracy within 0.02 points, 99.7-99.9% of test predictions equal
    # (benchmarks/warm_refit.txt).
    return SweepClassifier(est, grid=grid, refine="C", fit_threads=1, refit_from_sweep=True, **kw)


def _linear_svm(**kw):
    C = kw.pop("C", None)
    est = SquaredHingeSVM(max_iter=kw.pop("max_iter", 1000))
    grid = [{"C": float(C)}] if C is not None else _log_grid("C", -5, 0)
    # A warm chain up the grid like logreg's, on one BLAS thread (two measured no faster).
    return SweepClassifier(est, grid=grid, refine="C", fit_threads=1, **kw)


class SquaredHingeSVM(ClassifierMixin, BaseEstimator):
    """LinearSVC's problem, solved by L-BFGS on float32 products.

    The same objective as scikit-learn's ``LinearSVC`` (liblinear): per class, one against
    the rest, 0.5 * ||w||^2 + C * sum(max(0, 1 - y * (x.w + b))^2), the bias regularised like
    the weights. liblinear solves it on its own sparse copy of the rows (four times the
    float32 features) one class after another; here every class moves at once through two
    dense float32 matrix products per step. Measured on the 45,000 x 256 CIFAR-10 file,
    standardised, one thread each: C = 0.01 in 2.1 s against liblinear's 18.7 s, test
    accuracy 73.26% against 73.21%, 99.91% of predictions equal (C = 0.001: 1.7 s against
    6.9 s, 99.94%; C = 0.1: 2.4 s against 19.5 s, 99.97%). ``tol`` is relative, as
    liblinear's: the largest gradient entry at the solution over the largest at zero."""

    def __init__(self, C: float = 1.0, tol: float = 1e-4, max_iter: int = 1000,
                 warm_start: bool = False):
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start

    def fit(self, X, y):
        from scipy.optimize import minimize

        X, y = _arrays(X, y)
        X = _flatten(X)
        self.classes_, codes = np.unique(y, return_inverse=True)
        _two_classes_at_least("linear_svm", self.classes_)
        n, width = X.shape
        columns = 1 if len(self.classes_) == 2 else len(self.classes_)
        Y = -np.ones((n, columns), np.float32)  # +1 for the class of each column, -1 the rest
        if columns > 1:
            Y[np.arange(n), codes] = 1
        else:  # two classes: one problem, the second class positive (as LinearSVC)
            Y[codes == 1, 0] = 1
        Xb = np.hstack([X, np.ones((n, 1), np.float32)])  # the bias as a feature, as liblinear
        C = float(self.C)

        def loss_and_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
            W = w.reshape(width + 1, columns)
            slack = 1 - Y * (Xb @ W.astype(np.float32))
            np.maximum(slack, 0, out=slack)
            loss = 0.5 * float(w @ w) + C * float(np.sum(slack.astype(np.float64) ** 2))
            gradient = W - 2 * C * (Xb.T @ (Y * slack)).astype(np.float64)
            return loss, gradient.ravel()

        start = np.zeros((width + 1) * columns)
        if self.warm_start and getattr(self, "coef_", None) is not None and \
                self.coef_.shape == (columns, width):
            start = np.vstack([self.coef_.T, self.intercept_[None, :]]).ravel()
        at_zero = np.abs(loss_and_gradient(np.zeros_like(start))[1]).max()
        result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": self.max_iter, "gtol": self.tol * at_zero,
                                   "ftol": 0.0})
        if result.nit >= self.max_iter:
            warnings.warn(f"linear_svm: L-BFGS stopped at max_iter={self.max_iter}",
                          ConvergenceWarning, stacklevel=2)
        W = result.x.reshape(width + 1, columns)
        self.coef_, self.intercept_ = W[:-1].T.copy(), W[-1].copy()
        self.n_iter_ = result.nit
        self.n_features_in_ = width
        return self

    def decision_function(self, X) -> np.ndarray:
        scores = _flatten(X) @ self.coef_.T.astype(np.float32) + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X):
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)]


def _from_sklearnex(module: str, name: str, stock: str):
    """Class ``name`` of scikit-learn-intelex's ``module`` (the ``intel`` extra: oneDAL, the
    same answers as scikit-learn's), or None without it, saying once per head what runs."""
    try:
        return getattr(__import__(f"sklearnex.{module}", fromlist=[name]), name)
    except ModuleNotFoundError:
        log.info("scikit-learn-intelex is not installed: %s; `make install` adds it on x86-64",
                 stock)
    except (ImportError, OSError) as exc:  # e.g. an older TBB already loaded by another library
        log.warning("scikit-learn-intelex is installed but cannot be loaded (%s): %s",
                    str(exc).splitlines()[0][:160], stock)
    return None


@functools.cache
def onedal_svc():
    """oneDAL's SVC (measured 99.9-100% equal predictions to scikit-learn's), or None."""
    return _from_sklearnex("svm", "SVC", "exact RBF SVC runs on stock scikit-learn (slower; up "
                           f"to {EXACT_RBF_LIMIT:,} rows, then Nystroem)")


@functools.cache
def neighbours_class() -> type:
    """Where ``knn`` searches: oneDAL's brute-force NearestNeighbors, else scikit-learn's.
    Measured on 45,000 x 256 CIFAR-10 rows, 2,000 queries, 2 cores: 0.3-0.5 s against
    scikit-learn's 1.4 s and 3-4 s for a matrix product plus ``argpartition``; the same
    neighbours."""
    return _from_sklearnex("neighbors", "NearestNeighbors",
                           "knn searches with stock scikit-learn (slower)") or NearestNeighbors


@functools.cache
def cuml_svc():
    """cuML's SVC (RAPIDS; ``pip install cuml-cu12`` beside a CUDA driver) where it loads and
    sees an NVIDIA GPU, else None: most machines have neither, so its absence is not said."""
    try:
        import cupy
        from cuml.svm import SVC as CumlSVC

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except ModuleNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - no driver, no device, a broken CUDA install
        log.info("cuML is installed but cannot use a GPU (%s); rbf_svm runs on the CPU",
                 str(exc).splitlines()[0][:160])
        return None
    return CumlSVC


def svc_class() -> type:
    """Where exact RBF SVC runs: cuML on a GPU, else oneDAL, else stock scikit-learn."""
    return cuml_svc() or onedal_svc() or SVC


SOLVERS = {"cuml": "cuML", "sklearnex": "oneDAL", "daal4py": "oneDAL"}  # module -> name


def solver(model) -> str:
    """What computed the head: cuML, oneDAL or scikit-learn (recorded; not part of the answer)."""
    estimator = next((getattr(model, name) for name in ("estimator_", "estimator", "index_")
                      if getattr(model, name, None) is not None), model)
    return SOLVERS.get(type(estimator).__module__.split(".")[0], "scikit-learn")


def exact_rbf_limit() -> int:
    return EXACT_RBF_LIMIT if svc_class() is SVC else EXACT_RBF_LIMIT_ACCELERATED


def _rbf_svm(**kw):
    C, gamma = kw.pop("C", None), kw.pop("gamma", "scale")
    # Half a decade apart from 1 up, stopping past the peak (the refine step then goes below
    # 1 if 1 is best): on CIFAR-10 three fits where 1, 10, 100 and the refine took five.
    grid = ([{"C": float(C), "gamma": gamma}] if C is not None
            else [{"C": float(10 ** (e / 2)), "gamma": gamma} for e in range(5)])
    # Its sweep on 10,000 rows, as logreg's: measured, whole head, 2 cores, against 20,000:
    # CIFAR-10 45,000 x 256 the same C, 78.20% both, 39 s against 53 s; Fashion-MNIST
    # 60,000 x 256 C = 100 against 3.2, 91.16% against 91.18%, 45 s against 98 s. 5,000 rows
    # chose C = 1 on CIFAR-10: 77.07%, for 4 s less.
    # Its labels read from its decision values: one kernel pass over the test rows where
    # predict and decision_function took two (3.4 s each on CIFAR-10's 7,000). Checked for
    # scikit-learn's and oneDAL's decision values, not cuML's (no GPU to check them on).
    svc = svc_class()(kernel="rbf", cache_size=1000)
    return SweepClassifier(svc, grid=grid, refine="C", vote_from_scores=solver(svc) != "cuML", **kw)


def _rbf_svm_approx(**kw):
    C = kw.pop("C", None)
    n_components = kw.pop("n_components", NYSTROEM_COMPONENTS)
    est = Pipeline([("map", Nystroem(kernel="rbf", n_components=n_components, random_state=0)),
                    ("svm", LinearSVC(dual="auto", max_iter=5000, random_state=0))])
    grid = ([{"svm__C": float(C)}] if C is not None else _log_grid("svm__C", -3, 1))
    kw.setdefault("max_sweep_rows", 20_000)  # as it was measured; not measured on fewer
    return SweepClassifier(est, grid=grid, refine="svm__C", **kw)


@dataclass(frozen=True)
class Number:
    """A numeric parameter's type and range, declared like scikit-learn's ``Interval``."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.kind is int and not isinstance(value, int)):
            return "must be " + ("a whole number" if self.kind is int else "a number") + self._range()
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        above = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if value != value or below or above:
            return "must be" + self._range()
        return None

    def _range(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " " + " and ".join(t for t in (lo, hi) if t) if lo or hi else ""


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def problem(self, value) -> str | None:
        return None if value in self.values else f"must be one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Either:
    """The first or the second constraint (e.g. gamma: 'scale' | 'auto' | a number > 0)."""

    first: OneOf
    second: Number

    def problem(self, value) -> str | None:
        if self.first.problem(value) is None or self.second.problem(value) is None:
            return None
        return f"{self.first.problem(value)}, or{self.second.problem(value).removeprefix('must be')}"


POSITIVE = Number(float, 0, low_open=True)
COUNT = Number(int, 1)
FRACTION = Number(float, 0, 1, low_open=True, high_open=True)
SEED = Number(int, 0)
_PREPROCESSING = {"normalize": OneOf(("none", "l2")), "pca": Number(int, 0),
                  "validation_fraction": FRACTION, "random_state": SEED}
_SWEEP = {**_PREPROCESSING, "max_sweep_rows": COUNT, "n_jobs": Number(int, -1)}
_EPOCHS = {"max_epochs": COUNT, "patience": COUNT, "batch_size": COUNT, "learning_rate": POSITIVE}


@dataclass(frozen=True)
class HeadSpec:
    """One registered head: how to build it, what features it takes, its parameters."""

    factory: object  # a class or a function returning an estimator
    takes: str  # "pooled" vectors | "spatial" maps | "streamed" from disk
    params: dict
    about: str
    # The setting it fits without a validation split (learning curves' 1-shot draws; pooled
    # heads only): what is chosen on validation otherwise, fixed at a common default.
    fixed: dict | None = None
    # Set where its solvers gain nothing from a second core (measured, see each factory):
    # several such heads train side by side, one core each, longest first (``training.run_heads``);
    # the seconds its fit took on one core beside another head, on the 60,000 x 256
    # Fashion-MNIST file (benchmarks/lanes.txt, round 1), say which is longest. None: it uses every
    # core (oneDAL's SVC and search, Keras, a sweep in parallel workers) and trains alone.
    lane_seconds: float | None = None
    # Raised by whoever changes the head's code or defaults so that its answers change (as
    # EXTRACTOR_VERSION is for features): a result made by another version is not current,
    # and the next ``train``/``run`` retrains it (``head_versions``, ``ResultRecord``).
    version: int = 1


HEADS = {
    "logreg": HeadSpec(_logreg, "pooled", {**_SWEEP, "C": POSITIVE, "max_iter": COUNT},
                       "multinomial logistic regression, C swept on validation", fixed={"C": 1.0},
                       lane_seconds=7.8),
    "linear_svm": HeadSpec(_linear_svm, "pooled", {**_SWEEP, "C": POSITIVE, "max_iter": COUNT},
                           "linear SVM (LinearSVC's squared hinge, by L-BFGS), C swept on validation",
                           fixed={"C": 1.0}, lane_seconds=8.2),
    "rbf_svm": HeadSpec(_rbf_svm, "pooled",
                        {**_SWEEP, "C": POSITIVE, "gamma": Either(OneOf(("scale", "auto")), POSITIVE)},
                        f"exact RBF SVC (Nystroem beyond {EXACT_RBF_LIMIT_ACCELERATED:,} rows with "
                        f"oneDAL or cuML, {EXACT_RBF_LIMIT:,} without)",
                        fixed={"C": 1.0}),
    "rbf_svm_approx": HeadSpec(_rbf_svm_approx, "pooled",
                               {**_SWEEP, "C": POSITIVE, "n_components": COUNT},
                               "Nystroem RBF features + LinearSVC", fixed={"C": 1.0}),
    "mlp": HeadSpec(EarlyStoppingMLP, "pooled",
                    {**_PREPROCESSING, **_EPOCHS, "hidden": COUNT, "alpha": Number(float, 0),
                     "seeds": COUNT},
                    "one hidden layer, early stopping on validation (seeds > 1: an average of "
                    "that many)", fixed={"max_epochs": 200}, lane_seconds=4.3),
    "conv1x1_mlp": HeadSpec(Conv1x1MLP, "spatial",
                            {**_EPOCHS, "filters": COUNT, "hidden": COUNT,
                             "dropout": Number(float, 0, 1, high_open=True),
                             "validation_fraction": FRACTION, "random_state": SEED},
                            "trainable 1x1 conv + MLP on spatial maps (Keras)"),
    "knn": HeadSpec(WeightedKNN, "pooled",
                    {"k": COUNT, "temperature": POSITIVE, "validation_fraction": FRACTION,
                     "random_state": SEED, "block_rows": COUNT},
                    "weighted k-NN on cosine similarity (DINOv2's), k chosen on validation",
                    fixed={}),  # k = the smallest of KS (10), or every row where fewer
    "sgd_linear": HeadSpec(StreamingLinear, "streamed",
                           {"loss": OneOf(("log_loss", "hinge", "modified_huber", "squared_hinge")),
                            "alpha": Number(float, 0), "block_rows": COUNT, "max_epochs": COUNT,
                            "shuffle_pieces": COUNT, "buffer_mb": COUNT, "eta0": POSITIVE,
                            "patience": COUNT, "validation_fraction": FRACTION,
                            "max_validation_rows": COUNT, "max_sweep_rows": COUNT,
                            "random_state": SEED,
                            "n_jobs": Number(int, -1)},
                           "linear SGD streamed from disk, for features larger than memory",
                           lane_seconds=14.0),
}
SPATIAL_HEADS = {name for name, spec in HEADS.items() if spec.takes == "spatial"}
STREAMING_HEADS = {name for name, spec in HEADS.items() if spec.takes == "streamed"}


def head_versions() -> dict[str, int]:
    """Each head's version, what a result's own must equal to be current."""
    return {name: spec.version for name, spec in HEADS.items()}


def check_threads(threads: int | None) -> int:
    """The threads heads may use: ``threads`` (a shared machine's share), else every core we
    are given. More than the cores only oversubscribes them (joblib workers times BLAS threads
    collapsed 3-5x under load), so it is refused, as is 0."""
    cores = runtimes.cpu_cores()
    if threads is None:
        return cores
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise PipelineError(f"--threads {threads}: this machine gives us {cores} core(s); use a "
                            f"whole number from 1 to {cores}")
    return threads


def check_head(name: str) -> None:
    if not isinstance(name, str) or name not in HEADS:
        raise PipelineError(f"unknown head {name!r}; valid: {', '.join(HEADS)}")


def check_params(name: str, params: dict) -> None:
    """Every parameter named and in range before anything runs (one line per mistake)."""
    check_head(name)
    allowed = HEADS[name].params
    for key, value in params.items():
        if key not in allowed:
            raise PipelineError(f"head {name!r} has no parameter {key!r}; allowed: "
                                f"{', '.join(sorted(allowed))}")
        problem = allowed[key].problem(value)
        if problem:
            raise PipelineError(f"head {name!r}: {key}={value!r} {problem}")


def make_head(name: str, params: dict | None = None, *, n_train: int | None = None):
    """Head ``name`` as a plain scikit-learn estimator (``fit``/``predict``/``score``, and
    ``predict_proba`` where the head has it), its hyper-parameters chosen on validation
    inside ``fit``. With ``n_train``, the head that will run on that many rows (see
    ``head_ran``)."""
    ran, params, _ = head_ran(name, params, n_train)
    return HEADS[ran].factory(**params)


def head_ran(name: str, params: dict | None = None, n_train: int | None = None
             ) -> tuple[str, dict, str]:
    """(head that runs, its params, a note saying why if it is not ``name``): ``rbf_svm``
    becomes its approximation for large N."""
    if params is not None and not isinstance(params, dict):
        raise PipelineError(f"params: got {type(params).__name__}; give a dict such as {{'C': 1.0}}")
    params = dict(params or {})
    check_params(name, params)
    if name == "rbf_svm" and n_train is not None and n_train > exact_rbf_limit():
        params.pop("gamma", None)
        return "rbf_svm_approx", params, (
            f"rbf_svm ran as rbf_svm_approx (Nystroem, {NYSTROEM_COMPONENTS} components + "
            f"LinearSVC): {n_train:,} training rows > {exact_rbf_limit():,}, where exact SVC is "
            "too slow")
    return name, params, ""


# ----------------------------------------------------------------------------- data + evaluation

@dataclass
class FeatureSet:
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    validation_rows: int = 0  # the last training rows are the user's validation split
    test_ids: list[str] | None = None  # the test rows' images (None: a file without ids)


def _bytes(n: float) -> str:
    """A size people read at a glance: 0.3 MiB, not 0.0 GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size / 10:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"




def load_features(ff: FeatureFile, head: str, *, memory_budget_gb: float | None = None
                  ) -> FeatureSet:
    """Read a feature file for ``head``, refusing early what would not fit the memory budget."""
    shape = ff.features("train").shape
    spatial = len(shape) == 4
    if head in SPATIAL_HEADS and not spatial:
        raise PipelineError(f"head {head!r} needs spatial features; {ff.path.name} holds "
                            f"{shape[1:]} vectors (extract with --mode spatial)")
    y_train, y_test = ff.labels("train"), ff.labels("test")
    if len(np.unique(y_train)) < 2:
        raise PipelineError(f"{ff.path.name}: the training split has a single class; "
                            "a classifier needs at least two")
    budget = memory_budget(memory_budget_gb)
    rows = shape[0] + ff.features("test").shape[0]
    # Vectors become float32 with a scaled and a split copy; spatial maps stay float16 (2 copies).
    need = rows * int(np.prod(shape[1:])) * (2 * 2 if spatial else 4 * 3)
    fits = need <= budget
    if head not in STREAMING_HEADS and not fits:
        raise PipelineError(
            f"{ff.path.name}: head {head!r} needs about {_bytes(need)} in memory, over the "
            f"budget of {_bytes(budget)}; use --head sgd_linear (streams from disk) or "
            "extract with --limit N")
    if not fits:  # a streaming head: stay on disk; h5py datasets read in blocks
        X_train, X_test = ff.features("train"), ff.features("test")
    else:  # sgd_linear too where its features fit: read once, not once per epoch (on one
        # core, Fashion-MNIST fit 13.9-14.1 s against 15.2-16.8 s, CIFAR-10 10.1-10.5 against
        # 10.7-11.4, the same model: benchmarks/sgd_in_memory.{py,txt})
        X_train, X_test = _read_checked(ff, "train"), _read_checked(ff, "test")
    return FeatureSet(X_train, y_train, X_test, y_test, ff.classes, ff.validation_rows,
                      ff.ids("test"))


def load_fused_features(files: list[FeatureFile], head: str, *,
                        memory_budget_gb: float | None = None) -> FeatureSet:
    """Several feature files of one dataset side by side: row i of each is the same image.

    Rows are matched by the dataset fingerprint (same images, same order) and checked by
    their labels, so two files that merely have the same length are never glued together.
    """
    first = files[0]
    if HEADS[head].takes == "spatial":
        raise PipelineError(f"head {head!r} needs spatial maps; fusion gives vectors")
    for ff in files:
        if ff.features("train").ndim != 2:
            raise PipelineError(f"{ff.path.name} holds spatial maps; fusion takes vectors "
                                "(avg, max or bottleneck features)")
        for what, mine, theirs in (
                ("dataset fingerprints", ff.attrs["key_parts"].get("fingerprint"),
                 first.attrs["key_parts"].get("fingerprint")),
                ("classes", ff.classes, first.classes),
                ("skipped images", ff.skipped_files(), first.skipped_files()),
                *((f"{s} labels", ff.labels(s).tolist(), first.labels(s).tolist()) for s in SPLITS)):
            if mine != theirs:
                raise PipelineError(f"cannot fuse {first.path.name} and {ff.path.name}: their "
                                    f"{what} differ, so their rows are not the same images; "
                                    "fuse files extracted from the same dataset (and --limit)")
    width = sum(ff.features("train").shape[1] for ff in files)
    budget = memory_budget(memory_budget_gb)
    rows = first.features("train").shape[0] + first.features("test").shape[0]
    if rows * width * 4 * 3 > budget:
        raise PipelineError(f"fusing {len(files)} files needs about "
                            f"{_bytes(rows * width * 12)} in memory, over the budget of "
                            f"{_bytes(budget)}; fuse fewer files or pass --memory-budget-gb")
    X_train, X_test = (np.concatenate([_read_checked(ff, s) for ff in files], axis=1)
                       for s in SPLITS)
    return FeatureSet(X_train, first.labels("train"), X_test, first.labels("test"), first.classes,
                      first.validation_rows, first.ids("test"))


def _read_checked(ff: FeatureFile, split: str) -> np.ndarray:
    X = ff.features(split)[()]
    if not np.isfinite(X).all():
        raise PipelineError(f"{ff.path.name}: {split} features contain NaN or Inf; "
                            "`python -m pipeline verify --repair` and re-extract")
    return X.astype(np.float32) if X.dtype != np.float32 and X.ndim == 2 else X


def class_scores(model, X, *, probabilities: bool = False) -> np.ndarray | None:
    """(rows, classes) scores, columns in ``model.classes_`` order: probabilities where the
    head has them, else decision values (unless ``probabilities``); None for a head with
    neither."""
    for owner in (model, getattr(model, "model_", None)):
        for name in ("predict_proba",) + (() if probabilities else ("decision_function",)):
            method = getattr(owner, name, None)  # a Pipeline hides what its last step lacks
            if method is None:
                continue
            scores = np.asarray(method(X))
            if scores.ndim == 2 and scores.shape[1] == len(model.classes_):
                return scores
    return None


def _top_k(classes: np.ndarray, scores: np.ndarray | None, y: np.ndarray, k: int = 5) -> float | None:
    if len(classes) <= k or scores is None:
        return None
    top = np.asarray(classes)[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
    return float(np.mean((top == np.asarray(y)[:, None]).any(axis=1)))


def top_k_accuracy(model, X, y: np.ndarray, k: int = 5) -> float | None:
    """How often the true class is among the head's ``k`` highest scores (None with ``k`` or
    fewer classes, where it says nothing, or without scores)."""
    if len(model.classes_) <= k:
        return None
    return _top_k(model.classes_, class_scores(model, X), y, k)


def _mistakes(model, pred: np.ndarray, scores: np.ndarray | None, probabilities: bool,
              y: np.ndarray, classes: list[str], ids: list[str] | None) -> list[dict]:
    """Each misclassified test row: its id, true and predicted class and, for heads that give
    probabilities, the probability of the class they chose (most confident first)."""
    wrong = np.flatnonzero(pred != y)
    column = {c: i for i, c in enumerate(np.asarray(model.classes_).tolist())}
    rows = []
    for i in wrong.tolist():
        confidence = (float(scores[i, column[int(pred[i])]])
                      if probabilities and scores is not None else None)
        rows.append({"row": i, "id": ids[i] if ids is not None else None,
                     "true": classes[int(y[i])], "predicted": classes[int(pred[i])],
                     "confidence": confidence})
    return sorted(rows, key=lambda r: -(r["confidence"] or 0.0))


def evaluate(model, X_test, y_test: np.ndarray, classes: list[str],
             ids: list[str] | None = None) -> dict:
    """Test metrics a user compares heads by, the prediction cost, and ``mistakes``: what the
    head got wrong (``ids`` name the test rows' images)."""
    t0 = time.perf_counter()
    pred = model.predict(X_test)
    predict_s = time.perf_counter() - t0
    scores = class_scores(model, X_test, probabilities=True)
    probabilities = scores is not None
    if scores is None:
        scores = class_scores(model, X_test)
    labels = np.arange(len(classes))
    precision, recall, _, support = precision_recall_fscore_support(
        y_test, pred, labels=labels, zero_division=0)
    return {
        "test_accuracy": float(accuracy_score(y_test, pred)),
        "top5_accuracy": _top_k(model.classes_, scores, y_test),
        "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
        "macro_f1": float(f1_score(y_test, pred, average="macro", labels=labels, zero_division=0)),
        "per_class": {c: {"precision": float(p), "recall": float(r), "support": int(s)}
                      for c, p, r, s in zip(classes, precision, recall, support)},
        "confusion_matrix": confusion_matrix(y_test, pred, labels=labels).tolist(),
        "predict_ms_per_image": 1000 * predict_s / max(len(y_test), 1),
        "mistakes": _mistakes(model, np.asarray(pred), scores, probabilities, np.asarray(y_test),
                              classes, ids),
    }
