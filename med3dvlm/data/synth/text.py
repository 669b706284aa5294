"""SynthCT texts: reports and VQA questions generated from a phantom's findings.

Phrasing varies (several templates per finding, synonyms, sentence order, which normal organs a
report mentions, sizes in cm or mm), so a model cannot match a report to its volume by template
alone: what distinguishes two reports is what the volumes contain (findings, side, location,
size, density, contrast phase, acquisition plane).

Questions follow M3D-VQA's columns and its question-type numbers (1 plane, 2 phase, 3 organ,
4 abnormality, 5 location; size and density questions are about an abnormality, so type 4). Each
has four choices with the answer among them; the open form is the same question without choices.
"""
from __future__ import annotations

import numpy as np

from .phantom import LABELS, PHASES, PLANES, SIZE_CLASSES_CM, Finding, Phantom

__all__ = ["write_report", "write_questions", "QUESTION_TYPES"]

QUESTION_TYPES = {"plane": 1, "phase": 2, "organ": 3, "abnormality": 4, "location": 5}

_DENSITY_WORDS = {
    "hypodense": ("hypodense", "low-attenuation", "hypoattenuating"),
    "hyperdense": ("hyperdense", "high-attenuation", "hyperattenuating"),
    "fat-containing": ("fat-containing", "fat-density", "fatty"),
    "solid": ("solid", "soft-tissue density"),
    "ground-glass": ("ground-glass", "ground glass", "subsolid"),
}
_LESION_WORDS = ("lesion", "mass", "focal lesion")
_PHASE_WORDS = {"non-contrast": ("non-contrast", "unenhanced", "without intravenous contrast"),
                "arterial": ("arterial phase", "late arterial phase", "contrast-enhanced arterial phase"),
                "portal venous": ("portal venous phase", "venous phase", "contrast-enhanced portal venous phase")}
_PLANE_WORDS = {"axial": ("axial", "transverse"), "coronal": ("coronal",), "sagittal": ("sagittal",)}

# Sentences for a finding; {size}, {density}, {lesion}, {location}, {side}, {amount} are filled in.
_TEMPLATES = {
    "Lung nodule": ("There is a {size} {density} nodule in the {location}.",
                    "A {density} pulmonary nodule measuring {size} is seen in the {location}.",
                    "{Location}: {density} nodule, {size}.",
                    "A {size} {density} lung nodule is noted in the {location}."),
    "Liver lesion": ("There is a {size} {density} {lesion} in the {location}.",
                     "The liver contains a {density} {lesion} in the {location}, measuring {size}.",
                     "A {size} {density} hepatic {lesion} is noted in the {location}."),
    "Kidney lesion": ("A {size} {density} {lesion} arises from the {location}.",
                      "There is a {density} renal {lesion} at the {location}, measuring {size}.",
                      "{Location}: {density} {lesion} of {size}."),
    "Pleural effusion": ("There is a {amount} {side} pleural effusion.",
                         "{Amount} {side} pleural effusion.",
                         "A {amount} pleural effusion is present {on_side}."),
    "Ascites": ("There is a {amount} amount of ascites.", "{Amount} volume ascites.",
                "A {amount} amount of free fluid is present in the abdomen."),
    "Kidney stone": ("A {size} calculus is seen in the {side} kidney.",
                     "{Side} nephrolithiasis with a {size} stone.",
                     "There is a {size} stone in the {side} renal pelvis."),
    "Aortic calcification": ("Calcified atherosclerotic plaque in the {location}.",
                             "There are scattered calcifications along the {location}.",
                             "Atherosclerotic calcification of the {location} is noted."),
    "Cardiomegaly": ("The heart is enlarged.", "Cardiomegaly.", "The cardiac silhouette is enlarged."),
}
_NORMAL = {
    "Lung nodule": ("No pulmonary nodule.", "No lung nodules are seen."),
    "Liver lesion": ("No focal liver lesion.", "The liver is unremarkable."),
    "Kidney lesion": ("No focal renal lesion.", "No renal mass."),
    "Pleural effusion": ("No pleural effusion.", "No pleural fluid."),
    "Ascites": ("No ascites.", "No free fluid in the abdomen."),
    "Kidney stone": ("No renal calculi.", "No nephrolithiasis."),
    "Aortic calcification": ("No aortic calcification.", "The aorta is not calcified."),
    "Cardiomegaly": ("Heart size is normal.", "The heart is not enlarged."),
}
_IMPRESSION = {
    "Lung nodule": "{size} {location} nodule", "Liver lesion": "{density} liver {lesion}",
    "Kidney lesion": "{side} renal {lesion}", "Pleural effusion": "{amount} {side} pleural effusion",
    "Ascites": "{amount} ascites", "Kidney stone": "{side} nephrolithiasis",
    "Aortic calcification": "aortic atherosclerosis", "Cardiomegaly": "cardiomegaly",
}
_NO_FINDINGS = ("No acute abnormality.", "No significant abnormality.", "Normal study.")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _size_words(rng: np.random.Generator, size_cm: float | None) -> str:
    if size_cm is None:
        return ""
    return f"{size_cm:.1f} cm" if rng.integers(2) else f"{round(size_cm * 10)} mm"


def _fill(template: str, finding: Finding, rng: np.random.Generator) -> str:
    side = finding.side or ""
    words = {
        "size": _size_words(rng, finding.size_cm),
        "density": _pick(rng, _DENSITY_WORDS[finding.density]) if finding.density in _DENSITY_WORDS else "",
        "lesion": _pick(rng, _LESION_WORDS),
        "location": finding.location or "",
        "side": side,
        "on_side": "on both sides" if side == "bilateral" else f"on the {side}",
        "amount": finding.size_class or "",
    }
    words.update({k.capitalize(): v[:1].upper() + v[1:] for k, v in words.items()})
    return " ".join(template.format(**words).split())


def write_report(phantom: Phantom, rng: np.random.Generator) -> tuple[str, str, str]:
    """(technique, findings, impression) for ``phantom``."""
    technique = (f"{_pick(rng, _PLANE_WORDS[phantom.plane]).capitalize()} "
                 f"{_pick(rng, _PHASE_WORDS[phantom.phase])} CT of the chest and abdomen.")
    sentences = [_fill(_pick(rng, _TEMPLATES[f.kind]), f, rng) for f in phantom.findings]
    present = {f.kind for f in phantom.findings}
    sentences += [_pick(rng, _NORMAL[kind]) for kind in LABELS if kind not in present and rng.random() < 0.5]
    order = rng.permutation(len(sentences))
    findings = " ".join(sentences[i] for i in order)
    if phantom.findings:
        items = [_fill(_IMPRESSION[f.kind], f, rng) for f in phantom.findings]
        items = [items[i] for i in rng.permutation(len(items))]
        impression = "; ".join(items)
        impression = impression[:1].upper() + impression[1:] + "."
    else:
        impression = _pick(rng, _NO_FINDINGS)
    return technique, findings, impression


# ---- questions ------------------------------------------------------------------------------------

def _choices(rng: np.random.Generator, answer: str, options, required=()) -> tuple[list[str], str]:
    """Four shuffled choices: the answer, the ``required`` distractors and more of ``options`` up to
    three; returns (choices, letter)."""
    required = [o for o in dict.fromkeys(required) if o != answer]
    others = [o for o in dict.fromkeys(options) if o != answer and o not in required]
    picked = required + [others[i] for i in rng.permutation(len(others))[:3 - len(required)]]
    if len(picked) < 3:
        raise ValueError(f"need three distractors for {answer!r}; got {picked}")
    choices = [answer, *picked]
    choices = [choices[i] for i in rng.permutation(4)]
    return choices, "ABCD"[choices.index(answer)]


def _question(kind: str, text: str, answer: str, options, rng: np.random.Generator, required=()) -> dict:
    choices, letter = _choices(rng, answer, options, required)
    return {"question_type": QUESTION_TYPES[kind], "question": text, "choices": choices, "answer": answer,
            "answer_choice": letter}


_ORGAN_OF = {"Lung nodule": "lung", "Liver lesion": "liver", "Kidney lesion": "kidney",
             "Kidney stone": "kidney", "Aortic calcification": "aorta", "Cardiomegaly": "heart",
             "Pleural effusion": "pleural space", "Ascites": "peritoneal cavity"}
# Organ questions name what a finding looks like, never its kind, and each look is shared by findings in
# different organs: a question whose text alone fixed its answer ("Where is the calculus located?" is
# always the kidney) would be answered without the image. A question is asked only when one finding
# has that look, so its answer is the one organ showing it. Cardiomegaly is the only enlargement, so it
# gets no organ question.
_ORGAN_QUESTION_OF = {"Lung nodule": "focal lesion", "Liver lesion": "focal lesion", "Kidney lesion": "focal lesion",
                      "Kidney stone": "calcification", "Aortic calcification": "calcification",
                      "Pleural effusion": "fluid collection", "Ascites": "fluid collection"}
_ORGAN_QUESTION = {"focal lesion": ("Which organ contains the focal lesion?", "Where is the focal lesion?"),
                   "calcification": ("Where is the calcification?", "Which structure contains the calcification?"),
                   "fluid collection": ("Where is the fluid collection?", "Which space holds the fluid collection?")}
_ORGAN_OPTIONS = ("liver", "kidney", "lung", "spleen", "heart", "aorta", "pleural space",
                  "peritoneal cavity", "pericardium", "gallbladder")
_LOCATION_OPTIONS = {
    "Lung nodule": ("right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe"),
    "Liver lesion": ("right hepatic lobe", "left hepatic lobe", "spleen", "pancreatic head"),
    "Kidney lesion": ("upper pole of the right kidney", "lower pole of the right kidney",
                      "upper pole of the left kidney", "lower pole of the left kidney"),
    "Kidney stone": ("right kidney", "left kidney", "gallbladder", "urinary bladder"),
    "Pleural effusion": ("right pleural space", "left pleural space", "bilateral pleural space", "pericardium"),
    "Aortic calcification": ("thoracic aorta", "abdominal aorta", "coronary arteries", "splenic artery"),
}
_DENSITY_OPTIONS = {"Lung nodule": ("solid", "ground-glass", "cavitary", "calcified"),
                    "Liver lesion": ("hypodense", "hyperdense", "fat-containing", "calcified"),
                    "Kidney lesion": ("hypodense", "hyperdense", "fat-containing", "calcified")}
_NAME = {"Lung nodule": "lung nodule", "Liver lesion": "liver lesion", "Kidney lesion": "kidney lesion",
         "Kidney stone": "kidney stone", "Pleural effusion": "pleural effusion",
         "Aortic calcification": "aortic calcification"}


def write_questions(phantom: Phantom, rng: np.random.Generator) -> list[dict]:
    """Closed four-choice questions (with their open form) about ``phantom``: plane, phase, one
    abnormality question, and per finding its organ (when no other finding looks alike), location,
    size and density where they apply."""
    questions = [
        _question("plane", _pick(rng, ("In which plane was this CT acquired?",
                                       "What is the acquisition plane of this scan?")),
                  phantom.plane, (*PLANES, "oblique"), rng),
        _question("phase", _pick(rng, ("What is the contrast phase of this scan?",
                                       "In which contrast phase was this CT obtained?")),
                  phantom.phase, (*PHASES, "delayed"), rng),
    ]
    present = [f.kind for f in phantom.findings]
    absent = [kind.lower() for kind in LABELS if kind not in present]
    text = _pick(rng, ("Which abnormality is present in this scan?", "What abnormality is seen?"))
    if phantom.findings:
        shown = phantom.findings[int(rng.integers(len(phantom.findings)))]
        questions.append(_question("abnormality", text, shown.kind.lower(), absent + ["no abnormality"], rng))
    else:
        questions.append(_question("abnormality", text, "no abnormality", absent, rng))
    looks = [_ORGAN_QUESTION_OF.get(kind) for kind in present]
    for f in phantom.findings:
        look = _ORGAN_QUESTION_OF.get(f.kind)
        if look is not None and looks.count(look) == 1:  # two findings that look alike: no single answer
            # the other organs where this look occurs are always offered, so the choices give nothing away
            alike = [_ORGAN_OF[kind] for kind, other in _ORGAN_QUESTION_OF.items() if other == look]
            questions.append(_question("organ", _pick(rng, _ORGAN_QUESTION[look]), _ORGAN_OF[f.kind],
                                       _ORGAN_OPTIONS, rng, required=alike))
        if f.kind in _LOCATION_OPTIONS:
            questions.append(_question("location", f"Where is the {_NAME[f.kind]} located?", f.location,
                                       _LOCATION_OPTIONS[f.kind], rng))
        if f.kind in SIZE_CLASSES_CM:
            options = [f"{c:g} cm" for c in SIZE_CLASSES_CM[f.kind]]
            questions.append(_question("abnormality", f"What is the approximate size of the {_NAME[f.kind]}?",
                                       f.size_class, options, rng))
        if f.kind in _DENSITY_OPTIONS:
            questions.append(_question("abnormality", f"What is the attenuation of the {_NAME[f.kind]}?",
                                       f.density, _DENSITY_OPTIONS[f.kind], rng))
    return questions
