"""bench.gpu_session's summary and compile-only mode: the parts of a GPU session that run without a GPU."""
from __future__ import annotations

import math

import torch

from bench import common
from bench.common import Row, time_fn, write_csv
from bench.gpu_session import summary
from bench.ops import conv as bench_conv
from bench.static import host_overhead
from bench.static.sass_siglip import Candidate
from bench.tune import siglip as tune_siglip


def _conv_rows(env):
    name = "2x8x4x4x4 k=3"
    rows = [Row("decomposed_conv3d", v, name, "float32", "forward+backward", "time", t, "ms", env=env)
            for v, t in (("fused_ncdhw", 0.5), ("fused_cl", 0.4), ("three_conv3d_ncdhw", 2.0),
                         ("three_conv3d_cl", 1.2))]
    rows += [Row("decomposed_conv3d", "fused_ncdhw", name, "float32", "forward", "%copy", 41.5, "%", env=env),
             Row("decomposed_conv3d", "fused vs best of three_conv3d", name, "float32", "forward+backward",
                 "speedup", 3.0, "x", env=env)]
    rows += bench_conv.graphed_rows({"fused_cl": lambda: None, "three_conv3d_ncdhw": lambda: None}, name, "float32",
                                    env)
    return rows


def test_summary_reports_failures_conv_and_tune(tmp_path, monkeypatch):
    env = {"device": "test", "torch": "", "triton": "", "cuda": "", "date": ""}
    # no CUDA graph here: "replay" the call itself, at 0.1 ms (fused) and 0.5 ms (three Conv3d)
    timings = iter([common.Timing(0.1, 0.1, 0.1), common.Timing(0.5, 0.5, 0.5)])
    monkeypatch.setattr(bench_conv, "cuda_graph_replay", lambda call: call)
    monkeypatch.setattr(bench_conv, "time_fn", lambda call, **kw: next(timings))
    write_csv(_conv_rows(env), tmp_path / "conv_gpu.csv")
    write_csv([Row("decomposed_conv3d", label, "2x8x4x4x4 k=3 cl", "bfloat16", "forward", "time", t, "ms", env=env)
               for label, t in (("default", 0.3), ("other", 0.2))], tmp_path / "tune_conv.csv")
    (tmp_path / "tests.log").write_text("[gw0] [ 50%] FAILED tests/test_x.py::test_y\n== 1 failed, 1 passed ==\n")
    (tmp_path / "host_overhead.log").write_text("compiling...\nforward: 12.0 us per call (H100, real launches)\n")
    text = summary(tmp_path, {"tests": "exit 1"})
    assert "| tests | exit 1 |" in text
    assert "FAILED tests/test_x.py::test_y" in text and "1 failed, 1 passed" in text
    conv_line = next(line for line in text.splitlines() if line.startswith("| 2x8x4x4x4 k=3 |"))
    # best fused 0.4 ms, best unfused 1.2 ms, the recorded speed-up, NCDHW forward % of copy
    # and the speed-up of the CUDA-graph replays (0.5 / 0.1)
    assert conv_line.rstrip(" |").split(" | ")[2:7] == ["41.5 / -", "0.4", "1.2", "3.0", "5.0"]
    assert "tune 2x8x4x4x4 k=3 cl forward: best other 0.2 ms (default default 0.3 ms)" in text
    assert "host: forward: 12.0 us per call (H100, real launches)" in text and "compiling" not in text


def test_compile_only_calls_once_and_restores():
    calls = []
    with common.compile_only():
        timing = time_fn(lambda: calls.append(1))
        assert common.peak_memory_bytes(lambda: calls.append(1)) is None
    assert calls == [1, 1] and math.isnan(timing.median_ms)
    time_fn(lambda: calls.append(1), warmup_ms=0, min_reps=2)
    assert len(calls) > 3  # timing again: the warm-up call plus the timed ones


def test_tune_siglip_sweep_runs_each_candidate_and_summary_names_the_best(tmp_path):
    """The sweep's loop on the interpreter (tiny B, two candidates, one with a register cap), then
    the session summary's line for it."""
    candidates = [Candidate(32, 32, 16, 1, 1), Candidate(32, 64, 16, 2, 1, 1, 128)]
    rows = tune_siglip.time_candidates([(48, 24)], None, ceiling=False, device="cpu", dtype=torch.float32,
                              candidates=candidates)
    times = [r for r in rows if r.metric == "time"]
    assert [(r.variant, r.backend) for r in times] == [(str(c), k) for c in candidates for k in ("forward", "stripe G")]
    assert all(r.value > 0 for r in times)
    write_csv(rows, tmp_path / "tune_siglip.csv")
    text = summary(tmp_path, {})
    assert text.count("tune_siglip B=48 d=24 ") == 2 and "(default 32x32x16 w1 s1 " in text


def test_conv_bench_steps_run_their_own_variant(tmp_path, monkeypatch):
    """Each variant's forward+backward callable (used for speed-ups and CUDA-graph replays after the
    variant loop) runs that variant, and computes every gradient a training step needs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(bench_conv, "CPU_SHAPES", [(4, 4, 5, 6, 3)])
    monkeypatch.setattr(bench_conv, "time_fn", lambda call, **kw: (call(), common.Timing(1.0, 1.0, 1.0))[1])
    steps = {}
    monkeypatch.setattr(bench_conv, "speedup_rows", lambda both, found, *args: steps.update(found) or [])
    bench_conv.run(tmp_path)
    assert set(steps) == {"cpu_path_ncdhw", "cpu_path_cl", "three_conv3d_ncdhw", "three_conv3d_cl"}
    for variant, step in steps.items():
        grads = step()
        assert len(grads) == (5 if variant.startswith("cpu_path") else 7), variant  # x, then every parameter
        assert grads[0].is_contiguous() != variant.endswith("_cl"), variant  # the variant's own input


def test_gpu_timing_window_holds_min_reps_of_a_slow_call(monkeypatch):
    """do_bench repeats max(1, rep / estimate) times: time_fn stretches rep for a slow call."""
    import time

    import triton.testing

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, quantiles: seen.update(rep=rep) or (1, 2, 3))
    assert time_fn(lambda: time.sleep(0.05), rep_ms=100, min_reps=3) == common.Timing(2, 1, 3)
    assert 150 <= seen["rep"] < 200  # three calls of ~50 ms
    time_fn(lambda: None, rep_ms=100)
    assert seen["rep"] == 100


def test_host_overhead_runs_on_a_cpu_without_the_interpreter(monkeypatch):
    """``python -m bench.static.host_overhead`` on a machine without a GPU or TRITON_INTERPRET: every
    case runs the Triton path's Python with the launches stubbed (the fused BN layer's too)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    times = host_overhead.measure(calls=2, repeats=1)
    assert set(times) == {"decomposed_conv3d forward+backward (all gradients)",
                          "DecomposedConv3d(norm='batch'), training, forward+backward",
                          "decomposed_conv3d forward (no grad)"}
    assert all(us > 0 for us in times.values())
