"""The feature cache: one HDF5 file per cache key, published only when complete.

Work in progress lives in ``<name>.shards/<split>/``: HDF5 shard files, each covering a row
range, written to a temporary name and renamed into place when complete, so a shard is there
whole or not at all and a run killed at any moment (one process or a Ray worker) resumes by
extracting only the row ranges no complete shard covers. ``publish`` makes one file of them:
``<name>.h5.tmp`` is written (a merged copy, or a virtual dataset over the shards), checked
(row counts, no NaN/Inf), given a sha256 per split and renamed to ``<name>.h5``.

A file is trusted only when its format tag, its completeness flag, its row counts and its
key (the hash of the key parts stored in it must equal the key in its name) all agree.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import logging
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

from pipeline import SPLITS
from pipeline.errors import PipelineError

DEFAULT_CACHE_DIR = "features_cache"
FORMAT = "pipeline.features"
FORMAT_VERSION = 1  # what this version writes
# Every format version this project has written, all read as they are: a layout change adds a
# version here and keeps the old ones readable (tests/fixtures/formats holds a file of each
# release's writing), so an upgrade never calls a user's cache damaged.
READABLE_FORMAT_VERSIONS = (1,)
COMPRESSIONS = ("auto", "none", "gzip", "lzf")
# Measured (make bench-cache): pooled float32 vectors shrink to 0.66 of their size with
# shuffle + gzip, but write at 48 MB/s against 1,431 without; float16 spatial maps (ReLU
# outputs, many zeros) shrink to 0.35. So "auto" compresses maps only. Every features dataset
# carries HDF5's per-chunk Fletcher-32 checksum: a damaged chunk fails on any read.
_NAME = re.compile(r"^(?P<stem>.+)-(?P<key>[0-9a-f]{16})$")
log = logging.getLogger(__name__)


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
    with _whole_or_nothing(tmp, final):
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


@contextmanager
def _whole_or_nothing(tmp: Path, final: Path) -> Iterator[None]:
    """Around writing ``tmp``, which becomes ``final``: on any failure the temporary file goes
    and the cause becomes one clear line."""
    try:
        yield
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, final) from None
    except RuntimeError as exc:  # h5py reports failed writes as RuntimeError
        tmp.unlink(missing_ok=True)
        raise PipelineError(f"writing {final} failed ({str(exc).splitlines()[0][:160]}); "
                            "the partial work is kept: fix the cause and rerun") from None
    except PipelineError:
        tmp.unlink(missing_ok=True)
        raise


def _write_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    """Numbers and strings as they are, anything else as JSON (``read_attrs`` decodes it)."""
    for name, value in attrs.items():
        obj.attrs[name] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def _move_aside(path: Path, folder: Path) -> Path:
    """Move a bad file into ``folder`` under a timestamped name (never delete what may be the
    only copy)."""
    target = folder / f"{path.name}.{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


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
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return PipelineError(f"cannot write {where}: a file is in the way of a folder there; "
                             "choose another --cache-dir")
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return PipelineError(f"cannot write {where} ({exc.strerror}); choose a writable "
                             "--cache-dir")
    return PipelineError(f"cannot write {where}: {exc}")


def filters(compression: str, row_shape: tuple) -> dict:
    """h5py dataset options for ``compression``: only filters built into the HDF5 library
    (shuffle, gzip, Fletcher-32) unless ``lzf`` (h5py's own) is asked for by name."""
    if compression not in COMPRESSIONS:
        raise PipelineError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSIONS)}")
    if compression == "auto":
        compression = "gzip" if len(row_shape) >= 3 else "none"
    options = {"fletcher32": True}
    if compression == "gzip":
        options.update(compression="gzip", compression_opts=1, shuffle=True)
    elif compression == "lzf":
        options.update(compression="lzf")
    return options


def _copy_blocks(group: h5py.Group, blocks: Iterator[np.ndarray], n: int, compression: str) -> None:
    """A chunked, checksummed (and maybe compressed) ``features`` dataset of ``n`` rows from
    blocks in row order."""
    blocks = iter(blocks)
    first = next(blocks)
    row_shape, dtype = first.shape[1:], first.dtype
    rows = min(chunk_rows(int(np.prod(row_shape)) * dtype.itemsize), max(n, 1))
    dset = group.create_dataset("features", shape=(n, *row_shape), dtype=dtype,
                                chunks=(rows, *row_shape), **filters(compression, row_shape))
    digest, at = hashlib.sha256(), 0
    for block in itertools.chain([first], blocks):
        if at + len(block) > n:
            break
        dset[at:at + len(block)] = block
        digest.update(np.ascontiguousarray(block).tobytes())
        at += len(block)
    dset.attrs["rows_written"] = at
    dset.attrs["sha256"] = digest.hexdigest()


# ----------------------------------------------------------------------------- shards

LAYOUTS = ("vds", "merge")
SHARD_FORMAT = "pipeline.features.shard"
_SHARD_NAME = re.compile(r"^r(\d{10})-(\d{10})\.h5$")


def shard_range(path: Path) -> tuple[int, int]:
    m = _SHARD_NAME.match(path.name)
    return int(m.group(1)), int(m.group(2))


@dataclass
class ShardSet:
    """Work in progress of one entry (``<name>.shards/``): shard files per split, written by
    this process or by Ray workers, and small arrays such as the bottleneck's projection.

    Each shard covers a row range and is an HDF5 file written to a temporary name and renamed
    when complete, so a killed run or a lost worker leaves no half shard. Resuming extracts
    only the row ranges no complete shard covers, whatever shard size the earlier run used.
    """

    path: Path

    def record_identity(self, attrs: dict) -> None:
        """What these shards are work for (``lineage``): once a newer file of the same
        request is complete, these are orphaned (the data changed mid-run) and `gc` removes
        them."""
        target = self.path / "identity.json"
        if not target.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.path / f".identity.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(attrs, sort_keys=True))
            os.replace(tmp, target)

    def identity(self) -> dict | None:
        try:
            return json.loads((self.path / "identity.json").read_text())
        except (OSError, ValueError):
            return None

    def save_array(self, name: str, array: np.ndarray) -> None:
        _write_npy_atomic(self.path / f"{name}.npy", array)

    def load_array(self, name: str) -> np.ndarray | None:
        path = self.path / f"{name}.npy"
        return np.load(path) if path.exists() else None

    def shard_path(self, split: str, start: int, stop: int) -> Path:
        return self.path / split / f"r{start:010d}-{stop:010d}.h5"

    def files(self, split: str) -> list[Path]:
        """Complete shards in row order (first come first kept where ranges overlap)."""
        folder = self.path / split
        found = sorted(p for p in folder.glob("r*.h5") if _SHARD_NAME.match(p.name)) \
            if folder.is_dir() else []
        out, covered = [], 0
        for path in found:
            start, stop = shard_range(path)
            if start >= covered and _shard_is_complete(path, stop - start):
                out.append(path)
                covered = stop
        return out

    def rows_done(self, split: str) -> int:
        return sum(stop - start for start, stop in map(shard_range, self.files(split)))

    def first_shard(self) -> tuple[tuple, np.dtype, dict] | None:
        """(row shape, dtype, provenance) of the first complete shard: what a worker computed
        and how (None before any shard is complete)."""
        for split in SPLITS:
            for path in self.files(split)[:1]:
                with h5py.File(path, "r") as f:
                    features = f["features"]
                    return features.shape[1:], features.dtype, json.loads(f.attrs["provenance"])
        return None

    def missing(self, split: str, n: int) -> list[tuple[int, int]]:
        """Row ranges of ``split`` (of ``n`` rows) that no complete shard covers."""
        gaps, at = [], 0
        for path in self.files(split):
            start, stop = shard_range(path)
            if start > at:
                gaps.append((at, start))
            at = stop
        if at < n:
            gaps.append((at, n))
        return gaps

    def write(self, split: str, start: int, features: np.ndarray, *, key: str, attrs: dict,
              compression: str = "auto") -> Path:
        """Write one shard whole or not at all (chunked and compressed like the final file)."""
        final = self.shard_path(split, start, start + len(features))
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        with _whole_or_nothing(tmp, final):
            final.parent.mkdir(parents=True, exist_ok=True)
            _check_space(final, features.nbytes + (64 << 10))
            with h5py.File(tmp, "w") as f:
                _write_attrs(f, {"format": SHARD_FORMAT, "key": key, "split": split,
                                 "start": start, **attrs})
                _copy_blocks(f, [features], len(features), compression)
                f.attrs["complete"] = True
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        return final

    def read_split(self, split: str) -> Iterator[np.ndarray]:
        """Each shard's rows, in order, after checking them against the shard's sha256."""
        for path in self.files(split):
            try:
                with h5py.File(path, "r") as f:
                    block = f["features"][()]
                    expected = f["features"].attrs["sha256"]
            except OSError:  # a chunk failed its checksum
                block, expected = np.zeros(0), "unreadable"
            if hashlib.sha256(np.ascontiguousarray(block).tobytes()).hexdigest() != expected:
                target = _move_aside(path, self.path / ".quarantine")
                raise PipelineError(f"shard {path} does not match its sha256 (damaged); moved "
                                    f"to {target}: rerun the same command to extract it again")
            yield block


def _shard_is_complete(path: Path, rows: int) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return (f.attrs.get("format") == SHARD_FORMAT and bool(f.attrs.get("complete"))
                    and f["features"].shape[0] == rows == f["features"].attrs["rows_written"])
    except (OSError, KeyError, ValueError):
        return False


@contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Exclusive ``flock`` on ``path``, which is removed on release (no lock files pile up).

    Removing a lock file races with a process that opened it just before: after locking, the
    file we hold must still be the one at ``path`` (same inode), else we lock again.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _disk_error(exc, path.parent) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                if not wait:
                    raise PipelineError(f"{path.name} is being written by {holder}; "
                                        "wait for it or rerun later") from None
                log.info("waiting for %s, which is writing %s ...", holder, path.stem)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us removed it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        Path(path).unlink(missing_ok=True)  # still locked: no one else holds this inode
        os.close(fd)


@dataclass
class EntryStatus:
    path: Path
    key: str
    state: str  # complete | superseded | partial | orphaned | corrupt
    detail: str
    attrs: dict


# The options that enter the key only through the dataset's fingerprint: two files that differ
# in them are different requests, not versions of one dataset.
_FINGERPRINT_OPTIONS = ("limit", "skip_bad", "seed")


def lineage(attrs: dict) -> str:
    """What two feature files of the same request share when only the data changed (new or
    edited images): every key part but the fingerprint, the options folded into it, and the
    dataset's absolute source where recorded (files written before it was, share the name)."""
    parts = {k: v for k, v in attrs.get("key_parts", {}).items() if k != "fingerprint"}
    prov = attrs.get("provenance", {})
    config = prov.get("config", {})
    return json.dumps([parts, {k: config.get(k) for k in _FINGERPRINT_OPTIONS},
                       prov.get("dataset_source")], sort_keys=True)


class FeatureStore:
    """The cache folder: maps key parts to files, locks writers, publishes complete files."""

    def __init__(self, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR):
        self.cache_dir = Path(cache_dir)

    # names ------------------------------------------------------------------------------
    def name_for(self, parts: dict) -> str:
        label = "-".join(_slug(str(parts[k])) for k in ("dataset", "backbone", "mode") if k in parts)
        return f"{label}-{cache_key(parts)}"

    def model_dir(self, model_key: dict) -> Path:
        """Where a runtime's converted graph for ``model_key`` is kept (``.models/``)."""
        label = "-".join(_slug(str(model_key[k])) for k in ("backbone", "mode") if k in model_key)
        return self.cache_dir / ".models" / f"{label}-{cache_key(model_key)}"

    @property
    def scan_dir(self) -> Path:
        """Where image-folder scans are remembered between runs (``datasets.ScanIndex``)."""
        return self.cache_dir / ".scan"

    def rows_path(self, parts: dict) -> Path:
        """Where features computed for a caller's own image array are kept (``.rows/``, one
        ``.npy`` per key: ``api.FrozenFeatures``), so a second fit or transform of the same
        images does not pay for the network again."""
        return self.cache_dir / ".rows" / f"{self.name_for(parts)}.npy"

    def load_rows(self, parts: dict) -> np.ndarray | None:
        path = self.rows_path(parts)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # none yet, or damaged: computed again
            return None

    def save_rows(self, parts: dict, rows: np.ndarray) -> None:
        _write_npy_atomic(self.rows_path(parts), rows)

    def path_for(self, parts: dict) -> Path:
        return self.cache_dir / f"{self.name_for(parts)}.h5"

    def shards_for(self, parts: dict) -> ShardSet:
        return ShardSet(self.cache_dir / f"{self.name_for(parts)}.shards")

    @staticmethod
    def reads_shards(path: Path) -> bool:
        """Whether ``path`` is a virtual dataset over its shards (or cannot be read to tell)."""
        try:
            return read_attrs(path).get("layout") == "vds"
        except (OSError, KeyError, ValueError):
            return True

    # locking ----------------------------------------------------------------------------
    def lock(self, parts: dict, *, wait: bool = True) -> contextlib.AbstractContextManager:
        """Exclusive writer lock on one key; a second writer waits (or fails if wait=False)."""
        return self._lock(self.name_for(parts), wait)

    def _lock(self, name: str, wait: bool) -> contextlib.AbstractContextManager:
        """The lock of the entry ``name`` (a file's name without its suffix: the file, its
        shards and older work of it share it)."""
        try:
            (self.cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(exc, self.cache_dir) from None
        return file_lock(self.cache_dir / ".locks" / f"{name}.lock", wait=wait)

    def remove(self, path: Path) -> None:
        """Remove a cache entry (a file with a virtual file's shards, or a folder of work),
        holding its writer lock: never from under a writer at work on it (then one line)."""
        with self._lock(path.name.split(".")[0], wait=False):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
                shutil.rmtree(path.with_suffix(".shards"), ignore_errors=True)  # a vds's rows

    # publishing -------------------------------------------------------------------------
    def publish(self, shards: ShardSet, parts: dict, *, classes: list[str],
                labels: dict[str, np.ndarray], attrs: dict, layout: str = "merge",
                compression: str = "auto", extra: dict[str, np.ndarray] | None = None,
                ids: dict[str, list[str]] | None = None) -> Path:
        """One checked file of the complete shards: a merged copy (``layout="merge"``; the
        shards go) or an HDF5 virtual dataset mapping them (``"vds"``; they stay beside it)."""
        if layout not in LAYOUTS:
            raise PipelineError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        for split in SPLITS:
            missing = shards.missing(split, len(labels[split]))
            if missing:
                raise PipelineError(f"cannot finalize {shards.path.name}: {split} rows "
                                    f"{missing[0][0]}-{missing[0][1]} have no complete shard; "
                                    "rerun the same command to extract them")
        need = (1 << 20) + (0 if layout == "vds" else
                            sum(p.stat().st_size for s in SPLITS for p in shards.files(s)))

        def write(group: h5py.Group, split: str, n: int) -> None:
            if layout == "merge":
                _copy_blocks(group, shards.read_split(split), n, compression)
                return
            files = shards.files(split)
            with h5py.File(files[0], "r") as first:
                row_shape, dtype = first["features"].shape[1:], first["features"].dtype
            vds = h5py.VirtualLayout(shape=(n, *row_shape), dtype=dtype)
            for path in files:
                start, stop = shard_range(path)
                # Relative to the cache dir: HDF5 resolves it against the file's own folder,
                # so the cache can be moved or mounted elsewhere as a whole.
                vds[start:stop] = h5py.VirtualSource(os.path.relpath(path, self.cache_dir),
                                                     "features", shape=(stop - start, *row_shape))
            dset = group.create_virtual_dataset("features", vds)
            digest = hashlib.sha256()
            for block in shards.read_split(split):  # checks each shard's own sha256 on the way
                digest.update(np.ascontiguousarray(block).tobytes())
            dset.attrs["rows_written"] = n
            dset.attrs["sha256"] = digest.hexdigest()

        final = self._publish(parts, classes, labels, {**attrs, "layout": layout}, extra or {},
                              write, need, compression, ids or {})
        if layout == "merge":
            shutil.rmtree(shards.path, ignore_errors=True)
        for leftover in shards.path.glob("*/.r*.tmp-*"):  # from workers lost mid-write
            leftover.unlink(missing_ok=True)
        return final

    def _publish(self, parts: dict, classes: list[str], labels: dict[str, np.ndarray],
                 attrs: dict, extra: dict[str, np.ndarray], write, need: int,
                 compression: str, ids: dict[str, list[str]]) -> Path:
        """Write ``<name>.h5.tmp`` (``write`` fills each split's features), check it fully,
        rename it into place; the temporary file never outlives a failure."""
        filters(compression, ())  # an unknown name fails before anything is written
        final = self.path_for(parts)
        tmp = final.with_name(final.name + ".tmp")
        _check_space(final, need)  # HDF5 fails badly (even crashes) when a write fails midway
        with _whole_or_nothing(tmp, final):
            with h5py.File(tmp, "w") as f:
                _write_attrs(f, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                 "chunk_checksums": "fletcher32", "key": cache_key(parts),
                                 "key_parts": json.dumps(parts, sort_keys=True), **attrs})
                f.create_dataset("classes", data=np.array(classes, dtype=h5py.string_dtype()))
                for name, array in extra.items():
                    f.create_dataset(name, data=array)
                for split in SPLITS:
                    group = f.create_group(split)
                    write(group, split, len(labels[split]))
                    group.create_dataset("labels", data=labels[split].astype(np.int64))
                    if split in ids:
                        _write_ids(group, ids[split])
                f.attrs["complete"] = True
                f.flush()
            problem = check_file(tmp, expect_key=cache_key(parts), full=True)
            if problem:
                raise PipelineError(f"refusing to publish {final.name}: {problem}")
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        return final

    def refresh_ids(self, path: Path, parts: dict, ids: dict[str, list[str]]) -> bool:
        """Make ``path``'s row ids the dataset's current ones; True if they changed.

        Ids are not in the key: the features follow from the images' content, and an image
        folder whose files were renamed (same bytes, same order) keeps its key and its file.
        Only the names move, so only they are rewritten (a new copy swapped in whole, under
        the key's lock), and the features stay untouched."""
        if stored_ids_match(path, ids):
            return False
        with self.lock(parts):
            if stored_ids_match(path, ids):
                return False
            with h5py.File(path, "r") as f:
                if f["train/features"].is_virtual:
                    return False  # a virtual file points at its shards by relative path
            tmp = path.with_name(path.name + ".tmp")
            with _whole_or_nothing(tmp, path):
                shutil.copyfile(path, tmp)
                with h5py.File(tmp, "r+") as f:
                    for split, names in ids.items():
                        if "ids" in f[split]:
                            del f[split]["ids"]
                        _write_ids(f[split], names)
                problem = check_file(tmp, expect_key=_key_of(path))
                if problem:
                    raise PipelineError(f"refusing to update the ids of {path.name}: {problem}")
                os.replace(tmp, path)
                _fsync_dir(path.parent)
        return True

    # listing ----------------------------------------------------------------------------
    def entries(self) -> list[EntryStatus]:
        """Every cache entry: complete files, partial work and anything that fails the checks.
        Of the complete files of one request (``lineage``) only the newest is current: the
        others, and shards left for the request's older data, are marked for ``gc``."""
        out = self._raw_entries()
        newest: dict[str, EntryStatus] = {}
        for e in out:
            if e.state == "complete":
                line = lineage(e.attrs)
                if line not in newest or _created(e) >= _created(newest[line]):
                    newest[line] = e
        for e in out:
            current = newest.get(lineage(e.attrs)) if e.state == "complete" else None
            if current is not None and current is not e:
                e.state = "superseded"
                e.detail = (f"older data than {current.path.name} (same request); "
                            "`python -m pipeline gc` removes it")
            elif e.state == "partial" and e.path.suffix == ".shards":
                identity = ShardSet(e.path).identity()
                current = newest.get(lineage(identity)) if identity else None
                if current is not None:
                    e.state = "orphaned"
                    e.detail = (f"work for older data than {current.path.name}; "
                                "`python -m pipeline gc` removes it")
        return out

    def _raw_entries(self) -> list[EntryStatus]:
        if not self.cache_dir.is_dir():
            return []
        out = []
        for path in sorted(self.cache_dir.iterdir()):
            if path.suffix == ".h5":
                problem = check_file(path)
                out.append(EntryStatus(path, _key_of(path), "corrupt" if problem else "complete",
                                       problem or "", read_attrs(path) if not problem else {}))
            elif path.suffix == ".partial" and path.is_dir():  # segments, as this tool wrote them before
                out.append(EntryStatus(path, _key_of(path), "partial", "an older version's work "
                                       "in progress, which this one does not resume: delete it", {}))
            elif path.suffix == ".shards" and path.is_dir() and not path.with_suffix(".h5").exists():
                shards = ShardSet(path)
                done = {s: len(shards.files(s)) for s in SPLITS}
                counts = ", ".join(f"{s} {n} shard{'' if n == 1 else 's'} done" for s, n in done.items())
                out.append(EntryStatus(path, _key_of(path), "partial",
                                       f"{counts}; rerun its extract command to resume", {}))
        return out

    def find(self, name_or_key: str) -> Path:
        """A feature file named by its path, or by its key (or file name) in this cache."""
        path = Path(name_or_key)
        if path.exists() or path.suffix == ".h5":
            return path
        hits = sorted(p for p in self.cache_dir.glob("*.h5")
                      if _key_of(p) == name_or_key or p.stem == name_or_key) \
            if self.cache_dir.is_dir() else []
        if len(hits) != 1:
            raise PipelineError(f"no feature file with key or name {name_or_key!r} in "
                                f"{self.cache_dir}/; `python -m pipeline ls` lists them")
        return hits[0]

    def complete_files(self) -> list[Path]:
        """The current complete file of every request (superseded versions left out)."""
        return [e.path for e in self.entries() if e.state == "complete"]

    def superseded_keys(self) -> set[str]:
        return {e.key for e in self.entries() if e.state == "superseded"}

    def garbage(self) -> list[EntryStatus]:
        """What `gc` removes: superseded files, orphaned shards, an older version's work."""
        return [e for e in self.entries() if e.state in ("superseded", "orphaned")
                or (e.state == "partial" and e.path.suffix == ".partial")]

    def quarantine(self, path: Path) -> Path:
        """Move a bad file to ``.quarantine/``."""
        return _move_aside(path, self.cache_dir / ".quarantine")


def _created(entry: EntryStatus) -> str:
    """When a file's extraction finished (ISO 8601, one time zone per machine), then its name."""
    return f"{entry.attrs.get('provenance', {}).get('created', '')}|{entry.path.name}"


def _key_of(path: Path) -> str:
    m = _NAME.match(path.name.split(".")[0])
    return m.group("key") if m else ""


def memory_budget(gb: float | None = None) -> float:
    """Bytes features may take in memory: ``gb`` if given, else half of what is free now."""
    if gb:
        return gb * 2**30
    try:
        return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def _write_ids(group: h5py.Group, ids: list[str]) -> None:
    group.create_dataset("ids", data=np.array(ids, dtype=h5py.string_dtype()))


def stored_ids_match(path: Path, ids: dict[str, list[str]]) -> bool:
    with h5py.File(path, "r") as f:
        return all("ids" in f[split] and f[split]["ids"].asstr()[()].tolist() == names
                   for split, names in ids.items())


def read_attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    for k in ("key_parts", "provenance"):
        if k in attrs:
            attrs[k] = json.loads(attrs[k])
    return attrs


NEWER_FORMAT = "written by a newer version of this tool"  # not damage: never moved aside


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
            version = int(f.attrs.get("format_version", -1))
            if version > max(READABLE_FORMAT_VERSIONS):
                return (f"{NEWER_FORMAT} (format version {version}; this one reads "
                        f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}): upgrade transfer-pipeline")
            if version not in READABLE_FORMAT_VERSIONS:
                return f"format version {version}, which this tool never wrote"
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
                if feats.is_virtual:
                    for source in feats.virtual_sources():
                        if not (path.parent / source.file_name).is_file():
                            return (f"{split}: shard {source.file_name} of its virtual dataset is "
                                    "missing (reading it would give zeros)")
                if "ids" in f[split] and f[split]["ids"].shape[0] != labels.shape[0]:
                    return f"{split}: {f[split]['ids'].shape[0]} row ids for {labels.shape[0]} rows"
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
    """Read every chunk (each checks its Fletcher-32 sum), look for NaN/Inf, re-hash."""
    digest = hashlib.sha256()
    step = max(dset.chunks[0] if dset.chunks else 1024, 1024)
    for lo in range(0, dset.shape[0], step):
        try:
            block = dset[lo:lo + step]
        except OSError as exc:
            return (f"rows {lo}-{min(lo + step, dset.shape[0])} cannot be read: a chunk fails its "
                    f"checksum or is damaged ({str(exc).splitlines()[0][:80]})")
        if not np.isfinite(block).all():
            bad = lo + int(np.argwhere(~np.isfinite(block.reshape(len(block), -1)))[0, 0])
            return f"NaN or Inf in row {bad}"
        digest.update(np.ascontiguousarray(block).tobytes())
    if digest.hexdigest() != dset.attrs.get("sha256"):
        return "features do not match their stored sha256 (modified after publishing)"
    return None


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Around reads of a feature file's rows: a chunk that fails its checksum (or cannot be
    read) becomes one line naming the file and what to do, never a traceback or bad rows."""
    try:
        yield
    except OSError as exc:
        raise PipelineError(f"feature file {path} is damaged: reading its features failed "
                            f"({str(exc).splitlines()[0][:120]}); `python -m pipeline verify --repair` "
                            "moves it aside, then rerun the extraction (or `extract --rebuild`)") from None


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

    def _split(self, split: str) -> str:
        if split not in SPLITS:
            raise PipelineError(f"split {split!r}: a feature file holds {' and '.join(SPLITS)}")
        return split

    def features(self, split: str) -> h5py.Dataset:
        """The rows of ``split`` on disk (h5py: read in chunks by slicing, e.g. ``[:1000]``)."""
        return self._file[f"{self._split(split)}/features"]

    def labels(self, split: str) -> np.ndarray:
        return self._file[f"{self._split(split)}/labels"][()]

    def load(self, split: str, *, memory_budget_gb: float | None = None
             ) -> tuple[np.ndarray | h5py.Dataset, np.ndarray]:
        """(X, y) of ``split``: X as a float32 numpy array (float16 spatial maps as stored),
        y the class indices into ``classes``. Rows that would take more than the memory budget
        (default: half of what is free) stay on disk: X is then the h5py dataset, read in
        chunks by slicing, and a line says so."""
        dset, y = self.features(split), self.labels(split)
        dtype = np.float32 if dset.dtype != np.float16 else dset.dtype
        need = dset.size * np.dtype(dtype).itemsize
        budget = memory_budget(memory_budget_gb)
        if need > budget:
            log.warning("%s: %s features take %.1f GiB, over the %.1f GiB budget: returned on disk "
                        "(an h5py dataset; slice it to read rows)", self.path.name, split,
                        need / 2**30, budget / 2**30)
            return dset, y
        with reading(self.path):
            return dset[()].astype(dtype, copy=False), y

    @property
    def provenance(self) -> dict:
        """How the file was made: the options, dataset source, runtime, versions, machine,
        time and speed of the extraction."""
        return self.attrs.get("provenance", {})

    @property
    def validation_rows(self) -> int:
        """How many of the last training rows are the user's own validation split (0: none;
        heads then carve one)."""
        return int(self.attrs.get("validation_rows", 0))

    def ids(self, split: str) -> list[str] | None:
        """What image each row of ``split`` is (see ``datasets.Split.row_ids``); None for a
        file written before rows named their images (extract it again with --rebuild to get
        them)."""
        group = self._file[split]
        return group["ids"].asstr()[()].tolist() if "ids" in group else None

    def skipped_files(self) -> list[str]:
        """Images ``--skip-bad`` left out, with the reason for each."""
        if "skipped_files" not in self._file:
            return []
        return [v.decode() if isinstance(v, bytes) else v for v in self._file["skipped_files"][()]]

    def checksum(self) -> str:
        return hashlib.sha256("".join(self._file[f"{s}/features"].attrs["sha256"]
                                      for s in SPLITS).encode()).hexdigest()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
