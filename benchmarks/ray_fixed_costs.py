"""Ray's own fixed costs on a local instance, as ``--engine ray`` pays them when it starts
one: ``ray.init``, the CPU its processes (daemons, pre-started workers) have used 3 s after
it returns (their start), the CPU they use while idle (10 s), ``ray.shutdown`` (with
``--as-engine``: the engine's stop, ``pipeline.engine.stop_ray``), and how long an actor
of every CPU then takes to answer (``--no-prestart``: without the workers Ray pre-starts,
one per CPU, for the first driver). One line per run; ``python
benchmarks/ray_fixed_costs.py [--as-engine] [--no-prestart]`` (results: ray_fixed_costs.txt)."""

import os
import sys
import time

t0 = time.perf_counter()
import ray  # noqa: E402

no_prestart = "--no-prestart" in sys.argv
t1 = time.perf_counter()
ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=True,
         _system_config={"prestart_worker_first_driver": False} if no_prestart else None)
t2 = time.perf_counter()


def cpu_seconds_of_ray_processes() -> float:
    """User + system CPU of every process but this one whose command line names Ray."""
    total, me = 0, os.getpid()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ray" not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


time.sleep(3)
c0 = cpu_seconds_of_ray_processes()
time.sleep(10)
c1 = cpu_seconds_of_ray_processes()


@ray.remote(num_cpus=2)
class Actor:
    def pid(self) -> int:
        return os.getpid()


t_actor = time.perf_counter()
ray.get(Actor.remote().pid.remote())
actor_s = time.perf_counter() - t_actor
as_engine = "--as-engine" in sys.argv
if as_engine:
    from pipeline.engine import stop_ray as shutdown
else:
    shutdown = ray.shutdown
t3 = time.perf_counter()
shutdown()
t4 = time.perf_counter()
print(f"import {t1 - t0:.2f}s init {t2 - t1:.2f}s "
      f"{'engine stop' if as_engine else 'shutdown'} {t4 - t3:.2f}s; "
      f"ray processes idle CPU {100 * (c1 - c0) / 10:.1f}% of one core; "
      f"their CPU by 3 s after init {c0:.2f}s; an actor of 2 CPUs answered in {actor_s:.2f}s"
      f"{' (no pre-started workers)' if no_prestart else ''}")
