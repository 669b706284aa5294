"""Model-level benchmark: every registry encoder's size, compute, speed and memory, CSV first.

For each encoder (DCFormer variants, ViT3D, ConvNeXt3D, PoolFormer3D):
- parameters; FLOPs by FlopCounterMode (2 per multiply-add) and multiply-adds by fvcore (1 per);
- forward latency and training-step throughput (forward + backward + AdamW step), median (p20, p80);
- peak memory (CUDA max_memory_allocated; on CPU the allocator peak from torch.profiler);
- DCFormer fused (backend="auto" on CUDA) against unfused (backend="torch"), fp32 and bf16 autocast;
- the DCFormer paper's table (params, fvcore GFLOPs at 512x512x256) and REFERENCE's exact
  FlopCounterMode totals, counted without running the network at that size.

Results: ``models_{cpu,gpu}.csv`` (bench.common.CSV_FIELDS), ``.md`` made from it, PNG plots.
Run through ``python -m bench.run_all`` (see bench/README.md).
"""
from __future__ import annotations

import fnmatch
import signal
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..common import DEFAULT_OUT, Row, environment, join_flags, write_csv
from .counts import flop_counter_flops, fvcore_macs, head_counts, parameter_count
from .measure import Job, input_label, run_job
from .report import write_report
from .specs import (CPU_EXCLUDED, CPU_INPUT, GPU_INPUT, PAPER_INPUT, PAPER_TABLE, PROJECTION_DIM,
                    REFERENCE_FLOP_COUNTER, SUITE, Encoder, PaperEntry)

__all__ = ["run", "select_encoders", "speedup_rows", "order_flags", "count_rows", "paper_rows",
           "reference_rows"]

# Within a family, a model with at least ORDER_FLOPS_RATIO times another's FLOPs per volume that
# is timed more than ORDER_MARGIN times faster than it (same input, dtype, path and pass) is not a
# result: on a shared CPU, DCFormer-small once came out faster than nano. Both rows are flagged.
ORDER_FLOPS_RATIO = 1.5
ORDER_MARGIN = 1.1


def select_encoders(patterns: list[str] | None, gpu: bool) -> list[Encoder]:
    """SUITE entries whose family is registered, filtered by shell-style ``patterns`` on their registry
    names; a pattern that matches none of them is an error (it would silently measure nothing)."""
    chosen = [e for e in SUITE if e.available()]
    if patterns:
        unmatched = [p for p in patterns if not any(fnmatch.fnmatch(e.name, p) for e in chosen)]
        if unmatched:
            raise ValueError(f"--models {unmatched} match no encoder of the suite; it has "
                             f"{[e.name for e in chosen]} (bench/models/specs.py SUITE)")
        return [e for e in chosen if any(fnmatch.fnmatch(e.name, p) for p in patterns)]
    return chosen if gpu else [e for e in chosen if e.name not in CPU_EXCLUDED]


def count_rows(encoder: Encoder, input_shape: tuple[int, ...], device: torch.device, env: dict) -> list[Row]:
    """Params, FlopCounterMode FLOPs (fused path) and fvcore MACs (the path this device runs) at the input."""
    batch_one = (1, *input_shape[1:])
    flops, _ = flop_counter_flops(encoder, batch_one)
    macs, how = fvcore_macs(encoder, batch_one, device=device)
    with torch.device("meta"):
        params = parameter_count(encoder.build())
    fused_label = "fused" if encoder.is_dcformer else "pytorch"
    run_label = Job(encoder).path(device)
    common = dict(model=encoder.label, variant="eval", input=input_label(batch_one), dtype="float32", env=env)
    return [Row(backend=fused_label, metric="params", value=params, unit="count", **common),
            Row(backend=fused_label, metric="flops_flopcountermode", value=flops, unit="FLOP", **common),
            Row(backend=run_label, metric="macs_fvcore", value=macs, unit=f"MAC (fvcore, {how})", **common)]


def paper_rows(entry: PaperEntry, device: torch.device, env: dict) -> list[Row]:
    """One paper-table entry at 512x512x256: the paper's convention (fvcore) and FlopCounterMode."""
    encoder = entry.encoder
    with torch.device("meta"):
        model = encoder.build()
    params = parameter_count(model)
    channels = model.feature_info[-1]["num_chs"]
    backend = "torch" if encoder.is_dcformer else None  # the official graph: BN on every branch
    macs, how = fvcore_macs(encoder, PAPER_INPUT, train=True, device=device, backend=backend, scale_down=True)
    flops, _ = flop_counter_flops(encoder, PAPER_INPUT)
    inp = input_label(PAPER_INPUT)
    path = "unfused" if encoder.is_dcformer else "pytorch"
    common = dict(model=encoder.label, variant="paper count", input=inp, dtype="float32", backend=path, env=env)
    rows = [Row(metric="params", value=params, unit="count", **common),
            Row(metric="macs_fvcore", value=macs, unit=f"MAC (fvcore, training-mode graph, {how})", **common)]
    if entry.projection_head:
        head_params, head_macs = head_counts(channels)
        rows += [Row(metric="params+head", value=params + head_params,
                     unit=f"count (+ Linear({channels}, {PROJECTION_DIM}))", **common),
                 Row(metric="macs_fvcore+head", value=macs + head_macs,
                     unit=f"MAC (fvcore, + Linear({channels}, {PROJECTION_DIM}) on the pooled map)", **common)]
    rows.append(Row(model=encoder.label, variant="eval", input=inp, dtype="float32",
                    backend="fused" if encoder.is_dcformer else "pytorch", metric="flops_flopcountermode",
                    value=flops, unit="FLOP", env=env))
    return rows


def reference_rows(env: dict) -> list[Row]:
    """REFERENCE's FlopCounterMode totals at inputs other than the paper's (DCFormer-small at 128x256x256)."""
    rows = []
    for (name, shape), _ in REFERENCE_FLOP_COUNTER.items():
        if shape == PAPER_INPUT or not Encoder(name).available():
            continue
        flops, _ = flop_counter_flops(Encoder(name), shape)
        rows.append(Row(model=name, variant="eval", input=input_label(shape), dtype="float32", backend="fused",
                        metric="flops_flopcountermode", value=flops, unit="FLOP", env=env))
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and value == value  # not a note, not NaN


def order_flags(rows: list[Row]) -> list[tuple[Row, str]]:
    """(row, "unreliable: ...") for every latency, step-time and throughput row whose timing
    contradicts the FLOP order of its family (see ORDER_FLOPS_RATIO); ``rows`` are left unchanged."""
    flops = {(r.model, r.input): r.value for r in rows
             if r.metric == "flops_flopcountermode" and r.variant == "eval" and _number(r.value)}

    def per_volume_flops(r: Row):
        return flops.get((r.model, "x".join(["1", *r.input.split("x")[1:]])))

    timed = [r for r in rows if r.metric in ("latency", "step_time") and _number(r.value) and per_volume_flops(r)]
    reasons: dict[int, list[str]] = {}
    for big in timed:
        for small in timed:
            same = [(r.model.split("_")[0], r.input, r.dtype, r.backend, r.variant, r.metric) for r in (big, small)]
            ratio = per_volume_flops(big) / per_volume_flops(small)
            if same[0] != same[1] or ratio < ORDER_FLOPS_RATIO or big.value * ORDER_MARGIN >= small.value:
                continue
            why = (f"{big.model} ({ratio:.1f}x the FLOPs of {small.model}) timed {small.value / big.value:.2f}x "
                   f"faster than it")
            for r in (big, small):
                reasons.setdefault(id(r), []).append(why)
    flags = []
    by_id = {id(r): r for r in timed}
    for key, why in reasons.items():
        row = by_id[key]
        flag = join_flags(*(f"unreliable: {w}" for w in why))
        flags.append((row, flag))
        if row.metric == "step_time":  # the throughput row is the same timing
            flags += [(r, flag) for r in rows if r.metric == "throughput" and (r.model, r.input, r.dtype, r.backend)
                      == (row.model, row.input, row.dtype, row.backend)]
    return flags


def speedup_rows(rows: list[Row]) -> list[Row]:
    """Fused against unfused DCFormer: time ratios (unfused / fused) and training memory (fused / unfused)."""
    index = {(r.model, r.input, r.dtype, r.backend, r.variant, r.metric): r for r in rows}
    out = []
    for (model, inp, dtype, path, variant, metric), fused in index.items():
        if path != "fused" or metric not in ("latency", "step_time", "peak_memory"):
            continue
        unfused = index.get((model, inp, dtype, "unfused", variant, metric))
        if unfused is None or not all(isinstance(r.value, (int, float)) and r.value > 0 for r in (fused, unfused)):
            continue
        common = dict(model=model, variant=variant, input=inp, dtype=dtype, backend="fused vs unfused",
                      flag=join_flags(fused.flag, unfused.flag), env=fused.env)
        if metric == "peak_memory":
            if variant == "training":
                out.append(Row(metric="memory_ratio", value=round(fused.value / unfused.value, 3),
                               unit="fused / unfused", **common))
        else:
            out.append(Row(metric="speedup", value=round(unfused.value / fused.value, 3), unit="x", **common))
    return out


@dataclass(frozen=True)
class Task:
    """One unit of work; its fields label the row written when it fails or is skipped."""

    name: str
    make_rows: Callable[[], list[Row]]
    model: str
    variant: str
    input: str = ""
    dtype: str = ""
    backend: str = ""

    @property
    def timed(self) -> bool:
        return self.variant == "inference+training"

    def note(self, metric: str, why: str, env: dict) -> Row:
        return Row(model=self.model, variant=self.variant, input=self.input, dtype=self.dtype, backend=self.backend,
                   metric=metric, value=why, unit="", env=env)


def _tasks(encoders: list[Encoder], gpu: bool, device: torch.device, input_shape, env, rep_ms,
           dtypes=None) -> list[Task]:
    """The suite's tasks in priority order: under a time budget the head of the list runs first."""
    dtypes = dtypes or (("bfloat16", "float32") if gpu else ("float32",))
    # On a CPU backend="auto" already is the unfused path: one run, not two identical ones.
    backends = ("auto", "torch") if gpu else ("auto",)
    inp = input_label(input_shape)

    def timing(e: Encoder) -> list[Task]:
        jobs = [Job(e, d, b) for d in dtypes for b in (backends if e.is_dcformer else ("auto",))]
        return [Task(f"{e.label} {j.dtype} {j.path(device)}", lambda j=j: run_job(j, input_shape, device, env, rep_ms),
                     e.label, "inference+training", inp, j.dtype, j.path(device)) for j in jobs]

    def counts(e: Encoder) -> Task:
        return Task(f"{e.label} counts", lambda: count_rows(e, input_shape, device, env), e.label, "eval",
                    input_label((1, *input_shape[1:])), "float32")

    paper = [Task(f"paper table: {p.encoder.label}", lambda p=p: paper_rows(p, device, env), p.encoder.label,
                  "paper count", input_label(PAPER_INPUT), "float32")
             for p in PAPER_TABLE if p.encoder in encoders]
    tasks = []
    if encoders:  # the headline first: Med3DVLM's encoder (or the first selected), then the paper's DCFormers
        tasks += timing(encoders[0]) + [counts(encoders[0])]
    tasks += [t for t in paper if t.model.startswith("dcformer")]
    tasks.append(Task("reference FlopCounterMode totals", lambda: reference_rows(env), "dcformer_small", "eval"))
    for e in encoders[1:]:
        tasks += timing(e) + [counts(e)]
    tasks += [t for t in paper if not t.model.startswith("dcformer")]
    return tasks


class _Terminated(BaseException):  # not an Exception: the per-task handlers must not catch it
    """SIGTERM (e.g. from `timeout`) during the suite: stop measuring, still write the report."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def run(out_dir: Path = DEFAULT_OUT, gpu: bool = False, budget_s: float | None = None,
        models: list[str] | None = None, started: float | None = None, progress: bool = True,
        rep_ms: float | None = None, input_shape: tuple[int, ...] | None = None, dtypes=None) -> Path:
    """Run the suite, write ``models_{cpu,gpu}.csv``, ``.md`` and the plots; return the CSV path.

    ``budget_s`` (seconds since ``started``): no new task starts once the elapsed time plus the median
    task time so far exceeds it; the tasks left are listed as skipped and the report is still written.
    The CSV is rewritten after every task, and a SIGTERM stops the run and writes the report, so a
    run killed by ``timeout`` keeps what it measured. Timings flagged as unreliable (noisy, or
    against the FLOP order, ``order_flags``) are taken once more after the other tasks, when the
    load on a shared machine may have changed; what is still unreliable then stays flagged.
    """
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("gpu=True needs a CUDA device; torch.cuda.is_available() is False")
    started = time.perf_counter() if started is None else started
    device = torch.device("cuda" if gpu else "cpu")
    env = environment(cuda=gpu)
    input_shape = input_shape or (GPU_INPUT if gpu else CPU_INPUT)
    rep_ms = rep_ms if rep_ms is not None else (100 if gpu else 300)
    csv_path = out_dir / f"{'models_gpu' if gpu else 'models_cpu'}.csv"
    tasks = _tasks(select_encoders(models, gpu), gpu, device, input_shape, env, rep_ms, dtypes)
    results: list[list[Row]] = [[] for _ in tasks]  # rows per task, in task order
    durations: list[float] = []

    def all_rows() -> list[Row]:
        return [r for rows in results for r in rows]

    def attempt(k: int, again: bool = False) -> None:
        task = tasks[k]
        elapsed = time.perf_counter() - started
        if budget_s is not None and elapsed + (statistics.median(durations) if durations else 0) > budget_s:
            if not again:
                results[k] = [task.note("skipped", f"time budget ({budget_s:.0f} s) reached", env)]
            return
        if again:
            print(f"timing {task.name} again: some of its figures were flagged unreliable", flush=True)
        elif hasattr(bar, "set_description"):
            bar.set_description(task.name[:40])
        t0 = time.perf_counter()
        try:
            results[k] = task.make_rows()
        except Exception as exc:  # one failing model must not lose the others' results
            first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
            results[k] = [task.note("error", f"{type(exc).__name__}: {first_line}", env)]
            if isinstance(exc, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            elif not progress:
                traceback.print_exc()
        durations.append(time.perf_counter() - t0)
        write_csv(all_rows(), csv_path)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    bar = _progress(range(len(tasks)), progress)
    terminated = False
    try:
        for k in bar:
            attempt(k)
        for k in _unreliable_tasks(tasks, results):
            attempt(k, again=True)
    except _Terminated:
        results.append([Row(model="(suite)", variant="", input="", dtype="", backend="", metric="skipped",
                            value="terminated by SIGTERM; later tasks not run", unit="", env=env)])
        terminated = True
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    rows = all_rows()
    for row, flag in order_flags(rows):
        row.flag = join_flags(row.flag, flag)
    rows += speedup_rows(rows)
    write_csv(rows, csv_path)
    write_report(csv_path, title=f"Model benchmark ({'GPU' if gpu else 'CPU'})")
    if terminated:
        return csv_path
    try:
        from ..plots import write_plots
    except ImportError as exc:  # the CSV and the Markdown are the results; plots are a view of them
        print(f"plots not written ({exc}); `python -m bench.plots {csv_path}` makes them later")
    else:
        write_plots(csv_path)
    return csv_path


def _unreliable_tasks(tasks: list[Task], results: list[list[Row]]) -> list[int]:
    """Indices of the timing tasks with a flagged row (their own, or against the FLOP order)."""
    flagged = {id(row) for row, _ in order_flags([r for rows in results for r in rows])}
    return [k for k, (task, rows) in enumerate(zip(tasks, results))
            if task.timed and any(r.flag or id(r) in flagged for r in rows)]


def _progress(tasks: list, enabled: bool):
    if not enabled:
        return tasks
    try:
        from tqdm import tqdm
    except ImportError:
        return tasks
    return tqdm(tasks, unit="task", dynamic_ncols=True)
