"""Med3DVLM: a 3D image encoder, a projector and any Hugging Face causal language model
(transformers' LLaVA conventions).

    pixel_values (B, 1, D, H, W) -> vision tower -> stage maps picked by vision_feature_layers
        -> tokens -> projector -> (B, image_seq_length, H)
    input_ids with image_seq_length placeholders (image_token_id) per image
        -> input embeddings; the placeholders' rows are replaced by the image features (by mask)
        -> language model -> logits, loss on the labels (never on image positions)

Splicing by mask, not at fixed positions: the released code wrote the features over positions
1..256, right for LLaMA's leading BOS but one token off for Qwen (no BOS), which lost the first
question token.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from ..encoders import load_official_dcformer
from .common import Med3DPreTrainedModel, init_with_text_config, pretrained_part, text_sub_config
from .processing import DEFAULT_IMAGE_TOKEN, ensure_image_token
from .projector import PROJECTOR_TYPES, build_projector, load_official_projector
from .vision import build_vision_tower, normalize_vision_config

__all__ = ["Med3DVLMConfig", "Med3DVLMForConditionalGeneration", "load_official_med3dvlm", "add_image_token"]

DEFAULT_FEATURE_LAYERS = {"mixer": (-2, -1), "mlp": (-1,)}  # encoder stages each projector reads


class Med3DVLMConfig(PretrainedConfig):
    """Configuration of a Med3DVLMForConditionalGeneration.

    Args:
        vision_config: the image encoder, ``{"name", "options", "image_size"}`` (default
            DCFormer-small on 128 x 256 x 256 volumes); ``image_size`` fixes the token counts.
        text_config: the causal language model's config (a PretrainedConfig or a dict with
            ``model_type``; default ``LlamaConfig()``, as LLaVA's).
        projector_type: "mixer" (Med3DVLM's dual-stream MLP-Mixer) or "mlp" (M3D-style baseline).
        projector_config: keyword options of the projector class (e.g. ``low_token_sizes``,
            ``high_token_sizes``, ``channel_sizes`` for the mixer; ``pooled_grid`` for the MLP).
        vision_feature_layers: the encoder stages the projector reads (negative counts from the
            last): two for the mixer (default the last two: low, high), one for the MLP projector
            (default the last).
        image_token_id: the placeholder token's id in the language model's vocabulary.
        image_seq_length: placeholders per image = the projector's output tokens (paper: 256);
            None: filled in from the projector when the model is built.
    """

    model_type = "med3dvlm"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, vision_config: dict | None = None, text_config=None, projector_type: str = "mixer",
                 projector_config: dict | None = None, vision_feature_layers=None,
                 image_token_id: int | None = None, image_seq_length: int | None = None, **kwargs) -> None:
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}; got {projector_type!r}")
        self.vision_config = normalize_vision_config(vision_config)
        self.text_config = text_sub_config(text_config, "llama", "text_config")
        self.projector_type = projector_type
        self.projector_config = dict(projector_config or {})
        self.vision_feature_layers = list(DEFAULT_FEATURE_LAYERS[projector_type] if vision_feature_layers is None
                                          else vision_feature_layers)
        self.image_token_id = image_token_id
        self.image_seq_length = image_seq_length
        init_with_text_config(self, **kwargs)


class Med3DVLMForConditionalGeneration(Med3DPreTrainedModel, GenerationMixin):
    """The vision-language model. ``language_model``: an already built causal LM to use instead of
    a fresh one from ``config.text_config`` (``from_language_model`` passes a pretrained one)."""

    config_class = Med3DVLMConfig
    main_input_name = "input_ids"
    input_modalities = ("image", "text")

    def __init__(self, config: Med3DVLMConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision_config)
        self.language_model = language_model if language_model is not None else \
            AutoModelForCausalLM.from_config(config.text_config)
        self.multi_modal_projector = build_projector(
            config.projector_type, self.vision_tower, config.vision_config["image_size"],
            config.vision_feature_layers, config.text_config.hidden_size, **config.projector_config)
        # FSDP wraps the language model's decoder layers (its own no-split list) when no class is named
        self._no_split_modules = list(getattr(self.language_model, "_no_split_modules", None) or [])
        emitted = self.multi_modal_projector.num_tokens
        if config.image_seq_length is None:
            config.image_seq_length = emitted
        elif config.image_seq_length != emitted:
            raise ValueError(f"image_seq_length={config.image_seq_length} but the projector emits {emitted} tokens "
                             f"per image; set image_seq_length to that (or None)")
        self.post_init()

    @classmethod
    def from_language_model(cls, language_model, tokenizer, vision_config: dict | None = None,
                            image_token: str = DEFAULT_IMAGE_TOKEN,
                            **config_kwargs) -> "Med3DVLMForConditionalGeneration":
        """A VLM around a pretrained causal LM, with a fresh vision tower and projector.

        ``language_model``: a PreTrainedModel, or a name/folder for ``AutoModelForCausalLM``
        (``Qwen/Qwen2.5-7B-Instruct``; loaded with flash-attn if installed, else SDPA).
        ``tokenizer``: the LM's tokenizer; ``image_token`` is added to it if absent (see
        ``add_image_token``). Load stage-1 weights into ``model.vision_tower`` afterwards.
        """
        language_model = pretrained_part(language_model, AutoModelForCausalLM)
        image_token_id = add_image_token(language_model, tokenizer, image_token)
        config = Med3DVLMConfig(vision_config=vision_config, text_config=language_model.config,
                                image_token_id=image_token_id, **config_kwargs)
        model = cls(config, language_model=language_model)
        model.generation_config = copy.deepcopy(language_model.generation_config)
        # A placeholder is never an answer: generating one would need an image to fill it.
        model.generation_config.suppress_tokens = sorted(
            set(model.generation_config.suppress_tokens or []) | {image_token_id})
        return model

    def train(self, mode: bool = True):
        """As nn.Module.train, except that a vision tower with nothing to learn (stage 2 freezes it)
        stays in eval mode: its BatchNorms keep the running statistics stage 1 left, rather than
        drifting with every batch of a stage that is not training them."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.vision_tower.parameters()):
            self.vision_tower.eval()
        return self

    # -- embeddings, as Hugging Face's composite models expose them -------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # -- image features and the splice -----------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) volumes -> (B, image_seq_length, hidden) projected image features."""
        param = next(self.vision_tower.parameters())
        maps = self.vision_tower.forward_intermediates(pixel_values.to(param.dtype),
                                                       indices=self.config.vision_feature_layers)
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]  # (B, D'*H'*W', C), D', H', W' order
        return self.multi_modal_projector(*tokens)

    def get_placeholder_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: where the image placeholders are (from the ids, else from the embeddings)."""
        token_id = self.config.image_token_id
        if token_id is None:
            raise ValueError("config.image_token_id is not set; build the model with from_language_model or set it "
                             "to the tokenizer's id of the image token")
        if input_ids is not None:
            return input_ids == token_id
        placeholder = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == placeholder).all(-1)

    def splice_image_features(self, inputs_embeds: torch.Tensor, mask: torch.Tensor,
                              image_features: torch.Tensor) -> torch.Tensor:
        """The placeholder rows of ``inputs_embeds`` replaced by the image features, image by image
        in batch order. Each sample must hold whole images' worth of placeholders."""
        per_row = mask.sum(dim=1)
        seq = self.config.image_seq_length
        if int(per_row.sum()) != image_features.shape[0] * image_features.shape[1] or bool((per_row % seq).any()):
            raise ValueError(
                f"image placeholders and image features do not match: input_ids hold {per_row.tolist()} "
                f"placeholders per sample (token id {self.config.image_token_id}), but {image_features.shape[0]} "
                f"image(s) give {seq} features each. Each image needs exactly {seq} placeholders "
                f"(Med3DVLMProcessor expands one image token into that many)")
        features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **lm_kwargs):
        """The language model's output (loss, logits, cache) on the spliced embeddings.

        Labels at image placeholders are ignored (-100) whatever the caller passed. Other keyword
        arguments (the cache, ``use_cache`` ...) go to the language model unchanged.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        mask = None
        if pixel_values is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds)
            inputs_embeds = self.splice_image_features(inputs_embeds, mask, self.get_image_features(pixel_values))
        elif input_ids is not None and self.config.image_token_id is not None:
            count = int((input_ids == self.config.image_token_id).sum())
            if count:
                raise ValueError(f"input_ids hold {count} image placeholders but no pixel_values were given")
        if labels is not None and mask is not None:
            labels = labels.masked_fill(mask, -100)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, logits_to_keep=logits_to_keep,
                                   **lm_kwargs)


def add_image_token(language_model: PreTrainedModel, tokenizer, image_token: str = DEFAULT_IMAGE_TOKEN) -> int:
    """Give ``tokenizer`` the image placeholder token and ``language_model`` an embedding row for
    it; returns its id. A token the tokenizer already has (a released checkpoint's) is left as it
    is. A new one's input (and untied output) embedding starts as the mean of the existing rows,
    as in the released code; the vocabulary grows only if the id falls outside it."""
    had_token = image_token in tokenizer.get_vocab()
    token_id = ensure_image_token(tokenizer, image_token)
    if had_token:
        return token_id
    old_rows = language_model.get_input_embeddings().weight.shape[0]
    if token_id >= old_rows:
        language_model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    tables = [language_model.get_input_embeddings().weight]
    head = language_model.get_output_embeddings()
    if head is not None and head.weight is not tables[0]:  # untied LM head
        tables.append(head.weight)
    with torch.no_grad():
        for rows in tables:
            rows[token_id] = torch.cat([rows[:token_id], rows[token_id + 1: old_rows]]).mean(dim=0)
    return token_id


def load_official_med3dvlm(state_dict: dict, language_model, tokenizer, variant: str = "small",
                           image_size=(128, 256, 256), image_token: str = DEFAULT_IMAGE_TOKEN,
                           vision_options: dict | None = None) -> Med3DVLMForConditionalGeneration:
    """Our VLM holding a released Med3DVLM checkpoint's vision tower (DCFormer-``variant``) and
    projector, both mapped strictly from ``state_dict`` (the released model's, any prefix), around
    ``language_model`` (the released LM part as a Hugging Face model, or its name/folder).
    ``vision_options``: DCFormer options that do not change the weights (e.g. ``backend``)."""
    vision_options = dict(vision_options or {})
    tower = load_official_dcformer(state_dict, variant, **vision_options)
    projector = load_official_projector(state_dict)
    language_model = pretrained_part(language_model, AutoModelForCausalLM)
    if language_model.config.hidden_size != projector.output_dim:
        raise ValueError(f"the released projector emits width {projector.output_dim}; the language model's hidden "
                         f"size is {language_model.config.hidden_size}")
    projector_config = {"low_token_sizes": list(projector.low_token_sizes),
                        "high_token_sizes": list(projector.high_token_sizes),
                        "channel_sizes": list(projector.channel_sizes)}
    model = Med3DVLMForConditionalGeneration.from_language_model(
        language_model, tokenizer, vision_config={"name": f"dcformer_{variant}", "options": vision_options,
                                                 "image_size": list(image_size)},
        image_token=image_token, projector_type="mixer", projector_config=projector_config)
    model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    model.multi_modal_projector.load_state_dict(projector.state_dict(), strict=True)
    return model
