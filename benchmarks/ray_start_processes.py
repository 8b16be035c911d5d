"""What a local Ray instance starts, process by process, as ``--engine ray`` starts one: the
CPU seconds each of Ray's processes has used 3 s after ``ray.init`` returns (ray.init as the
engine calls it: no dashboard, warnings only), then the engine's stop. Which of them could a
command that starts Ray leave out? One table per run; ``python
benchmarks/ray_start_processes.py`` (results: ray_start_processes.txt)."""

import os
import time

import ray

from pipeline.engine import stop_ray


def ray_processes() -> list[tuple[float, str]]:
    """(user + system CPU seconds, command line) of every other process of Ray's."""
    rows = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            if not (cmd.startswith("ray::") or "/ray/" in cmd):  # Ray's workers, daemons
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        rows.append(((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), cmd))
    return sorted(rows, reverse=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    init_s = time.perf_counter() - t0
    time.sleep(3)
    rows = ray_processes()
    for cpu, cmd in rows:
        name = cmd.split()[0] if not cmd.startswith(os.sys.executable) else \
            " ".join(part.rsplit("/", 1)[-1] for part in cmd.split()[:3])
        print(f"{cpu:5.2f} CPU-s  {name[:90]}")
    print(f"ray.init {init_s:.2f} s; {len(rows)} processes, {sum(c for c, _ in rows):.2f} CPU-s "
          "by 3 s after it", flush=True)
    stop_ray()
