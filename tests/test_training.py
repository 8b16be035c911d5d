"""Training one head on cached features: results written whole, the validation split, the
threads a head may use, and the lines bad input gets."""

import json

import numpy as np
import pytest
from conftest import LEDGER

from pipeline import training
from pipeline.errors import PipelineError
from pipeline.store import FeatureFile, check_file
from pipeline.training import train_one


def test_crash_while_writing_a_result_never_leaves_a_done_result(blobs_file, tmp_path, monkeypatch):
    feature_file = blobs_file

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "plot_confusion", boom)
    with pytest.raises(KeyboardInterrupt):
        train_one(feature_file, "logreg", {"C": 1.0}, results_dir=tmp_path / "results")
    assert not list((tmp_path / "results").glob("*/logreg*/metrics.json"))
    monkeypatch.undo()
    status, out = train_one(feature_file, "logreg", {"C": 1.0}, results_dir=tmp_path / "results")
    _, clean = train_one(feature_file, "logreg", {"C": 1.0}, results_dir=tmp_path / "clean")
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, clean))
    assert status == "trained" and (out / "model.joblib").exists() and (out / "confusion.png").exists()
    assert metrics["test_accuracy"] == expected["test_accuracy"]  # what an uncrashed run gives
    assert not list((tmp_path / "results").rglob(".*tmp-*"))  # nothing half-written left
    LEDGER.update(["interrupted", "resumed"])
    assert train_one(feature_file, "logreg", {"C": 1.0}, results_dir=tmp_path / "results")[0] == "up-to-date"


def test_a_result_made_by_another_version_of_its_head_is_retrained_and_says_why(
        blobs_file, tmp_path, monkeypatch, caplog):
    import dataclasses

    from pipeline import heads

    status, out = train_one(blobs_file, "logreg", results_dir=tmp_path)
    spec = heads.HEADS["logreg"]
    assert status == "trained"
    assert json.loads((out / "metrics.json").read_text())["head_version"] == spec.version
    assert train_one(blobs_file, "logreg", results_dir=tmp_path)[0] == "up-to-date"
    monkeypatch.setitem(heads.HEADS, "logreg", dataclasses.replace(spec, version=spec.version + 1))
    with caplog.at_level("INFO", logger="pipeline"):
        assert train_one(blobs_file, "logreg", results_dir=tmp_path) == ("trained", out)
    assert f"retraining logreg: it was made by logreg version {spec.version}, now " \
        f"{spec.version + 1}" in caplog.messages
    assert json.loads((out / "metrics.json").read_text())["head_version"] == spec.version + 1
    assert train_one(blobs_file, "logreg", results_dir=tmp_path)[0] == "up-to-date"


def test_a_val_folder_is_what_every_head_chooses_on_and_metrics_say_so(tmp_path):
    from conftest import write_image_folder_split

    from pipeline.extraction import ExtractionConfig, extract_features

    root = tmp_path / "photos"
    for split, n, seed in (("train", 8, 1), ("val", 3, 2), ("test", 4, 3)):
        write_image_folder_split(root / split, n, seed)
    path = extract_features(ExtractionConfig(
        dataset=f"folder:{root}", backbone="mobilenet_v2", alpha=0.35, weights="none",
        image_size=32, cache_dir=str(tmp_path / "cache"))).path
    with FeatureFile(path) as ff:
        assert ff.validation_rows == 9 and len(ff.labels("train")) == 33
    for head in ("logreg", "mlp"):
        _, out = train_one(path, head, results_dir=tmp_path / "results")
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["validation"] == {"given": "the dataset's own validation split", "rows": 9}


@pytest.mark.bad_input
def test_a_full_results_disk_is_not_blamed_on_the_feature_file(blobs_file, tmp_path, monkeypatch):
    import errno

    feature_file = blobs_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "plot_confusion", full)
    with pytest.raises(PipelineError) as caught:
        train_one(feature_file, "logreg", {"C": 1.0}, results_dir=tmp_path / "results")
    message = str(caught.value)
    assert message.startswith(f"cannot write the result to {tmp_path / 'results'}")
    assert "No space left on device" in message and "damaged" not in message
    assert check_file(feature_file, full=True) is None


@pytest.mark.bad_input
def test_training_names_a_class_with_a_single_row_before_fitting(tmp_path):
    from conftest import write_feature_file

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10 + [2])
    path = write_feature_file(tmp_path / "cache", rng.normal(size=(21, 4)), y,
                              rng.normal(size=(6, 4)), np.array([0, 1, 2] * 2),
                              classes=["cat", "dog", "owl"])
    with pytest.raises(PipelineError, match=r"logreg: class\(es\) owl \(1\) have a single training "
                                            r"row in .*at least 2 per class"):
        train_one(path, "logreg", results_dir=tmp_path / "results")
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("metrics.json"))


def test_threads_caps_every_pool_a_head_fits_and_predicts_with(blobs_file, tmp_path, monkeypatch):
    from threadpoolctl import threadpool_info

    from pipeline import heads

    seen, predicted = [], []
    real_fit, real_predict = heads.SweepClassifier.fit, heads.SweepClassifier.predict

    def fit(self, X, y):
        seen.append((self.n_jobs, {p["internal_api"]: p["num_threads"] for p in threadpool_info()}))
        return real_fit(self, X, y)

    def predict(self, X):
        predicted.append({p["num_threads"] for p in threadpool_info()})
        return real_predict(self, X)

    def pools_now():
        return sorted((p["filepath"], p["num_threads"]) for p in threadpool_info())

    monkeypatch.setattr(heads.SweepClassifier, "fit", fit)
    monkeypatch.setattr(heads.SweepClassifier, "predict", predict)
    before = pools_now()
    _, out = train_one(blobs_file, "logreg", results_dir=tmp_path / "r", threads=1)
    [(n_jobs, pools)] = seen
    assert n_jobs == 1 and pools and set(pools.values()) == {1}, pools
    assert predicted and all(threads == {1} for threads in predicted)  # the test rows too
    assert json.loads((out / "metrics.json").read_text())["threads"] == 1
    assert pools_now() == before  # the caps go with the fit


def test_threads_caps_onedal_too_where_the_intel_extra_is_installed(blobs_file, tmp_path,
                                                                   monkeypatch):
    """oneDAL (rbf_svm, knn) threads through TBB, which threadpoolctl does not see."""
    daal4py = pytest.importorskip("daal4py", reason="the intel extra (make install adds it on x86-64)")
    from pipeline import heads

    seen = []
    real_fit = heads.WeightedKNN.fit
    monkeypatch.setattr(heads.WeightedKNN, "fit",
                        lambda self, X, y: seen.append(daal4py.num_threads()) or real_fit(self, X, y))
    before = daal4py.num_threads()
    _, out = train_one(blobs_file, "knn", results_dir=tmp_path / "r", threads=1)
    assert seen == [1] and json.loads((out / "metrics.json").read_text())["solver"] == "oneDAL"
    assert daal4py.num_threads() == before  # the cap goes with the fit


@pytest.mark.bad_input
@pytest.mark.parametrize("threads", [0, 10_000, True])
def test_threads_beyond_the_cores_or_below_one_are_refused_in_one_line(blobs_file, tmp_path, threads):
    with pytest.raises(PipelineError, match=r"--threads .*: this machine gives us \d+ core\(s\); use "
                                            r"a whole number from 1 to \d+"):
        train_one(blobs_file, "logreg", results_dir=tmp_path / "r", threads=threads)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("metrics.json"))



def test_each_result_lists_its_mistakes_by_image_and_draws_the_worst(tmp_path, caplog):
    import csv

    from conftest import write_image_folder_split

    from pipeline.extraction import ExtractionConfig, extract_features

    root = tmp_path / "photos"
    write_image_folder_split(root / "train", 8, seed=1)
    write_image_folder_split(root / "test", 6, seed=2)
    (root / "test" / "c0").rename(root / "test" / "swap")  # c0's and c1's test images swapped:
    (root / "test" / "c1").rename(root / "test" / "c0")    # mistakes by construction
    (root / "test" / "swap").rename(root / "test" / "c1")
    path = extract_features(ExtractionConfig(
        dataset=f"folder:{root}", backbone="mobilenet_v2", alpha=0.35, weights="none",
        image_size=32, cache_dir=str(tmp_path / "cache"))).path
    _, out = train_one(path, "logreg", {"C": 0.001}, results_dir=tmp_path / "results")
    metrics = json.loads((out / "metrics.json").read_text())
    matrix = np.array(metrics["confusion_matrix"])
    with open(out / "mistakes.csv", newline="") as f:
        mistakes = list(csv.DictReader(f))
    assert len(mistakes) == matrix.sum() - np.trace(matrix) > 0  # every wrong test row, once
    with FeatureFile(path) as ff:
        ids, y, classes = ff.ids("test"), ff.labels("test"), ff.classes
    for m in mistakes:
        row = int(m["row"])
        assert m["id"] == ids[row] and (root / m["id"]).is_file()
        assert m["true"] == classes[y[row]] and m["predicted"] != m["true"]
    confidences = [float(m["confidence"]) for m in mistakes]
    assert confidences == sorted(confidences, reverse=True) and 0 < confidences[-1] <= 1
    assert (out / "mistakes.png").stat().st_size > 5000

    for image in (root / "test").rglob("*.png"):  # the images gone: mistakes listed, no sheet
        image.unlink()
    with caplog.at_level("INFO", logger="pipeline.training"):
        _, out = train_one(path, "logreg", {"C": 0.001}, results_dir=tmp_path / "results", force=True)
    assert (out / "mistakes.csv").exists() and not (out / "mistakes.png").exists()
    assert "no mistakes.png: none of the images is at" in caplog.text


def test_a_file_without_row_ids_still_lists_its_mistakes_by_row(blobs_file, tmp_path, caplog):
    import csv

    with caplog.at_level("INFO", logger="pipeline.training"):
        _, out = train_one(blobs_file, "linear_svm", {"C": 0.0001}, results_dir=tmp_path / "r")
    with open(out / "mistakes.csv", newline="") as f:
        mistakes = list(csv.DictReader(f))
    matrix = np.array(json.loads((out / "metrics.json").read_text())["confusion_matrix"])
    assert len(mistakes) == matrix.sum() - np.trace(matrix)
    assert all(m["id"] == "" and m["confidence"] == "" for m in mistakes)  # no ids; no probabilities
    assert not (out / "mistakes.png").exists()


# ----------------------------------------------------------------------------- learning curves

def test_a_k_shot_draw_is_k_rows_per_class_seeded_by_k_and_draw_alone():
    from pipeline.training import k_shot_rows

    y = np.repeat([0, 1, 2], [50, 30, 3])
    rows = k_shot_rows(y, 5, 0)
    assert np.bincount(y[rows]).tolist() == [5, 5, 3]  # a class with fewer gives all it has
    assert np.array_equal(rows, k_shot_rows(y, 5, 0)) and not np.array_equal(rows, k_shot_rows(y, 5, 1))
    assert set(k_shot_rows(y, 1, 0)) != set(k_shot_rows(y, 1, 1))


def test_a_learning_curve_trains_each_draw_on_its_k_shot_rows_only(blobs_file, tmp_path, monkeypatch):
    """Each point's head sees exactly its k rows per class (its validation carved from them by
    the head itself), is scored on the whole test split, and records what it chose on."""
    from pipeline.results import ResultRecord

    seen = []
    real = training.make_head

    def spying(name, params=None, **kw):
        head = real(name, params, **kw)
        fit = head.fit
        head.fit = lambda X, y: (seen.append((np.asarray(X).copy(), np.asarray(y).copy())), fit(X, y))[1]
        return head

    monkeypatch.setattr(training, "make_head", spying)
    done = training.train_curve(blobs_file, "logreg", shots="1,5", tries=2,
                                results_dir=tmp_path / "r")
    monkeypatch.undo()  # (a spied head cannot be pickled as the full result's model)
    done += training.train_curve(blobs_file, "logreg", shots="1,5,all", tries=2,
                                 results_dir=tmp_path / "r")[4:]
    assert [status for status, _ in done] == ["trained"] * 5
    with FeatureFile(blobs_file) as ff:
        X_train, y_train = ff.load("train")
    assert len(seen) == 4
    for X, y in seen:  # the four drawn points
        assert np.bincount(y).tolist() in ([1, 1, 1], [5, 5, 5])
        assert all((X_train == row).all(1).any() for row in X)  # training rows, never test rows
    records = [ResultRecord.load(out) for _, out in done]
    assert [(r.shots, r.draw, r.n_train, r.n_test) for r in records[:4]] == [
        (1, 0, 3, 300), (1, 1, 3, 300), (5, 0, 15, 300), (5, 1, 15, 300)]
    assert records[0].validation["fixed"] == {"C": 1.0} and records[0].validation_accuracy is None
    assert "carved" in records[2].validation and records[2].best_params
    assert records[4].shots is None and records[4].n_train == 600


def test_a_learning_curve_is_incremental_and_reproducible(blobs_file, tmp_path, caplog):
    from pipeline.results import ResultRecord

    first = training.train_curve(blobs_file, "knn", shots=[2, 4], tries=2, results_dir=tmp_path / "a")
    again = training.train_curve(blobs_file, "knn", shots=[2, 4], tries=3, results_dir=tmp_path / "a")
    assert [s for s, _ in again].count("trained") == 2  # only the new draw of each k
    with caplog.at_level("INFO", logger="pipeline.training"):
        third = training.train_curve(blobs_file, "knn", shots=[2, 4], tries=3,
                                     results_dir=tmp_path / "a")
    assert [s for s, _ in third] == ["up-to-date"] * 6  # nothing fitted the third time
    assert "learning curve on" in caplog.text and "2-shot" in caplog.text
    assert "test accuracy" not in caplog.text  # (the line each fitted point logs)
    elsewhere = training.train_curve(blobs_file, "knn", shots=[2, 4], tries=2,
                                     results_dir=tmp_path / "b")
    assert [ResultRecord.load(o).test_accuracy for _, o in first] == \
        [ResultRecord.load(o).test_accuracy for _, o in elsewhere]  # the same seeds, the same numbers


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["--shots", "0,5"], "shots '0': give images per class as positive whole numbers or 'all'"),
    (["--shots", "five"], "shots 'five'"),
    (["--tries", "2"], "--tries goes with --shots"),
    (["--shots", "5", "--head", "sgd_linear"], "learning curves take the heads on pooled vectors"),
])
def test_bad_learning_curve_options_get_one_line(blobs_file, tmp_path, capsys, args, message):
    from pipeline.cli import main

    code = main(["train", "--head", "logreg", *args, "--features", str(blobs_file),
                 "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "r").rglob("metrics.json"))


# ----------------------------------------------------------------------------- heads side by side

def _hard_file(tmp_path):
    """600/300 rows of 20-d features, 3 overlapping classes: heads make mistakes on it."""
    from conftest import write_feature_file
    from sklearn.datasets import make_classification

    X, y = make_classification(900, n_features=20, n_informative=6, n_classes=3, class_sep=0.8,
                               n_clusters_per_class=1,
                               random_state=0)
    X = X.astype(np.float32)
    return write_feature_file(tmp_path / "cache", X[:600], y[:600], X[600:], y[600:])


def test_one_core_heads_train_side_by_side_one_core_each_longest_first(blobs_file, tmp_path,
                                                                        monkeypatch):
    import threading
    import time

    from threadpoolctl import threadpool_info

    from pipeline import runtimes
    from pipeline.errors import LANE

    monkeypatch.setattr(runtimes, "cpu_cores", lambda: 2)
    ran, pools, real_train, real_evaluate = [], {}, training.train_one, training.evaluate

    def train(feature_path, head, params=None, **kw):
        start = time.perf_counter()
        result = real_train(feature_path, head, params, **kw)
        time.sleep(0.3)  # long enough for the other lane to start meanwhile
        ran.append({"head": head, "threads": kw["threads"], "thread": threading.current_thread().name,
                    "start": start, "end": time.perf_counter()})
        return result

    def evaluate(model, *args, **kw):  # within the head's thread budget, as its fit is
        pools[threading.current_thread().name] = {p["num_threads"] for p in threadpool_info()}
        return real_evaluate(model, *args, **kw)

    monkeypatch.setattr(training, "train_one", train)
    monkeypatch.setattr(training, "evaluate", evaluate)
    training.train_heads(["mlp", "knn", "logreg", "sgd_linear"], cache_dir=str(blobs_file.parent),
                         results_dir=str(tmp_path / "r"))
    by_head = {r["head"]: r for r in ran}
    # knn's search uses every core: alone, first, on both
    assert ran[0]["head"] == "knn" and by_head["knn"]["threads"] == 2
    assert by_head["knn"]["thread"] == "MainThread" and pools["MainThread"] == {2}
    lanes = sorted((r for r in ran if r["head"] != "knn"), key=lambda r: r["start"])
    assert [r["head"] for r in lanes] == ["sgd_linear", "logreg", "mlp"]  # the longest first
    for r in lanes:  # each on one core: every pool it sees (BLAS, OpenMP) at one thread
        assert r["threads"] == 1 and r["thread"] == LANE + r["head"] and pools[r["thread"]] == {1}, r
    first, second = lanes[0], lanes[1]
    assert second["start"] < first["end"] and first["start"] < second["end"]  # at the same time
    assert len(list((tmp_path / "r").glob("*/*/metrics.json"))) == 4


def test_heads_side_by_side_give_the_answers_they_give_one_after_another(tmp_path, monkeypatch):
    import joblib

    from pipeline import runtimes
    from pipeline.store import FeatureFile

    monkeypatch.setattr(runtimes, "cpu_cores", lambda: 2)
    path = _hard_file(tmp_path)
    heads = ["logreg", "linear_svm", "mlp", "sgd_linear"]
    for threads in (1, 2):  # one after another; side by side
        training.train_heads(heads, cache_dir=str(path.parent), results_dir=str(tmp_path / f"r{threads}"),
                             threads=threads)
    with FeatureFile(path) as ff:
        X, y = ff.features("test")[:], ff.labels("test")
    for head in heads:
        [apart] = (tmp_path / "r1").glob(f"*/{head}/model.joblib")
        [beside] = (tmp_path / "r2").glob(f"*/{head}/model.joblib")
        one, two = joblib.load(apart), joblib.load(beside)
        assert 0.6 < one.score(X, y) < 0.95, head  # it makes mistakes: the answers can differ
        np.testing.assert_array_equal(one.predict(X), two.predict(X), err_msg=head)
        metrics = [json.loads(m.parent.joinpath("metrics.json").read_text()) for m in (apart, beside)]
        assert [m["threads"] for m in metrics] == [1, 1]
        assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]


def test_a_head_failing_beside_another_stops_the_rest_and_is_raised(blobs_file, tmp_path, monkeypatch):
    import time

    from pipeline import runtimes

    monkeypatch.setattr(runtimes, "cpu_cores", lambda: 2)
    started, real = [], training.train_one

    def spy(feature_path, head, params=None, **kw):
        started.append(head)
        if head == "logreg":
            raise PipelineError("logreg: something the user must fix")
        time.sleep(0.5)
        return real(feature_path, head, params, **kw)

    monkeypatch.setattr(training, "train_one", spy)
    with pytest.raises(PipelineError, match="logreg: something the user must fix"):
        training.train_heads(["logreg", "mlp", "sgd_linear"], cache_dir=str(blobs_file.parent),
                             results_dir=str(tmp_path / "r"))
    assert sorted(started) == ["logreg", "sgd_linear"]  # mlp, not started yet, never is
    assert [m.parent.name for m in (tmp_path / "r").glob("*/*/metrics.json")] == ["sgd_linear"]


def test_a_memory_budget_given_keeps_heads_one_after_another(blobs_file, tmp_path, monkeypatch):
    import threading

    from pipeline import runtimes

    monkeypatch.setattr(runtimes, "cpu_cores", lambda: 2)
    ran, real = [], training.train_one
    monkeypatch.setattr(training, "train_one", lambda feature_path, head, params=None, **kw: ran.append(
        (head, kw["threads"], threading.current_thread().name)) or real(feature_path, head, params, **kw))
    training.train_heads(["logreg", "mlp"], cache_dir=str(blobs_file.parent),
                         results_dir=str(tmp_path / "r"), memory_budget_gb=1.0)
    assert ran == [("logreg", 2, "MainThread"), ("mlp", 2, "MainThread")]


def test_on_a_cluster_one_core_heads_ask_one_core_and_the_others_a_node():
    calls = [{"head": h} for h in ("mlp", "rbf_svm", "logreg", "knn")] + [
        {"head": "logreg", "shots": [1, "all"]}]  # a learning curve: many fits, every core
    tasks = training.cluster_tasks(calls)
    assert [(t["head"], t["threads"]) for t in tasks] == [
        ("rbf_svm", None), ("knn", None), ("logreg", None), ("logreg", 1), ("mlp", 1)]
    assert "shots" in tasks[2] and "shots" not in tasks[3]
    assert [t["threads"] for t in training.cluster_tasks(calls, 2)] == [2, 2, 2, 1, 1]


def test_heads_on_several_files_side_by_side_name_head_and_file(tmp_path, monkeypatch):
    import threading

    from conftest import write_feature_file

    from pipeline import runtimes
    from pipeline.errors import LANE

    monkeypatch.setattr(runtimes, "cpu_cores", lambda: 2)
    rng = np.random.default_rng(0)
    paths = []
    for seed in (1, 2):
        X, y = rng.normal(size=(90, 4)).astype(np.float32) + seed, np.arange(90) % 3
        paths.append(write_feature_file(tmp_path / "cache", X[:60], y[:60], X[60:], y[60:]))
    seen, real = [], training.train_one
    monkeypatch.setattr(training, "train_one", lambda feature_path, head, params=None, **kw: seen.append(
        threading.current_thread().name) or real(feature_path, head, params, **kw))
    training.train_heads(["logreg", "mlp"], cache_dir=str(tmp_path / "cache"),
                         results_dir=str(tmp_path / "r"))
    assert sorted(seen) == sorted(f"{LANE}{head} on {path.stem}" for head in ("logreg", "mlp")
                                  for path in paths)
