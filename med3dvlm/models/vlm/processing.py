"""Med3DVLMProcessor: the language model's tokenizer with the image token + the VolumePreprocessor.

    text "<im_patch> Which organ is enlarged?"  (one image token per volume)
        -> chat template (when the LM has one; else the text as is, the released format)
        -> token ids, each image token expanded into image_seq_length placeholders
    volumes (paths, arrays, tensors) -> VolumePreprocessor -> pixel_values (N, 1, D, H, W)
    targets (answers, for training) -> appended with EOS; labels -100 on the prompt and padding

Released prompt formats (REFERENCE 5), without a chat template: caption "<im_patch>" + prompt,
VQA "<im_patch> " + question, closed VQA adds " Choices: A. ... B. ... C. ... D. ...", the answer
follows after a space. Batches pad on the left for generation and on the right with targets.
"""
from __future__ import annotations

import torch
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from ...data import VolumePreprocessor

__all__ = ["Med3DVLMProcessor", "ensure_image_token", "REPORT_PROMPTS"]

DEFAULT_IMAGE_TOKEN = "<im_patch>"  # the released checkpoints' placeholder token
# Report-generation prompts: training cycles through them, evaluation asks the first.
REPORT_PROMPTS = (
    "Write the radiology report for this CT scan.",
    "Describe the findings of this CT volume.",
    "What does this CT scan show? Give the findings and the impression.",
)


def ensure_image_token(tokenizer, image_token: str) -> int:
    """Add ``image_token`` to ``tokenizer`` as a special token (never split or merged) if it lacks
    it; returns the token's id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([image_token], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(image_token)


class Med3DVLMProcessor(ProcessorMixin):
    """Tokenizer + volume preprocessing for Med3DVLMForConditionalGeneration.

    Args:
        tokenizer: the language model's tokenizer. Gets ``image_token`` (if absent) and, without a
            pad token, its EOS as pad token (padding is masked out).
        volume_preprocessor: a ``med3dvlm.data.VolumePreprocessor`` (or its dict); default the
            "med3dvlm" preset (min-max, foreground crop, resize to 128 x 256 x 256).
        image_token: the placeholder text, one per volume in the prompts.
        image_seq_length: placeholders per image (the model config's ``image_seq_length``).
        use_chat_template: wrap prompts in the tokenizer's chat template as a user turn; default
            True when the tokenizer has one. False reproduces the released prompt format.
    """

    def __init__(self, tokenizer=None, volume_preprocessor: VolumePreprocessor | dict | None = None,
                 image_token: str = DEFAULT_IMAGE_TOKEN, image_seq_length: int = 256,
                 use_chat_template: bool | None = None, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        if isinstance(volume_preprocessor, dict):
            volume_preprocessor = VolumePreprocessor.from_dict(volume_preprocessor)
        self.volume_preprocessor = volume_preprocessor or VolumePreprocessor.from_preset("med3dvlm")
        self.image_token = image_token
        self.image_token_id = ensure_image_token(tokenizer, image_token)
        self.image_seq_length = image_seq_length
        self.use_chat_template = bool(tokenizer.chat_template) if use_chat_template is None else use_chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    # -- persistence: the volume preprocessor keeps its own preprocessor_config.json ---------
    def to_dict(self) -> dict:
        config = super().to_dict()
        config.pop("volume_preprocessor", None)
        return config

    def save_pretrained(self, save_directory, **kwargs):
        files = super().save_pretrained(save_directory, **kwargs)
        return files + [str(self.volume_preprocessor.save_pretrained(save_directory))]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "Med3DVLMProcessor":
        """From a folder written by ``save_pretrained`` (tokenizer, processor and preprocessor configs)."""
        # Set after loading: passed as a keyword it would also reach the tokenizer, which keeps its
        # keywords and then cannot write its config (a VolumePreprocessor is not JSON).
        volume_preprocessor = kwargs.pop("volume_preprocessor", None) or \
            VolumePreprocessor.from_pretrained(pretrained_model_name_or_path)
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor.volume_preprocessor = volume_preprocessor
        return processor

    # -- the call ------------------------------------------------------------------------------
    def __call__(self, text: str | list[str], volumes=None, targets: str | list[str] | None = None,
                 max_length: int | None = None, return_tensors: str = "pt",
                 pixel_values: torch.Tensor | None = None) -> BatchFeature:
        """Model inputs for a batch.

        Args:
            text: prompt(s), each with one ``image_token`` per volume it refers to.
            volumes: the volumes, in the order their image tokens appear across the batch (a
                single volume or a list; anything ``VolumePreprocessor`` takes).
            targets: answers to train on (one per prompt); adds ``labels``.
            max_length: truncate each sequence's target to this total length.
            return_tensors: "pt".
            pixel_values: instead of ``volumes``, volumes already preprocessed (N, 1, D, H, W), e.g.
                by a data set that ran this processor's ``volume_preprocessor`` (never twice).

        Returns:
            ``input_ids``, ``attention_mask`` (left-padded without targets, right-padded with),
            ``pixel_values`` (N, 1, D, H, W) float32 when volumes are given, ``labels`` with targets.
        """
        texts = [text] if isinstance(text, str) else list(text)
        if volumes is not None and pixel_values is not None:
            raise ValueError("pass volumes (to preprocess) or pixel_values (preprocessed), not both")
        if volumes is None:
            volumes = []
        elif not isinstance(volumes, (list, tuple)):
            volumes = [volumes]
        if pixel_values is not None and (pixel_values.dim() != 5 or pixel_values.shape[1] != 1):
            raise ValueError(f"pixel_values must be (N, 1, D, H, W); got {tuple(pixel_values.shape)}")
        count = len(volumes) if pixel_values is None else pixel_values.shape[0]
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else list(targets)
            if len(targets) != len(texts):
                raise ValueError(f"targets must have one answer per prompt ({len(texts)}); got {len(targets)}")

        prompts = [self.prompt_ids(t) for t in texts]
        found = sum(ids.count(self.image_token_id) for ids in prompts)
        if found != count:
            raise ValueError(f"the prompts hold {found} image token(s) {self.image_token!r} but {count} "
                             f"volume(s) were given; put one image token per volume in the text")
        prompts = [self.expand_image_tokens(ids) for ids in prompts]

        if targets is None:
            if max_length is not None:  # a prompt cut short would lose its question, or its image
                raise ValueError(f"max_length={max_length} truncates training sequences (with targets); prompts "
                                 f"for generation are not truncated: pass max_length only with targets")
            sequences, labels = prompts, None
        else:
            answers = [self.target_ids(t) for t in targets]
            sequences = [p + a for p, a in zip(prompts, answers)]
            labels = [[-100] * len(p) + a for p, a in zip(prompts, answers)]
            if max_length is not None:
                if any(len(p) >= max_length for p in prompts):
                    raise ValueError(f"max_length={max_length} leaves no room for a target after the prompt "
                                     f"(longest prompt: {max(map(len, prompts))} tokens with the image placeholders)")
                sequences = [s[:max_length] for s in sequences]
                labels = [lab[:max_length] for lab in labels]

        data = self.pad(sequences, labels, left=targets is None)
        if volumes:
            data["pixel_values"] = torch.stack([self.volume_preprocessor(v) for v in volumes])
        elif pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data=data, tensor_type=return_tensors)

    def report_prompt(self, index: int = 0) -> str:
        """A report-generation prompt (``REPORT_PROMPTS[index]`` in turn). As in the released
        formats, the image token comes directly before a caption prompt."""
        return self.image_token + REPORT_PROMPTS[index % len(REPORT_PROMPTS)]

    def question_prompt(self, question: str) -> str:
        """A VQA prompt: the image token, a space, the question (with its choices when closed)."""
        return f"{self.image_token} {question}"

    def prompt_ids(self, text: str) -> list[int]:
        """Token ids of one prompt: the chat template's user turn + generation prompt, or the text
        as the tokenizer encodes it (with its special tokens, e.g. a BOS)."""
        if self.use_chat_template:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                           add_generation_prompt=True, return_dict=False))
        return self.tokenizer(text).input_ids

    def target_ids(self, target: str) -> list[int]:
        """An answer's ids + EOS. Without a chat template the released format puts a space between
        prompt and answer; with one, the answer starts the assistant turn."""
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; targets need one to end the answer (set tokenizer.eos_token)")
        text = target if self.use_chat_template else " " + target
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]

    def expand_image_tokens(self, ids: list[int]) -> list[int]:
        """Each image token -> ``image_seq_length`` copies (one per projected image feature)."""
        out = []
        for token in ids:
            out.extend([token] * self.image_seq_length if token == self.image_token_id else [token])
        return out

    def pad(self, sequences: list[list[int]], labels: list[list[int]] | None, left: bool) -> dict:
        """Pad to the longest sequence with the pad token (labels with -100), on the left or right."""
        length = max(map(len, sequences))

        def padded(row: list[int], value: int) -> list[int]:
            fill = [value] * (length - len(row))
            return fill + row if left else row + fill

        data = {"input_ids": [padded(s, self.tokenizer.pad_token_id) for s in sequences],
                "attention_mask": [padded([1] * len(s), 0) for s in sequences]}
        if labels is not None:
            data["labels"] = [padded(lab, -100) for lab in labels]
        return data

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]
