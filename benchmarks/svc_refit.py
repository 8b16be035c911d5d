"""rbf_svm's refit alone: oneDAL's SVC on every Fashion-MNIST training row (60,000 x 256,
MobileNet 0.25 ``avg``, standardised) at the C the head chose (3.16), by dtype, kernel cache
and tolerance: is there time left in the head's largest fit? Each argument is
``DTYPE:CACHE_MB:TOL``; ``python benchmarks/svc_refit.py FILE float32:1000:0.001 ...``
(results: svc_refit.txt)."""

import sys
import time

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearnex.svm import SVC

from pipeline.heads import load_features
from pipeline.store import FeatureFile

with FeatureFile(sys.argv[1]) as ff:
    data = load_features(ff, "rbf_svm")
X, y, Xt, yt = data.X_train, data.y_train, data.X_test, data.y_test
scaler = StandardScaler().fit(X)
X, Xt = scaler.transform(X).astype(np.float32), scaler.transform(Xt).astype(np.float32)
for variant in sys.argv[2:]:
    dtype, cache, tol = variant.split(":")
    A, At = X.astype(dtype), Xt.astype(dtype)
    t = time.perf_counter()
    model = SVC(kernel="rbf", C=10 ** 0.5, cache_size=float(cache), tol=float(tol)).fit(A, y)
    fit = time.perf_counter() - t
    t = time.perf_counter()
    scores = model.decision_function(At)
    predict = time.perf_counter() - t
    accuracy = (model.classes_[scores.argmax(1)] == yt).mean()
    print(f"{variant}: fit {fit:.1f}s decision_function {predict:.1f}s test {accuracy:.4f} "
          f"support vectors {model.support_.size}", flush=True)
