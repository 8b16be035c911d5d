"""sgd_linear on one core (as in ``run_heads``' lanes) fed from the HDF5 dataset block by
block ('streamed', what it did for every file) against from the features read once into
memory ('in memory', what it does where they fit), interleaved rounds on the real cached
files. Prints the fit seconds, test accuracy and whether the two models are identical.
Run from the repo root:
  python benchmarks/sgd_in_memory.py FILE [FILE ...] > benchmarks/sgd_in_memory.txt
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.heads import load_features, make_head, solver_threads
from pipeline.store import FeatureFile

for rnd in (1, 2):
    for path in sys.argv[1:]:
        with FeatureFile(Path(path)) as ff:
            fits = {}
            for variant in ("streamed", "in memory") if rnd == 1 else ("in memory", "streamed"):
                data = load_features(ff, "sgd_linear", memory_budget_gb=1e-6 if variant == "streamed"
                                     else None)
                with solver_threads(1):
                    t = time.perf_counter()
                    model = make_head("sgd_linear", n_train=len(data.y_train)).fit(data.X_train,
                                                                                   data.y_train)
                    seconds = time.perf_counter() - t
                fits[variant] = model
                print(json.dumps({"round": rnd, "file": Path(path).name, "variant": variant,
                                  "fit_s": round(seconds, 2),
                                  "test": float(model.score(data.X_test, data.y_test))}), flush=True)
            print(json.dumps({"round": rnd, "file": Path(path).name, "same model": bool(
                np.array_equal(fits["streamed"].model_.coef_, fits["in memory"].model_.coef_))}),
                flush=True)
