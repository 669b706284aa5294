"""Stage 1: SigLIP pre-training of the dual encoder (``med3dvlm train clip``).

A registry image encoder (default DCFormer-small at 128x256x256) and a BERT-family text encoder
(default: the offline all-MiniLM-L6-v2; any hub name or folder, e.g. ``medicalai/ClinicalBERT``),
trained with the fused SigLIP loss. Across processes the loss gathers the embeddings
(``SigLIPLoss(dist_impl="gather")``), so every process's batch is contrasted with every other's.
Every ``training.eval_steps`` the held-out slice reports its loss and retrieval R@1/5/10.

Hands the next stage ``<output>/model``: the dual encoder (``save_pretrained``), its tokenizer and
``preprocessor_config.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Subset
from transformers import AutoModel, AutoTokenizer

from dcformer_kernels import siglip_loss

from ..data import PRESETS, CTRATEDataset, M3DCapDataset, VolumePreprocessor, collate_volumes
from ..eval.retrieval import retrieval_recall
from ..models import list_models
from ..models.vlm import Med3DCLIPModel
from ..models.vlm.clip import SIGLIP_INITS, TEXT_POOLINGS
from ..models.vlm.offline import offline_text_encoder
from .config import MISSING, ConfigError
from .engine import CheckpointingTrainer, TrainingConfig
from .runner import (StageRun, check_choice, check_held_out, check_paths, kept_items, run_stage_config,
                     volume_reader)

__all__ = ["ClipStageConfig", "ClipModelConfig", "CaptionDataConfig", "ClipCollator", "ClipTrainer", "run_stage"]

DIST_IMPLS = ("gather", "ring")


@dataclass
class ClipModelConfig:
    vision: str = "dcformer_small"  # any registry encoder (med3dvlm.models.list_models())
    vision_options: dict = field(default_factory=dict)  # create_model options, e.g. {"backend": "torch"}
    image_size: list[int] = field(default_factory=lambda: [128, 256, 256])  # (D, H, W) the tower sees
    text_model: str = "offline"  # "offline": the package-shipped all-MiniLM-L6-v2; else a hub name / folder
    text_model_options: dict = field(default_factory=dict)  # from_pretrained options, e.g. {"hidden_dropout_prob": 0}
    # False: the pretrained text tower stays fixed and only its projection learns (LiT's "locked
    # text"): no backward through the text encoder, 2-3x faster steps on a CPU (the demo's setting)
    train_text_tower: bool = True
    projection_dim: int = 768
    siglip_init: str = "paper"  # "paper": t' = log 10, b = -10; "released": t' = log(1/0.07), b = 0
    text_pooling: str = "cls"  # "cls" (the paper's BERT) or "mean" (sentence-transformers models, e.g. MiniLM)
    dist_impl: str = "gather"  # the loss across processes: "gather" or "ring"
    max_text_length: int = 512


@dataclass
class CaptionDataConfig:
    format: str = "m3d_cap"  # "m3d_cap" (JSON) or "ct_rate" (reports CSV)
    path: str = MISSING  # the M3D-Cap JSON or the CT-RATE reports CSV
    root: str | None = None  # image paths are relative to this (default: the file's folder)
    train_split: str = "train"  # M3D-Cap split
    eval_split: str | None = "validation"  # M3D-Cap split for the held-out slice (None: none)
    eval_path: str | None = None  # CT-RATE: the held-out reports CSV
    eval_size: int = 64  # items of the held-out slice
    preprocessing: str = "med3dvlm"  # a VolumePreprocessor preset (spatial size = model.image_size)
    preprocessing_options: dict = field(default_factory=dict)  # preset fields to replace
    cache_dir: str | None = None  # keep preprocessed volumes here (memory-mapped), preprocessed once
    skip_bad: bool = False  # skip unreadable items (counted) instead of stopping


@dataclass
class ClipStageConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        batch_size=64, learning_rate=1e-4, weight_decay=0.1, epochs=100, bf16=True))


def check(config: ClipStageConfig) -> None:
    """Stage 1's own values, each named by key, before anything is built."""
    model, data = config.model, config.data
    check_choice("model.vision", model.vision, list_models())
    check_choice("model.siglip_init", model.siglip_init, SIGLIP_INITS)
    check_choice("model.text_pooling", model.text_pooling, TEXT_POOLINGS)
    check_choice("model.dist_impl", model.dist_impl, DIST_IMPLS)
    check_choice("data.format", data.format, ("m3d_cap", "ct_rate"))
    check_choice("data.preprocessing", data.preprocessing, PRESETS)
    if "spatial_size" in data.preprocessing_options:
        raise ConfigError("data.preprocessing_options.spatial_size: the size comes from model.image_size")
    if data.skip_bad and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a skipped item would shrink one process's batch, and the gathered loss needs equal batches
        raise ConfigError("data.skip_bad cannot be used with several processes in stage 1 (the SigLIP loss "
                          "gathers equal local batches); clean the data set or train on one process")
    held_out = data.eval_split if data.format == "m3d_cap" else data.eval_path
    check_held_out(config.training, held_out is not None, "data.eval_split, or data.eval_path for ct_rate")
    check_paths({"data.path": data.path, "data.eval_path": data.eval_path, "data.root": data.root})


def caption_datasets(data: CaptionDataConfig, preprocessor):
    """The training set and the held-out slice (or None) that ``data`` describes."""
    reader = volume_reader(preprocessor, data.cache_dir)
    if data.format == "m3d_cap":
        train = M3DCapDataset(data.path, data.train_split, data.root, reader, data.skip_bad)
        held_out = M3DCapDataset(data.path, data.eval_split, data.root, reader, data.skip_bad) \
            if data.eval_split else None
    else:
        train = CTRATEDataset(data.path, None, data.root, reader, data.skip_bad)
        held_out = CTRATEDataset(data.eval_path, None, data.root, reader, data.skip_bad) if data.eval_path else None
    if held_out is not None:
        held_out = Subset(held_out, range(min(data.eval_size, len(held_out))))
    return train, held_out


class ClipCollator:
    """Dataset items -> the dual encoder's inputs: stacked volumes and the tokenised texts."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict | None]) -> dict:
        batch = collate_volumes(kept_items(items))
        tokens = self.tokenizer(batch["text"], padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"pixel_values": batch["pixel_values"], "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"]}


class ClipTrainer(CheckpointingTrainer):
    """Held-out evaluation = the SigLIP loss over the whole slice and retrieval R@1/5/10."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        images, texts = [], []
        # every item, in order: the training loader's drop_last must not apply here
        loader = DataLoader(eval_dataset if eval_dataset is not None else self.eval_dataset,
                            batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator)
        with torch.no_grad(), self.autocast_smart_context_manager():
            for batch in loader:
                batch = self._prepare_inputs(batch)
                images.append(model.encode_image(batch["pixel_values"]).float())
                texts.append(model.encode_text(batch["input_ids"], batch["attention_mask"]).float())
        model.train(was_training)
        image_embeds, text_embeds = torch.cat(images), torch.cat(texts)
        scale, bias = model.siglip.logit_scale.float(), model.siglip.logit_bias.float()
        loss = siglip_loss(image_embeds, text_embeds, scale, bias, backend="torch")
        metrics = {"loss": loss.item(), **retrieval_recall(image_embeds, text_embeds)}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def build_model(model_config: ClipModelConfig):
    """The dual encoder and its text tokenizer."""
    options = dict(model_config.text_model_options)
    if model_config.text_model == "offline":
        text_model, tokenizer = offline_text_encoder(**options)
    else:
        text_model = AutoModel.from_pretrained(model_config.text_model, **options)
        tokenizer = AutoTokenizer.from_pretrained(model_config.text_model)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = Med3DCLIPModel.from_text_model(
        text_model,
        vision_config={"name": model_config.vision, "options": dict(model_config.vision_options),
                       "image_size": list(model_config.image_size)},
        projection_dim=model_config.projection_dim, siglip_init=model_config.siglip_init,
        text_pooling=model_config.text_pooling,
        loss_dist_impl=model_config.dist_impl if world > 1 else None)
    if not model_config.train_text_tower:
        model.text_tower.requires_grad_(False)  # Trainer's optimizer takes only parameters that need grad
    return model, tokenizer


def save_single_process(trainer, folder) -> None:
    """Save the model as one process would load it: the cross-process loss is this run's launch
    detail, not part of the checkpoint (a ``gather`` config would need a process group to load)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.loss_dist_impl = None
    trainer.save_model(str(folder))


def prepare(config: ClipStageConfig) -> StageRun:
    """Everything stage 1 trains with (the config was checked)."""
    data = config.data
    preprocessor = VolumePreprocessor.from_preset(data.preprocessing, spatial_size=tuple(config.model.image_size),
                                                  **data.preprocessing_options)
    train, held_out = caption_datasets(data, preprocessor)
    model, tokenizer = build_model(config.model)
    return StageRun(model=model, train_dataset=train, eval_dataset=held_out,
                    collator=ClipCollator(tokenizer, config.model.max_text_length), trainer_class=ClipTrainer,
                    save_with_model=[tokenizer, preprocessor], drop_last=True, finalize=save_single_process)


def run_stage(stage: str, config_path, output_dir, overrides, max_steps=None, resume=None):
    """``med3dvlm train clip``: check the config, build, train, save ``<output_dir>/model``."""
    return run_stage_config(stage, ClipStageConfig, check, prepare, config_path, output_dir, overrides,
                            max_steps=max_steps, resume=resume)
