"""Is sgd_linear's lowest alpha (1e-4, what Fashion-MNIST chooses) the edge of a slope its
grid cuts off? Its whole fit with ``StreamingLinear.ALPHAS`` as shipped and with 1e-5 and
3e-5 added below, one thread as in a lane of ``run_heads``: what it chooses, each alpha's
validation accuracy, test accuracy. Run from the repo root:
python benchmarks/sgd_alphas.py FILE ... >> benchmarks/sgd_alphas.txt
"""
import json
import sys

from common import fit_and_score

from pipeline.heads import StreamingLinear
from pipeline.store import FeatureFile

SHIPPED = StreamingLinear.ALPHAS
for path in sys.argv[1:]:
    with FeatureFile(path) as ff:
        X, y = ff.features("train"), ff.labels("train")
        Xt, yt = ff.features("test")[()], ff.labels("test")
        for alphas in (SHIPPED, (1e-5, 3e-5, *SHIPPED)):
            StreamingLinear.ALPHAS = alphas  # this process only
            m, scores = fit_and_score("sgd_linear", {"n_jobs": 1}, X, y, Xt, yt, threads=1)
            print(json.dumps({"file": path.rsplit("/", 1)[-1], "alphas": alphas, **scores,
                              "val_by_alpha": [(r["alpha"], round(r["val_accuracy"], 4))
                                               for r in m.sweep_]}), flush=True)
