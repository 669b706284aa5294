"""One registry for every model: ``create_model(name, **options)`` and ``list_models()``."""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from functools import partial
from typing import Callable, Iterable

import torch.nn as nn

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...]]] = {}


def register_model(name: str, build: Callable[..., nn.Module] | None = None, *,
                   accepts: Iterable[str] | None = None):
    """Register ``build(**options) -> nn.Module`` under ``name``; usable as a decorator.

    ``accepts``: the option names ``create_model`` lets through (default: ``build``'s named
    parameters); any other option is refused by name before anything is built.
    """

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        names = accepts if accepts is not None else [
            p.name for p in inspect.signature(build).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        _REGISTRY[name] = (build, tuple(names))
        return build

    return add if build is None else add(build)


def register_variants(family: str, model_cls: type[nn.Module], variants: dict) -> None:
    """Register ``{family}_{variant}`` for each config in ``variants``; its options are the config's fields."""
    for variant, config in variants.items():
        register_model(f"{family}_{variant}", partial(model_cls, config),
                       accepts=[f.name for f in dataclasses.fields(config)])


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (e.g. "dcformer_*"), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: bool = False, **options) -> nn.Module:
    """Build the registered model ``name``; keyword ``options`` replace its config defaults
    (e.g. ``num_classes=18`` adds a pooled linear head to an encoder)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if pretrained:
        raise ValueError(
            f"no pretrained weights ship with this package (asked for {name!r}, pretrained=True). Build the "
            f"model and load a released DCFormer checkpoint with "
            f"med3dvlm.models.load_official_dcformer(state_dict, variant)")
    build, accepts = _REGISTRY[name]
    unknown = sorted(set(options) - set(accepts))
    if unknown:
        raise TypeError(f"{name} got unknown option(s) {unknown}; it accepts: {', '.join(accepts)}")
    return build(**options)
