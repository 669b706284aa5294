"""Timed measurements of one encoder: forward latency, training-step throughput, peak memory."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..common import Row, peak_memory, spread_flag, time_fn
from .counts import resolved_path
from .specs import Encoder

__all__ = ["Job", "run_job", "DTYPES"]

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}  # bfloat16 = autocast, weights stay fp32


@dataclass(frozen=True)
class Job:
    encoder: Encoder
    dtype: str = "float32"
    backend: str = "auto"  # DCFormer's create_model(backend=...): "auto" (fused on CUDA) or "torch"

    def path(self, device: torch.device) -> str:
        return resolved_path(self.encoder, self.backend, device)


def _autocast(device: torch.device, dtype: str):
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def input_label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def run_job(job: Job, input_shape: tuple[int, ...], device: torch.device, env: dict,
            rep_ms: float = 100) -> list[Row]:
    """Inference latency and peak memory; training-step time, throughput and peak memory.

    The two phases fail independently: an error in one is written as an ``error`` row of that phase.
    """
    build = {"backend": job.backend} if job.encoder.is_dcformer else {}
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = job.encoder.build(**build).to(device)
    x = torch.randn(input_shape, device=device)
    batch = input_shape[0]
    common = dict(model=job.encoder.label, input=input_label(input_shape), dtype=job.dtype,
                  backend=job.path(device), env=env)
    rows = []

    def record(variant, metric, value, unit, p20="", p80="", flag=""):
        rows.append(Row(variant=variant, metric=metric, value=value, unit=unit, p20=p20, p80=p80, flag=flag,
                        **common))

    def inference():
        model.eval()

        def forward():
            with torch.no_grad(), _autocast(device, job.dtype):
                return model(x)

        t = time_fn(forward, rep_ms=rep_ms, min_reps=5, cuda=cuda)
        record("inference", "latency", round(t.median_ms, 3), "ms", round(t.p20_ms, 3), round(t.p80_ms, 3),
               spread_flag(t))
        mib, measure = peak_memory(forward, cuda=cuda)
        record("inference", "peak_memory", round(mib, 1), f"MiB ({measure})")

    def training():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, job.dtype):
                loss = model(x).float().mean()
            loss.backward()
            optimizer.step()

        t = time_fn(train_step, rep_ms=rep_ms, min_reps=5, cuda=cuda)  # its warm-up also creates AdamW's state
        record("training", "step_time", round(t.median_ms, 3), "ms", round(t.p20_ms, 3), round(t.p80_ms, 3),
               spread_flag(t))
        # volumes/s; the 20th percentile of throughput is the 80th of time
        record("training", "throughput", round(batch * 1e3 / t.median_ms, 3), "volumes/s",
               round(batch * 1e3 / t.p80_ms, 3), round(batch * 1e3 / t.p20_ms, 3), spread_flag(t))
        # Measured from a state without gradients, on CPU and CUDA alike: the peak above parameters,
        # optimizer state and input, gradients included. (With the last step's gradients live, the
        # CUDA measure would net them out against the new ones, and the CPU one, whose profiler
        # does not see the old ones freed, would count them twice.)
        optimizer.zero_grad(set_to_none=True)
        mib, measure = peak_memory(train_step, cuda=cuda)
        record("training", "peak_memory", round(mib, 1), f"MiB ({measure})")

    for variant, phase in (("inference", inference), ("training", training)):
        try:
            phase()
        except Exception as exc:  # e.g. a dtype the path does not support; the other phase still runs
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
            record(variant, "error", f"{type(exc).__name__}: {first_line}", "")
    return rows
