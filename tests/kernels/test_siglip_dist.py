"""Distributed SigLIP ("gather" and "ring") with 2 and 3 gloo processes on CPU.

Each world size starts its processes once; every process runs all (mode, backend, groups)
cases and rank 0 writes the results. A case feeds the same global batch through a shared
linear projection (the "encoder"), split over ranks, then averages the gradients over ranks
as DDP does. The averages must equal one process's loss and gradients on the whole batch:
loss, d/d projection weight, the embedding gradients (which a rank receives multiplied by the
world size, see dcformer_kernels.siglip) and d logit_scale, d logit_bias.
"""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcformer_kernels import SigLIPLoss, siglip_loss_reference

BATCH, FEATURES, DIM = 60, 12, 20  # 60 rows split evenly over 2 and 3 ranks
CASES = [(mode, backend, grouped, impl) for mode in ("gather", "ring") for grouped in (False, True)
         for backend, impl in (("torch", "auto"), ("triton", "fused"), ("triton", "stripes"))]


def _global_inputs():
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(BATCH, FEATURES, generator=gen)
    texts = images + 0.5 * torch.randn(BATCH, FEATURES, generator=gen)
    projection = torch.randn(DIM, FEATURES, generator=gen) / FEATURES**0.5
    group_ids = torch.randint(0, 20, (BATCH,), generator=gen)
    return images, texts, projection, group_ids


def _embed(projection, features):
    return torch.nn.functional.normalize(features @ projection.T, dim=1)


def _run_case(rank, world, mode, backend, grouped, backward_impl):
    images, texts, projection, group_ids = _global_inputs()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    projection = projection.clone().requires_grad_()
    x = _embed(projection, images[rows])
    y = _embed(projection, texts[rows])
    x.retain_grad()
    y.retain_grad()
    criterion = SigLIPLoss(init_logit_scale=1.2, init_logit_bias=-3.0, dist_impl=mode, backend=backend,
                           backward_impl=backward_impl)
    loss = criterion(x, y, group_ids[rows] if grouped else None)
    loss.backward()

    def mean_over_ranks(t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / world

    def concat_over_ranks(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    return {
        "loss": mean_over_ranks(loss),
        "d_projection": mean_over_ranks(projection.grad),
        "dx": concat_over_ranks(x.grad) / world,
        "dy": concat_over_ranks(y.grad) / world,
        "d_logit_scale": mean_over_ranks(criterion.logit_scale.grad),
        "d_logit_bias": mean_over_ranks(criterion.logit_bias.grad),
    }


def _worker(rank, world, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        results = {case: _run_case(rank, world, *case) for case in CASES}
        results["world"] = world
        for mode in ("gather", "ring"):  # local batches of 4, 5, ... rows: every rank must raise
            x = torch.randn(4 + rank, 8)
            try:
                SigLIPLoss(dist_impl=mode, backend="torch")(x, x)
                results["unequal", mode] = None
            except ValueError as err:
                results["unequal", mode] = str(err)
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()  # no rank tears gloo down while a peer still talks to it (seen: SIGABRT, world 3)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def dist_results(request, tmp_path_factory):
    world = request.param
    out_path = os.path.join(tmp_path_factory.mktemp(f"siglip_world{world}"), "results.pt")
    mp.spawn(_worker, args=(world, _free_port(), out_path), nprocs=world, join=True)
    return torch.load(out_path)


def _single_process(grouped):
    images, texts, projection, group_ids = _global_inputs()
    projection = projection.clone().requires_grad_()
    x = _embed(projection, images)
    y = _embed(projection, texts)
    x.retain_grad()
    y.retain_grad()
    scale = torch.tensor(1.2, requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    loss = siglip_loss_reference(x, y, scale, bias, group_ids if grouped else None)
    loss.backward()
    return {"loss": loss.detach(), "d_projection": projection.grad, "dx": x.grad, "dy": y.grad,
            "d_logit_scale": scale.grad, "d_logit_bias": bias.grad}


@pytest.mark.parametrize("mode,backend,grouped,backward_impl", CASES)
def test_distributed_equals_single_process(dist_results, mode, backend, grouped, backward_impl):
    got = dist_results[mode, backend, grouped, backward_impl]
    want = _single_process(grouped)
    for name, expected in want.items():
        atol = 2e-6 * max(expected.abs().max().item(), 1e-30)
        torch.testing.assert_close(got[name], expected, rtol=2e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["gather", "ring"])
def test_unequal_local_batches_are_refused(dist_results, mode):
    """A rank whose local batch differs would make the collectives abort (gloo) or read rows that
    are not there; every rank gets a ValueError naming the sizes instead (rank 0's is kept)."""
    sizes = ", ".join(str(4 + r) for r in range(dist_results["world"]))
    assert dist_results["unequal", mode] == (f"x must hold the same number of rows on every rank of the group; "
                                             f"got local batch sizes [{sizes}] (rank order)")
