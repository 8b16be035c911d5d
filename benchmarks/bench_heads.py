"""Heads against the CNN pass they amortise: today's code against an older one, side by side.

``make bench-heads``; JSON beside this script. One run: extract a dataset with one backbone
(timed, a fresh process), then train every head on that file with this checkout and with
``--old`` (a git ref, checked out in a temporary worktree), each head a fresh process timed
with its peak RSS, old and new interleaved, on a quiet machine and with a competing
single-threaded process on one core (a second job, as on a shared machine). Then every head
in one ``train`` process; from the second round on, each such run right after an extraction
of its own, so that each round's ratio compares runs minutes apart (``--together-only``: only
those).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, commit, machine, parser, run, write

from pipeline.errors import PipelineError

ROOT = HERE.parent
HEADS = ("logreg", "linear_svm", "rbf_svm", "mlp", "sgd_linear", "knn")
# The commit before the heads-speed work (#26): the code path the issue measured.
OLD = "b4fd25e"
COMPETITOR = ("import numpy as np; a = np.ones((1500, 1500)); [a @ a for _ in iter(int, 1)]")


def _timed(cmd: list[str], code: Path, cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB of the process or its largest child, stderr tail)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", t.name, "-f", "%M", *cmd], cwd=cwd, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise PipelineError(f"{' '.join(cmd[2:6])} failed ({code}): "
                                f"{done.stderr.strip().splitlines()[-1:]}")
        return wall, int(t.read().split()[-1]) / 1024, done.stderr[-400:]


def _metrics(results: Path, head: str) -> dict:
    [path] = results.glob(f"*/{head}/metrics.json")
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in ("test_accuracy", "validation_accuracy", "fit_seconds",
                                   "best_params", "solver", "note", "ran")}


def bench_heads(out: str | None = None, dataset: str = "folder:../shared/data/cifar10",
                backbone: str = "mobilenet", alpha: float = 0.25, old: str = OLD,
                heads: tuple[str, ...] = HEADS, loaded_heads: tuple[str, ...] = ("logreg", "mlp"),
                old_heads: tuple[str, ...] | None = None, rounds: int = 1,
                loads: tuple[str, ...] = ("quiet", "loaded"), together: bool = True,
                apart: bool = True) -> dict:
    old_heads = heads if old_heads is None else old_heads
    work = Path(tempfile.mkdtemp(prefix="bench-heads-"))
    cache, oldtree = work / "cache", work / "old"
    dataset = dataset if not dataset.startswith("folder:") else \
        "folder:" + str((ROOT / dataset.removeprefix("folder:")).resolve())
    py = [sys.executable, "-m", "pipeline"]
    report = {"what": "every head's wall time and peak RSS (fresh process each) against the "
                      "extraction of the same file; this checkout ('new') against --old",
              "dataset": dataset, "backbone": backbone, "alpha": alpha, "old": old,
              "new": commit(), "machine": machine(None), "runs": []}
    subprocess.run(["git", "worktree", "add", "--detach", str(oldtree), old], cwd=ROOT, check=True,
                   capture_output=True)
    def extract(into: Path) -> dict:
        wall, rss, _ = _timed([*py, "extract", "--dataset", dataset, "--backbone", backbone,
                               "--alpha", str(alpha), "--cache-dir", str(into), "-q"], ROOT, work)
        [feature_file] = into.glob("*.h5")
        print(f"bench heads: extraction {wall:.1f} s, {rss:.0f} MiB -> {feature_file.name}", flush=True)
        return {"wall_s": wall, "peak_rss_mib": rss, "file": feature_file.name}

    try:
        report["extraction"] = extract(cache)
        report["extraction_rounds"] = [report["extraction"]]
        for rnd in range(1, rounds + 1):
            if rnd > 1 and together:  # again, into a cache of its own: beside this round's heads
                report["extraction_rounds"].append(extract(work / f"cache-{rnd}"))
            for load in [load for load in loads if load == "quiet" or loaded_heads]:
                competitor = subprocess.Popen(
                    [sys.executable, "-c", COMPETITOR], start_new_session=True,
                    env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}) \
                    if load == "loaded" else None
                try:
                    for head in (heads if apart else ()) if load == "quiet" else loaded_heads:
                        for code, tree in (("old", oldtree), ("new", ROOT)):
                            if code == "old" and (head not in old_heads or head == "knn"):
                                continue  # not asked for, or no such head before
                            results = work / f"results-{code}-{rnd}-{load}-{head}"
                            wall, rss, tail = _timed(
                                [*py, "train", "--head", head, "--force", "--cache-dir", str(cache),
                                 "--results-dir", str(results)], tree, work)
                            row = {"round": rnd, "load": load, "code": code, "head": head,
                                   "wall_s": wall, "peak_rss_mib": rss, **_metrics(results, head)}
                            report["runs"].append(row)
                            print(f"bench heads: round {rnd}, {load}, {code}, {head}: {wall:.1f} s, "
                                  f"{rss:.0f} MiB, test {100 * row['test_accuracy']:.2f}%", flush=True)
                    if load == "quiet" and together:  # what `make heads` runs: one process
                        results = work / f"results-together-{rnd}"
                        wall, rss, _ = _timed([*py, "train", *[a for h in heads for a in ("--head", h)],
                                               "--force", "--cache-dir", str(cache),
                                               "--results-dir", str(results)], ROOT, work)
                        report["runs"].append({"round": rnd, "load": load, "code": "new",
                                               "head": "all, one process", "wall_s": wall,
                                               "peak_rss_mib": rss, "heads": list(heads)})
                        print(f"bench heads: round {rnd}, every head in one process: {wall:.1f} s",
                              flush=True)
                finally:
                    if competitor:
                        os.killpg(competitor.pid, signal.SIGTERM)
                        competitor.wait()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(oldtree)], cwd=ROOT,
                       capture_output=True)
    report["summary"] = _summary(report)
    print(json.dumps(report["summary"], indent=1), flush=True)
    write(report, out or HERE / "heads.json")
    return report


def _fastest(report: dict) -> dict:
    """The fastest run over the rounds per (load, code, head)."""
    fastest: dict = {}
    for r in report["runs"]:
        key = (r["load"], r["code"], r["head"])
        if key not in fastest or r["wall_s"] < fastest[key]["wall_s"]:
            fastest[key] = r
    return fastest


def _summary(report: dict) -> dict:
    """Best wall time per (load, code, head) over the rounds; the quiet sum of every head
    against the extraction; each head's speed-up, new against old."""
    best = {key: r["wall_s"] for key, r in _fastest(report).items()}
    new_quiet = {h: s for (load, code, h), s in best.items()
                 if load == "quiet" and code == "new" and h != "all, one process"}
    extraction = report["extraction"]["wall_s"]
    together = best.get(("quiet", "new", "all, one process"))
    speedups = {f"{load}/{h}": best[(load, "old", h)] / s for (load, code, h), s in best.items()
                if code == "new" and (load, "old", h) in best}
    rounds = {r["round"]: r["wall_s"] for r in report["runs"] if r["head"] == "all, one process"}
    extractions = [e["wall_s"] for e in report.get("extraction_rounds", [report["extraction"]])]
    return {"extraction_s": extraction, "every_head_new_quiet_s": sum(new_quiet.values()),
            "every_head_over_extraction": sum(new_quiet.values()) / extraction if new_quiet else None,
            "every_head_one_process_s": together,
            "every_head_one_process_over_extraction": together and together / extraction,
            # each round's six heads in one process over the extraction run just before them
            "one_process_over_extraction_by_round": [
                rounds[r] / extractions[r - 1] for r in sorted(rounds) if r <= len(extractions)],
            "speedup_old_over_new": speedups}


def table(report: dict) -> str:
    """The report as the markdown table docs/benchmarks.md shows: best wall time over the
    rounds per (load, head, code), peak RSS and test accuracy beside it."""
    rows = {(load, head, code): r for (load, code, head), r in _fastest(report).items()}
    lines = ["| load | head | old s | new s | old / new | old peak RSS MiB | new peak RSS MiB "
             "| old test | new test |", "|---|---|---|---|---|---|---|---|---|"]
    for load, head in dict.fromkeys((k[0], k[1]) for k in rows):
        old, new = rows.get((load, head, "old")), rows.get((load, head, "new"))

        def cell(r, field, fmt):
            return fmt.format(r[field]) if r and r.get(field) is not None else "-"
        ratio = f"{old['wall_s'] / new['wall_s']:.1f}x" if old and new else "-"
        lines.append(f"| {load} | {head} | {cell(old, 'wall_s', '{:.1f}')} | "
                     f"{cell(new, 'wall_s', '{:.1f}')} | {ratio} | "
                     f"{cell(old, 'peak_rss_mib', '{:,.0f}')} | {cell(new, 'peak_rss_mib', '{:,.0f}')} | "
                     f"{cell(old, 'test_accuracy', '{:.2%}')} | {cell(new, 'test_accuracy', '{:.2%}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--dataset", default="folder:../shared/data/cifar10", help="what to extract")
    p.add_argument("--backbone", default="mobilenet", help="its backbone")
    p.add_argument("--alpha", type=float, default=0.25, help="the backbone's width")
    p.add_argument("--old", default=OLD, help="the git ref to compare with")
    p.add_argument("--heads", default=",".join(HEADS), help="heads timed on a quiet machine")
    p.add_argument("--loaded-heads", default="logreg,mlp", help="heads timed under load too")
    p.add_argument("--old-heads", default=None,
                   help="heads also timed on --old (default: all; '' for none)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    p.add_argument("--table", default=None, metavar="JSON",
                   help="print an earlier run's JSON as a markdown table, run nothing")
    p.add_argument("--apart-only", action="store_true",
                   help="skip the run of every head in one train process")
    p.add_argument("--together-only", action="store_true",
                   help="only every head in one train process, beside an extraction each round")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    return run(bench_heads, out=args.out, dataset=args.dataset, backbone=args.backbone,
               alpha=args.alpha, old=args.old, heads=tuple(args.heads.split(",")),
               loaded_heads=tuple(h for h in args.loaded_heads.split(",") if h),
               old_heads=None if args.old_heads is None else
               tuple(h for h in args.old_heads.split(",") if h), rounds=args.rounds,
               together=not args.apart_only, apart=not args.together_only)


if __name__ == "__main__":
    sys.exit(main())
