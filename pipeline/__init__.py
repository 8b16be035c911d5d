"""Cached transfer-learning features with classical classifiers."""

__version__ = "0.1.0"
