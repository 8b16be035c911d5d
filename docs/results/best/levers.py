"""Levers for the exact RBF SVC on CIFAR-10's fused files (six layers + flip, V2 0.35 flip),
chosen on validation only: 10,000 training rows fit, 5,000 other training rows score (a seeded
draw; the test split is never read). Gamma scale x 0.5/1/2, signed square root, L2 norms.

Run (the two cached files of experiments/best-offline.toml's CIFAR-10 fusion):
    PYTHONPATH=. python docs/results/best/levers.py <six-layers-flip.h5> <v2-avg-flip.h5>
Output: levers.txt (oneDAL's SVC: the intel extra).
"""
import sys, time, numpy as np
from pipeline.store import FeatureFile
from pipeline.heads import load_fused_features
from sklearn.preprocessing import StandardScaler
from sklearnex.svm import SVC
files = sys.argv[1:]
ffs = [FeatureFile(f) for f in files]
fs = load_fused_features(ffs, "rbf_svm")
X, y = fs.X_train, fs.y_train

idx = np.random.default_rng(0).permutation(len(y)); tr, va = idx[:10000], idx[10000:15000]
def run(name, Xt, C=10, gscale=1.0):
    sc = StandardScaler().fit(Xt[tr]); A, B = sc.transform(Xt[tr]), sc.transform(Xt[va])
    g = gscale / A.shape[1]
    t = time.time(); m = SVC(C=C, gamma=g, cache_size=1000).fit(A, y[tr])
    acc = (m.predict(B) == y[va]).mean()
    print(f"{name:30s} C={C:<5} g={gscale:<4} val {100*acc:.2f}  {time.time()-t:.0f}s", flush=True)
for gs in (1.0, 0.5, 2.0):
    run("plain", X, gscale=gs)
run("signed sqrt", np.sqrt(np.maximum(X, 0)))
Xl = X / np.linalg.norm(X, axis=1, keepdims=True)
run("l2 then std", Xl)
# per-file block normalisation: each file's block scaled to unit mean norm
w = np.cumsum([0] + [f.features("train").shape[1] for f in ffs])
Xb = np.concatenate([X[:, a:b] / np.linalg.norm(X[:, a:b], axis=1, keepdims=True) for a, b in zip(w[:-1], w[1:])], 1)
run("per-file l2", Xb)
run("sqrt + per-file l2", np.concatenate([np.sqrt(np.maximum(X[:, a:b],0)) / np.linalg.norm(np.sqrt(np.maximum(X[:, a:b],0)), axis=1, keepdims=True) for a, b in zip(w[:-1], w[1:])], 1))
