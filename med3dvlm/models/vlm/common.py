"""What the dual encoder and the vision-language model share: their PreTrainedModel base, the
text sub-config, and loading a pretrained Hugging Face part given as a model or a name."""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import is_flash_attn_2_available


def text_sub_config(value, default_model_type: str, name: str) -> PretrainedConfig:
    """A config, a dict carrying ``model_type`` (as config.json stores it) or None (the default
    model type's defaults) -> a PretrainedConfig."""
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(default_model_type)
    if isinstance(value, dict) and "model_type" in value:
        value = dict(value)
        return AutoConfig.for_model(value.pop("model_type"), **value)
    raise ValueError(f"{name} must be a PretrainedConfig, a dict with a 'model_type' entry, or None; "
                     f"got {type(value).__name__}")


def init_with_text_config(config: PretrainedConfig, **kwargs) -> None:
    """``PretrainedConfig.__init__`` for a config whose ``text_config`` is already set. transformers
    hands every sub-config the parent's attention implementation (None unless ``attn_implementation``
    is given), which would drop a pretrained text model's own choice (e.g. flash-attn); it is kept."""
    chosen = config.text_config._attn_implementation
    PretrainedConfig.__init__(config, **kwargs)
    if kwargs.get("attn_implementation") is None:
        config.text_config._attn_implementation = chosen


def default_attn_implementation() -> str:
    """flash-attn 2 where it is installed (and usable), else PyTorch's SDPA."""
    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def pretrained_part(model_or_name, auto_cls, **load_kwargs) -> PreTrainedModel:
    """``model_or_name`` itself if it is a model, else ``auto_cls.from_pretrained(name)`` (a hub
    name such as ``Qwen/Qwen2.5-7B-Instruct`` or a local folder)."""
    if isinstance(model_or_name, PreTrainedModel):
        return model_or_name
    if not isinstance(model_or_name, str):
        raise ValueError(f"expected a PreTrainedModel or a model name/folder; got {type(model_or_name).__name__}")
    load_kwargs.setdefault("attn_implementation", default_attn_implementation())
    return auto_cls.from_pretrained(model_or_name, **load_kwargs)


class Med3DPreTrainedModel(PreTrainedModel):
    """Base of both models. Subclasses hold their image encoder as ``self.vision_tower``."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        # The vision tower and the heads initialise themselves when built (each encoder with its own
        # scheme, e.g. ViT3D's truncated normal); transformers' generic init would overwrite that.
        # Hugging Face sub-models (text tower, language model) are initialised by their own class.
        pass

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, **kwargs)
        # The registry encoders checkpoint per stage through their own switch.
        self.vision_tower.set_grad_checkpointing(enable)
