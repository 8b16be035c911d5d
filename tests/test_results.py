import json

import pytest

from pipeline import results


def _metrics(checksum="abc", params=None, accuracy=0.5):
    return {"features_checksum": checksum, "params": params or {}, "test_accuracy": accuracy}


def test_a_result_is_current_only_for_the_same_features_and_params(tmp_path):
    out = results.result_dir(tmp_path, {"dataset": "d", "backbone": "b", "mode": "avg"}, "logreg",
                             {"C": 1.0})
    assert out.parent.name.startswith("d-b-avg-") and out.name.startswith("logreg-")
    with results.writing(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(_metrics(params={"C": 1.0})))
    assert results.is_current(out, "abc", {"C": 1.0})
    assert not results.is_current(out, "abd", {"C": 1.0})  # features re-extracted
    assert not results.is_current(out, "abc", {"C": 2.0})  # other parameters
    assert not results.is_current(tmp_path / "nowhere", "abc", {})


def test_a_failed_write_leaves_the_old_result_and_no_half_folder(tmp_path):
    out = tmp_path / "feats" / "logreg"
    with results.writing(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(_metrics(accuracy=0.7)))
    with pytest.raises(KeyboardInterrupt), results.writing(out) as tmp:
        (tmp / "metrics.json").write_text("{half")
        raise KeyboardInterrupt
    assert [m["test_accuracy"] for m in results.collect(tmp_path)] == [0.7]
    assert [p.name for p in out.parent.iterdir()] == ["logreg"]


def test_a_current_result_at_its_legacy_place_moves_under_its_readable_name(tmp_path):
    legacy = results.legacy_result_dir(tmp_path, "0123456789abcdef", "mlp", {})
    legacy.mkdir(parents=True)
    (legacy / "metrics.json").write_text(json.dumps(_metrics()))
    out = results.result_dir(tmp_path, {"dataset": "d", "backbone": "b", "mode": "avg"}, "mlp", {})
    with results.locked(out, legacy, "abc", {}):
        assert results.is_current(out, "abc", {})
    assert not legacy.parent.exists()


def _killed_writer_leftovers(out):
    """What ``writing`` leaves when killed after filling its folder (.tmp) or after moving the
    old result aside (.old), by a process of another host too (the pid means nothing here)."""
    left = [out.with_name(f".{out.name}.tmp-4242"), out.with_name(f".{out.name}.old-4243")]
    for folder, accuracy in zip(left, (0.1, 0.2)):
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(_metrics(accuracy=accuracy)))
    return left


def test_reports_never_read_what_a_killed_writer_left(tmp_path):
    out = tmp_path / "feats" / "logreg"
    with results.writing(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(_metrics(accuracy=0.7)))
    _killed_writer_leftovers(out)
    _killed_writer_leftovers(tmp_path / ".feats.tmp-1" / "mlp")
    assert [m["test_accuracy"] for m in results.collect(tmp_path)] == [0.7]


@pytest.mark.parametrize("rewritten", [True, False])
def test_the_next_look_at_a_result_removes_what_a_killed_writer_left(tmp_path, rewritten):
    out, other = tmp_path / "feats" / "logreg", tmp_path / "feats" / "logreg-0123abcd"
    left, kept = _killed_writer_leftovers(out), _killed_writer_leftovers(other)
    with results.locked(out):  # as train_one holds it: to retrain, or to find it up to date
        if rewritten:
            with results.writing(out) as tmp:
                (tmp / "metrics.json").write_text(json.dumps(_metrics(accuracy=0.7)))
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)  # another result's: its own next run removes them
    assert (out / "metrics.json").exists() == rewritten
