"""The Python API a notebook uses: only the names ``pipeline`` exports."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, write_image_folder_split

import pipeline
from pipeline import (
    HEADS,
    ExtractionConfig,
    FeatureFile,
    FrozenFeatures,
    PipelineError,
    ResultRecord,
    compare,
    extract,
    make_head,
    train,
)

TINY = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": "none", "image_size": 32}
ODD_NAMES = ["a photo (1).png", "ünïcødé.png", "it's \"quoted\".png", "<img src=x onerror=alert(1)>.png"]


def odd_folder(root: Path) -> Path:
    """train/ and test/ with three classes, some files named as people name them."""
    write_image_folder_split(root / "train", 8, seed=1)
    write_image_folder_split(root / "test", 4, seed=2)
    for name, old in zip(ODD_NAMES, sorted((root / "test" / "c0").iterdir())):
        old.rename(old.with_name(name))
    return root


@pytest.fixture(scope="module")
def folder_features(tmp_path_factory):
    """(dataset folder, cache folder, path of its feature file), extracted once."""
    base = tmp_path_factory.mktemp("api")
    root, cache = odd_folder(base / "odd data"), base / "cache"
    with extract(f"folder:{root}", cache_dir=str(cache), **TINY) as ff:
        return root, cache, ff.path


def test_import_pipeline_is_cheap_and_every_public_name_is_documented():
    code = ("import sys, pipeline; heavy = [m for m in ('tensorflow', 'keras', 'sklearn', 'h5py') "
            "if m in sys.modules]; print(heavy, sorted(pipeline.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    assert out.startswith("[]")
    for name in pipeline.__all__:
        value = getattr(pipeline, name)
        assert name == "SPLITS" or name == "HEADS" or value.__doc__, name
    assert callable(extract) and extract.__module__ == "pipeline.api"


def test_extract_returns_the_file_the_command_line_makes_and_reuses_it(folder_features, tmp_path):
    root, cache, path = folder_features
    with extract(f"folder:{root}", cache_dir=str(cache), **TINY) as again:
        assert again.path == path  # up to date: the same file, nothing extracted
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", "--cache-dir", str(cache), "--dataset",
         f"folder:{root}", "--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "none",
         "--image-size", "32"], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "up to date" in cli.stderr and path.name in cli.stderr


def test_feature_file_loads_numpy_arrays_names_rows_and_says_how_it_was_made(folder_features):
    root, _, path = folder_features
    with FeatureFile(path) as ff:
        X, y = ff.load("test")
        assert X.dtype == np.float32 and X.shape == (12, 1280) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert ff.classes == ["c0", "c1", "c2"]
        ids = ff.ids("test")
        assert len(ids) == 12 and all((root / i).is_file() for i in ids)
        assert {f"test/c0/{n}" for n in ODD_NAMES} <= set(ids)
        assert ff.ids("train")[0].startswith("train/c0/")
        assert ff.provenance["dataset_source"] == f"folder:{root.resolve()}"
        X_disk, _ = ff.load("train", memory_budget_gb=1e-9)  # over the budget: left on disk
        assert not isinstance(X_disk, np.ndarray) and X_disk.shape == (24, 1280)
        assert np.array_equal(X_disk[:5], ff.load("train")[0][:5])
        with pytest.raises(PipelineError, match="split 'val'"):
            ff.load("val")


def test_frozen_features_give_the_cached_rows_and_reuse_them(folder_features):
    root, cache, path = folder_features
    with FeatureFile(path) as ff:
        X_cached = ff.load("test")[0]
        paths = [root / i for i in ff.ids("test")]
    frozen = FrozenFeatures(cache_dir=str(cache), **TINY)
    X = frozen.fit_transform(paths)
    assert X.dtype == np.float32 and np.allclose(X, X_cached, atol=1e-5)
    assert frozen.get_feature_names_out()[:2].tolist() == ["mobilenet_v2_avg0", "mobilenet_v2_avg1"]
    kept = list((cache / ".rows").glob("*.npy"))
    assert len(kept) == 1
    written = kept[0].stat().st_mtime_ns
    again = FrozenFeatures(cache_dir=str(cache), **TINY).fit(paths[:1]).transform(paths)
    assert np.array_equal(again, X) and list((cache / ".rows").glob("*.npy")) == kept
    assert kept[0].stat().st_mtime_ns == written  # read back, not computed and written again
    from PIL import Image

    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert np.allclose(frozen.transform(arrays), X_cached, atol=1e-5)  # arrays or paths alike


def test_frozen_features_and_a_head_make_a_scikit_learn_pipeline(folder_features):
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline

    root, cache, _ = folder_features
    train_paths = sorted((root / "train").rglob("*.png"))
    y = np.array([int(p.parent.name[1]) for p in train_paths])
    model = make_pipeline(FrozenFeatures(cache_dir=str(cache), **TINY),
                          make_head("logreg", {"C": 1.0}))
    model.fit(train_paths, y)
    test_paths = sorted((root / "test").rglob("*.png"))
    proba = model.predict_proba(test_paths)
    assert proba.shape == (12, 3) and np.allclose(proba.sum(1), 1)
    assert 0 <= model.score(test_paths, [int(p.parent.name[1]) for p in test_paths]) <= 1
    assert clone(model).get_params()["frozenfeatures__alpha"] == 0.35


# Checks that feed (n_samples, n_features) tables or other non-images: FrozenFeatures takes
# images (n, h, w[, c]) or image paths, so it refuses them in one line (a PipelineError), which
# is what each of these checks then sees. Every other check must pass.
TABULAR = "feeds a (n_samples, n_features) table, not images"
EXPECTED_FAILED = {name: TABULAR for name in [
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_pipeline_consistency",
    "check_estimators_pickle", "check_f_contiguous_array_estimator",
    "check_transformer_data_not_an_array", "check_transformer_general",
    "check_transformer_preserve_dtypes", "check_methods_sample_order_invariance",
    "check_methods_subset_invariance", "check_fit2d_1sample", "check_fit2d_1feature",
    "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted", "check_n_features_in",
    "check_fit1d", "check_fit2d_predict1d"]}
EXPECTED_FAILED.update({
    "check_complex_data": "complex tables: refused as not image pixels (PipelineError, not ValueError)",
    "check_estimators_nan_inf": "tables with NaN: refused as not images (PipelineError, not ValueError)",
    "check_dtype_object": "object tables: refused as not images (PipelineError, not TypeError)",
    "check_estimators_empty_data_messages": "an empty table: refused as not images (PipelineError)",
    "check_estimator_sparse_tag": "sparse tables are not images",
    "check_estimator_sparse_array": "sparse tables are not images",
    "check_estimator_sparse_matrix": "sparse tables are not images",
})


def test_frozen_features_pass_scikit_learns_checks_that_apply_to_images(tmp_path):
    from sklearn.utils.estimator_checks import check_estimator

    results = check_estimator(FrozenFeatures(cache_dir=str(tmp_path), **TINY), on_fail=None,
                              expected_failed_checks=EXPECTED_FAILED)
    by_status = {}
    for r in results:
        by_status.setdefault(r["status"], set()).add(r["check_name"])
    assert by_status.get("failed", set()) == set()  # an expected failure that passes is "failed" too
    assert by_status["passed"] >= {  # what applies to images: parameters, cloning, unfitted use
        "check_estimator_cloneable", "check_estimator_repr", "check_get_params_invariance",
        "check_set_params", "check_no_attributes_set_in_init", "check_parameters_default_constructible",
        "check_do_not_raise_errors_in_init_or_set_params", "check_estimators_unfitted",
        "check_transformers_unfitted", "check_mixin_order", "check_valid_tag_types"}
    for r in results:  # each expected failure fails for the reason given: our one-line refusal
        if r["status"] == "xfail" and EXPECTED_FAILED[r["check_name"]] == TABULAR:
            text = str(r["exception"])  # ours, or scikit-learn's words around it
            assert "images" in text or "raised PipelineError" in text, (r["check_name"], text)


@pytest.mark.parametrize("name", sorted(n for n, spec in HEADS.items() if spec.takes != "spatial"))
def test_every_head_is_a_plain_scikit_learn_estimator(blobs_file, name):
    from sklearn.base import clone
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    with FeatureFile(blobs_file) as ff:
        (X, y), (X_test, y_test) = ff.load("train"), ff.load("test")
        names = np.array(ff.classes)
    params = {"n_components": 50} if name == "rbf_svm_approx" else {}
    head = make_head(name, params)
    model = make_pipeline(StandardScaler(), clone(head)).fit(X, y)
    assert model.score(X_test, y_test) > 0.9
    assert model.predict(X_test).shape == y_test.shape
    if hasattr(model, "predict_proba"):
        assert np.allclose(model.predict_proba(X_test).sum(1), 1, atol=1e-5)
    alone = clone(head).fit(X.tolist(), names[y].tolist())  # lists, labels as class names
    assert alone.score(X_test.tolist(), names[y_test]) > 0.9 and alone.classes_.tolist() == ff.classes


def test_train_and_compare_return_what_the_command_line_writes(folder_features, tmp_path):
    _, _, path = folder_features
    results = tmp_path / "results"
    record = train(path, "logreg", {"C": 1.0}, results_dir=results)
    assert isinstance(record, ResultRecord) and 0 <= record.test_accuracy <= 1
    [folder] = (results / Path(record.features_file).stem).glob("logreg*")
    assert ResultRecord.load(folder) == record
    assert {"model.joblib", "metrics.json", "confusion.png", "mistakes.csv"} <= {
        p.name for p in folder.iterdir()}
    assert train(FeatureFile(path), "logreg", {"C": 1.0}, results_dir=results) == record  # up to date
    rows = compare(results, cache_dir=None)
    assert [r["head"] for r in rows] == ["logreg(C=1.0)"]
    assert rows[0]["test_accuracy"] == record.test_accuracy
    assert (results / "compare.csv").exists() and (results / "report.html").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("call, message", [
    (lambda: extract(123), "dataset = 123: should be str"),
    (lambda: extract("cifar10", colour="red"), "extract\\(\\): unknown option\\(s\\) colour"),
    (lambda: extract("cifar10", alpha="big"), "alpha = 'big': should be a number"),
    (lambda: train("no-such.h5", "logreg"), "'no-such.h5' does not exist"),
    (lambda: train(42, "logreg"), "features: got int"),
    (lambda: make_head("xgboost"), "unknown head 'xgboost'"),
    (lambda: make_head("logreg", "C=1"), "params: got str"),
    (lambda: make_head("logreg", {"C": -1}), "C=-1"),
    (lambda: FrozenFeatures(mode="spatial").fit(np.zeros((2, 8, 8), np.uint8)), "gives vectors"),
    (lambda: FrozenFeatures(**TINY).fit(np.zeros((2, 3), np.float32)), "images have shape \\(2, 3\\)"),
    (lambda: FrozenFeatures(**TINY).fit(["no-such.png"]), "image 'no-such.png' cannot be read"),
    (lambda: FrozenFeatures(**TINY).fit({"a": 1}), "got dict"),
])
def test_wrong_input_gets_one_line_pipeline_errors(call, message):
    with pytest.raises(PipelineError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_extraction_config_is_exported_and_checks_its_options_in_one_line():
    config = ExtractionConfig(dataset="cifar10", **TINY)
    config.validate()
    assert config.input_size == 32
    with pytest.raises(PipelineError, match="mode = 'median': use one of avg, max"):
        ExtractionConfig(dataset="cifar10", mode="median").validate()


@pytest.mark.slow
def test_the_example_notebook_runs_end_to_end_on_cifar10_mini(cifar_mini, shared_weights, tmp_path):
    """examples/seed_workflow.ipynb, executed cell by cell in a fresh kernel (real MobileNet
    0.25 weights, the 1,500-image CIFAR-10 sample), in a scratch folder for its cache."""
    import os

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "examples" / "seed_workflow.ipynb", as_version=4)
    os.environ["PIPELINE_DATA"] = str(cifar_mini)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        del os.environ["PIPELINE_DATA"]
    text = "\n".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for o in cell.outputs)
    assert "1,000 training rows of 256 features (float32)" in text
    assert "logreg   test accuracy" in text and "knn      test accuracy" in text
    assert "test images wrong; the most confident:" in text and "called" in text
    assert "200 training images: test accuracy" in text
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the accuracy-vs-cost plot and the mistakes sheet
    assert (tmp_path / "results" / "report.html").exists()
