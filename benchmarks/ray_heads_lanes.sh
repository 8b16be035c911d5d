#!/usr/bin/env bash
# The six default heads on Fashion-MNIST's 60,000 x 256 file as Ray tasks on a local instance
# the run starts (bench_ray's heads worker, a fresh process each), the one-core heads as one
# task per node training side by side (8221c0c, reverted) against one-core tasks of their own
# (c4e23c4: what is kept), and in one process; interleaved. Run from the repo root with FILE:
#   bash benchmarks/ray_heads_lanes.sh FILE > benchmarks/ray_heads_lanes.txt
set -euo pipefail
F=$(realpath "$1")
for v in 8221c0c c4e23c4; do
    [ -d "/tmp/wt-$v" ] || git worktree add --detach "/tmp/wt-$v" "$v" -q
done
heads='["logreg", "linear_svm", "rbf_svm", "mlp", "sgd_linear", "knn"]'
for round in 1 2; do
    for v in 8221c0c c4e23c4 one; do
        method=ray tree=/tmp/wt-$v
        [ "$v" = one ] && method="one process" tree=/tmp/wt-c4e23c4
        out=$(mktemp -d)
        job="{\"worker\": \"heads\", \"method\": \"$method\", \"features\": [\"$F\"], \"heads\": $heads, \"threads\": 2, \"results\": \"$out\"}"
        PYTHONPATH=$tree .venv/bin/python "$tree/benchmarks/workers.py" "$job" 2>/dev/null | sed -n 's/.*RESULT//p' |
            python3 -c "import json, sys; d = json.load(sys.stdin); print('round $round, $v ($method):', round(d['seconds'], 1), 's; fits', {k: round(v, 1) for k, v in d['fit_seconds'].items()})"
        rm -rf "$out"
    done
done
