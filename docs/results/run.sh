#!/bin/sh
# The offline grid, in the order that gives the lever results first.
cd "$(dirname "$0")/../.."   # the repository
export KERAS_HOME=$PWD/.keras-home
# (As run, the "rc" in the end line was that of the arithmetic, always 0; fixed after the run.
# Every step finished: its own "done in" line is in run.log.)
step() {
    echo "=== $(date +%T) start: $*"; t0=$(date +%s)
    .venv/bin/python -m pipeline run --config experiments/offline.toml "$@"; rc=$?
    echo "=== $(date +%T) end ($(( $(date +%s) - t0 )) s, rc $rc): $*"
}
step --datasets cifar10 --stage features
step --datasets cifar10 --heads "logreg mlp"
step --datasets fashion_mnist --stage features
step --datasets fashion_mnist --heads "logreg mlp"
step
