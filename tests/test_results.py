import json

import pytest

from pipeline import results

VERSIONS = {"logreg": 1, "mlp": 1, "rbf_svm": 1, "rbf_svm_approx": 1}


def _metrics(checksum="abc", params=None, accuracy=0.5, head="logreg", head_ran="", version=1
             ) -> results.ResultRecord:
    return results.ResultRecord(head=head, params=params or {}, test_accuracy=accuracy,
                                macro_f1=accuracy, fit_seconds=1.0, predict_ms_per_image=0.1,
                                features={"dataset": "d"}, features_checksum=checksum,
                                head_ran=head_ran, head_version=version)


def test_a_result_is_current_only_for_the_same_features_params_and_head_version(tmp_path):
    out = results.result_dir(tmp_path, {"dataset": "d", "backbone": "b", "mode": "avg"}, "logreg",
                             {"C": 1.0})
    assert out.parent.name.startswith("d-b-avg-") and out.name.startswith("logreg-")
    with results.writing(out) as tmp:
        _metrics(params={"C": 1.0}).save(tmp)
    assert results.is_current(out, "abc", {"C": 1.0}, VERSIONS)
    assert not results.is_current(out, "abd", {"C": 1.0}, VERSIONS)  # features re-extracted
    assert not results.is_current(out, "abc", {"C": 2.0}, VERSIONS)  # other parameters
    assert not results.is_current(out, "abc", {"C": 1.0}, {**VERSIONS, "logreg": 2})  # head changed
    assert not results.is_current(tmp_path / "nowhere", "abc", {}, VERSIONS)


def test_a_result_made_before_head_versions_is_not_current(tmp_path):
    _metrics(version=None).save(tmp_path)
    assert not results.is_current(tmp_path, "abc", {}, VERSIONS)
    assert not results.is_current(tmp_path, "abc", {}, {})  # nor for a head no longer known
    assert results.ResultRecord.load(tmp_path).stale_because("abc", {}, VERSIONS) == \
        "it was made before logreg's version was recorded"


def test_the_version_that_counts_is_that_of_the_head_that_ran(tmp_path):
    """rbf_svm above its row limit runs as rbf_svm_approx: a new approximation retrains it."""
    _metrics(head="rbf_svm", head_ran="rbf_svm_approx").save(tmp_path)
    assert results.is_current(tmp_path, "abc", {}, VERSIONS)
    assert not results.is_current(tmp_path, "abc", {}, {**VERSIONS, "rbf_svm_approx": 2})
    assert results.is_current(tmp_path, "abc", {}, {**VERSIONS, "rbf_svm": 2})


def test_a_failed_write_leaves_the_old_result_and_no_half_folder(tmp_path):
    out = tmp_path / "feats" / "logreg"
    with results.writing(out) as tmp:
        _metrics(accuracy=0.7).save(tmp)
    with pytest.raises(KeyboardInterrupt), results.writing(out) as tmp:
        (tmp / "metrics.json").write_text("{half")
        raise KeyboardInterrupt
    assert [m.test_accuracy for m in results.collect(tmp_path)] == [0.7]
    assert [p.name for p in out.parent.iterdir()] == ["logreg"]


def test_a_current_result_at_its_legacy_place_moves_under_its_readable_name(tmp_path):
    legacy = results.legacy_result_dir(tmp_path, "0123456789abcdef", "mlp", {})
    legacy.mkdir(parents=True)
    _metrics().save(legacy)
    out = results.result_dir(tmp_path, {"dataset": "d", "backbone": "b", "mode": "avg"}, "mlp", {})
    with results.locked(out, legacy, "abc", {}, VERSIONS):
        assert results.is_current(out, "abc", {}, VERSIONS)
    assert not legacy.parent.exists()


def _killed_writer_leftovers(out):
    """What ``writing`` leaves when killed after filling its folder (.tmp) or after moving the
    old result aside (.old), by a process of another host too (the pid means nothing here)."""
    left = [out.with_name(f".{out.name}.tmp-4242"), out.with_name(f".{out.name}.old-4243")]
    for folder, accuracy in zip(left, (0.1, 0.2)):
        folder.mkdir(parents=True)
        _metrics(accuracy=accuracy).save(folder)
    return left


def test_reports_never_read_what_a_killed_writer_left(tmp_path):
    out = tmp_path / "feats" / "logreg"
    with results.writing(out) as tmp:
        _metrics(accuracy=0.7).save(tmp)
    _killed_writer_leftovers(out)
    _killed_writer_leftovers(tmp_path / ".feats.tmp-1" / "mlp")
    assert [m.test_accuracy for m in results.collect(tmp_path)] == [0.7]


@pytest.mark.parametrize("rewritten", [True, False])
def test_the_next_look_at_a_result_removes_what_a_killed_writer_left(tmp_path, rewritten):
    out, other = tmp_path / "feats" / "logreg", tmp_path / "feats" / "logreg-0123abcd"
    left, kept = _killed_writer_leftovers(out), _killed_writer_leftovers(other)
    with results.locked(out):  # as train_one holds it: to retrain, or to find it up to date
        if rewritten:
            with results.writing(out) as tmp:
                _metrics(accuracy=0.7).save(tmp)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)  # another result's: its own next run removes them
    assert (out / "metrics.json").exists() == rewritten


def test_a_result_record_reads_what_older_and_newer_releases_wrote(tmp_path):
    from pipeline.results import ResultRecord

    record = ResultRecord(head="logreg", params={"C": 1.0}, test_accuracy=0.9, macro_f1=0.89,
                          fit_seconds=2.0, predict_ms_per_image=0.1,
                          features={"dataset": "d", "backbone": "b", "mode": "avg"},
                          features_checksum="abc", features_key="k1", head_version=1)
    record.save(tmp_path)
    assert ResultRecord.load(tmp_path) == record
    older = {k: v for k, v in json.loads((tmp_path / "metrics.json").read_text()).items()
             if k not in ("validation", "head_ran", "created")}  # fields an older release lacked
    newer = {**older, "calibration_error": 0.05}  # a field a newer release adds
    (tmp_path / "metrics.json").write_text(json.dumps(newer))
    loaded = ResultRecord.load(tmp_path)
    assert loaded.label == "logreg(C=1.0)" and loaded.extra == {"calibration_error": 0.05}
    assert loaded.is_current("abc", {"C": 1.0}, {"logreg": 1})
    assert not loaded.is_current("abd", {"C": 1.0}, {"logreg": 1})
    loaded.save(tmp_path)  # what it does not know, it writes back
    assert json.loads((tmp_path / "metrics.json").read_text())["calibration_error"] == 0.05
    (tmp_path / "metrics.json").write_text(json.dumps({"head": "logreg"}))
    with pytest.raises(ValueError, match="incomplete result record"):
        ResultRecord.load(tmp_path)
