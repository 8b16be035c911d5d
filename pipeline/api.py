"""The Python API, for notebooks: the command line's cache, keys, files and result records,
called from Python (``from pipeline import extraction as extract, train, compare, FrozenFeatures``).

It sits on the top floor beside ``cli``: it calls the stages below it and adds no behaviour
of its own but ``FrozenFeatures``, the cache as a scikit-learn transformer.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from pipeline import reports, results, training
from pipeline.datasets import as_images
from pipeline.errors import PipelineError
from pipeline.extraction import ExtractionConfig, Progress, extract_features, start_model
from pipeline.options import MODES, option_fields
from pipeline.results import ResultRecord
from pipeline.store import DEFAULT_CACHE_DIR, FeatureFile, FeatureStore, cache_key

log = logging.getLogger(__name__)


def _config(where: str, options: dict) -> ExtractionConfig:
    unknown = sorted(set(options) - set(option_fields()))
    if unknown:
        raise PipelineError(f"{where}: unknown option(s) {', '.join(unknown)}; options: "
                            f"{', '.join(option_fields())}")
    config = ExtractionConfig(**options)
    config.validate()
    return config


def extract(dataset: str, backbone: str = "mobilenet_v2", *, rebuild: bool = False,
            **options) -> FeatureFile:
    """Features of ``dataset`` by ``backbone``, from the cache or extracted now: the same key,
    file and progress as ``python -m pipeline extract`` with the same options (``mode``,
    ``alpha``, ``image_size``, ``layers``, ``limit``, ``cache_dir``, ... as in
    ``ExtractionConfig``). Returns at once when the file is up to date."""
    config = _config("extract()", {"dataset": dataset, "backbone": backbone, **options})
    return FeatureFile(extract_features(config, rebuild=rebuild).path)


def _feature_paths(features) -> Path | list[Path]:
    if isinstance(features, FeatureFile):
        return features.path
    if isinstance(features, (str, os.PathLike)):
        return Path(features)
    if isinstance(features, (list, tuple)) and features and all(
            isinstance(f, (FeatureFile, str, os.PathLike)) for f in features):
        paths = [_feature_paths(f) for f in features]
        return paths[0] if len(paths) == 1 else paths
    raise PipelineError(f"features: got {type(features).__name__}; give a FeatureFile (what "
                        "extract() returns), a feature file's path, or a list of them (fused)")


def train(features, head: str, params: dict | None = None, *,
          results_dir: str | os.PathLike = results.DEFAULT_RESULTS_DIR,
          threads: int | None = None, force: bool = False,
          memory_budget_gb: float | None = None) -> ResultRecord:
    """Fit ``head`` on ``features`` (one feature file, or a list of files fused side by side)
    with ``params``, as ``python -m pipeline train`` does: the result folder (model,
    metrics.json, confusion.png, mistakes.csv/.png) is written, or found up to date, and its
    record returned."""
    if params is not None and not isinstance(params, dict):
        raise PipelineError(f"params: got {type(params).__name__}; give a dict such as "
                            "{'C': 1.0}")
    _, folder = training.train_one(_feature_paths(features), head, params,
                                   results_dir=results_dir, threads=threads, force=force,
                                   memory_budget_gb=memory_budget_gb)
    return ResultRecord.load(folder)


def compare(results_dir: str | os.PathLike = results.DEFAULT_RESULTS_DIR, *,
            cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, quiet: bool = True
            ) -> list[dict]:
    """The comparison ``python -m pipeline compare`` makes: one row per result (the columns of
    compare.csv), best test accuracy first per dataset; compare.csv/.md/.png and report.html
    are written to ``results_dir``."""
    return reports.compare(results_dir, cache_dir=cache_dir,
                           out=(lambda *_: None) if quiet else print)


class FrozenFeatures(TransformerMixin, BaseEstimator):
    """A frozen backbone as the first step of a scikit-learn ``Pipeline``: images in, pooled
    feature vectors out (float32), computed by the same graph and runtime as ``extract`` and
    kept in the cache (``cache_dir/.rows``), so fitting a pipeline twice, or a grid search
    over the head, runs the network once per distinct set of images.

    ``X``: an image array (n, h, w) or (n, h, w, c), uint8 (or ints 0-255, floats 0-1), or a
    list of image file paths. Modes give vectors only: ``avg`` or ``max``; bottleneck and
    spatial features come from ``extract``."""

    def __init__(self, backbone: str = "mobilenet_v2", mode: str = "avg", alpha: float | None = None,
                 weights: str = "imagenet", image_size: int | None = None, layers: tuple = (),
                 tta: str = "none", runtime: str = "auto", batch_size: int = 64,
                 cache_dir: str = DEFAULT_CACHE_DIR):
        self.backbone = backbone
        self.mode = mode
        self.alpha = alpha
        self.weights = weights
        self.image_size = image_size
        self.layers = layers
        self.tta = tta
        self.runtime = runtime
        self.batch_size = batch_size
        self.cache_dir = cache_dir

    def _checked_config(self) -> ExtractionConfig:
        options = {name: getattr(self, name) for name in self.get_params()}
        config = _config(type(self).__name__, {"dataset": "cifar10", **options})
        if not MODES[config.mode].pool:
            raise PipelineError(f"FrozenFeatures(mode={config.mode!r}): it gives vectors, mode "
                                f"{' or '.join(m for m, spec in MODES.items() if spec.pool)}; "
                                f"{config.mode} features come from extract()")
        return config

    def fit(self, X, y=None):
        """Check the options and the images; the backbone is frozen, so nothing is learnt
        (one image goes through it, for the width ``get_feature_names_out`` names)."""
        images = self._start(X)
        self.n_features_out_ = self._model(images.shape[1:]).graph_features(images[:1]).shape[1]
        return self

    def fit_transform(self, X, y=None) -> np.ndarray:
        images = self._start(X)
        rows = self._features(images)
        self.n_features_out_ = rows.shape[1]
        return rows

    def _start(self, X) -> np.ndarray:
        self.config_ = self._checked_config()
        return as_images(X, self.config_.input_size)

    def transform(self, X) -> np.ndarray:
        if not hasattr(self, "config_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("FrozenFeatures is not fitted yet; call fit (or fit_transform)")
        return self._features(as_images(X, self.config_.input_size))

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        if not hasattr(self, "n_features_out_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("FrozenFeatures is not fitted yet; call fit first")
        prefix = f"{self.backbone}_{self.mode}"
        return np.array([f"{prefix}{i}" for i in range(self.n_features_out_)], dtype=object)

    def _features(self, images: np.ndarray) -> np.ndarray:
        config = self.config_
        store = FeatureStore(config.cache_dir)
        digest = hashlib.sha256(images.tobytes()).hexdigest()
        parts = {**config.model_key(images.shape[1:]), "images": [len(images), digest]}
        rows = store.load_rows(parts)
        if rows is not None and len(rows) == len(images):
            return rows
        model = self._model(images.shape[1:])
        progress = Progress(f"{config.backbone} {config.mode}", len(images))
        out = []
        try:
            batches = (images[lo:lo + config.batch_size]
                       for lo in range(0, len(images), config.batch_size))
            for features in model.map(batches):
                out.append(features.reshape(len(features), -1))
                progress.update(len(features))
        finally:
            progress.close()
        rows = np.concatenate(out).astype(np.float32, copy=False)
        store.save_rows(parts, rows)
        log.debug("features of %d images kept as %s (key %s)", len(images),
                  store.rows_path(parts).name, cache_key(parts))
        return rows

    def _model(self, image_shape: tuple):
        """The running model for these options and this image size (kept between calls; new
        parameters, ``set_params``, get a new one)."""
        models = self.__dict__.setdefault("_models", {})
        key = cache_key(self.config_.model_key(image_shape))
        if key not in models:
            models[key] = start_model(self.config_, image_shape, self.config_.runtime)[0]
        return models[key]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_models", None)  # a running model is not pickled: made again on first use
        return state


__all__ = ["extract", "train", "compare", "FrozenFeatures"]
