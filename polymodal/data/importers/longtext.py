"""What the long-text readers (urban1k, dci, iiw, sharegpt4v) share: the short caption of a long description.

Long-text records carry `caption` (short) and `long_caption`. Where a layout has no short caption of its own,
the short caption is the first sentence of the long one, as Long-CLIP's ShareGPT4V loader takes it
(beichenzbc/Long-CLIP `train/sharegpt4v.py`: the text up to the first ". ").
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"(?<=[.!?])\s|(?<=[。！？])")


def squash(text: str) -> str:
    """`text` with every run of whitespace (new lines, no-break spaces) as one space, stripped."""
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The first sentence of `text` (whitespace squashed; up to the first '.', '!' or '?' before a space, or a
    Chinese full stop), or all of it when it has one sentence."""
    text = squash(text)
    parts = _SENTENCE_END.split(text, maxsplit=1)
    return parts[0].strip() or text


__all__ = ["squash", "first_sentence"]
