"""The vision-language model on tiny random parts: the splice, labels, errors, backward,
generation (batched with left padding = per sample), save/load, and the official loader."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText
from vlm_parts import (IMAGE_SIZE, TINY_IMAGE_SEQ, TINY_VISION, OfficialProjector, make_lm, make_tokenizer, make_vlm,
                       volumes)

from med3dvlm.models import Med3DVLMConfig, Med3DVLMForConditionalGeneration, create_model, load_official_dcformer
from med3dvlm.models.vlm import load_official_med3dvlm

DCFORMER_KEYS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "dcformer_official_state_dict_keys.json"
PROMPTS = ["<im_patch> what is shown ?", "<im_patch> which organ is enlarged , left or right ?"]


def test_features_replace_exactly_the_placeholders():
    model, processor = make_vlm()
    inputs = processor(PROMPTS, volumes(2))
    mask = inputs.input_ids == model.config.image_token_id
    assert mask.sum(dim=1).tolist() == [TINY_IMAGE_SEQ] * 2
    captured = {}
    model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        features = model.get_image_features(inputs.pixel_values)
        text = model.get_input_embeddings()(inputs.input_ids)
    assert features.shape == (2, TINY_IMAGE_SEQ, 32)
    torch.testing.assert_close(captured["embeds"][mask], features.reshape(-1, 32), rtol=0, atol=0)
    torch.testing.assert_close(captured["embeds"][~mask], text[~mask], rtol=0, atol=0)


def test_the_first_question_token_reaches_the_model():
    # The released code wrote the features over positions 1..256: with no BOS (Qwen, and this
    # tokenizer) that overwrote the first question token, so these two prompts looked alike.
    model, processor = make_vlm()
    vols = volumes(1)
    with torch.no_grad():
        a = model(**processor("<im_patch> liver is enlarged ?", vols)).logits[0, -1]
        b = model(**processor("<im_patch> lung is enlarged ?", vols)).logits[0, -1]
    assert (a - b).abs().max() > 1e-3


def test_labels_are_ignored_at_image_positions_and_training_reaches_every_part():
    model, processor = make_vlm()
    model.train()
    inputs = processor(PROMPTS, volumes(2), targets=["the liver .", "left ."])
    assert (inputs.labels[inputs.input_ids == model.config.image_token_id] == -100).all()
    prompt_rows = inputs.labels[0][: (inputs.labels[0] != -100).nonzero()[0]]
    assert (prompt_rows == -100).all()
    loss = model(**inputs).loss
    loss.backward()
    for part in (model.vision_tower, model.multi_modal_projector, model.language_model):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad), type(part).__name__
    # Labels naming real tokens at image positions give the same loss: they are ignored.
    leaky = inputs.labels.clone()
    leaky[inputs.input_ids == model.config.image_token_id] = 5
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**{**inputs, "labels": leaky}).loss, model(**inputs).loss)


def test_placeholder_count_mismatch_raises_a_clear_error():
    model, processor = make_vlm()
    inputs = processor(PROMPTS, volumes(2))
    ids = inputs.input_ids.clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 5  # one placeholder fewer
    with pytest.raises(ValueError, match=r"input_ids hold \[8, 9\] placeholders .* 2 image\(s\) give 9 features"):
        model(input_ids=ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values)
    with pytest.raises(ValueError, match="hold 18 image placeholders but no pixel_values"):
        model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)


def test_inputs_embeds_find_the_placeholders_by_their_embedding():
    model, processor = make_vlm()
    inputs = processor(PROMPTS, volumes(2))
    with torch.no_grad():
        by_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs.input_ids)
        by_embeds = model(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                          pixel_values=inputs.pixel_values).logits
    torch.testing.assert_close(by_embeds, by_ids)


def test_batched_generation_with_left_padding_equals_per_sample():
    model, processor = make_vlm(seed=3)
    vols = volumes(2)
    batch = processor(PROMPTS, vols)
    assert batch.attention_mask[0, 0] == 0  # the shorter prompt is padded on the left
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
        alone = [model.generate(**processor([p], [v]), max_new_tokens=6, do_sample=False)[0, -6:]
                 for p, v in zip(PROMPTS, vols)]
    assert not torch.equal(alone[0], alone[1])  # the check means something only if answers differ
    for row, expected in zip(together, alone):
        assert row.tolist() == expected.tolist()
    assert model.config.image_token_id not in together  # a placeholder is never generated


def test_save_and_load_give_identical_logits(tmp_path):
    model, processor = make_vlm(tie=False)
    inputs = processor(PROMPTS, volumes(2))
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "med3dvlm" and config["image_token_id"] == model.config.image_token_id
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is Med3DVLMForConditionalGeneration
    assert loaded.generation_config.suppress_tokens == [model.config.image_token_id]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, before, rtol=0, atol=0)


def test_new_image_token_embedding_is_the_mean_and_an_existing_one_is_kept():
    tokenizer = make_tokenizer()
    lm = make_lm(len(tokenizer), tie=False)
    old_in = lm.get_input_embeddings().weight.detach().clone()
    old_out = lm.get_output_embeddings().weight.detach().clone()
    model = Med3DVLMForConditionalGeneration.from_language_model(lm, tokenizer, vision_config=TINY_VISION,
                                                                 projector_config={"low_token_sizes": [4],
                                                                                   "high_token_sizes": [5]},
                                                                 image_seq_length=9)
    token = model.config.image_token_id
    assert token == len(old_in) and model.config.text_config.vocab_size == len(old_in) + 1
    torch.testing.assert_close(model.get_input_embeddings().weight[token], old_in.mean(0))
    torch.testing.assert_close(model.get_output_embeddings().weight[token], old_out.mean(0))
    # Building again on the same tokenizer (a checkpoint that has the token) changes nothing.
    again = Med3DVLMForConditionalGeneration.from_language_model(
        model.language_model, tokenizer, vision_config=TINY_VISION,
        projector_config={"low_token_sizes": [4], "high_token_sizes": [5]}, image_seq_length=9)
    assert again.config.image_token_id == token and again.config.text_config.vocab_size == len(old_in) + 1


def test_image_seq_length_comes_from_the_projector_and_config_errors_name_the_argument():
    assert make_vlm(image_seq_length=None)[0].config.image_seq_length == TINY_IMAGE_SEQ
    assert Med3DVLMConfig(projector_type="mlp").vision_feature_layers == [-1]
    with pytest.raises(ValueError, match="image_seq_length=256 but the projector emits 9 tokens"):
        make_vlm(image_seq_length=256)
    with pytest.raises(ValueError, match="projector_type must be one of"):
        Med3DVLMConfig(projector_type="qformer")
    with pytest.raises(ValueError, match=r"vision_config\['name'\] must be a registered encoder"):
        Med3DVLMConfig(vision_config={"name": "resnet50"})


def test_mlp_projector_variant_and_gradient_checkpointing():
    model, processor = make_vlm(projector_type="mlp", vision_feature_layers=[-3],
                                projector_config={"pooled_grid": [1, 2, 2]}, image_seq_length=4)
    inputs = processor(PROMPTS, volumes(2), targets=["the liver .", "left ."])
    reference = model(**inputs).loss
    reference.backward()
    grads = [p.grad.clone() for p in model.multi_modal_projector.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.vision_tower.grad_checkpointing
    model.train()  # checkpointing acts in training mode; BatchNorm in eval keeps the numbers comparable
    model.vision_tower.eval()
    loss = model(**inputs).loss
    loss.backward()
    torch.testing.assert_close(loss, reference)
    for g, expected in zip((p.grad for p in model.multi_modal_projector.parameters()), grads):
        torch.testing.assert_close(g, expected)


def test_bfloat16_forward():
    model, processor = make_vlm()
    model.to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**processor(PROMPTS, volumes(2))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_official_checkpoint_loads_vision_tower_and_projector():
    if not DCFORMER_KEYS.is_file():
        pytest.skip("../shared/reference is absent")
    torch.manual_seed(0)
    keys = json.loads(DCFORMER_KEYS.read_text())["nano"]["keys"]
    state = {f"model.vision_tower.vision_tower.encoder.{k}": torch.randn(shape) if shape else torch.tensor(3)
             for k, shape in keys.items()}
    for k in [k for k in state if k.endswith("running_var")]:
        state[k] = state[k].abs() + 0.5
    # nano at 32 x 64 x 64: low stage 1x2x2 = 4 tokens x 128, high 1 token x 256; H = 32 (the tiny LM).
    official = OfficialProjector((4, 128), (1, 256), (6, 4), (3, 5), (16, 32))
    state.update({f"model.mm_projector.{k}": v for k, v in official.state_dict().items()})
    state["lm_head.weight"] = torch.zeros(2, 2)  # the LM part loads as a Hugging Face model instead

    tokenizer = make_tokenizer()
    torch_path = {"backend": "torch"}
    model = load_official_med3dvlm(state, make_lm(len(tokenizer)), tokenizer, variant="nano",
                                   image_size=IMAGE_SIZE, vision_options=torch_path).eval()
    tower = load_official_dcformer(state, "nano", **torch_path).eval()
    x = torch.rand(2, 1, *IMAGE_SIZE)
    with torch.no_grad():
        low, high = (m.flatten(2).transpose(1, 2) for m in tower.forward_intermediates(x, indices=[-2, -1]))
        torch.testing.assert_close(model.get_image_features(x), official(low, high))
    assert model.config.image_seq_length == 9
    with pytest.raises(ValueError, match="released projector emits width 32; the language model's hidden size is 48"):
        bigger = make_lm(len(tokenizer))
        bigger.config.hidden_size = 48
        load_official_med3dvlm(state, bigger, tokenizer, variant="nano", image_size=IMAGE_SIZE,
                               vision_options=torch_path)


def test_vision_tower_is_any_registry_encoder():
    model, processor = make_vlm(vision_config={"name": "convnext3d_nano", "image_size": list(IMAGE_SIZE)},
                                projector_config={"low_token_sizes": [4], "high_token_sizes": [5]})
    assert type(model.vision_tower) is type(create_model("convnext3d_nano"))
    with torch.no_grad():
        assert model(**processor(PROMPTS, volumes(2))).logits.shape[0] == 2


def test_the_language_models_attention_implementation_is_kept():
    # transformers hands a composite config's sub-configs the parent's attention implementation,
    # None unless given: a pretrained LM loaded with flash-attn would silently lose it.
    tokenizer = make_tokenizer()
    lm = make_lm(len(tokenizer))
    lm.set_attn_implementation("eager")
    model = Med3DVLMForConditionalGeneration.from_language_model(
        lm, tokenizer, vision_config=TINY_VISION, projector_config={"low_token_sizes": [4], "high_token_sizes": [5]},
        image_seq_length=9)
    assert model.language_model.config._attn_implementation == "eager"
    assert Med3DVLMConfig(text_config=lm.config, attn_implementation="sdpa").text_config._attn_implementation == "sdpa"
