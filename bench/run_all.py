"""`make bench`: the decomposed-conv kernel benchmark and the model suite, results in one folder.

    python -m bench.run_all                    # CPU-sized: a few minutes on two cores
    python -m bench.run_all --gpu              # CUDA: Med3DVLM's input size, within --budget-s
    python -m bench.run_all --models 'dcformer_*' --skip-conv

CPU: ``bench.ops.conv`` (CPU mode) then the model suite at 2x1x64x64x64 -> conv_cpu.*, models_cpu.*.
GPU: the model suite at 2x1x128x256x256, fp32 and bf16 autocast, DCFormer fused and unfused, and the
counts at 512x512x256 -> models_gpu.*. No torch.compile anywhere. The kernel benchmark is left to
``python -m bench.ops.conv`` on a GPU: it compiles many Triton and Inductor variants.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import DEFAULT_OUT

DEFAULT_BUDGET_S = {"gpu": 90.0, "cpu": 600.0}


def main(argv=None) -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run on CUDA at paper sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="results folder (default %(default)s, ignored by git); `--out bench/results` refreshes "
                             "the committed results")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="no new measurement starts after this many seconds of the whole run; the report is "
                             f"still written (default {DEFAULT_BUDGET_S['gpu']:.0f} with --gpu, "
                             f"{DEFAULT_BUDGET_S['cpu']:.0f} on CPU)")
    parser.add_argument("--models", nargs="+", default=None, metavar="PATTERN",
                        help="names or shell patterns of the suite's encoders (SUITE in bench/models/specs.py), "
                             "e.g. 'dcformer_*' (default: all of them)")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"],
                        help="model suite dtypes (default: bfloat16 float32 with --gpu, float32 on CPU)")
    parser.add_argument("--skip-conv", action="store_true", help="CPU: skip the decomposed-conv kernel benchmark")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compile-only", action="store_true",
                        help="call everything once instead of timing it (fills the kernel caches; the report's "
                             "times are NaN): lets a GPU session compile in parallel processes before timing")
    args = parser.parse_args(argv)
    budget_s = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S["gpu" if args.gpu else "cpu"]

    import torch

    from . import models
    from .common import compile_only

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device; torch.cuda.is_available() is False")
    if not args.gpu and not args.skip_conv:
        from .ops import conv

        print("== decomposed conv kernel benchmark (CPU)", flush=True)
        conv.run(args.out, quick=True, compile_only=args.compile_only)
    print("== model suite", flush=True)
    with compile_only(args.compile_only):
        csv_path = models.run(args.out, gpu=args.gpu, budget_s=budget_s, models=args.models, started=started,
                              progress=not args.no_progress, dtypes=args.dtypes)
    stems = [csv_path.stem] + ([] if args.gpu or args.skip_conv else ["conv_cpu"])
    written = sorted(p.name for stem in stems for p in args.out.glob(f"{stem}*"))
    print(f"wrote {', '.join(written)} under {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
