"""What the benchmarks share: sample images, memory readings, the machine and commit, the
JSON writer, and measured runs in fresh worker processes (``workers.py``). Not part of the
installed package: the benchmarks use its public names only."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

HERE = Path(__file__).resolve().parent  # results are written beside this script

# The shared data beside the checkout (../shared from the repository root).
SHARED_CIFAR = HERE.parent.parent / "shared" / "data" / "cifar10-mini"


def sample_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """n real 32x32 RGB images (CIFAR-10-mini, tiled) or, without it, seeded noise."""
    from pipeline.datasets import load_dataset

    if SHARED_CIFAR.is_dir():
        split = load_dataset(f"folder:{SHARED_CIFAR}").splits["train"]
        x = np.concatenate(list(split.batches(500)))
        reps = -(-n // len(x))
        return np.tile(x, (reps, 1, 1, 1))[:n], np.tile(split.labels, reps)[:n], "cifar10-mini (tiled)"
    rng = np.random.default_rng(0)
    # Every class in both halves, which the benchmarks split by even and odd rows.
    return rng.integers(0, 256, (n, 32, 32, 3), np.uint8), np.arange(n) // 2 % 10, "random uint8"


def peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM). ``wait4``'s ru_maxrss would also count the
    benchmark driver's memory, which the child inherits at fork until it execs."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024


def children_peak_rss_mib() -> float:
    """The largest peak of this process's finished children: the converting child, or else
    the `uname -p` that importing h5py runs (through platform), about 45 MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM starts again from VmRSS
        f.write("5")


def worker_command(args: dict) -> list[str]:
    """A fresh Python process running ``workers.py`` on ``args``."""
    return [sys.executable, str(HERE / "workers.py"), json.dumps(args)]


def worker_result(args: dict, label: str) -> dict:
    """The JSON a fresh worker process prints after ``RESULT``; its failure in one line (the
    last line it wrote to stderr)."""
    proc = subprocess.run(worker_command(args), capture_output=True, text=True)
    if proc.returncode != 0 or "RESULT" not in proc.stdout:
        said = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        raise PipelineError(f"benchmark worker {label} failed (status {proc.returncode}): {said}")
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def run_worker(method: str, npz: str, backbone: str, alpha, batch_size: int, size: int,
                cache: str) -> dict:
    args = dict(method=method, npz=npz, backbone=backbone, alpha=alpha, batch_size=batch_size,
                size=size, cache=cache)
    result = worker_result(args, method)
    result["images_per_second"] = result["rows"] / result["seconds"]
    if "extract_seconds" in result:
        result["in_loop_images_per_second"] = result["rows"] / result["extract_seconds"]
    return result


def fit_and_score(head: str, params: dict, X, y, Xt, yt, threads: int) -> tuple[object, dict]:
    """A head fitted on ``threads`` BLAS threads (``X`` may be an h5py dataset, as
    sgd_linear streams it), timed, and scored on the test rows: the model and what it chose,
    its validation and test accuracy and its fit seconds."""
    from threadpoolctl import threadpool_limits

    from pipeline.heads import make_head

    model = make_head(head, params)
    t = time.perf_counter()
    with threadpool_limits(threads):
        model.fit(X, y)
    fit_s = time.perf_counter() - t
    return model, {"best": model.best_params_, "val": round(model.validation_score_, 4),
                   "fit_s": round(fit_s, 1), "test": round(float((model.predict(Xt) == yt).mean()), 4)}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def machine(tf) -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    if tf is not None:
        info["tensorflow"] = tf.__version__
        info["gpus"] = [g.name for g in tf.config.list_physical_devices("GPU")]
    return info


def write(report: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {path}")



def parser(doc: str):
    """A benchmark's command line: its docstring's first line, defaults shown, ``--out``."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="the JSON results (default: beside this script)")
    return p


def sizes(text: str | None, default: list[int] | None) -> list[int] | None:
    """``--sizes 2000,8000``."""
    try:
        return [int(v) for v in text.split(",")] if text else default
    except ValueError:
        raise PipelineError(f"--sizes {text!r}: write whole numbers, e.g. 2000,8000") from None


def run(bench, *args, **kwargs) -> int:
    """The benchmark, its one-line errors as ``error: ...`` and exit status 2."""
    try:
        bench(*args, **kwargs)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
