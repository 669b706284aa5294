"""Write a SynthCT data set to disk in the published formats, so the real readers read it.

    python -m med3dvlm.data.synth --out DIR --n 500 --size 64 128 128 --seed 0

DIR/
    volumes/synthct_00000.nii.gz       int16 HU, gzip; a real affine (1 voxel = FOV / size mm),
                                       stored RAS+ as most NIfTI converters write it (the loader
                                       turns it into the canonical D, H, W)
    m3d_cap.json                       M3D-Cap: {"train"|"validation"|"test": [{"image", "text"}]}
    m3d_vqa_{split}.csv                M3D-VQA: Image Path, Text, Question Type, Question,
                                       Choice A..D, Answer, Answer Choice (--no-vqa-text drops Text)
    ctrate_reports_{split}.csv         CT-RATE: VolumeName, Technique_EN, Findings_EN, Impressions_EN
    ctrate_labels_{split}.csv          CT-RATE multi-abnormality labels: VolumeName + one 0/1 column
                                       per ``LABELS`` entry
    cases.json                         ground truth per case (phase, plane, findings with their
                                       voxel positions and HU) and the generator settings

Splits: a seeded permutation of the n cases, 80/10/10 (validation and test at least one case
each from n = 3); every case is in exactly one split. A case's volume and texts depend only on
(seed, index, size), not on n or the number of worker processes.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from .phantom import FOV_MM, LABELS, make_phantom
from .text import write_questions, write_report

__all__ = ["generate", "main", "split_of", "SPLITS"]

SPLITS = ("train", "validation", "test")
VQA_COLUMNS = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
               "Choice D", "Answer", "Answer Choice"]
FORMAT_VERSION = 1


def split_of(n: int, seed: int) -> list[str]:
    """The split of each of ``n`` cases: a seeded permutation cut 80/10/10."""
    held_out = max(1, round(0.1 * n)) if n >= 3 else 0
    order = np.random.default_rng([seed, 0x5EED]).permutation(n)
    splits = ["train"] * n
    for rank, index in enumerate(order):
        if rank < held_out:
            splits[index] = "validation"
        elif rank < 2 * held_out:
            splits[index] = "test"
    return splits


def _volume_name(index: int) -> str:
    return f"synthct_{index:05d}.nii.gz"


def _make_case(args: tuple[int, int, tuple[int, int, int], str]) -> dict:
    """Draw case ``index``, write its volume, return its texts and ground truth (in a worker)."""
    import nibabel as nib

    index, seed, size, out = args
    phantom = make_phantom(index, seed, size)
    image = nib.Nifti1Image(phantom.hu, phantom.affine)
    image = nib.as_closest_canonical(image)  # RAS+ on disk, as dcm2niix-style converters write
    image.header.set_data_dtype(np.int16)
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)  # scanner coordinates
    image.set_sform(image.affine, code=1)
    nib.save(image, str(Path(out) / "volumes" / _volume_name(index)))

    text_rng = np.random.default_rng([seed, index, 1])  # texts drawn apart from the image
    technique, findings, impression = write_report(phantom, text_rng)
    return {
        "index": index,
        "volume": f"volumes/{_volume_name(index)}",
        "phase": phantom.phase,
        "plane": phantom.plane,
        "spacing_mm": list(phantom.spacing),
        "labels": phantom.labels,
        "findings": [dataclasses.asdict(f) for f in phantom.findings],
        "organ_hu": phantom.organ_hu,
        "technique": technique,
        "report_findings": findings,
        "impression": impression,
        "questions": write_questions(phantom, text_rng),
    }


def generate(out: str | os.PathLike, n: int, size: Sequence[int] = (64, 128, 128), seed: int = 0,
             workers: int | None = None, vqa_text: bool = True) -> dict:
    """Write ``n`` SynthCT cases into ``out`` (layout in the module docstring); returns a summary
    (``n``, ``seconds``, ``bytes``, ``workers``, cases per ``splits``)."""
    size = tuple(int(s) for s in size)
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    out = Path(out)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    workers = workers or _usable_cores()
    start = time.perf_counter()
    jobs = [(i, seed, size, str(out)) for i in range(n)]
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded) as pool:
            cases = list(pool.map(_make_case, jobs, chunksize=max(1, n // (8 * workers))))
    else:
        cases = [_make_case(job) for job in jobs]
    for case, split in zip(cases, split_of(n, seed)):
        case["split"] = split
    _write_tables(out, cases, vqa_text)
    meta = {"generator": "SynthCT", "format_version": FORMAT_VERSION, "seed": seed, "n": n, "size": size,
            "fov_mm": FOV_MM, "labels": LABELS, "cases": cases}
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    seconds = time.perf_counter() - start
    nbytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"n": n, "seconds": seconds, "bytes": nbytes, "workers": workers,
            "splits": {s: sum(c["split"] == s for c in cases) for s in SPLITS}}


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _single_threaded() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core; torch's own threads would oversubscribe


def _report(case: dict) -> str:
    return " ".join((case["technique"], case["report_findings"], "Impression: " + case["impression"]))


def _write_tables(out: Path, cases: list[dict], vqa_text: bool) -> None:
    by_split = {s: [c for c in cases if c["split"] == s] for s in SPLITS}
    cap = {s: [{"image": c["volume"], "text": _report(c)} for c in rows] for s, rows in by_split.items()}
    (out / "m3d_cap.json").write_text(json.dumps(cap, indent=1) + "\n")
    columns = VQA_COLUMNS if vqa_text else [c for c in VQA_COLUMNS if c != "Text"]
    for split, rows in by_split.items():
        with open(out / f"m3d_vqa_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for c in rows:
                for q in c["questions"]:
                    writer.writerow({"Image Path": c["volume"], "Text": _report(c),
                                     "Question Type": q["question_type"], "Question": q["question"],
                                     **{f"Choice {l}": v for l, v in zip("ABCD", q["choices"])},
                                     "Answer": q["answer"], "Answer Choice": q["answer_choice"]})
        with open(out / f"ctrate_reports_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["VolumeName", "Technique_EN", "Findings_EN", "Impressions_EN"])
            for c in rows:
                writer.writerow([Path(c["volume"]).name, c["technique"], c["report_findings"], c["impression"]])
        with open(out / f"ctrate_labels_{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["VolumeName", *LABELS])
            for c in rows:
                writer.writerow([Path(c["volume"]).name, *(c["labels"][label] for label in LABELS)])


def main(argv: Sequence[str] | None = None, prog: str = "python -m med3dvlm.data.synth") -> int:
    """The SynthCT command; ``prog`` is the name its usage line shows."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Write the SynthCT data set (CT-like volumes with reports, "
                                                 "VQA and labels) in the M3D-Cap / M3D-VQA / CT-RATE formats.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=500, help="number of cases (default 500)")
    parser.add_argument("--size", type=int, nargs=3, default=(64, 128, 128), metavar=("D", "H", "W"),
                        help="voxels per volume (default 64 128 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: the usable cores)")
    parser.add_argument("--no-vqa-text", action="store_true", help="leave the Text column out of the VQA CSVs")
    args = parser.parse_args(argv)
    summary = generate(args.out, args.n, args.size, args.seed, args.workers, vqa_text=not args.no_vqa_text)
    print(f"SynthCT: {summary['n']} cases at {'x'.join(map(str, args.size))} in {summary['seconds']:.1f} s "
          f"({summary['bytes'] / 2**20:.1f} MiB) -> {args.out}; splits {summary['splits']}")
    return 0
