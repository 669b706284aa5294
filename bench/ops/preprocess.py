"""Preprocessing throughput on CPU: volumes/s per preset, a CT-sized scan included, and SynthCT's
generation rate.

    python -m bench.ops.preprocess [--out bench/results/local/preprocess_cpu.csv] [--synth-n 500]

Inputs: SynthCT volumes written as int16 ``.nii.gz`` (gzip level 1, as the generator writes them):
a CT-sized 300x512x512 (D x H, W: 0.85 x 0.75 x 0.75 mm) and the demo size 64x128x128. Per input:
``load`` (read + decompress + canonical orientation), then per preset the preprocessing of the
loaded volume (``preprocess``) and of the file (``end_to_end``), and a read of the preset's
output from ``PreprocessedCache`` (``cache_hit``, memory-mapped); for the CT-sized scan also the
two MONAI resamplers ``ct_hu`` chooses between (Spacing, Zoom). Medians of 3 calls after one
warm-up (bench.common.time_fn). Then ``python -m med3dvlm.data.synth``'s work for ``--synth-n``
cases at 64x128x128 over the usable cores, timed once (it is the thing to time).

Writes the CSV (long format, bench/common.py) first, then a Markdown file made from it beside
it (same name, ``.md``). The machine is shared: the load average at the start and the end of the
run goes into the Markdown, since other processes slow every number here.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from ..common import DEFAULT_OUT, Row, environment, markdown_pivot, markdown_table, read_csv, time_fn, write_csv

CT_SIZE = (300, 512, 512)
DEMO_SIZE = (64, 128, 128)
PRESET_NAMES = ("med3dvlm", "m3d", "ct_hu")


def _figures(value: float) -> float:
    return float(f"{value:.3g}")  # three significant figures: 0.8 ms and 4,420 ms alike


def _input_name(size) -> str:
    return "x".join(map(str, size)) + " int16 nii.gz"


def write_volume(folder: Path, size) -> Path:
    """A SynthCT phantom of ``size`` saved as an int16 NIfTI in ``folder`` (the benchmark's input)."""
    import nibabel as nib

    from med3dvlm.data.synth import make_phantom

    phantom = make_phantom(0, seed=0, size=size)
    path = folder / f"synthct_{'x'.join(map(str, size))}.nii.gz"
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(phantom.hu, phantom.affine)), str(path))
    return path


def measure_volume(path: Path, size, cache_root: Path, env: dict) -> list[Row]:
    from med3dvlm.data import PreprocessedCache, VolumePreprocessor, load_volume

    name = _input_name(size)
    rows = []

    def add(variant, metric, seconds, unit="ms", p20="", p80=""):
        rows.append(Row("preprocess", variant, name, "float32", "monai+nibabel", metric, seconds, unit, p20, p80,
                        env=env))

    def timed(variant, metric, fn):
        t = time_fn(fn, warmup_ms=0, rep_ms=0, min_reps=3, cuda=False)
        add(variant, metric, _figures(t.median_ms), "ms", _figures(t.p20_ms), _figures(t.p80_ms))
        return t.median_ms

    timed("load", "ms_per_volume", lambda: load_volume(path))
    volume = load_volume(path)
    for preset in PRESET_NAMES:
        pre = VolumePreprocessor.from_preset(preset)
        timed(preset, "preprocess_ms", lambda: pre(volume))
        end_to_end = timed(preset, "end_to_end_ms", lambda: pre(path))
        add(preset, "end_to_end_volumes_per_s", _figures(1e3 / end_to_end), "volumes/s")
        cache = PreprocessedCache(pre, cache_root)
        cache(path)  # the miss that fills the entry
        timed(preset, "cache_hit_ms", lambda: cache(path).sum())  # .sum(): read every page of the map
        print(f"  {name} {preset}: {end_to_end / 1e3:.2f} s per volume end to end", flush=True)
    return rows


def measure_resampling(path: Path, size, env: dict, target_spacing=None) -> list[Row]:
    """The two MONAI transforms ``ct_hu`` can resample with, to its 1.5 x 0.75 x 0.75 mm (or
    ``target_spacing``): Spacing (grid_sample: any affine) and Zoom (interpolate: what it uses when
    the voxel axes are the world axes, as here)."""
    import monai.transforms as mt
    import numpy as np
    from monai.data import MetaTensor

    from med3dvlm.data import PRESETS, load_volume

    volume = load_volume(path)
    target = target_spacing or PRESETS["ct_hu"].target_spacing
    image = torch.from_numpy(volume.array)[None]
    spacing = mt.Spacing(pixdim=target, mode="bilinear", padding_mode="border", dtype=np.float32)
    zoom = mt.Zoom([s / t for s, t in zip(volume.spacing, target)], mode="trilinear", keep_size=False)
    variants = {"MONAI Spacing": lambda: spacing(MetaTensor(image, affine=torch.as_tensor(volume.affine))),
                "MONAI Zoom": lambda: zoom(image)}
    rows = []
    for variant, fn in variants.items():
        t = time_fn(fn, warmup_ms=0, rep_ms=0, min_reps=3, cuda=False)
        rows.append(Row("resample", variant, _input_name(size), "float32", "monai", "to_ct_hu_spacing_ms",
                        _figures(t.median_ms), "ms", _figures(t.p20_ms), _figures(t.p80_ms), env=env))
    return rows


def measure_synth(n: int, folder: Path, env: dict) -> list[Row]:
    from med3dvlm.data.synth import generate

    summary = generate(folder, n=n, size=DEMO_SIZE, seed=0)
    workers = summary["workers"]
    name = f"{n} cases at {'x'.join(map(str, DEMO_SIZE))}"
    print(f"  SynthCT: {name} in {summary['seconds']:.1f} s on {workers} processes", flush=True)
    return [Row("synthct", f"{workers} processes", name, "int16", "numpy+torch", "seconds",
                _figures(summary["seconds"]), "s", env=env),
            Row("synthct", f"{workers} processes", name, "int16", "numpy+torch", "cases_per_s",
                _figures(n / summary["seconds"]), "cases/s", env=env),
            Row("synthct", f"{workers} processes", name, "int16", "numpy+torch", "MiB_on_disk",
                _figures(summary["bytes"] / 2**20), "MiB", env=env)]


def write_markdown(csv_path: Path, load_before: tuple, load_after: tuple) -> Path:
    rows = read_csv(csv_path)
    pre = [r for r in rows if r["model"] == "preprocess"]
    parts = ["## Preprocessing throughput (CPU)", "",
             f"`python -m bench.ops.preprocess`; load average (1, 5, 15 min) at start {load_before}, at end "
             f"{load_after}: the machine is shared, other processes slow every number.", ""]
    parts.append(markdown_pivot([r for r in pre if r["unit"] == "volumes/s"], ["input"], "variant",
                                "End to end (read the .nii.gz, orient, preprocess), per preset"))
    parts.append(markdown_pivot([r for r in pre if r["unit"] == "ms"], ["input", "variant"], "metric",
                                "Steps, median of 3 (load: read + orient; preprocess: from the loaded volume; "
                                "cache_hit: a PreprocessedCache read)"))
    resample = [r for r in rows if r["model"] == "resample"]
    if resample:
        parts.append(markdown_pivot(resample, ["input"], "variant",
                                    "Resampling to ct_hu's 1.5 x 0.75 x 0.75 mm, median of 3 (the preset uses Zoom "
                                    "for scans that are not oblique)"))
    synth = [r for r in rows if r["model"] == "synthct"]
    if synth:
        parts.append(markdown_table("SynthCT generation (python -m med3dvlm.data.synth)",
                                    ["cases", "processes", "metric", "value", "unit"],
                                    [[r["input"], r["variant"], r["metric"], r["value"], r["unit"]] for r in synth],
                                    synth[0]))
    md = csv_path.with_suffix(".md")
    md.write_text("\n".join(parts) + "\n")
    return md


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "preprocess_cpu.csv",
                        help="CSV path (default %(default)s); the Markdown goes beside it. "
                             "`--out bench/results/preprocess_cpu.csv` refreshes the committed results")
    parser.add_argument("--synth-n", type=int, default=500, help="SynthCT cases to time (0: skip)")
    parser.add_argument("--skip-ct", action="store_true", help="leave out the 300x512x512 volume")
    args = parser.parse_args(argv)
    load_before = tuple(round(v, 1) for v in os.getloadavg())
    env = environment(cuda=False)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = (DEMO_SIZE,) if args.skip_ct else (DEMO_SIZE, CT_SIZE)
        for size in sizes:
            start = time.perf_counter()
            path = write_volume(tmp, size)
            print(f"== {_input_name(size)} (written in {time.perf_counter() - start:.1f} s)", flush=True)
            rows += measure_volume(path, size, tmp / "cache", env)
            if size == CT_SIZE:
                rows += measure_resampling(path, size, env)
        if args.synth_n:
            print(f"== SynthCT, {args.synth_n} cases", flush=True)
            rows += measure_synth(args.synth_n, tmp / "synthct", env)
    write_csv(rows, args.out)
    md = write_markdown(args.out, load_before, tuple(round(v, 1) for v in os.getloadavg()))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
