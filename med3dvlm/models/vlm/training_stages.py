"""Which parameters learn in Med3DVLM's training stages (REFERENCE 5), and saving the result.

- "projector" (the paper's stage 2): the projector and the input embeddings (the new image
  token's row among them); everything else frozen.
- "finetune" (stage 3): LoRA (r = 16, alpha = 32, dropout 0.05, peft) on every Linear layer of
  the language model, plus the vision tower, projector, input embeddings and LM head in full.

``merge_and_save`` folds the LoRA weights into the language model and writes a plain checkpoint
that ``Med3DVLMForConditionalGeneration.from_pretrained`` loads without peft.
"""
from __future__ import annotations

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model

__all__ = ["STAGES", "LORA_DEFAULTS", "set_trainable", "parameter_counts", "lora_target_modules", "merge_and_save"]

STAGES = ("projector", "finetune")
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05}


def lora_target_modules(model) -> list[str]:
    """Full names of the language model's Linear layers, the LM head excepted (it trains in full)."""
    head = model.get_output_embeddings()
    return [f"language_model.{name}" for name, module in model.language_model.named_modules()
            if isinstance(module, nn.Linear) and module is not head]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``trainable`` and ``total`` parameters (a tied weight counts once)."""
    params = list(model.parameters())  # unique tensors: shared ones appear once
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def set_trainable(model, stage: str, **lora_options):
    """Freeze ``model`` (a Med3DVLMForConditionalGeneration) for ``stage`` and print the counts.

    Returns the model to train: ``model`` itself for "projector", a peft ``PeftModel`` around it
    for "finetune". ``lora_options`` replace ``LORA_DEFAULTS`` (any ``peft.LoraConfig`` field).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    model.requires_grad_(False)
    if stage == "projector":
        trained = [model.multi_modal_projector, model.get_input_embeddings()]
    else:
        config = LoraConfig(**{**LORA_DEFAULTS, **lora_options}, target_modules=lora_target_modules(model))
        base = model
        model = get_peft_model(base, config)  # freezes all but the LoRA weights
        trained = [base.vision_tower, base.multi_modal_projector, base.get_input_embeddings(),
                   base.get_output_embeddings()]
    for module in trained:
        module.requires_grad_(True)
    counts = parameter_counts(model)
    print(f"stage {stage!r}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
          f"({100 * counts['trainable'] / counts['total']:.2f} %)")
    return model


def merge_and_save(model, save_directory, processor=None):
    """Merge LoRA weights (if ``model`` is a PeftModel) and save a plain checkpoint (+ the
    processor's files) to ``save_directory``; returns the merged model."""
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(save_directory)
    if processor is not None:
        processor.save_pretrained(save_directory)
    return model
