"""The recipe's head chosen on validation only: exact RBF SVC (C = 10, the sweep's choice)
against the MLPs of the grid (100 units; 512 units, alpha 1e-3; and the 512-unit MLP averaged
over 3 seeds) on the same split of CIFAR-10's fused training rows: 10,000 rows fit (the MLPs
carve their early-stopping rows from these), 5,000 other training rows score (the draw of
levers.py; test never read).

Run: PYTHONPATH=. python docs/results/best/heads_on_validation.py <six-layers-flip.h5> <v2-avg-flip.h5>
Output: heads_on_validation.txt
"""
import sys
import time

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearnex.svm import SVC

from pipeline.heads import load_fused_features, make_head
from pipeline.store import FeatureFile

fs = load_fused_features([FeatureFile(f) for f in sys.argv[1:]], "rbf_svm")
X, y = fs.X_train, fs.y_train
idx = np.random.default_rng(0).permutation(len(y))
tr, va = idx[:10000], idx[10000:15000]
scaler = StandardScaler().fit(X[tr])
t = time.time()
svc = SVC(C=10, gamma="scale", cache_size=1000).fit(scaler.transform(X[tr]), y[tr])
acc = np.mean(svc.predict(scaler.transform(X[va])) == y[va])
print(f"rbf_svm C=10: validation {100 * acc:.2f}% ({time.time() - t:.0f} s)", flush=True)
for params in ({}, {"hidden": 512, "alpha": 1e-3}, {"hidden": 512, "alpha": 1e-3, "seeds": 3}):
    t = time.time()
    mlp = make_head("mlp", params).fit(X[tr], y[tr])
    acc = np.mean(mlp.predict(X[va]) == y[va])
    print(f"mlp {params}: validation {100 * acc:.2f}% ({time.time() - t:.0f} s)", flush=True)
