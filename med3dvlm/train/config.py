"""Typed, validated run configs: YAML files plus ``key=value`` overrides, checked before any compute.

A config is a tree of dataclasses. ``load_config(cls, path, overrides)`` reads the YAML file, applies
each ``section.key=value`` override (the value parsed as YAML: ``5e-5``, ``true``, ``[1, 2]``), and
refuses, by its dotted name, any unknown key, any value of the wrong type and any missing required
value. ``config_to_dict`` writes the resolved config back (each run saves the one it ran).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "MISSING", "load_config", "config_from_dict", "config_to_dict", "parse_overrides"]

MISSING = "???"  # a required value the YAML file must give (OmegaConf's spelling)


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["training.learning_rate=5e-5", ...]`` -> a nested dict; each value parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides are key=value (e.g. training.learning_rate=5e-5); got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is set to a value and cannot hold keys")
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _check_value(value: Any, hint: Any, name: str) -> Any:
    """``value`` converted to ``hint`` where that loses nothing (int -> float, list -> tuple), else a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_value(value, option, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list; got {type(value).__name__} {value!r}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        items = [_check_value(v, args[0], f"{name}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping; got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a section (a mapping); got {type(value).__name__} {value!r}")
        return config_from_dict(hint, value, prefix=f"{name}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool) \
            or not isinstance(value, hint):
        raise ConfigError(f"{name} must be {hint.__name__}; got {type(value).__name__} {value!r}")
    return value


def config_from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from ``data``; unknown keys, wrong types and values left
    at ``MISSING`` raise a ConfigError naming the dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"section {prefix[:-1]!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; {section} accepts: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _check_value(data[name], hints[name], prefix + name)
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = config_from_dict(hints[name], {}, prefix=f"{prefix}{name}.")
        if values.get(name, field.default) == MISSING:
            raise ConfigError(f"{prefix + name} is required (the config leaves it at {MISSING!r})")
    return cls(**values)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Any:
    """``cls`` from the YAML file at ``path`` (or its defaults) with ``overrides`` applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a mapping of sections; got {type(data).__name__}")
    if overrides:
        data = _merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return config_from_dict(cls, data)


def config_to_dict(config: Any) -> dict:
    """The resolved config as plain YAML-able data (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
