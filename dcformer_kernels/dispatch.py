"""Backend selection and launch helpers shared by the fused ops."""
from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # Triton is absent on some platforms (macOS, Windows); the PyTorch paths still work.
    import triton  # noqa: F401
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
INT32_LIMIT = 2**31


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests set this)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch") to the path that runs on ``device``.

    "auto": Triton on CUDA; on CPU the PyTorch path, unless TRITON_INTERPRET=1, when the
    Triton kernels run through the interpreter (that is how the tests exercise them).
    "triton" also takes meta tensors: the registered ops' fake kernels give the output shapes.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        use_triton = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting()))
        return "triton" if use_triton else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if device.type not in ("cuda", "meta") and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got device {device}"
            )
    return backend


def check_interpretable(t: torch.Tensor, kernels: str) -> None:
    """Refuse a bfloat16 ``t`` for ``kernels`` where they would run in Triton's interpreter (meta
    tensors launch nothing: host code that runs on them, e.g. to count buffers, is left alone).

    The interpreter holds bfloat16 values as their raw 16-bit patterns: conversions to and from
    float32 are exact, but arithmetic, tl.dot and conversions to other types act on the integers
    (a tensor-core conv returned 1e10 against a reference of 18; the fused BatchNorm gave NaN,
    SigLIP 4e11 against 35). Kernels that do any of those on bfloat16 call this before launching;
    the direct conv kernels only convert bfloat16 to and from float32 and compute in float32, so
    they run (tested against the reference). float16 is a real NumPy type there and computes right.
    """
    if t.dtype == torch.bfloat16 and t.device.type != "meta" and triton_interpreting():
        raise NotImplementedError(
            f"the {kernels} cannot run bfloat16 tensors under Triton's CPU interpreter (TRITON_INTERPRET=1), which "
            f"computes bfloat16 on its raw 16-bit patterns (wrong results); use float32 or float16 there, "
            f"backend='torch', or a CUDA device")


def launch_directly(x: torch.Tensor) -> bool:
    """True where an op's autograd.Function may launch its kernels itself rather than through the
    registered ``torch.library`` op: plain eager calls on plain tensors. The op's dispatcher costs
    more host time than a small volume's kernels (20-120 us a call on a CPU, docs/conv_notes.md);
    torch.compile, torch.jit.trace (fvcore), FlopCounterMode, FakeTensorMode and any other dispatch
    mode still get the op, and so do meta tensors: the op's fake kernel gives their shapes (no data
    to launch on)."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and x.device.type != "meta"
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _get_current_dispatch_mode() is None)


def max_offset(t: torch.Tensor) -> int:
    """One past the largest element offset a strided view can touch."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (triton.cdiv is a jit function: ~2 us a call on the host)."""
    return -(-a // b)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for half and float32 inputs, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def acc_dtype(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype`` (see compute_dtype)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _reaches_2_31(t: torch.Tensor) -> bool:
    dense = t.is_contiguous() or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    return t.numel() >= INT32_LIMIT if dense else max_offset(t) >= INT32_LIMIT


def index_dtype(*tensors: torch.Tensor):
    """int64 offsets in the kernels where any tensor reaches past 2^31 elements, else int32."""
    return tl.int64 if any(_reaches_2_31(t) for t in tensors) else tl.int32
