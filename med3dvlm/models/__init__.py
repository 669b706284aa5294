"""Models: encoders (DCFormer family and baselines), DCA, projector, VLM; one registry."""
from .registry import create_model, list_models, register_model
from .encoder import Encoder3D

__all__ = ["create_model", "list_models", "register_model", "Encoder3D"]
from .dcformer import DCFormer, DCFormerConfig, load_official_dcformer

__all__ += ["DCFormer", "DCFormerConfig", "load_official_dcformer"]
