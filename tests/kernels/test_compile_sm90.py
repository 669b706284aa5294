"""Every Triton kernel compiles for an H100 (sm_90), on a machine without a GPU.

The other tests run the kernels through Triton's interpreter, which never invokes the GPU
compiler; this runs ``bench.static.compile_check`` (Triton's own LLVM and the ptxas in its wheel) in a
process without TRITON_INTERPRET, so a kernel the compiler rejects fails here, not on a GPU.
"""
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
NVIDIA_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not all((NVIDIA_BIN / tool).exists() for tool in ("ptxas", "nvdisasm")),
                    reason="this Triton wheel ships no ptxas/nvdisasm")
def test_every_kernel_compiles_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "bench.static.compile_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=500)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    compiled = {line.split(": ")[1].split(" ->")[0] for line in lines}
    assert compiled == {"_decomposed_conv3d_fwd_kernel", "_decomposed_conv3d_tc_fwd_kernel",
                        "_decomposed_conv3d_tc_dweight_kernel",
                        "_decomposed_conv3d_bwd_kernel", "_bn_stats_kernel", "_bn_fold_kernel",
                        "_bn_grad_sums_kernel", "_bn_coef_kernel", "_bn_table_kernel", "_bn_dx_kernel",
                        "_weight_grads_kernel",
                        "_siglip_fwd_kernel", "_siglip_grad_kernel", "_siglip_stripe_grad_kernel"}
    assert len(lines) == 68 and all(int(line.split("-> ")[1].split()[0]) > 50 for line in lines), run.stdout
