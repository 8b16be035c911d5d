"""Does sgd_linear choose as well sweeping on fewer rows? Its whole fit (sweep, then the refit
on every row) with max_sweep_rows = every row, 20,000 and 10,000, on the real cached CIFAR-10 and
Fashion-MNIST files (MobileNet 0.25 avg), 2 threads. Run from the repo root:
python benchmarks/sgd_sweep_rows.py > benchmarks/sgd_sweep_rows.txt
"""
import json

from common import fit_and_score

from pipeline.store import FeatureFile

FILES = ['features_cache/folder_cifar10-mobilenet-avg-1690475b9cd9e656.h5',
         'features_cache/idx_fashion_mnist-mobilenet-avg-fa7db822e1dcd66b.h5']
for path in FILES:
    with FeatureFile(path) as ff:
        X, y = ff.features('train'), ff.labels('train')
        Xt, yt = ff.features('test')[()], ff.labels('test')
        for rows in (45000 if 'cifar' in path else 60000, 20000, 10000):
            _, scores = fit_and_score('sgd_linear', {'max_sweep_rows': rows, 'n_jobs': 2},
                                      X, y, Xt, yt, threads=2)
            print(json.dumps({'file': path[15:40], 'rows': rows, **scores}), flush=True)
