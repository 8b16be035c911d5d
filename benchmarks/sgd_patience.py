"""Does sgd_linear choose the same with less patience? Its whole fit (the lockstep sweep over
its alphas on 20,000 rows, then the refit on every row) with patience 5 (before), 3 and 2,
on cached feature files (MobileNet 0.25 avg CIFAR-10 and Fashion-MNIST, MobileNetV2 0.35 avg
CIFAR-10), one thread as in a lane of ``run_heads``. Run from the repo root:
python benchmarks/sgd_patience.py FILE ... >> benchmarks/sgd_patience.txt
"""
import json
import sys
import time

from threadpoolctl import threadpool_limits

from pipeline.heads import make_head
from pipeline.store import FeatureFile

for path in sys.argv[1:]:
    with FeatureFile(path) as ff:
        X, y = ff.features("train"), ff.labels("train")
        Xt, yt = ff.features("test")[()], ff.labels("test")
        for patience in (5, 3, 2):
            m = make_head("sgd_linear", {"patience": patience, "n_jobs": 1})
            t = time.perf_counter()
            with threadpool_limits(1):
                m.fit(X, y)
            f = time.perf_counter() - t
            test = float((m.predict(Xt) == yt).mean())
            print(json.dumps({"file": path.rsplit("/", 1)[-1], "patience": patience,
                              "best": m.best_params_, "val": round(m.validation_score_, 4),
                              "best_alpha_epochs_run": len(m.history_),
                              "fit_s": round(f, 1), "test": round(test, 4)}), flush=True)
