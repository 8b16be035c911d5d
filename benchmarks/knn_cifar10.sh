#!/usr/bin/env bash
# Where the weighted k-NN head lands on real features: CIFAR-10 (../shared/data/cifar10,
# 45,000 train / 7,000 test), MobileNet 0.25 ImageNet weights, avg, 224: knn beside logreg on
# the same file. Usage (from the repository root, KERAS_HOME with the offline weights):
#   bash benchmarks/knn_cifar10.sh > benchmarks/knn_cifar10.txt
set -euo pipefail
cache=${CACHE:-$(mktemp -d)} results=$(mktemp -d)
py=.venv/bin/python
echo "commit $(git rev-parse --short HEAD); $(nproc) cores; $(date -u +%FT%TZ)"
$py -m pipeline extract --dataset folder:../shared/data/cifar10 --backbone mobilenet --alpha 0.25 \
  --cache-dir "$cache" -q
for head in knn logreg; do
  /usr/bin/time -f "$head: %e s wall, peak RSS %M KiB" $py -m pipeline train --head $head \
    --cache-dir "$cache" --results-dir "$results" -q
  $py - "$results" "$head" <<'PY'
import json, sys
from pathlib import Path
[m] = [json.loads(p.read_text()) for p in Path(sys.argv[1]).glob(f"*/{sys.argv[2]}/metrics.json")]
print(f"{sys.argv[2]}: test {100 * m['test_accuracy']:.2f}%, validation "
      f"{100 * m['validation_accuracy']:.2f}%, chosen {m['best_params']}, fit {m['fit_seconds']:.1f} s, "
      f"predict {m['predict_ms_per_image']:.3f} ms/image")
PY
done
