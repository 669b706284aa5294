"""Models behind one registry: 3D encoders (``encoders/``), DCA and U-Nets (``seg/``), the
vision-language models (``vlm/``); the encoder contract (``encoder.py``) and the registry."""
from .registry import create_model, list_models, register_model
from .encoder import Encoder3D
from .encoders import (ConvNeXt3D, ConvNeXt3DConfig, DCFormer, DCFormerConfig, PoolFormer3D, PoolFormer3DConfig,
                       ViT3D, ViT3DConfig, load_official_dcformer)
from .seg import DualCrossAttention, EncoderUNet3D, UNet

__all__ = [
    "create_model", "list_models", "register_model", "Encoder3D",
    "DCFormer", "DCFormerConfig", "load_official_dcformer",
    "ViT3D", "ViT3DConfig", "ConvNeXt3D", "ConvNeXt3DConfig", "PoolFormer3D", "PoolFormer3DConfig",
    "DualCrossAttention", "UNet", "EncoderUNet3D",
]

# The vision-language models need transformers (the "vlm" extra, ~5 s to import): loaded on first use.
_VLM_EXPORTS = ("Med3DCLIPConfig", "Med3DCLIPModel", "MixerProjector", "load_official_projector", "Med3DVLMConfig",
                "Med3DVLMForConditionalGeneration", "Med3DVLMProcessor", "load_official_med3dvlm", "offline_lm",
                "offline_text_encoder")
__all__ += list(_VLM_EXPORTS)


def __getattr__(name: str):
    if name in _VLM_EXPORTS:
        from . import vlm

        return getattr(vlm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
