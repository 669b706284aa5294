"""The model suite: every registry encoder's size, compute, speed and memory (``suite.run``)."""
from .suite import order_flags, run, select_encoders, speedup_rows

__all__ = ["run", "select_encoders", "speedup_rows", "order_flags"]
