"""Where the final refit of logreg and linear_svm starts: from zero ('cold', main before),
from the sweep's solution nearest to the chosen C x (all rows / sweep rows) ('scaled', what
logreg does now: ``SweepClassifier._refit_start``) or from the sweep's solution at the chosen
C itself ('same C'). One core each, as they train in ``run_heads``' lanes; interleaved rounds
on the real cached files. Prints, per file, head and variant: the whole fit's seconds, the
refit's iterations, test accuracy, and the share of test predictions equal to cold's.
Run from the repo root (logreg only on files wider than 256):
  python benchmarks/warm_refit.py FILE [FILE ...] > benchmarks/warm_refit.txt
"""
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.heads import SweepClassifier, make_head, solver_threads

nearest = SweepClassifier._refit_start
VARIANTS = {"cold": (False, None), "scaled": (True, None), "same C": (True, 1.0)}


def fit(X, y, Xt, yt, head: str, variant: str):
    from_sweep, ratio = VARIANTS[variant]
    SweepClassifier._refit_start = (nearest if ratio is None else
                                    lambda self, _: nearest(self, ratio))
    model = make_head(head, n_train=len(y)).set_params(refit_from_sweep=from_sweep)
    with solver_threads(1):
        t = time.perf_counter()
        model.fit(X, y)
        seconds = time.perf_counter() - t
    pred = model.predict(Xt)
    refit = model.model_.named_steps["clf"]
    return pred, {"fit_s": round(seconds, 2), "refit_iterations": int(np.max(refit.n_iter_)),
                  "C": model.best_params_["C"], "converged": model.converged_,
                  "test": float((pred == yt).mean())}


for rnd in (1, 2):
    for path in sys.argv[1:]:
        with h5py.File(path, "r") as f:
            X, y = f["train/features"][:], f["train/labels"][:]
            Xt, yt = f["test/features"][:], f["test/labels"][:]
        for head in ("logreg", "linear_svm") if X.shape[1] <= 256 else ("logreg",):
            order = list(VARIANTS) if rnd == 1 else list(VARIANTS)[::-1]
            preds, rows = {}, {}
            for variant in order:
                preds[variant], rows[variant] = fit(X, y, Xt, yt, head, variant)
            for variant in order:
                rows[variant]["equal_to_cold"] = float((preds[variant] == preds["cold"]).mean())
                print(json.dumps({"round": rnd, "file": Path(path).name, "head": head,
                                  "variant": variant, "train_rows": len(y), "width": X.shape[1],
                                  **rows[variant]}), flush=True)
