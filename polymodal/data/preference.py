"""Preference pairs (prompt, chosen, rejected) read from JSONL files, for reward models.

The default layout is the one TRL's `RewardTrainer` reads, plus two columns of our own:

    {"prompt": "...", "chosen": "...", "rejected": "...", "margin": 1.0, "dimension": "tone", "subset": "chat"}

- `prompt` is optional (TRL's "implicit prompt" form puts the whole conversation in `chosen` and `rejected`);
- `chosen` / `rejected` are strings or chat message lists (`[{"role": "user", "content": "..."}, ...]`); when
  both are message lists their longest common prefix is the prompt and the rest are the two responses.
  Both sides must have the same form (a message list beside a string renders differently, a shortcut a
  reward model learns instead of the preference); roles are `system`, `user`, `assistant` or `tool`, and
  a response holds only `assistant` (or `tool`) turns and ends with an `assistant` turn;
- `margin` (optional) is the number TRL subtracts inside the Bradley-Terry loss;
- `dimension` names the alignment dimension (Hummer: accuracy, conciseness, depth, empathy, specificity, tone);
- `subset` is a RewardBench-style category used by the evaluation's per-subset column.

Other layouts go through `keys`, a mapping from our field names to the file's (dotted paths reach into
nested objects and lists, e.g. `"completions.0.response"`); a two-element list for `margin` reads the
difference of two fields, e.g. UltraFeedback's `{"margin": ["score_chosen", "score_rejected"]}`.
A folder is read as one file per dimension, `<folder>/<dimension>/<split>.jsonl` (the layout of the Hummer
release), the dimension taken from the sub-folder's name when a record has none.

Bad records (malformed line, bad encoding, a missing side, empty text, chosen identical to rejected up to
white space, a non-numeric margin, an unknown role, a user turn as the response, sides of different forms, a
text longer than `max_chars`) raise `ManifestError` naming the file, line and key (`on_bad_record="error"`) or
are skipped and counted by reason (`"skip"`). The length limit comes before any expensive work: a megabyte
string without spaces would stall tokenizer training for minutes, and a reward model reads only its first
`max_length` tokens anyway.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .manifests import BAD_RECORD_POLICIES, SKIP_HINT, ManifestError, SkipNotes
# The manifest reader's line decoding and bad-record type, so both formats report bad lines alike.
from .manifests import _BadRecord as _Bad, _jsonl_rows as _jsonl_lines

__all__ = ["PreferencePair", "PreferenceSet", "read_preferences", "render_text", "write_preferences",
           "get_dotted", "MISSING", "UNKNOWN_DIMENSION", "HUMMER_DIMENSIONS", "ULTRAFEEDBACK_KEYS"]

UNKNOWN_DIMENSION = "all"         # the dimension of records that name none (and come from no dimension folder)
HUMMER_DIMENSIONS = ("accuracy", "conciseness", "depth", "empathy", "specificity", "tone")
# HuggingFaceH4/ultrafeedback_binarized-style records: message lists with the prompt inside, two scores.
ULTRAFEEDBACK_KEYS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                      "margin": ["score_chosen", "score_rejected"]}
FIELDS = ("prompt", "chosen", "rejected", "margin", "dimension", "subset")

MISSING_SIDE = "missing_side"
EMPTY_TEXT, IDENTICAL, BAD_FIELD = "empty_text", "identical_pair", "bad_field"
BAD_ROLE, MIXED_FORMS, TOO_LONG = "bad_role", "mixed_forms", "too_long"
ROLES = ("system", "user", "assistant", "tool")      # chat roles a message may have
RESPONSE_ROLES = ("assistant", "tool")               # roles a response (after the shared prompt) may hold
DEFAULT_MAX_CHARS = 65_536                           # characters of one text (prompt, chosen or rejected)

Text = Any   # a string or a list of {"role", "content"} messages


@dataclass
class PreferencePair:
    """One preference: `chosen` is preferred to `rejected` as an answer to `prompt`.

    Attributes:
        prompt: a string ("" = none) or a message list.
        chosen, rejected: the responses, strings or message lists (the prompt removed).
        margin: TRL's margin (None = 0 in the loss).
        dimension: the alignment dimension (`UNKNOWN_DIMENSION` when none is given).
        subset: a RewardBench-style category ("" = none).
        where: "file:line", for messages.
    """
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    dimension: str = UNKNOWN_DIMENSION
    subset: str = ""
    where: str = ""


@dataclass
class PreferenceSet(SkipNotes):
    """The good pairs of one or more files plus what was skipped (by reason, with `file:line` examples)."""
    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __getitem__(self, i: int) -> PreferencePair:
        return self.pairs[i]

    def dimensions(self) -> list[str]:
        """The dimensions present, sorted."""
        return sorted({p.dimension for p in self.pairs})

    def by_dimension(self) -> dict[str, list[PreferencePair]]:
        """Pairs grouped by dimension (sorted names)."""
        out: dict[str, list[PreferencePair]] = {d: [] for d in self.dimensions()}
        for p in self.pairs:
            out[p.dimension].append(p)
        return out

    def report(self) -> str:
        """One line per skip reason with its count and examples; "" when nothing was skipped."""
        return self.skip_report("pair(s)", self.source)


def read_preferences(path: str | os.PathLike, keys: dict | None = None, dimension: str = "",
                     on_bad_record: str = "error", split: str = "train", limit: int = 0,
                     allow_empty: bool = False, max_chars: int = DEFAULT_MAX_CHARS) -> PreferenceSet:
    """Read preference pairs from a JSONL file or a folder of one file per dimension.

    Args:
        path: a JSONL file, or a folder holding `<dimension>/<split>.jsonl` files (the sub-folder names the
            dimension of records without a `dimension` field).
        keys: our field name (prompt, chosen, rejected, margin, dimension, subset) -> the file's key or dotted
            path; a list of two paths for `margin` reads their difference. Unnamed fields keep their names.
        dimension: force this dimension on every record ("" = from the record, else the folder, else "all").
        on_bad_record: "error" (raise at the first bad record) or "skip" (count and leave it out).
        split: the file name (without .jsonl) read inside each dimension folder.
        limit: keep the first N good pairs (0 = all).
        allow_empty: accept a source with no usable pair.
        max_chars: the longest prompt, chosen or rejected text in characters (all of a message list's
            contents together); a longer one is a bad record (reason "too_long"). 0 = no limit.
    Returns:
        A `PreferenceSet`.
    Raises:
        FileNotFoundError: `path` does not exist, or a folder holds no `<dimension>/<split>.jsonl`.
        ManifestError: a bad record under "error" (file, line, reason and the fix), or no usable pair.
        ValueError: an unknown policy or key-mapping field.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError(f"max_chars must be an integer >= 0 (0 = no limit), got {max_chars!r}")
    mapping = _check_keys(keys)
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob(f"*/{split}.jsonl") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: a preference folder needs <dimension>/{split}.jsonl files; found none "
                                    f"(give a JSONL file, or another split=)")
        sources = [(f, f.parent.name) for f in files]
    elif path.is_file():
        sources = [(path, "")]
    else:
        raise FileNotFoundError(f"preference file {path} does not exist")
    out = PreferenceSet(source=str(path))
    for file, folder_dim in sources:
        for line_no, raw in _jsonl_lines(file):
            where = f"{file}:{line_no}"
            try:
                if isinstance(raw, _Bad):
                    raise raw
                pair = _normalise(raw, mapping, dimension or "", folder_dim, where, max_chars)
            except _Bad as bad:
                if on_bad_record == "error":
                    raise ManifestError(f"{file} line {line_no}: {bad.detail} [{bad.reason}]; {SKIP_HINT}") from None
                out.note_skip(bad.reason, f"{where}: {bad.detail}")
                continue
            out.pairs.append(pair)
            if limit and len(out.pairs) >= limit:
                return out
    if not out.pairs and not allow_empty:
        why = f" ({out.report()})" if out.skipped else " (no record)"
        raise ManifestError(f"{path}: no usable preference pair{why}; fix the file or the key mapping (keys=)")
    return out


def _check_keys(keys: dict | None) -> dict:
    mapping = {f: f for f in FIELDS}
    for k, v in (keys or {}).items():
        if k not in FIELDS:
            raise ValueError(f"preference key mapping: unknown field {k!r}; fields: {', '.join(FIELDS)}")
        if k == "margin" and isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(x, str) and x for x in v):
                raise ValueError(f"preference key mapping: margin must be a key or two keys [a, b] (a - b), got {v!r}")
        elif not isinstance(v, str) or not v:
            raise ValueError(f"preference key mapping: {k} must map to a non-empty key, got {v!r}")
        mapping[k] = v
    return mapping


MISSING = object()       # what `get_dotted` returns for a path that is not there


def get_dotted(record: dict, dotted: str):
    """record[a][b][0]... for "a.b.0" (a key that itself holds dots is tried first); `MISSING` when any step is
    absent."""
    if dotted in record:
        return record[dotted]
    cur: Any = record
    for part in dotted.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return MISSING
    return cur


def _text(value, name: str):
    """A string or a validated message list; _Bad otherwise (naming the key and the message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value):
            if not isinstance(m.get("content"), str):
                raise _Bad(BAD_FIELD, f"{name}[{i}] must be a message {{role, content}} with string content")
            if m.get("role") not in ROLES:
                got = "no role" if "role" not in m else f"role {m['role']!r}"
                raise _Bad(BAD_ROLE, f"{name}[{i}] has {got}; a message's role is one of {', '.join(ROLES)}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if isinstance(value, list) and not value:
        raise _Bad(EMPTY_TEXT, f"{name} is an empty message list")
    raise _Bad(BAD_FIELD, f"{name} must be a string or a list of messages, got {type(value).__name__}")


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not m["content"].strip() for m in value)


def _length(value) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def _canonical(value):
    """The text with every run of white space as one space: pairs equal up to white space are identical."""
    if isinstance(value, str):
        return " ".join(value.split())
    return [(m["role"], " ".join(m["content"].split())) for m in value]


def _check_response(value, name: str, key: str) -> None:
    """A message-list response holds only assistant (or tool) turns and ends with the assistant's."""
    if isinstance(value, str):
        return
    for i, m in enumerate(value):
        if m["role"] not in RESPONSE_ROLES:
            raise _Bad(BAD_ROLE, f"{name} (key {key!r}): the response holds a {m['role']!r} turn "
                                 f"({m['content'][:40]!r}); a response is the assistant's answer: put the conversation before it in the "
                                 f"prompt (or in the messages both sides share)")
    if value[-1]["role"] != "assistant":
        raise _Bad(BAD_ROLE, f"{name} (key {key!r}): the response ends with a {value[-1]['role']!r} turn; it must end "
                             f"with the assistant's answer")


def _normalise(record: dict, keys: dict, forced_dim: str, folder_dim: str, where: str,
               max_chars: int = DEFAULT_MAX_CHARS) -> PreferencePair:
    if not isinstance(record, dict):
        raise _Bad(BAD_FIELD, f"a record must be a JSON object, got {type(record).__name__}")
    values = {}
    for name in ("chosen", "rejected"):
        v = get_dotted(record, keys[name])
        if v is MISSING or v is None:
            raise _Bad(MISSING_SIDE, f"no {name!r} (key {keys[name]!r}); map another key with keys.{name}=...")
        values[name] = _text(v, name)
    prompt = get_dotted(record, keys["prompt"])
    prompt = "" if prompt is MISSING or prompt is None else _text(prompt, "prompt")
    for name, v in (("prompt", prompt), *values.items()):      # before anything costs time
        if max_chars and _length(v) > max_chars:
            raise _Bad(TOO_LONG, f"{name} (key {keys[name]!r}) is {_length(v)} characters; the limit is {max_chars} "
                                 f"(a reward model reads only its first max_length tokens): shorten it, or raise "
                                 f"the limit (reward.max_chars=, or read_preferences(max_chars=))")
    chosen, rejected = values["chosen"], values["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list):
        forms = {n: "a message list" if isinstance(v, list) else "a string" for n, v in values.items()}
        raise _Bad(MIXED_FORMS, f"chosen is {forms['chosen']} but rejected is {forms['rejected']}; give both sides in "
                                f"the same form (they would be rendered differently, a shortcut a reward model "
                                f"learns instead of the preference)")
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0                                     # implicit prompt: the messages both sides share
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n:
            prompt = chosen[:n]                   # a separate `prompt` string repeats it
            chosen, rejected = chosen[n:], rejected[n:]
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(v):
            raise _Bad(EMPTY_TEXT, f"{name} response is empty")
        _check_response(v, name, keys[name])
    if _canonical(chosen) == _canonical(rejected):
        raise _Bad(IDENTICAL, "chosen and rejected are identical (up to white space): no preference to learn")
    margin = _margin(record, keys["margin"])
    dim = forced_dim
    if not dim:
        d = get_dotted(record, keys["dimension"])
        if d is not MISSING and d is not None:
            if not isinstance(d, str) or not d.strip():
                raise _Bad(BAD_FIELD, f"dimension must be a non-empty string, got {d!r}")
            dim = d.strip()
        else:
            dim = folder_dim or UNKNOWN_DIMENSION
    subset = get_dotted(record, keys["subset"])
    subset = "" if subset is MISSING or subset is None else str(subset)
    return PreferencePair(prompt, chosen, rejected, margin, dim, subset, where)


def _margin(record: dict, key) -> float | None:
    def number(k):
        v = get_dotted(record, k)
        if v is MISSING or v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Bad(BAD_FIELD, f"{k} must be a finite number, got {v!r}")
        return float(v)
    if isinstance(key, (list, tuple)):
        a, b = number(key[0]), number(key[1])
        return None if a is None or b is None else a - b
    return number(key)


def render_text(prompt: Text, response: Text, separator: str = "\n") -> str:
    """Prompt and response as one plain string (our choice for towers without a chat template).

    Strings are joined with `separator`; message lists become `role: content` lines.

    Args:
        prompt: a string ("" = none) or message list.
        response: a string or message list.
        separator: between the prompt and the response.
    Returns:
        The text a reward model scores.
    """
    def flat(x) -> str:
        if isinstance(x, str):
            return x
        return "\n".join(f"{m['role']}: {m['content']}" for m in x)
    p, r = flat(prompt), flat(response)
    return f"{p}{separator}{r}" if p else r


def write_preferences(pairs, path: str | os.PathLike, with_dimension: bool = True) -> None:
    """Write pairs (PreferencePair or dicts) as TRL-style JSONL (`prompt`, `chosen`, `rejected`, `margin`,
    `dimension`, `subset` where set)."""
    from ..fileio import atomic_open
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            d = p if isinstance(p, dict) else {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                              "margin": p.margin, "dimension": p.dimension, "subset": p.subset}
            d = {k: v for k, v in d.items() if v not in (None, "") and (with_dimension or k != "dimension")}
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
