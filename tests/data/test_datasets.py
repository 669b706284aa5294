"""Readers for M3D-Cap, M3D-VQA and CT-RATE on small files in each published format, skip_bad,
collate, and the preprocessed-volume cache."""
import csv
import json
import logging
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")

from med3dvlm.data import (CTRATEDataset, M3DCapDataset, M3DVQADataset, PreprocessedCache,  # noqa: E402
                           VolumePreprocessor, collate_volumes)

SMALL = VolumePreprocessor.from_preset("m3d", spatial_size=(4, 8, 8))


def _npy(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).random((1, 6, 10, 10), dtype=np.float32))


def _nifti(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(-1000, 1000, (10, 10, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))


def _csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---- M3D-Cap ------------------------------------------------------------------------------------

@pytest.fixture
def m3d_cap(tmp_path):
    """M3D-Cap layout: npy volumes under M3D_Cap_npy/, captions as .txt paths or inline."""
    _npy(tmp_path / "M3D_Cap_npy/ct_quizze/000001/Axial.npy", 1)
    _npy(tmp_path / "M3D_Cap_npy/ct_quizze/000002/Axial.npy", 2)
    _nifti(tmp_path / "nii/000003.nii.gz", 3)
    (tmp_path / "M3D_Cap_npy/ct_quizze/000001/text.txt").write_text("A mass in the left lung.\n")
    content = {
        "train": [{"image": "M3D_Cap_npy/ct_quizze/000001/Axial.npy", "text": "M3D_Cap_npy/ct_quizze/000001/text.txt"},
                  {"image": "M3D_Cap_npy/ct_quizze/000002/Axial.npy", "text": "Normal chest CT."},
                  {"image": "nii/000003.nii.gz", "text": "Hepatic cyst."}],
        "validation": [], "test": [{"image": "M3D_Cap_npy/ct_quizze/000002/Axial.npy", "text": "Normal."}],
        "test100": [], "test500": [], "test1k": [],
    }
    (tmp_path / "M3D_Cap.json").write_text(json.dumps(content))
    return tmp_path / "M3D_Cap.json"


def test_m3d_cap(m3d_cap):
    ds = M3DCapDataset(m3d_cap, "train", preprocessor=SMALL)
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it["text"] for it in items] == ["A mass in the left lung.", "Normal chest CT.", "Hepatic cyst."]
    for it in items:
        assert it["pixel_values"].shape == (1, 4, 8, 8) and it["pixel_values"].dtype == torch.float32
    expected = SMALL(m3d_cap.parent / "M3D_Cap_npy/ct_quizze/000001/Axial.npy")
    torch.testing.assert_close(items[0]["pixel_values"], expected)
    assert len(M3DCapDataset(m3d_cap, "test", preprocessor=SMALL)) == 1
    assert len(M3DCapDataset(m3d_cap, "test1k", preprocessor=SMALL)) == 0


def test_m3d_cap_errors(m3d_cap, tmp_path):
    with pytest.raises(ValueError, match=r"no split 'val'; the file has \['test', 'test100'"):
        M3DCapDataset(m3d_cap, "val")
    with pytest.raises(FileNotFoundError):
        M3DCapDataset(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text(json.dumps({"train": [{"image": "a.npy"}]}))
    with pytest.raises(ValueError, match="item 0 of split 'train' needs 'image' and 'text'"):
        M3DCapDataset(tmp_path / "bad.json")


def test_skip_bad_counts_and_collate_drops(m3d_cap, caplog):
    content = json.loads(m3d_cap.read_text())
    content["train"] += [{"image": "missing.npy", "text": "x"}, {"image": "also_missing.npy", "text": "y"}]
    m3d_cap.write_text(json.dumps(content))
    strict = M3DCapDataset(m3d_cap, preprocessor=SMALL)
    with pytest.raises(FileNotFoundError) as info:
        strict[3]
    assert info.value.filename.endswith("missing.npy")

    lenient = M3DCapDataset(m3d_cap, preprocessor=SMALL, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="med3dvlm.data.datasets"):
        batches = list(DataLoader(lenient, batch_size=5, collate_fn=collate_volumes))
    assert len(batches) == 1 and batches[0]["num_skipped"] == 2
    assert batches[0]["pixel_values"].shape == (3, 1, 4, 8, 8)
    assert len(lenient.skipped) == 2 and lenient.skipped[0][0].endswith("missing.npy")
    first_only = [r for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(first_only) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="med3dvlm.data.datasets"):
        assert lenient.log_skipped() == 2
    assert "skipped 2 of 5 items" in caplog.text


def test_skip_bad_with_loader_workers(m3d_cap):
    """Workers skip in their own copies of the dataset; the batch's num_skipped brings the count back."""
    content = json.loads(m3d_cap.read_text())
    content["train"].append({"image": "missing.npy", "text": "x"})
    m3d_cap.write_text(json.dumps(content))
    ds = M3DCapDataset(m3d_cap, preprocessor=SMALL, skip_bad=True)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_volumes)
    assert sum(b["num_skipped"] for b in loader) == 1


# ---- M3D-VQA ------------------------------------------------------------------------------------

VQA_HEADER = ["Image Path", "Text", "Question Type", "Question", "Choice A", "Choice B", "Choice C",
              "Choice D", "Answer", "Answer Choice"]


@pytest.fixture
def m3d_vqa(tmp_path):
    _npy(tmp_path / "M3D_Cap_npy/a/Axial.npy", 1)
    rows = [["M3D_Cap_npy/a/Axial.npy", "Report text.", "1", "In which plane is the image?", "Sagittal",
             "Axial", "Coronal", "Oblique", "Axial", "B"],
            ["M3D_Cap_npy/a/Axial.npy", "Report text.", "5", "Where is the lesion?", "Liver", "Spleen",
             "Left kidney", "Lung", "Left kidney", "C"]]
    _csv(tmp_path / "M3D_VQA_test.csv", VQA_HEADER, rows)
    _csv(tmp_path / "no_text.csv", [h for h in VQA_HEADER if h != "Text"], [r[:1] + r[2:] for r in rows])
    return tmp_path


def test_m3d_vqa_closed_and_open(m3d_vqa):
    closed = M3DVQADataset(m3d_vqa / "M3D_VQA_test.csv", mode="closed", preprocessor=SMALL)
    item = closed[1]
    assert item["text"] == ("Where is the lesion? Choices: A. Liver B. Spleen C. Left kidney D. Lung")
    assert item["answer"] == "C. Left kidney" and item["answer_choice"] == "C"
    assert item["question_type"] == "location" and item["closed"] and item["report"] == "Report text."
    assert item["pixel_values"].shape == (1, 4, 8, 8)
    opened = M3DVQADataset(m3d_vqa / "M3D_VQA_test.csv", mode="open", preprocessor=SMALL)[0]
    assert (opened["text"], opened["answer"], opened["question_type"]) == ("In which plane is the image?",
                                                                          "Axial", "plane")
    both = M3DVQADataset(m3d_vqa / "M3D_VQA_test.csv", mode="both", preprocessor=SMALL)
    assert len(both) == 4 and [both[i]["closed"] for i in range(4)] == [True, False, True, False]


def test_m3d_vqa_without_text_column(m3d_vqa):
    ds = M3DVQADataset(m3d_vqa / "no_text.csv", preprocessor=SMALL)
    assert ds[0]["report"] is None and ds[0]["answer"] == "B. Axial"


def test_m3d_vqa_errors(m3d_vqa):
    with pytest.raises(ValueError, match="mode must be 'closed', 'open' or 'both'"):
        M3DVQADataset(m3d_vqa / "M3D_VQA_test.csv", mode="multiple")
    _csv(m3d_vqa / "short.csv", ["Image Path", "Question", "Answer"], [["a.npy", "q", "a"]])
    with pytest.raises(ValueError, match=r"short.csv: missing column\(s\) \['Question Type', 'Choice A'"):
        M3DVQADataset(m3d_vqa / "short.csv")
    _csv(m3d_vqa / "letter.csv", VQA_HEADER, [["a.npy", "", "1", "q", "a", "b", "c", "d", "a", "E"]])
    with pytest.raises(ValueError, match="letter.csv, line 2: 'Answer Choice' must be A, B, C or D; got 'E'"):
        M3DVQADataset(m3d_vqa / "letter.csv")


# ---- CT-RATE -------------------------------------------------------------------------------------

LABELS = ["Medical material", "Arterial wall calcification", "Cardiomegaly"]


@pytest.fixture
def ct_rate(tmp_path):
    """CT-RATE's nested layout: train/train_1/train_1_a/train_1_a_1.nii.gz."""
    for i, name in enumerate(["train_1_a_1.nii.gz", "train_1_a_2.nii.gz", "train_2_a_1.nii.gz"]):
        parts = name.split("_")
        _nifti(tmp_path / "train" / "_".join(parts[:2]) / "_".join(parts[:3]) / name, i)
    _csv(tmp_path / "train_reports.csv",
         ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
         [["train_1_a_1.nii.gz", "", "", "Heart enlarged.", "Cardiomegaly."],
          ["train_1_a_2.nii.gz", "", "", "Calcified aorta.", "Atherosclerosis."],
          ["train_2_a_1.nii.gz", "", "", "Normal.", ""]])
    _csv(tmp_path / "train_predicted_labels.csv", ["VolumeName", *LABELS],
         [["train_1_a_1.nii.gz", 0, 0, 1], ["train_1_a_2.nii.gz", 0, 1, 0], ["train_2_a_1.nii.gz", 0, 0, 0]])
    return tmp_path


def test_ct_rate(ct_rate):
    ds = CTRATEDataset(ct_rate / "train_reports.csv", ct_rate / "train_predicted_labels.csv",
                       data_root=ct_rate / "train", preprocessor=SMALL)
    assert len(ds) == 3 and ds.label_names == LABELS
    item = ds[0]
    assert item["text"] == "Heart enlarged. Cardiomegaly."
    assert ds[2]["text"] == "Normal."
    torch.testing.assert_close(item["labels"], torch.tensor([0.0, 0.0, 1.0]))
    assert item["image_path"].endswith("train/train_1/train_1_a/train_1_a_1.nii.gz")
    batch = collate_volumes([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 1, 4, 8, 8) and batch["labels"].shape == (3, 3)
    assert batch["volume_name"][1] == "train_1_a_2.nii.gz"
    unlabelled = CTRATEDataset(ct_rate / "train_reports.csv", data_root=ct_rate / "train", preprocessor=SMALL,
                               text_columns=("Findings_EN",))
    assert "labels" not in unlabelled[0] and unlabelled[0]["text"] == "Heart enlarged."


def test_ct_rate_errors(ct_rate):
    _csv(ct_rate / "partial_labels.csv", ["VolumeName", *LABELS], [["train_1_a_1.nii.gz", 0, 0, 1]])
    with pytest.raises(ValueError, match=r"partial_labels.csv: no labels for 2 volume\(s\)"):
        CTRATEDataset(ct_rate / "train_reports.csv", ct_rate / "partial_labels.csv")
    ds = CTRATEDataset(ct_rate / "train_reports.csv", data_root=ct_rate / "elsewhere", preprocessor=SMALL)
    with pytest.raises(FileNotFoundError, match="nested layout") as info:
        ds[0]
    assert info.value.filename.endswith("elsewhere/train_1_a_1.nii.gz")


def test_collate_refuses_mixed_sizes_and_handles_empty_batches():
    items = [{"pixel_values": torch.zeros(1, 4, 8, 8), "text": "a"},
             {"pixel_values": torch.zeros(1, 4, 8, 9), "text": "b"}]
    with pytest.raises(ValueError, match=r"'pixel_values' comes in different shapes \[\(1, 4, 8, 8\), \(1, 4, 8, 9"):
        collate_volumes(items)
    empty = collate_volumes([None, None])
    assert empty["num_skipped"] == 2 and empty["pixel_values"].numel() == 0


# ---- the cache ---------------------------------------------------------------------------------

class CountingPreprocessor:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def to_dict(self):
        return self.inner.to_dict()

    def __call__(self, data):
        self.calls += 1
        return self.inner(data)


def test_cache_preprocesses_each_scan_once(tmp_path):
    _nifti(tmp_path / "scan.nii.gz", 0)
    counting = CountingPreprocessor(SMALL)
    cache = PreprocessedCache(counting, tmp_path / "cache")
    first, second = cache(tmp_path / "scan.nii.gz"), cache(str(tmp_path / "scan.nii.gz"))
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert counting.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert cache.entry(tmp_path / "scan.nii.gz").exists() and second.dtype == torch.float32
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_cache_key_follows_the_file_and_the_config(tmp_path):
    _nifti(tmp_path / "scan.nii.gz", 0)
    cache = PreprocessedCache(SMALL, tmp_path / "cache")
    before = cache(tmp_path / "scan.nii.gz")
    other = PreprocessedCache(VolumePreprocessor.from_preset("m3d", spatial_size=(4, 8, 6)), tmp_path / "cache")
    assert other.entry(tmp_path / "scan.nii.gz") != cache.entry(tmp_path / "scan.nii.gz")
    assert other(tmp_path / "scan.nii.gz").shape == (1, 4, 8, 6)
    _nifti(tmp_path / "scan.nii.gz", 1)  # the scan changes on disk
    os.utime(tmp_path / "scan.nii.gz", ns=(1, 1))
    after = cache(tmp_path / "scan.nii.gz")
    assert cache.misses == 2 and not torch.equal(after, before)
    torch.testing.assert_close(after, SMALL(tmp_path / "scan.nii.gz"))


def test_cache_rebuilds_a_damaged_entry_and_passes_arrays_through(tmp_path):
    _nifti(tmp_path / "scan.nii.gz", 0)
    cache = PreprocessedCache(SMALL, tmp_path / "cache")
    good = cache(tmp_path / "scan.nii.gz")
    entry = cache.entry(tmp_path / "scan.nii.gz")
    entry.write_bytes(entry.read_bytes()[:100])
    torch.testing.assert_close(cache(tmp_path / "scan.nii.gz"), good)
    assert cache.misses == 2
    array = np.random.default_rng(0).random((6, 10, 10)).astype(np.float32)
    torch.testing.assert_close(cache(array), SMALL(array))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    with pytest.raises(TypeError, match="to_dict"):
        PreprocessedCache(lambda x: x, tmp_path / "cache")


def test_dataset_reads_through_the_cache(m3d_cap, tmp_path):
    cache = PreprocessedCache(SMALL, tmp_path / "cache")
    ds = M3DCapDataset(m3d_cap, preprocessor=cache)
    plain = M3DCapDataset(m3d_cap, preprocessor=SMALL)
    for _ in range(2):
        for i in range(len(ds)):
            torch.testing.assert_close(ds[i]["pixel_values"], plain[i]["pixel_values"])
    assert (cache.misses, cache.hits) == (3, 3)
