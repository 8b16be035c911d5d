"""Where Ray's heads lose time against one process: the six default heads on one cached file
as Ray tasks on a local instance of 2 CPUs started here (what ``run --engine ray`` does),
each task's start and end relative to the call, and its worker process. Run from the repo root:
  python benchmarks/ray_heads_timeline.py FILE > benchmarks/ray_heads_timeline.txt
"""
import os
import sys
import tempfile
import time

from pipeline.engine import RayEngine
from pipeline.training import cluster_tasks, train_call

HEADS = ["logreg", "linear_svm", "rbf_svm", "mlp", "sgd_linear", "knn"]


def timed(**call):
    start = time.time()
    train_call(**call)
    return call["head"], call["threads"], os.getpid(), start, time.time()


out = tempfile.mkdtemp(prefix="ray-timeline-")
calls = [{"feature_path": sys.argv[1], "head": h, "results_dir": out} for h in HEADS]
t0 = time.time()
with RayEngine(None, num_cpus=2) as engine:
    spans = engine.map(timed, cluster_tasks(calls))
print(f"{os.path.basename(sys.argv[1])}: {time.time() - t0:.1f} s in all (Ray's start included)")
for head, threads, pid, start, end in sorted(spans, key=lambda s: s[3]):
    print(f"{head:11s} {threads} core(s), worker {pid}: {start - t0:5.1f} s -> {end - t0:5.1f} s"
          f" ({end - start:4.1f} s)")
