"""Synthetic segmentation data made on the fly: random ellipsoids (spheres included) and boxes on
a noisy background, with their label masks, in 2D (ellipses, discs, rectangles) or 3D.

For tests and quick CPU runs that show a network learns; no files, and every item is a
function of (seed, index), so a dataset is reproducible.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["SyntheticShapes"]

SPHERE, ELLIPSOID, BOX = 0, 1, 2


class SyntheticShapes(Dataset):
    """``length`` images of ``size`` (2 or 3 axes, any sizes) with 1..``max_shapes`` shapes each.

    Item: ``(image, mask)``: image (1, *size) float32, mask (*size) int64. With
    ``num_classes=2`` every shape is label 1; with ``num_classes=3`` ellipsoids and spheres are
    1 and boxes 2, so the network must tell shapes apart, not only find bright voxels.
    Shapes lie fully inside the image, with half-extents of 10-30 % of each axis (at least 1.5
    voxels) and intensities in [0.5, 1] over a background in [0, 0.2]; later shapes occlude
    earlier ones. Gaussian noise of ``noise_std`` is added to the image.
    """

    def __init__(self, size: Sequence[int], length: int, num_classes: int = 2, max_shapes: int = 3,
                 noise_std: float = 0.2, seed: int = 0) -> None:
        self.size = tuple(int(s) for s in size)
        if len(self.size) not in (2, 3) or any(s < 4 for s in self.size):
            raise ValueError(f"size must be 2 or 3 axes of at least 4 voxels; got {tuple(size)}")
        if num_classes not in (2, 3):
            raise ValueError(f"num_classes must be 2 (background/shape) or 3 "
                             f"(background/ellipsoid/box); got {num_classes}")
        if length < 0 or max_shapes < 1 or noise_std < 0:
            raise ValueError(f"need length >= 0, max_shapes >= 1, noise_std >= 0; got "
                             f"length={length}, max_shapes={max_shapes}, noise_std={noise_std}")
        self.length, self.num_classes, self.max_shapes = length, num_classes, max_shapes
        self.noise_std, self.seed = noise_std, seed
        self.spatial_dims = len(self.size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % 2**63)

        def uniform(low, high, n=1):
            return low + (high - low) * torch.rand(n, generator=gen)

        axes = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) for s in self.size), indexing="ij")
        extent = torch.tensor(self.size, dtype=torch.float32)
        image = torch.full(self.size, float(uniform(0.0, 0.2)))
        mask = torch.zeros(self.size, dtype=torch.int64)
        for _ in range(int(torch.randint(1, self.max_shapes + 1, (1,), generator=gen))):
            kind = int(torch.randint(3, (1,), generator=gen))
            if kind == SPHERE:
                half = uniform(0.1, 0.3) * extent.min() * torch.ones(self.spatial_dims)
            else:
                half = uniform(0.1, 0.3, self.spatial_dims) * extent
            half = half.clamp(1.5, None).minimum(extent / 2 - 0.5)
            centre = half + uniform(0.0, 1.0, self.spatial_dims) * (extent - 1 - 2 * half)
            offsets = [(axis - c) / h for axis, c, h in zip(axes, centre, half)]
            if kind == BOX:
                inside = torch.stack([o.abs() for o in offsets]).amax(0) <= 1
            else:
                inside = sum(o * o for o in offsets) <= 1
            image[inside] = float(uniform(0.5, 1.0))
            mask[inside] = 2 if (kind == BOX and self.num_classes == 3) else 1
        image += self.noise_std * torch.randn(self.size, generator=gen)
        return image.unsqueeze(0), mask
