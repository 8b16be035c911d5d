#!/bin/bash
# The six default heads in one `train` on one feature file: OLD (a git ref, checked out in a
# temporary worktree) against this checkout, fresh processes, interleaved (old new, new old, ...).
# Run from the repo root: bash benchmarks/six_heads_ab.sh OLD FEATURE_FILE [ROUNDS]
set -euo pipefail
old_ref=$1 features=$(realpath "$2") rounds=${3:-2}
root=$PWD work=$(mktemp -d)
git worktree add -q --detach "$work/old" "$old_ref"
trap 'git worktree remove --force "$work/old"; rm -rf "$work"' EXIT
echo "# old $(git -C "$work/old" rev-parse --short HEAD), new $(git rev-parse --short HEAD), $(basename "$features"), $(date -u '+%F %H:%M') UTC"
for ((r = 1; r <= rounds; r++)); do
  order="old new"; ((r % 2)) || order="new old"
  for v in $order; do
    code=$root; [ "$v" = old ] && code=$work/old
    rm -rf "$work/results"
    # from the code's own folder: `python -m` puts the working folder first on sys.path
    (cd "$code" && /usr/bin/time -f "$v wall %e s user %U sys %S" \
      "$root/.venv/bin/python" -c "import sys, pipeline; from pipeline.cli import main
assert pipeline.__file__.startswith('$code/'), pipeline.__file__
sys.exit(main(sys.argv[1:]))" train --head logreg --head linear_svm --head rbf_svm \
      --head mlp --head sgd_linear --head knn --force --cache-dir "$(dirname "$features")" \
      --results-dir "$work/results" --features "$features" -q 2>&1 | tail -1)
    "$root/.venv/bin/python" -c "
import json, glob
print('  ', {m['head']: (round(m['fit_seconds'], 1), round(100 * m['test_accuracy'], 2))
             for m in (json.load(open(f)) for f in sorted(glob.glob('$work/results/*/*/metrics.json')))})"
  done
done
