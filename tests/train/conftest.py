"""Training tests need transformers, peft and PyYAML (the vlm and train extras)."""
import importlib.util

if any(importlib.util.find_spec(name) is None for name in ("transformers", "peft", "yaml")):
    collect_ignore_glob = ["test_*.py"]
