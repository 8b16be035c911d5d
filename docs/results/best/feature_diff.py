"""How far two runs' feature files are apart (e.g. ONNX Runtime against OpenVINO): per file,
the largest absolute difference and the largest relative to the file's largest value.
Run: PYTHONPATH=. python docs/results/best/feature_diff.py CACHE_A CACHE_B
"""
import sys
from pathlib import Path

import numpy as np

from pipeline.store import FeatureFile

a_dir, b_dir = map(Path, sys.argv[1:3])
for a in sorted(a_dir.glob("*.h5")):
    worst, scale = 0.0, 0.0
    with FeatureFile(a) as fa, FeatureFile(b_dir / a.name) as fb:
        for split in ("train", "test"):
            A, B = fa.features(split), fb.features(split)
            for lo in range(0, A.shape[0], 10_000):
                x, y = A[lo:lo + 10_000], B[lo:lo + 10_000]
                worst, scale = max(worst, float(np.abs(x - y).max())), max(scale, float(np.abs(x).max()))
    print(f"{a.name}: largest difference {worst:.3g} ({worst / scale:.2g} of the largest value {scale:.3g})")
