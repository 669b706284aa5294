"""Every GPU check of the project in one call, inside a time budget: tests, then the benchmarks.

    python -m bench.gpu_session --work /tmp/gpu_session --archive $OUT/gpu_session.tar.gz [--budget-s 480]

A lent GPU comes for minutes, and compiling Triton kernels took most of them before (all stages in
one 340 s call overran, bench/results/gpu_runs.md). So:

1. compile, in parallel (about a third of the budget): the GPU-marked tests (pytest-xdist workers
   when installed) beside ``--compile-only`` runs of every benchmark, one process per stage, size or
   model, which call each kernel once and fill Triton's and Inductor's on-disk caches;
2. time, one process at a time on an otherwise idle GPU: ``bench.ops.conv`` (batch 2, then 8),
   ``bench.ops.siglip`` (all sizes), the model suite (``bench.run_all --gpu``), the tile sweeps
   (``bench.tune.conv``, ``bench.tune.siglip``); ``--benchmarks`` picks which. Before them,
   ``bench.static.host_overhead`` (host time per call of tiny fused-conv calls). Each has a share of what is left, stops
   starting new cases at its share and writes its CSV as it goes; a process still running at its
   hard limit gets SIGTERM, then SIGKILL (its whole process group).

Then a short summary table. Results and every log go under ``--work``, packed into ``--archive``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

PY = sys.executable


@dataclass
class Job:
    name: str
    argv: list[str]


BENCHMARKS = ("conv", "siglip", "models", "tune", "tune_siglip")


def _compile_jobs(work: Path, benchmarks, models) -> list[Job]:
    scratch = str(work / "compile_only")
    # The files holding GPU-marked tests (the others may import packages a GPU image lacks). -v
    # names each result as it comes, so a run cut short still says which test failed.
    tests = [PY, "-m", "pytest", "-v", "-rfE", "--tb=short", "--durations=8", "-m", "gpu", "-p", "no:cacheprovider",
             "-o", "timeout=0", "tests/kernels/test_decomposed_conv.py", "tests/kernels/test_decomposed_conv_bn.py",
             "tests/kernels/test_siglip.py"]
    if importlib.util.find_spec("xdist") is not None:
        tests[3:3] = ["-n", "6"]
    jobs = [Job("tests", tests)]
    if "conv" in benchmarks:
        for stage in (1, 2, 3, 4):
            for dtype in ("bfloat16", "float32"):
                jobs.append(Job(f"compile conv stage {stage} {dtype}",
                                [PY, "-m", "bench.ops.conv", "--compile-only", "--stages", str(stage), "--batches",
                                 "2", "--dtypes", dtype, "--out", scratch]))
    if "siglip" in benchmarks:
        for dim in (256, 768, 1152):
            jobs.append(Job(f"compile siglip d={dim}", [PY, "-m", "bench.ops.siglip", "--compile-only", "--batches",
                                                        "1024", "--dims", str(dim)]))
    if "tune" in benchmarks:
        for stage in (1, 3):
            for fmt in ("ncdhw", "cl"):
                jobs.append(Job(f"compile tune stage {stage} {fmt}", [PY, "-m", "bench.tune.conv", "--compile-only",
                                                                      "--stages", str(stage), "--formats", fmt]))
    if "tune_siglip" in benchmarks:
        for k in range(4):
            jobs.append(Job(f"compile tune_siglip {k}", [PY, "-m", "bench.tune.siglip", "--compile-only",
                                                         "--shard", f"{k}/4"]))
    if "models" in benchmarks:
        for dtype in ("bfloat16", "float32"):
            jobs.append(Job(f"compile models {dtype}",
                            [PY, "-m", "bench.run_all", "--gpu", "--compile-only", "--dtypes", dtype, "--models",
                             *(models or ["dcformer_small"]), "--no-progress", "--out", f"{scratch}/{dtype}"]))
    return jobs


def _timed_jobs(work: Path, benchmarks, models) -> list[tuple[Job, float]]:
    """(job, share of the time left when it starts); each job's own --budget-s is set at launch."""
    jobs = {
        "conv": (Job("bench conv", [PY, "-m", "bench.ops.conv", "--out", str(work)]), 0.6),
        "siglip": (Job("bench siglip", [PY, "-m", "bench.ops.siglip", "--out", str(work)]), 0.5),
        "models": (Job("bench models", [PY, "-m", "bench.run_all", "--gpu", "--no-progress", "--out", str(work)]
                       + (["--models", *models] if models else [])), 1.0),
        "tune": (Job("bench tune", [PY, "-m", "bench.tune.conv", "--out", str(work)]), 0.5),
        "tune_siglip": (Job("bench tune_siglip", [PY, "-m", "bench.tune.siglip", "--out", str(work)]), 0.5),
    }
    timed = [jobs[name] for name in BENCHMARKS if name in benchmarks]
    if timed:  # the last one gets all that is left
        timed[-1] = (timed[-1][0], 1.0)
    return timed


def _start(job: Job, work: Path) -> subprocess.Popen:
    """The job in its own process group (so a stop reaches its workers), output to ``<name>.log``."""
    with open(work / f"{job.name.replace(' ', '_').replace('=', '')}.log", "w") as log:
        return subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM the job's process group (the benchmarks write their report on it), then SIGKILL the
    group: workers it spawned (pytest-xdist, compile pools) must not keep the GPU busy afterwards."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        if sig == signal.SIGTERM:
            time.sleep(1)  # leave the group a moment to exit before the SIGKILL


def _wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    status = {}
    finished = []
    while procs and time.monotonic() < deadline:
        for name, proc in list(procs.items()):
            if proc.poll() is not None:
                finished.append(proc)
                status[name] = f"exit {proc.returncode}"
                print(f"  {name}: {status[name]} at {time.monotonic() - START:.0f} s", flush=True)
                del procs[name]
        time.sleep(0.5)
    for name, proc in procs.items():
        _stop(proc)
        status[name] = f"stopped at the deadline (exit {proc.returncode})"
        print(f"  {name}: {status[name]}", flush=True)
    for proc in finished:  # a job's leader has exited; anything it left in its group goes too
        _stop(proc, grace_s=0)
    return status


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary(work: Path, status: dict[str, str]) -> str:
    """The short table printed last: job outcomes, then the headline numbers of each CSV."""
    lines = ["## GPU session summary", ""]
    env = (work / "environment.txt").read_text().strip() if (work / "environment.txt").exists() else ""
    lines += [env, "", "| job | outcome |", "|---|---|"] + [f"| {k} | {v} |" for k, v in status.items()]
    tests_log = work / "tests.log"
    if tests_log.exists():
        log = [ln for ln in tests_log.read_text().splitlines() if ln.strip()]
        failed = [ln for ln in log if ln.startswith(("FAILED", "ERROR")) or " FAILED " in ln or " ERROR " in ln]
        lines += ["", f"tests: {log[-1] if log else '(no output)'}"] + [f"    {ln[:300]}" for ln in failed[:20]]
    host_log = work / "host_overhead.log"
    if host_log.exists():
        lines += ["", *(f"host: {ln}" for ln in host_log.read_text().splitlines() if " us per call " in ln)]
    conv = _rows(work / "conv_gpu.csv")
    if conv:
        lines += ["", "| conv input | dtype | fwd % copy (ncdhw / cl) | fwd+bwd ms fused (best) | best 3x Conv3d | "
                  "speed-up | speed-up, CUDA graphs |", "|---|---|---|---|---|---|---|"]
        cases = dict.fromkeys((r["input"], r["dtype"]) for r in conv if r["model"] == "decomposed_conv3d")
        graphed = "fused vs best of three_conv3d (CUDA graph)"

        def pick(inp, dt, variant, backend, metric):
            return next((r["value"] for r in conv if (r["input"], r["dtype"], r["variant"], r["backend"],
                                                        r["metric"]) == (inp, dt, variant, backend, metric)), "-")

        for inp, dt in cases:
            both = {v: pick(inp, dt, v, "forward+backward", "time") for v in
                    ("fused_ncdhw", "fused_cl", "three_conv3d_ncdhw", "three_conv3d_cl")}
            fused = [float(both[v]) for v in ("fused_ncdhw", "fused_cl") if _is_number(both[v])]
            unfused = [float(both[v]) for v in ("three_conv3d_ncdhw", "three_conv3d_cl") if _is_number(both[v])]
            lines.append(f"| {inp} | {dt} | {pick(inp, dt, 'fused_ncdhw', 'forward', '%copy')} / "
                         f"{pick(inp, dt, 'fused_cl', 'forward', '%copy')} | {min(fused) if fused else '-'} | "
                         f"{min(unfused) if unfused else '-'} | "
                         f"{pick(inp, dt, 'fused vs best of three_conv3d', 'forward+backward', 'speedup')} | "
                         f"{pick(inp, dt, graphed, 'forward+backward (CUDA graph)', 'speedup')} |")
        bn = [r for r in conv if r["model"] == "decomposed_conv3d_bn" and r["metric"] == "speedup"]
        lines += [f"BN training fused vs unfused, {r['input']}: {r['value']}x" for r in bn]
    siglip = _rows(work / "siglip.csv")
    if siglip:
        lines += ["", "| siglip input | variant | fwd ms | fwd % matmul | bwd ms | bwd % matmul | peak extra MiB |",
                  "|---|---|---|---|---|---|---|"]
        table: dict[tuple[str, str], dict[str, str]] = {}
        for r in siglip:
            table.setdefault((r["input"], r["variant"]), {})[r["metric"]] = r["value"]
        for (inp, variant), m in table.items():
            cells = [_short(m.get(k, "-")) for k in ("fwd_ms", "fwd_pct_matmul", "bwd_ms", "bwd_pct_matmul",
                                                     "peak_extra_mib")]
            lines.append(f"| {inp} | {variant} | " + " | ".join(cells) + " |")
    tune = [r for r in _rows(work / "tune_conv.csv") if _is_number(r["value"])]
    for inp in dict.fromkeys(r["input"] for r in tune):
        for mode in ("forward", "backward"):
            times = [r for r in tune if r["input"] == inp and r["backend"] == mode]
            if not times:
                continue
            best = min(times, key=lambda r: float(r["value"]))
            default = times[0]  # the first candidate is tile_config's choice
            lines.append(f"tune {inp} {mode}: best {best['variant']} {best['value']} ms "
                         f"(default {default['variant']} {default['value']} ms)")
    tune_siglip = [r for r in _rows(work / "tune_siglip.csv") if r["metric"] == "time" and _is_number(r["value"])]
    for inp, kernel in dict.fromkeys((r["input"], r["backend"]) for r in tune_siglip):
        times = [r for r in tune_siglip if (r["input"], r["backend"]) == (inp, kernel)]
        best, default = min(times, key=lambda r: float(r["value"])), times[0]  # the first is tile_config's
        lines.append(f"tune_siglip {inp} {kernel}: best {best['variant']} {best['value']} ms "
                     f"(default {default['variant']} {default['value']} ms)")
    models = _rows(work / "models_gpu.csv")
    speed = [r for r in models if r["metric"] in ("speedup", "memory_ratio")]
    lines += [f"model {r['model']} {r['dtype']} {r['variant']} {r['metric']}: {r['value']}" for r in speed]
    return "\n".join(lines)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _short(value: str) -> str:
    return f"{float(value):.4g}" if _is_number(value) else value


START = time.monotonic()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the results and logs")
    parser.add_argument("--archive", type=Path, help="pack --work into this .tar.gz at the end")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole session, compiles included")
    parser.add_argument("--compile-share", type=float, default=0.35,
                        help="share of the budget for the parallel compile phase")
    parser.add_argument("--benchmarks", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS),
                        help="which benchmarks to compile and time after the tests (default: all)")
    parser.add_argument("--models", nargs="+", help="the model suite's --models (default: its whole suite)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.update(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1",
                      PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    deadline = START + args.budget_s
    env = subprocess.run([PY, "-c", "import torch, triton; print(torch.cuda.get_device_name(), '| torch', "
                          "torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda)"],
                         capture_output=True, text=True)
    smi = "nvidia-smi: not found\n"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        smi = "nvidia-smi: " + out.stdout + out.stderr
    (args.work / "environment.txt").write_text(env.stdout + env.stderr + smi)
    print((args.work / "environment.txt").read_text(), flush=True)

    status: dict[str, str] = {}
    print(f"== compile phase (parallel), until {args.compile_share * args.budget_s:.0f} s", flush=True)
    procs = {job.name: _start(job, args.work) for job in _compile_jobs(args.work, args.benchmarks, args.models)}
    status.update(_wait_all(procs, START + args.compile_share * args.budget_s))

    print("== timed phase (one at a time)", flush=True)
    # First, seconds: host time per call of tiny fused-conv calls, stubbed and with real launches.
    status.update(_wait_all({"host overhead": _start(Job("host overhead", [PY, "-m", "bench.static.host_overhead"]),
                                                       args.work)}, time.monotonic() + 90))
    for job, share in _timed_jobs(args.work, args.benchmarks, args.models):
        left = deadline - time.monotonic()
        if left < 20:
            status[job.name] = "not started: budget spent"
            continue
        soft = share * left
        job.argv += ["--budget-s", f"{max(10.0, soft - 30):.0f}"]  # a started case may run ~30 s past it
        print(f"-- {job.name}: soft budget {soft:.0f} s", flush=True)
        status.update(_wait_all({job.name: _start(job, args.work)}, time.monotonic() + soft + 20))

    text = summary(args.work, status)
    (args.work / "summary.md").write_text(text + "\n")
    if args.archive:
        args.archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(args.work, arcname=args.work.name,
                    filter=lambda info: None if "compile_only" in info.name else info)
    print(text, flush=True)
    print(f"session done in {time.monotonic() - START:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
