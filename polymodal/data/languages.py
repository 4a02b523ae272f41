"""Does a tokenizer know a language? A probe sentence per language, checked before numbers are printed.

A tokenizer that never saw a script still turns its text into ids: WordPiece maps every character to
[UNK], byte-level BPE falls back to one token per UTF-8 byte (three per Chinese character). Scores computed
from such ids look like numbers but mean little, so the CLI warns before it evaluates.
"""
from __future__ import annotations

import sys

# Common words of each language (not from any data set); more languages are one row.
PROBES: dict[str, str] = {
    "zh": "一只红色的猫坐在绿色的大树旁边，天空是蓝色的。",
}


def tokenizer_covers(tokenizer, lang: str) -> tuple[bool, str]:
    """Whether `tokenizer` has seen `lang`'s script, judged on the language's probe sentence.

    Args:
        tokenizer: a `polymodal.data.text.Tokenizer` (anything with `encode` and `unk_id`).
        lang: a language code; languages without a probe (e.g. "en") count as covered.
    Returns:
        (covered, reason): reason says what was seen when not covered.
    """
    probe = PROBES.get(lang)
    if probe is None:
        return True, ""
    ids = tokenizer.encode(probe)
    chars = sum(1 for c in probe if not c.isspace())
    unk = getattr(tokenizer, "unk_id", None)
    unknown = sum(1 for i in ids if unk is not None and i == unk)
    if unknown > chars // 4:
        return False, f"{unknown} of {len(ids)} tokens of a {lang} probe sentence are unknown"
    if len(ids) >= 2.5 * chars:
        return False, f"a {lang} probe sentence of {chars} characters became {len(ids)} tokens (byte fallback)"
    return True, ""


def warn_if_unseen(tokenizer, lang: str, where: str = "model") -> bool:
    """Print one warning line to stderr when the tokenizer never saw `lang`; returns whether it warned."""
    covered, reason = tokenizer_covers(tokenizer, lang)
    if not covered:
        print(f"polymodal: warning: {where}: the tokenizer does not seem to know --lang {lang} ({reason}); "
              f"the scores below are unlikely to mean much", file=sys.stderr)
    return not covered
