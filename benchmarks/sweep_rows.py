"""Does the validation sweep on 10,000 rows choose as well as on 20,000? (logreg, linear_svm;
rbf_svm on 10,000 against 5,000.) Each head fitted whole (sweep + refit) on the real cached
files, 2 threads; prints the chosen setting, validation and test accuracy, fit seconds.
Run from the repo root: python benchmarks/sweep_rows.py > benchmarks/sweep_rows.txt
"""
import json
import time

from threadpoolctl import threadpool_limits

from pipeline.heads import load_features, make_head
from pipeline.store import FeatureFile

files = {'cifar256': 'features_cache/folder_cifar10-mobilenet-avg-1690475b9cd9e656.h5',
         'fmnist256': 'features_cache/idx_fashion_mnist-mobilenet-avg-fa7db822e1dcd66b.h5'}
plan = [('logreg', 20000), ('logreg', 10000), ('linear_svm', 20000), ('linear_svm', 10000),
        ('rbf_svm', 10000), ('rbf_svm', 5000)]
for name, path in files.items():
    d = load_features(FeatureFile(path), 'logreg')
    for head, rows in plan:
        m = make_head(head, {'max_sweep_rows': rows}, n_train=len(d.y_train))
        m.set_params(n_jobs=2)
        t = time.perf_counter()
        with threadpool_limits(2):
            m.fit(d.X_train, d.y_train)
        fit = time.perf_counter() - t
        acc = m.score(d.X_test, d.y_test)
        print(json.dumps({'file': name, 'head': head, 'rows': rows, 'best': m.best_params_,
                          'val': m.validation_score_, 'fit_s': round(fit, 1), 'test': acc}), flush=True)
