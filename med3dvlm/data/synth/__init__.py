"""SynthCT: an embedded CT-like data set whose texts describe its volumes (no download needed).

``make_phantom(index, seed, size)`` draws one case in memory (``phantom.py``); ``generate`` /
``python -m med3dvlm.data.synth`` writes a whole data set in the M3D-Cap, M3D-VQA and CT-RATE
formats (``writer.py``); reports and questions come from ``text.py``.
"""
from .phantom import FOV_MM, LABELS, PHASES, PLANES, Finding, Phantom, make_phantom
from .text import write_questions, write_report
from .writer import SPLITS, generate, main, split_of

__all__ = ["FOV_MM", "LABELS", "PHASES", "PLANES", "SPLITS", "Finding", "Phantom", "generate", "main",
           "make_phantom", "split_of", "write_questions", "write_report"]
