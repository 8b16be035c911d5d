"""The feature cache: one HDF5 file per cache key, published only when complete.

Work in progress lives in ``<name>.partial/``, a folder of row segments (``.npy``) each
written to a temporary name and renamed into place: a segment is there whole or not at all,
so a run killed at any moment resumes from the last complete segment. (An HDF5 file being
written is not crash-consistent: a kill during a metadata update can leave it unreadable.)
``publish`` assembles the segments into ``<name>.h5.tmp``, checks it (row counts, no
NaN/Inf), stores a sha256 per split and renames it to ``<name>.h5``.

A file is trusted only when its format tag, its completeness flag, its row counts and its
key (the hash of the key parts stored in it must equal the key in its name) all agree.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError

FORMAT = "pipeline.features"
FORMAT_VERSION = 1
SPLITS = ("train", "test")
COMPRESSIONS = ("none", "lzf", "gzip")
_NAME = re.compile(r"^(?P<stem>.+)-(?P<key>[0-9a-f]{16})$")


def cache_key(parts: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of the key parts."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def chunk_rows(row_bytes: int, target: int = 512 * 1024) -> int:
    """Rows per HDF5 chunk so that a chunk holds 0.1-1 MiB (one row if a row is bigger)."""
    return max(1, min(target // max(row_bytes, 1), 1 << 16))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")[:60] or "x"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy_atomic(final: Path, array: np.ndarray) -> None:
    """Write ``final`` whole or not at all: np.save to a temporary name through one write()
    (a short write then raises OSError with its errno), fsync, rename into place."""
    tmp = final.with_suffix(".tmp")
    buffer = io.BytesIO()
    np.save(buffer, array)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, final) from None


def _check_space(path: Path, need: int) -> None:
    """Refuse early when ``need`` bytes will not fit (free space or the file-size limit)."""
    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if need > free or (limit != resource.RLIM_INFINITY and need > limit):
        room = min(free, limit) if limit != resource.RLIM_INFINITY else free
        raise PipelineError(f"no space left for {path} (needs about {need / 2**20:.1f} MiB, "
                            f"{room / 2**20:.1f} MiB available); the partial work is kept: "
                            "free space and rerun the same command to resume")


def _disk_error(exc: OSError, where: Path) -> PipelineError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return PipelineError(f"no space left writing {where} ({exc.strerror}); the partial "
                             "work is kept: free space and rerun the same command to resume")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return PipelineError(f"cannot write {where} ({exc.strerror}); choose a writable "
                             "--cache-dir")
    return PipelineError(f"cannot write {where}: {exc}")


@dataclass
class PartialEntry:
    """Segments of one entry in progress; rows are appended in order, segment by segment."""

    path: Path

    def segments(self, split: str) -> list[Path]:
        """Complete segments forming a contiguous run of rows from 0, in order."""
        folder = self.path / split
        if not folder.is_dir():
            return []
        found = sorted(folder.glob("r*.npy"))
        run, expected = [], 0
        for seg in found:
            start, stop = (int(x) for x in seg.stem[1:].split("-"))
            if start != expected:
                break
            run.append(seg)
            expected = stop
        return run

    def rows_done(self, split: str) -> int:
        segs = self.segments(split)
        return int(segs[-1].stem.split("-")[1]) if segs else 0

    def discard_after(self, split: str) -> None:
        """Remove segments not in the contiguous run (left behind by an interrupted run)."""
        keep = set(self.segments(split))
        for seg in (self.path / split).glob("r*"):
            if seg not in keep:
                seg.unlink()

    def write_segment(self, split: str, start: int, features: np.ndarray) -> None:
        _write_npy_atomic(self.path / split / f"r{start:010d}-{start + len(features):010d}.npy",
                          features)

    def read_split(self, split: str) -> Iterator[np.ndarray]:
        for seg in self.segments(split):
            yield np.load(seg)

    def save_array(self, name: str, array: np.ndarray) -> None:
        _write_npy_atomic(self.path / f"{name}.npy", array)

    def load_array(self, name: str) -> np.ndarray | None:
        path = self.path / f"{name}.npy"
        return np.load(path) if path.exists() else None


@dataclass
class EntryStatus:
    path: Path
    key: str
    state: str  # complete | partial | corrupt
    detail: str
    attrs: dict


class FeatureStore:
    """The cache folder: maps key parts to files, locks writers, publishes complete files."""

    def __init__(self, cache_dir: str | os.PathLike = "features_cache"):
        self.cache_dir = Path(cache_dir)

    # names ------------------------------------------------------------------------------
    def name_for(self, parts: dict) -> str:
        label = "-".join(_slug(str(parts[k])) for k in ("dataset", "backbone", "mode") if k in parts)
        return f"{label}-{cache_key(parts)}"

    def path_for(self, parts: dict) -> Path:
        return self.cache_dir / f"{self.name_for(parts)}.h5"

    def partial_for(self, parts: dict) -> PartialEntry:
        return PartialEntry(self.cache_dir / f"{self.name_for(parts)}.partial")

    # locking ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, parts: dict, *, wait: bool = True, announce=print) -> Iterator[None]:
        """Exclusive writer lock on one key; a second writer waits (or fails if wait=False)."""
        try:
            (self.cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
            path = self.cache_dir / ".locks" / f"{self.name_for(parts)}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _disk_error(exc, self.cache_dir) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                if not wait:
                    raise PipelineError(f"{path.name} is being written by {holder}; "
                                        "wait for it or rerun later") from None
                announce(f"waiting for {holder}, which is writing {path.stem} ...")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock; the lock file itself stays (harmless)

    # publishing -------------------------------------------------------------------------
    def publish(self, partial: PartialEntry, parts: dict, *, classes: list[str],
                labels: dict[str, np.ndarray], attrs: dict, compression: str = "lzf",
                extra: dict[str, np.ndarray] | None = None) -> Path:
        """Assemble the segments into one checked HDF5 file and rename it into place."""
        final = self.path_for(parts)
        tmp = final.with_name(final.name + ".tmp")
        need = sum(seg.stat().st_size for s in SPLITS for seg in partial.segments(s)) + (1 << 20)
        _check_space(final, need)  # HDF5 fails badly (even crashes) when a write fails midway
        try:
            self._assemble(tmp, partial, parts, classes, labels, attrs, compression, extra or {})
            problem = check_file(tmp, expect_key=cache_key(parts), full=True)
            if problem:
                raise PipelineError(f"refusing to publish {final.name}: {problem}")
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_error(exc, final) from None
        except RuntimeError as exc:  # h5py reports failed writes as RuntimeError
            tmp.unlink(missing_ok=True)
            raise PipelineError(f"writing {final} failed ({str(exc).splitlines()[0][:160]}); "
                                "the partial work is kept: fix the cause and rerun") from None
        shutil.rmtree(partial.path, ignore_errors=True)
        return final

    def _assemble(self, tmp: Path, partial: PartialEntry, parts: dict, classes: list[str],
                  labels: dict[str, np.ndarray], attrs: dict, compression: str,
                  extra: dict[str, np.ndarray]) -> None:
        if compression not in COMPRESSIONS:
            raise PipelineError(f"unknown compression {compression!r}; use one of {COMPRESSIONS}")
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["key"] = cache_key(parts)
            f.attrs["key_parts"] = json.dumps(parts, sort_keys=True)
            for name, value in attrs.items():
                f.attrs[name] = value if isinstance(value, (int, float, str)) else json.dumps(value)
            f.create_dataset("classes", data=np.array(classes, dtype=h5py.string_dtype()))
            for name, array in extra.items():
                f.create_dataset(name, data=array)
            for split in SPLITS:
                n = len(labels[split])
                segs = partial.segments(split)
                first = np.load(segs[0], mmap_mode="r")
                row_shape, dtype = first.shape[1:], first.dtype
                rows = min(chunk_rows(int(np.prod(row_shape)) * dtype.itemsize), n)
                group = f.create_group(split)
                dset = group.create_dataset(
                    "features", shape=(n, *row_shape), dtype=dtype, chunks=(rows, *row_shape),
                    compression=None if compression == "none" else compression)
                digest, at = hashlib.sha256(), 0
                for block in partial.read_split(split):
                    if at + len(block) > n:
                        break
                    dset[at:at + len(block)] = block
                    digest.update(np.ascontiguousarray(block).tobytes())
                    at += len(block)
                dset.attrs["rows_written"] = at
                dset.attrs["sha256"] = digest.hexdigest()
                group.create_dataset("labels", data=labels[split].astype(np.int64))
            f.attrs["complete"] = True
            f.flush()

    # listing ----------------------------------------------------------------------------
    def entries(self) -> list[EntryStatus]:
        """Every cache entry: complete files, partial work and anything that fails the checks."""
        if not self.cache_dir.is_dir():
            return []
        out = []
        for path in sorted(self.cache_dir.iterdir()):
            if path.suffix == ".h5":
                problem = check_file(path)
                out.append(EntryStatus(path, _key_of(path), "corrupt" if problem else "complete",
                                       problem or "", read_attrs(path) if not problem else {}))
            elif path.suffix == ".partial" and path.is_dir():
                entry = PartialEntry(path)
                rows = {s: entry.rows_done(s) for s in SPLITS}
                out.append(EntryStatus(path, _key_of(path), "partial",
                                       ", ".join(f"{s} {r} rows" for s, r in rows.items()), {}))
        return out

    def complete_files(self) -> list[Path]:
        return [e.path for e in self.entries() if e.state == "complete"]

    def quarantine(self, path: Path) -> Path:
        """Move a bad file aside (never delete what may be the only copy)."""
        target = self.cache_dir / ".quarantine" / f"{path.name}.{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return target


def _key_of(path: Path) -> str:
    m = _NAME.match(path.name.split(".")[0])
    return m.group("key") if m else ""


def read_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    for k in ("key_parts", "provenance"):
        if k in attrs:
            attrs[k] = json.loads(attrs[k])
    return attrs


def check_file(path: Path, *, expect_key: str | None = None, full: bool = False) -> str | None:
    """Why ``path`` is not a trustworthy complete feature file, or None if it is.

    The quick check reads only metadata; ``full`` also re-hashes every row and looks for
    NaN/Inf (what ``pipeline verify`` and ``publish`` do).
    """
    expect_key = expect_key or _key_of(path)
    try:
        if path.stat().st_size == 0:
            return "empty file (zero bytes)"
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return "not a feature file of this tool (no format tag)"
            if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                return f"format version {f.attrs.get('format_version')} (expected {FORMAT_VERSION})"
            if not f.attrs.get("complete", False):
                return "not marked complete"
            parts = json.loads(f.attrs["key_parts"])
            if cache_key(parts) != f.attrs.get("key") or f.attrs.get("key") != expect_key:
                return "key parts inside do not match the key in its name (tampered or renamed)"
            n_classes = len(f["classes"])
            for split in SPLITS:
                feats, labels = f[f"{split}/features"], f[f"{split}/labels"]
                if feats.shape[0] != labels.shape[0] or feats.attrs["rows_written"] != feats.shape[0]:
                    return (f"{split}: {feats.shape[0]} feature rows, {labels.shape[0]} labels, "
                            f"{feats.attrs['rows_written']} written")
                y = labels[()]
                if len(y) and (y.min() < 0 or y.max() >= n_classes):
                    return f"{split}: labels outside 0..{n_classes - 1}"
                if full:
                    problem = _scan_features(feats)
                    if problem:
                        return f"{split}: {problem}"
    except PipelineError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        return f"unreadable or incomplete HDF5 ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def _scan_features(dset: h5py.Dataset) -> str | None:
    digest = hashlib.sha256()
    step = max(dset.chunks[0] if dset.chunks else 1024, 1024)
    for lo in range(0, dset.shape[0], step):
        block = dset[lo:lo + step]
        if not np.isfinite(block).all():
            bad = lo + int(np.argwhere(~np.isfinite(block.reshape(len(block), -1)))[0, 0])
            return f"NaN or Inf in row {bad}"
        digest.update(np.ascontiguousarray(block).tobytes())
    if digest.hexdigest() != dset.attrs.get("sha256"):
        return "features do not match their stored sha256 (modified after publishing)"
    return None


class FeatureFile:
    """A validated, complete feature file opened for reading (a context manager)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise PipelineError(f"feature file {str(self.path)!r} does not exist; run "
                                "`python -m pipeline ls` to see the cache")
        problem = check_file(self.path)
        if problem:
            raise PipelineError(f"feature file {self.path.name} cannot be used: {problem}; "
                                "`python -m pipeline verify --repair` moves it aside to rebuild")
        self._file = h5py.File(self.path, "r")
        self.attrs = read_attrs(self.path)
        self.key = self.attrs["key"]
        self.classes = [c.decode() if isinstance(c, bytes) else c for c in self._file["classes"][()]]

    def features(self, split: str) -> h5py.Dataset:
        return self._file[f"{split}/features"]

    def labels(self, split: str) -> np.ndarray:
        return self._file[f"{split}/labels"][()]

    def checksum(self) -> str:
        return hashlib.sha256("".join(self._file[f"{s}/features"].attrs["sha256"]
                                      for s in SPLITS).encode()).hexdigest()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
