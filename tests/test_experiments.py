import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import LEDGER, REPO, audit_cache, make_images

from pipeline import experiments
from pipeline.errors import PipelineError
from pipeline.experiments import load_experiment, run_experiment
from pipeline.store import FeatureFile, check_file
from pipeline.training import train_one


def _npz(path, seed):
    x, y = make_images(36, seed=seed)
    np.savez(path, x_train=x, y_train=y, x_test=x[:18], y_test=y[:18])


def _config(tmp_path, heads=("logreg",), datasets=("a",)):
    lines = [f'cache_dir = "{tmp_path / "cache"}"', f'results_dir = "{tmp_path / "results"}"',
             "batch_size = 12"]
    for name in datasets:
        if not (tmp_path / f"{name}.npz").exists():
            _npz(tmp_path / f"{name}.npz", seed=ord(name))
        lines += ["[[datasets]]", f'name = "{name}"', f'source = "npz:{tmp_path / name}.npz"']
    lines += ["[[backbones]]", 'name = "mobilenet_v2"', "alpha = 0.35", 'weights = "none"',
              "image_size = 32", "[[features]]", 'mode = "avg"']
    for head in heads:
        lines += ["[[heads]]", f'name = "{head}"',
                  "params = { C = 1.0 }" if head == "logreg" else "params = { max_epochs = 5 }"]
    path = tmp_path / "exp.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in Path(root).rglob("*") if p.is_file()
            and ".locks" not in p.parts and not p.name.startswith(".")}


def test_second_run_does_no_work_and_says_so(tmp_path, capsys):
    exp = load_experiment(_config(tmp_path))
    run_experiment(exp)
    before = _mtimes(tmp_path / "cache") | _mtimes(tmp_path / "results" / exp_key(tmp_path))
    capsys.readouterr()
    run_experiment(load_experiment(_config(tmp_path)))
    out = capsys.readouterr().out
    assert "nothing to do: everything is up to date" in out
    after = _mtimes(tmp_path / "cache") | _mtimes(tmp_path / "results" / exp_key(tmp_path))
    assert before == after


def exp_key(tmp_path):
    return next(p.name for p in (tmp_path / "results").iterdir() if p.is_dir())


def test_adding_a_head_trains_only_that_head(tmp_path, capsys, caplog):
    run_experiment(load_experiment(_config(tmp_path)))
    features = _mtimes(tmp_path / "cache")
    logreg = (tmp_path / "results" / exp_key(tmp_path))
    logreg_metrics = next(logreg.glob("logreg*/metrics.json"))
    stamp = logreg_metrics.stat().st_mtime_ns
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        run_experiment(load_experiment(_config(tmp_path, heads=("logreg", "mlp"))))
    out = capsys.readouterr().out
    assert "[cached  ]" in out and "logreg(C=1.0):cached, mlp(max_epochs=5):to train" in out
    steps = [m for m in caplog.messages if m.startswith("[")]
    assert len(steps) == 1 and steps[0].startswith("[1/1] mlp(max_epochs=5) on ")  # no extraction
    assert _mtimes(tmp_path / "cache") == features
    assert logreg_metrics.stat().st_mtime_ns == stamp
    assert next(logreg.glob("mlp*/metrics.json")).exists()


def test_changed_dataset_invalidates_exactly_what_depends_on_it(tmp_path):
    run_experiment(load_experiment(_config(tmp_path, datasets=("a", "b"))))
    files = sorted((tmp_path / "cache").glob("*.h5"))
    b_file = next(f for f in files if "npz_b" in f.name)
    a_file = next(f for f in files if "npz_a" in f.name)
    a_stamp = a_file.stat().st_mtime_ns
    _npz(tmp_path / "b.npz", seed=99)  # new content for dataset b
    jobs = experiments.plan(load_experiment(_config(tmp_path, datasets=("a", "b"))))
    assert [j.state for j in jobs] == ["cached", "missing"]
    run_experiment(load_experiment(_config(tmp_path, datasets=("a", "b"))))
    assert a_file.stat().st_mtime_ns == a_stamp and b_file.exists()
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 3
    assert len([p for p in (tmp_path / "results").iterdir() if p.is_dir()]) == 3


def test_dry_run_plans_without_writing(tmp_path, capsys):
    run_experiment(load_experiment(_config(tmp_path)), dry_run=True)
    out = capsys.readouterr().out
    assert "[missing ]" in out and "would extract 1 feature file(s) and train 1 head(s)" in out
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".npz", ".toml")]
    assert written == []


def test_an_option_has_one_name_on_the_command_line_in_experiment_files_and_in_python(tmp_path):
    """Every extraction option set away from its default, once as flags and once as an
    experiment file, gives the same ExtractionConfig; the old spellings give it too."""
    from pipeline.cli import build_parser
    from pipeline.extraction import ExtractionConfig

    npz = tmp_path / "a.npz"
    _npz(npz, seed=1)
    want = ExtractionConfig(
        dataset=f"npz:{npz}", backbone="mobilenet", mode="bottleneck", alpha=0.25,
        weights="none", image_size=40, bottleneck_k=8, bottleneck_fit_images=30, batch_size=6,
        limit=12, precision="mixed_float16", compression="gzip", skip_bad=True,
        cache_dir=str(tmp_path / "c"), runtime="tensorflow", tta="flip")
    args = build_parser().parse_args([
        "extract", "--dataset", f"npz:{npz}", "--backbone", "mobilenet", "--pooling", "bottleneck",
        "--alpha", "0.25", "--weights", "none", "--image-size", "40", "--bottleneck-k", "8",
        "--bottleneck-fit-images", "30", "--batch-size", "6", "--limit", "12",
        "--precision", "mixed_float16", "--compression", "gzip", "--skip-bad",
        "--cache-dir", str(tmp_path / "c"), "--runtime", "tensorflow", "--tta", "flip"])
    from_flags = ExtractionConfig(**{f: getattr(args, f) for f in vars(want) if f != "seed"})
    (tmp_path / "grid.toml").write_text(f"""
cache_dir = "{tmp_path / 'c'}"
runtime = "tensorflow"
batch_size = 64
[[datasets]]
name = "a"
source = "npz:{npz}"
limit = 12
skip_bad = true
[[backbones]]
name = "mobilenet"
alpha = 0.25
weights = "none"
image_size = 40
batch_size = 6
precision = "mixed_float16"
[[features]]
mode = "bottleneck"
k = 8
bottleneck_fit_images = 30
compression = "gzip"
tta = "flip"
[[heads]]
name = "logreg"
""")
    [job] = experiments.plan(load_experiment(str(tmp_path / "grid.toml")))
    assert from_flags == want and job.config == want  # the entry's batch_size beats the top's


@pytest.mark.bad_input
@pytest.mark.parametrize("text, message", [
    ('colour = "red"\n', "unknown key\\(s\\) colour"),
    ('[[datasets]]\nname = 3\n', "name = 3: should be str"),
    ('[[datasets]]\nname = "x"\nlimit = "ten"\n', "limit = 'ten': should be int"),
    ('[[datasets]]\nname = "x"\n[[backbones]]\nname = "vgg16"\n[[features]]\nmode = "mean"\n'
     '[[heads]]\nname = "logreg"\n', "mode = 'mean': use one of avg"),
    ('[[datasets]]\nname = "x"\n[[backbones]]\nname = "vgg16"\n[[features]]\nmode = "avg"\n'
     '[[heads]]\nname = "lda"\n', "name = 'lda'; use one of logreg"),
    ("datasets = [\n", "not valid TOML"),
])
def test_bad_experiment_files_get_one_line(tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(PipelineError, match=message):
        load_experiment(str(tmp_path / "bad.toml"))


def test_shipped_experiment_files_are_valid():
    from pipeline.backbones import BACKBONES
    from pipeline.datasets import parse_dataset

    shipped = sorted((REPO / "experiments").glob("*.toml"))
    assert len(shipped) >= 3
    for path in shipped:
        exp = load_experiment(str(path))
        assert exp.heads and exp.backbones and exp.features
        assert all(b["name"] in BACKBONES for b in exp.backbones)
        for d in exp.datasets:
            parse_dataset(d.get("source", d["name"]))  # a known kind, or it raises


def test_make_variables_override_the_grid(tmp_path):
    exp = load_experiment(_config(tmp_path), backbones="resnet50 mobilenet_v2", heads="mlp",
                          datasets="cifar10", limit=50)
    assert [b["name"] for b in exp.backbones] == ["resnet50", "mobilenet_v2"]
    assert exp.backbones[1]["alpha"] == 0.35  # a configured backbone keeps its options
    assert exp.heads == [{"name": "mlp"}] and exp.limit == 50
    assert exp.datasets == [{"name": "cifar10", "source": "cifar10"}]


@pytest.mark.reliability
def test_kill_9_during_head_training_never_leaves_a_half_result(tmp_path):
    run_experiment(load_experiment(_config(tmp_path)), stage="features")
    feature_file = next((tmp_path / "cache").glob("*.h5"))
    args = [sys.executable, "-m", "pipeline", "train", "--head", "logreg", "--head", "mlp",
            "--features", str(feature_file), "--results-dir", str(tmp_path / "results")]
    kills = 0
    for delay in (0.5, 1.5, 2.5, 3.5):
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for result in (tmp_path / "results").glob("*/*"):
            if result.is_dir() and not result.name.startswith("."):
                metrics = json.loads((result / "metrics.json").read_text())  # complete or absent
                assert (result / "model.joblib").exists() and "test_accuracy" in metrics
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "results").glob("*/*/metrics.json"))) == 2
    assert not list((tmp_path / "results").glob("*/.*"))  # what the killed writers left is gone
    assert kills >= 2
    LEDGER.update({"interrupted": kills, "resumed": 1})


@pytest.mark.reliability
def test_make_j2_runs_two_stages_at_once_with_one_writer_per_file(tmp_path):
    config = _config(tmp_path)
    venv = tmp_path / "venv"  # stands in for .venv: the interpreter running these tests
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".installed").touch()
    proc = subprocess.run(["make", "-j2", "all", "features", f"CONFIG={config}", f"VENV={venv}"],
                          cwd=REPO, capture_output=True, text=True, env=os.environ, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wrote = [line for line in proc.stderr.splitlines() if line.startswith("wrote ") and ".h5" in line]
    assert len(wrote) == 1  # one extraction wrote the file; the other waited or found it
    assert "written by the process we waited for" in proc.stderr or "up to date" in proc.stderr
    audit_cache(tmp_path / "cache")
    assert len(list((tmp_path / "results").glob("*/*/metrics.json"))) == 1


def test_a_features_entry_can_name_the_heads_that_run_on_it(tmp_path):
    config = Path(_config(tmp_path, heads=("logreg", "mlp")))
    text = config.read_text().replace('mode = "avg"\n', 'mode = "avg"\nheads = ["mlp"]\n', 1)
    config.write_text(text)
    [job] = experiments.plan(load_experiment(str(config)))
    assert [h["name"] for h in job.heads] == ["mlp"]


def test_a_features_entry_can_be_limited_to_some_datasets(tmp_path):
    path = Path(_config(tmp_path, datasets=("a", "b")))
    path.write_text(path.read_text().replace('mode = "avg"', 'mode = "avg"\ndatasets = ["b"]'))
    jobs = experiments.plan(load_experiment(str(path)))
    assert [j.label.split(" / ")[0] for j in jobs] == ["b"]


def test_a_dry_run_never_downloads_a_dataset_it_does_not_have(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))

    def no_download(config, **kw):
        raise AssertionError(f"the dry run loaded {config.dataset}")

    monkeypatch.setattr(experiments, "open_dataset", no_download)
    path = Path(_config(tmp_path))
    path.write_text(path.read_text().replace(f'source = "npz:{tmp_path / "a"}.npz"', 'source = "cifar10"'))
    assert run_experiment(load_experiment(str(path)), dry_run=True) == 0
    out = capsys.readouterr().out
    assert "dataset not available locally: would download it" in out
    assert "would extract 1 feature file(s)" in out


def test_result_folders_are_named_after_their_feature_file(tmp_path):
    run_experiment(load_experiment(_config(tmp_path)))
    [feature_file] = (tmp_path / "cache").glob("*.h5")
    [folder] = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    assert folder.name == feature_file.stem and folder.name.startswith("npz_a_npz-mobilenet_v2-avg-")
    assert not list(folder.glob(".*.lock"))  # result locks go with their holders


def test_a_new_version_of_a_head_retrains_its_results_and_nothing_else(tmp_path, capsys,
                                                                        monkeypatch):
    import dataclasses

    from pipeline import heads

    run_experiment(load_experiment(_config(tmp_path, heads=("logreg", "mlp"))))
    stamps = {p.parent.name.split("-")[0]: p.stat().st_mtime_ns
              for p in (tmp_path / "results").glob("*/*/metrics.json")}
    capsys.readouterr()
    spec = heads.HEADS["mlp"]
    monkeypatch.setitem(heads.HEADS, "mlp", dataclasses.replace(spec, version=spec.version + 1))
    run_experiment(load_experiment(_config(tmp_path, heads=("logreg", "mlp"))))
    assert "logreg(C=1.0):cached, mlp(max_epochs=5):to train" in capsys.readouterr().out
    after = {p.parent.name.split("-")[0]: (p.stat().st_mtime_ns, json.loads(p.read_text()))
             for p in (tmp_path / "results").glob("*/*/metrics.json")}
    assert after["logreg"][0] == stamps["logreg"] and after["mlp"][0] != stamps["mlp"]
    assert after["mlp"][1]["head_version"] == spec.version + 1


def test_results_in_the_old_key_only_folders_are_moved_not_retrained(tmp_path):
    run_experiment(load_experiment(_config(tmp_path)))
    [folder] = [p for p in (tmp_path / "results").iterdir() if p.is_dir()]
    [result] = [p for p in folder.iterdir() if p.is_dir()]
    stamp = (result / "metrics.json").stat().st_mtime_ns
    legacy = tmp_path / "results" / folder.name.rsplit("-", 1)[1]
    (folder / "features-2d.png").unlink()  # (the report's, which came later)
    folder.rename(legacy)  # as written before folders had readable names
    [job] = experiments.plan(load_experiment(_config(tmp_path)))
    assert set(experiments._head_states(job, str(tmp_path / "results")).values()) == {"cached"}
    status, out = train_one(job.path, "logreg", {"C": 1.0}, results_dir=tmp_path / "results")
    assert status == "up-to-date" and out == folder / result.name
    assert (out / "metrics.json").stat().st_mtime_ns == stamp and not legacy.exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("line, message", [
    ("limit = 0", "limit = 0: must be a positive number"),
    ("batch_size = -4", "batch_size = -4: must be a positive number"),
])
def test_experiment_numbers_must_be_positive(tmp_path, line, message):
    path = Path(_config(tmp_path))
    path.write_text(line + "\n" + path.read_text().replace("batch_size = 12\n", ""))
    with pytest.raises(PipelineError, match=message):
        load_experiment(str(path))


@pytest.mark.bad_input
def test_experiment_head_params_are_checked_when_the_file_is_read(tmp_path):
    path = Path(_config(tmp_path))
    path.write_text(path.read_text().replace("params = { C = 1.0 }", "params = { C = -2.0 }"))
    with pytest.raises(PipelineError, match=r"exp.toml: \[\[heads\]\] head 'logreg': C=-2.0 must be > 0"):
        load_experiment(str(path))


def test_head_fits_report_the_sweep_as_it_goes(tmp_path, blobs_file, caplog):
    with caplog.at_level("INFO", logger="pipeline"):
        train_one(blobs_file, "logreg", {}, results_dir=tmp_path / "results")
    sweep = [m for m in caplog.messages if "sweep:" in m]
    assert len(sweep) >= 2 and "best so far {'C':" in sweep[-1] and "validation" in sweep[-1]
    assert any(m.strip().startswith("refit {'C':") for m in caplog.messages)


def test_a_result_is_stale_on_new_parameters_or_features_and_force_retrains(tmp_path, blobs_file):
    from conftest import write_feature_file

    results = tmp_path / "results"
    assert train_one(blobs_file, "logreg", {"C": 1.0}, results_dir=results)[0] == "trained"
    assert train_one(blobs_file, "logreg", {"C": 1.0}, results_dir=results)[0] == "up-to-date"
    assert train_one(blobs_file, "logreg", {"C": 1.0}, results_dir=results, force=True)[0] == "trained"
    assert train_one(blobs_file, "logreg", {"C": 0.5}, results_dir=results)[0] == "trained"
    with FeatureFile(blobs_file) as ff:  # the same key, other rows: a new checksum
        parts, X, y = ff.attrs["key_parts"], ff.features("train")[()], ff.labels("train")
        X_test, y_test = ff.features("test")[()], ff.labels("test")
    blobs_file.unlink()
    again = write_feature_file(blobs_file.parent, X + 1.0, y, X_test, y_test, parts=parts)
    assert again == blobs_file
    status, out = train_one(blobs_file, "logreg", {"C": 1.0}, results_dir=results)
    assert status == "trained"
    metrics = json.loads((out / "metrics.json").read_text())
    for field in ("test_accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix",
                  "predict_ms_per_image", "best_params", "sweep", "validation_accuracy",
                  "fit_seconds", "n_train", "n_test", "features_key", "features_checksum",
                  "features", "versions", "converged", "params"):
        assert field in metrics, field
    assert metrics["params"] == {"C": 1.0} and metrics["n_train"] == 600 and metrics["n_test"] == 300
    assert len(metrics["confusion_matrix"]) == 3 and sum(map(sum, metrics["confusion_matrix"])) == 300


def test_adding_a_backbone_extracts_only_its_features(tmp_path, caplog):
    path = Path(_config(tmp_path))
    run_experiment(load_experiment(str(path)), stage="features")
    before = _mtimes(tmp_path / "cache")
    path.write_text(path.read_text().replace(
        "[[features]]", '[[backbones]]\nname = "mobilenet"\nalpha = 0.25\nweights = "none"\n'
        "image_size = 32\n[[features]]", 1))
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        run_experiment(load_experiment(str(path)), stage="features")
    steps = [m for m in caplog.messages if m.startswith("[")]
    assert steps == ["[1/1] extract a / mobilenet@0.25 / avg@32px"]
    after = _mtimes(tmp_path / "cache")
    assert {p: t for p, t in after.items() if p in before} == before  # nothing rewritten
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 2


@pytest.mark.bad_input
def test_train_refuses_a_feature_file_that_is_not_trustworthy(tmp_path, blobs_file):
    import h5py

    with h5py.File(blobs_file, "r+") as f:
        f.attrs["complete"] = False  # e.g. written by a tool that stopped half way
    with pytest.raises(PipelineError, match="cannot be used: not marked complete"):
        train_one(blobs_file, "logreg", {}, results_dir=tmp_path / "results")
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("*.json"))


def _fusion_config(tmp_path, extra=""):
    path = Path(_config(tmp_path))
    text = path.read_text().replace('[[features]]\nmode = "avg"\n', "[[features]]\nmode = \"avg\"\n"
                                    "[[features]]\nmode = \"max\"\n")
    text += ('[[fusions]]\nfeatures = ["mobilenet_v2/avg", "mobilenet_v2/max"]\n'
             'heads = ["logreg"]\n' + extra)
    path.write_text(text)
    return str(path)


def _fusion_metrics(tmp_path):
    [path] = (tmp_path / "results").glob("*-fusion-2files-*/logreg*/metrics.json")
    return path, json.loads(path.read_text())


def test_a_fusion_trains_on_two_cached_files_side_by_side_and_records_both(tmp_path, capsys):
    import joblib

    run_experiment(load_experiment(_fusion_config(tmp_path)))
    files = sorted((tmp_path / "cache").glob("*.h5"))
    assert len(files) == 2  # the fusion extracted nothing of its own
    metrics_path, m = _fusion_metrics(tmp_path)
    by_mode = {}
    for f in files:
        with FeatureFile(f) as ff:
            by_mode[ff.attrs["key_parts"]["mode"]] = (ff.key, ff.checksum(), ff.features("test")[()],
                                                      ff.labels("test"))
    avg, mx = by_mode["avg"], by_mode["max"]
    assert [(r["key"], r["checksum"]) for r in m["features_files"]] == [avg[:2], mx[:2]]
    assert m["features"]["width"] == 2 * 1280 and [f["mode"] for f in m["features"]["fused"]] == [
        "avg", "max"]
    # The saved model takes [avg | max] rows: its accuracy on them is the one reported.
    model = joblib.load(metrics_path.parent / "model.joblib")
    accuracy = float((model.predict(np.hstack([avg[2], mx[2]])) == avg[3]).mean())
    assert accuracy == m["test_accuracy"]
    capsys.readouterr()
    run_experiment(load_experiment(_fusion_config(tmp_path)))
    out = capsys.readouterr().out
    fusion = "fusion: mobilenet_v2@0.35 / avg@32px + mobilenet_v2@0.35 / max@32px  heads: "
    assert fusion + "logreg(C=1.0):cached" in out
    assert "nothing to do" in out


def test_a_fusion_goes_stale_when_one_of_its_files_changes(tmp_path, capsys, caplog):
    import hashlib

    import h5py

    run_experiment(load_experiment(_fusion_config(tmp_path)))
    _, before = _fusion_metrics(tmp_path)
    [max_file] = [f for f in (tmp_path / "cache").glob("*.h5") if "-max-" in f.name]
    with h5py.File(max_file, "r+") as f:  # as if re-extracted to different numbers
        dset = f["train/features"]
        dset[...] = dset[()] * 2
        dset.attrs["sha256"] = hashlib.sha256(np.ascontiguousarray(dset[()]).tobytes()).hexdigest()
    assert check_file(max_file, full=True) is None
    capsys.readouterr()
    with caplog.at_level("INFO", logger="pipeline"):
        run_experiment(load_experiment(_fusion_config(tmp_path)))
    out = capsys.readouterr().out
    assert "/ max@32px  heads: logreg:cached" not in out and "/ avg@32px  heads: logreg(C=1.0):cached" in out
    assert "fusion: mobilenet_v2@0.35 / avg@32px + mobilenet_v2@0.35 / max@32px  heads: " \
           "logreg(C=1.0):to train" in out
    steps = [m for m in caplog.messages if m.startswith("[")]
    assert len(steps) == 2 and "fusion" in steps[1]  # the max file's own head, then the fusion
    _, after = _fusion_metrics(tmp_path)
    assert after["features_checksum"] != before["features_checksum"]


@pytest.mark.bad_input
@pytest.mark.parametrize("fusion, message", [
    ('[[fusions]]\nfeatures = ["mobilenet_v2/avg"]\n', "must name at least two feature files"),
    ('[[fusions]]\nfeatures = ["mobilenet_v2/avg", "resnet50/avg"]\n',
     "'resnet50/avg' names no single feature file"),
    ('[[fusions]]\nfeatures = ["mobilenet_v2/avg", "mobilenet_v2/bottleneck"]\n',
     "'mobilenet_v2/bottleneck' names no single feature file"),
    ('[[fusions]]\nfeatures = ["mobilenet_v2/avg", "mobilenet_v2/max"]\nfiles = 2\n',
     "unknown key(s) files"),
])
def test_a_fusion_naming_what_the_grid_lacks_is_one_line(tmp_path, fusion, message):
    path = Path(_fusion_config(tmp_path))
    text = path.read_text()
    path.write_text(text[:text.index("[[fusions]]")] + fusion)
    with pytest.raises(PipelineError, match=re.escape(message)):
        load_experiment(str(path))


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "experiments").glob("*.toml")))
def test_every_shipped_experiment_file_loads(name):
    exp = load_experiment(str(REPO / "experiments" / name))
    assert exp.datasets and exp.backbones and exp.features and exp.heads


def test_an_empty_heads_list_means_no_heads_on_that_entry_and_fusions_still_run(tmp_path, capsys):
    path = Path(_fusion_config(tmp_path))
    path.write_text(path.read_text().replace('mode = "max"\n', 'mode = "max"\nheads = []\n'))
    run_experiment(load_experiment(str(path)))
    out = capsys.readouterr().out
    assert "/ max@32px  heads: -" in out and "/ avg@32px  heads: logreg(C=1.0)" in out
    assert len(list((tmp_path / "results").glob("*/logreg*/metrics.json"))) == 2  # avg, fusion


@pytest.mark.slow  # ImageNet weights in KERAS_HOME (../shared/keras)
def test_a_dry_run_says_which_backbones_would_download_their_weights(tmp_path, capsys):
    config = Path(_config(tmp_path))
    text = config.read_text().replace('weights = "none"\n', "")  # ImageNet weights
    text = text.replace("[[features]]", '[[backbones]]\nname = "resnet50"\nimage_size = 32\n[[features]]')
    config.write_text(text)
    run_experiment(load_experiment(str(config)), dry_run=True)
    out = capsys.readouterr().out.splitlines()
    [mobilenet] = [line for line in out if "mobilenet_v2" in line]
    [resnet] = [line for line in out if "resnet50" in line]
    assert "ImageNet weights" not in mobilenet  # in KERAS_HOME
    assert "(ImageNet weights: would download resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in resnet
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".npz", ".toml")] == []




def test_threads_in_an_experiment_file_caps_its_heads_and_a_bad_value_names_the_file(tmp_path):
    path = Path(_config(tmp_path))
    path.write_text("threads = 1\n" + path.read_text())
    exp = load_experiment(str(path))
    assert exp.threads == 1
    run_experiment(exp)
    [metrics] = (tmp_path / "results").glob("*/logreg*/metrics.json")
    assert json.loads(metrics.read_text())["threads"] == 1
    path.write_text(path.read_text().replace("threads = 1", "threads = 0"))
    with pytest.raises(PipelineError, match=r"exp.toml: top level threads = 0: this machine gives "
                                            r"us \d+ core\(s\); use a whole number from 1 to \d+"):
        load_experiment(str(path))


def test_a_learning_curve_in_an_experiment_trains_its_points_once(tmp_path, capsys):
    path = _config(tmp_path)
    text = Path(path).read_text() + '[[heads]]\nname = "knn"\nshots = [2, 4, "all"]\ntries = 2\n'
    Path(path).write_text(text)
    run_experiment(load_experiment(path))
    results = tmp_path / "results" / exp_key(tmp_path)
    points = sorted(p.parent.name for p in (results / "curves" / "knn").glob("*/metrics.json"))
    assert points == ["2-shot-0", "2-shot-1", "4-shot-0", "4-shot-1"]
    assert (results / "knn" / "metrics.json").exists()  # "all": the head's full-data result
    assert (tmp_path / "results" / "curves.csv").exists()
    capsys.readouterr()
    run_experiment(load_experiment(path))
    assert "nothing to do: everything is up to date" in capsys.readouterr().out


@pytest.mark.bad_input
@pytest.mark.parametrize("entry, message", [
    ('shots = [0, 5]', "shots 0"), ('shots = "5"', "shots = '5': should be list"),
    ('tries = 3', "tries goes with shots"), ('shots = [5]\ntries = 0', "tries 0"),
])
def test_bad_learning_curve_entries_are_named(tmp_path, entry, message):
    path = _config(tmp_path)
    Path(path).write_text(Path(path).read_text() + f'[[heads]]\nname = "knn"\n{entry}\n')
    with pytest.raises(PipelineError, match=message):
        load_experiment(path)
