"""oneDAL's SVC fit on every Fashion-MNIST training row (60,000 x 256, MobileNet 0.25 ``avg``,
standardised, C = 3.16 as rbf_svm chooses), with TBB's allocator as it comes against inside
``heads.tbb_large_blocks_kept`` (freed blocks of over 64 MiB kept for the fit): wall, user and
system seconds, page faults, peak RSS. Each variant in a fresh process, alternated:
``python benchmarks/svc_page_faults.py FILE [ROUNDS]`` (results: svc_page_faults.txt)."""

import contextlib
import resource
import subprocess
import sys
import time


def fit(path: str, kept: bool) -> str:
    import numpy as np
    from sklearn.preprocessing import StandardScaler
    from sklearnex.svm import SVC

    from pipeline.heads import load_features, tbb_large_blocks_kept
    from pipeline.store import FeatureFile

    with FeatureFile(path) as ff:
        data = load_features(ff, "rbf_svm")
    X, y = StandardScaler().fit_transform(data.X_train).astype(np.float32), data.y_train
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with tbb_large_blocks_kept if kept else contextlib.nullcontext():
        model = SVC(kernel="rbf", C=10 ** 0.5, cache_size=1000).fit(X, y)
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    rss_after = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20
    return (f"{'kept' if kept else 'TBB default'}: fit {wall:.1f}s user "
            f"{after.ru_utime - before.ru_utime:.1f}s sys {after.ru_stime - before.ru_stime:.1f}s "
            f"page faults {after.ru_minflt - before.ru_minflt} peak RSS {after.ru_maxrss >> 10} MiB "
            f"RSS after {rss_after} MiB support vectors {model.support_.size}")


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        print(fit(sys.argv[2], sys.argv[3] == "kept"), flush=True)
    else:
        for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
            for variant in ("default", "kept"):
                subprocess.run([sys.executable, __file__, "--one", sys.argv[1], variant], check=True)
