"""Head fit cost and accuracy on one cached feature file, and the logistic-regression
sweep on 50,000 x 1,280 synthetic features. ``make bench-heads``; JSON beside this script."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from common import HERE, commit, machine, parser, run, write

from pipeline.errors import PipelineError


def bench_heads(out: str | None = None, features: str | None = None,
                heads: tuple[str, ...] = ("logreg", "linear_svm", "rbf_svm", "mlp", "sgd_linear"),
                min_rows: int = 20_000) -> dict:
    """Fit seconds and accuracy per head on ``min_rows`` stratified training rows of one
    feature file, plus the logistic-regression sweep on 50,000 x 1,280 synthetic features."""
    from sklearn.datasets import make_classification

    from pipeline.datasets import stratified_subset
    from pipeline.heads import evaluate, load_features, make_head
    from pipeline.store import DEFAULT_CACHE_DIR, FeatureFile, FeatureStore

    if features is None:
        candidates = []
        for path in FeatureStore().complete_files():
            with FeatureFile(path) as ff:
                if ff.features("train").shape[0] >= min_rows:
                    candidates.append(path)
        if not candidates:
            raise PipelineError(f"no feature file with {min_rows:,}+ training rows in {DEFAULT_CACHE_DIR}/; "
                                "extract one (e.g. make features CONFIG=experiments/offline.toml) "
                                "or pass --features FILE")
        features = str(min(candidates, key=lambda p: p.stat().st_size))
    report = {"what": "head fit cost", "features": features, "machine": machine(None),
              "commit": commit(), "runs": []}
    with FeatureFile(features) as ff:
        for head in heads:
            data = load_features(ff, head)
            if head != "sgd_linear":  # the streaming head reads the whole file from disk
                keep = stratified_subset(data.y_train, min_rows)
                data.X_train, data.y_train = data.X_train[keep], data.y_train[keep]
            model, note = make_head(head, n_train=len(data.y_train))
            t0 = time.perf_counter()
            model.fit(data.X_train, data.y_train)
            fit = time.perf_counter() - t0
            m = evaluate(model, data.X_test, data.y_test, data.classes)
            row = {"head": head, "note": note, "n_train": len(data.y_train),
                   "width": int(np.prod(data.X_train.shape[1:])), "fit_seconds": fit,
                   "fits_in_sweep": len(getattr(model, "sweep_", [])) + 1,
                   "test_accuracy": m["test_accuracy"], "best_params": model.best_params_}
            print(f"bench heads: {head}: {fit:.1f} s, {100 * m['test_accuracy']:.2f}%", flush=True)
            report["runs"].append(json.loads(json.dumps(row, default=float)))
    X, y = make_classification(55_000, n_features=1280, n_informative=200, n_classes=10,
                               random_state=0)
    X = X.astype(np.float32)
    model, _ = make_head("logreg")
    t0 = time.perf_counter()
    model.fit(X[:50_000], y[:50_000])
    fit = time.perf_counter() - t0
    report["logreg_sweep_50000x1280"] = {
        "fit_seconds": fit, "fits": len(model.sweep_) + 1, "best_params": model.best_params_,
        "test_accuracy": float(model.score(X[50_000:], y[50_000:])),
        "data": "make_classification(55,000 x 1,280, 200 informative, 10 classes), 50,000 train"}
    print(f"bench heads: logreg sweep on 50,000 x 1,280: {fit:.1f} s", flush=True)
    write(report, out or HERE / "heads.json")
    return report



def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--features", default=None,
                   help="a feature file (default: the smallest in features_cache/ with 20,000+ rows)")
    args = p.parse_args(argv)
    return run(bench_heads, out=args.out, features=args.features)


if __name__ == "__main__":
    sys.exit(main())
