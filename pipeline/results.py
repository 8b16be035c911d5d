"""Head results on disk: the one module that knows their layout.

``results/<feature file name>/<head>[-<params hash>]/`` holds ``metrics.json``, the fitted
model and ``confusion.png``; the folder is named after the feature file (``FeatureStore``'s
name: dataset, backbone, mode and key), so it says what it holds. A result is current when its
metrics name the same feature checksum, head parameters and version of the head that ran.
Results are written into a temporary folder and renamed into place under a lock, so a
half-written one is never read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.store import FeatureStore, file_lock

DEFAULT_RESULTS_DIR = "results"
RECORD = "metrics.json"


@dataclass
class ResultRecord:
    """One head fitted on one feature file (or a fusion of several): what ``metrics.json``
    holds, written (``save``) and read (``load``) only through this record. A field a later
    release adds gets a default, so every result written before still reads; keys a record
    does not know (written by a newer release) are kept in ``extra`` and written back."""

    head: str
    params: dict
    test_accuracy: float
    macro_f1: float
    fit_seconds: float
    predict_ms_per_image: float
    features: dict  # what the features were: dataset, backbone, alpha, mode, ...; "fused": [...]
    features_checksum: str  # the result is current while its features have this checksum
    head_ran: str = ""  # what ran (rbf_svm above its row limit runs as rbf_svm_approx)
    note: str | None = None
    balanced_accuracy: float | None = None
    top5_accuracy: float | None = None  # with more than 5 classes, for heads that score them
    per_class: dict = field(default_factory=dict)  # class -> precision, recall, support
    confusion_matrix: list = field(default_factory=list)
    validation_accuracy: float | None = None
    validation: dict = field(default_factory=dict)  # given (a val/ split) or carved, and how
    best_params: dict = field(default_factory=dict)
    sweep: list = field(default_factory=list)
    sweep_skipped_past_peak: list = field(default_factory=list)
    sweep_rows: int | None = None
    converged: bool | None = None
    n_train: int | None = None
    n_test: int | None = None
    features_file: str = ""
    features_key: str = ""
    features_files: list = field(default_factory=list)  # path, key, checksum of each file
    versions: dict = field(default_factory=dict)
    created: str = ""
    threads: int | None = None  # what the fit could use (--threads): not part of the answer
    solver: str = ""  # what computed the head: "oneDAL" or "scikit-learn" (not part of the answer)
    shots: int | None = None  # a learning curve's point: training images per class drawn
    draw: int | None = None  # ... and which seeded draw of them (0, 1, ...)
    head_version: int | None = None  # HeadSpec.version of head_ran (None: made before versions)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``mlp`` or ``mlp(alpha=0.001,hidden=512)``: two settings of one head stay apart."""
        return head_label(self.head_ran or self.head, self.params)

    @property
    def feature_keys(self) -> set[str]:
        return {f.get("key") for f in self.features_files} | {self.features_key} - {""}

    def is_current(self, checksum: str, params: dict, versions: Mapping[str, int]) -> bool:
        """Made from these features with these params by the head's version in ``versions``
        (``heads.head_versions()``); a record from before versions existed never is."""
        return self.stale_because(checksum, params, versions) is None

    def stale_because(self, checksum: str, params: dict, versions: Mapping[str, int]
                      ) -> str | None:
        """Why the result is not current (None: it is), in words for the log."""
        if self.features_checksum != checksum:
            return "its features changed"
        if self.params != params:
            return "its parameters changed"
        head = self.head_ran or self.head
        if self.head_version is None:
            return f"it was made before {head}'s version was recorded"
        if self.head_version != versions.get(head):
            return f"it was made by {head} version {self.head_version}, now {versions.get(head)}"
        return None

    def save(self, folder: Path) -> None:
        record = asdict(self)
        record.update(record.pop("extra"))
        (Path(folder) / RECORD).write_text(json.dumps(record, indent=2))

    @classmethod
    def load(cls, path: Path) -> ResultRecord:
        """The record in ``path`` (a result folder or its metrics.json); OSError or ValueError
        if it is missing, half-written or lacks what every record has."""
        path = Path(path)
        raw = json.loads((path / RECORD if path.is_dir() else path).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a result record")
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(**{k: v for k, v in raw.items() if k in known},
                       extra={k: v for k, v in raw.items() if k not in known})
        except TypeError as exc:  # a required field missing
            raise ValueError(f"incomplete result record ({exc})") from None


def head_label(head: str, params: dict | None = None) -> str:
    """``mlp`` or ``mlp(alpha=0.001,hidden=512)``: two settings of one head stay apart."""
    return head + (f"({','.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")


def check_results_dir(results_dir: str | Path) -> Path:
    """The results folder exists (or is made) and takes files; else one line naming it."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}-{threading.get_ident()}"  # heads side by side
        probe.touch()
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise PipelineError(f"--results-dir {str(path)!r} is not a folder (a file is in the way); "
                            "choose another --results-dir") from None
    except OSError as exc:
        raise PipelineError(f"cannot write to --results-dir {str(path)!r} ({exc.strerror}); "
                            "choose a writable --results-dir") from None
    return path


def _head_dir_name(head: str, params: dict) -> str:
    if not params:
        return head
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{head}-{digest}"


def result_dir(results_dir: str | Path, key_parts: dict, head: str, params: dict) -> Path:
    """``results/<dataset>-<backbone>-<mode>-<key>/<head>[-<params hash>]/``."""
    return Path(results_dir) / FeatureStore().name_for(key_parts) / _head_dir_name(head, params)


def curve_point_dir(results_dir: str | Path, key_parts: dict, head: str, params: dict,
                    shots: int, draw: int) -> Path:
    """``results/<feature file>/curves/<head>[-<params hash>]/<k>-shot-<draw>/``: one point of
    a learning curve (``metrics.json`` only), apart from the head's full-data result."""
    return (Path(results_dir) / FeatureStore().name_for(key_parts) / "curves"
            / _head_dir_name(head, params) / f"{shots}-shot-{draw}")


def legacy_result_dir(results_dir: str | Path, key: str, head: str, params: dict) -> Path:
    """Where results lived before folders had readable names (``results/<key>/...``)."""
    return Path(results_dir) / key / _head_dir_name(head, params)


def stale_because(out: Path, checksum: str, params: dict, versions: Mapping[str, int]
                  ) -> str | None:
    """Why the result at ``out`` is not current: None if it is, "" if there is none (or
    none that reads whole), else ``ResultRecord.stale_because``'s words."""
    try:
        record = ResultRecord.load(out)
    except (OSError, ValueError):
        return ""
    return record.stale_because(checksum, params, versions)


def is_current(out: Path, checksum: str, params: dict, versions: Mapping[str, int]) -> bool:
    return stale_because(out, checksum, params, versions) is None


@contextmanager
def locked(out: Path, legacy: Path | None = None, checksum: str = "",
           params: dict | None = None, versions: Mapping[str, int] | None = None
           ) -> Iterator[None]:
    """One writer per result folder; a current result found at its ``legacy`` place moves to
    ``out`` first (same result, now under its readable name). Holding the lock, any folder
    ``writing`` made for ``out`` was left by a writer killed mid-way (kill -9, the OOM
    killer; on whatever host): it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        for stale in [*out.parent.glob(f".{glob.escape(out.name)}.tmp-*"),
                      *out.parent.glob(f".{glob.escape(out.name)}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if legacy is not None and not out.exists() and \
                is_current(legacy, checksum, params or {}, versions or {}):
            os.replace(legacy, out)
            if not any(legacy.parent.iterdir()):
                legacy.parent.rmdir()
        yield


@contextmanager
def writing(out: Path) -> Iterator[Path]:
    """A temporary folder to fill; it replaces ``out`` when the block ends, and goes away if
    the block fails: a half-written result is never taken as done. Use it under ``locked``."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def collect(results_dir: str | Path) -> list[ResultRecord]:
    """The record of every complete result: not those of hidden folders (a result being
    written, or what a killed writer left)."""
    return list(collect_folders(results_dir).values())


def collect_folders(results_dir: str | Path, pattern: str = "*/*") -> dict[Path, ResultRecord]:
    """``collect``, by each result's folder (where its pictures and model are); with
    ``pattern="*/curves/*/*"``, the points of learning curves."""
    found = {}
    depth = pattern.count("/") + 1
    for path in sorted(Path(results_dir).glob(f"{pattern}/{RECORD}")):
        if any(part.startswith(".") for part in path.parts[-1 - depth:-1]):
            continue
        try:
            found[path.parent] = ResultRecord.load(path)
        except (OSError, ValueError):
            continue
    return found
