"""bench.ops.preprocess on tiny inputs: rows for every step, CSV first, Markdown from the CSV."""
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("monai")

from bench.ops import preprocess as bench_preprocess  # noqa: E402
from bench.common import environment, read_csv, write_csv  # noqa: E402


def test_bench_preprocess_writes_csv_then_markdown(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_preprocess, "PRESET_NAMES", ("m3d",))
    monkeypatch.setattr(bench_preprocess, "DEMO_SIZE", (16, 24, 24))
    env = environment(cuda=False)
    path = bench_preprocess.write_volume(tmp_path, (16, 24, 24))
    rows = bench_preprocess.measure_volume(path, (16, 24, 24), tmp_path / "cache", env)
    rows += bench_preprocess.measure_resampling(path, (16, 24, 24), env, target_spacing=(24.0, 24.0, 24.0))
    rows += bench_preprocess.measure_synth(2, tmp_path / "synthct", env)
    csv_path = write_csv(rows, tmp_path / "preprocess_cpu.csv")
    metrics = {(r["variant"], r["metric"]) for r in read_csv(csv_path)}
    assert {("load", "ms_per_volume"), ("m3d", "preprocess_ms"), ("m3d", "end_to_end_ms"),
            ("m3d", "end_to_end_volumes_per_s"), ("m3d", "cache_hit_ms")} <= metrics
    assert all(float(r["value"]) > 0 for r in read_csv(csv_path))
    md = bench_preprocess.write_markdown(csv_path, (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)).read_text()
    assert "| 16x24x24 int16 nii.gz |" in md and "SynthCT generation" in md and "load average" in md
    assert "| input | MONAI Spacing | MONAI Zoom |" in md
