"""Two ways to a faster ``mlp`` that were measured and not taken (#26: "no slower than today's
on a quiet machine"). Run from the repo root:
python benchmarks/mlp_options.py threads FILE ... >> benchmarks/mlp_options.txt
python benchmarks/mlp_options.py patience FILE ... [--rows 100,300,...] >> benchmarks/mlp_options.txt

``threads``: the whole mlp fit on one BLAS thread (ours) and on two (the code before #26),
alternated, twice each: fit seconds, the epoch chosen, test accuracy, and whether the two
networks are the same. If they differ, choosing the threads from the machine's load at fit
time would make a result depend on that load.

``patience``: the validation history of one fit per seed (patience 10, ours), and for each
patience p < 10 whether stopping p epochs past the peak would have chosen the same epoch (the
history does not depend on the patience, only where it stops, so this is exact). On the whole
file (three seeds), then on seeded draws of its training rows (``--rows``, 4 each; by default
100 to 10,000, as learning curves and small datasets fit it).
"""
import argparse
import json
import time

import numpy as np

from pipeline.heads import EarlyStoppingMLP, load_features
from pipeline.store import FeatureFile


def chosen(history: list[float], patience: int) -> tuple[int, int]:
    """(best epoch, epochs run), both from 1, had the fit stopped ``patience`` epochs past
    its best validation score."""
    best, since = 0, 0
    for i in range(1, len(history)):
        if history[i] > history[best]:
            best, since = i, 0
        else:
            since += 1
            if since >= patience:
                return best + 1, i + 1
    return best + 1, len(history)


def threads(fs, name: str) -> None:
    first = {}
    for th in (1, 2, 1, 2):
        m = EarlyStoppingMLP(fit_threads=th, validation_rows=fs.validation_rows)
        t0 = time.perf_counter()
        m.fit(fs.X_train, fs.y_train)
        fit_s = time.perf_counter() - t0
        coefs = m.members_[0].named_steps["clf"].coefs_
        first.setdefault(th, coefs)
        print(json.dumps({"file": name, "fit_threads": th, "fit_s": round(fit_s, 2),
                          "epoch": m.best_params_["epochs"],
                          "test": round(100 * float(np.mean(m.predict(fs.X_test) == fs.y_test)), 2),
                          "same_network_as_one_thread": all(
                              np.array_equal(a, b) for a, b in zip(coefs, first[1]))}), flush=True)


def patience(fs, name: str, sizes: list[int], whole: bool = True) -> None:
    rng = np.random.default_rng(0)
    draws = [(None, seed) for seed in (0, 1, 2) if whole] + [
        (n, d) for n in sizes for d in range(4)]
    for rows, seed in draws:
        idx = np.arange(len(fs.y_train)) if rows is None else \
            rng.choice(len(fs.y_train) - fs.validation_rows, rows, replace=False)
        m = EarlyStoppingMLP(random_state=seed,
                             validation_rows=fs.validation_rows if rows is None else 0)
        m.fit(fs.X_train[idx], fs.y_train[idx])
        best = chosen(m.history_, 10)[0]
        print(json.dumps({"file": name, "rows": rows or "all", "seed": seed,
                          "epochs_run": len(m.history_), "best_epoch": best,
                          "same_choice_with_patience": [p for p in range(2, 10)
                                                        if chosen(m.history_, p)[0] == best],
                          "epochs_saved_with_5": len(m.history_) - chosen(m.history_, 5)[1]}),
              flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("threads", "patience"))
    p.add_argument("files", nargs="+")
    p.add_argument("--rows", help="draw sizes for patience (comma-separated; given: no whole-file fits)")
    args = p.parse_args()
    for path in args.files:
        with FeatureFile(path) as ff:
            fs = load_features(ff, "mlp")
        name = path.rsplit("/", 1)[-1]
        if args.what == "threads":
            threads(fs, name)
        else:
            patience(fs, name, [int(n) for n in args.rows.split(",")] if args.rows else
                     [100, 300, 1000, 3000, 10000], whole=not args.rows)
