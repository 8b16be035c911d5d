"""Cached transfer-learning features with classical classifiers."""

__version__ = "0.1.0"
SPLITS = ("train", "test")  # every dataset and feature file has these, in this order
