"""Cached transfer-learning features with classical classifiers.

The public Python API (see the README's "From Python"): these names are stable. They are
imported on first use, so ``import pipeline`` stays cheap (no TensorFlow, no scikit-learn).
"""

__version__ = "0.1.0"
SPLITS = ("train", "test")  # every dataset and feature file has these, in this order

# name -> the module that defines it, declared once: __getattr__ and __all__ read it.
_PUBLIC = {
    "extract": "pipeline.api", "train": "pipeline.api", "compare": "pipeline.api",
    "FrozenFeatures": "pipeline.api",
    "FeatureFile": "pipeline.store", "FeatureStore": "pipeline.store",
    "ExtractionConfig": "pipeline.options",
    "make_head": "pipeline.heads", "HEADS": "pipeline.heads",
    "ResultRecord": "pipeline.results",
    "PipelineError": "pipeline.errors",
}
__all__ = ["SPLITS", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
