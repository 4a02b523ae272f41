"""`polymodal recipe show`: every key of a run with its value, type and a one-line description.

The descriptions are the comments written beside each field of the config dataclasses (the one place a
key is documented), read from their source, so a new key is described the moment it is commented.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from functools import lru_cache
from typing import Any

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?#\s*(.+?)\s*$")


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the comment on its line} for a dataclass (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        for line in source.splitlines():
            m = _FIELD.match(line)
            if m and m.group(1) in names:
                docs[m.group(1)] = m.group(2)
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe_config(obj: Any, prefix: str = "") -> list[dict]:
    """Rows {key, value, type, doc} for every leaf field of a dataclass instance, nested sections flattened."""
    rows: list[dict] = []
    hints = typing.get_type_hints(type(obj))
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        if f.name == "method_config":
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            rows += describe_config(value, key + ".")
        else:
            rows.append({"key": key, "value": value if not isinstance(value, tuple) else list(value),
                         "type": _type_name(hints.get(f.name, f.type)), "doc": docs.get(f.name, "")})
    return rows


def describe_recipe(cfg) -> list[dict]:
    """Every key of a loaded `RunConfig`, the method's own section under its name."""
    rows = describe_config(cfg)
    if cfg.method_config is not None:
        rows += describe_config(cfg.method_config, f"{cfg.method}.")
    return rows


def format_keys(rows: list[dict]) -> str:
    """A plain-text table: key = value  (type)  description, grouped by section."""
    width = max((len(r["key"]) for r in rows), default=0)
    lines, section = [], None
    for r in rows:
        head = r["key"].split(".")[0] if "." in r["key"] else ""
        if head != section:
            section = head
            lines.append(f"[{head}]" if head else "[run]")
        value = repr(r["value"]) if isinstance(r["value"], str) else r["value"]
        doc = f"  # {r['doc']}" if r["doc"] else ""
        lines.append(f"  {r['key']:<{width}} = {value}  ({r['type']}){doc}")
    return "\n".join(lines)
