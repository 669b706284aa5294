"""Med3DVLM's models on Hugging Face transformers (the "vlm" extra): the SigLIP dual encoder,
the projectors, the vision-language model with any causal LM, its processor, the training stages,
and real pretrained parts that run offline. The configs register with ``AutoConfig`` and the
models with ``AutoModel`` / ``AutoModelForImageTextToText`` here, at import."""
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .clip import Med3DCLIPConfig, Med3DCLIPModel, Med3DCLIPOutput
from .modeling import Med3DVLMConfig, Med3DVLMForConditionalGeneration, add_image_token, load_official_med3dvlm
from .offline import offline_lm, offline_text_encoder
from .processing import Med3DVLMProcessor
from .projector import MixerProjector, MLPProjector, build_projector, load_official_projector
from .training_stages import merge_and_save, parameter_counts, set_trainable

AutoConfig.register(Med3DCLIPConfig.model_type, Med3DCLIPConfig, exist_ok=True)
AutoModel.register(Med3DCLIPConfig, Med3DCLIPModel, exist_ok=True)
AutoConfig.register(Med3DVLMConfig.model_type, Med3DVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(Med3DVLMConfig, Med3DVLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(Med3DVLMConfig, Med3DVLMProcessor, exist_ok=True)

__all__ = [
    "Med3DCLIPConfig", "Med3DCLIPModel", "Med3DCLIPOutput",
    "MixerProjector", "MLPProjector", "build_projector", "load_official_projector",
    "Med3DVLMConfig", "Med3DVLMForConditionalGeneration", "add_image_token", "load_official_med3dvlm",
    "Med3DVLMProcessor", "set_trainable", "parameter_counts", "merge_and_save",
    "offline_lm", "offline_text_encoder",
]
