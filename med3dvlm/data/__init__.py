"""Datasets: synthetic shapes for tests and quick runs."""
from .synthetic import SyntheticShapes

__all__ = ["SyntheticShapes"]
