"""Data: volumes from disk (NIfTI, DICOM, .npy) in one canonical orientation, the preprocessing a
checkpoint carries, readers for M3D-Cap / M3D-VQA / CT-RATE, SynthCT (an embedded CT-like data
set) and synthetic shapes with masks for segmentation tests.

The file-format libraries (nibabel, pydicom, MONAI: the ``data`` extra) are imported when a
volume is read or preprocessed, so ``import med3dvlm.data`` works without them.
"""
from .cache import PreprocessedCache
from .datasets import CTRATEDataset, M3DCapDataset, M3DVQADataset, collate_volumes
from .preprocess import PRESETS, VolumePreprocessor
from .synthetic import SyntheticShapes
from .volume import CANONICAL_AXCODES, Volume, as_volume, load_volume

__all__ = ["CANONICAL_AXCODES", "CTRATEDataset", "M3DCapDataset", "M3DVQADataset", "PRESETS",
           "PreprocessedCache", "SyntheticShapes", "Volume", "VolumePreprocessor", "as_volume",
           "collate_volumes", "load_volume"]
