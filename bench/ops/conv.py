"""Kernel benchmark: fused decomposed depthwise conv against PyTorch's own convolutions.

GPU: DCFormer's stage shapes at batch 2 and 8, bf16 and fp32; forward, backward and both for
  fused (Triton) | three nn.Conv3d + adds, NCDHW (a) | the same in channels_last_3d (b) |
  one dense k^3 depthwise Conv3d (c, forward only) | torch.compile of the reference (d),
  with torch.clone(x) as the bandwidth yardstick. GB/s counts the floor bytes (see docs/conv_notes.md).
  Forward+backward of the fused op and of (a), (b) also replayed from CUDA graphs (no host time
  per call: what torch.compile(mode="reduce-overhead") or a captured training step gives).
CPU: the CPU path (backend="torch") against three nn.Conv3d + adds at small sizes.

    python -m bench.ops.conv [--out DIR] [--quick] [--stages 1 3] [--dtypes bfloat16] [--budget-s S]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dcformer_kernels import decomposed_conv3d, decomposed_conv3d_reference

from .. import common
from ..common import (DEFAULT_OUT, Row, ceiling_flag, environment, join_flags, markdown_pivot, peak_memory_bytes,
                     read_csv, spread_flag, time_fn, timing_from_samples, write_csv)

# (C, D, H, W, k): DCFormer stages at input 256x512x512 (D x H x W) after the stride-4 stem.
GPU_SHAPES = [(96, 32, 64, 64, 13), (192, 16, 32, 32, 11), (384, 8, 16, 16, 9), (768, 4, 8, 8, 7)]
CPU_SHAPES = [(32, 16, 16, 16, 7), (64, 8, 16, 16, 5)]


def _three_convs(modules):
    def run(x):
        return modules[0](x) + modules[1](x) + modules[2](x)
    return run


def _variants(c, k, dtype, device, gpu):
    """name -> (forward callable taking x, input memory format, the parameters whose gradients a
    training step needs, or None for a forward-only variant)."""
    wd, wh, ww = (torch.randn(c, k, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(c, device=device, dtype=dtype, requires_grad=True)
    fused_params = (wd, wh, ww, bias)
    convs = []
    for shape in ((k, 1, 1), (1, k, 1), (1, 1, k)):
        conv = torch.nn.Conv3d(c, c, shape, padding=tuple(s // 2 for s in shape), groups=c).to(device, dtype)
        convs.append(conv)
    conv_params = tuple(p for conv in convs for p in conv.parameters())
    variants = {
        "three_conv3d_ncdhw": (_three_convs(convs), torch.contiguous_format, conv_params),
        "three_conv3d_cl": (_three_convs(convs), torch.channels_last_3d, conv_params),
    }
    if gpu:
        variants = {
            "fused_ncdhw": (lambda x: decomposed_conv3d(x, wd, wh, ww, bias), torch.contiguous_format, fused_params),
            "fused_cl": (lambda x: decomposed_conv3d(x, wd, wh, ww, bias), torch.channels_last_3d, fused_params),
            **variants,
        }
        dense = torch.randn(c, 1, k, k, k, device=device, dtype=dtype)
        variants["dense_k3_depthwise"] = (lambda x: F.conv3d(x, dense, None, 1, k // 2, 1, c),
                                          torch.contiguous_format, None)
        compiled = torch.compile(decomposed_conv3d_reference)
        variants["compiled_reference"] = (lambda x: compiled(x, wd, wh, ww, bias), torch.contiguous_format,
                                          fused_params)
    else:
        cpu_path = lambda x: decomposed_conv3d(x, wd, wh, ww, bias, backend="torch")  # noqa: E731
        variants = {"cpu_path_ncdhw": (cpu_path, torch.contiguous_format, fused_params),
                    "cpu_path_cl": (cpu_path, torch.channels_last_3d, fused_params), **variants}
    return variants


def _modes(fn, x, params):
    """mode -> (callable, tensors of x's size it moves at the floor) for one variant, bound to
    these arguments. Backward and forward+backward compute every gradient a training step needs
    (x's, the weights' and the bias's), as the fused op always does."""
    y = fn(x)
    modes = {"forward": (lambda: fn(x), 2)}
    if params is not None:
        g = torch.randn_like(y)
        leaves = [x, *params]
        modes["backward"] = (lambda: torch.autograd.grad(y, leaves, g, retain_graph=True), 3)
        modes["forward+backward"] = (lambda: torch.autograd.grad(fn(x), leaves, g), 5)
    return modes


def run(out_dir: Path, quick: bool = False, stages=None, dtypes=None, batches=None, budget_s: float | None = None,
        compile_only: bool = False) -> Path:
    """Time every case (or, with ``compile_only``, call each once to fill Triton's and Inductor's
    caches, writing nothing). ``stages`` are 1-based indices into the stage shapes; ``budget_s``
    stops starting new cases after that many seconds (the rest are recorded as skipped)."""
    with common.compile_only(compile_only):
        return _run(out_dir, quick, stages, dtypes, batches, budget_s, compile_only)


def _run(out_dir, quick, stages, dtypes, batches, budget_s, compile_only) -> Path:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    env = environment()
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if stages:
        shapes = [shapes[i - 1] for i in stages]
    batches = batches or ((2,) if quick or not gpu else (2, 8))
    dtypes = dtypes or ((torch.bfloat16, torch.float32) if gpu else (torch.float32,))
    started = time.perf_counter()
    over_budget = lambda: budget_s is not None and time.perf_counter() - started > budget_s  # noqa: E731
    rows: list[Row] = []
    for i, batch in enumerate(batches):  # batch outermost: under a budget every stage gets batch 2 first
        for c, d, h, w, k in shapes:
            for dtype in dtypes:
                name = f"{batch}x{c}x{d}x{h}x{w} k={k}"
                dt = str(dtype).replace("torch.", "")
                if over_budget():
                    rows.append(Row("decomposed_conv3d", "(all)", name, dt, "", "skipped",
                                    f"time budget ({budget_s:.0f} s) reached", "", env=env))
                    continue
                elt = torch.finfo(dtype).bits // 8
                numel = batch * c * d * h * w
                x0 = torch.randn(batch, c, d, h, w, device=device, dtype=dtype)
                # The bandwidth yardstick, torch.clone, is timed before every variant and after the last:
                # the fastest of these is the ceiling, so one clone slowed by other processes cannot
                # make the variants look faster than a copy.
                clones = []
                timed = []  # (variant, mode, tensors of x's size moved, Timing)
                both: dict[str, common.Timing] = {}  # forward+backward timing per variant
                steps: dict[str, object] = {}  # forward+backward callables per variant
                for variant, (fn, fmt, params) in _variants(c, k, dtype, device, gpu).items():
                    if variant == "compiled_reference" and (batch != 2 or dtype != torch.bfloat16 or k != 13):
                        continue  # one inductor compile (the k=13 stage) keeps the run short
                    if variant == "dense_k3_depthwise" and batch != 2:
                        continue
                    clones.append(time_fn(lambda: torch.clone(x0)))
                    # a fresh tensor per variant: a forward-only variant's must not change the next one's
                    x = x0.clone(memory_format=fmt).requires_grad_(params is not None)
                    try:
                        modes = _modes(fn, x, params)
                        for mode, (call, tensors) in modes.items():
                            t = time_fn(call, min_reps=7)
                            timed.append((variant, mode, tensors, t))
                            if mode == "forward+backward":
                                both[variant] = t
                                steps[variant] = call
                        mem = peak_memory_bytes(modes["forward+backward"][0]) if params is not None else None
                        if mem is not None:
                            rows.append(Row("decomposed_conv3d", variant, name, dt, "forward+backward",
                                            "peak_memory", round(mem / 2**20, 1), "MiB", env=env))
                    except torch.OutOfMemoryError:
                        rows.append(Row("decomposed_conv3d", variant, name, dt, "forward", "time", "OOM", "", env=env))
                        torch.cuda.empty_cache()
                clones.append(time_fn(lambda: torch.clone(x0)))
                rows += bandwidth_rows(timed, clones, numel * elt, name, dt, env)
                if gpu and not compile_only:
                    rows += graphed_rows(steps, name, dt, env)
                if not compile_only:  # after every case: a cut-off run still leaves its numbers
                    rows += speedup_rows(both, steps, name, dt, env)
                    write_report(rows, out_dir, gpu)
        if i == 0 and gpu and torch.bfloat16 in dtypes:  # training-mode BN (bf16), after the first batch
            for c, d, h, w, k in shapes:
                name = f"{batch}x{c}x{d}x{h}x{w} k={k}"
                if over_budget():
                    rows.append(Row("decomposed_conv3d_bn", "(all)", name, "bfloat16", "", "skipped",
                                    f"time budget ({budget_s:.0f} s) reached", "", env=env))
                else:
                    x0 = torch.randn(batch, c, d, h, w, device=device, dtype=torch.bfloat16)
                    rows += _batchnorm_training(x0, k, name, "bfloat16", env)
                if not compile_only:
                    write_report(rows, out_dir, gpu)
    return out_dir / f"{'conv_gpu' if gpu else 'conv_cpu'}.csv"


def bandwidth_rows(timed: list, clones: list, tensor_bytes: int, name: str, dt: str, env: dict) -> list[Row]:
    """The clone ceiling (the fastest of ``clones``), then time, GB/s and % of the ceiling of each
    timed (variant, mode): flagged when the timing is noisy or its bandwidth beats the ceiling."""
    ceiling = max(2 * tensor_bytes / t.median_ms / 1e6 for t in clones)
    rows = [Row("decomposed_conv3d", "clone", name, dt, "torch", "GB/s", round(ceiling, 1), "GB/s",
                flag=spread_flag(min(clones, key=lambda t: t.median_ms)), env=env)]
    for variant, mode, tensors, t in timed:
        gbs = tensors * tensor_bytes / t.median_ms / 1e6
        noisy = spread_flag(t)
        bandwidth_flag = join_flags(noisy, ceiling_flag(gbs, ceiling))
        labels = dict(model="decomposed_conv3d", variant=variant, input=name, dtype=dt, backend=mode, env=env)
        rows += [Row(metric="time", value=round(t.median_ms, 4), unit="ms", p20=round(t.p20_ms, 4),
                     p80=round(t.p80_ms, 4), flag=noisy, **labels),
                 Row(metric="GB/s", value=round(gbs, 1), unit="GB/s", flag=bandwidth_flag, **labels),
                 Row(metric="%copy", value=round(100 * gbs / ceiling, 1), unit="%", flag=bandwidth_flag, **labels)]
    return rows


GRAPHED = " (CUDA graph)"


def cuda_graph_replay(call):
    """``call`` captured in a CUDA graph (after a warm-up on a side stream, as capture requires);
    returns the graph's replay: the same GPU work without the host's per-call time."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def graphed_rows(steps: dict, name: str, dt: str, env: dict) -> list[Row]:
    """Forward+backward of the fused op and of three Conv3d replayed from CUDA graphs (what
    torch.compile(mode="reduce-overhead") or a captured training step gives): at the small stages
    host time per call, not the GPU, decides the eager numbers. A capture that fails is recorded,
    not raised."""
    rows = []
    for variant in ("fused_ncdhw", "fused_cl", "three_conv3d_ncdhw", "three_conv3d_cl"):
        if variant not in steps:
            continue
        try:
            t = time_fn(cuda_graph_replay(steps[variant]), min_reps=7)
        except RuntimeError as err:  # e.g. an op that cannot be captured
            rows.append(Row("decomposed_conv3d", variant, name, dt, "forward+backward" + GRAPHED, "time",
                            f"capture failed: {err}"[:200], "", env=env))
            continue
        rows.append(Row("decomposed_conv3d", variant, name, dt, "forward+backward" + GRAPHED, "time",
                        round(t.median_ms, 4), "ms", p20=round(t.p20_ms, 4), p80=round(t.p80_ms, 4),
                        flag=spread_flag(t), env=env))
    graphed = {r.variant: r for r in rows if isinstance(r.value, float)}
    fused = [graphed[v] for v in ("fused_ncdhw", "fused_cl") if v in graphed]
    unfused = [graphed[v] for v in ("three_conv3d_ncdhw", "three_conv3d_cl") if v in graphed]
    if fused and unfused:
        best_fused, best_unfused = (min(found, key=lambda r: r.value) for found in (fused, unfused))
        rows.append(Row("decomposed_conv3d", "fused vs best of three_conv3d" + GRAPHED, name, dt,
                        "forward+backward" + GRAPHED, "speedup", round(best_unfused.value / best_fused.value, 2), "x",
                        flag=join_flags(*(f"{r.variant}: {r.flag.removeprefix('unreliable: ')}"
                                          for r in (best_fused, best_unfused) if r.flag)), env=env))
    return rows


def _interleaved_ratio(baseline, candidate, rounds: int = 15) -> tuple[float, str]:
    """Median time of ``baseline`` over that of ``candidate``, timed alternately so that drift in a
    shared CPU's speed hits both alike (back-to-back medians differed by up to 2x on a 2-core VM),
    and the flag of the noisier of the two."""
    times = {0: [], 1: []}
    for r in range(rounds):
        for i in ((0, 1) if r % 2 else (1, 0)):
            start = time.perf_counter()
            (baseline, candidate)[i]()
            times[i].append((time.perf_counter() - start) * 1e3)
    base, cand = timing_from_samples(times[0]), timing_from_samples(times[1])
    return base.median_ms / cand.median_ms, join_flags(spread_flag(base, "baseline"), spread_flag(cand, "candidate"))


def speedup_rows(both: dict, steps: dict, name: str, dt: str, env: dict) -> list[Row]:
    """GPU: best fused against the best of three Conv3d (NCDHW or channels_last), from the medians.
    CPU: our CPU path against three Conv3d on the same input layout, timed interleaved."""
    pairs = {}
    unfused = [both[v] for v in ("three_conv3d_ncdhw", "three_conv3d_cl") if v in both]
    fused = [both[v] for v in ("fused_ncdhw", "fused_cl") if v in both]
    if fused and unfused:
        best_fused, best_unfused = (min(found, key=lambda t: t.median_ms) for found in (fused, unfused))
        pairs["fused vs best of three_conv3d"] = (best_unfused.median_ms / best_fused.median_ms,
                                                  join_flags(spread_flag(best_fused, "fused"),
                                                             spread_flag(best_unfused, "three_conv3d")))
    for fmt in ("ncdhw", "cl"):
        if f"cpu_path_{fmt}" in steps and f"three_conv3d_{fmt}" in steps:
            pairs[f"cpu_path vs three_conv3d ({fmt})"] = _interleaved_ratio(steps[f"three_conv3d_{fmt}"],
                                                                             steps[f"cpu_path_{fmt}"])
    return [Row("decomposed_conv3d", k, name, dt, "forward+backward", "speedup", round(v, 2), "x", flag=flag, env=env)
            for k, (v, flag) in pairs.items()]


def _batchnorm_training(x0, k, name, dt, env) -> list[Row]:
    """Training-mode DecomposedConv3d(norm="batch") on a channels_last input (DCFormer's layout):
    the fused training kernels (backend auto) against the unfused three conv + BN (backend torch)."""
    from dcformer_kernels import DecomposedConv3d

    c = x0.shape[1]
    x = x0.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    rows, times = [], {}
    for backend in ("auto", "torch"):
        layer = DecomposedConv3d(c, c, k, groups=c, norm="batch", backend=backend).to(x.device, x.dtype).train()
        g = torch.randn_like(x)
        # allow_unused: in training mode the branch convs' biases cancel in BatchNorm; the fused path
        # leaves them out of the graph (zero gradient), the unfused one gives them exact zeros.
        step = lambda: torch.autograd.grad(layer(x), [x, *layer.parameters()], g, allow_unused=True)  # noqa: E731
        t = time_fn(step)
        times[backend] = t
        variant = "bn_train_fused" if backend == "auto" else "bn_train_unfused"
        rows.append(Row("decomposed_conv3d_bn", variant, name, dt, "forward+backward", "time", round(t.median_ms, 4),
                        "ms", round(t.p20_ms, 4), round(t.p80_ms, 4), flag=spread_flag(t), env=env))
        mem = peak_memory_bytes(step)
        if mem is not None:
            rows.append(Row("decomposed_conv3d_bn", variant, name, dt, "forward+backward", "peak_memory",
                            round(mem / 2**20, 1), "MiB", env=env))
    rows.append(Row("decomposed_conv3d_bn", "fused vs unfused (training, BN)", name, dt, "forward+backward",
                    "speedup", round(times["torch"].median_ms / times["auto"].median_ms, 2), "x",
                    flag=join_flags(*(spread_flag(t, f"backend={b}") for b, t in times.items())), env=env))
    return rows


def write_report(rows: list[Row], out_dir: Path, gpu: bool) -> None:
    """``conv_{cpu,gpu}.csv`` from ``rows``, then the Markdown tables made from that CSV."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "conv_gpu" if gpu else "conv_cpu"
    csv_path = write_csv(rows, out_dir / f"{stem}.csv")
    table = read_csv(csv_path)
    # In these CSVs `variant` holds the implementation and `backend` the pass timed.
    passes = {"backend": "pass"}
    md = [markdown_pivot([r for r in table if r["metric"] == "time"], ["input", "dtype", "backend"], "variant",
                         "Decomposed depthwise conv: median time per call", passes),
          markdown_pivot([r for r in table if r["metric"] in ("%copy",) and r["backend"] == "forward"],
                         ["input", "dtype"], "variant",
                         "Forward bandwidth (floor bytes), as % of the fastest torch.clone of the same tensor"),
          markdown_pivot([r for r in table if r["metric"] == "speedup"], ["input", "dtype"], "variant",
                         "Forward+backward speed-up (CPU: our CPU path vs the same convs on the same layout)"),
    ]
    if gpu:
        md.append(markdown_pivot([r for r in table if r["model"] == "decomposed_conv3d_bn"],
                                 ["input", "dtype", "metric"], "variant",
                                 "Training mode with per-branch BatchNorm (channels_last_3d): fused vs unfused"))
    (out_dir / f"{stem}.md").write_text("\n".join(md))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results folder (default %(default)s, ignored by git; bench/results holds the "
                             "committed ones)")
    parser.add_argument("--quick", action="store_true", help="batch 2 only")
    parser.add_argument("--stages", type=int, nargs="+", choices=range(1, 5), metavar="{1,2,3,4}",
                        help="DCFormer stages to run (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 float32 on GPU, float32 on CPU")
    parser.add_argument("--batches", type=int, nargs="+", help="default: 2 8 on GPU (2 with --quick), 2 on CPU")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds; the rest is recorded as skipped")
    parser.add_argument("--compile-only", action="store_true",
                        help="call every variant once (fills Triton's and Inductor's on-disk caches), time and "
                             "write nothing: lets a GPU session compile in parallel processes before timing")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes] if args.dtypes else None
    csv_path = run(args.out, args.quick, args.stages, dtypes, args.batches, args.budget_s, args.compile_only)
    if not args.compile_only:
        print(csv_path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
