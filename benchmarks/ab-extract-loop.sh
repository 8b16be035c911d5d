#!/bin/bash
# A/B of the extraction loop on TensorFlow, old against new, alternating, one process each:
# old = commit 2a86db5 (tf.data prefetch, .npy segments), checked out with
#   git worktree add /tmp/old 2a86db5
# new = this checkout (decode threads, HDF5 shards). Run alone, from the repository root.
# Recorded output (session 5, 2026-11-24), in-loop images/s: old 391.4 / 472.9 / 400.7,
# new 448.3 / 481.8 / 456.1 (three of four pairs; one scrolled out of the terminal).
cd "$(dirname "$0")/.."
ROOT=$PWD
export KERAS_HOME=${KERAS_HOME:-$ROOT/.keras-home}
NPZ=/tmp/ab.npz
"$ROOT"/.venv/bin/python - <<'PY'
import numpy as np
from pipeline.bench import _images
x, y, _ = _images(8000)
np.savez("/tmp/ab.npz", x_train=x, y_train=y, x_test=x[:0+1600], y_test=y[:1600])
PY
for round in 1 2; do
  for which in old new; do
    dir=$ROOT; [ $which = old ] && dir=/tmp/old
    (cd $dir && PYTHONPATH=$dir "$ROOT"/.venv/bin/python -c "
import inspect, sys, tempfile
from pipeline.bench import _worker; import pipeline.extract as e; print(e.__file__, file=sys.stderr)
kept = {'cache': tempfile.mkdtemp()} if 'cache' in inspect.signature(_worker).parameters else {}
r = _worker('ours:tensorflow', '$NPZ', 'mobilenet', 0.25, 64, 224, **kept)
print('$which', round(r['rows']/r['seconds'],1), 'whole', round(r['rows']/r['extract_seconds'],1), 'in-loop')
")
  done
done
