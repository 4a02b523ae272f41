"""What the preference readers share: reading JSONL (plain or gzip) line by line, and leaving out pairs with nothing
to learn (an empty response, or chosen equal to rejected up to white space), counted by reason for the notes.

They write the records `polymodal.data.preference.read_preferences` reads: `prompt` / `chosen` / `rejected` as
strings or chat message lists, plus `margin`, `subset` or score fields where the layout has them.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from .common import LayoutError


def jsonl_objects(path: Path):
    """(line number, object) of each non-empty line of a `.jsonl` or `.jsonl.gz` file.

    Raises:
        LayoutError: a line that is not a JSON object or not UTF-8 (naming the file and line).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise LayoutError(f"{path} line {n}: not UTF-8 ({e.reason} at byte {e.start})") from None
                except json.JSONDecodeError as e:
                    raise LayoutError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise LayoutError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
                yield n, obj
    except (gzip.BadGzipFile, EOFError) as e:
        raise LayoutError(f"{path}: not a readable gzip file ({e})") from None


def _flat(text) -> str:
    if isinstance(text, str):
        return " ".join(text.split())
    return "\n".join(f"{m.get('role')}: {' '.join(str(m.get('content', '')).split())}" for m in text)


def _content(text) -> str:
    return text if isinstance(text, str) else "".join(str(m.get("content", "")) for m in text)


def why_unusable(chosen, rejected) -> str | None:
    """"empty response" / "chosen equals rejected" when a pair has nothing to learn, else None."""
    if not _content(chosen).strip() or not _content(rejected).strip():
        return "empty response"
    if _flat(chosen) == _flat(rejected):
        return "chosen equals rejected"
    return None


class Dropped:
    """Pairs left out, by reason, with the first place of each (for the reader's notes)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def notes(self, what: str = "pair(s)") -> list[str]:
        return [f"{n} {what} left out: {reason} (first: {self.first[reason]})"
                for reason, n in sorted(self.counts.items())]


__all__ = ["Dropped", "jsonl_objects", "why_unusable"]
