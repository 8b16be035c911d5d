"""Which files to fuse for the exact RBF SVC on CIFAR-10, chosen on validation only: 10,000
training rows fit, 10,000 other training rows score (a seeded draw; test never read), C in
3, 10, 30. Each argument is a comma-separated list of cached feature files, fused.

Run (fsets.txt: the runs in this order):
    PYTHONPATH=. python docs/results/best/fsets.py L6,V2 L6,V2L V2L V2
with L6 = MobileNet 0.25 six layers + flip (folder_cifar10-mobilenet-avg-0f85e693f7e0e9ee.h5),
V2 = MobileNetV2 0.35 last map + flip (folder_cifar10-mobilenet_v2-avg-3dd9e9d31ac500ef.h5),
V2L = MobileNetV2 0.35, six layers (block_3/6/10/13/16_expand_relu, out_relu) + flip
(folder_cifar10-mobilenet_v2-avg-b7efebb3575f5134.h5).
"""
import sys, time, numpy as np
from pipeline.store import FeatureFile
from pipeline.heads import load_fused_features
from sklearn.preprocessing import StandardScaler
from sklearnex.svm import SVC
for spec in sys.argv[1:]:
    ffs = [FeatureFile(f) for f in spec.split(",")]
    fs = load_fused_features(ffs, "rbf_svm")
    X, y = fs.X_train, fs.y_train
    idx = np.random.default_rng(0).permutation(len(y)); tr, va = idx[:10000], idx[10000:20000]
    sc = StandardScaler().fit(X[tr]); A, B = sc.transform(X[tr]), sc.transform(X[va])
    for C in (3, 10, 30):
        t = time.time(); m = SVC(C=C, gamma="scale", cache_size=1000).fit(A, y[tr])
        print(f"{spec[-40:]} width {X.shape[1]} C={C} val {100*(m.predict(B)==y[va]).mean():.2f} {time.time()-t:.0f}s", flush=True)
