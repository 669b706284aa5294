"""Training stages: trainable-parameter counts per stage (worked out by hand from the tiny
config), and merge_and_save to a plain checkpoint that reproduces the LoRA model."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoProcessor
from vlm_parts import make_vlm, volumes

from med3dvlm.models import Med3DVLMForConditionalGeneration
from med3dvlm.models.vlm import parameter_counts, set_trainable
from med3dvlm.models.vlm.training_stages import lora_target_modules

PROMPTS = ["<im_patch> what is shown ?", "<im_patch> which organ is enlarged ?"]


def numel(module):
    return sum(p.numel() for p in module.parameters())


def test_projector_stage_trains_projector_and_input_embeddings(capsys):
    model, processor = make_vlm(tie=False)
    trained = set_trainable(model, "projector")
    assert trained is model
    expected = numel(model.multi_modal_projector) + model.get_input_embeddings().weight.numel()
    counts = parameter_counts(model)
    assert counts == {"trainable": expected, "total": numel(model)}
    assert f"{expected:,} trainable of {numel(model):,}" in capsys.readouterr().out
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not model.get_output_embeddings().weight.requires_grad
    # the frozen tower stays in eval mode when training starts: its BatchNorm statistics hold still
    model.train()
    assert model.multi_modal_projector.training and not model.vision_tower.training
    stats = {n: b.clone() for n, b in model.vision_tower.named_buffers()}
    model(**processor(PROMPTS, volumes(2), targets=["the liver .", "left ."]))
    assert all(torch.equal(b, stats[n]) for n, b in model.vision_tower.named_buffers())


def test_finetune_stage_counts_lora_plus_the_fully_trained_parts():
    model, _ = make_vlm(tie=False)
    # Tiny Llama: hidden 32, intermediate 48, 4 heads of 8, 2 KV heads -> k/v out 16. Per layer LoRA
    # adds r * (in + out) for q (32->32), k, v (32->16), o (32->32), gate, up (32->48), down (48->32).
    r = 16
    per_layer = r * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 48) + (48 + 32))
    assert len(lora_target_modules(model)) == 2 * 7
    full = (numel(model.vision_tower) + numel(model.multi_modal_projector)
            + model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel())
    peft_model = set_trainable(model, "finetune")
    assert isinstance(peft_model, PeftModel)
    counts = parameter_counts(peft_model)
    assert counts["trainable"] == 2 * per_layer + full
    assert counts["total"] == numel(model)  # the base model now holds the LoRA weights too
    frozen = peft_model.get_base_model().language_model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not frozen.requires_grad
    peft_config = peft_model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (16, 32, 0.05)
    with pytest.raises(ValueError, match="stage must be one of"):
        set_trainable(model, "pretrain")


def test_merge_and_save_gives_a_plain_checkpoint_with_the_same_outputs(tmp_path):
    from med3dvlm.models.vlm import merge_and_save

    model, processor = make_vlm()
    peft_model = set_trainable(model, "finetune", lora_dropout=0.0)
    inputs = processor(PROMPTS, volumes(2), targets=["the liver .", "left ."])
    peft_model.train()
    peft_model.get_base_model().vision_tower.eval()  # keep BatchNorm statistics fixed for the comparison
    loss = peft_model(**inputs).loss
    loss.backward()
    with torch.no_grad():  # one step that moves the LoRA B matrices off zero
        for p in peft_model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 0.5 * p.grad
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(**inputs).logits
    merged = merge_and_save(peft_model, tmp_path, processor)
    assert not isinstance(merged, PeftModel)
    assert (tmp_path / "preprocessor_config.json").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert type(AutoProcessor.from_pretrained(tmp_path)) is type(processor)
    loaded = Med3DVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        after = loaded(**inputs).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        untouched = make_vlm()[0](**inputs).logits
    assert (untouched - after).abs().max() > 1e-3  # the step changed the model
