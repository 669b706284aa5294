"""What the two decomposed-conv ops (``decomposed_conv``, ``decomposed_conv_bn``) share.

Argument checks and output shapes, the tile configs and their choice, grid and block helpers,
the Triton addressing helpers, and the deterministic reduction of per-program partials into
weight gradients. Each op module imports these; neither imports the other's internals.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .dispatch import HAS_TRITON, acc_dtype, cdiv, next_power_of_2, triton_interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_KERNEL_SIZE = 31
SUPPORTED_STRIDES = (1, 2)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------
# Argument checks and shapes
# ----------------------------------------------------------------------------------------
def output_size(size: int, kernel_size: int, stride: int) -> int:
    """Length of one output axis, as nn.Conv3d gives with padding kernel_size // 2."""
    return (size + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def check_decomposed_conv3d_args(x, weight_d, weight_h, weight_w, bias, stride) -> None:
    """Raise a TypeError/ValueError naming the argument, the expectation and what came in."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be 5-D (N, C, D, H, W); got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64; got {x.dtype}")
    channels = x.shape[1]
    if channels < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"x must have C >= 1 and non-empty D, H, W; got shape {tuple(x.shape)}")
    for name, w in (("weight_d", weight_d), ("weight_h", weight_h), ("weight_w", weight_w)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (C, k); got {type(w).__name__}")
        if w.dim() != 2 or w.shape[0] != channels:
            raise ValueError(f"{name} must have shape (C={channels}, k); got {tuple(w.shape)}")
        k = w.shape[1]
        if k < 1 or k % 2 == 0 or k > MAX_KERNEL_SIZE:
            raise ValueError(f"{name}: kernel size must be odd and in 1..{MAX_KERNEL_SIZE}; got {k}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but x is on {x.device}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor of shape (C,) or None; got {type(bias).__name__}")
        if bias.dim() != 1 or bias.shape[0] != channels:
            raise ValueError(f"bias must have shape (C={channels},); got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has dtype {x.dtype}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in SUPPORTED_STRIDES:
        raise ValueError(f"stride must be one of {SUPPORTED_STRIDES}; got {stride!r}")


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when C is x's fastest-varying axis, else NCDHW-contiguous."""
    if x.shape[1] > 1 and x.stride(1) < x.stride(4):
        return torch.channels_last_3d
    return torch.contiguous_format


def output_shape(x, kd, kh, kw, stride):
    n, c, d, h, w = x.shape
    return (n, c, output_size(d, kd, stride), output_size(h, kh, stride), output_size(w, kw, stride))



def numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    block_c: int  # channels per program
    d_tile: int  # D planes per program
    rows_h: int  # tile rows along H
    cols_w: int  # tile columns along W
    num_warps: int


def tile_config(x: torch.Tensor, out_h: int, out_w: int, depth: int) -> TileConfig:
    """A program's block: W-major for NCDHW (vector loads along W), C-major for channels-last.

    Each program computes one block of d_tile x block_c x rows_h x cols_w outputs with no runtime
    loop. The GPU blocks are the best of ``bench.static.sass_conv --sweep`` (SASS instructions per
    element for sm_90, compiled without a GPU; a model, not a timing): one warp per program, so the
    per-tap weight-gradient sums need no cross-warp reduction (half the backward's instructions
    at 4 warps). ``python -m bench.tune.conv`` times the same candidates on a GPU.
    """
    return _tiles(triton_interpreting(), memory_format(x) == torch.channels_last_3d, x.shape[1], out_h, out_w, depth)


@functools.lru_cache(maxsize=4096)  # a pure function of the shape: host time per call at small stages
def _tiles(interpreting: bool, channels_last: bool, channels: int, out_h: int, out_w: int, depth: int) -> TileConfig:
    if interpreting:
        # The interpreter costs ~ms per program and per op: small blocks, and shapes in the tests
        # are chosen so that several blocks and partial blocks occur on every axis.
        block_c, d_tile, rows_h, cols_w, warps = 4, 2, 4, 8, 1
    elif channels_last:
        block_c, d_tile, rows_h, cols_w, warps = min(32, next_power_of_2(channels)), 2, 4, 4, 1
    else:
        cols_w = min(64, next_power_of_2(out_w))
        block_c, d_tile, rows_h, warps = 1, 2, max(1, 256 // cols_w), 1
    return TileConfig(block_c, min(d_tile, next_power_of_2(depth)), min(rows_h, next_power_of_2(out_h)),
                       min(cols_w, next_power_of_2(out_w)), warps)



def conv_grid(n: int, depth: int, rows: int, cols: int, channels: int, cfg: TileConfig):
    n_db = cdiv(depth, cfg.d_tile)
    n_hb = cdiv(rows, cfg.rows_h)
    n_wb = cdiv(cols, cfg.cols_w)
    return (n * n_db * n_hb * n_wb, cdiv(channels, cfg.block_c)), (n_db, n_hb, n_wb)


def block_kwargs(cfg: TileConfig) -> dict:
    return dict(BLOCK_C=cfg.block_c, DT=cfg.d_tile, RH=cfg.rows_h, RW=cfg.cols_w, num_warps=cfg.num_warps)


def row_major(*weights: torch.Tensor) -> list[torch.Tensor]:
    """The (C, k) weights as the kernels index them, c * k + tap (a no-op for parameters)."""
    return [w.contiguous() for w in weights]


# ----------------------------------------------------------------------------------------
# Triton helpers shared by the op kernels
# ----------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def at(ptr, n, c, d, h, w, sn, sc, sd, sh, sw, IDX: tl.constexpr):
        """Pointers to ptr[n, c, d, h, w] for broadcastable index blocks, offsets in IDX."""
        return ptr + n.to(IDX) * sn + c.to(IDX) * sc + d.to(IDX) * sd + (h.to(IDX) * sh + w.to(IDX) * sw)

    @triton.jit
    def tap_weight(w_ptr, c, c_ok, tap, K: tl.constexpr, ACC: tl.constexpr):
        """Weight ``tap`` of channels c from a row-major (C, K) weight, as ACC."""
        return tl.load(w_ptr + c * K + tap, mask=c_ok, other=0.0).to(ACC)

    @triton.jit
    def split_pid(pid_s, n_db, n_hb, n_wb):
        """Spatial program id -> (n, block index along D, along H, along W)."""
        wb = pid_s % n_wb
        t = pid_s // n_wb
        hb = t % n_hb
        t = t // n_hb
        return t // n_db, t % n_db, hb, wb

    @triton.jit
    def block_coords(pid_s, pid_c, n_db, n_hb, n_wb,
                      BLOCK_C: tl.constexpr, DT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr):
        """Program -> n and the block's coordinates, as broadcastable [DT, BLOCK_C, RH*RW] vectors.

        Returns (n, d [DT,1,1], c [1,BLOCK_C,1], h [1,1,S], w [1,1,S]); every per-axis mask is then
        computed on a small vector and broadcast once.
        """
        n, db, hb, wb = split_pid(pid_s, n_db, n_hb, n_wb)
        d = db * DT + tl.arange(0, DT)[:, None, None]
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, :, None]
        s = tl.arange(0, RH * RW)[None, None, :]
        return n, d, c, hb * RH + s // RW, wb * RW + s % RW

    @triton.jit
    def block_sum(v):
        """[DT, BLOCK_C, S] -> [BLOCK_C]: the sum over a block's positions."""
        return tl.sum(tl.sum(v, axis=2), axis=0)

    @triton.jit
    def _weight_grads_kernel(part_ptr, P, C, wd_ptr, wh_ptr, ww_ptr, b_ptr,
                             KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, N_COLS: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
        """Column sums of per-program partials (P, N_COLS, C) in a fixed order, stored as the (C, k)
        weight gradients and, where N_COLS = KD + KH + KW + 1, the bias gradient, in their dtype."""
        col = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        rows = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            p = (p0 + rows).to(tl.int64)
            acc += tl.load(part_ptr + (p[:, None] * N_COLS + col) * C + c[None, :],
                           mask=(p < P)[:, None] & c_ok[None, :], other=0.0)
        total = tl.sum(acc, axis=0)
        if col < KD:
            tl.store(wd_ptr + c * KD + col, total.to(wd_ptr.dtype.element_ty), mask=c_ok)
        elif col < KD + KH:
            tl.store(wh_ptr + c * KH + (col - KD), total.to(wh_ptr.dtype.element_ty), mask=c_ok)
        elif col < KD + KH + KW:
            tl.store(ww_ptr + c * KW + (col - KD - KH), total.to(ww_ptr.dtype.element_ty), mask=c_ok)
        else:
            tl.store(b_ptr + c, total.to(b_ptr.dtype.element_ty), mask=c_ok)


# ----------------------------------------------------------------------------------------
# Weight gradients from per-program partials
# ----------------------------------------------------------------------------------------
def weight_grads(partials: torch.Tensor, taps, dtype: torch.dtype) -> list[torch.Tensor]:
    """The (C, k) weight gradients (and the (C,) bias gradient where partials has a column for
    it) from per-program partials (P, n_cols, C): one launch, a fixed-order sum (deterministic)."""
    n_programs, n_cols, c = partials.shape
    kd, kh, kw = taps
    grads = [torch.empty((c, k), dtype=dtype, device=partials.device) for k in taps]
    if n_cols > kd + kh + kw:
        grads.append(torch.empty(c, dtype=dtype, device=partials.device))
    block_c = min(32, next_power_of_2(c))
    # Only n_cols x C/block_c programs: each streams 4096-element tiles (16 KB of fp32) per step.
    block_p = 8 if triton_interpreting() else 4096 // block_c
    _weight_grads_kernel[(n_cols, cdiv(c, block_c))](
        partials, n_programs, c, *grads[:3], grads[-1], KD=kd, KH=kh, KW=kw, N_COLS=n_cols,
        BLOCK_P=block_p, BLOCK_C=block_c, ACC=acc_dtype(partials.dtype), num_warps=4)
    return grads
