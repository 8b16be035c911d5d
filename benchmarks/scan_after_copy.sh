#!/usr/bin/env bash
# Copy an image folder, extract it, rerun: what the rerun's scan reads again, before (OLD, a
# git revision: files copied within 2 s of the scan were "racy" and re-hashed) and after the
# extraction's sha256 checks were recorded in the scan index (this checkout). Side by side,
# a fresh copy and a fresh cache for each. MobileNet 0.25 at 224, `auto` runtime.
# ENGINE="--engine ray" runs every extract on a local Ray instance instead.
# Usage (from the repo root):
#   bash benchmarks/scan_after_copy.sh b360679 ../shared/data/cifar10 > benchmarks/scan_after_copy.txt
#   ENGINE="--engine ray" bash benchmarks/scan_after_copy.sh 8f3cf66 ../shared/data/cifar10 \
#     > benchmarks/scan_after_copy_ray.txt
set -euo pipefail
OLD=${1:?a git revision to compare with}
DATA=$(realpath "${2:?an image folder to copy}")
work=$(mktemp -d)
repo=$PWD venv=$PWD/.venv
export KERAS_HOME=${KERAS_HOME:-$PWD/.keras-home}
trap 'git worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add -q "$work/old" "$OLD"
echo "$(find "$DATA" -type f | wc -l) files in $DATA, $(nproc) cores, $(date -u +%FT%TZ)${ENGINE:+, $ENGINE}"
for which in old new; do
  code=$repo; [ "$which" = old ] && code="$work/old"
  rm -rf "$work/copy" "$work/cache"
  cp -r "$DATA" "$work/copy"   # the copy's files are new: the first scan cannot trust their stat
  cd "$work"  # `python -m` puts the working folder first on the path, before PYTHONPATH
  run() { /usr/bin/time -f "$which $1: %e s wall" env PYTHONPATH="$code" "$venv/bin/python" -m \
            pipeline extract --dataset "folder:$work/copy" --backbone mobilenet --alpha 0.25 \
            --cache-dir "$work/cache" ${ENGINE:-} 2>&1 | grep -E "scanned|scan index|up to date|wall" \
            | sed -E "s|$work|WORK|g; s/^/  /" || true; }
  run "extract"
  run "first rerun"
  run "second rerun"
  cd "$repo"
done
