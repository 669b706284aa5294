"""SigLIP loss over several processes: the "gather" and "ring" forms of ``siglip.siglip_loss``.

Each rank holds B_local rows of x and of y; B = world_size * B_local. Both forms run the
single-process op's block functions (``siglip.block_forward`` / ``block_backward``) on the local
rows against other ranks' columns, with global offsets that say where the diagonal lies.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .dispatch import resolve_backend
from .siglip import (SigLIPLossFunction, block_backward, block_forward, check_siglip_args, resolve_backward_impl,
                     unit_stride)

__all__ = ["siglip_loss_gather", "siglip_loss_ring", "DIST_IMPLS"]

DIST_IMPLS = (None, "gather", "ring")


# ----------------------------------------------------------------------------------------
# Convention (both modes): rank r returns world_size * (its share of the global loss), its
# share being -(1/B) sum over its rows i and ALL columns j. So the mean over ranks of the
# returned values is the single-process loss, and every gradient a rank computes is
# world_size times its contribution: after the usual DDP averaging of gradients (all_reduce
# sum / world_size) they equal the single-process gradients. Embedding gradients reaching a
# rank's encoders are world_size * dL/d(embedding), which that same averaging cancels.
# Local batches must have equal sizes on every rank (checked: one tiny all-gather per call);
# group ids must be global labels.
# ----------------------------------------------------------------------------------------
def _world(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed SigLIP needs an initialised torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


_BLOCK_TAG, _GRAD_TAG = 0, 2  # a block and its group ids use tags 0 and 1
_all_gather_rows = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_rows = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_rows_no_grad(t: torch.Tensor, group) -> torch.Tensor:
    world, _ = _world(group)
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    _all_gather_rows(out, t.contiguous(), group=group)
    return out


def _check_equal_local_batches(x: torch.Tensor, group) -> None:
    """Raise on every rank if the local batch sizes differ (a gather or ring step would abort or
    read rows that are not there). One tiny all-gather and a host sync per call."""
    sizes = _gather_rows_no_grad(torch.tensor([x.shape[0]], device=x.device), group).tolist()
    if len(set(sizes)) > 1:
        raise ValueError(f"x must hold the same number of rows on every rank of the group; got local batch "
                         f"sizes {sizes} (rank order)")


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; backward sums every rank's gradient of a block onto its owner."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return _gather_rows_no_grad(t, group)

    @staticmethod
    def backward(ctx, grad):
        world, _ = _world(ctx.group)
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        _reduce_scatter_rows(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def siglip_loss_gather(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                       group_ids: torch.Tensor | None = None, group=None, backend: str = "auto",
                       backward_impl: str = "auto") -> torch.Tensor:
    """Distributed SigLIP loss, all-gather form: local rows of x against every rank's y.

    Holds the gathered B x d text embeddings on every rank; the logits exist only as tiles
    (or, with the stripes backward, as row stripes of the local rows against all B columns).
    Returns world_size * this rank's share of the global loss (see the convention above).
    """
    check_siglip_args(x, y, logit_scale, logit_bias, group_ids)
    world, rank = _world(group)
    _check_equal_local_batches(x, group)
    backend = resolve_backend(backend, x.device)
    backward_impl = resolve_backward_impl(backward_impl, backend, x.shape[1], x.shape[0] ** 2 * world)
    n_local = x.shape[0]
    group_ids = unit_stride(group_ids)
    y_all = _GatherRows.apply(y, group)
    groups_all = None if group_ids is None else _gather_rows_no_grad(group_ids, group)
    return SigLIPLossFunction.apply(x, y_all, logit_scale, logit_bias, group_ids, groups_all,
                                    rank * n_local, 0, 1.0 / n_local, backend, backward_impl)


def _start_shift(tensors, group, tag):
    """Send each tensor to the next rank and receive the previous rank's into new buffers.

    Tags keep the travelling blocks, their group ids and their gradients apart in flight."""
    world, rank = _world(group)
    peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    received = [torch.empty_like(t) for t in tensors]
    ops = []
    for i, (t, buf) in enumerate(zip(tensors, received)):
        ops.append(dist.P2POp(dist.isend, t.contiguous(), peer((rank + 1) % world), group, tag + i))
        ops.append(dist.P2POp(dist.irecv, buf, peer((rank - 1) % world), group, tag + i))
    return received, dist.batch_isend_irecv(ops)


def _finish_shift(pending):
    received, works = pending
    for work in works:
        work.wait()
    return received


class _RingSigLIPFunction(torch.autograd.Function):
    """Text blocks travel to the next rank W - 1 times; each step adds the fused loss of the
    local rows against the block in hand. Backward sends the blocks round again and, with each,
    the fp32 gradient accumulated for it so far; after W steps every gradient is back home.
    Saves only the local x, y: O(B_local * d) memory, no rank holds global logits."""

    @staticmethod
    def forward(ctx, x, y, logit_scale, logit_bias, group_ids, group, backend, backward_impl):
        _, rank = _world(group)
        y = y.contiguous()
        ctx.save_for_backward(x, y, logit_scale, logit_bias, group_ids)
        ctx.group, ctx.backend, ctx.backward_impl = group, backend, backward_impl
        total = None
        for y_block, g_block, owner in _ring_blocks(y, group_ids, group):
            part = block_forward(backend, x, y_block, logit_scale, logit_bias, group_ids, g_block,
                                  rank * x.shape[0], owner * y.shape[0], 1.0 / x.shape[0])
            total = part if total is None else total + part
        return total

    @staticmethod
    def backward(ctx, grad):
        x, y, logit_scale, logit_bias, group_ids = ctx.saved_tensors
        world, rank = _world(ctx.group)
        dx = d_scale = d_bias = dy_block = None
        for y_block, g_block, owner in _ring_blocks(y, group_ids, ctx.group):
            dx_k, dy_k, ds_k, db_k = block_backward(ctx.backend, ctx.backward_impl, grad, x, y_block,
                                                     logit_scale, logit_bias, group_ids, g_block,
                                                     rank * x.shape[0], owner * y.shape[0], 1.0 / x.shape[0])
            if dx is None:
                dx, d_scale, d_bias, dy_block = dx_k, ds_k, db_k, dy_k
            else:
                dx, d_scale, d_bias, dy_block = dx + dx_k, d_scale + ds_k, d_bias + db_k, dy_block + dy_k
            if world > 1:  # the gradient follows its block; after the last step it reaches the owner
                (dy_block,) = _finish_shift(_start_shift([dy_block], ctx.group, _GRAD_TAG))
        return dx.to(x.dtype), dy_block.to(y.dtype), d_scale, d_bias, None, None, None, None


def _ring_blocks(y, group_ids, group):
    """Yield (y block, its group ids, owner rank) for the W steps; the next transfer overlaps
    the caller's work on the current block."""
    world, rank = _world(group)
    block, groups = y, group_ids
    for step in range(world):
        pending = None
        if step < world - 1:
            pending = _start_shift([block] if groups is None else [block, groups], group, _BLOCK_TAG)
        yield block, groups, (rank - step) % world
        if pending is not None:
            received = _finish_shift(pending)
            block, groups = received[0], (received[1] if groups is not None else None)


def siglip_loss_ring(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                     group_ids: torch.Tensor | None = None, group=None, backend: str = "auto",
                     backward_impl: str = "auto") -> torch.Tensor:
    """Distributed SigLIP loss, ring form (the paper's): text blocks pass neighbour to neighbour.

    Positives lie in the rank's own block only (or wherever group ids match). Returns
    world_size * this rank's share of the global loss (see the convention above).
    """
    check_siglip_args(x, y, logit_scale, logit_bias, group_ids)
    _world(group)
    _check_equal_local_batches(x, group)
    backend = resolve_backend(backend, x.device)
    backward_impl = resolve_backward_impl(backward_impl, backend, x.shape[1], x.shape[0] ** 2)  # per ring step
    return _RingSigLIPFunction.apply(x, y, logit_scale, logit_bias, unit_stride(group_ids), group, backend,
                                     backward_impl)
