"""The scan index at ImageNet's size: 1.28M generated entries, loaded as columns (today's
``.npz``) against the JSON index of version 2, side by side in one run. JSON beside this script.

Times, best of ``--repeat``: writing the index, loading it (open, checksum, names -> rows:
what every rerun pays before its first stat), and looking up every entry (what a no-op rerun
of the whole folder adds). The JSON loader is version 2's, as it was: parse, then re-dump
the entries sorted to check their sha256.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, commit, machine, parser, run, write


def _entries(n: int) -> dict[str, list]:
    """ImageNet-like names (1,000 class folders), realistic stats and digests."""
    t = 1_700_000_000_000_000_000
    return {f"train/n{1440764 + i % 1000:08d}/n{1440764 + i % 1000:08d}_{i}.JPEG":
            [110_000 + i % 5000, t + i * 1000, 5_000_000 + i, t + i * 1000 + 7,
             hashlib.sha256(i.to_bytes(8, "little")).hexdigest(), [500, 375], "", False, t + 10**12]
            for i in range(n)}


def _json_v2_load(path: Path) -> dict:
    """Version 2's ScanIndex._load, as it was."""
    raw = json.loads(path.read_bytes())
    body = json.dumps(raw["entries"], sort_keys=True, separators=(",", ":"))
    if hashlib.sha256(body.encode()).hexdigest() != raw["sha256"]:
        raise ValueError("checksum")
    return raw["entries"]


def _json_v2_save(path: Path, entries: dict) -> None:
    body = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    doc = {"version": 2, "root": "/data", "scanned_ns": 0,
           "sha256": hashlib.sha256(body.encode()).hexdigest(), "entries": entries}
    path.write_text(json.dumps(doc, separators=(",", ":")))


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(out: str | None = None, n: int = 1_281_167, repeat: int = 3) -> dict:
    from pipeline.datasets import ScanIndex

    entries = _entries(n)
    names = list(entries)
    report = {"what": "scan index at scale: columns (.npz, version 3) against JSON (version 2)",
              "entries": n, "commit": commit(), "machine": machine(None), "repeat": repeat}
    with tempfile.TemporaryDirectory() as tmp:
        folder, root = Path(tmp), Path(tmp) / "root"
        index = ScanIndex(folder, root)

        def save_columns():
            index.new, index.changed = entries, True
            index.save()

        report["columns_save_s"] = _best(save_columns, repeat)
        loaded = ScanIndex(folder, root)
        assert len(loaded.old.keys()) == n and loaded.old.get(names[-1]) == entries[names[-1]]
        report["columns_load_s"] = _best(lambda: ScanIndex(folder, root), repeat)
        report["columns_lookup_all_s"] = _best(lambda: [loaded.old.get(k) for k in names], repeat)
        report["columns_file_mb"] = index.path.stat().st_size / 1e6
        json_path = folder / "v2.json"
        report["json_save_s"] = _best(lambda: _json_v2_save(json_path, entries), repeat)
        report["json_load_s"] = _best(lambda: _json_v2_load(json_path), repeat)
        old = _json_v2_load(json_path)
        report["json_lookup_all_s"] = _best(lambda: [old.get(k) for k in names], repeat)
        report["json_file_mb"] = json_path.stat().st_size / 1e6
    report["load_speedup"] = report["json_load_s"] / report["columns_load_s"]
    for key in ("columns_load_s", "json_load_s", "columns_lookup_all_s", "json_lookup_all_s",
                "columns_save_s", "json_save_s", "columns_file_mb", "json_file_mb"):
        print(f"scan index, {n:,} entries: {key} {report[key]:.2f}", flush=True)
    write(report, out or HERE / "scan_index_scale.json")
    return report


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--entries", type=int, default=1_281_167, help="entries (ImageNet's train)")
    p.add_argument("--repeat", type=int, default=3, help="timings per figure (best kept)")
    args = p.parse_args(argv)
    return run(bench, out=args.out, n=args.entries, repeat=args.repeat)


if __name__ == "__main__":
    sys.exit(main())
