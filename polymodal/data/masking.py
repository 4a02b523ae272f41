"""Significant words and masked-token selection for SNP-S3: MSSM (significant-word masking) and plain MLM.

*Significant words* (SNP-S3, checked against the authors' released code) are the most frequent verbs, nouns
and adjectives of the training captions: spaCy tags every caption, occurrences tagged VERB / NOUN / ADJ are
counted on their surface form (case kept, no lemmatising) when that form is an exact vocabulary entry,
entries of length 1 and a stop list are dropped, and the top `top_k` by count are significant. Words ever
tagged NUM are dropped (the released code counts NUM and then removes it; "any NUM tag drops the word" is
our reading). Ties in count are broken alphabetically so the list is deterministic. The list is saved as
JSON beside the run (:func:`load_or_count`) so it is computed once.

*MSSM* masks n = int(0.15 L) content tokens (+1 when the fractional part of 0.15 L is >= 0.3), drawn
uniformly among the significant tokens of the caption; each chosen token becomes [MASK] with probability
0.8, a random significant word in a random same-lemma form with 0.1, and stays with 0.1. With fewer
significant tokens than n, all of them are chosen and the rest is drawn from the other content tokens (the
intended behaviour; the released fill-up code indexes wrong positions). Fill-up tokens follow the same
80/10/10 rule. Plain MLM (the baseline) chooses the same number n uniformly among all content tokens and
replaces 10% with a random vocabulary word (not a special token).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..fileio import atomic_open

SIGNIFICANT_POS = ("VERB", "NOUN", "ADJ")
DEFAULT_STOP_WORDS = ("be", "is", "was", "were", "are")
IGNORE_INDEX = -100
MASK_PROB, RANDOM_PROB = 0.8, 0.1         # the rest (0.1) keeps the token

# A tagger maps captions to, per caption, a list of (surface form, coarse POS, lemma).
Tagger = Callable[[Sequence[str]], list[list[tuple[str, str, str]]]]


def spacy_tagger(batch_size: int = 256) -> Tagger:
    """A tagger over the project's spaCy pipeline (`polymodal.data.syntax.load_spacy`), loaded on first call."""
    state: dict = {}

    def tag(texts: Sequence[str]) -> list[list[tuple[str, str, str]]]:
        if "nlp" not in state:
            from .syntax import load_spacy
            state["nlp"] = load_spacy()
        return [[(t.text, t.pos_, t.lemma_) for t in doc]
                for doc in state["nlp"].pipe(list(texts), batch_size=batch_size)]

    return tag


@dataclass
class SignificantWords:
    """The ranked significant words: `words[i]` occurs `counts[i]` times; `lemmas[w]` is w's lemma."""
    words: list[str]
    counts: list[int]
    lemmas: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def token_ids(self, tokenizer) -> list[int]:
        """The vocabulary ids of the words, in rank order (every word is a vocabulary entry by construction)."""
        vocab = tokenizer.backend.get_vocab()
        return [vocab[w] for w in self.words if w in vocab]

    def lemma_groups(self, tokenizer) -> dict[int, list[int]]:
        """id -> ids of the significant words sharing its lemma (itself included)."""
        vocab = tokenizer.backend.get_vocab()
        by_lemma: dict[str, list[int]] = {}
        for w in self.words:
            if w in vocab:
                by_lemma.setdefault(self.lemmas.get(w, w), []).append(vocab[w])
        return {i: by_lemma[self.lemmas.get(w, w)] for w in self.words if w in vocab for i in [vocab[w]]}

    def to_dict(self) -> dict:
        return {"version": 1, "words": self.words, "counts": self.counts, "lemmas": self.lemmas,
                "settings": self.settings}

    def save(self, path: str | os.PathLike) -> None:
        """Write the list as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict, where: str = "significant words") -> "SignificantWords":
        """A list from its `to_dict` form (`where` names the source in the error)."""
        try:
            return cls(list(d["words"]), [int(c) for c in d["counts"]], dict(d.get("lemmas", {})),
                       dict(d.get("settings", {})))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not a significant-word list ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SignificantWords":
        """Read a list written by `save`."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a significant-word list ({e}); delete it to recount") from e
        return cls.from_dict(d, f"{path} (delete it to recount)")


def count_significant_words(captions: Iterable[str], vocab, top_k: int = 3000,
                            stop_words: Sequence[str] = DEFAULT_STOP_WORDS, tagger: Tagger | None = None,
                            pos: Sequence[str] = SIGNIFICANT_POS) -> SignificantWords:
    """Count and rank the significant words of a caption corpus.

    Args:
        captions: the training captions (duplicates count as often as they occur).
        vocab: the tokenizer's vocabulary (a dict or set of entries); only exact entries are counted.
        top_k: how many of the ranked words are significant (the authors use 3000).
        stop_words: surface forms never significant.
        tagger: captions -> per-caption (text, POS, lemma) triples; default spaCy (`spacy_tagger`).
        pos: the coarse POS tags that count.
    Returns:
        SignificantWords, ranked by count (ties alphabetical), at most `top_k` long.
    """
    tagger = tagger or spacy_tagger()
    vocab = set(vocab)
    stop = set(stop_words)
    counts: Counter = Counter()
    numbers: set[str] = set()
    lemma_votes: dict[str, Counter] = {}
    for tokens in tagger(list(captions)):
        for text, tag, lemma in tokens:
            if tag == "NUM":
                numbers.add(text)
            if tag not in pos or text not in vocab:
                continue
            counts[text] += 1
            lemma_votes.setdefault(text, Counter())[lemma] += 1
    kept = [(w, c) for w, c in counts.items() if len(w) > 1 and w not in stop and w not in numbers]
    kept.sort(key=lambda wc: (-wc[1], wc[0]))
    kept = kept[:top_k]
    lemmas = {w: lemma_votes[w].most_common(1)[0][0] for w, _ in kept}
    return SignificantWords([w for w, _ in kept], [c for _, c in kept], lemmas,
                            {"top_k": top_k, "stop_words": sorted(stop), "pos": list(pos)})


def load_or_count(path: str | os.PathLike, captions: Iterable[str], tokenizer, top_k: int = 3000,
                  stop_words: Sequence[str] = DEFAULT_STOP_WORDS, tagger: Tagger | None = None) -> SignificantWords:
    """The list saved at `path`, or count it on `captions` with `tokenizer`'s vocabulary and save it there.

    A saved list made with other `top_k` / `stop_words` settings is recounted (and overwritten).
    """
    path = Path(path)
    want = {"top_k": top_k, "stop_words": sorted(set(stop_words))}
    if path.is_file():
        saved = SignificantWords.load(path)
        if {k: saved.settings.get(k) for k in want} == want:
            return saved
    words = count_significant_words(captions, tokenizer.backend.get_vocab(), top_k, stop_words, tagger)
    words.save(path)
    return words


# ---------------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------------
def num_to_mask(length: int, ratio: float = 0.15, round_up_from: float = 0.3) -> int:
    """n = int(ratio * length), plus one when the fractional part is >= `round_up_from` (SNP-S3's rule)."""
    x = ratio * length
    n = int(x)
    if round(x - n, 9) >= round_up_from:       # 0.15 * 2 is 0.3 up to rounding: count it as 0.3
        n += 1
    return min(n, length)


@dataclass
class MaskingRule:
    """What `mask_caption` needs: special ids, the significant ids and their same-lemma groups.

    Args:
        mask_id: the [MASK] id.
        special_ids: ids never chosen (CLS, SEP, PAD ...).
        vocab_size: plain MLM draws random replacements from `[0, vocab_size)` minus the specials.
        significant: significant token ids.
        lemma_groups: significant id -> same-lemma significant ids (default: itself only).
    """
    mask_id: int
    special_ids: Sequence[int]
    vocab_size: int
    significant: Sequence[int] = ()
    lemma_groups: dict = field(default_factory=dict)

    def __post_init__(self):
        self.significant = np.asarray(sorted(set(int(i) for i in self.significant)), dtype=np.int64)
        self._sig_set = set(self.significant.tolist())
        specials = set(int(i) for i in self.special_ids) | {int(self.mask_id)}
        self._specials = specials
        self._plain = np.asarray([i for i in range(self.vocab_size) if i not in specials], dtype=np.int64)

    def is_significant(self, ids: Tensor) -> Tensor:
        """Bool tensor like `ids`: True where the id is significant."""
        if len(self.significant) == 0:
            return torch.zeros_like(ids, dtype=torch.bool)
        return torch.isin(ids, torch.as_tensor(self.significant, device=ids.device))

    def content(self, ids: Tensor) -> Tensor:
        """Bool tensor like `ids`: True on content (non-special) tokens."""
        return ~torch.isin(ids, torch.tensor(sorted(self._specials), device=ids.device))

    def random_significant(self, rng: np.random.Generator) -> int:
        """A random significant word, then a random form of its lemma among the significant words."""
        w = int(rng.choice(self.significant))
        forms = self.lemma_groups.get(w) or [w]
        return int(forms[int(rng.integers(len(forms)))])


def mask_caption(ids: Tensor, rule: MaskingRule, rng: np.random.Generator, mode: str = "mssm",
                 ratio: float = 0.15) -> tuple[Tensor, Tensor]:
    """Mask one row of token ids by MSSM or plain MLM.

    Args:
        ids: (L,) token ids of one caption (specials and padding included, never chosen).
        rule: the special and significant ids.
        rng: the random source (a numpy Generator).
        mode: "mssm" (significant tokens first) or "mlm" (any content token).
        ratio: the share of content tokens masked (0.15).
    Returns:
        (masked ids (L,), labels (L,)): labels hold the original id at chosen positions, -100 elsewhere.
    """
    if mode not in ("mssm", "mlm"):
        raise ValueError(f"masking mode must be 'mssm' or 'mlm', got {mode!r}")
    ids_np = ids.cpu().numpy()
    content = np.flatnonzero(~np.isin(ids_np, list(rule._specials)))
    n = num_to_mask(len(content), ratio)
    out, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    if n == 0:
        return out, labels
    if mode == "mssm" and len(rule.significant):
        sig_mask = np.isin(ids_np[content], rule.significant)
        sig, other = content[sig_mask], content[~sig_mask]
        if len(sig) >= n:
            chosen = rng.choice(sig, size=n, replace=False)
        else:
            chosen = np.concatenate([sig, rng.choice(other, size=n - len(sig), replace=False)])
        random_word = lambda: rule.random_significant(rng)  # noqa: E731
    else:
        chosen = rng.choice(content, size=n, replace=False)
        random_word = lambda: int(rng.choice(rule._plain))  # noqa: E731
    for p in np.sort(chosen):
        labels[p] = int(ids_np[p])
        u = rng.random()
        if u < MASK_PROB:
            out[p] = rule.mask_id
        elif u < MASK_PROB + RANDOM_PROB:
            out[p] = random_word()
    return out, labels


def mask_batch(ids: Tensor, rule: MaskingRule, rng: np.random.Generator, mode: str = "mssm",
               ratio: float = 0.15) -> tuple[Tensor, Tensor]:
    """`mask_caption` on every row of (B, L) ids -> (masked ids (B, L), labels (B, L))."""
    rows = [mask_caption(r, rule, rng, mode, ratio) for r in ids]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def significant_positions(ids: Tensor, rule: MaskingRule, k: int, rng: np.random.Generator) -> Tensor:
    """LVWM's K positions per row: significant tokens (a random K if more; repeated at random if fewer),
    other content tokens when a row has none, position 0 (CLS) when it has no content at all.

    Args:
        ids: (B, L) unmasked token ids.
        rule: the special and significant ids.
        k: positions per row (K = 3 in SNP-S3).
    Returns:
        (B, K) int64 positions.
    """
    ids_np = ids.cpu().numpy()
    out = np.zeros((len(ids_np), k), dtype=np.int64)
    for b, row in enumerate(ids_np):
        content = np.flatnonzero(~np.isin(row, list(rule._specials)))
        sig = content[np.isin(row[content], rule.significant)] if len(rule.significant) else content[:0]
        pool = sig if len(sig) else content
        if len(pool) == 0:
            continue
        if len(pool) >= k:
            out[b] = rng.choice(pool, size=k, replace=False)
        else:
            out[b] = np.concatenate([pool, rng.choice(pool, size=k - len(pool), replace=True)])
    return torch.from_numpy(out)


def batch_rng(seed: int, index: Sequence[int]) -> np.random.Generator:
    """A generator that depends only on the run seed and the batch's sample indices (any worker count)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(i) & 0xFFFFFFFF for i in index]])


__all__ = ["SignificantWords", "count_significant_words", "load_or_count", "spacy_tagger", "num_to_mask",
           "MaskingRule", "mask_caption", "mask_batch", "significant_positions", "batch_rng",
           "DEFAULT_STOP_WORDS", "IGNORE_INDEX"]


def masking_rule(tokenizer, words) -> MaskingRule:
    """The `MaskingRule` of a BERT-style tokenizer and a `SignificantWords` list."""
    specials = [i for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) if i is not None]
    return MaskingRule(tokenizer.mask_id, specials, tokenizer.vocab_size, words.token_ids(tokenizer),
                       words.lemma_groups(tokenizer))


def remask_by_importance(ids: Tensor, importance: Tensor, mask_id: int, special_ids: Sequence[int],
                         ratio: float = 0.15) -> tuple[Tensor, Tensor]:
    """SNP-S3's attention-guided re-masking: mask the content tokens the text encoder attends to most.

    Per caption, max(int(ratio * n), 1) of its n content tokens (no special or padding tokens) with the largest
    attention mass become [MASK] (our reading of "drawn by attention importance": the top ones, ties to the
    earlier position); labels hold the original ids there and IGNORE_INDEX elsewhere.

    Args:
        ids: (B, L) token ids of the captions.
        importance: (B, L) attention mass per token (e.g. `models.fusion.attention_importance`).
        mask_id: the [MASK] id.
        special_ids: ids that are never masked (padding, CLS, SEP, ...).
        ratio: the share of content tokens to mask.
    Returns:
        (masked ids (B, L), labels (B, L)).
    """
    content = ~torch.isin(ids, torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}),
                                            device=ids.device))                          # (B, L)
    score = importance.float().masked_fill(~content, float("-inf"))
    masked, labels = ids.clone(), torch.full_like(ids, IGNORE_INDEX)
    for b in range(len(ids)):
        n = int(content[b].sum())
        if n == 0:
            continue
        # A stable descending sort: among equal masses the earlier position wins.
        top = torch.sort(score[b], descending=True, stable=True).indices[:max(int(ratio * n), 1)]
        labels[b, top] = ids[b, top]
        masked[b, top] = mask_id
    return masked, labels
