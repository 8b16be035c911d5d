"""Every registered backbone converted for each installed runtime (weights none, native
input size): does it convert, how long, how much memory, do its features match TensorFlow's?
One fresh process per backbone. ``make bench-conversions``; JSON beside this script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import HERE, commit, machine, parser, run, sample_images, worker_command, write

from pipeline.errors import PipelineError

_MODE_NOTES = {"avg": "global average pooling of the last map (parts named RUNTIME)",
               "max": "global max pooling (RUNTIME:max)",
               "layers": "avg of two maps, the first halfway through the network's 4-d "
                         "outputs, and the last (RUNTIME:layers)",
               "bottleneck": "the last map through a random 1x1 projection to 8 channels, "
                             "flattened (RUNTIME:bottleneck)",
               "spatial": "the last map whole, float32 as the graph gives it (RUNTIME:spatial)"}


def bench_conversions(out: str | None = None, backbones: list[str] | None = None,
                      modes: list[str] | None = None, images: int = 16, max_rss_gib: float = 12.0,
                      timeout: float = 900) -> dict:
    """Every registered backbone (``weights none``, native input size, ``modes``, default
    avg): does each installed runtime convert it, how long, how much memory, and do its
    features match TensorFlow's on ``images`` real images? One fresh process per backbone,
    stopped past ``max_rss_gib`` or ``timeout`` seconds (recorded as such)."""
    from pipeline import runtimes
    from pipeline.backbones import BACKBONES

    modes, backbones = modes or ["avg"], backbones or list(BACKBONES)
    for what, asked, known in (("--modes", modes, _MODE_NOTES), ("--backbone", backbones, BACKBONES)):
        if set(asked) - set(known):
            raise PipelineError(f"{what}: unknown {', '.join(sorted(set(asked) - set(known)))}; "
                                f"use some of {', '.join(known)}")
    converted = [r for r in ("openvino", "onnxruntime") if runtimes.installed(r)]
    names = [f"{r}{'' if m == 'avg' else ':' + m}" for m in modes for r in ("tensorflow", *converted)]
    x, y, source = sample_images(images)
    report = {"what": "conversion of every registered backbone (weights none, native input size, "
                      "uint8 32x32 input resized in the graph)",
              "modes": {m: _MODE_NOTES[m] for m in modes},
              "images": f"{images} {source}", "commit": commit(), "machine": machine(None),
              "matches_when": "max_rel_diff (max_abs_diff / max_abs_feature) <= 2e-4 and "
                              "min_cosine >= 0.99999 (the tests' 1e-3 on features to about 6)",
              "peak_rss_mib": "the worker process's peak while that runtime converted and "
                              "loaded the graph (the Keras model and TensorFlow included)",
              "limits": {"peak_rss_gib": max_rss_gib, "seconds": timeout}, "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "images.npz")
        np.savez(npz, x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
        for backbone in backbones:
            print(f"bench conversions: {backbone} ...", flush=True)
            args = dict(worker="conversion", backbone=backbone, npz=npz,
                        cache=str(Path(tmp, backbone)), converted=converted, modes=modes)
            parts, stopped = _watched_worker(args, max_rss_gib, timeout)
            for name in names:
                if name not in parts:  # the first part the worker did not finish
                    parts[name] = {"error": stopped}
                    break
            print("  " + json.dumps(parts), flush=True)
            report["backbones"][backbone] = parts
            shutil.rmtree(Path(tmp, backbone), ignore_errors=True)
    rows = report["backbones"].values()
    report["summary"] = {r: {
        "converted_and_matching": sum(bool(b.get(r, {}).get("converted") and b[r]["matches"])
                                      for b in rows),
        "falls_back": [k for k, b in report["backbones"].items()
                       if b.get(r, {}).get("converted") is False],
        "not_matching": [k for k, b in report["backbones"].items()
                         if b.get(r, {}).get("converted") and not b[r]["matches"]],
        "not_finished": [k for k, b in report["backbones"].items() if "converted" not in b.get(r, {})],
        "of": len(report["backbones"])} for r in names if not r.startswith("tensorflow")}
    write(report, out or HERE / "conversions.json")
    return report


def _watched_worker(args: dict, max_rss_gib: float, timeout: float) -> tuple[dict, str | None]:
    """A worker's parts, and why it stopped early (past ``max_rss_gib`` of RSS or ``timeout``
    seconds: killed; or failed), None if it finished."""
    proc = subprocess.Popen(worker_command(args), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    stopped, t0 = None, time.monotonic()
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = int(next(line for line in f if line.startswith("VmRSS")).split()[1]) << 10
        except (OSError, StopIteration):
            continue
        if rss > max_rss_gib * 2**30 or time.monotonic() - t0 > timeout:
            stopped = f"stopped at {rss / 2**30:.1f} GiB RSS after {time.monotonic() - t0:.0f} s"
            proc.kill()
    output = proc.stdout.read()
    parts = {k: v for line in output.splitlines() if line.startswith("PART ")
             for k, v in json.loads(line[5:]).items()}
    if not stopped and (proc.returncode != 0 or "RESULT" not in output):
        stopped = f"worker failed (status {proc.returncode})"
    return parts, stopped



def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--backbone", default=None, help="comma-separated (default: all registered)")
    p.add_argument("--modes", default=None,
                   help="comma-separated feature modes: avg, max, layers, bottleneck, spatial "
                        "(default avg)")
    args = p.parse_args(argv)
    return run(bench_conversions, out=args.out,
               backbones=args.backbone.split(",") if args.backbone else None,
               modes=args.modes.split(",") if args.modes else None)


if __name__ == "__main__":
    sys.exit(main())
