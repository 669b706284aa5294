"""The interface every 3D image encoder in the registry offers (timm's feature-extraction contract).

- ``forward_intermediates(x, indices=None)`` -> the per-stage maps (B, C_i, D_i, H_i, W_i);
- ``forward_features(x)`` -> the last stage's map, unpooled;
- ``forward_head(x, pre_logits=False)`` -> global average pool, then the classification head
  (``num_classes`` outputs; ``num_classes=0``, the default, means no head: pooled features);
- ``forward(x)`` = ``forward_head(forward_features(x))``;
- ``num_features`` (channels of the last map), ``feature_info`` (one dict per stage: ``num_chs``,
  ``reduction`` (nominal input size / map size along each axis, a 3-tuple) and ``module``);
- ``feature_sizes((D, H, W))`` -> each stage's map size for an input size, exactly: strided convs
  and pools pad, so a stage's size is the ceiling of the previous one's over the stride (DCFormer at
  32×64×64: 8×16×16, 4×8×8, 2×4×4, 1×2×2, 1×1×1), never below one voxel;
- ``set_grad_checkpointing(True)`` recomputes each stage in backward (same results, less memory;
  the recompute leaves BatchNorm running statistics as the forward left them).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def as_triple(value, name: str, minimum: int = 0) -> tuple[int, int, int]:
    """An int or 3 ints (D, H, W), each >= ``minimum``, as a 3-tuple; a ValueError names ``name``."""
    out = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(out) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in out):
        raise ValueError(f"{name} must be an int or 3 ints (D, H, W), each >= {minimum}; got {value!r}")
    return out


@dataclasses.dataclass(frozen=True)
class Resample:
    """How one strided conv or pool changes a map's size: ``(n + 2p - k) // s + 1`` per axis,
    defined where ``n + 2p >= k``."""

    kernel: int | tuple[int, int, int]
    stride: int | tuple[int, int, int]
    padding: int | tuple[int, int, int] = 0

    def __post_init__(self) -> None:
        for name in ("kernel", "stride", "padding"):
            object.__setattr__(self, name, as_triple(getattr(self, name), name, minimum=0 if name == "padding" else 1))

    def output_size(self, size: Sequence[int]) -> tuple[int, ...] | None:
        """The map size after this op, or None where the op cannot run (input smaller than its window)."""
        out = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(size, self.kernel, self.stride, self.padding))
        return out if all(n + 2 * p >= k for n, k, p in zip(size, self.kernel, self.padding)) else None


class Encoder3D(nn.Module):
    """Base class. Subclasses build ``self.stages`` (an nn.ModuleList), ``self.feature_info``,
    ``self.resampling`` (per stage, the ``Resample`` ops its map passes through; leave it empty for
    an encoder whose geometry is not declared: its input size is then not checked), then call
    ``self.init_head(num_classes)``."""

    in_channels: int
    feature_info: list[dict]
    stages: nn.ModuleList
    resampling: Sequence[Sequence[Resample]] = ()

    def __init__(self) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.num_classes = 0
        self.head = nn.Identity()

    @staticmethod
    def resolve_config(config, default_cls, overrides: dict):
        """``config`` (or ``default_cls()``) with keyword ``overrides`` replacing its fields."""
        config = config or default_cls()
        fields = [f.name for f in dataclasses.fields(config)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"{type(config).__name__} has no field(s) {unknown}; accepted: {', '.join(fields)}")
        return dataclasses.replace(config, **overrides)

    @property
    def num_features(self) -> int:
        return self.feature_info[-1]["num_chs"]

    def init_head(self, num_classes: int) -> None:
        """Global average pool + Linear(num_features, num_classes); none for ``num_classes=0``."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head, pooled features); got {num_classes!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def feature_sizes(self, input_size: Sequence[int]) -> list[tuple[int, int, int]]:
        """Each stage's map size (D, H, W) for an input of ``input_size``; a ValueError names the
        stage that cannot run and the smallest input each axis needs."""
        size = as_triple(tuple(input_size), "input_size", minimum=1)
        if not self.resampling:
            raise NotImplementedError(f"{type(self).__name__} declares no resampling geometry")
        sizes = []
        for stage, ops in enumerate(self.resampling):
            for op in ops:
                out = op.output_size(size)
                if out is None:
                    minimum = tuple(self._smallest_input(axis) for axis in range(3))
                    raise ValueError(
                        f"{type(self).__name__}: stage {stage} cannot run on an input of size {tuple(input_size)} "
                        f"(D, H, W); it needs at least {minimum} voxels")
                size = out
            sizes.append(size)
        return sizes

    def _smallest_input(self, axis: int) -> int:
        """The smallest size along ``axis`` that every resampling op accepts."""
        n = 1
        while True:
            size = n
            for op in (op for ops in self.resampling for op in ops):
                single = Resample(op.kernel[axis], op.stride[axis], op.padding[axis])
                out = single.output_size((size,) * 3)
                if out is None:
                    break
                size = out[0]
            else:
                return n
            n += 1

    def check_input(self, x: torch.Tensor) -> None:
        """Clear errors for a wrong rank, channel count, dtype or a volume too small to run."""
        name = type(self).__name__
        if x.dim() != 5:
            raise ValueError(f"{name} expects x of shape (B, C, D, H, W); got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name} expects in_channels={self.in_channels}; got x with {x.shape[1]} channels")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} expects a floating-point volume; got dtype {x.dtype}. Convert it first, e.g. "
                f"x.float() (CT in HU should be scaled: med3dvlm.data.VolumePreprocessor does it)")
        param = next(self.parameters(), None)
        if param is not None and x.dtype != param.dtype and not _autocasting(x):
            raise TypeError(
                f"{name} has {param.dtype} parameters; got x of dtype {x.dtype}. Cast one to the other "
                f"(x.to({param.dtype}) or model.to({x.dtype})) or run under torch.autocast")
        if self.resampling and not torch.jit.is_tracing():  # traced shapes are tensors (fvcore)
            self.feature_sizes(x.shape[2:])

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(stage, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(stage)))
        return stage(x)

    def stage_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        """timm's ``indices``: None = every stage, an int n = the last n, a sequence = those
        stages (negative counts from the end)."""
        count = len(self.stages)
        if indices is None:
            return list(range(count))
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not 1 <= indices <= count:
                raise ValueError(f"indices={indices} asks for the last {indices} of {count} stages")
            return list(range(count - indices, count))
        out = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
                raise ValueError(f"indices must be stage numbers in [-{count}, {count}); got {list(indices)}")
            out.append(i % count)
        return out

    def run_stages(self, x: torch.Tensor, last: int):
        """Yield each stage's output up to stage ``last`` (the stages run in order)."""
        for stage in self.stages[: last + 1]:
            x = self.run_stage(stage, x)
            yield x

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None) -> list[torch.Tensor]:
        """The maps of the stages ``indices`` selects (see ``stage_indices``), shallow to deep;
        stages past the deepest one asked for are not run."""
        self.check_input(x)
        wanted = self.stage_indices(indices)
        maps = list(self.run_stages(x, max(wanted)))
        return [maps[i] for i in wanted]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x, indices=1)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3, 4))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _autocasting(x: torch.Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


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
