#!/usr/bin/env bash
# Heads with every core (the default) against --threads 1, side by side, on a quiet machine and
# with a competing process on one core (a single-threaded numpy loop, as a second job would
# be): logreg and mlp on the 45,000 x 256 CIFAR-10 file (MobileNet 0.25 avg), two rounds,
# each fit a fresh process (train --force). Usage, from the repository root, with that file
# in CACHE (benchmarks/knn_cifar10.sh makes it):
#   CACHE=DIR bash benchmarks/threads_heads.sh > benchmarks/threads_heads.txt
set -euo pipefail
cache=${CACHE:?the cache folder holding the CIFAR-10 feature file}
results=$(mktemp -d)
py=.venv/bin/python
echo "commit $(git rev-parse --short HEAD); $(nproc) cores; $(date -u +%FT%TZ)"
compete() {
  OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $py -c \
    "import numpy as np; a = np.ones((1500, 1500)); [a @ a for _ in iter(int, 1)]" &
  competitor=$!
}
for round in 1 2; do
  for load in quiet loaded; do
    [ "$load" = loaded ] && compete
    for head in logreg mlp; do
      for threads in default 1; do
        flag=(); [ "$threads" = 1 ] && flag=(--threads 1)
        /usr/bin/time -f "round $round, $load, $head, threads $threads: %e s" $py -m pipeline train \
          --head $head --force "${flag[@]}" --cache-dir "$cache" --results-dir "$results" -q
      done
    done
    [ "$load" = loaded ] && { kill "$competitor"; wait "$competitor" 2>/dev/null || true; }
  done
done
rm -rf "$results"
