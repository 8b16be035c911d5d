"""The one-core heads (logreg, linear_svm, mlp, sgd_linear) on one cached feature file, in one
process on every core: one after another (``train_one`` each with every core: what ``train``
did before) against side by side (``run_heads``: one core each, longest first), interleaved
rounds. Prints each variant's wall time and each head's fit seconds and test accuracy (from
its metrics.json). Run from the repo root on the real cached files:
  python benchmarks/lanes.py FILE [FILE ...] > benchmarks/lanes.txt
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline.training import run_heads, train_one

HEADS = ["logreg", "linear_svm", "mlp", "sgd_linear"]
cores = os.cpu_count()
for rnd in (1, 2):
    for path in sys.argv[1:]:
        variants = [("one after another", "apart"), ("side by side", "lanes")]
        for label, how in variants if rnd == 1 else variants[::-1]:
            out = Path(tempfile.mkdtemp(prefix="lanes-"))
            t = time.perf_counter()
            if how == "apart":
                for head in HEADS:
                    train_one(path, head, results_dir=out, force=True, threads=cores)
            else:
                run_heads([{"feature_path": path, "head": h, "results_dir": out, "force": True}
                           for h in HEADS], cores)
            wall = time.perf_counter() - t
            heads = {}
            for metrics in out.glob("*/*/metrics.json"):
                m = json.loads(metrics.read_text())
                heads[m["head"]] = {"fit_s": round(m["fit_seconds"], 1),
                                    "test": m["test_accuracy"], "threads": m["threads"]}
            print(json.dumps({"round": rnd, "file": Path(path).name, "variant": label,
                              "cores": cores, "wall_s": round(wall, 1), "heads": heads}), flush=True)
