"""What the preference readers share: leaving out pairs with nothing to learn (an empty response, or chosen
equal to rejected up to white space), counted by reason for the notes.

They write the records `polymodal.data.preference.read_preferences` reads: `prompt` / `chosen` / `rejected` as
strings or chat message lists, plus `margin`, `subset` or score fields where the layout has them.
"""
from __future__ import annotations

from collections import Counter



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


__all__ = ["Dropped", "why_unusable"]
