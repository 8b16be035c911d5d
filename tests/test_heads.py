import os

import numpy as np
import pytest
from conftest import write_feature_file

from pipeline import heads as heads_module
from pipeline.errors import PipelineError
from pipeline.heads import (
    HEADS,
    StreamingLinear,
    SweepClassifier,
    evaluate,
    head_ran,
    load_features,
    make_head,
)
from pipeline.store import FeatureFile


def _data(blobs_file, head="logreg"):
    with FeatureFile(blobs_file) as ff:
        return load_features(ff, head)


@pytest.mark.parametrize("name", ["logreg", "linear_svm", "rbf_svm", "rbf_svm_approx", "mlp"])
def test_every_vector_head_learns_separable_features(blobs_file, name):
    data = _data(blobs_file)
    params = {"n_components": 50} if name == "rbf_svm_approx" else {}
    head = make_head(name, params, n_train=len(data.y_train))
    head.fit(data.X_train, data.y_train)
    assert head.score(data.X_test, data.y_test) > 0.9
    assert head.best_params_ and 0 < head.validation_score_ <= 1
    assert head_ran(name, params, len(data.y_train)) == (name, params, "")


def test_c_is_swept_on_a_log_grid_then_refined(blobs_file):
    data = _data(blobs_file)
    head = make_head("logreg")
    head.fit(data.X_train, data.y_train)
    tried = sorted(r["C"] for r in head.sweep_)
    assert tried[0] == pytest.approx(1e-4) and 100 in tried and len(tried) >= 8
    best = head.best_params_["C"]
    refined = {best * 10 ** -0.5, best * 10 ** 0.5}
    assert any(any(abs(t - r) < 1e-12 * max(r, 1) for t in tried) for r in refined)


def test_same_inputs_give_the_same_numbers(blobs_file):
    data = _data(blobs_file)
    results = []
    for _ in range(2):
        head = make_head("mlp", {"max_epochs": 20})
        head.fit(data.X_train, data.y_train)
        results.append(evaluate(head, data.X_test, data.y_test, data.classes))
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]


def test_standardisation_is_fitted_on_training_rows_only(tmp_path):
    """Through the real training path: test rows far from the training rows would move the
    scaler's mean if they leaked into it."""
    import joblib

    from pipeline.training import train_one

    rng = np.random.default_rng(0)
    X_train, X_test = rng.normal(5.0, 2.0, (200, 4)), rng.normal(500.0, 2.0, (60, 4))
    y_train, y_test = np.arange(200) % 2, np.arange(60) % 2
    path = write_feature_file(tmp_path / "cache", X_train.astype(np.float32), y_train,
                              X_test.astype(np.float32), y_test)
    _, out = train_one(path, "logreg", {"C": 1.0}, results_dir=tmp_path / "results")
    scaler = joblib.load(out / "model.joblib").model_.named_steps["scale"]
    assert np.allclose(scaler.mean_, X_train.mean(0), atol=1e-4)  # train + validation rows
    assert np.abs(scaler.mean_ - np.concatenate([X_train, X_test]).mean(0)).min() > 50


def test_rbf_svm_switches_to_the_approximation_for_large_n_and_says_so(monkeypatch):
    monkeypatch.setattr(heads_module, "EXACT_RBF_LIMIT", 100)
    monkeypatch.setattr(heads_module, "EXACT_RBF_LIMIT_ACCELERATED", 100)
    head = make_head("rbf_svm", n_train=500)
    ran, _, note = head_ran("rbf_svm", n_train=500)
    assert ran == "rbf_svm_approx" and isinstance(head.estimator, heads_module.Pipeline)
    assert "Nystroem" in note
    assert "500 training rows > 100" in note


def test_conv1x1_mlp_on_spatial_maps(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(600) % 3
    X = rng.normal(size=(600, 3, 3, 8)).astype(np.float16)
    X[..., 0] += y[:, None, None] * 2  # one channel carries the class everywhere
    path = write_feature_file(tmp_path, X[:480], y[:480], X[480:], y[480:])
    with FeatureFile(path) as ff:
        data = load_features(ff, "conv1x1_mlp")
    head = make_head("conv1x1_mlp", {"filters": 8, "hidden": 16, "batch_size": 32,
                                       "max_epochs": 30})
    head.fit(data.X_train, data.y_train)
    assert head.score(data.X_test, data.y_test) > 0.9


@pytest.mark.bad_input
def test_spatial_head_on_pooled_features_is_refused(blobs_file):
    with pytest.raises(PipelineError, match="needs spatial features.*--mode spatial"):
        _data(blobs_file, "conv1x1_mlp")


def test_sgd_linear_reads_features_that_fit_once_and_streams_the_others_to_the_same_answer(
        blobs_file):
    with FeatureFile(blobs_file) as ff:
        in_memory = load_features(ff, "sgd_linear")
        streamed = load_features(ff, "sgd_linear", memory_budget_gb=1e-6)
        assert isinstance(in_memory.X_train, np.ndarray)
        assert not isinstance(streamed.X_train, np.ndarray)  # an h5py dataset, read block by block
        heads = [StreamingLinear(block_rows=64).fit(data.X_train, data.y_train)
                 for data in (in_memory, streamed)]
        assert heads[0].score(in_memory.X_test, in_memory.y_test) > 0.9
        assert np.array_equal(heads[0].model_.coef_, heads[1].model_.coef_)
        assert np.array_equal(heads[0].predict(in_memory.X_test), heads[1].predict(streamed.X_test))


@pytest.mark.bad_input
def test_memory_budget_fails_early_naming_sgd_linear_or_limit(blobs_file):
    with FeatureFile(blobs_file) as ff:
        with pytest.raises(PipelineError, match=r"needs about [0-9.]+ MiB in memory, over the budget of "
                                                r"1.0 KiB.*sgd_linear.*--limit"):
            load_features(ff, "logreg", memory_budget_gb=1e-6)
        streamed = load_features(ff, "sgd_linear", memory_budget_gb=1e-6)
        assert not isinstance(streamed.X_train, np.ndarray) and streamed.X_train.shape == (600, 20)


@pytest.mark.bad_input
def test_single_class_training_split_is_refused(tmp_path):
    X = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    path = write_feature_file(tmp_path, X[:30], np.zeros(30, int), X[30:], np.array([0] * 9 + [1]))
    with FeatureFile(path) as ff, pytest.raises(PipelineError, match="single class"):
        load_features(ff, "logreg")


@pytest.mark.bad_input
def test_the_mlp_called_from_python_refuses_a_single_class_in_one_line():
    X = np.random.default_rng(0).normal(size=(60, 5)).astype(np.float32)
    with pytest.raises(PipelineError, match="^mlp needs at least two classes in its training rows$"):
        make_head("mlp", {"max_epochs": 2}).fit(X, np.zeros(60, int))
    two = make_head("mlp", {"max_epochs": 2}).fit(X, np.arange(60) % 2)  # two classes: fine
    assert set(two.predict(X)) <= {0, 1}


@pytest.mark.bad_input
def test_nan_features_are_refused(blobs_file):
    import h5py

    with h5py.File(blobs_file, "r+") as f:  # tampered after publishing
        f["train/features"][3, 1] = np.nan
    with FeatureFile(blobs_file) as ff, pytest.raises(PipelineError, match="NaN or Inf"):
        load_features(ff, "logreg")


@pytest.mark.bad_input
def test_unknown_head_or_parameter_gets_one_line():
    with pytest.raises(PipelineError, match="unknown head 'xgboost'; valid: logreg, linear_svm"):
        make_head("xgboost")
    with pytest.raises(PipelineError, match="head 'logreg' has no parameter 'gamma'; allowed: C,"):
        make_head("logreg", {"gamma": 1})
    with pytest.raises(PipelineError, match="head 'mlp' has no parameter 'units'; allowed: .*hidden"):
        make_head("mlp", {"units": 5})


def test_evaluate_reports_what_users_compare(blobs_file):
    data = _data(blobs_file)
    head = make_head("logreg", {"C": 1.0})
    m = evaluate(head.fit(data.X_train, data.y_train), data.X_test, data.y_test, data.classes)
    assert set(m) >= {"test_accuracy", "balanced_accuracy", "macro_f1", "per_class",
                      "confusion_matrix", "predict_ms_per_image"}
    assert np.sum(m["confusion_matrix"]) == len(data.y_test)
    assert set(m["per_class"]) == {"c0", "c1", "c2"}


class _PeakedAtMilliC(heads_module.ClassifierMixin, heads_module.BaseEstimator):
    """Validation accuracy 1.0 at C = 1e-3, 0.1 worse per decade away: a known peak."""

    def __init__(self, C: float = 1.0):
        self.C = C

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def predict(self, X):
        pred = (X[:, 0] > 0).astype(int)
        wrong = int(round(len(pred) * abs(np.log10(self.C) + 3) / 10))
        pred[:wrong] = 1 - pred[:wrong]
        return pred


def test_svm_sweeps_stop_past_the_validation_peak_and_say_what_they_skipped():
    y = np.arange(400) % 2
    X = np.c_[2.0 * y - 1, np.zeros(400)]
    head = SweepClassifier(_PeakedAtMilliC(), grid=heads_module._log_grid("C", -5, 0),
                           refine="C", n_jobs=1).fit(X, y)
    assert [r["C"] for r in head.sweep_][:4] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert [c["C"] for c in head.skipped_] == pytest.approx([0.1, 1.0])  # never fitted
    assert head.best_params_["C"] == pytest.approx(1e-3)
    assert len(head.sweep_) == 6  # four on the grid, then the half-decade refinement


def test_a_solver_stopped_at_its_iteration_cap_is_recorded_as_not_converged(blobs_file):
    data = _data(blobs_file)
    head = make_head("logreg", {"C": 100.0, "max_iter": 1})
    head.fit(data.X_train, data.y_train)
    assert head.converged_ is False and head.sweep_[0]["converged"] is False


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_registered_head_builds_and_fits_with_its_defaults(name, tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(1500) % 3
    shape = (1500, 2, 2, 4) if HEADS[name].takes == "spatial" else (1500, 6)
    centers = 10 * np.eye(shape[-1])[y].reshape((len(y),) + (1,) * (len(shape) - 2) + (shape[-1],))
    X = (rng.normal(size=shape) + centers).astype(np.float32)  # apart in place and in angle
    if HEADS[name].takes == "spatial":
        X = X.astype(np.float16)
    head = make_head(name)
    head.fit(X, y)
    assert (head.predict(X) == y).mean() > 0.9
    again = make_head(name)  # same inputs, same numbers: every head is seeded
    again.fit(X, y)
    assert np.array_equal(again.predict(X), head.predict(X))
    assert again.best_params_ == head.best_params_
    assert again.validation_score_ == head.validation_score_
    declared = set(HEADS[name].params)
    accepted = set(head.get_params()) | {"C", "gamma", "max_iter", "n_components"}
    assert declared <= accepted, declared - accepted


def test_a_sweep_classifier_with_its_defaults_is_a_plain_logistic_regression(blobs_file):
    data = _data(blobs_file)
    head = SweepClassifier().fit(data.X_train, data.y_train)
    assert head.score(data.X_test, data.y_test) > 0.9
    assert len(head.sweep_) == 1 and head.best_params_ == {}  # one setting: nothing swept


@pytest.mark.bad_input
@pytest.mark.parametrize("name, params, message", [
    ("logreg", {"C": "abc"}, "C='abc' must be a number > 0"),
    ("logreg", {"C": 0}, "C=0 must be > 0"),
    ("linear_svm", {"max_iter": 1.5}, "max_iter=1.5 must be a whole number >= 1"),
    ("rbf_svm", {"gamma": -1}, "gamma=-1 must be one of scale, auto, or > 0"),
    ("mlp", {"validation_fraction": 1.0}, "validation_fraction=1.0 must be > 0 and < 1"),
    ("sgd_linear", {"loss": "l1"}, "loss='l1' must be one of log_loss"),
    ("conv1x1_mlp", {"dropout": True}, "dropout=True must be a number"),
])
def test_parameters_are_checked_against_their_declared_ranges(name, params, message):
    with pytest.raises(PipelineError) as info:
        make_head(name, params)
    assert message in str(info.value)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_linear_svm_solves_linearsvcs_problem(n_classes):
    """The same squared-hinge one-vs-rest problem as liblinear's (bias regularised too):
    the same coefficients to solver tolerance and the same predictions."""
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    y = np.arange(600) % n_classes
    X = (rng.normal(size=(600, 8)) + 1.5 * np.eye(8)[y]).astype(np.float32)
    mine = heads_module.SquaredHingeSVM(C=0.1, tol=1e-7).fit(X, y)
    theirs = LinearSVC(C=0.1, dual=False, tol=1e-9, max_iter=10_000).fit(X, y)
    assert mine.coef_.shape == theirs.coef_.shape and mine.intercept_.shape == theirs.intercept_.shape
    assert np.allclose(mine.coef_, theirs.coef_, atol=1e-3)
    assert np.allclose(mine.intercept_, theirs.intercept_, atol=1e-3)
    X_new = rng.normal(size=(400, 8)).astype(np.float32)
    assert np.array_equal(mine.predict(X_new), theirs.predict(X_new))
    warm = heads_module.SquaredHingeSVM(C=0.01, tol=1e-7, warm_start=True).fit(X, y)
    warm.set_params(C=0.1).fit(X, y)  # from the C = 0.01 solution: the same answer
    assert np.allclose(warm.coef_, mine.coef_, atol=1e-3)


def test_the_linear_svm_at_its_iteration_cap_says_so():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(200, 5)), np.arange(200) % 3
    with pytest.warns(heads_module.ConvergenceWarning, match="max_iter=2"):
        heads_module.SquaredHingeSVM(C=10.0, max_iter=2).fit(X, y)


class _WarmPeakedAtMilliC(_PeakedAtMilliC):
    """The same peak, warm-startable: records which object each fit ran on."""

    fits: list = []

    def __init__(self, C: float = 1.0, warm_start: bool = False):
        self.C = C
        self.warm_start = warm_start

    def fit(self, X, y):
        type(self).fits.append((id(self), self.C, self.warm_start))
        return super().fit(X, y)


def test_a_warm_startable_sweep_is_one_chain_up_the_grid_that_stops_past_the_peak():
    y = np.arange(400) % 2
    X = np.c_[2.0 * y - 1, np.zeros(400)]
    _WarmPeakedAtMilliC.fits = []
    head = SweepClassifier(_WarmPeakedAtMilliC(), grid=heads_module._log_grid("C", -5, 2),
                           refine="C", n_jobs=2).fit(X, y)
    assert [r["C"] for r in head.sweep_][:4] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert [c["C"] for c in head.skipped_] == pytest.approx([0.1, 1.0, 10.0, 100.0])
    assert head.best_params_["C"] == pytest.approx(1e-3)
    chain = _WarmPeakedAtMilliC.fits[:4]  # in this process, one model warm-started up the grid
    assert len({fit[0] for fit in chain}) == 1 and all(fit[2] for fit in chain)
    assert [fit[1] for fit in chain] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])


class _RecordedLogisticRegression(heads_module.LogisticRegression):
    """scikit-learn's, recording where each fit starts (None: from zero) and where it ends."""

    fits: list = []

    def fit(self, X, y):
        start = self.coef_.copy() if self.warm_start and hasattr(self, "coef_") else None
        super().fit(X, y)
        type(self).fits.append((self.C, len(y), start, self.coef_.copy()))
        return self


def test_logregs_refit_on_all_rows_starts_from_the_sweeps_solution_nearest_its_own():
    assert make_head("logreg").refit_from_sweep and not make_head("linear_svm").refit_from_sweep
    rng = np.random.default_rng(0)
    y = np.arange(3000) % 3
    X = rng.normal(size=(3000, 8)) + 0.4 * np.eye(3, 8)[y]  # overlapping: the answer depends on C
    grid = heads_module._log_grid("C", -4, 2)

    def head(from_sweep: bool, **kw) -> SweepClassifier:
        _RecordedLogisticRegression.fits = []
        est = _RecordedLogisticRegression(max_iter=1000, tol=1e-8)
        return SweepClassifier(est, grid=grid, refine="C", max_sweep_rows=300,
                               refit_from_sweep=from_sweep, **kw).fit(X, y)

    warm = head(True)
    *sweep, refit = _RecordedLogisticRegression.fits
    assert refit[1] == 3000 and {n for _, n, _, _ in sweep} == {300}
    # On 10x the rows C weighs 10x more: the nearest sweep solution is at 10x the chosen C
    tried = np.log10([c for c, _, _, _ in sweep])
    nearest = sweep[np.argmin(abs(tried - np.log10(warm.best_params_["C"] * 3000 / 300)))]
    assert nearest[0] != pytest.approx(warm.best_params_["C"])
    assert np.array_equal(refit[2], nearest[3])
    clf = warm.model_.named_steps["clf"]
    assert not clf.warm_start and "_starts" not in warm.__getstate__()  # a later fit starts afresh
    # the same problem solved: the same solution as from zero, to the solver's tolerance
    cold = head(False)
    assert _RecordedLogisticRegression.fits[-1][2] is None
    assert cold.best_params_ == warm.best_params_
    assert np.allclose(cold.model_.named_steps["clf"].coef_, clf.coef_, atol=1e-4)
    # behind a PCA (refit on all rows, its axes may turn), the refit starts from zero
    head(True, pca=4)
    assert _RecordedLogisticRegression.fits[-1][2] is None


class _OneDALPeakedAtRootTen(heads_module.ClassifierMixin, heads_module.BaseEstimator):
    """Stands for oneDAL's SVC (only its module name says so): validation accuracy highest
    at C = 10^0.5, lower half a decade either side; records the process of each fit."""

    fits: list = []

    def __init__(self, C: float = 1.0, kernel: str = "rbf", gamma="scale", cache_size: int = 200):
        self.C, self.kernel, self.gamma, self.cache_size = C, kernel, gamma, cache_size

    def fit(self, X, y):
        type(self).fits.append((os.getpid(), self.C))
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X):
        right = (X[:, 0] > 0).astype(float)
        wrong = int(round(len(right) * abs(np.log10(self.C) - 0.5) / 4))
        right[:wrong] = 1 - right[:wrong]
        return 2 * right - 1


_OneDALPeakedAtRootTen.__module__ = "sklearnex.svm"


def test_rbf_svm_on_onedal_sweeps_in_process_half_a_decade_apart_stopping_past_the_peak(
        monkeypatch):
    monkeypatch.setattr(heads_module, "svc_class", lambda: _OneDALPeakedAtRootTen)
    _OneDALPeakedAtRootTen.fits = []
    y = np.arange(400) % 2
    X = np.c_[2.0 * y - 1, np.zeros(400)]
    head = make_head("rbf_svm").fit(X, y)
    assert heads_module.solver(head) == "oneDAL"
    # 1, 10^0.5, 10 (below the best: stop); the refinement around 10^0.5 fits nothing again
    assert [r["C"] for r in head.sweep_] == pytest.approx([1.0, 10 ** 0.5, 10.0])
    assert [c["C"] for c in head.skipped_] == pytest.approx([10 ** 1.5, 100.0])
    assert head.best_params_["C"] == pytest.approx(10 ** 0.5)
    assert len(_OneDALPeakedAtRootTen.fits) == 4  # three settings, then the refit on all rows
    assert {pid for pid, _ in _OneDALPeakedAtRootTen.fits} == {os.getpid()}  # no workers


def test_l2_normalisation_and_pca_are_steps_fitted_with_the_head(blobs_file):
    data = _data(blobs_file)
    head = make_head("logreg", {"C": 1.0, "normalize": "l2", "pca": 3})
    head.fit(data.X_train, data.y_train)
    steps = head.model_.named_steps
    assert list(steps) == ["flatten", "scale", "l2", "pca", "clf"]
    assert steps["pca"].n_components_ == 3 and steps["clf"].coef_.shape == (3, 3)
    scaled = steps["scale"].transform(data.X_test)
    assert np.allclose(np.linalg.norm(steps["l2"].transform(scaled), axis=1), 1.0)


def test_the_sweep_uses_at_most_max_sweep_rows_and_the_final_fit_all_rows():
    rng = np.random.default_rng(0)
    y = np.arange(1000) % 2
    X = rng.normal(size=(1000, 5)) + y[:, None]
    head = make_head("logreg", {"max_sweep_rows": 100})
    head.fit(X, y)
    assert head.sweep_rows_ == 100
    assert head.model_.named_steps["scale"].n_samples_seen_ == 1000


def test_the_validation_split_is_a_stratified_tenth_of_the_training_rows():
    y = np.repeat([0, 1, 2], [500, 300, 200])
    fit_idx, val_idx = heads_module._validation_split(y, 0.1, seed=0)
    assert len(val_idx) == 100 and not set(fit_idx) & set(val_idx)
    assert list(np.bincount(y[val_idx])) == [50, 30, 20]
    assert np.array_equal(val_idx, heads_module._validation_split(y, 0.1, seed=0)[1])


@pytest.mark.slow
def test_the_streaming_head_comes_within_a_point_of_logreg_on_real_class_sorted_features(
        cifar_full, shared_weights, tmp_path):
    """45,000 CIFAR-10 training rows, MobileNet 0.25 avg, stored class after class (as an
    image folder is): the streamed head must not fall apart (it reached 41.7% before)."""
    from pipeline.extraction import ExtractionConfig, extract_features

    config = ExtractionConfig(dataset=f"folder:{cifar_full}", backbone="mobilenet", alpha=0.25,
                              batch_size=128, cache_dir=str(tmp_path))
    accuracy = {}
    with FeatureFile(extract_features(config).path) as ff:
        assert (np.diff(ff.labels("train")) >= 0).all()  # sorted by class: the hard case
        for name in ("logreg", "sgd_linear"):
            data = load_features(ff, name)
            head = make_head(name)
            head.fit(data.X_train, data.y_train)
            accuracy[name] = evaluate(head, data.X_test, data.y_test, data.classes)["test_accuracy"]
    print(f"\nCIFAR-10 45,000 rows: {accuracy}")
    assert accuracy["sgd_linear"] >= accuracy["logreg"] - 0.01, accuracy


def test_a_given_validation_split_is_the_one_the_sweep_chooses_on():
    from sklearn.linear_model import LogisticRegression

    from pipeline.heads import SweepClassifier

    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    X = (y[:, None] * 4.0 + rng.normal(size=(200, 5))).astype(np.float32)
    y_given = y.copy()
    y_given[-20:] = 1 - y_given[-20:]  # the last 20 rows, labelled against the rest
    grid = [{"C": c} for c in (0.01, 1.0)]
    carved = SweepClassifier(LogisticRegression(max_iter=200), grid=grid).fit(X, y_given)
    given = SweepClassifier(LogisticRegression(max_iter=200), grid=grid,
                            validation_rows=20).fit(X, y_given)
    assert carved.validation_score_ > 0.7 and given.validation_score_ < 0.3


@pytest.mark.bad_input
def test_a_class_with_one_training_row_is_named_when_a_split_cannot_be_carved():

    from pipeline.heads import SweepClassifier

    X, y = np.random.default_rng(0).normal(size=(21, 3)), np.array([0, 1] * 10 + [2])
    with pytest.raises(PipelineError, match=r"class\(es\) 2 have a single training row"):
        SweepClassifier().fit(X, y)


def _knn_reference(train, labels, queries, k, temperature):
    """The weighted k-NN vote written plainly, one query at a time: the check on WeightedKNN."""
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    train, queries = unit(train.astype(np.float64)), unit(queries.astype(np.float64))
    out = []
    for q in queries:
        sims = train @ q
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(labels.max() + 1)
        for i in nearest:
            votes[labels[i]] += np.exp(sims[i] / temperature)
        out.append(votes / votes.sum())
    return np.array(out)


def test_knn_votes_like_dinov2_and_chooses_k_on_validation():
    from pipeline.heads import WeightedKNN

    rng = np.random.default_rng(0)
    y = np.arange(600) % 3
    X = np.abs(rng.normal(size=(600, 16)) + 3 * np.eye(16)[y * 5]).astype(np.float32)
    Xq = np.abs(rng.normal(size=(50, 16)) + 3 * np.eye(16)[(np.arange(50) % 3) * 5]).astype(np.float32)
    head = WeightedKNN().fit(X, y)
    assert [r["k"] for r in head.sweep_] == [10, 20, 100, 200] and head.k_ in (10, 20, 100, 200)
    assert head.best_params_ == {"k": head.k_, "temperature": 0.07}
    best = max(r["val_accuracy"] for r in head.sweep_)
    assert head.k_ == min(r["k"] for r in head.sweep_ if r["val_accuracy"] == best)
    expected = _knn_reference(X, y, Xq, head.k_, 0.07)
    assert np.allclose(head.predict_proba(Xq), expected, atol=1e-5)
    assert np.array_equal(head.predict(Xq), expected.argmax(1))
    assert head.score(Xq, np.arange(50) % 3) > 0.9
    small_blocks = WeightedKNN(k=7, block_rows=3).fit(X, y)  # blocks change nothing
    assert np.allclose(small_blocks.predict_proba(Xq), _knn_reference(X, y, Xq, 7, 0.07), atol=1e-5)


def test_knn_searches_on_onedal_where_installed_with_scikit_learns_neighbours():
    from sklearn.neighbors import NearestNeighbors

    from pipeline.heads import WeightedKNN

    pytest.importorskip("sklearnex", reason="the intel extra (make install adds it on x86-64)")
    rng = np.random.default_rng(1)
    y = np.arange(2000) % 5
    X = (rng.normal(size=(2000, 32)) + 2 * np.eye(32)[y]).astype(np.float32)
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    head = WeightedKNN(k=20).fit(X, y)
    assert heads_module.solver(head) == "oneDAL"
    sims, idx = head._neighbours(heads_module._unit_rows(queries), head.index_, 20)
    stock = NearestNeighbors(algorithm="brute").fit(heads_module._unit_rows(X))
    _, expected = stock.kneighbors(heads_module._unit_rows(queries), n_neighbors=20)
    assert np.mean([set(a) == set(b) for a, b in zip(idx, expected)]) >= 0.99
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # most similar first


def test_onedals_allocator_keeps_large_freed_blocks_during_a_fit_and_releases_them_after(
        blobs_file, monkeypatch):
    """oneDAL's SVC frees and allocates blocks of over 64 MiB at every step (rbf_svm's refit):
    kept, a block's pages are faulted in once, not at each allocation."""
    import ctypes
    import resource

    pytest.importorskip("daal4py", reason="the intel extra (make install adds it on x86-64)")
    lib = heads_module._TbbLargeBlocks._library()
    if lib is None:
        pytest.skip("oneDAL's TBB allocator is not loaded here")
    lib.scalable_malloc.restype, lib.scalable_malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    lib.scalable_free.argtypes = [ctypes.c_void_p]
    size, kept = 96 << 20, heads_module.tbb_large_blocks_kept

    def faults_of_three_blocks() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            block = lib.scalable_malloc(size)
            ctypes.memset(block, 1, size)
            lib.scalable_free(block)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    default = faults_of_three_blocks()
    with kept:
        with kept:  # a second fit (another lane) leaving does not end the first one's setting
            pass
        during = faults_of_three_blocks()
        holding = rss()
    assert default > 2 * during
    assert holding - rss() > size // 2  # released once the last fit leaves
    assert faults_of_three_blocks() > 2 * during  # and TBB's default is back

    inside = []  # a head's fits (sweep and refit) run with the blocks kept, and only they
    fit = heads_module._fit_converged
    monkeypatch.setattr(heads_module, "_fit_converged",
                        lambda *args: inside.append(kept._inside) or fit(*args))
    d = _data(blobs_file)
    SweepClassifier(grid=[{"C": 0.1}, {"C": 1.0}]).fit(d.X_train, d.y_train)
    assert len(inside) >= 2 and all(n >= 1 for n in inside)
    assert kept._inside == 0


@pytest.fixture
def without_sklearnex(monkeypatch):
    """A process where importing scikit-learn-intelex fails, as where the extra is absent."""
    import builtins

    real_import = builtins.__import__

    def no_sklearnex(name, *args, **kwargs):
        if name.startswith("sklearnex"):
            raise ModuleNotFoundError("No module named 'sklearnex'")
        return real_import(name, *args, **kwargs)

    for cached in (heads_module.onedal_svc, heads_module.neighbours_class):
        cached.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_sklearnex)
    yield
    monkeypatch.undo()
    for cached in (heads_module.onedal_svc, heads_module.neighbours_class):
        cached.cache_clear()


def test_without_onedal_knn_searches_with_scikit_learn_and_says_so_once(without_sklearnex, caplog):
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    X = rng.normal(size=(300, 5)) + 3 * np.eye(5)[y]
    with caplog.at_level("INFO", logger="pipeline.heads"):
        first, second = make_head("knn").fit(X, y), make_head("knn").fit(X, y)
    assert heads_module.solver(first) == "scikit-learn" == heads_module.solver(second)
    assert caplog.text.count("knn searches with stock scikit-learn") == 1
    assert first.score(X, y) > 0.9


def test_a_saved_knn_holds_its_rows_once_and_answers_the_same_when_loaded(tmp_path):
    import joblib

    from pipeline.heads import WeightedKNN

    rng = np.random.default_rng(2)
    y = np.arange(2000) % 4
    X = (rng.normal(size=(2000, 64)) + 2 * np.eye(64)[y]).astype(np.float32)
    queries = rng.normal(size=(100, 64)).astype(np.float32)
    head = WeightedKNN(k=10).fit(X, y)
    expected = head.predict_proba(queries)
    joblib.dump(head, tmp_path / "model.joblib")
    assert (tmp_path / "model.joblib").stat().st_size < 1.3 * X.nbytes  # no index beside the rows
    loaded = joblib.load(tmp_path / "model.joblib")
    assert "_index" not in loaded.__dict__ and "_last" not in loaded.__dict__
    assert np.allclose(loaded.predict_proba(queries), expected)


@pytest.mark.bad_input
def test_knn_with_k_over_the_training_rows_names_the_largest_k():
    from pipeline.heads import WeightedKNN

    X, y = np.random.default_rng(0).random((30, 4)), np.arange(30) % 2
    with pytest.raises(PipelineError, match=r"head 'knn': k=31 is more than the 30 training rows; "
                                            r"the largest k possible is 30"):
        WeightedKNN(k=31).fit(X, y)
    assert [r["k"] for r in WeightedKNN().fit(X, y).sweep_] == [10, 20]  # the grid within 27 fit rows


@pytest.mark.parametrize("name", sorted(n for n, spec in HEADS.items() if spec.takes != "spatial"))
def test_top5_accuracy_counts_the_true_class_among_each_heads_five_best(name):
    from sklearn.metrics import top_k_accuracy_score

    from pipeline.heads import class_scores, evaluate

    rng = np.random.default_rng(1)
    y = np.arange(1600) % 8
    X = (rng.normal(size=(1600, 8)) * 3 + 4 * np.eye(8)[y]).astype(np.float32)  # overlapping
    head = make_head(name)
    head.fit(X[:1200], y[:1200])
    metrics = evaluate(head, X[1200:], y[1200:], [str(c) for c in range(8)])
    scores = class_scores(head, X[1200:])
    assert scores is not None and scores.shape == (400, 8)
    expected = top_k_accuracy_score(y[1200:], scores, k=5, labels=head.classes_)
    assert metrics["top5_accuracy"] == pytest.approx(expected)
    assert metrics["test_accuracy"] <= metrics["top5_accuracy"] < 1.0


def test_top5_accuracy_is_left_out_with_five_classes_or_fewer(blobs_file):
    from pipeline.heads import evaluate

    data = _data(blobs_file)
    head = make_head("logreg")
    head.fit(data.X_train, data.y_train)
    assert evaluate(head, data.X_test, data.y_test, data.classes)["top5_accuracy"] is None


@pytest.mark.parametrize("name", sorted(n for n, s in HEADS.items() if s.takes == "pooled"))
def test_every_pooled_head_fits_its_fixed_setting_when_there_is_nothing_to_validate_on(
        blobs_file, name):
    """One row per class (a 1-shot draw): no validation split can be carved, so the head fits
    ``HeadSpec.fixed`` on every row and reports no validation score."""
    data = _data(blobs_file)
    rows = np.array([np.flatnonzero(data.y_train == c)[0] for c in range(3)])
    head = make_head(name, HEADS[name].fixed).set_params(validation_fraction=0.0)
    head.fit(data.X_train[rows], data.y_train[rows])
    assert head.validation_score_ is None and not getattr(head, "sweep_", [])
    assert head.score(data.X_test, data.y_test) > 0.6
    chosen = head.best_params_
    expected = {"rbf_svm_approx": ("svm__C", 1.0), "mlp": ("epochs", 200), "knn": ("k", 3)}
    key, value = expected.get(name, ("C", 1.0))
    assert chosen[key] == value, chosen


def test_exact_rbf_svm_runs_on_onedal_where_installed_with_the_same_answers(blobs_file, caplog):
    """scikit-learn-intelex (the ``intel`` extra) computes the exact RBF SVC; stock
    scikit-learn gives the same predictions; without the extra the head says so once."""
    from sklearn.base import clone
    from sklearn.svm import SVC

    pytest.importorskip("sklearnex", reason="the intel extra (make install adds it on x86-64)")
    data = _data(blobs_file)
    head = make_head("rbf_svm").fit(data.X_train, data.y_train)
    assert heads_module.solver(head) == "oneDAL"
    stock = clone(head).set_params(estimator=SVC(kernel="rbf", cache_size=1000))
    stock.fit(data.X_train, data.y_train)
    assert heads_module.solver(stock) == "scikit-learn"
    assert np.mean(head.predict(data.X_test) == stock.predict(data.X_test)) >= 0.99
    assert heads_module.exact_rbf_limit() == heads_module.EXACT_RBF_LIMIT_ACCELERATED


def test_rbf_svm_labels_are_svc_votes_read_from_one_pass_of_decision_values(monkeypatch):
    """The labels equal scikit-learn's SVC.predict (one-against-one votes, ties to the first
    class) though read from the decision values: the test rows cost one kernel pass."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(0)
    y = np.arange(400) % 5
    X = rng.normal(size=(400, 8)) + 1.5 * np.eye(8)[y]
    queries = rng.normal(size=(300, 8)) + 0.5 * np.eye(8)[np.arange(300) % 5]
    head = make_head("rbf_svm", {"C": 1.0}).fit(X, y)
    prepare = head.model_[:-1]  # the head's own flatten + standardise, fitted on X
    reference = SVC(kernel="rbf", C=1.0).fit(prepare.transform(X), y)
    assert np.array_equal(head.predict(queries), reference.predict(prepare.transform(queries)))
    passes = []
    inner = head.model_.decision_function
    monkeypatch.setattr(head.model_, "decision_function", lambda A: passes.append(1) or inner(A))
    other = queries[::-1].copy()
    labels, scores = head.predict(other), head.decision_function(other)
    assert len(passes) == 1 and np.array_equal(labels, head.classes_[np.rint(scores).argmax(1)])
    head.fit(X[:200], y[:200])  # a new fit forgets the old answers
    inner = head.model_.decision_function
    monkeypatch.setattr(head.model_, "decision_function", lambda A: passes.append(1) or inner(A))
    head.predict(other)
    assert len(passes) == 2


def test_without_onedal_the_rbf_svm_runs_on_scikit_learn_and_says_so_once(without_sklearnex,
                                                                           caplog):
    with caplog.at_level("INFO", logger="pipeline.heads"):
        first, second = make_head("rbf_svm"), make_head("rbf_svm")
    assert heads_module.solver(first) == "scikit-learn" == heads_module.solver(second)
    assert caplog.text.count("scikit-learn-intelex is not installed") == 1
    assert heads_module.exact_rbf_limit() == heads_module.EXACT_RBF_LIMIT


def test_onedal_still_loads_in_a_process_that_ran_openvino_first():
    """OpenVINO and oneDAL both load Intel's TBB; OpenVINO's copy is older, so the runtimes
    load oneDAL's first: a `make all` that extracts on OpenVINO then fits rbf_svm keeps oneDAL."""
    import subprocess
    import sys

    pytest.importorskip("sklearnex", reason="the intel extra (make install adds it on x86-64)")
    pytest.importorskip("openvino", reason="the openvino extra")
    code = ("from pipeline import runtimes; runtimes.import_openvino().Core(); "
            "from pipeline.heads import onedal_svc; print(onedal_svc())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "sklearnex" in out.stdout, out.stderr[-2000:]


def test_sgd_linear_trains_its_alphas_together_as_each_would_alone():
    """One pass over the rows per epoch serves every alpha: the same epochs and validation
    scores as fitting each alpha by itself, and the same model whatever its threads."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 300)  # sorted by class, as a folder's rows are
    X = (rng.normal(size=(900, 6)) + 1.2 * np.eye(6)[y]).astype(np.float32)
    together = StreamingLinear(max_epochs=12, patience=3).fit(X, y)
    for row in together.sweep_:
        alone = StreamingLinear(alpha=row["alpha"], max_epochs=12, patience=3).fit(X, y)
        assert alone.sweep_ == [row]
    threaded = StreamingLinear(max_epochs=12, patience=3, n_jobs=2).fit(X, y)
    assert np.array_equal(threaded.model_.coef_, together.model_.coef_)
    assert threaded.sweep_ == together.sweep_


def test_sgd_linear_sweeps_on_max_sweep_rows_then_refits_on_every_row(monkeypatch):
    from sklearn.linear_model import SGDClassifier

    seen: dict = {}
    real = SGDClassifier.partial_fit

    def partial_fit(self, X, y, classes=None):
        seen.setdefault(id(self), []).append(len(X))
        return real(self, X, y, classes=classes)

    monkeypatch.setattr(SGDClassifier, "partial_fit", partial_fit)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 300)
    X = (rng.normal(size=(900, 6)) + 1.2 * np.eye(6)[y]).astype(np.float32)
    head = StreamingLinear(alpha=1e-3, max_sweep_rows=300, max_epochs=4, patience=10).fit(X, y)
    [sweep, refit] = seen.values()  # one alpha's model, then the refit's, in that order
    assert sum(sweep) == 4 * 300  # four epochs on 300 of the 810 training rows
    assert sum(refit) == head.best_params_["epochs"] * 900  # every row, validation included


class _FakeCumlSVC(heads_module.SVC):
    """Stands for cuML's SVC where no GPU is lent: only its module name differs."""


_FakeCumlSVC.__module__ = "cuml.svm"


def test_rbf_svm_runs_on_cuml_first_where_it_sees_a_gpu(monkeypatch, blobs_file):
    monkeypatch.setattr(heads_module, "cuml_svc", lambda: _FakeCumlSVC)
    data = _data(blobs_file)
    head = make_head("rbf_svm").fit(data.X_train, data.y_train)
    assert isinstance(head.model_.named_steps["clf"], _FakeCumlSVC)
    assert heads_module.solver(head) == "cuML"
    assert head.vote_from_scores is False  # its own predict: cuML's decision values unchecked
    assert heads_module.exact_rbf_limit() == heads_module.EXACT_RBF_LIMIT_ACCELERATED


def test_rbf_svm_on_cuml_gives_scikit_learns_answers(blobs_file):
    """On an NVIDIA GPU with cuML installed (skipped elsewhere: no GPU in CI)."""
    from sklearn.base import clone
    from sklearn.svm import SVC

    pytest.importorskip("cuml", reason="cuML (RAPIDS) is not installed")
    if heads_module.cuml_svc() is None:
        pytest.skip("cuML sees no GPU")
    data = _data(blobs_file)
    head = make_head("rbf_svm").fit(data.X_train, data.y_train)
    assert heads_module.solver(head) == "cuML"
    stock = clone(head).set_params(estimator=SVC(kernel="rbf", cache_size=1000))
    stock.fit(data.X_train, data.y_train)
    assert np.mean(head.predict(data.X_test) == stock.predict(data.X_test)) >= 0.99


def test_knn_answers_the_same_rows_twice_from_one_neighbour_search(monkeypatch):
    from pipeline.heads import WeightedKNN

    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    X = rng.normal(size=(300, 5)) + 3 * np.eye(5)[y]
    head = WeightedKNN(k=10).fit(X, y)
    searches = []
    real = head._neighbours
    monkeypatch.setattr(head, "_neighbours", lambda *a: searches.append(1) or real(*a))
    queries = rng.normal(size=(50, 5))
    first = head.predict_proba(queries)
    assert np.array_equal(head.predict(queries), first.argmax(1)) and len(searches) == 1
    other = queries[::-1].copy()
    assert np.allclose(head.predict_proba(other), first[::-1]) and len(searches) == 2
    head.fit(X[:150], y[:150])  # a new fit forgets the old answers
    searches.clear()
    head.predict_proba(other)
    assert len(searches) == 1


def test_the_mlp_trains_on_one_blas_thread_whatever_the_process_allows(monkeypatch):
    """Small products on a thread pool collapse when another process shares the cores."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []
    real = MLPClassifier.partial_fit

    def partial_fit(self, *args, **kwargs):
        seen.append({p["num_threads"] for p in threadpool_info()})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MLPClassifier, "partial_fit", partial_fit)
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    X = rng.normal(size=(300, 5)) + 3 * np.eye(5)[y]
    with threadpool_limits(limits=2):
        make_head("mlp", {"max_epochs": 3}).fit(X, y)
    assert seen and all(threads == {1} for threads in seen)


def test_an_mlp_with_seeds_averages_that_many_networks_from_different_starts():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    X = (rng.normal(size=(300, 6)) + 1.2 * np.eye(6)[y]).astype(np.float32)
    one = make_head("mlp", {"max_epochs": 20}).fit(X, y)
    three = make_head("mlp", {"max_epochs": 20, "seeds": 3}).fit(X, y)
    assert len(one.members_) == 1 and len(three.members_) == 3
    assert [m.named_steps["clf"].random_state for m in three.members_] == [0, 1, 2]
    X_new = rng.normal(size=(50, 6)).astype(np.float32)
    # the first network is the one-seed head's; the three are averaged
    assert np.array_equal(three.members_[0].predict_proba(X_new), one.predict_proba(X_new))
    mean = np.mean([m.predict_proba(X_new) for m in three.members_], axis=0)
    assert np.allclose(three.predict_proba(X_new), mean)
    assert np.array_equal(three.predict(X_new), three.classes_[mean.argmax(1)])
    assert len(three.best_params_["epochs"]) == 3 and isinstance(one.best_params_["epochs"], int)
    assert 0 <= three.validation_score_ <= 1
