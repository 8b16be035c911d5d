#!/usr/bin/env bash
# 12-megapixel photos (4000x3000 JPEG), MobileNet 0.25 at 224, `auto` runtime: the code before
# large photos were decoded at reduced size (OLD, a git revision) against this checkout, side
# by side, fresh cache each, wall time and peak RSS (GNU time). Usage (from the repo root):
#   bash benchmarks/large_photos.sh e7147b8 > benchmarks/large_photos.txt
set -euo pipefail
OLD=${1:?a git revision to compare with}
work=$(mktemp -d)
repo=$PWD venv=$PWD/.venv
trap 'git worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add -q "$work/old" "$OLD"
.venv/bin/python - "$work/photos" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, n in (("train", 16), ("test", 8)):
    for c in range(2):
        (Path(sys.argv[1]) / split / f"c{c}").mkdir(parents=True)
        for i in range(n):
            base = np.add.outer(np.linspace(0, 120, 3000), np.linspace(0, 120, 4000))
            pixels = np.clip(base[..., None] + 60 * c + rng.normal(0, 20, (3000, 4000, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(
                Path(sys.argv[1]) / split / f"c{c}" / f"{i}.jpg", quality=90)
PY
echo "48 photos, 4000x3000 JPEG, $(du -sh "$work/photos" | cut -f1); $(nproc) cores; $(date -u +%FT%TZ)"
for round in 1 2; do
  for which in old new; do
    code=$PWD; [ "$which" = old ] && code="$work/old"
    rm -rf "$work/cache"
    # From $work: `python -m` puts the working folder first on the path, before PYTHONPATH.
    cd "$work"
    echo "$which: $(PYTHONPATH="$code" "$venv/bin/python" -c 'import pipeline; print(pipeline.__file__)')"
    /usr/bin/time -f "$which round $round: %e s wall, peak RSS %M KiB" env PYTHONPATH="$code" \
      "$venv/bin/python" -m pipeline extract --dataset "folder:$work/photos" --backbone mobilenet \
      --alpha 0.25 --cache-dir "$work/cache" -q 2>&1 | grep -v '^warning' || true
    cd "$repo"
  done
done
