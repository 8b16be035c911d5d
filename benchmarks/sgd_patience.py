"""Does sgd_linear choose the same with less patience? Its whole fit (the lockstep sweep over
its alphas on 20,000 rows, then the refit on every row) with patience 5 (before), 3 and 2,
on cached feature files (MobileNet 0.25 avg CIFAR-10 and Fashion-MNIST, MobileNetV2 0.35 avg
CIFAR-10), one thread as in a lane of ``run_heads``. Run from the repo root:
python benchmarks/sgd_patience.py FILE ... >> benchmarks/sgd_patience.txt
"""
import json
import sys

from common import fit_and_score

from pipeline.store import FeatureFile

for path in sys.argv[1:]:
    with FeatureFile(path) as ff:
        X, y = ff.features("train"), ff.labels("train")
        Xt, yt = ff.features("test")[()], ff.labels("test")
        for patience in (5, 3, 2):
            m, scores = fit_and_score("sgd_linear", {"patience": patience, "n_jobs": 1},
                                      X, y, Xt, yt, threads=1)
            print(json.dumps({"file": path.rsplit("/", 1)[-1], "patience": patience,
                              "best": scores["best"], "val": scores["val"],
                              "best_alpha_epochs_run": len(m.history_),
                              "fit_s": scores["fit_s"], "test": scores["test"]}), flush=True)
