"""An on-disk cache of preprocessed volumes, so each scan is preprocessed once per configuration.

``PreprocessedCache(preprocessor, root)`` is called like the preprocessor it wraps. For a path it
looks up ``root/<key>.npy``, where the key hashes the resolved path, the file's size and
modification time (every file's, for a DICOM folder) and the preprocessor's config: a changed
scan or a changed preset is a different entry, never a stale one. A hit is read memory-mapped
(copy-on-write), so a data loader touches only the pages it uses; a miss preprocesses and writes
the entry atomically (a temporary file renamed), which is safe with several loader workers.
Arrays and tensors are passed to the preprocessor uncached (they have no identity on disk).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .volume import VolumeLike

__all__ = ["PreprocessedCache"]


class PreprocessedCache:
    """Wraps ``preprocessor`` (a ``VolumePreprocessor`` or anything with ``to_dict()`` and
    ``__call__(path) -> tensor``); entries live under ``root``."""

    def __init__(self, preprocessor: Callable[[VolumeLike], torch.Tensor], root: str | os.PathLike):
        if not hasattr(preprocessor, "to_dict"):
            raise TypeError(f"preprocessor must describe itself with to_dict() (its config is part of the "
                            f"cache key); got {type(preprocessor).__name__}")
        self.preprocessor = preprocessor
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._config = json.dumps(preprocessor.to_dict(), sort_keys=True)
        self.hits = self.misses = 0

    def to_dict(self) -> dict:
        return self.preprocessor.to_dict()

    def entry(self, path: str | os.PathLike) -> Path:
        """The cache file for ``path`` under the current preprocessor (it may not exist yet)."""
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(2, "no volume at this path", str(path))
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        identity = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        digest = hashlib.sha256(json.dumps([str(path), identity, self._config]).encode()).hexdigest()
        return self.root / f"{digest[:40]}.npy"

    def __call__(self, data: VolumeLike) -> torch.Tensor:
        if not isinstance(data, (str, os.PathLike)):
            return self.preprocessor(data)
        entry = self.entry(data)
        if entry.exists():
            try:
                array = np.load(entry, mmap_mode="c")
                self.hits += 1
                return torch.from_numpy(array)
            except (ValueError, OSError):
                pass  # a damaged entry (e.g. a disk filled while writing it) is rebuilt below
        tensor = self.preprocessor(data)
        temporary = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp")
        with open(temporary, "wb") as f:
            np.save(f, tensor.numpy())
        os.replace(temporary, entry)
        self.misses += 1
        return tensor
