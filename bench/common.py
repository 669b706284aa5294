"""Shared benchmark plumbing: timing, environment record, long-format CSV and Markdown."""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

ENV_FIELDS = ["device", "torch", "triton", "cuda", "date"]
# flag: empty, or "unreliable: <why>" for a figure that cannot be trusted as a result (see reliability below)
CSV_FIELDS = ["model", "variant", "input", "dtype", "backend", "metric", "value", "unit", "p20", "p80", "flag",
              *ENV_FIELDS]

# Where a run writes unless told otherwise: an ignored folder, so that a user's `make bench` never
# overwrites the committed results under bench/results/ (refreshed on purpose: --out bench/results).
DEFAULT_OUT = Path("bench/results/local")


def _on_cuda(cuda: bool | None) -> bool:
    """Whether a measurement runs on CUDA: as asked, or (None) wherever a CUDA device exists."""
    return torch.cuda.is_available() if cuda is None else cuda


def environment(cuda: bool | None = None) -> dict:
    """Device name and library versions stamped on every row (``cuda=False``: the CPU's, also on
    a machine with a GPU)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if _on_cuda(cuda):
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores, " \
                 f"{torch.get_num_threads()} torch threads)"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "none", "date": _dt.date.today().isoformat()}


@dataclass
class Row:
    model: str
    variant: str
    input: str
    dtype: str
    backend: str
    metric: str
    value: float | str
    unit: str
    p20: float | str = ""
    p80: float | str = ""
    flag: str = ""
    env: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        env = d.pop("env")
        return {**d, **env}


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def spread(self) -> float:
        """p80 / p20: 1 for calls that all took the same time (NaN in compile-only mode)."""
        return self.p80_ms / self.p20_ms if self.p20_ms > 0 else math.nan


# Reliability. A shared CPU (other processes, OpenMP threads of two processes waiting on each
# other) slows some calls and not others: a timing whose p80 is more than MAX_SPREAD times its p20
# is repeated (time_fn), and flagged if it stays so. (The committed 2-core results: at most 1.42.)
MAX_SPREAD = 1.5


def spread_flag(timing: Timing, what: str = "") -> str:
    """"unreliable: ..." when ``timing``'s p80/p20 exceeds MAX_SPREAD, else ""; ``what`` names the
    timing where a row combines several."""
    if timing.spread > MAX_SPREAD:
        return f"unreliable: {what + ' ' if what else ''}spread p80/p20 = {timing.spread:.2f} (above {MAX_SPREAD})"
    return ""


def ceiling_flag(bandwidth_gbs: float, ceiling_gbs: float, ceiling: str = "torch.clone") -> str:
    """"unreliable: ..." for a bandwidth above the measured ceiling (a copy moves the fewest bytes
    any op can: beating it means the ceiling's or this timing was disturbed), else ""."""
    if bandwidth_gbs > ceiling_gbs:
        return (f"unreliable: {bandwidth_gbs:.4g} GB/s is {100 * bandwidth_gbs / ceiling_gbs:.0f} % of the "
                f"measured {ceiling} ceiling ({ceiling_gbs:.4g} GB/s)")
    return ""


def join_flags(*flags: str) -> str:
    """One flag from several: "unreliable: a; b"."""
    reasons = [f.removeprefix("unreliable: ") for f in flags if f]
    return "unreliable: " + "; ".join(dict.fromkeys(reasons)) if reasons else ""


_COMPILE_ONLY = False


@contextlib.contextmanager
def compile_only(enabled: bool = True):
    """Inside, ``time_fn`` calls ``fn`` once and returns NaN times and ``peak_memory_bytes`` calls it
    once and returns None. A GPU session runs the benchmarks so in parallel processes first (every
    Triton and Inductor kernel lands in the on-disk caches), then times them one at a time."""
    global _COMPILE_ONLY
    saved, _COMPILE_ONLY = _COMPILE_ONLY, enabled
    try:
        yield
    finally:
        _COMPILE_ONLY = saved


def time_fn(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 3,
            cuda: bool | None = None, attempts: int = 3) -> Timing:
    """Median (p20, p80) wall time of ``fn`` in ms: CUDA events via do_bench on GPU, perf_counter on CPU
    (``cuda``: which; None = CUDA wherever a device exists).

    On CPU at least ``min_reps`` timed calls after one warm-up call (5 or more give real p20/p80;
    with fewer, p20 and p80 are the fastest and the slowest call). A timing whose spread exceeds
    MAX_SPREAD is taken again, up to ``attempts`` times in all; the steadiest one is returned
    (``spread_flag`` says whether it is still too noisy to report).
    """
    if _COMPILE_ONLY:
        fn()
        return Timing(math.nan, math.nan, math.nan)
    best = time_once(fn, warmup_ms, rep_ms, min_reps, cuda)
    for _ in range(attempts - 1):
        if not best.spread > MAX_SPREAD:
            break
        again = time_once(fn, warmup_ms, rep_ms, min_reps, cuda)
        best = min(best, again, key=lambda t: t.spread)
    return best


def time_once(fn, warmup_ms, rep_ms, min_reps, cuda) -> Timing:
    """One timing of ``fn`` as ``time_fn`` takes it (arguments as there), never taken again."""
    if _on_cuda(cuda):
        import triton.testing

        # do_bench repeats max(1, rep / its estimate) times: stretch rep so that a slow call is
        # still timed min_reps times (at most 10 s), from one call after a warm one.
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        rep = min(max(rep_ms, min_reps * (time.perf_counter() - start) * 1e3), 10_000.0)
        p20, med, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep, quantiles=[0.2, 0.5, 0.8])
        return Timing(med, p20, p80)
    warm_until = time.perf_counter() + warmup_ms / 1e3
    fn()  # warm-up: at least one call, and until warmup_ms has passed (first calls build kernels, caches)
    while time.perf_counter() < warm_until:
        fn()
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < min_reps or (time.perf_counter() < deadline and len(samples) < 50):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return timing_from_samples(samples)


def timing_from_samples(samples_ms: list[float]) -> Timing:
    """Median, p20 and p80 of wall times (with fewer than 5, p20 and p80 are the fastest and the slowest)."""
    if len(samples_ms) >= 5:
        q = statistics.quantiles(samples_ms, n=5)
        return Timing(statistics.median(samples_ms), q[0], q[3])
    return Timing(statistics.median(samples_ms), min(samples_ms), max(samples_ms))


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before; None on CPU."""
    if _COMPILE_ONLY:
        fn()
        return None
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


CUDA_PEAK_MEASURE = "CUDA max_memory_allocated above resident"
CPU_PEAK_MEASURE = "CPU allocator peak above resident, torch.profiler"


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto writes a start and a stop line to file descriptor 2 on every profile; hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes PyTorch's CPU allocator handed out while ``fn`` runs, above what was live before.

    The profiler records every allocation and free with its size; their running sum in time order
    is the live total. (RSS-based measures see the process, not the tensors, and tracemalloc does
    not see torch's allocator at all.)
    """
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # frees of blocks allocated before the profiler started are not recorded
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[[], object], cuda: bool | None = None) -> tuple[float, str]:
    """Peak memory of one call of ``fn`` in MiB, and the name of the measure (for the unit column);
    ``cuda`` as for time_fn."""
    if _on_cuda(cuda):
        peak = peak_memory_bytes(fn)  # None in compile-only mode
        return (math.nan if peak is None else peak / 2**20), CUDA_PEAK_MEASURE
    return cpu_peak_allocated_bytes(fn) / 2**20, CPU_PEAK_MEASURE


def write_csv(rows: Iterable[Row], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value: str) -> str:
    try:
        v = float(value)
    except ValueError:
        return value
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def markdown_pivot(rows: list[dict], index: list[str], column: str, title: str,
                   headers: dict[str, str] | None = None) -> str:
    """A Markdown table from long-format rows: one line per ``index`` tuple, one column per ``column`` value.

    Units are stated once: under the title when the table has one unit, else in each column's
    header (cells keep a unit only where a column mixes them). A flagged row's cell says
    "(unreliable)" and the reasons follow the table. ``headers`` renames index columns
    (e.g. {"backend": "pass"}), so each header says what the column holds.
    """
    headers = headers or {}
    columns = list(dict.fromkeys(r[column] for r in rows))
    units = {c: {r["unit"] for r in rows if r[column] == c} for c in columns}
    all_units = set().union(*units.values()) if units else set()
    one_unit = len(all_units) == 1
    table: dict[tuple, dict] = {}
    flagged = []
    for r in rows:
        key = tuple(r[k] for k in index)
        cell = _fmt(r["value"])
        if not one_unit and len(units[r[column]]) > 1 and r["unit"]:
            cell += f" {r['unit']}"
        if r.get("flag"):
            cell += " (unreliable)"
            flagged.append(f"- {', '.join(key)}, {r[column]}: {r['flag'].removeprefix('unreliable: ')}")
        table.setdefault(key, {})[r[column]] = cell
    header = [headers.get(k, k) for k in index] + [
        f"{c} ({next(iter(units[c]))})" if not one_unit and len(units[c]) == 1 and next(iter(units[c])) else c
        for c in columns]
    text = markdown_table(title, header, [list(key) + [cells.get(c, "") for c in columns]
                                          for key, cells in table.items()],
                          rows[0] if rows else {}, unit=next(iter(all_units)) if one_unit else None)
    if flagged:
        text += "\nUnreliable (not a result; the CSV's `flag` column):\n\n" + "\n".join(flagged) + "\n"
    return text


def environment_line(env: dict) -> str:
    return (f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"CUDA {env.get('cuda', '?')}; {env.get('date', '?')}")


def markdown_table(title: str, header: list[str], lines: list[list[str]], env: dict | None = None,
                   unit: str | None = None) -> str:
    """A titled Markdown table; ``env`` (a row or ``environment()``) adds the device line under the
    title, ``unit`` a line saying what unit every value is in."""
    out = [f"### {title}", ""]
    if env is not None:
        out += [environment_line(env), ""]
    if unit:
        out += [f"Unit of every value: {'x (a ratio)' if unit == 'x' else unit}.", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out) + "\n"
