"""Med3DVLM's stage 1: a SigLIP dual encoder between a 3D image encoder and a BERT-family text encoder.

    image: encoder's last stage map -> mean over voxels -> Linear -> L2-normalise
    text : text encoder's first-token feature ([CLS]; or the mean over tokens) -> Linear -> L2-normalise
    loss : the fused SigLIP loss, -(1/B) sum_ij log sigmoid(z_ij (exp(t') <x_i, y_j> + b))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from dcformer_kernels import SigLIPLoss

from .common import Med3DPreTrainedModel, init_with_text_config, pretrained_part, text_sub_config
from .vision import build_vision_tower, normalize_vision_config

__all__ = ["Med3DCLIPConfig", "Med3DCLIPModel", "Med3DCLIPOutput", "SIGLIP_INITS", "TEXT_POOLINGS"]

# (t', b) at initialisation: the paper's, and the released code's (which trains from CLIP's
# temperature 1/0.07 with no bias).
SIGLIP_INITS = {"paper": (math.log(10.0), -10.0), "released": (math.log(1 / 0.07), 0.0)}
TEXT_POOLINGS = ("cls", "mean")


class Med3DCLIPConfig(PretrainedConfig):
    """Configuration of a Med3DCLIPModel.

    Args:
        vision_config: the image encoder: ``{"name", "options", "image_size"}`` (see
            ``vision.normalize_vision_config``; default DCFormer-small at 128 x 256 x 256).
        text_config: the text encoder's config (any BERT-family ``AutoModel``; a dict with
            ``model_type`` or a PretrainedConfig; default ``BertConfig()``, BERT-base sizes).
        projection_dim: the shared embedding width (paper: 768).
        siglip_init: "paper" (t' = log 10, b = -10) or "released" (t' = log(1/0.07), b = 0).
        loss_dist_impl: the SigLIP loss across processes: None (one process), "gather" or "ring"
            (``dcformer_kernels.SigLIPLoss``'s ``dist_impl``).
        text_pooling: "cls" (the first token's feature, as the paper's BERT) or "mean" (the mean over
            the attended tokens, as sentence-transformers models such as all-MiniLM-L6-v2 are trained).
    """

    model_type = "med3d_clip"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, vision_config: dict | None = None, text_config=None, projection_dim: int = 768,
                 siglip_init: str = "paper", loss_dist_impl: str | None = None, text_pooling: str = "cls",
                 **kwargs) -> None:
        if siglip_init not in SIGLIP_INITS:
            raise ValueError(f"siglip_init must be one of {list(SIGLIP_INITS)}; got {siglip_init!r}")
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}; got {text_pooling!r}")
        self.text_pooling = text_pooling
        self.vision_config = normalize_vision_config(vision_config)
        self.text_config = text_sub_config(text_config, "bert", "text_config")
        self.projection_dim = projection_dim
        self.siglip_init = siglip_init
        self.loss_dist_impl = loss_dist_impl
        init_with_text_config(self, **kwargs)


@dataclass
class Med3DCLIPOutput(ModelOutput):
    """As Hugging Face's ``SiglipOutput``: logits_per_image[i, j] = exp(t') <image_i, text_j> + b."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class Med3DCLIPModel(Med3DPreTrainedModel):
    """SigLIP dual encoder: ``encode_image``, ``encode_text`` and ``forward(..., return_loss=True)``.

    ``text_tower``: an already built text encoder to use instead of a fresh one from
    ``config.text_config`` (``from_text_model`` passes a pretrained one).
    """

    config_class = Med3DCLIPConfig
    base_model_prefix = "med3d_clip"
    main_input_name = "pixel_values"

    def __init__(self, config: Med3DCLIPConfig, text_tower: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.text_tower = text_tower if text_tower is not None else AutoModel.from_config(config.text_config)
        self.visual_projection = nn.Linear(self.vision_tower.num_features, config.projection_dim)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim)
        init_scale, init_bias = SIGLIP_INITS[config.siglip_init]
        self.siglip = SigLIPLoss(init_scale, init_bias, dist_impl=config.loss_dist_impl)
        self.post_init()

    @classmethod
    def from_text_model(cls, text_model, vision_config: dict | None = None, **config_kwargs) -> "Med3DCLIPModel":
        """A dual encoder around a pretrained text encoder: a PreTrainedModel, or a name/folder for
        ``AutoModel.from_pretrained`` (``medicalai/ClinicalBERT``, or the offline
        ``offline_text_encoder()``'s model). The image side is built fresh from ``vision_config``."""
        text_model = pretrained_part(text_model, AutoModel)
        config = Med3DCLIPConfig(vision_config=vision_config, text_config=text_model.config, **config_kwargs)
        return cls(config, text_tower=text_model)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, D, H, W) volumes -> (B, projection_dim) embeddings (unit length if ``normalize``)."""
        pooled = self.vision_tower.forward_features(pixel_values).mean(dim=(2, 3, 4))
        embeds = self.visual_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True, **text_kwargs) -> torch.Tensor:
        """(B, L) token ids -> (B, projection_dim) embeddings from the first token's feature, or the
        mean over the attended tokens (``config.text_pooling``)."""
        hidden = self.text_tower(input_ids=input_ids, attention_mask=attention_mask, **text_kwargs).last_hidden_state
        if self.config.text_pooling == "mean":
            weights = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        else:
            pooled = hidden[:, 0]
        embeds = self.text_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_loss: bool = True,
                group_ids: torch.Tensor | None = None, **text_kwargs) -> Med3DCLIPOutput:
        """Embeddings of both sides, the pairwise logits, and (``return_loss``) the SigLIP loss.

        ``group_ids`` (B,): pairs with equal ids count as positives (several reports of one study).
        Under ``loss_dist_impl`` the logits are this process's batch; the loss spans all processes.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("Med3DCLIPModel.forward needs both input_ids and pixel_values; use encode_text / "
                             "encode_image for one side")
        image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask, **text_kwargs)
        logits_per_text = text_embeds @ image_embeds.T * self.siglip.logit_scale.exp() + self.siglip.logit_bias
        loss = self.siglip(image_embeds, text_embeds, group_ids) if return_loss else None
        return Med3DCLIPOutput(loss=loss, logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                               text_embeds=text_embeds, image_embeds=image_embeds)
