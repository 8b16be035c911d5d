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


@pytest.mark.bad_input
@pytest.mark.parametrize("threads", [0, 10_000, True])
def test_threads_beyond_the_cores_or_below_one_are_refused_in_one_line(blobs_file, tmp_path, threads):
    with pytest.raises(PipelineError, match=r"--threads .*: this machine gives us \d+ core\(s\); use "
                                            r"a whole number from 1 to \d+"):
        train_one(blobs_file, "logreg", results_dir=tmp_path / "r", threads=threads)
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").rglob("metrics.json"))

