"""Typed configs: dataclasses built from dicts/YAML with strict key checking and `key=value` overrides.

Every run is described by a `RunConfig` (see `polymodal.recipes`); this module holds the generic
machinery: `from_dict` (unknown keys are errors naming the key and listing the allowed ones),
`apply_overrides` (dotted keys, values parsed as YAML scalars) and `load_yaml`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or config file has a wrong key or value; the message names the key and the file."""


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls, data: dict | None, where: str = "config"):
    """Build dataclass `cls` from a (nested) dict.

    Args:
        cls: a dataclass type; nested dataclass fields are built recursively.
        data: the values; missing keys keep their defaults.
        where: a label for error messages (file name and key path).
    Returns:
        An instance of `cls`.
    Raises:
        ConfigError: for unknown keys (listing the allowed ones) or values of the wrong type.
    """
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} ({data!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}{did_you_mean(unknown[0], fields)}; "
                          f"allowed keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def did_you_mean(word: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of `choices`, or "" when none is close."""
    import difflib
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(tp, value, where: str):
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if origin is tuple:
        return tuple(value)
    return value


def to_dict(obj) -> dict:
    """A dataclass as plain nested dicts (for JSON/YAML)."""
    return dataclasses.asdict(obj)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """`set_dotted(d, "optim.lr", 1e-3)` sets d["optim"]["lr"], creating sub-dicts."""
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings to a nested dict; values are parsed as YAML (1e-3, true, [1,2])."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:           # not a YAML value ("," or "a: b: c"): the text as it is
            value = raw
        if isinstance(value, str) and _looks_like_float(raw):
            value = float(raw)
        set_dotted(data, key.strip(), value)
    return data


def _looks_like_float(raw: str) -> bool:
    # YAML 1.1 reads "1e-3" as a string; accept it as a float.
    try:
        float(raw)
        return True
    except ValueError:
        return False


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data
