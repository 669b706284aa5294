"""The interface every 3D image encoder in the registry offers.

- ``forward_features(x)`` -> list of per-stage feature maps (B, C_i, D_i, H_i, W_i);
- ``feature_info`` -> one dict per stage: ``num_chs``, ``reduction`` (input size / map size
  along each axis, as a 3-tuple) and ``module`` (name of the stage);
- ``forward(x)`` -> the last stage's map;
- ``set_grad_checkpointing(True)`` recomputes each stage in backward (same results, less memory;
  the recompute leaves BatchNorm running statistics as the forward left them).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


class Encoder3D(nn.Module):
    """Base class: subclasses build ``self.stages`` (an nn.ModuleList) and ``self.feature_info``."""

    in_channels: int
    feature_info: list[dict]
    stages: nn.ModuleList

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False

    @staticmethod
    def resolve_config(config, default_cls, overrides: dict):
        """``config`` (or ``default_cls()``) with keyword ``overrides`` replacing its fields.

        An unknown field raises a TypeError naming it (``dataclasses.replace``).
        """
        return dataclasses.replace(config or default_cls(), **overrides)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for a wrong rank, channel count or a volume smaller than the downsampling."""
        if x.dim() != 5:
            raise ValueError(f"{type(self).__name__} expects x of shape (B, C, D, H, W); got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects in_channels={self.in_channels}; got x with {x.shape[1]} channels")
        reduction = self.feature_info[-1]["reduction"]
        if any(size < r for size, r in zip(x.shape[2:], reduction)):
            raise ValueError(
                f"{type(self).__name__} downsamples D, H, W by {tuple(reduction)}; the input volume "
                f"{tuple(x.shape[2:])} is smaller than that"
            )

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(stage, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(stage)))
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        features = []
        for stage in self.stages:
            x = self.run_stage(stage, x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[-1]


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """Within the block, the BatchNorm running statistics under ``module`` keep their values: a
    checkpointed stage's recompute in backward must not count its batch a second time."""
    buffers = [buf for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for buf in (m.running_mean, m.running_var, m.num_batches_tracked) if buf is not None]
    saved = [buf.clone() for buf in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in zip(buffers, saved):
                buf.copy_(value)
