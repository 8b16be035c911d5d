"""Command line: ``python -m pipeline COMMAND`` (also installed as ``pipeline``).

Every PipelineError ends the program with its one-line message and exit code 2 (``--debug``
adds the traceback and the original cause). Messages go through ``logging`` to stderr
(``-v`` more, ``-q`` warnings only); tables and listings, the commands' answers, to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from dataclasses import MISSING
from pathlib import Path

from pipeline.errors import LANE, PipelineError
from pipeline.results import DEFAULT_RESULTS_DIR
from pipeline.store import DEFAULT_CACHE_DIR

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out
log = logging.getLogger("pipeline")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive number")
    return value


def _add_option(p: argparse.ArgumentParser, name: str, **override) -> None:
    """The flag of extraction option ``name``, made from its one declaration
    (``options.ExtractionConfig``); its old spellings are flags too."""
    from pipeline.options import option_fields, option_type

    f, (kind, _) = option_fields()[name], option_type(name)
    meta = f.metadata
    flags = [meta["flag"] or f"--{name.replace('_', '-')}",
             *(f"--{alias.replace('_', '-')}" for alias in meta["aliases"])]
    kw = {"dest": name, "help": meta["help"], "default": f.default}
    if kind is bool:
        kw["action"] = "store_true"
    elif kind is tuple:
        kw.update(action="append", default=[])
    else:
        kw["type"] = {int: positive_int, float: positive_float}.get(kind, str) \
            if meta["positive"] else kind
        if meta["choices"]:
            kw["choices"] = meta["choices"]
    if f.default is MISSING:
        kw.update(required=True, default=None)
    p.add_argument(*flags, **{**kw, **override})


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    from pipeline.options import option_fields

    for name, f in option_fields().items():
        if f.metadata["flag"] is not None:
            _add_option(p, name)
    p.add_argument("--rebuild", action="store_true", help="replace a damaged or existing file")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="ray: spread the work over a Ray cluster (pip install .[ray])")
    p.add_argument("--address", default=None,
                   help="Ray cluster: auto | ray://HOST:PORT (default: start a local one)")
    p.add_argument("--shards", type=int, default=None,
                   help="shards per split (default: 4 per actor)")
    p.add_argument("--layout", choices=("vds", "merge"), default="vds",
                   help="how shards become one file: HDF5 virtual dataset, or a merged copy")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance")


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="cores the heads may use in all, sweep workers and BLAS together: fewer "
                        "on a shared machine (default: every core this process is given)")


def _engine(args):
    """The Ray engine when asked for; only then is Ray imported."""
    if args.engine != "ray":
        return None
    try:
        from pipeline.engine import RayEngine
    except ImportError:
        raise PipelineError("--engine ray needs Ray: pip install '.[ray]' (or make install RAY=1)"
                            ) from None
    return RayEngine(args.address, shards=args.shards, layout=args.layout, num_cpus=args.num_cpus)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default; ``{heads}`` in a help text lists the registered heads
    (imported only when help is shown: scikit-learn's import would slow every command)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # An option without a default (its help says what it falls back to) gets no "(default: None)".
        return action.help if action.default is None else super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        text = super()._expand_help(action)
        if "{heads}" in text:
            from pipeline.heads import HEADS

            text = text.replace("{heads}", ", ".join(HEADS))
        return text


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes get one line and exit code 2, like every other bad input."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="pipeline", description=__doc__.splitlines()[0])
    common = OneLineParser(add_help=False)
    # Given on the command line, these win over an experiment file's (run); unset, each
    # command takes its default (filled in by main).
    common.add_argument("--cache-dir", help=f"feature cache folder (default: {DEFAULT_CACHE_DIR}; "
                        "for run, the experiment file's cache_dir)")
    common.add_argument("--results-dir", help=f"head results folder (default: "
                        f"{DEFAULT_RESULTS_DIR}; for run, the experiment file's results_dir)")
    common.add_argument("-v", "--verbose", action="store_true", help="more messages")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    common.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback and its original cause")
    sub = parser.add_subparsers(dest="command", required=True)
    real_add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: real_add_parser(*a, parents=[common], **k)

    p = sub.add_parser("extract", help="extract features into the cache")
    _add_extract_args(p)
    _add_engine_args(p)
    sub.add_parser("backbones", help="list the backbones")
    sub.add_parser("ls", help="list cache entries")
    p = sub.add_parser("inspect", help="print one feature file")
    p.add_argument("file", help="a feature file, or its key as `ls` prints it")
    p = sub.add_parser("gc", help="remove superseded feature files (older versions of the same "
                       "data) and orphaned work in progress")
    p.add_argument("--yes", action="store_true", help="remove without asking")
    p = sub.add_parser("verify", help="fully check every cache file (hashes, NaN)")
    p.add_argument("--repair", action="store_true",
                   help="move bad files to .quarantine/ and remove orphaned work in progress")

    p = sub.add_parser("train", help="train a head on cached features")
    p.add_argument("--head", required=True, action="append", dest="heads",
                   help="the head to train (repeatable): {heads}")
    p.add_argument("--features", nargs="*", default=None,
                   help="feature files or their keys (default: the current complete file of "
                        "every request; superseded versions are left out)")
    p.add_argument("--fuse", action="store_true",
                   help="train on the --features files side by side (same dataset, no re-extraction)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="head parameter, e.g. --param C=1.0 (repeatable)")
    p.add_argument("--memory-budget-gb", type=positive_float, default=None,
                   help="memory the features may take; beyond it, a head that can streams them "
                        "from the file (default: half of the free memory)")
    p.add_argument("--force", action="store_true", help="retrain even if up to date")
    p.add_argument("--shots", default=None, metavar="K,K,...",
                   help="learning curve: train on K images per class (seeded draws from the "
                        "cached rows, validation carved from them), e.g. 1,5,10,25,100,all")
    p.add_argument("--tries", type=positive_int, default=None,
                   help="with --shots: seeded draws per K (default: 5)")
    _add_threads_arg(p)

    sub.add_parser("compare", help="table, CSV, Markdown and plot of every result")

    p = sub.add_parser("run", help="plan and run an experiment grid")
    p.add_argument("--config", default=None, help="experiment TOML (default: experiments/default.toml)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (what is up to date, what would run) and do nothing")
    p.add_argument("--stage", choices=("features", "heads", "compare", "all"), default="all",
                   help="run only this stage of the grid (each reruns only what is stale)")
    p.add_argument("--datasets", default=None, help="space-separated override of the grid's datasets")
    p.add_argument("--backbones", default=None, help="space-separated override of the backbones")
    p.add_argument("--heads", default=None, help="space-separated override of the heads")
    for name in ("limit", "rescan", "runtime"):  # over the experiment file's
        _add_option(p, name, default=None)
    _add_threads_arg(p)
    _add_engine_args(p)

    return parser


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.threadName.startswith(LANE):  # a head trained beside others: say which
            text = f"[{record.threadName[len(LANE):]}] {text}"
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Our messages on stderr, one line each; libraries' loggers stay at warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): handled like Ctrl-C, the partial work kept."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        args.cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
        args.results_dir = args.results_dir or DEFAULT_RESULTS_DIR
    setup_logging(args.verbose, args.quiet)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args) or 0
    except PipelineError as exc:
        if args.debug:
            _print_cause(exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        return _interrupted(interrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
        log.handlers.clear()  # leave logging as we found it (main may run inside a test or app)
        log.propagate, log.level = True, logging.NOTSET


def _interrupted(exc: KeyboardInterrupt) -> int:
    print(f"{'terminated' if isinstance(exc, Terminated) else 'interrupted'}: partial work is "
          "kept; rerun the same command to resume", file=sys.stderr)
    return 143 if isinstance(exc, Terminated) else 130


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM that ``exc`` was raised while handling, if any. One that lands
    inside threading's own lock handling (a ``Condition.wait`` in ``future.result()``)
    leaves that lock half-released, and its ``with`` then raises ``RuntimeError: cannot
    release un-acquired lock`` in its place: still the user's stop, not a crash. The work
    is kept either way (every cleanup on the way catches BaseException)."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__context__
    return None


def _print_cause(exc: BaseException) -> None:
    """The traceback, and the original error our one line replaced (``raise ... from None``
    hides it from the default display, not from ``__context__``)."""
    traceback.print_exception(exc, file=sys.stderr)
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        print("original cause:", file=sys.stderr)
        traceback.print_exception(cause, file=sys.stderr)


def cmd_extract(args) -> int:
    from pipeline.extraction import extract_features
    from pipeline.options import ExtractionConfig, option_fields

    config = ExtractionConfig(**{name: getattr(args, name) for name in option_fields()
                                 if hasattr(args, name)})  # all but the seed have flags
    engine = _engine(args)
    if engine is None:
        extract_features(config, rebuild=args.rebuild)
        return 0
    with engine:
        engine.extract(config, rebuild=args.rebuild)
    return 0


def cmd_backbones(args) -> int:
    from pipeline.backbones import BACKBONES

    print(f"{'name':22} {'keras.applications':20} {'input':>5} {'width':>6}  alpha")
    for spec in BACKBONES.values():
        print(f"{spec.name:22} {spec.keras_name:20} {spec.input_size:5d} {spec.width:6d}  "
              f"{'yes' if spec.has_alpha else ''}")
    return 0


def _size(path: Path) -> int:
    """Bytes on disk, with the shard files a virtual-dataset file reads from."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    shards = path.with_suffix(".shards")
    return path.stat().st_size + (_size(shards) if shards.is_dir() else 0)


def cmd_ls(args) -> int:
    from pipeline.store import FeatureStore

    entries = FeatureStore(args.cache_dir).entries()
    if not entries:
        print(f"{args.cache_dir}: no cache entries")
        return 0
    for e in entries:
        mb = _size(e.path) / 2**20
        state = e.state
        if e.state == "complete":  # ls reads metadata only: say so
            prov = e.attrs.get("provenance", {})
            shape = "x".join(str(d) for d in prov.get("feature_shape", []))
            rows = prov.get("dataset_splits", {})
            checked = ("every read checksummed" if e.attrs.get("chunk_checksums")
                       else "no chunk checksums: an older file, `extract --rebuild` adds them")
            detail = f"train {rows.get('train')} test {rows.get('test')} x {shape}; {checked}"
            state = "complete (not verified)"
        else:
            detail = e.detail
        print(f"{state:23} {e.key:16} {mb:9.2f} MiB  {e.path.name}  {detail}")
    if any(e.state == "complete" for e in entries):
        print("(`python -m pipeline verify` reads every row and checks it)")
    old = sum(e.state in ("superseded", "orphaned") for e in entries)
    if old:
        print(f"({old} superseded or orphaned entries, older data than the current files: "
              "`python -m pipeline gc` removes them)")
    return 0


def cmd_inspect(args) -> int:
    from pipeline.store import FeatureFile, FeatureStore

    with FeatureFile(FeatureStore(args.cache_dir).find(args.file)) as f:
        print(json.dumps(f.attrs, indent=2, default=_json_value))
        for split in ("train", "test"):
            d = f.features(split)
            storage = (f"virtual over {len(d.virtual_sources())} shard files" if d.is_virtual
                       else f"chunks={d.chunks} compression={d.compression}")
            ids = f.ids(split)
            named = (f"row ids e.g. {ids[0]!r}" if ids else
                     "no row ids (written before rows named their images; the next extract adds them)")
            print(f"{split}: features {d.shape} {d.dtype} {storage}, labels {f.labels(split).shape}, "
                  f"{named}")
        print(f"classes: {', '.join(f.classes)}")
        skipped = f.skipped_files()
        if skipped:
            print(f"skipped files ({len(skipped)}):")
            print("\n".join(f"  {line}" for line in skipped))
    return 0


def _json_value(value):
    """numpy scalars as JSON numbers and booleans (``True``, not ``"True"``)."""
    return value.item() if hasattr(value, "item") else str(value)


def cmd_verify(args) -> int:
    from pipeline.store import NEWER_FORMAT, FeatureStore, check_file

    store = FeatureStore(args.cache_dir)
    bad = 0
    for e in store.entries():
        if e.state == "orphaned" and args.repair:
            store.remove(e.path)
            print(f"removed   {e.path.name}: {e.detail.split(';')[0]}")
            continue
        if e.state in ("partial", "orphaned"):
            print(f"{e.state:9} {e.path.name}: {e.detail}")
            continue
        problem = check_file(e.path, full=True)
        if problem is None:
            note = "" if e.attrs.get("chunk_checksums") else " (no chunk checksums: an older file)"
            print(f"verified  {e.path.name}{note}")
            continue
        if problem.startswith(NEWER_FORMAT):  # a newer tool's good file: never moved aside
            print(f"NEWER     {e.path.name}: {problem}")
            continue
        bad += 1
        if args.repair:
            moved = store.quarantine(e.path)
            print(f"moved     {e.path.name}: {problem} -> {moved} (rerun extraction to rebuild)")
        else:
            print(f"BAD       {e.path.name}: {problem}")
    if bad and not args.repair:
        print(f"{bad} bad file(s); `python -m pipeline verify --repair` moves them aside",
              file=sys.stderr)
        return 1
    return 0


def cmd_train(args) -> int:
    from pipeline.training import train_heads

    train_heads(args.heads, features=args.features, cache_dir=args.cache_dir,
                results_dir=args.results_dir, params=args.param,
                memory_budget_gb=args.memory_budget_gb, force=args.force, fuse=args.fuse,
                threads=args.threads, shots=args.shots, tries=args.tries)
    return 0


def cmd_compare(args) -> int:
    from pipeline.reports import compare

    compare(args.results_dir, cache_dir=args.cache_dir)
    return 0


def cmd_gc(args) -> int:
    """Remove superseded feature files and orphaned work, after asking (or with --yes)."""
    from pipeline.store import FeatureStore

    store = FeatureStore(args.cache_dir)
    garbage = store.garbage()
    if not garbage:
        print(f"{args.cache_dir}: nothing to remove (no superseded files or orphaned work)")
        return 0
    total = sum(_size(e.path) for e in garbage) / 2**20
    for e in garbage:
        print(f"{e.state:10} {e.path.name}  {e.detail.split(';')[0]}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise PipelineError(f"gc would remove {len(garbage)} cache entries ({total:.1f} MiB); "
                                "rerun with --yes to remove them")
        answer = input(f"remove these {len(garbage)} entries ({total:.1f} MiB)? [y/N] ")
        if answer.strip().lower() != "y":
            print("kept everything")
            return 1
    removed = 0
    for e in garbage:
        try:
            store.remove(e.path)
            removed += 1
        except PipelineError as exc:  # locked: being written right now
            log.warning("kept %s: %s", e.path.name, exc)
    print(f"removed {removed} entries ({total:.1f} MiB)" if removed == len(garbage)
          else f"removed {removed} of {len(garbage)} entries")
    return 0


def cmd_run(args) -> int:
    from pipeline.experiments import load_experiment, run_experiment

    experiment = load_experiment(args.config, datasets=args.datasets, backbones=args.backbones,
                                 heads=args.heads, limit=args.limit)
    experiment.options.update({name: getattr(args, name) for name in ("rescan", "runtime", "cache_dir")
                               if getattr(args, name) is not None})
    if args.results_dir is not None:
        experiment.results_dir = args.results_dir
    engine = None if args.dry_run else _engine(args)
    if engine is None:
        return run_experiment(experiment, stage=args.stage, dry_run=args.dry_run,
                              threads=args.threads)
    with engine:
        return run_experiment(experiment, stage=args.stage, extract=engine.extract,
                              map_calls=engine.map, scan_map=engine.scan_map, threads=args.threads)


COMMANDS = {"extract": cmd_extract, "backbones": cmd_backbones, "ls": cmd_ls,
            "inspect": cmd_inspect, "verify": cmd_verify, "train": cmd_train,
            "compare": cmd_compare, "run": cmd_run, "gc": cmd_gc}
