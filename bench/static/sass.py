"""Compile Triton kernels for an NVIDIA target without a GPU and count their SASS instructions.

Triton's wheel ships LLVM, ptxas and nvdisasm, so the exact machine code a launch would run on an
H100 (sm_90) can be produced on any machine. ``capture_launches`` records the launches a host
function makes (their arguments give the same specialisation as a real launch: integers equal to
1 become constants, multiples of 16 get a divisibility hint, pointers are assumed 16-byte
aligned), and ``sass_counts`` compiles one and counts opcodes. Tensors may live on the ``meta``
device, so nothing is computed.

This is a static count. It predicts time only for kernels that are bound by instruction issue
and run no runtime loops (every instruction of the program then executes once); say which model
a number comes from when you quote it.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

H100 = GPUTarget("cuda", 90, 32)


@dataclass
class Launch:
    kernel: object  # triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return record


@contextlib.contextmanager
def capture_launches(module, *names):
    """Within the block, ``module.<name>[grid](...)`` records a Launch instead of running."""
    launches: list[Launch] = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


def compile_launch(launch: Launch, target: GPUTarget = H100):
    """The CompiledKernel (ttgir, ptx, cubin in ``.asm``) a real launch would build."""
    from triton.compiler.compiler import make_backend

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def sass_counts(compiled) -> collections.Counter:
    """Opcode (with modifiers, e.g. ``LDG.E.128``) -> number of instructions in the cubin."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    counts = collections.Counter()
    for line in text.splitlines():
        m = _OPCODE.match(line)
        if m and m.group(1) not in ("NOP",):
            counts[m.group(1)] += 1
    return counts


def resources(compiled) -> dict:
    """Registers per thread, spill (local) bytes per thread and dynamic shared memory per program,
    as ptxas allocated them for the cubin (``cuobjdump -res-usage``)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|LOCAL|STACK):(\d+)", text))
    return {"registers": int(usage["REG"]), "spill_bytes": int(usage["LOCAL"]) + int(usage["STACK"]),
            "shared_bytes": compiled.metadata.shared}


H100_REGISTERS_PER_SM, H100_SHARED_PER_SM, H100_WARPS_PER_SM, H100_PROGRAMS_PER_SM = 65536, 227 * 1024, 64, 32


def programs_per_sm(res: dict, num_warps: int) -> int:
    """Resident programs an H100 SM can hold with these ``resources``: the least of the register,
    shared-memory, warp and block limits (registers as allocated per thread; ptxas rounds to 8)."""
    by_registers = H100_REGISTERS_PER_SM // (res["registers"] * 32 * num_warps)
    by_shared = H100_SHARED_PER_SM // res["shared_bytes"] if res["shared_bytes"] else H100_PROGRAMS_PER_SM
    return min(by_registers, by_shared, H100_WARPS_PER_SM // num_warps, H100_PROGRAMS_PER_SM)


def summarize(counts: collections.Counter) -> dict:
    """Totals by class: all, FFMA/FMUL/FADD (fp32 math), global loads by width, stores, branches."""
    def total(pred):
        return sum(v for k, v in counts.items() if pred(k))

    return {
        "instructions": sum(counts.values()),
        "fp32_math": total(lambda k: k.split(".")[0] in ("FFMA", "FMUL", "FADD")),
        "ldg_scalar": total(lambda k: k.startswith("LDG") and not k.endswith((".64", ".128"))),
        "ldg_vector": total(lambda k: k.startswith("LDG") and k.endswith((".64", ".128"))),
        "stg": total(lambda k: k.startswith("STG")),
        "shared": total(lambda k: k.split(".")[0] in ("LDS", "STS", "LDSM")),
        "branches": total(lambda k: k.split(".")[0] in ("BRA", "BRX", "JMP")),
    }
