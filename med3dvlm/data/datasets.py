"""Readers for the published 3D vision-language formats, as torch Datasets.

Every item is a dict with ``"pixel_values"`` (float32 (1, D, H, W), from the ``preprocessor``) and
``"text"`` (str), plus the format's own fields:

- ``M3DCapDataset``: M3D-Cap JSON (``{"train"|"validation"|"test"|"test100"|...: [{"image",
  "text"}]}``; ``text`` is the caption or the path of a ``.txt`` holding it).
- ``M3DVQADataset``: M3D-VQA CSV (Image Path, [Text], Question Type, Question, Choice A..D,
  Answer, Answer Choice). ``mode="closed"``: ``text`` is the question followed by
  ``" Choices: A. .. B. .. C. .. D. .."`` and ``answer`` is ``"{letter}. {answer}"`` (Med3DVLM's
  prompt); ``"open"``: the question alone and the answer text; ``"both"``: each row twice.
- ``CTRATEDataset``: CT-RATE reports CSV (VolumeName, Findings_EN, Impressions_EN, ...) with its
  multi-abnormality label CSV (VolumeName + one 0/1 column per label) as a float ``labels`` vector.

Paths in the files are relative to ``data_root`` (default: the folder of the JSON/CSV file). The
``preprocessor`` (default: ``VolumePreprocessor.from_preset("med3dvlm")``) may be a
``PreprocessedCache``. Tokenisation is left to the model's processor; ``collate_volumes`` stacks
the volumes and keeps everything else as lists.

A file that cannot be read raises (``FileNotFoundError``/``ValueError`` naming it). With
``skip_bad=True`` such an item comes back as ``None`` instead: the first skip is logged, every
skip is recorded in ``dataset.skipped`` (in this process), ``collate_volumes`` drops it and counts
it in the batch's ``"num_skipped"`` (which also reaches the main process from loader workers),
and ``dataset.log_skipped()`` reports the total at the end of an epoch.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from .preprocess import VolumePreprocessor
from .volume import VolumeLike

__all__ = ["M3DCapDataset", "M3DVQADataset", "CTRATEDataset", "collate_volumes", "VQA_QUESTION_TYPES"]

logger = logging.getLogger(__name__)

VQA_QUESTION_TYPES = {1: "plane", 2: "phase", 3: "organ", 4: "abnormality", 5: "location"}
VQA_COLUMNS = ("Image Path", "Question Type", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
               "Answer", "Answer Choice")
CTRATE_NAME = "VolumeName"


class _VolumeTextDataset(Dataset):
    """Shared loading and skipping: subclasses build ``self.records`` and ``_item(record)``."""

    def __init__(self, source: Path, data_root: str | os.PathLike | None,
                 preprocessor: Callable[[VolumeLike], torch.Tensor] | None, skip_bad: bool):
        self.source = source
        self.data_root = Path(data_root) if data_root is not None else source.parent
        self.preprocessor = preprocessor or VolumePreprocessor.from_preset("med3dvlm")
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []
        self.records: list[Any] = []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        try:
            return self._item(self.records[index])
        except (FileNotFoundError, ValueError) as error:
            if not self.skip_bad:
                raise
            if not self.skipped:
                logger.warning("%s: skipping unreadable items (skip_bad=True); first: %s", self.source, error)
            self.skipped.append((str(getattr(error, "filename", None) or ""), str(error)))
            return None

    def log_skipped(self) -> int:
        """Log how many items this process skipped; returns the count."""
        if self.skipped:
            logger.warning("%s: skipped %d of %d items as unreadable", self.source, len(self.skipped), len(self))
        return len(self.skipped)

    def _item(self, record) -> dict:
        raise NotImplementedError

    def _volume(self, relative: str) -> torch.Tensor:
        return self.preprocessor(self.data_root / relative)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(2, "no CSV file at this path", str(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
    return rows


class M3DCapDataset(_VolumeTextDataset):
    """Image-caption pairs of one split of an M3D-Cap JSON. Item: pixel_values, text, image_path."""

    def __init__(self, json_path: str | os.PathLike, split: str = "train",
                 data_root: str | os.PathLike | None = None,
                 preprocessor: Callable[[VolumeLike], torch.Tensor] | None = None, skip_bad: bool = False):
        source = Path(json_path)
        super().__init__(source, data_root, preprocessor, skip_bad)
        if not source.is_file():
            raise FileNotFoundError(2, "no M3D-Cap JSON at this path", str(source))
        try:
            content = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON ({e})") from e
        if not isinstance(content, dict) or split not in content:
            splits = sorted(content) if isinstance(content, dict) else type(content).__name__
            raise ValueError(f"{source}: no split {split!r}; the file has {splits}")
        self.records = content[split]
        for i, record in enumerate(self.records):
            if not isinstance(record, dict) or not {"image", "text"} <= set(record):
                raise ValueError(f"{source}: item {i} of split {split!r} needs 'image' and 'text'; got {record!r}")

    def _item(self, record: dict) -> dict:
        return {"pixel_values": self._volume(record["image"]), "text": self._text(record["text"]),
                "image_path": record["image"]}

    def caption(self, index: int) -> str:
        """Item ``index``'s caption, without reading its volume."""
        return self._text(self.records[index]["text"])

    def _text(self, text: str) -> str:
        """M3D-Cap's ``text`` is either the caption or the path of a .txt file holding it."""
        if not text.endswith(".txt") or "\n" in text:
            return text
        path = self.data_root / text
        if not path.is_file():
            raise FileNotFoundError(2, "no caption file at this path", str(path))
        return path.read_text(encoding="utf-8").strip()


class M3DVQADataset(_VolumeTextDataset):
    """Questions of an M3D-VQA CSV (``Text`` column optional). Item: pixel_values, text (the prompt),
    answer (the target), question, choices, answer_choice, question_type (name), closed, report
    (the Text column or None), image_path."""

    def __init__(self, csv_path: str | os.PathLike, mode: str = "closed",
                 data_root: str | os.PathLike | None = None,
                 preprocessor: Callable[[VolumeLike], torch.Tensor] | None = None, skip_bad: bool = False):
        if mode not in ("closed", "open", "both"):
            raise ValueError(f"mode must be 'closed', 'open' or 'both'; got {mode!r}")
        source = Path(csv_path)
        super().__init__(source, data_root, preprocessor, skip_bad)
        rows = _read_csv(source, VQA_COLUMNS)
        for line, row in enumerate(rows, start=2):
            if row["Answer Choice"].strip() not in ("A", "B", "C", "D"):
                raise ValueError(f"{source}, line {line}: 'Answer Choice' must be A, B, C or D; "
                                 f"got {row['Answer Choice']!r}")
        modes = {"closed": (True,), "open": (False,), "both": (True, False)}[mode]
        self.records = [(row, closed) for row in rows for closed in modes]

    def _item(self, record: tuple[dict, bool]) -> dict:
        row, closed = record
        choices = [row[f"Choice {letter}"] for letter in "ABCD"]
        letter = row["Answer Choice"].strip()
        question = row["Question"]
        if closed:
            text = question + " Choices: " + " ".join(f"{l}. {c}" for l, c in zip("ABCD", choices))
            answer = f"{letter}. {row['Answer']}"
        else:
            text, answer = question, row["Answer"]
        return {"pixel_values": self._volume(row["Image Path"]), "text": text, "answer": answer,
                "question": question, "choices": choices, "answer_choice": letter,
                "question_type": _question_type(row["Question Type"]), "closed": closed,
                "report": row.get("Text"), "image_path": row["Image Path"]}


def _question_type(value: str) -> str:
    """M3D-VQA writes the type as its number (1 plane .. 5 location); names pass through."""
    value = value.strip()
    return VQA_QUESTION_TYPES.get(int(value), value) if value.isdigit() else value.lower()


class CTRATEDataset(_VolumeTextDataset):
    """CT-RATE volumes with reports and (optionally) multi-abnormality labels. Item: pixel_values,
    text (``text_columns`` joined), labels (float (L,), when a label CSV is given), volume_name,
    image_path. ``label_names`` lists the label columns in order.

    Volumes are found at ``data_root/VolumeName`` or in CT-RATE's nested layout
    ``data_root/train_1/train_1_a/train_1_a_1.nii.gz``.
    """

    def __init__(self, reports_csv: str | os.PathLike, labels_csv: str | os.PathLike | None = None,
                 data_root: str | os.PathLike | None = None,
                 preprocessor: Callable[[VolumeLike], torch.Tensor] | None = None, skip_bad: bool = False,
                 text_columns: Sequence[str] = ("Findings_EN", "Impressions_EN")):
        source = Path(reports_csv)
        super().__init__(source, data_root, preprocessor, skip_bad)
        self.text_columns = tuple(text_columns)
        reports = _read_csv(source, (CTRATE_NAME, *self.text_columns))
        self.label_names: list[str] = []
        labels: dict[str, list[float]] = {}
        if labels_csv is not None:
            labels_path = Path(labels_csv)
            rows = _read_csv(labels_path, (CTRATE_NAME,))
            self.label_names = [c for c in rows[0] if c != CTRATE_NAME] if rows else []
            for line, row in enumerate(rows, start=2):
                try:
                    labels[row[CTRATE_NAME]] = [float(row[c]) for c in self.label_names]
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{labels_path}, line {line}: labels must be numbers ({e})") from e
            unlabelled = [r[CTRATE_NAME] for r in reports if r[CTRATE_NAME] not in labels]
            if unlabelled:
                raise ValueError(f"{labels_path}: no labels for {len(unlabelled)} volume(s) of {source}, "
                                 f"e.g. {unlabelled[0]!r}")
        self.records = [(row, labels.get(row[CTRATE_NAME])) for row in reports]

    def _item(self, record: tuple[dict, list[float] | None]) -> dict:
        row, labels = record
        name = row[CTRATE_NAME]
        path = self._locate(name)
        text = " ".join(row[c].strip() for c in self.text_columns if row[c] and row[c].strip())
        item = {"pixel_values": self.preprocessor(path), "text": text, "volume_name": name,
                "image_path": str(path)}
        if labels is not None:
            item["labels"] = torch.tensor(labels, dtype=torch.float32)
        return item

    def _locate(self, name: str) -> Path:
        flat = self.data_root / name
        if flat.exists():
            return flat
        parts = name.split("_")  # train_1_a_1.nii.gz -> train_1/train_1_a/
        if len(parts) >= 4:
            nested = self.data_root / "_".join(parts[:2]) / "_".join(parts[:3]) / name
            if nested.exists():
                return nested
        raise FileNotFoundError(2, "no volume here nor in CT-RATE's nested layout", str(flat))


def collate_volumes(items: Sequence[dict | None]) -> dict:
    """Batch dataset items: tensors stacked (``pixel_values`` (B, 1, D, H, W), ``labels`` (B, L)),
    everything else as lists; ``None`` items (skipped) dropped and counted in ``num_skipped``. A
    batch whose items were all skipped has ``pixel_values`` of 0 items and no other fields."""
    kept = [item for item in items if item is not None]
    batch: dict[str, Any] = {"num_skipped": len(items) - len(kept)}
    if not kept:
        batch["pixel_values"] = torch.empty(0)
        return batch
    for key in kept[0]:
        values = [item[key] for item in kept]
        if isinstance(values[0], torch.Tensor):
            shapes = sorted({tuple(v.shape) for v in values})
            if len(shapes) > 1:
                raise ValueError(f"collate_volumes: {key!r} comes in different shapes {shapes}; give every "
                                 f"item one size (the preprocessor's spatial_size)")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
