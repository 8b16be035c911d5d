"""Two runs of experiments/best-offline.toml side by side: test accuracy of each, and how many
test images the two fitted heads label differently (each model predicts on its own run's
features). Run: PYTHONPATH=. python docs/results/best/agreement.py RESULTS_A CACHE_A RESULTS_B CACHE_B
"""
import json
import sys
from pathlib import Path

import joblib
import numpy as np

from pipeline.heads import load_fused_features
from pipeline.store import FeatureFile


def predictions(results: Path, cache: Path, result: str) -> tuple[np.ndarray, np.ndarray, dict]:
    metrics = json.loads((results / result / "metrics.json").read_text())
    files = [FeatureFile(cache / Path(f["path"]).name) for f in metrics["features_files"]]
    data = load_fused_features(files, "rbf_svm")
    return joblib.load(results / result / "model.joblib").predict(data.X_test), data.y_test, metrics


ra, ca, rb, cb = map(Path, sys.argv[1:5])
for result in sorted(p.parent.relative_to(ra).as_posix() for p in ra.glob("*fusion*/*/metrics.json")):
    pa, y, ma = predictions(ra, ca, result)
    pb, yb, mb = predictions(rb, cb, result)
    assert (y == yb).all()
    print(f"{result}: A {100 * ma['test_accuracy']:.2f}% ({ma['best_params']}), "
          f"B {100 * mb['test_accuracy']:.2f}% ({mb['best_params']}), "
          f"{int((pa != pb).sum())} of {len(y)} test images labelled differently", flush=True)
