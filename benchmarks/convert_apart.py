"""A first (converting) run with the graph converted in a child process (the default where
TensorFlow is not loaded yet) against in this process (TensorFlow loaded first, as before):
fresh processes, rounds alternating, MobileNetV2 0.35 (random weights) at 224, N = 8,000 real
CIFAR-10-mini images (tiled), batch 64, ONNX Runtime, a new cache folder each run. The
"converting child" peak is the largest of the run's children: converting here, the only child
is the `uname -p` that importing h5py runs (through platform), counted at the size of the
process it forked from (TensorFlow loaded first).

    KERAS_HOME=$PWD/.keras-home .venv/bin/python benchmarks/convert_apart.py \
        > benchmarks/convert_apart.txt
"""
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import sample_images

RUN = """
import json, resource, sys, time
t0 = time.perf_counter()
if sys.argv[2] == "here":
    import tensorflow  # loaded: the conversion runs in this process
from pipeline.extraction import ExtractionConfig, extract_features
config = ExtractionConfig(dataset=f"npz:{sys.argv[1]}", backbone="mobilenet_v2", alpha=0.35,
                          weights="none", batch_size=64, cache_dir=sys.argv[3],
                          compression="none", runtime="onnxruntime")
done = extract_features(config)
seconds = time.perf_counter() - t0
with open("/proc/self/status") as f:
    peak = int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print("RESULT", json.dumps({"seconds": seconds, "loop_seconds": done.info["wall_seconds"],
                            "peak_rss_mib": peak, "child_peak_rss_mib": child,
                            "tensorflow_loaded": "tensorflow" in sys.modules}))
"""


def main(n: int = 8000, rounds: int = 4) -> None:
    x, y, source = sample_images(n)
    runs: dict[str, list[dict]] = {"here": [], "apart": []}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "bench.npz"
        np.savez(npz, x_train=x[: n // 2], y_train=y[: n // 2], x_test=x[n // 2:], y_test=y[n // 2:])
        for r in range(rounds):
            for where in ("here", "apart"):
                cache = Path(tmp) / f"cache-{where}-{r}"
                out = subprocess.run([sys.executable, "-c", RUN, str(npz), where, str(cache)],
                                     capture_output=True, text=True).stdout
                runs[where].append(json.loads(out.split("RESULT", 1)[1]))
    print(f"N = {n} ({source}), {rounds} rounds, alternating; whole process seconds "
          "(start-up and conversion included), the extraction loop's, peak RSS")
    for where, rows in runs.items():
        def row(key: str, digits: int, rows=rows) -> str:
            return " ".join(f"{r[key]:.{digits}f}" for r in rows)

        whole = [r["seconds"] for r in rows]
        print(f"\nconverting {where}: whole {row('seconds', 2)} s (median "
              f"{statistics.median(whole):.2f}); loop {row('loop_seconds', 2)} s; peak RSS "
              f"{row('peak_rss_mib', 0)} MiB, converting child {row('child_peak_rss_mib', 0)} MiB; "
              f"TensorFlow loaded: {sorted({r['tensorflow_loaded'] for r in rows})}")
    here, apart = (statistics.median(r["seconds"] - r["loop_seconds"] for r in runs[w])
                   for w in ("here", "apart"))
    print(f"\nmedian time outside the loop: here {here:.2f} s, apart {apart:.2f} s")


if __name__ == "__main__":
    main()
