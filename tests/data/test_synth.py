"""SynthCT: written in the published formats and read back by the real readers; deterministic;
splits disjoint; and its texts say what its voxels contain."""
import csv
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("monai")

from med3dvlm.data import (CTRATEDataset, M3DCapDataset, M3DVQADataset, VolumePreprocessor,  # noqa: E402
                           load_volume)
from med3dvlm.data.synth import LABELS, SPLITS, generate, main, make_phantom, split_of  # noqa: E402
from med3dvlm.data.synth import write_questions, write_report  # noqa: E402
from med3dvlm.data.synth.phantom import PLANE_AXIS  # noqa: E402
from med3dvlm.data.synth.text import QUESTION_TYPES  # noqa: E402

SEED = 0
SIZE = (48, 96, 96)  # 5.3 x 4 x 4 mm voxels; seed 0's first 12 cases hold every finding kind
TINY = VolumePreprocessor.from_preset("ct_hu", target_spacing=None, size_mode="resize", spatial_size=(8, 16, 16))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthct")
    summary = generate(out, n=12, size=SIZE, seed=SEED, workers=1)
    assert summary["n"] == 12 and summary["splits"] == {"train": 10, "validation": 1, "test": 1}
    return out, json.loads((out / "cases.json").read_text())


def test_files_in_the_published_formats(dataset):
    out, meta = dataset
    assert meta["labels"] == list(LABELS) and len(meta["cases"]) == 12
    case = meta["cases"][0]
    volume = load_volume(out / case["volume"])
    assert volume.shape == SIZE and volume.spacing == pytest.approx((256 / 48, 4.0, 4.0))
    import nibabel as nib

    stored = nib.load(str(out / case["volume"]))
    assert stored.get_data_dtype() == np.int16 and nib.aff2axcodes(stored.affine) == ("R", "A", "S")
    assert (out / case["volume"]).stat().st_size < 0.6 * np.prod(SIZE) * 2  # compressed int16
    with open(out / "m3d_vqa_train.csv", newline="") as f:
        assert next(csv.reader(f)) == ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B",
                                       "Choice C", "Choice D", "Answer", "Answer Choice"]


def test_real_readers_read_it(dataset):
    out, meta = dataset
    cap = M3DCapDataset(out / "m3d_cap.json", "train", preprocessor=TINY)
    item = cap[0]
    assert item["pixel_values"].shape == (1, 8, 16, 16) and item["text"].startswith(
        tuple(w.capitalize() for w in ("axial", "transverse", "coronal", "sagittal")))
    vqa = M3DVQADataset(out / "m3d_vqa_train.csv", mode="closed", preprocessor=TINY)
    assert len(vqa) >= 3 * 10  # plane, phase and abnormality for each training case at least
    for i in range(len(vqa)):
        row, _ = vqa.records[i]
        choices = [row[f"Choice {c}"] for c in "ABCD"]
        assert choices["ABCD".index(row["Answer Choice"])] == row["Answer"] and len(set(choices)) == 4
    assert {row["Question Type"] for row, _ in vqa.records} == {"1", "2", "3", "4", "5"}
    ct = CTRATEDataset(out / "ctrate_reports_train.csv", out / "ctrate_labels_train.csv",
                       data_root=out / "volumes", preprocessor=TINY)
    assert ct.label_names == list(LABELS)
    by_name = {c["volume"].split("/")[-1]: c for c in meta["cases"]}
    for i in range(len(ct)):
        row, labels = ct.records[i]
        assert labels == [float(by_name[row["VolumeName"]]["labels"][k]) for k in LABELS]
    assert ct[0]["labels"].shape == (len(LABELS),)


def test_splits_are_disjoint_and_cover_every_case(dataset):
    out, meta = dataset
    cap = json.loads((out / "m3d_cap.json").read_text())
    images = {s: {it["image"] for it in cap[s]} for s in SPLITS}
    assert sum(len(v) for v in images.values()) == 12 and len(set().union(*images.values())) == 12
    for split in SPLITS:
        with open(out / f"ctrate_reports_{split}.csv", newline="") as f:
            names = {r["VolumeName"] for r in csv.DictReader(f)}
        assert names == {p.split("/")[-1] for p in images[split]}
        with open(out / f"m3d_vqa_{split}.csv", newline="") as f:
            assert {r["Image Path"] for r in csv.DictReader(f)} <= images[split]
    for n in (1, 2, 3, 10, 101):
        splits = split_of(n, seed=5)
        assert len(splits) == n and set(splits) <= set(SPLITS)
        if n >= 3:
            assert splits.count("validation") == splits.count("test") == max(1, round(0.1 * n))


def test_deterministic_from_the_seed_and_independent_of_workers(tmp_path):
    a, b, c = (tmp_path / x for x in "abc")
    generate(a, n=4, size=(16, 24, 24), seed=7, workers=1)
    generate(b, n=4, size=(16, 24, 24), seed=7, workers=2)
    generate(c, n=4, size=(16, 24, 24), seed=8, workers=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "m3d_cap.json").read_text() != (c / "m3d_cap.json").read_text()
    # a case depends on (seed, index, size) only, not on how many cases were drawn
    np.testing.assert_array_equal(load_volume(a / "volumes/synthct_00002.nii.gz").array,
                                  make_phantom(2, 7, (16, 24, 24)).hu)


def _mentions(report: str, finding: dict) -> bool:
    text = report.lower()
    kind, side, location = finding["kind"], finding["side"], (finding["location"] or "").lower()
    if finding["size_cm"] is not None:
        size = finding["size_cm"]
        if f"{size:.1f} cm" not in text and f"{round(size * 10)} mm" not in text:
            return False
    return {
        "Lung nodule": lambda: location in text and "nodule" in text,
        "Liver lesion": lambda: location in text,
        "Kidney lesion": lambda: location in text,
        "Pleural effusion": lambda: "pleural" in text and (side in text or "both sides" in text),
        "Ascites": lambda: "ascites" in text or "free fluid is present" in text,
        "Kidney stone": lambda: side in text and re.search(r"calculus|stone|nephrolithiasis", text) is not None,
        "Aortic calcification": lambda: location in text,
        "Cardiomegaly": lambda: re.search(r"(?<!not )enlarged|cardiomegaly", text) is not None,
    }[kind]()


def test_reports_name_the_findings(dataset):
    out, meta = dataset
    assert {f["kind"] for c in meta["cases"] for f in c["findings"]} == set(LABELS)
    cap = json.loads((out / "m3d_cap.json").read_text())
    reports = {it["image"]: it["text"] for s in SPLITS for it in cap[s]}
    for case in meta["cases"]:
        report = reports[case["volume"]]
        phase_words = {"non-contrast": r"non-contrast|unenhanced|without intravenous contrast",
                       "arterial": "arterial", "portal venous": "venous"}[case["phase"]]
        assert re.search(phase_words, report.split(".")[0].lower()), (case["phase"], report)
        for finding in case["findings"]:
            assert _mentions(report, finding), (finding, report)
        impression = report.split("Impression: ")[1]
        if case["findings"]:
            assert impression.count(";") == len(case["findings"]) - 1
        assert sum(case["labels"].values()) == len(case["findings"])


def test_no_question_gives_its_answer_away():
    """An image-blind reader of the questions must not beat guessing by much: no question text fixes
    its answer, and an organ question always offers another organ where that finding's look occurs."""
    answers, offered = defaultdict(Counter), defaultdict(set)
    organ_questions = []
    for index in range(300):
        phantom = make_phantom(SEED, index, (16, 16, 16))
        write_report(phantom, rng := np.random.default_rng([SEED, index, 1]))  # the writer's draw order
        for q in write_questions(phantom, rng):
            answers[q["question"]][q["answer"]] += 1
            if q["question_type"] == QUESTION_TYPES["organ"]:
                organ_questions.append(q)
    for text, counts in answers.items():
        n = sum(counts.values())
        if n >= 20:
            answer, most = counts.most_common(1)[0]
            assert most / n < 0.7, (text, counts)  # the plane question's 60 % axial is the largest prior
    for q in organ_questions:
        offered[q["question"]].add(q["answer"])
    assert len(offered) >= 3 and all(len(a) >= 2 for a in offered.values()), offered
    for q in organ_questions:  # at least two choices are places where this look is ever the answer
        assert len(set(q["choices"]) & offered[q["question"]]) >= 2, q


def test_findings_are_in_the_voxels(dataset):
    """Each finding's HU at its stated position, read back through the loader: lesion density against
    its organ, nodules and effusions against lung, calcium, and the stated side (W runs from the
    patient's right to the left)."""
    out, meta = dataset
    checked = set()
    for case in meta["cases"]:
        hu = load_volume(out / case["volume"]).array
        organ = case["organ_hu"]
        for f in case["findings"]:
            value = float(hu[tuple(f["center_voxel"])])
            kind, density = f["kind"], f["density"]
            if kind in ("Liver lesion", "Kidney lesion"):
                base = organ["liver" if kind == "Liver lesion" else "kidney"]
                ok = {"hypodense": value < base - 15, "hyperdense": value > base + 20,
                      "fat-containing": value < base - 50}[density]
            elif kind == "Lung nodule":
                ok = value > -850 + 100
            elif kind == "Pleural effusion":
                ok = -150 < value < 150  # fluid where the lung (-850) would be
            elif kind in ("Kidney stone", "Aortic calcification"):
                ok = value > 300
            else:
                continue
            assert ok, (case["index"], f, value)
            if f["side"] in ("left", "right") and kind != "Liver lesion":
                assert (f["center_voxel"][2] < SIZE[2] / 2) == (f["side"] == "right"), (case["index"], f)
            checked.add(kind)
    assert len(checked) == 6


def test_acquisition_plane_is_the_blurred_axis(dataset):
    """Thick slices average three voxels along the acquisition axis: in air (pure noise) neighbouring
    voxels differ least along that axis; the VQA's plane answers have this to go on."""
    out, meta = dataset
    for case in meta["cases"]:
        hu = load_volume(out / case["volume"]).array
        roughness = []
        for axis in range(3):
            diff = np.abs(np.diff(hu, axis=axis))
            air = (np.delete(hu, -1, axis=axis) < -950) & (np.delete(hu, 0, axis=axis) < -950)
            roughness.append(float(np.median(diff[air])))
        assert int(np.argmin(roughness)) == PLANE_AXIS[case["plane"]], (case["plane"], roughness)


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--n", "3", "--size", "16", "16", "16", "--seed", "2",
                 "--workers", "1", "--no-vqa-text"]) == 0
    assert "SynthCT: 3 cases at 16x16x16" in capsys.readouterr().out
    with open(tmp_path / "cli" / "m3d_vqa_train.csv", newline="") as f:
        assert "Text" not in next(csv.reader(f))
    assert M3DVQADataset(tmp_path / "cli" / "m3d_vqa_train.csv", preprocessor=TINY)[0]["report"] is None
    run = subprocess.run([sys.executable, "-m", "med3dvlm.data.synth", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "--size D H W" in run.stdout
    assert run.stdout.startswith("usage: python -m med3dvlm.data.synth ")
    from med3dvlm.cli import main as cli_main

    with pytest.raises(SystemExit) as done:  # the package command names itself, not the module
        cli_main(["synth", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: med3dvlm synth ")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"size must be three axes \(D, H, W\) of at least 16 voxels; got \(8, 8, 8\)"):
        make_phantom(0, 0, (8, 8, 8))
    with pytest.raises(ValueError, match="n must be at least 1; got 0"):
        generate(tmp_path, n=0)
