"""The model benchmark suite: its counters against hand formulas and the papers, and its report writer.

FlopCounterMode runs on fake tensors (no compute at any size). fvcore traces real tensors: small
models here, and the paper's 512x512x256 through the exactly-scaled smaller trace.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.common import CSV_FIELDS, read_csv
from bench.models import run, speedup_rows
from bench.models.counts import _exact_scale, flop_counter_flops, fvcore_macs, fvcore_trace_macs
from bench.models.report import write_report
from bench.models.specs import PAPER_INPUT, PAPER_TABLE, PAPER_VIT, REFERENCE_FLOP_COUNTER, Encoder
from bench.plots import write_plots
from med3dvlm.models import create_model

pytest.importorskip("fvcore")

# A narrow DCFormer that still has every kind of layer; D, H, W not multiples of the reductions.
SMALL = dict(channels=(4, 8, 8, 16, 16), blocks=(1, 1, 2, 1, 1), kernel_sizes=(5, 3, 7, 3))
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


HAND_MACS, HAND_FUSED, HAND_BN = hand_counts(SMALL["channels"], SMALL["blocks"], SMALL["kernel_sizes"],
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
    assert _exact_scale(Encoder("dcformer_nano"), PAPER_INPUT) == ((1, 1, 64, 128, 128), 64)
    vit = Encoder("vit3d_naive", PAPER_VIT)
    if vit.available():  # attention is quadratic in tokens: no smaller trace is exact
        assert _exact_scale(vit, PAPER_INPUT) == (PAPER_INPUT, 1)


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

    timed = [Row(**{k: r[k] for k in ("model", "variant", "input", "dtype", "backend", "metric", "unit", "p20", "p80")},
                 value=float(r["value"]), env={k: r[k] for k in CSV_FIELDS[10:]})
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
