#!/usr/bin/env bash
# `train --head rbf_svm` on one cached feature file, whole processes: OLD (a git revision:
# Nystroem beyond 20,000 rows, stock scikit-learn) against this checkout (exact RBF SVC on
# oneDAL up to 60,000 rows), side by side, wall time, peak RSS (GNU time) and the result.
# Usage (from the repo root, after `make install`):
#   bash benchmarks/rbf_svm_onedal.sh b360679 features_cache/FILE.h5 > benchmarks/rbf_svm_onedal.txt
set -euo pipefail
OLD=${1:?a git revision to compare with}
FILE=$(realpath "${2:?a feature file}")
work=$(mktemp -d)
repo=$PWD venv=$PWD/.venv
trap 'git worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add -q "$work/old" "$OLD"
echo "$(basename "$FILE"), $(nproc) cores, $(date -u +%FT%TZ)"
for which in old new; do
  code=$repo; [ "$which" = old ] && code="$work/old"
  cd "$work"  # `python -m` puts the working folder first on the path, before PYTHONPATH
  /usr/bin/time -f "$which: %e s wall, peak RSS %M KiB" env PYTHONPATH="$code" "$venv/bin/python" \
    -m pipeline train --head rbf_svm --features "$FILE" --results-dir "$work/results-$which" 2>&1 \
    | grep -E "ran as|refit|test accuracy|wall|not installed" | sed -E "s|$work|WORK|g; s/^/  /" || true
  "$venv/bin/python" -c "import json, glob, sys; r = json.load(open(glob.glob(sys.argv[1])[0])); \
print('  ', r['head_ran'], 'solver', r.get('solver', '-'), 'test', r['test_accuracy'], \
'fit_s', round(r['fit_seconds'], 1), 'best', r['best_params'])" "$work/results-$which/*/rbf_svm/metrics.json"
  cd "$repo"
done
