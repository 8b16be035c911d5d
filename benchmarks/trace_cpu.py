"""A command's log lines stamped with seconds since its start, and the CPU its process used
in each 2 s window (cores busy) and in all, so that idle cores show: where a run of heads
loses time. Run from the repo root, e.g.
  python benchmarks/trace_cpu.py python -m pipeline train --head logreg ... --force
(sweep and epoch lines left out).
"""
import os
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """The process's user + system time, its waited-for children's included."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(f) for f in fields[11:15]) / TICK


t0 = time.time()
proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True)
samples: list[tuple[float, float]] = []


def sample() -> None:
    while proc.poll() is None:
        if (used := cpu_seconds(proc.pid)) is not None:
            samples.append((time.time() - t0, used))
        time.sleep(0.5)


threading.Thread(target=sample, daemon=True).start()
for line in proc.stdout:
    if "sweep:" not in line and "epoch" not in line:
        print(f"{time.time() - t0:6.1f} {line.rstrip()[:150]}")
proc.wait()
print("wall", round(time.time() - t0, 1))
windows, last = [], (0.0, 0.0)
for at, used in samples:
    if at - last[0] >= 2:
        windows.append(f"{round(last[0])}:{(used - last[1]) / (at - last[0]):.2f}")
        last = (at, used)
print(" ".join(windows))
print("cpu s", round(samples[-1][1], 1),
      "idle-core s", round((os.cpu_count() or 1) * samples[-1][0] - samples[-1][1], 1))
