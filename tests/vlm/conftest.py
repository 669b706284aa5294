"""Fixtures for the vision-language model tests: a copy of the real offline LM (``smollm``, loaded
once per session, is in tests/conftest.py). Tiny random parts for unit tests are in vlm_parts.py."""
import copy
import importlib.util

import pytest

# Without the "vlm" extra there is nothing here to test.
if any(importlib.util.find_spec(name) is None for name in ("transformers", "peft")):
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture
def smollm_copy(smollm):
    model, tokenizer = smollm
    return copy.deepcopy(model), copy.deepcopy(tokenizer)
