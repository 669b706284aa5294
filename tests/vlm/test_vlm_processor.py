"""Med3DVLMProcessor: image-token expansion, labels, padding sides, prompt formats, errors, and
the save/load round trip next to a model."""
import pytest
import torch
from vlm_parts import IMAGE_SIZE, make_tokenizer, volumes

from med3dvlm.data import VolumePreprocessor
from med3dvlm.models import Med3DVLMProcessor

SEQ = 5


def processor(chat_template=False, **kwargs):
    return Med3DVLMProcessor(make_tokenizer(chat_template),
                             VolumePreprocessor.from_preset("med3dvlm", spatial_size=IMAGE_SIZE),
                             image_seq_length=SEQ, **kwargs)


def ids(proc, text):
    return proc.tokenizer(text, add_special_tokens=False).input_ids


def test_released_format_expands_the_image_token_and_masks_the_prompt():
    proc = processor()
    out = proc(["<im_patch> what is shown ?", "<im_patch> which organ ?"], volumes(2),
               targets=["the liver .", "heart"])
    image = proc.image_token_id
    question = ids(proc, "what is shown ?")
    answer = ids(proc, "the liver .") + [proc.tokenizer.eos_token_id]
    assert out.input_ids[0].tolist() == [image] * SEQ + question + answer
    assert out.labels[0].tolist() == [-100] * (SEQ + len(question)) + answer
    # the shorter pair is padded on the right (training), labels -100 there
    second = [image] * SEQ + ids(proc, "which organ ?") + ids(proc, "heart") + [proc.tokenizer.eos_token_id]
    pad = out.input_ids.shape[1] - len(second)
    assert out.input_ids[1].tolist() == second + [proc.tokenizer.pad_token_id] * pad
    assert out.attention_mask[1].tolist() == [1] * len(second) + [0] * pad
    assert out.labels[1, len(second):].tolist() == [-100] * pad
    assert out.pixel_values.shape == (2, 1, *IMAGE_SIZE) and out.pixel_values.dtype == torch.float32


def test_generation_batches_pad_on_the_left_without_labels():
    proc = processor()
    out = proc(["<im_patch> what is shown ?", "<im_patch> which organ is enlarged , left or right ?"], volumes(2))
    assert "labels" not in out
    short = SEQ + len(ids(proc, "what is shown ?"))
    pad = out.input_ids.shape[1] - short
    assert out.attention_mask[0].tolist() == [0] * pad + [1] * short
    assert out.input_ids[0, -1] == proc.tokenizer.convert_tokens_to_ids("?")


def test_chat_template_wraps_the_prompt_as_a_user_turn():
    proc = processor(chat_template=True)
    assert proc.use_chat_template
    out = proc("<im_patch> what is shown ?", volumes(1), targets="the liver .")
    expected_prompt = ids(proc, "user :") + [proc.image_token_id] * SEQ + ids(proc, "what is shown ? </s> assistant :")
    answer = ids(proc, "the liver .") + [proc.tokenizer.eos_token_id]
    assert out.input_ids[0].tolist() == expected_prompt + answer
    assert out.labels[0].tolist() == [-100] * len(expected_prompt) + answer
    assert not processor(chat_template=True, use_chat_template=False).use_chat_template


def test_count_mismatch_and_truncation():
    proc = processor()
    with pytest.raises(ValueError, match=r"prompts hold 1 image token\(s\) '<im_patch>' but 2 volume\(s\)"):
        proc("<im_patch> what is shown ?", volumes(2))
    with pytest.raises(ValueError, match="targets must have one answer per prompt"):
        proc(["<im_patch> what ?"], volumes(1), targets=["a", "b"])
    out = proc("<im_patch> what ?", volumes(1), targets="the liver is enlarged .", max_length=SEQ + 4)
    assert out.input_ids.shape[1] == SEQ + 4 and (out.labels[0, -2:] != -100).all()
    with pytest.raises(ValueError, match="max_length=6 leaves no room"):
        proc("<im_patch> what ?", volumes(1), targets="yes", max_length=6)


def test_a_tokenizer_without_pad_token_pads_with_eos():
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    proc = Med3DVLMProcessor(tokenizer, image_seq_length=SEQ)
    assert proc.tokenizer.pad_token == proc.tokenizer.eos_token
    assert proc.volume_preprocessor.spatial_size == (128, 256, 256)  # the "med3dvlm" preset by default


def test_save_and_load_round_trip(tmp_path):
    proc = processor(chat_template=True)
    proc.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "processor_config.json", "preprocessor_config.json"):
        assert (tmp_path / name).is_file(), name
    loaded = Med3DVLMProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == SEQ and loaded.use_chat_template and loaded.image_token == "<im_patch>"
    assert loaded.volume_preprocessor == proc.volume_preprocessor
    vols = volumes(1)
    a, b = proc("<im_patch> what ?", vols, targets="yes"), loaded("<im_patch> what ?", vols, targets="yes")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # a loaded processor saves again (the next training stage hands it on)
    loaded.save_pretrained(tmp_path / "again")
    assert Med3DVLMProcessor.from_pretrained(tmp_path / "again").volume_preprocessor == proc.volume_preprocessor


def test_preprocessed_pixel_values_pass_through_unchanged():
    """A data set that already ran the volume preprocessor hands its tensors over as they are
    (preprocessing them again would normalise the intensities twice)."""
    proc = processor()
    raw = volumes(2)
    done = torch.stack([proc.volume_preprocessor(v) for v in raw])
    direct = proc(["<im_patch> a ?", "<im_patch> b ?"], pixel_values=done, targets=["x", "y"])
    assert direct.pixel_values is done or torch.equal(direct.pixel_values, done)
    via_volumes = proc(["<im_patch> a ?", "<im_patch> b ?"], raw, targets=["x", "y"])
    assert torch.equal(direct.input_ids, via_volumes.input_ids) and torch.equal(direct.pixel_values, via_volumes.pixel_values)
    with pytest.raises(ValueError, match="2 image token.* but 1 volume"):
        proc(["<im_patch> a ?", "<im_patch> b ?"], pixel_values=done[:1])
    with pytest.raises(ValueError, match="not both"):
        proc(["<im_patch> a ?"], raw[:1], pixel_values=done[:1])
    with pytest.raises(ValueError, match=r"pixel_values must be \(N, 1, D, H, W\)"):
        proc(["<im_patch> a ?"], pixel_values=done[0])
    with pytest.raises(ValueError, match="pass max_length only with targets"):
        proc(["<im_patch> a ?"], pixel_values=done[:1], max_length=64)
