"""The SigLIP dual encoder on tiny towers: embeddings, logits, the loss against the formula,
the two initialisations, backward, and the save/load round trip."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel
from vlm_parts import IMAGE_SIZE, TINY_VISION, make_tokenizer, needs_offline_text, tiny_bert_config

from med3dvlm.models import Med3DCLIPConfig, Med3DCLIPModel


def tiny_clip(**kwargs) -> Med3DCLIPModel:
    torch.manual_seed(0)
    config = Med3DCLIPConfig(vision_config=TINY_VISION, text_config=tiny_bert_config(), projection_dim=16, **kwargs)
    return Med3DCLIPModel(config).eval()


def batch(size=3):
    tokenizer = make_tokenizer()
    text = tokenizer(["the liver is enlarged", "no lesion", "a mass in the left lung"][:size], padding=True,
                     return_tensors="pt")
    torch.manual_seed(1)
    return {"pixel_values": torch.rand(size, 1, *IMAGE_SIZE), "input_ids": text.input_ids,
            "attention_mask": text.attention_mask}


def reference_siglip(image, text, t_prime, bias):
    """REFERENCE 4: -(1/B) sum_ij log sigmoid(z_ij (exp(t') <x_i, y_j> + b)), z = +1 on the diagonal."""
    logits = math.exp(t_prime) * image @ text.T + bias
    z = 2 * torch.eye(len(image)) - 1
    return -F.logsigmoid(z * logits).sum() / len(image)


def test_loss_equals_the_siglip_formula_on_the_embeddings():
    model = tiny_clip()
    out = model(**batch())
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(3))
    expected = reference_siglip(out.image_embeds.double(), out.text_embeds.double(), math.log(10), -10.0)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits_per_image, out.logits_per_text.T)
    torch.testing.assert_close(out.logits_per_image, 10 * out.image_embeds @ out.text_embeds.T - 10)


def test_released_initialisation_and_the_distributed_loss_option():
    model = tiny_clip(siglip_init="released", loss_dist_impl="ring")
    assert model.siglip.dist_impl == "ring"
    assert model.siglip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.siglip.logit_bias.item() == 0.0
    with pytest.raises(ValueError, match="siglip_init must be one of"):
        Med3DCLIPConfig(siglip_init="clip")


def test_text_pooling_first_token_or_mean_over_attended_tokens():
    inputs = batch()
    cls_model, mean_model = tiny_clip(), tiny_clip(text_pooling="mean")
    hidden = cls_model.text_tower(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)  # padding (the shorter texts) left out
    with torch.no_grad():
        expected_mean = F.normalize(mean_model.text_projection(mean), dim=-1)
        expected_cls = F.normalize(cls_model.text_projection(hidden[:, 0]), dim=-1)
        torch.testing.assert_close(mean_model.encode_text(inputs["input_ids"], inputs["attention_mask"]), expected_mean)
        torch.testing.assert_close(cls_model.encode_text(inputs["input_ids"], inputs["attention_mask"]), expected_cls)
    assert not torch.allclose(expected_mean, expected_cls)
    with pytest.raises(ValueError, match="text_pooling must be one of"):
        tiny_clip(text_pooling="max")


def test_encoders_match_forward_and_backward_reaches_both_towers():
    model = tiny_clip().train()
    inputs = batch()
    out = model(**inputs)
    out.loss.backward()
    for name in ("vision_tower", "text_tower", "visual_projection", "text_projection", "siglip"):
        # every parameter but the text tower's pooler, which first-token features do not use
        params = [(n, p) for n, p in getattr(model, name).named_parameters() if "pooler" not in n]
        assert params and all(p.grad is not None for _, p in params), \
            (name, [n for n, p in params if p.grad is None])
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
        torch.testing.assert_close(model.encode_image(inputs["pixel_values"]), out.image_embeds)
        torch.testing.assert_close(model.encode_text(inputs["input_ids"], inputs["attention_mask"]), out.text_embeds)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = tiny_clip()
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "med3d_clip" and config["text_config"]["model_type"] == "bert"
    assert AutoConfig.from_pretrained(tmp_path).text_config.hidden_size == 24
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is Med3DCLIPModel
    with torch.no_grad():
        after = loaded(**inputs)
    torch.testing.assert_close(after.logits_per_image, before.logits_per_image, rtol=0, atol=0)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)


@needs_offline_text
def test_offline_text_encoder_is_the_real_minilm():
    from med3dvlm.models import offline_text_encoder

    text_model, tokenizer = offline_text_encoder()
    assert sum(p.numel() for p in text_model.parameters()) == 22_713_216
    model = Med3DCLIPModel.from_text_model(text_model, vision_config=TINY_VISION, projection_dim=16).eval()
    assert model.config.text_config.hidden_size == 384
    tokens = tokenizer(["a liver lesion", "a normal liver", "lung"], padding=True, return_tensors="pt")
    with torch.no_grad():
        features = text_model(**tokens).last_hidden_state[:, 0]
    # Real sentence features: related sentences are closer than unrelated ones.
    sim = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    assert sim[0, 1] > sim[0, 2]
    assert model.encode_text(tokens.input_ids, tokens.attention_mask).shape == (3, 16)
