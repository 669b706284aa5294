"""Stages 2 and 3: the vision-language model (``med3dvlm train projector`` / ``finetune``).

- projector (stage 2): a fresh projector between stage 1's vision tower (``model.vision_from``) and a
  pretrained causal LM (default: the offline SmolLM2-135M-Instruct; the paper's is
  ``Qwen/Qwen2.5-7B-Instruct``); only the projector and the input embeddings learn.
- finetune (stage 3): from stage 2's folder (``model.start_from``), LoRA on every LM linear layer plus
  the vision tower, projector, embeddings and LM head; the LoRA weights are merged at the end.

Data: report generation (M3D-Cap JSON: the prompt asks for the report, the target is the report) and
VQA (M3D-VQA CSV: closed questions with their four choices, target "{letter}. {answer}"; open
questions, target the answer), mixed. Labels are -100 on the prompt and image placeholders.
Each stage hands the next ``<output>/model``: the model, its tokenizer and the processor files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from transformers import AutoTokenizer

from ..data import M3DCapDataset, M3DVQADataset, VolumePreprocessor
from ..models import list_models
from ..models.vlm import (Med3DCLIPModel, Med3DVLMForConditionalGeneration, Med3DVLMProcessor, merge_and_save,
                          set_trainable)
from ..models.vlm.offline import offline_lm
from ..models.vlm.projector import PROJECTOR_TYPES
from .config import ConfigError
from .engine import CheckpointingTrainer, TrainingConfig
from .runner import (StageRun, check_choice, check_held_out, check_paths, kept_items, run_stage_config,
                     volume_reader)

__all__ = ["VLMStageConfig", "VLMModelConfig", "InstructionDataConfig", "InstructionDataset",
           "InstructionCollator", "run_stage"]

@dataclass
class VLMModelConfig:
    language_model: str = "offline"  # "offline": SmolLM2-135M-Instruct from its package; else a hub name / folder
    vision_from: str | None = None  # projector: stage 1's model folder (its vision tower and image size)
    start_from: str | None = None  # finetune: stage 2's model folder
    vision: str = "dcformer_small"  # projector without vision_from: a fresh registry encoder
    vision_options: dict = field(default_factory=dict)
    image_size: list[int] = field(default_factory=lambda: [128, 256, 256])
    projector: str = "mixer"  # "mixer" (Med3DVLM) or "mlp" (M3D-style)
    projector_options: dict = field(default_factory=dict)
    use_chat_template: bool | None = None  # None: when the LM's tokenizer has one
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05


@dataclass
class InstructionDataConfig:
    captions: str | None = None  # M3D-Cap JSON (report generation)
    vqa: str | None = None  # M3D-VQA CSV of the training questions
    vqa_mode: str = "both"  # "closed", "open" or "both"
    root: str | None = None  # image paths are relative to this (default: each file's folder)
    split: str = "train"  # M3D-Cap split
    eval_captions_split: str | None = None  # a held-out M3D-Cap split for the eval loss (with eval_steps)
    eval_size: int = 32
    cache_dir: str | None = None
    skip_bad: bool = False


@dataclass
class VLMStageConfig:
    model: VLMModelConfig = field(default_factory=VLMModelConfig)
    data: InstructionDataConfig = field(default_factory=InstructionDataConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        batch_size=16, learning_rate=1e-4, weight_decay=0.0, epochs=3, bf16=True))


class InstructionDataset(Dataset):
    """Items of a caption or VQA dataset as ``{"pixel_values", "prompt", "target"}``, prompted as
    ``processor`` prompts them (report prompts in turn; the question after the image token)."""

    def __init__(self, base: Dataset, processor) -> None:
        self.base, self.processor = base, processor

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict | None:
        item = self.base[index]
        if item is None:  # skipped as unreadable
            return None
        if "answer" in item:  # VQA: the question (and choices)
            prompt, target = self.processor.question_prompt(item["text"]), item["answer"]
        else:  # a report
            prompt, target = self.processor.report_prompt(index), item["text"]
        return {"pixel_values": item["pixel_values"], "prompt": prompt, "target": target}


class InstructionCollator:
    """Items -> the VLM's inputs via its processor (volumes arrive preprocessed)."""

    def __init__(self, processor, max_length: int) -> None:
        self.processor, self.max_length = processor, max_length

    def __call__(self, items: list[dict | None]) -> dict:
        kept = kept_items(items)
        return dict(self.processor([i["prompt"] for i in kept], targets=[i["target"] for i in kept],
                                   pixel_values=torch.stack([i["pixel_values"] for i in kept]),
                                   max_length=self.max_length))


def instruction_datasets(data: InstructionDataConfig, processor):
    reader = volume_reader(processor.volume_preprocessor, data.cache_dir)
    parts = []
    if data.captions:
        parts.append(M3DCapDataset(data.captions, data.split, data.root, reader, data.skip_bad))
    if data.vqa:
        parts.append(M3DVQADataset(data.vqa, data.vqa_mode, data.root, reader, data.skip_bad))
    train = InstructionDataset(ConcatDataset(parts) if len(parts) > 1 else parts[0], processor)
    held_out = None
    if data.captions and data.eval_captions_split:
        held = M3DCapDataset(data.captions, data.eval_captions_split, data.root, reader, data.skip_bad)
        held_out = InstructionDataset(Subset(held, range(min(data.eval_size, len(held)))), processor)
    return train, held_out


def check_stage(stage: str):
    def check(config: VLMStageConfig) -> None:
        """Stage 2 or 3's own values, each named by key, before anything is built."""
        model, data = config.model, config.data
        if stage == "finetune" and model.start_from is None:
            raise ConfigError("model.start_from is required for finetune: stage 2's model folder")
        if stage == "projector" and model.start_from is not None:
            raise ConfigError("model.start_from is for finetune; the projector stage starts from model.vision_from")
        if stage == "projector":
            check_choice("model.projector", model.projector, PROJECTOR_TYPES)
            if model.vision_from is None:
                check_choice("model.vision", model.vision, list_models())
        check_choice("data.vqa_mode", data.vqa_mode, ("closed", "open", "both"))
        if not data.captions and not data.vqa:
            raise ConfigError("data.captions and data.vqa are both empty: give at least one training source")
        check_held_out(config.training, bool(data.captions and data.eval_captions_split),
                       "data.eval_captions_split with data.captions")
        check_paths({"model.vision_from": model.vision_from, "model.start_from": model.start_from,
                     "data.captions": data.captions, "data.vqa": data.vqa, "data.root": data.root})

    return check


def build_projector_stage_model(model_config: VLMModelConfig):
    """Stage 2's model and processor: the LM, stage 1's vision tower (or a fresh one), a fresh projector."""
    if model_config.language_model == "offline":
        language_model, tokenizer = offline_lm()
    else:
        language_model = model_config.language_model
        tokenizer = AutoTokenizer.from_pretrained(model_config.language_model)
    clip = None
    if model_config.vision_from is not None:
        clip = Med3DCLIPModel.from_pretrained(model_config.vision_from)
        vision_config = clip.config.vision_config
        preprocessor = VolumePreprocessor.from_pretrained(model_config.vision_from)
    else:
        vision_config = {"name": model_config.vision, "options": dict(model_config.vision_options),
                         "image_size": list(model_config.image_size)}
        preprocessor = VolumePreprocessor.from_preset("med3dvlm", spatial_size=tuple(model_config.image_size))
    model = Med3DVLMForConditionalGeneration.from_language_model(
        language_model, tokenizer, vision_config=vision_config, projector_type=model_config.projector,
        projector_config=dict(model_config.projector_options))
    if clip is not None:
        model.vision_tower.load_state_dict(clip.vision_tower.state_dict())
    processor = Med3DVLMProcessor(tokenizer, preprocessor, image_seq_length=model.config.image_seq_length,
                                  use_chat_template=model_config.use_chat_template)
    return model, processor


def lora_options(model_config: VLMModelConfig) -> dict:
    return {"r": model_config.lora_r, "lora_alpha": model_config.lora_alpha, "lora_dropout": model_config.lora_dropout}


def merged_finetune_save(start_from: str, lora: dict):
    """Stage 3's final save: the trained weights gathered from every process (whole tensors under
    ZeRO-3 or FSDP), put into the same LoRA model built afresh on the main process, merged, saved."""
    def finalize(trainer, folder) -> None:
        state = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.is_world_process_zero():
            model = set_trainable(Med3DVLMForConditionalGeneration.from_pretrained(start_from), "finetune", **lora)
            model.load_state_dict(state)
            merge_and_save(model, folder)

    return finalize


def prepare_stage(stage: str):
    def prepare(config: VLMStageConfig) -> StageRun:
        m = config.model
        if stage == "projector":
            model, processor = build_projector_stage_model(m)
            trainable, finalize = set_trainable(model, "projector"), None
        else:
            model = Med3DVLMForConditionalGeneration.from_pretrained(m.start_from)
            processor = Med3DVLMProcessor.from_pretrained(m.start_from)
            if m.use_chat_template is not None:
                processor.use_chat_template = m.use_chat_template
            trainable = set_trainable(model, "finetune", **lora_options(m))
            finalize = merged_finetune_save(m.start_from, lora_options(m))
        train, held_out = instruction_datasets(config.data, processor)
        return StageRun(model=trainable, train_dataset=train, eval_dataset=held_out,
                        collator=InstructionCollator(processor, m.max_length), trainer_class=CheckpointingTrainer,
                        save_with_model=[processor], finalize=finalize)

    return prepare


def run_stage(stage: str, config_path, output_dir, overrides, max_steps=None, resume=None):
    """``med3dvlm train projector|finetune``: check the config, build, train, save ``<output_dir>/model``."""
    return run_stage_config(stage, VLMStageConfig, check_stage(stage), prepare_stage(stage), config_path, output_dir,
                            overrides, max_steps=max_steps, resume=resume)
