import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True,
                          text=True, env=os.environ)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["extract", "--dataset", "imagenet22k"], "unknown dataset 'imagenet22k'"),
    (["extract", "--dataset", "folder:/no/such/dir"], "does not exist"),
    (["extract", "--dataset", "mnist", "--backbone", "alexnet"], "unknown backbone 'alexnet'"),
    (["extract", "--dataset", "mnist", "--pooling", "median"], "unknown feature mode 'median'"),
    (["train", "--head", "xgboost"], "unknown head 'xgboost'"),
    (["run", "--config", "/no/such.toml"], "experiment file '/no/such.toml' not found"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path, args, message):
    code, out, err = run_cli(*args, "--cache-dir", str(tmp_path / "c"))
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "c").exists()


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v2" in out and "MobileNetV2" in out and "efficientnet_b7" in out


def test_ls_inspect_and_verify_repair(tmp_path, blobs_file, capsys):
    cache = blobs_file.parent
    broken = cache / "broken-00000000000000aa.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    assert main(["ls", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "complete" in out and "corrupt" in out
    assert main(["inspect", str(blobs_file)]) == 0
    assert '"format": "pipeline.features"' in capsys.readouterr().out
    assert main(["verify", "--cache-dir", str(cache)]) == 1
    assert "BAD       broken" in capsys.readouterr().out
    assert main(["verify", "--repair", "--cache-dir", str(cache)]) == 0
    assert not broken.exists() and list((cache / ".quarantine").iterdir())
    assert main(["verify", "--cache-dir", str(cache)]) == 0


def test_train_then_compare_from_the_command_line(tmp_path, blobs_file, capsys):
    results = tmp_path / "results"
    assert main(["train", "--head", "logreg", "--param", "C=0.5", "--features", str(blobs_file),
                 "--results-dir", str(results)]) == 0
    [metrics] = list(results.glob("*/logreg-*/metrics.json"))
    assert (metrics.parent / "confusion.png").exists() and (metrics.parent / "model.joblib").exists()
    assert main(["compare", "--results-dir", str(results)]) == 0
    assert "logreg" in capsys.readouterr().out and (results / "compare.png").exists()
    assert main(["train", "--head", "logreg", "--param", "C", "--features", str(blobs_file)]) == 2


@pytest.mark.bad_input
def test_engine_ray_without_ray_installed_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    monkeypatch.delitem(sys.modules, "pipeline.engine", raising=False)
    code = main(["extract", "--dataset", "mnist", "--engine", "ray", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install '.[ray]'" in err[0]
    assert not any(tmp_path.iterdir())
