"""The four evaluations behind ``med3dvlm eval``, one fixed protocol each (REFERENCE 3 and 5).

- ``retrieval``: a stage-1 dual encoder; image->text and text->image R@1/5/10 on the first N items
  of an M3D-Cap split, for each N of (100, 500, 1000, 2000) the split holds (the official sizes);
  a split smaller than 100 is evaluated whole. Every image against every text.
- ``zeroshot``: a stage-1 dual encoder; "X is present." / "X is not present." per label of a
  CT-RATE label CSV (``med3dvlm.eval.zeroshot``).
- ``report``: a VLM; the report for each of the first N volumes of an M3D-Cap split, asked with
  the first report prompt, scored by ``caption_scores`` against the reference, beside a copy
  baseline (one typical training report given for every volume).
- ``vqa``: a VLM; M3D-VQA questions, closed (by the official and the strict rule) and open (text
  metrics per question type), by ``med3dvlm.eval.vqa.vqa_scores``.

Each returns an ``EvalResult``; ``write`` puts ``<task>.json`` and ``<task>.md`` (protocol, model,
data and command in the header) into a folder.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from ..data import CTRATEDataset, M3DCapDataset, M3DVQADataset, VolumePreprocessor, collate_volumes
from .generation import Decoding, generate_answers
from .metrics import caption_scores, caption_scores_per_sample, macro_average
from .retrieval import retrieval_recall
from .vqa import prior_answers, vqa_scores
from .zeroshot import detection_scores, zeroshot_probabilities, zeroshot_prompts

__all__ = ["EvalResult", "EvalUsageError", "evaluate_retrieval", "evaluate_zeroshot", "evaluate_report",
           "evaluate_vqa", "RETRIEVAL_SIZES", "TASKS"]

RETRIEVAL_SIZES = (100, 500, 1000, 2000)
TEXT_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge1", "rougeL", "meteor")
BASELINE_CANDIDATES = 24  # training reports tried as the copy baseline, each scored against the others


class EvalUsageError(ValueError):
    """A bad model folder, data file or option, named by its flag (the CLI exits with status 2)."""


@dataclass
class EvalResult:
    task: str
    protocol: str
    model: str
    data: str
    command: str
    metrics: dict
    reference: dict = field(default_factory=dict)  # chance levels and baselines, beside the metrics
    samples: list = field(default_factory=list)  # per-item predictions (report, vqa)
    notes: list = field(default_factory=list)  # what was left out or could not be computed, and why
    seconds: float = 0.0
    machine: str = field(default_factory=lambda: f"{platform.machine()}, {platform.system()}, torch {torch.__version__}"
                         + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"))

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """``<folder>/<task>.json`` (everything) and ``<folder>/<task>.md`` (header + tables)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, md_path = folder / f"{self.task}.json", folder / f"{self.task}.md"
        json_path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        md_path.write_text(self.markdown())
        return json_path, md_path

    def markdown(self, heading_level: int = 1) -> str:
        lines = [f"{'#' * heading_level} {self.task}", "",
                 f"- protocol: {self.protocol}", f"- model: `{self.model}`", f"- data: `{self.data}`",
                 f"- command: `{self.command}`", f"- machine: {self.machine}; {self.seconds:.0f} s", ""]
        lines += ["Scores in %.", ""] + MARKDOWN[self.task](self)
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


# ---- shared pieces ------------------------------------------------------------------------------

def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _model_type(model_dir: str | Path) -> str:
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise EvalUsageError(f"--model {str(model_dir)!r}: no config.json there; give a model folder written by "
                             f"`med3dvlm train` (<output-dir>/model)")
    return json.loads(config.read_text()).get("model_type", "")


def _check_model(model_dir: str | Path, expected: str, task: str, stage: str) -> None:
    found = _model_type(model_dir)
    if found != expected:
        raise EvalUsageError(f"--model {str(model_dir)!r} holds a {found!r} model; `med3dvlm eval {task}` needs a "
                             f"{expected!r} one ({stage})")


def _check_file(flag: str, path: str | Path | None) -> None:
    if path is not None and not Path(path).is_file():
        raise EvalUsageError(f"{flag} {str(path)!r}: no such file")


def _check_counts(num_items: int | None, batch_size: int) -> None:
    if num_items is not None and num_items < 1:
        raise EvalUsageError(f"--num-items must be >= 1; got {num_items}")
    if batch_size < 1:
        raise EvalUsageError(f"--batch-size must be >= 1; got {batch_size}")


def _open_data(reader, flag: str, path, *args, **kwargs):
    """``reader(path, ...)``, a data file that cannot be read being a usage error naming ``flag``."""
    try:
        dataset = reader(path, *args, **kwargs)
    except (FileNotFoundError, ValueError) as error:
        raise EvalUsageError(f"{flag} {str(path)!r}: {error}") from error
    if len(dataset) == 0:
        raise EvalUsageError(f"{flag} {str(path)!r}: no items to evaluate")
    return dataset


def _first(dataset, num_items: int | None):
    """The first ``num_items`` items (all when None)."""
    return Subset(dataset, range(len(dataset) if num_items is None else min(num_items, len(dataset))))


def _batches(dataset, batch_size: int, desc: str):
    from tqdm.auto import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_volumes)
    return tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True)


def _load_clip(model_dir, device):
    from ..models.vlm import Med3DCLIPModel

    return Med3DCLIPModel.from_pretrained(model_dir).to(device).eval()


def _load_vlm(model_dir, device):
    from ..models.vlm import Med3DVLMForConditionalGeneration

    return Med3DVLMForConditionalGeneration.from_pretrained(model_dir).to(device).eval()


@torch.no_grad()
def _embed_texts(model, tokenizer, texts: list[str], max_length: int, device, batch_size: int) -> torch.Tensor:
    """Text embeddings, each text truncated to ``max_length`` tokens or the encoder's positions."""
    max_length = min(max_length, getattr(model.config.text_config, "max_position_embeddings", max_length))
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt").to(device)
        out.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).double().cpu())
    return torch.cat(out)


# ---- retrieval ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_retrieval(model_dir, data, split: str = "test", sizes=RETRIEVAL_SIZES, batch_size: int = 16,
                       max_text_length: int = 512, device: str | None = None, command: str = "",
                       data_root=None) -> EvalResult:
    """Retrieval R@1/5/10 both ways on the first N pairs of ``split``, for each N in ``sizes``."""
    from transformers import AutoTokenizer

    _check_model(model_dir, "med3d_clip", "retrieval", "stage 1, `med3dvlm train clip`")
    _check_file("--data", data)
    _check_counts(None, batch_size)
    sizes = sorted(set(int(n) for n in sizes))
    if not sizes or sizes[0] < 1:
        raise EvalUsageError(f"--sizes must be positive; got {sizes}")
    start, device = time.perf_counter(), _device(device)
    dataset = _open_data(M3DCapDataset, "--data", data, split, data_root,
                         preprocessor=VolumePreprocessor.from_pretrained(model_dir))
    model, tokenizer = _load_clip(model_dir, device), AutoTokenizer.from_pretrained(model_dir)
    usable = [n for n in sizes if n <= len(dataset)]
    too_large = [n for n in sizes if n > len(dataset)]
    notes = [f"N = {', '.join(map(str, too_large))} left out: the {split!r} split has {len(dataset)} items"] \
        if too_large else []
    if not usable:
        usable = [len(dataset)]
        notes = [f"every N asked for ({', '.join(map(str, too_large))}) exceeds the {split!r} split, so all "
                 f"{len(dataset)} items were used"]
    images, texts = [], []
    for batch in _batches(_first(dataset, max(usable)), batch_size, "retrieval: images"):
        images.append(model.encode_image(batch["pixel_values"].to(device)).double().cpu())
        texts.extend(batch["text"])
    image_embeds = torch.cat(images)
    text_embeds = _embed_texts(model, tokenizer, texts, max_text_length, device, batch_size)
    metrics = {str(n): retrieval_recall(image_embeds[:n], text_embeds[:n]) for n in usable}
    reference = {str(n): {f"r{k}": min(k, n) / n for k in (1, 5, 10)} for n in usable}
    protocol = (f"first N pairs of the {split!r} split, every image against every text by the dual encoder's "
                f"cosine similarity; R@K = share of queries whose own pair ranks in the top K (ties count "
                f"against); texts truncated to {max_text_length} tokens; chance R@K = K/N")
    return EvalResult("retrieval", protocol, str(model_dir), str(data), command, metrics, reference, notes=notes,
                      seconds=time.perf_counter() - start)


def _retrieval_markdown(result: EvalResult) -> list[str]:
    rows = [[n, *(_pct(m[f"{d}_r{k}"]) for d in ("i2t", "t2i") for k in (1, 5, 10)),
             " / ".join(_pct(result.reference[n][f"r{k}"]) for k in (1, 5, 10))]
            for n, m in result.metrics.items()]
    return _table(["N", "I→T R@1", "R@5", "R@10", "T→I R@1", "R@5", "R@10", "chance R@1/5/10"], rows)


# ---- zero-shot ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_zeroshot(model_dir, data, labels, num_items: int | None = None, batch_size: int = 16,
                      device: str | None = None, command: str = "", data_root=None) -> EvalResult:
    """Zero-shot detection of every label column of ``labels`` on the volumes of ``data`` (CT-RATE CSVs)."""
    from transformers import AutoTokenizer

    _check_model(model_dir, "med3d_clip", "zeroshot", "stage 1, `med3dvlm train clip`")
    _check_file("--data", data)
    _check_file("--labels", labels)
    _check_counts(num_items, batch_size)
    start, device = time.perf_counter(), _device(device)
    dataset = _open_data(CTRATEDataset, "--data/--labels", data, labels, data_root,
                         preprocessor=VolumePreprocessor.from_pretrained(model_dir))
    if not dataset.label_names:
        raise EvalUsageError(f"--labels {str(labels)!r}: no label columns besides VolumeName")
    model, tokenizer = _load_clip(model_dir, device), AutoTokenizer.from_pretrained(model_dir)
    images, truth = [], []
    for batch in _batches(_first(dataset, num_items), batch_size, "zeroshot: images"):
        images.append(model.encode_image(batch["pixel_values"].to(device)).double().cpu())
        truth.append(batch["labels"])
    pairs = [zeroshot_prompts(name) for name in dataset.label_names]
    present = _embed_texts(model, tokenizer, [p for p, _ in pairs], 64, device, batch_size)
    absent = _embed_texts(model, tokenizer, [a for _, a in pairs], 64, device, batch_size)
    scale = model.siglip.logit_scale.exp().item()
    probabilities = zeroshot_probabilities(torch.cat(images), present, absent, scale)
    metrics = detection_scores(probabilities, torch.cat(truth), dataset.label_names)
    overall = metrics["overall"]
    reference = {"auc": 0.5, "accuracy_all_absent": 1 - overall["positive_rate"],
                 "accuracy_coin": 0.5}
    protocol = ("per label, softmax over the similarities to \"X is present.\" and \"X is not present.\" (times the "
                "learned SigLIP scale), p(present) >= 0.5 is a detection; accuracy over all N x L decisions, F1 "
                "weighted by positives, micro precision and recall, mean AUC over labels with both outcomes")
    notes = [f"AUC undefined for {name!r} (one outcome only in these items)"
             for name, m in metrics["per_label"].items() if m["auc"] is None]
    return EvalResult("zeroshot", protocol, str(model_dir), f"{data} + {labels}", command, metrics, reference,
                      notes=notes, seconds=time.perf_counter() - start)


def _zeroshot_markdown(result: EvalResult) -> list[str]:
    keys = ("accuracy", "precision", "recall", "auc")
    overall = result.metrics["overall"]
    rows = [["**all**", _pct(overall["weighted_f1"]), *(_pct(overall[k]) for k in keys),
             _pct(overall["positive_rate"])]]
    rows += [[name, _pct(m["f1"]), *(_pct(m[k]) for k in keys), f"{m['positives']}/{m['count']}"]
             for name, m in result.metrics["per_label"].items()]
    chance = (f"Chance: AUC {_pct(result.reference['auc'])}; accuracy {_pct(result.reference['accuracy_all_absent'])} "
              f"by answering \"absent\" every time.")
    header = ["label", "F1 (all: weighted by positives)", "accuracy", "precision", "recall", "AUC", "positives"]
    return [*_table(header, rows), chance, ""]


# ---- report generation --------------------------------------------------------------------------

def copy_baseline(train_reports: list[str], references: list[str], candidates: int = BASELINE_CANDIDATES):
    """The copy baseline: of the first ``candidates`` training reports, the one with the highest mean
    METEOR (ROUGE-L without WordNet) against the others (the most typical report), given as the
    answer for every reference. Returns (that report, its caption_scores against ``references``)."""
    pool = train_reports[:candidates]
    if len(pool) < 2:
        raise EvalUsageError("the copy baseline needs at least 2 training reports")
    best, best_score = pool[0], -1.0
    for i, candidate in enumerate(pool):
        others = pool[:i] + pool[i + 1:]
        means = macro_average(caption_scores_per_sample([candidate] * len(others), others))
        score = means["meteor"] if means["meteor"] is not None else means["rougeL"]
        if score > best_score:
            best, best_score = candidate, score
    return best, caption_scores([best] * len(references), references)


def _baseline_reports(data, split: str | None) -> list[str]:
    """The reports of ``split`` (M3D-Cap), the copy baseline's candidates; [] when ``split`` is None."""
    if split is None:
        return []
    dataset = _open_data(M3DCapDataset, "--baseline-split", data, split)
    return [dataset.caption(i) for i in range(len(dataset))]


@torch.no_grad()
def evaluate_report(model_dir, data, split: str = "test", num_items: int | None = 1000, batch_size: int = 8,
                    decoding: Decoding = Decoding(), baseline_split: str | None = "train", device: str | None = None,
                    command: str = "", data_root=None) -> EvalResult:
    """Report generation on the first ``num_items`` volumes of ``split`` (M3D-Cap JSON)."""
    from ..models.vlm import Med3DVLMProcessor

    _check_model(model_dir, "med3dvlm", "report", "stage 2 or 3, `med3dvlm train projector|finetune`")
    _check_file("--data", data)
    _check_counts(num_items, batch_size)
    start, device = time.perf_counter(), _device(device)
    processor = Med3DVLMProcessor.from_pretrained(model_dir)
    dataset = _open_data(M3DCapDataset, "--data", data, split, data_root,
                         preprocessor=processor.volume_preprocessor)
    train_reports = _baseline_reports(data, baseline_split)
    model = _load_vlm(model_dir, device)
    prompt = processor.report_prompt(0)
    predictions, references = [], []
    for index, batch in enumerate(_batches(_first(dataset, num_items), batch_size, "report: generating")):
        predictions += generate_answers(model, processor, [prompt] * len(batch["text"]), batch["pixel_values"],
                                        decoding, batch_index=index)
        references += batch["text"]
    per_sample = caption_scores_per_sample(predictions, references)
    metrics = macro_average(per_sample)
    reference, notes = {}, []
    if train_reports:
        report, scores = copy_baseline(train_reports, references)
        reference = {"copy_baseline": scores, "copy_baseline_report": report}
    samples = [{"prediction": p, "reference": r, **{k: per_sample[k][i] for k in per_sample}}
               for i, (p, r) in enumerate(zip(predictions, references))]
    notes += [f"{k} not computed: {why}" for k, why in metrics.get("missing", {}).items()]
    protocol = (f"the first N volumes of the {split!r} split, prompt {prompt!r}, {decoding.describe()}; "
                f"metrics per report, macro-averaged (med3dvlm.eval.metrics.caption_scores)")
    result = EvalResult("report", protocol, str(model_dir), str(data), command, metrics, reference, samples, notes,
                        seconds=time.perf_counter() - start)
    result.metrics.update(count=len(predictions), decoding=decoding.to_dict())
    return result


def _scores_row(name: str, scores: dict) -> list:
    return [name, *(_pct(scores.get(k)) for k in TEXT_METRICS)]


def _report_markdown(result: EvalResult, shown: int = 3) -> list[str]:
    rows = [_scores_row(f"model ({result.metrics['count']} reports)", result.metrics)]
    if "copy_baseline" in result.reference:
        rows.append(_scores_row("copy baseline", result.reference["copy_baseline"]))
    lines = _table(["", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "ROUGE-L", "METEOR"], rows)
    if "copy_baseline_report" in result.reference:
        lines += [f"Copy baseline report: \"{result.reference['copy_baseline_report']}\"", ""]
    for i, sample in enumerate(result.samples[:shown]):
        lines += [f"**Volume {i}**", "", f"- generated: {sample['prediction'] or '(empty)'}",
                  f"- reference: {sample['reference']}", ""]
    return lines


# ---- VQA ----------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_vqa(model_dir, data, mode: str = "both", num_items: int | None = None, batch_size: int = 8,
                 decoding: Decoding = Decoding(max_new_tokens=64), device: str | None = None,
                 command: str = "", data_root=None, prior_data=None) -> EvalResult:
    """VQA on the first ``num_items`` questions of an M3D-VQA CSV (``mode``: closed, open or both),
    beside the image-blind answer prior of the training questions in ``prior_data`` (a CSV) if given."""
    from ..models.vlm import Med3DVLMProcessor

    _check_model(model_dir, "med3dvlm", "vqa", "stage 2 or 3, `med3dvlm train projector|finetune`")
    _check_file("--data", data)
    _check_counts(num_items, batch_size)
    if mode not in ("closed", "open", "both"):
        raise EvalUsageError(f"--mode must be closed, open or both; got {mode!r}")
    start, device = time.perf_counter(), _device(device)
    processor = Med3DVLMProcessor.from_pretrained(model_dir)
    dataset = _open_data(M3DVQADataset, "--data", data, mode, data_root, preprocessor=processor.volume_preprocessor)
    _check_file("--prior-data", prior_data)
    prior_rows = [row for row, _ in _open_data(M3DVQADataset, "--prior-data", prior_data, "closed").records] \
        if prior_data is not None else None
    model = _load_vlm(model_dir, device)
    records = []
    for index, batch in enumerate(_batches(_first(dataset, num_items), batch_size, "vqa: generating")):
        prompts = [processor.question_prompt(text) for text in batch["text"]]
        answers = generate_answers(model, processor, prompts, batch["pixel_values"], decoding, batch_index=index)
        for i, prediction in enumerate(answers):
            records.append({key: batch[key][i] for key in ("question", "question_type", "closed", "choices",
                                                           "answer", "answer_choice")} | {"prediction": prediction})
    metrics = vqa_scores(records)
    metrics["decoding"] = decoding.to_dict()
    reference = {"closed_chance": 0.25}
    if prior_rows is not None:
        blind = [dict(record, prediction=answer) for record, answer in zip(records, prior_answers(prior_rows, records))]
        reference["answer_prior"] = vqa_scores(blind)
    protocol = (f"M3D-VQA questions in file order, mode {mode!r}, {decoding.describe()}; closed: official rule "
                f"(\"<letter>.\" appears in the answer) and strict rule (the one choice the answer gives is the key); "
                f"open: text metrics per question type against the answer")
    if prior_rows is not None:
        protocol += (f"; answer prior: the answer most often right in {prior_data} for the same question text, "
                     f"no image")
    return EvalResult("vqa", protocol, str(model_dir), str(data), command, metrics, reference, records,
                      seconds=time.perf_counter() - start)


def _vqa_markdown(result: EvalResult) -> list[str]:
    metrics, lines = result.metrics, []
    prior = result.reference.get("answer_prior", {})
    closed = metrics.get("closed")
    if closed:
        blind = prior.get("closed", {})
        rows = [[name, part["count"], _pct(part["official"]), _pct(part["strict"]),
                 *([_pct(blind_part["strict"])] if blind_part else [])]
                for (name, part), blind_part in zip(
                    [("**all**", closed), *closed.get("per_type", {}).items()],
                    [blind, *blind.get("per_type", {}).values()] if blind else [None] * (1 + len(closed["per_type"])))]
        header = ["question type", "questions", "accuracy, official rule", "accuracy, strict rule",
                  *(["answer prior, no image"] if blind else [])]
        lines += ["Closed (four choices; chance 25.0 %):", "", *_table(header, rows)]
    open_ = metrics.get("open")
    if open_:
        rows = [[name, part["count"], *(_pct(part.get(k)) for k in TEXT_METRICS)]
                for name, part in [("**all**", open_), *open_.get("per_type", {}).items()]]
        if "open" in prior:
            rows.append(["answer prior, no image", prior["open"]["count"],
                         *(_pct(prior["open"].get(k)) for k in TEXT_METRICS)])
        lines += ["Open:", "", *_table(["question type", "questions", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
                                        "ROUGE-1", "ROUGE-L", "METEOR"], rows)]
    examples = [s for s in result.samples if s["closed"]][:2] + [s for s in result.samples if not s["closed"]][:2]
    for sample in examples:
        kind = "closed" if sample["closed"] else "open"
        lines += [f"- {kind}: {sample['question']} → \"{sample['prediction']}\" (key: \"{sample['answer']}\")"]
    return lines + [""] if examples else lines


MARKDOWN = {"retrieval": _retrieval_markdown, "zeroshot": _zeroshot_markdown, "report": _report_markdown,
            "vqa": _vqa_markdown}
TASKS = tuple(MARKDOWN)
