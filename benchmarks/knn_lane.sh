#!/bin/bash
# six heads on F-MNIST, old (/tmp/wtb checkout, run from there) vs new (/work/main), interleaved
F=/tmp/hf/idx_fashion_mnist-mobilenet-avg-fa7db822e1dcd66b.h5
for order in "old new" "new old"; do
  for v in $order; do
    if [ $v = old ]; then cd /tmp/wtb; else cd /work/main; fi
    rm -rf /tmp/r-$v
    /usr/bin/time -f "$v wall %e s user %U sys %S" env PYTHONPATH=$PWD KERAS_HOME=/work/main/.keras-home /work/main/.venv/bin/python -c "import pipeline, sys; print(pipeline.__file__, file=sys.stderr); from pipeline.cli import main; sys.exit(main(sys.argv[1:]))" train --head logreg --head linear_svm --head rbf_svm --head mlp --head sgd_linear --head knn --force --cache-dir /tmp/hf --results-dir /tmp/r-$v --features $F -q 2>&1 | tail -2
    /work/main/.venv/bin/python -c "
import json,glob
print(' ', {m['head']: (round(m['fit_seconds'],1), m['threads']) for m in (json.load(open(f)) for f in sorted(glob.glob('/tmp/r-$v/*/*/metrics.json')))})"
  done
done
