"""The model benchmark suite: its counters against hand formulas and the papers, its report writer,
and the reliability of the reports (flags on figures a shared machine made impossible).

FlopCounterMode runs on fake tensors (no compute at any size). fvcore traces real tensors: small
models here, and the paper's 512x512x256 through the exactly-scaled smaller trace.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.common import CSV_FIELDS, ENV_FIELDS, read_csv
from bench.models import run, speedup_rows
from bench.models.counts import exact_scale, flop_counter_flops, fvcore_macs, fvcore_trace_macs
from bench.models.report import write_report
from bench.models.specs import PAPER_INPUT, PAPER_TABLE, PAPER_VIT, REFERENCE_FLOP_COUNTER, Encoder
from bench.plots import write_plots
from med3dvlm.models import create_model

pytest.importorskip("fvcore")

# A narrow DCFormer that still has every kind of layer; D, H, W not multiples of the reductions.
SMALL = dict(dims=(4, 8, 8, 16, 16), depths=(1, 1, 2, 1, 1), kernel_sizes=(5, 3, 7, 3))
SMALL_ENCODER = Encoder("dcformer_nano", tuple(SMALL.items()))
SMALL_INPUT = (1, 1, 64, 96, 80)
FUSED_OP = "dcformer_kernels.decomposed_conv3d"


def _ceil_half(sizes, times=1, factor=2):
    for _ in range(times):
        sizes = [-(-n // factor) for n in sizes]
    return sizes


def hand_counts(channels, blocks, kernel_sizes, dhw, mlp_ratio=4, stem_kernel=7, in_channels=1):
    """(multiply-adds of the eval forward, of which in the fused op, training-mode BN elements)."""
    c = channels
    sizes = _ceil_half(dhw, factor=4)  # stem: k=7, stride 4, padding 3 on the branch axis
    vox = math.prod(sizes)
    # Stem: 3 dense branches k x 1 x 1 (in -> c0), then 3 units of 3 dense branches 3 x 1 x 1 (c0 -> c0).
    macs = 3 * stem_kernel * in_channels * c[0] * vox + 3 * 3 * 3 * c[0] * c[0] * vox
    bn = 4 * 3 * c[0] * vox
    fused = 0
    for i in range(4):
        sizes = _ceil_half(sizes)  # MaxPool3d(3, 2, 1)
        vox = math.prod(sizes)
        macs += c[i] * c[i + 1] * vox  # 1x1x1 projection
        depthwise = 3 * kernel_sizes[i] * c[i + 1] * vox
        mlp = 2 * mlp_ratio * c[i + 1] ** 2 * vox
        macs += blocks[i + 1] * (depthwise + mlp)
        fused += blocks[i + 1] * depthwise
        bn += blocks[i + 1] * 3 * c[i + 1] * vox
    return macs, fused, bn


HAND_MACS, HAND_FUSED, HAND_BN = hand_counts(SMALL["dims"], SMALL["depths"], SMALL["kernel_sizes"],
                                             SMALL_INPUT[2:])


def test_flop_counter_matches_hand_formula_and_sees_the_fused_op():
    total, per_op = flop_counter_flops(SMALL_ENCODER, SMALL_INPUT)
    assert total == 2 * HAND_MACS  # 2 FLOPs per multiply-add
    assert per_op[FUSED_OP] == 2 * HAND_FUSED
    unfused_total, unfused_per_op = flop_counter_flops(SMALL_ENCODER, SMALL_INPUT, fused=False, backend="torch")
    assert unfused_total == total and FUSED_OP not in unfused_per_op


def test_fvcore_matches_hand_formula_and_sees_the_fused_op():
    # tests/conftest.py sets TRITON_INTERPRET=1: backend="auto" on CPU takes the fused op (interpreted).
    torch.manual_seed(0)
    model = SMALL_ENCODER.build().eval()
    total, by_op, unsupported = fvcore_trace_macs(model, torch.randn(SMALL_INPUT))
    assert total == HAND_MACS  # fvcore: 1 per multiply-add
    fused_keys = [k for k in by_op if "DecomposedConv3d" in k or "decomposed_conv3d" in k]
    assert fused_keys and sum(by_op[k] for k in fused_keys) == HAND_FUSED
    assert not [op for op in unsupported if "PythonOp" in op or "decomposed" in op]


def test_fvcore_training_graph_adds_batchnorm_at_five_per_element():
    macs, how = fvcore_macs(SMALL_ENCODER, SMALL_INPUT, train=True, backend="torch", scale_down=True)
    assert macs == HAND_MACS + 5 * HAND_BN
    assert how == "traced at input"  # 96/4/16 is not whole: no exact smaller trace


def test_exact_scaling_is_used_only_where_it_holds():
    assert exact_scale(Encoder("dcformer_nano"), PAPER_INPUT) == ((1, 1, 64, 128, 128), 64)
    vit = Encoder("vit3d_naive", PAPER_VIT)
    if vit.available():  # attention is quadratic in tokens: no smaller trace is exact
        assert exact_scale(vit, PAPER_INPUT) == (PAPER_INPUT, 1)


@pytest.mark.parametrize("key", list(REFERENCE_FLOP_COUNTER))
def test_reference_flop_counter_totals(key):
    name, shape = key
    total, per_op = flop_counter_flops(Encoder(name), shape)
    assert total == REFERENCE_FLOP_COUNTER[key]
    assert per_op[FUSED_OP] > 0


def _paper(label):
    return next(e for e in PAPER_TABLE if e.encoder.label == label)


@pytest.mark.parametrize("label, params, head_params", [
    ("dcformer_nano", 789_216, 256 * 512 + 512), ("dcformer_naive", 5_851_680, 0),
    ("dcformer_tiny", 14_657_472, 768 * 512 + 512)])
def test_paper_table_dcformer(label, params, head_params):
    """fvcore, training-mode official graph (BN per branch), + Linear(c4, 512) on the pooled map for nano/tiny."""
    entry = _paper(label)
    assert sum(p.numel() for p in create_model(label).parameters()) == params
    assert entry.projection_head == bool(head_params)
    assert round((params + head_params) / 1e6, len(entry.params_m.split(".")[1])) == float(entry.params_m)
    macs, how = fvcore_macs(entry.encoder, PAPER_INPUT, train=True, backend="torch", scale_down=True)
    assert "x64" in how
    channels = create_model(label).feature_info[-1]["num_chs"]
    gmacs = (macs + (channels * 512 if head_params else 0)) / 1e9
    if label == "dcformer_tiny":
        # 168.146: 168.15 at two decimals, printed 168.2 in the paper
        assert abs(gmacs - float(entry.gflops)) < 0.06
    else:
        assert round(gmacs, 2) == float(entry.gflops)


@pytest.mark.parametrize("label, params, gmacs", [("vit3d_naive", 11_091_472, 39.05),
                                                  ("vit3d_tiny", 26_340_384, 86.44)])
def test_paper_table_vit(label, params, gmacs):
    encoder = Encoder(label, PAPER_VIT)
    if not encoder.available():
        pytest.skip("vit3d not registered")
    assert sum(p.numel() for p in encoder.build().parameters()) == params  # paper: 11.10M, 26.34M
    macs, how = fvcore_macs(encoder, PAPER_INPUT, train=True, scale_down=True)
    assert how == "traced at input"
    assert round(macs / 1e9, 2) == gmacs  # paper: 39.05, 86.43
    assert abs(macs / 1e9 - float(_paper(encoder.label).gflops)) < 0.01


def test_report_writer_on_a_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the timed runs take the PyTorch path on CPU
    csv_path = run(tmp_path, gpu=False, models=["dcformer_nano"], progress=False, rep_ms=1,
                   input_shape=(2, 1, 64, 64, 64))
    with open(csv_path) as f:
        assert f.readline().strip().split(",") == CSV_FIELDS
    rows = read_csv(csv_path)
    metrics = {(r["variant"], r["metric"]) for r in rows}
    assert {("inference", "latency"), ("training", "throughput"), ("training", "peak_memory"), ("eval", "params"),
            ("eval", "flops_flopcountermode"), ("eval", "macs_fvcore"), ("paper count", "macs_fvcore+head")} <= metrics
    assert not [r for r in rows if r["metric"] in ("error", "skipped")]
    md = csv_path.with_suffix(".md").read_text()
    assert "dcformer_nano" in md and "34.205" in md and "64,217,022,464 (equal)" in md
    for suffix in ("_throughput.png", "_memory.png"):
        png = tmp_path / f"models_cpu{suffix}"
        assert png.exists() and png.stat().st_size > 1000

    # A fused/unfused pair (as a GPU run writes) gives speed-up rows, their table and plot.
    from bench.common import Row, write_csv

    timed = [Row(**{k: r[k] for k in ("model", "variant", "input", "dtype", "backend", "metric", "unit", "p20", "p80",
                                      "flag")},
                 value=float(r["value"]), env={k: r[k] for k in ENV_FIELDS})
             for r in rows if r["variant"] in ("inference", "training")]
    fused = [Row(**{**r.__dict__, "backend": "fused", "value": r.value / 2}) for r in timed]
    pair_rows = timed + fused
    pair_rows += speedup_rows(pair_rows)
    pair_csv = write_csv(pair_rows, tmp_path / "pair" / "models_gpu.csv")
    assert "2.00x" in write_report(pair_csv).read_text()
    assert (tmp_path / "pair" / "models_gpu_speedup.png") in write_plots(pair_csv)


def test_budget_skips_and_still_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    csv_path = run(tmp_path, gpu=False, models=["dcformer_nano"], progress=False, budget_s=0.0)
    rows = read_csv(csv_path)
    assert rows and all(r["metric"] == "skipped" for r in rows)
    assert "Not measured" in csv_path.with_suffix(".md").read_text()


def test_a_models_pattern_matching_nothing_is_an_error():
    from bench.models import select_encoders

    assert [e.name for e in select_encoders(["dcformer_nano"], gpu=False)] == ["dcformer_nano"]
    with pytest.raises(ValueError, match=r"--models \['dcformer_large'\] match no encoder of the suite"):
        select_encoders(["dcformer_nano", "dcformer_large"], gpu=False)


def test_cpu_measurements_stay_cpu_on_a_machine_with_a_gpu(monkeypatch):
    """A CPU run on a CUDA host: CPU name, perf_counter timing, the CPU allocator's peak."""
    from bench import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert common.environment()["device"] == "Some GPU"
    assert common.environment(cuda=False)["device"].startswith("CPU: ")
    assert common.time_fn(lambda: None, rep_ms=1, cuda=False).median_ms >= 0  # no CUDA call made
    mib, measure = common.peak_memory(lambda: torch.ones(1 << 18), cuda=False)
    assert measure == common.CPU_PEAK_MEASURE and mib == 1.0


# ---------------------------------------------------------------- reliability of the reports

def test_spread_and_ceiling_flags_on_constructed_timings():
    from bench.common import MAX_SPREAD, Timing, ceiling_flag, join_flags, spread_flag

    assert MAX_SPREAD == 1.5
    assert spread_flag(Timing(10.0, 9.0, 13.0)) == ""
    assert spread_flag(Timing(10.0, 5.0, 20.0)) == "unreliable: spread p80/p20 = 4.00 (above 1.5)"
    assert spread_flag(Timing(10.0, 5.0, 20.0), "fused") == "unreliable: fused spread p80/p20 = 4.00 (above 1.5)"
    assert ceiling_flag(99.0, 100.0) == ""
    assert ceiling_flag(603.0, 100.0) == ("unreliable: 603 GB/s is 603 % of the measured torch.clone ceiling "
                                          "(100 GB/s)")
    assert join_flags("", "") == ""
    assert join_flags("unreliable: a", "", "unreliable: b", "unreliable: a") == "unreliable: a; b"


def test_time_fn_takes_a_noisy_timing_again_and_keeps_the_steadiest(monkeypatch):
    from bench import common
    from bench.common import Timing

    taken = iter([Timing(10.0, 5.0, 20.0), Timing(11.0, 10.0, 12.0), Timing(1.0, 1.0, 1.0)])
    monkeypatch.setattr(common, "time_once", lambda *args: next(taken))
    assert common.time_fn(lambda: None) == Timing(11.0, 10.0, 12.0)  # steady on the second try: no third
    assert next(taken) == Timing(1.0, 1.0, 1.0)
    noisy = iter([Timing(10.0, 5.0, 20.0), Timing(10.0, 4.0, 20.0), Timing(10.0, 6.0, 20.0), None])
    monkeypatch.setattr(common, "time_once", lambda *args: next(noisy))
    assert common.time_fn(lambda: None) == Timing(10.0, 6.0, 20.0)  # three tries, the least spread
    assert common.spread_flag(Timing(10.0, 6.0, 20.0))  # still flagged in the report


def test_conv_bandwidth_rows_use_the_fastest_clone_and_flag_impossible_figures():
    from bench.ops.conv import bandwidth_rows
    from bench.common import Timing

    env = {k: "" for k in ENV_FIELDS}
    mib = 2**20
    # 1 MiB tensors: a clone (2 tensors) in 0.02 ms is 104.9 GB/s; one slowed by other processes, 0.2 ms
    clones = [Timing(0.2, 0.19, 0.21), Timing(0.02, 0.02, 0.021), Timing(0.05, 0.05, 0.05)]
    timed = [("steady", "forward", 2, Timing(0.1, 0.1, 0.11)),
             ("noisy", "forward", 2, Timing(0.1, 0.05, 0.3)),
             ("too_fast", "forward", 2, Timing(0.01, 0.01, 0.01))]
    rows = bandwidth_rows(timed, clones, mib, "1x1x64x64x64 k=3", "float32", env)
    clone = rows[0]
    assert (clone.variant, clone.metric, clone.value, clone.flag) == ("clone", "GB/s", 104.9, "")
    by = {(r.variant, r.metric): r for r in rows[1:]}
    assert by["steady", "%copy"].value == 20.0 and not any(by["steady", m].flag for m in ("time", "GB/s", "%copy"))
    assert by["noisy", "time"].flag == "unreliable: spread p80/p20 = 6.00 (above 1.5)"
    assert by["noisy", "%copy"].flag == by["noisy", "time"].flag
    assert by["too_fast", "%copy"].value == 200.0 and by["too_fast", "time"].flag == ""
    assert by["too_fast", "%copy"].flag == by["too_fast", "GB/s"].flag == (
        "unreliable: 209.7 GB/s is 200 % of the measured torch.clone ceiling (104.9 GB/s)")


def _timed_row(model, metric, value, variant, inp="2x1x64x64x64", backend="unfused"):
    from bench.common import Row

    return Row(model=model, variant=variant, input=inp, dtype="float32", backend=backend, metric=metric,
               value=value, unit="ms")


def _flops_row(model, flops):
    return _timed_row(model, "flops_flopcountermode", flops, "eval", inp="1x1x64x64x64", backend="fused")


def test_order_flags_catch_a_bigger_model_timed_faster_than_a_smaller_one():
    from bench.models import order_flags

    rows = [_flops_row("dcformer_nano", 0.25e9), _flops_row("dcformer_small", 1.33e9),
            _flops_row("dcformer_tiny", 1.28e9), _flops_row("vit3d_tiny", 0.42e9), _flops_row("convnext3d_tiny", 6.4e9),
            _timed_row("dcformer_nano", "latency", 20.0, "inference"),
            _timed_row("dcformer_small", "latency", 12.0, "inference"),   # 5.3x the FLOPs, 1.67x faster
            _timed_row("dcformer_tiny", "latency", 19.0, "inference"),    # 5.1x the FLOPs, within the 1.1 margin
            _timed_row("dcformer_nano", "step_time", 50.0, "training"),
            _timed_row("dcformer_small", "step_time", 150.0, "training"),  # slower: as it should be
            _timed_row("dcformer_small", "throughput", 13.3, "training"),
            _timed_row("vit3d_tiny", "latency", 5.0, "inference", backend="pytorch"),       # other families:
            _timed_row("convnext3d_tiny", "latency", 1.0, "inference", backend="pytorch")]  # never compared
    flags = order_flags(rows)
    assert sorted((r.model, r.metric) for r, _ in flags) == [("dcformer_nano", "latency"),
                                                             ("dcformer_small", "latency")]
    assert {f for _, f in flags} == {"unreliable: dcformer_small (5.3x the FLOPs of dcformer_nano) timed 1.67x "
                                     "faster than it"}
    assert not any(r.flag for r in rows)  # reported, not applied

    rows[9] = _timed_row("dcformer_small", "step_time", 30.0, "training")  # now the training step too
    flagged = {(r.model, r.metric) for r, _ in order_flags(rows)}
    assert {("dcformer_small", "step_time"), ("dcformer_small", "throughput"),
            ("dcformer_nano", "step_time")} <= flagged


def test_reports_mark_unreliable_figures_and_state_units_once(tmp_path):
    from bench.ops.conv import write_report as write_conv_report
    from bench.common import Row, markdown_pivot, write_csv
    from bench.models.report import write_report

    env = {k: "" for k in ENV_FIELDS}
    conv = [Row("decomposed_conv3d", v, "2x8x4x4x4 k=3", "float32", mode, "time", t, "ms", flag=flag, env=env)
            for v, mode, t, flag in (("cpu_path_ncdhw", "forward", 1.5, ""), ("cpu_path_ncdhw", "backward", 3.0, ""),
                                     ("three_conv3d_ncdhw", "forward", 0.2, "unreliable: spread p80/p20 = 3.00"))]
    write_conv_report(conv, tmp_path, gpu=False)
    md = (tmp_path / "conv_cpu.md").read_text()
    assert "| input | dtype | pass | cpu_path_ncdhw | three_conv3d_ncdhw |" in md  # `backend` holds the pass
    assert "Unit of every value: ms." in md and " ms |" not in md
    assert "| 2x8x4x4x4 k=3 | float32 | forward | 1.5 | 0.2 (unreliable) |" in md
    assert "- 2x8x4x4x4 k=3, float32, forward, three_conv3d_ncdhw: spread p80/p20 = 3.00" in md

    # several units: each column's header says its own
    mixed = [{"input": "B=8", "variant": "fused", "metric": m, "value": v, "unit": u, "flag": ""}
             for m, v, u in (("fwd_ms", "1.5", "ms"), ("peak", "3", "MiB"))]
    assert "| input | variant | fwd_ms (ms) | peak (MiB) |\n|---|---|---|---|\n| B=8 | fused | 1.5 | 3 |" in \
        markdown_pivot(mixed, ["input", "variant"], "metric", "t")

    models = [Row(model="dcformer_small", variant="inference", input="2x1x64x64x64", dtype="float32",
                  backend="unfused", metric="latency", value=12.0, unit="ms", p20=11.0, p80=13.0,
                  flag="unreliable: dcformer_small (5.3x the FLOPs of dcformer_nano) timed 1.67x faster than it",
                  env=env)]
    text = write_report(write_csv(models, tmp_path / "models_cpu.csv")).read_text()
    assert "12.00 (11.00–13.00) (unreliable)" in text
    assert "### Unreliable (marked above; not results)" in text
    assert "| dcformer_small | 2x1x64x64x64 | float32 | unfused | inference | latency | dcformer_small (5.3x" in text


def test_suite_times_flagged_tasks_again(tmp_path, monkeypatch):
    from bench.models import suite
    from bench.common import Row

    for counting in ("count_rows", "paper_rows", "reference_rows"):
        monkeypatch.setattr(suite, counting, lambda *args: [])
    calls = []

    def fake_job(job, input_shape, device, env, rep_ms):
        calls.append(job.encoder.name)
        flag = "unreliable: spread p80/p20 = 2.00 (above 1.5)" if calls.count(job.encoder.name) == 1 else ""
        return [Row(model=job.encoder.label, variant="inference", input="2x1x8x8x8", dtype="float32",
                    backend="unfused", metric="latency", value=float(len(calls)), unit="ms", flag=flag, env=env)]

    monkeypatch.setattr(suite, "run_job", fake_job)
    csv_path = suite.run(tmp_path, models=["dcformer_nano", "dcformer_naive"], progress=False)
    assert calls == ["dcformer_nano", "dcformer_naive"] * 2  # SUITE order, then the flagged ones again
    rows = read_csv(csv_path)
    assert [(r["model"], r["value"], r["flag"]) for r in rows] == [("dcformer_nano", "3.0", ""),
                                                                  ("dcformer_naive", "4.0", "")]


def test_a_bench_run_writes_to_an_ignored_folder_unless_told(monkeypatch, tmp_path):
    import subprocess

    from bench import models, run_all
    from bench.ops import conv
    from bench.common import DEFAULT_OUT

    seen = {}
    monkeypatch.setattr(conv, "run", lambda out, **kw: seen.setdefault("conv", out))
    monkeypatch.setattr(models, "run", lambda out, **kw: seen.setdefault("models", out) / "models_cpu.csv")
    run_all.main(["--no-progress"])
    assert seen == {"conv": DEFAULT_OUT, "models": DEFAULT_OUT} and DEFAULT_OUT == Path("bench/results/local")
    seen.clear()
    run_all.main(["--no-progress", "--out", str(tmp_path)])
    assert seen == {"conv": tmp_path, "models": tmp_path}

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    probe = ["git", "check-ignore", "-q", "--no-index"]
    assert subprocess.run(probe + [str(DEFAULT_OUT / "models_cpu.csv")], cwd=root).returncode == 0  # ignored
    assert subprocess.run(probe + ["bench/results/models_cpu.csv"], cwd=root).returncode == 1  # committed


def test_throughput_plot_labels_do_not_overlap_and_its_legend_shows_what_is_drawn(tmp_path, monkeypatch):
    from bench import plots

    committed = Path(__file__).resolve().parents[2] / "bench/results/models_cpu.csv"
    if not committed.exists():
        pytest.skip("no committed CPU results")
    rows = read_csv(committed)  # 12 encoders, several within a few pixels of each other
    boxes = []

    def placed(ax, points, **kw):
        labels = real_place_labels(ax, points, **kw)
        renderer = ax.figure.canvas.get_renderer()
        boxes.extend(label.get_window_extent(renderer) for label in labels)
        return labels

    real_place_labels = plots.place_labels
    monkeypatch.setattr(plots, "place_labels", placed)
    plots.plot_throughput(rows, tmp_path / "throughput.png")
    assert len(boxes) == len(plots.training_rows(rows, "throughput")) == 12
    overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlapping

    labels = [label for label, _, _ in plots.legend_entries(plots.training_rows(rows, "throughput"))]
    assert labels == ["dcformer", "vit3d", "convnext3d", "poolformer3d", "unfused", "pytorch"]  # no "fused" on CPU
    flagged = [{**rows[0], "flag": "unreliable: x"}]
    assert plots.legend_entries(flagged)[-1][0] == "unreliable (hollow; see the .md)"
