"""Compile every Triton kernel of the library for an H100 (sm_90) without a GPU.

    TRITON_INTERPRET=0 python -m bench.static.compile_check

The interpreter (how the tests run the kernels on CPU) never runs Triton's GPU compiler, so a
construct the interpreter accepts but the compiler rejects would first show on a GPU. This
records the launches the host code makes on ``meta`` tensors for one representative case per
code path (dtypes, memory formats, strides, 64-bit offsets, the fused BatchNorm, the SigLIP
forward, fused backward and stripes kernel) and compiles each to SASS with the ptxas that
ships in Triton's wheel. Prints one line per kernel; exits non-zero on the first failure.
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

import dcformer_kernels.conv_common as conv_common
import dcformer_kernels.decomposed_conv as dc
import dcformer_kernels.decomposed_conv_bn as dcbn
import dcformer_kernels.siglip as sg

from .sass import capture_launches, compile_launch, sass_counts

CONV_CASES = [  # (shape, k, dtype, channels_last, stride, forward on the tensor cores)
    ((2, 24, 6, 10, 12), 5, torch.bfloat16, True, 1, False),
    ((2, 24, 6, 10, 12), 3, torch.float32, False, 2, False),
    ((1, 2, 1100, 1100, 1000), 3, torch.float16, False, 1, False),  # > 2^31 elements: 64-bit offsets
    ((1, 8, 5, 6, 7), 3, torch.float64, True, 1, False),
    ((1, 4, 1, 1, 1), 3, torch.float32, False, 1, False),  # one value per channel: ints equal to 1 specialise
    ((1, 4, 16, 17, 18), 7, torch.bfloat16, False, 1, True),  # what "auto" runs on CUDA (fp16/bf16 NCDHW)
    ((1, 2, 1100, 1100, 1000), 3, torch.float16, False, 1, True),  # the same with 64-bit offsets
]


def _conv_launches():
    for shape, k, dtype, channels_last, stride, tensor_cores in CONV_CASES:
        x = torch.empty(shape, dtype=dtype, device="meta")
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        ws = [torch.empty(shape[1], k, dtype=dtype, device="meta") for _ in range(3)]
        bias = torch.empty(shape[1], dtype=dtype, device="meta")
        names = ("_decomposed_conv3d_fwd_kernel", "_decomposed_conv3d_tc_fwd_kernel", "_decomposed_conv3d_bwd_kernel",
                 "_decomposed_conv3d_tc_dweight_kernel", "_weight_grads_kernel")
        impl = "tensor_cores" if tensor_cores else "direct"
        with capture_launches(dc, *names[:-1]) as launches, capture_launches(conv_common, names[-1]) as sums:
            y = dc.decomposed_conv3d_forward(x, *ws, bias, stride, impl)
            dc.decomposed_conv3d_backward(torch.empty_like(y), x, *ws, stride, impl)
        launches += sums
        yield f"conv {dtype} {'cl' if channels_last else 'ncdhw'} stride {stride}", launches
        if stride == 1 and x.numel() < 2**31 and not tensor_cores:
            gamma = torch.empty(3, shape[1], dtype=dtype, device="meta")
            names = ("_bn_stats_kernel", "_bn_fold_kernel", "_bn_grad_sums_kernel", "_bn_coef_kernel",
                     "_bn_table_kernel", "_bn_dx_kernel")
            with capture_launches(dcbn, *names) as launches, \
                    capture_launches(conv_common, "_weight_grads_kernel") as sums, \
                    capture_launches(dc, "_decomposed_conv3d_fwd_kernel") as conv:
                _, mean, _, std = dcbn.decomposed_conv3d_bn_forward(x, *ws, gamma, gamma, 1e-5)
                dcbn.decomposed_conv3d_bn_backward(torch.empty_like(x), x, *ws, gamma, mean, std)
            yield f"fused BN {dtype} {'cl' if channels_last else 'ncdhw'}", launches + sums + conv


def _siglip_launches():
    props = type("Props", (), {"multi_processor_count": 132})
    for dtype, dim in ((torch.bfloat16, 768), (torch.float32, 200), (torch.float16, 256)):
        x = torch.empty(1000, dim, dtype=dtype, device="meta")
        scalar = torch.empty((), dtype=torch.float32, device="meta")
        groups = torch.empty(1000, dtype=torch.int64, device="meta")
        names = ("_siglip_fwd_kernel", "_siglip_grad_kernel", "_siglip_stripe_grad_kernel")
        with mock.patch.object(torch.cuda, "get_device_properties", lambda *a: props), \
                capture_launches(sg, *names) as launches:
            sg.triton_block_forward(x, torch.empty_like(x), scalar, scalar, groups, groups, 0, 0, 1.0)
            sg.triton_block_forward(x, torch.empty_like(x), scalar, scalar, None, None, 0, 0, 1.0)
            sg.triton_block_backward(scalar, x, torch.empty_like(x), scalar, scalar, None, None, 0, 0, 1.0)
            sg.stripes_block_backward(scalar, x, torch.empty_like(x), scalar, scalar, groups, groups, 0, 0, 1.0,
                                       stripe_grad=sg.triton_stripe_grad)
        yield f"siglip {dtype} d={dim}", launches


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for case, launches in (*_conv_launches(), *_siglip_launches()):
        for launch in launches:
            counts = sass_counts(compile_launch(launch))
            print(f"{case}: {launch.kernel.fn.__name__} -> {sum(counts.values())} SASS instructions", flush=True)


if __name__ == "__main__":
    main()
