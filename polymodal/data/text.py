"""Tokenizers for text towers, built on HF `tokenizers` (no network, local files only).

A `Tokenizer` wraps a `tokenizers.Tokenizer` that only splits text into content ids; this class
adds the specials itself so every source behaves the same:

- style "clip": ``[SOT] text [EOT] pad ...`` (OpenAI/OpenCLIP layout; pad id 0 by default)
- style "bert": ``[CLS] text [SEP] [PAD] ...``

Truncation cuts the content and keeps both specials, so a truncated row still ends in EOT/SEP.

`Tokenizer.from_dir` reads our own files, an HF `tokenizer.json`, CLIP/GPT-2 `vocab.json` +
`merges.txt`, or a BERT `vocab.txt`. `train_tokenizer` trains byte-level BPE or WordPiece on a
corpus, with Chinese split per character. `clip_bpe_tokenizer` is OpenAI's CLIP tokenizer built from
the vocabulary shipped as package data (polymodal/data/vocab, see its README); `bundled_tokenizer`
picks it for a text tower with that vocabulary. `MissingTokenizer` stands in where a model has none
and says, when used, how to get one.
"""
from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

OUR_CONFIG = "polymodal_tokenizer.json"
BACKEND_FILE = "tokenizer.json"

CLIP_SOT, CLIP_EOT, CLIP_PAD = "<|startoftext|>", "<|endoftext|>", "<|pad|>"
BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
CLIP_EOW = "</w>"  # OpenAI CLIP's end-of-word suffix on the last symbol of every word

# OpenAI CLIP's pre-tokenisation: the two specials, English contractions, letter runs, single
# digits, punctuation runs; whitespace separates and is dropped.
CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
              r"""[^\s\p{L}\p{N}]+""")
# CJK ideograph blocks as BERT's tokenizer defines them ("Chinese characters").
CJK_CLASS = ("\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff"
             "\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
             "\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f")
# Ideographs plus CJK punctuation and full-width forms: decode drops spaces between two of these.
_CJK_TEXT = CJK_CLASS + "\u3000-\u303f\uff00-\uffef"
_CJK_GAP = re.compile(f"(?<=[{_CJK_TEXT}]) +(?=[{_CJK_TEXT}])")


@dataclass
class TokenizerConfig:
    """What `polymodal_tokenizer.json` stores beside `tokenizer.json`."""
    style: str = "clip"               # "clip": SOT text EOT pad | "bert": CLS text SEP PAD
    bos_id: int = 0                   # SOT (clip) or CLS (bert)
    eos_id: int = 0                   # EOT (clip) or SEP (bert)
    pad_id: int = 0                   # clip default 0 as in OpenAI/OpenCLIP; bert: [PAD]
    context_length: int = 77          # tokens incl. both specials
    lowercase: bool = True            # informational: the backend's normaliser does the work
    unk_id: int | None = None
    mask_id: int | None = None


class Tokenizer:
    """Text -> padded id tensor for a text tower.

    Args:
        backend: a `tokenizers.Tokenizer` that maps text to content ids (its post-processor,
            padding and truncation are not used).
        config: special ids, style and default context length.
    """

    def __init__(self, backend: _Backend, config: TokenizerConfig):
        if config.style not in ("clip", "bert"):
            raise ValueError(f"tokenizer style must be 'clip' or 'bert', got {config.style!r}")
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.config = config
        n = self.vocab_size
        for f in ("bos_id", "eos_id", "pad_id", "unk_id", "mask_id"):
            v = getattr(config, f)
            if v is not None and not 0 <= v < n:
                raise ValueError(f"tokenizer {f}={v} is outside the vocabulary (size {n})")
        self.context_length = config.context_length
        # CLIP BPE vocabularies mark word ends with "</w>"; decoding turns it into a space.
        self._eow = getattr(backend.model, "end_of_word_suffix", None) or None

    # ---- attributes the models read
    @property
    def style(self) -> str:
        return self.config.style

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.config.bos_id

    @property
    def eos_id(self) -> int:
        return self.config.eos_id

    @property
    def pad_id(self) -> int:
        return self.config.pad_id

    @property
    def unk_id(self) -> int | None:
        return self.config.unk_id

    @property
    def mask_id(self) -> int | None:
        return self.config.mask_id

    cls_id = bos_id
    sep_id = eos_id

    @property
    def lowercase(self) -> bool:
        return self.config.lowercase

    @property
    def context_length(self) -> int:
        return self.config.context_length

    @context_length.setter
    def context_length(self, value: int) -> None:
        if int(value) < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {value}")
        self.config.context_length = int(value)

    def __repr__(self) -> str:
        c = self.config
        return (f"Tokenizer(style={c.style!r}, vocab_size={self.vocab_size}, context_length={c.context_length}, "
                f"bos_id={c.bos_id}, eos_id={c.eos_id}, pad_id={c.pad_id})")

    # ---- encoding
    def encode(self, text: str) -> list[int]:
        """Content ids of `text`, without start/end tokens and without truncation."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def _content(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def tokenize_with_mask(self, texts: str | Sequence[str], context_length: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `__call__`, also returning the mask of real tokens.

        Needed for clip style with pad id 0, where 0 is also a real token ("!" in OpenAI's
        vocabulary) and the mask cannot be recovered from the ids.

        Returns:
            ids (B, L) int64 and mask (B, L) bool, True on start, content and end tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not all(isinstance(t, str) for t in texts):
            bad = next(type(t).__name__ for t in texts if not isinstance(t, str))
            raise TypeError(f"tokenizer takes a string or a list of strings, got a list holding {bad}")
        L = self.context_length if context_length is None else int(context_length)
        if L < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {L}")
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.bool)
        for i, content in enumerate(self._content(list(texts))):
            row = [self.bos_id, *content[: L - 2], self.eos_id]  # cut the content, keep both ends
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize, add start/end tokens, truncate and pad.

        Args:
            texts: one string or a list of strings.
            context_length: row length L including both specials; default `self.context_length`.
        Returns:
            LongTensor (B, L) (B = 1 for a single string), padded with `pad_id`.
        """
        return self.tokenize_with_mask(texts, context_length)[0]

    # ---- decoding
    def decode(self, ids) -> str:
        """Text of one id sequence: drops the start token, stops at the first end token and
        skips other specials and padding. Spaces between CJK characters are removed (BPE word
        ends and WordPiece character splits would otherwise put a space between every one)."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = self.backend.decode(ids, skip_special_tokens=True)
        if self._eow:
            text = " ".join(text.replace(self._eow, " ").split())
        return _CJK_GAP.sub("", text).strip()

    def batch_decode(self, ids) -> list[str]:
        """`decode` for each row of a (B, L) tensor or a list of id lists."""
        return [self.decode(row) for row in ids]

    # ---- files
    def save(self, directory) -> None:
        """Write `tokenizer.json` (the backend), `polymodal_tokenizer.json` (style, special ids and
        tokens, context length) and `tokenizer_config.json` into `directory` (created if needed).

        The saved backend carries a post-processor adding the start/end tokens, and
        `tokenizer_config.json` names the specials, so HF `AutoTokenizer.from_pretrained(directory)`
        gives the same ids as this class (with `padding="max_length", truncation=True,
        max_length=context_length`). Our own encoding never applies the post-processor."""
        from tokenizers.processors import TemplateProcessing

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        c = self.config
        tok = lambda i: self.backend.id_to_token(i)
        backend = _Backend.from_str(self.backend.to_str())
        backend.post_processor = TemplateProcessing(
            single=f"{tok(c.bos_id)} $A {tok(c.eos_id)}",
            special_tokens=sorted({(tok(c.bos_id), c.bos_id), (tok(c.eos_id), c.eos_id)}))
        backend.save(str(directory / BACKEND_FILE))
        cfg = asdict(c)
        # The token strings make the file readable and let `from_dir` check the ids still match.
        cfg["tokens"] = {k: tok(v) for k, v in cfg.items() if k.endswith("_id") and v is not None}
        (directory / OUR_CONFIG).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        hf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.context_length,
              "padding_side": "right", "truncation_side": "right", "bos_token": tok(c.bos_id),
              "eos_token": tok(c.eos_id), "pad_token": tok(c.pad_id)}
        for name, i in (("unk_token", c.unk_id), ("mask_token", c.mask_id)):
            if i is not None:
                hf[name] = tok(i)
        if c.style == "bert":
            hf.update(cls_token=tok(c.bos_id), sep_token=tok(c.eos_id))
        (directory / "tokenizer_config.json").write_text(json.dumps(hf, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")

    @classmethod
    def from_dir(cls, directory, context_length: int | None = None, pad_id: int | None = None,
                 lowercase: bool | None = None) -> "Tokenizer":
        """Load a tokenizer from local files, in this order of preference:

        1. `polymodal_tokenizer.json` + `tokenizer.json` (written by `save`);
        2. `tokenizer.json` (an HF fast tokenizer), specials from `tokenizer_config.json` /
           `special_tokens_map.json` when present;
        3. `vocab.json` + `merges.txt` (CLIP byte-level BPE with `</w>`, or GPT-2 style);
        4. `vocab.txt` (BERT WordPiece, Chinese characters split one per token).

        Args:
            directory: the folder.
            context_length: override the stored/default context length (default 77, or the HF
                `model_max_length` when it is at most 4096).
            pad_id: override the padding id (e.g. the EOT id to pad like HF's CLIPTokenizer).
            lowercase: override lower-casing for `vocab.txt` (default: `do_lower_case` from
                `tokenizer_config.json`, else True). Ignored for the other formats, whose files
                define their own normalisation.
        Returns:
            The Tokenizer.
        Raises:
            FileNotFoundError: the folder does not exist or holds none of these files.
        """
        d = Path(directory)
        looked = f"{OUR_CONFIG} + {BACKEND_FILE}, {BACKEND_FILE}, vocab.json + merges.txt, vocab.txt"
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory {d} does not exist (looked for {looked})")
        if (d / OUR_CONFIG).is_file() and (d / BACKEND_FILE).is_file():
            tok = _load_ours(d)
        elif (d / BACKEND_FILE).is_file():
            tok = _load_hf_json(d)
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            tok = _load_bpe_files(d)
        elif (d / "vocab.txt").is_file():
            tok = _load_wordpiece(d, lowercase)
        else:
            present = sorted(p.name for p in d.iterdir())[:20]
            raise FileNotFoundError(f"no tokenizer files in {d}: looked for {looked}; found {present}")
        if context_length is not None:
            tok.context_length = context_length
        if pad_id is not None:
            if not 0 <= pad_id < tok.vocab_size:
                raise ValueError(f"pad_id={pad_id} is outside the vocabulary (size {tok.vocab_size})")
            tok.config.pad_id = int(pad_id)
        return tok


# --------------------------------------------------------------------------- loaders


def _load_ours(d: Path) -> Tokenizer:
    path = d / OUR_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    tokens = raw.pop("tokens", {})
    known = {f.name for f in fields(TokenizerConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    backend = _Backend.from_file(str(d / BACKEND_FILE))
    cfg = TokenizerConfig(**raw)
    for key, token in tokens.items():
        actual = backend.token_to_id(token)
        if getattr(cfg, key, None) is not None and actual is not None and actual != getattr(cfg, key):
            raise ValueError(f"{path}: {key}={getattr(cfg, key)} but {d / BACKEND_FILE} gives {token!r} id {actual}")
    return Tokenizer(backend, cfg)


def _read_hf_specials(d: Path) -> dict:
    """Special tokens and flags from HF's special_tokens_map.json and tokenizer_config.json."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        path = d / name
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
        for key in ("bos_token", "eos_token", "cls_token", "sep_token", "pad_token", "unk_token", "mask_token"):
            v = raw.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[key] = v
        for key in ("do_lower_case", "model_max_length", "tokenize_chinese_chars", "strip_accents"):
            if key in raw:
                out[key] = raw[key]
    return out


def _has_lowercase(backend: _Backend) -> bool:
    """Whether the backend's normaliser lower-cases (a Lowercase step or BertNormalizer(lowercase))."""
    norm = json.loads(backend.to_str()).get("normalizer")

    def walk(n) -> bool:
        if not isinstance(n, dict):
            return False
        if n.get("type") == "Lowercase" or (n.get("type") == "BertNormalizer" and n.get("lowercase")):
            return True
        return any(walk(c) for c in n.get("normalizers", []))

    return walk(norm)


def _register_specials(backend: _Backend, tokens: Iterable[str | None]) -> None:
    """Mark tokens already in the vocabulary as special, so decode skips them and the input
    text is split on them; adding an existing token keeps its id."""
    present = [t for t in dict.fromkeys(tokens) if t is not None and backend.token_to_id(t) is not None]
    if present:
        backend.add_special_tokens(present)


def _context_length(specials: dict) -> int:
    n = specials.get("model_max_length")
    return int(n) if isinstance(n, (int, float)) and 2 <= n <= 4096 else 77


def _config_from_specials(backend: _Backend, specials: dict, where: Path) -> TokenizerConfig:
    """Work out style and special ids from HF special-token names (or the usual defaults)."""
    vocab = backend.get_vocab(with_added_tokens=True)

    def pick(*names):
        for n in names:
            if n is not None and n in vocab:
                return n
        return None

    cls_tok = pick(specials.get("cls_token"), BERT_CLS)
    sep_tok = pick(specials.get("sep_token"), BERT_SEP)
    if cls_tok and sep_tok:
        pad_tok = pick(specials.get("pad_token"), BERT_PAD)
        if pad_tok is None:
            raise ValueError(f"{where}: BERT-style tokenizer without a pad token ([PAD] or pad_token)")
        unk_tok, mask_tok = pick(specials.get("unk_token"), BERT_UNK), pick(specials.get("mask_token"), BERT_MASK)
        _register_specials(backend, [cls_tok, sep_tok, pad_tok, unk_tok, mask_tok])
        return TokenizerConfig(style="bert", bos_id=vocab[cls_tok], eos_id=vocab[sep_tok], pad_id=vocab[pad_tok],
                               context_length=_context_length(specials), lowercase=_has_lowercase(backend),
                               unk_id=vocab.get(unk_tok), mask_id=vocab.get(mask_tok))
    eos_tok = pick(specials.get("eos_token"), CLIP_EOT)
    bos_tok = pick(specials.get("bos_token"), CLIP_SOT, eos_tok)  # GPT-2 vocabularies have only <|endoftext|>
    if eos_tok is None:
        raise ValueError(f"{where}: cannot find start/end tokens: neither {BERT_CLS}/{BERT_SEP} nor "
                         f"{CLIP_SOT}/{CLIP_EOT} (or bos_token/eos_token in tokenizer_config.json)")
    pad_tok = pick(specials.get("pad_token"))
    unk_tok = pick(specials.get("unk_token"))
    # HF pads CLIP with EOT; we keep OpenAI's id 0 unless the vocabulary has a dedicated pad token.
    pad_id = vocab[pad_tok] if pad_tok not in (None, bos_tok, eos_tok, unk_tok) else 0
    _register_specials(backend, [bos_tok, eos_tok, pad_tok if pad_id else None])
    return TokenizerConfig(style="clip", bos_id=vocab[bos_tok], eos_id=vocab[eos_tok], pad_id=pad_id,
                           context_length=_context_length(specials), lowercase=_has_lowercase(backend),
                           unk_id=vocab.get(unk_tok) if unk_tok else None)


def _load_hf_json(d: Path) -> Tokenizer:
    try:
        backend = _Backend.from_file(str(d / BACKEND_FILE))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a plain Exception on bad JSON
        raise ValueError(f"{d / BACKEND_FILE}: cannot be read as a tokenizers file ({e})") from None
    backend.post_processor = None  # we add the specials ourselves
    return Tokenizer(backend, _config_from_specials(backend, _read_hf_specials(d), d / BACKEND_FILE))


def clip_bpe_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str | None = CLIP_EOT,
                     lowercase: bool = True) -> _Backend:
    """A `tokenizers` pipeline that splits text as OpenAI's CLIP BPE does: NFC, whitespace
    collapsed, lower-cased, split by `CLIP_SPLIT`, bytes mapped to printable characters, BPE with
    `</w>` on the last symbol of each word.

    Args:
        vocab: token -> id (byte-level symbols, with `</w>` variants).
        merges: merge pairs in priority order.
        unk_token: token for symbols missing from the vocabulary (CLIP uses EOT).
        lowercase: lower-case the input (OpenAI's CLIP always does).
    Returns:
        The backend tokenizer (no post-processor).
    """
    unk = unk_token if unk_token in vocab else None
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=CLIP_EOW,
                                  continuing_subword_prefix="", unk_token=unk, fuse_unk=False))
    steps = [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")]
    backend.normalizer = normalizers.Sequence(steps + ([normalizers.Lowercase()] if lowercase else []))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        # The split above already made the words; ByteLevel only maps bytes to symbols.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend


# --------------------------------------------------------------------------- the bundled CLIP BPE

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"   # package data in polymodal/data/vocab (see its README)
CLIP_VOCAB_SIZE = 49408                            # 256 bytes + 256 "</w>" forms + 48894 merges + SOT + EOT
CLIP_SOT_ID, CLIP_EOT_ID = 49406, 49407


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in the order of the CLIP vocabulary: the bytes
    that are printable Latin-1 characters first (as themselves, in byte order), then every other byte
    as code point 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP BPE vocabulary (token -> id) and merges, derived from the bundled merges file.

    The ids follow OpenAI's layout: byte symbols, the same with `</w>`, one token per merge (in merge
    order), then `<|startoftext|>` and `<|endoftext|>`. Read once per process.

    Returns:
        (vocab with 49408 entries, the 48894 merge pairs).
    Raises:
        FileNotFoundError: the package data file is missing (a broken install; reinstall polymodal).
    """
    path = resources.files(__package__) / "vocab" / CLIP_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundled CLIP vocabulary is missing; reinstall polymodal "
                                f"(it is package data: polymodal/data/vocab/*)")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]   # line 0 is a version header
    symbols = byte_symbols()
    tokens = symbols + [s + CLIP_EOW for s in symbols] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{path}: gives {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}; the file is damaged")
    return vocab, merges


def clip_bpe_tokenizer(context_length: int = 77) -> Tokenizer:
    """OpenAI's CLIP tokenizer from the bundled vocabulary (no files or network needed).

    Same ids as `transformers.CLIPTokenizer` and OpenCLIP's `SimpleTokenizer` for NFC text; rows are
    ``[SOT=49406] text [EOT=49407] 0 0 ...`` (padded with 0 as OpenAI and OpenCLIP do).

    Args:
        context_length: the row length including SOT and EOT.
    Returns:
        The Tokenizer (style "clip", vocabulary size 49408).
    """
    vocab, merges = clip_vocab_and_merges()
    backend = clip_bpe_backend(dict(vocab), list(merges), unk_token=CLIP_EOT)
    _register_specials(backend, [CLIP_SOT, CLIP_EOT])
    return Tokenizer(backend, TokenizerConfig(style="clip", bos_id=CLIP_SOT_ID, eos_id=CLIP_EOT_ID, pad_id=0,
                                              context_length=context_length, lowercase=True))


def bundled_tokenizer(vocab_size: int, eot_token_id: int, pool: str = "eot",
                      context_length: int = 77) -> Tokenizer | None:
    """The bundled tokenizer that fits a text tower with this vocabulary, or None when none does.

    Args:
        vocab_size: the tower's vocabulary size.
        eot_token_id: its end-of-text id (not checked for `pool="argmax"`: legacy HF CLIP configs give 2).
        pool: the tower's pooling ("eot", "argmax", "cls").
        context_length: the row length to give the tokenizer.
    Returns:
        `clip_bpe_tokenizer()` for the OpenAI CLIP vocabulary (49408 ids, EOT 49407), else None.
    """
    if vocab_size == CLIP_VOCAB_SIZE and (eot_token_id == CLIP_EOT_ID or pool == "argmax"):
        return clip_bpe_tokenizer(context_length)
    return None


def is_clip_bpe(tokenizer) -> bool:
    """True for a tokenizer with OpenAI's CLIP vocabulary and merges (the one transformers' `CLIPTokenizer`
    reads from vocab.json + merges.txt)."""
    if not isinstance(tokenizer, Tokenizer) or tokenizer.vocab_size != CLIP_VOCAB_SIZE:
        return False
    model = json.loads(tokenizer.backend.to_str()).get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != CLIP_EOW:
        return False
    vocab, merges = clip_vocab_and_merges()
    theirs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model.get("vocab") == vocab and theirs == merges


class TokenizerMissingError(ValueError):
    """A model without a tokenizer was asked to tokenize; the message names the model and the fix."""


class MissingTokenizer:
    """Stands in for the tokenizer of a model that has none, so that using it says why and what to do.

    Falsy, saves nothing, and raises `TokenizerMissingError` on any use (calling it, encoding, reading
    its ids). Code that only needs to know whether there is a tokenizer can test `bool(model.tokenizer)`.

    Args:
        message: the one-line error, e.g. "model config 'small' has no bundled tokenizer; ...".
    """

    def __init__(self, message: str):
        self._message = message
        self._context_length = None

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"MissingTokenizer({self._message!r})"

    def __call__(self, *args, **kwargs):
        raise TokenizerMissingError(self._message)

    def __getattr__(self, name):
        if name.startswith("__"):       # copy / pickle probing: behave like a plain object
            raise AttributeError(name)
        raise TokenizerMissingError(self._message)

    @property
    def context_length(self):
        return self._context_length

    @context_length.setter
    def context_length(self, value) -> None:      # set by attach_processors; kept for a later real tokenizer
        self._context_length = value

    def save(self, directory) -> None:
        """Nothing to write: the saved model has no tokenizer files, as before."""


def has_tokenizer(model) -> bool:
    """Whether `model.tokenizer` is a usable tokenizer (not None, not a `MissingTokenizer`)."""
    return bool(getattr(model, "tokenizer", None))


def _load_bpe_files(d: Path) -> Tokenizer:
    vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
    try:
        vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{vocab_path} / {merges_path}: cannot be read as BPE files ({e})") from None
    specials = _read_hf_specials(d)
    if any(tok.endswith(CLIP_EOW) for tok in vocab):
        lowercase = specials.get("do_lower_case", True) is not False
        backend = clip_bpe_backend(vocab, merges, unk_token=specials.get("unk_token", CLIP_EOT), lowercase=lowercase)
    else:  # GPT-2 style: the leading space is part of the next word ("Ġ"), no lower-casing
        backend = _Backend(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if specials.get("do_lower_case"):
            backend.normalizer = normalizers.Lowercase()
    return Tokenizer(backend, _config_from_specials(backend, specials, vocab_path))


def bert_wordpiece_backend(vocab: dict[str, int], lowercase: bool = True, tokenize_chinese_chars: bool = True,
                           strip_accents: bool | None = None, unk_token: str = BERT_UNK) -> _Backend:
    """BERT's WordPiece pipeline: clean control characters, split CJK characters one per word,
    optionally lower-case and strip accents (default: strip when lower-casing), split on
    whitespace and punctuation, greedy longest-match WordPiece with `##` continuations.

    Returns:
        The backend tokenizer (no post-processor).
    """
    backend = _Backend(models.WordPiece(vocab=vocab, unk_token=unk_token, max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _load_wordpiece(d: Path, lowercase: bool | None) -> Tokenizer:
    path = d / "vocab.txt"
    vocab: dict[str, int] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").split("\n")):
        token = line.rstrip("\r")
        if token or i == 0:
            vocab.setdefault(token, i)  # a repeated line keeps its first id, as HF does
    specials = _read_hf_specials(d)
    if lowercase is None:
        lowercase = bool(specials.get("do_lower_case", True))
    unk = specials.get("unk_token", BERT_UNK)
    if unk not in vocab:
        raise ValueError(f"{path}: the unknown token {unk!r} is not in the vocabulary")
    backend = bert_wordpiece_backend(vocab, lowercase=lowercase,
                                     tokenize_chinese_chars=specials.get("tokenize_chinese_chars", True),
                                     strip_accents=specials.get("strip_accents"), unk_token=unk)
    cfg = _config_from_specials(backend, specials, path)
    cfg.lowercase = lowercase
    return Tokenizer(backend, cfg)


# --------------------------------------------------------------------------- training


def _special_tokens(style: str) -> list[str]:
    if style == "clip":
        return [CLIP_PAD, CLIP_SOT, CLIP_EOT]  # ids 0, 1, 2: a dedicated pad keeps id 0 free of text
    return [BERT_PAD, BERT_UNK, BERT_CLS, BERT_SEP, BERT_MASK]


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 4096, style: str | None = None,
                    lowercase: bool = True, context_length: int = 77, min_frequency: int = 2) -> Tokenizer:
    """Train a tokenizer on a corpus (deterministic for the same corpus and settings).

    "bpe" is byte-level BPE in GPT-2 form (a leading space belongs to the next word, so decoding
    gives back the normalised text exactly), with each CJK ideograph split off as its own word
    first: merges then build whole characters out of their UTF-8 bytes instead of gluing runs
    of Chinese text into one long word. No input is ever unknown. "wordpiece" is BERT's
    pipeline (`bert_wordpiece_backend`) with pieces learned as in `_train_wordpiece`; every
    character seen in the corpus (and printable ASCII) is in the alphabet.

    Args:
        texts: the corpus, an iterable of strings (read once).
        kind: "bpe" or "wordpiece".
        vocab_size: target vocabulary size including specials (the alphabet is always kept).
        style: "clip" (SOT/EOT, default for bpe) or "bert" (CLS/SEP/PAD/UNK/MASK, default for wordpiece).
        lowercase: lower-case the text before tokenising.
        context_length: the tokenizer's default row length.
        min_frequency: a merge must occur at least this often.
    Returns:
        The trained Tokenizer. Specials: clip style <|pad|>=0, <|startoftext|>=1, <|endoftext|>=2;
        bert style [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
    """
    if kind not in ("bpe", "wordpiece"):
        raise ValueError(f"kind must be 'bpe' or 'wordpiece', got {kind!r}")
    style = style or ("clip" if kind == "bpe" else "bert")
    if style not in ("clip", "bert"):
        raise ValueError(f"style must be 'clip' or 'bert', got {style!r}")
    specials = _special_tokens(style)
    if kind == "bpe":
        backend = _Backend(models.BPE())
        steps = [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
        backend.normalizer = normalizers.Sequence(steps + ([normalizers.Lowercase()] if lowercase else []))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            # " ?X" keeps the space before a CJK character with it, as GPT-2 does for words.
            pre_tokenizers.Split(Regex(f" ?[{CJK_CLASS}]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        backend.train_from_iterator(bounded_words(texts), trainer=trainer)
    else:
        if BERT_UNK not in specials:
            specials = [*specials, BERT_UNK]
        backend = _train_wordpiece(bounded_words(texts), vocab_size, specials, lowercase, min_frequency)
    ids = {t: backend.token_to_id(t) for t in specials}
    if style == "clip":
        cfg = TokenizerConfig(style="clip", bos_id=ids[CLIP_SOT], eos_id=ids[CLIP_EOT], pad_id=ids[CLIP_PAD],
                              context_length=context_length, lowercase=lowercase, unk_id=ids.get(BERT_UNK))
    else:
        cfg = TokenizerConfig(style="bert", bos_id=ids[BERT_CLS], eos_id=ids[BERT_SEP], pad_id=ids[BERT_PAD],
                              context_length=context_length, lowercase=lowercase, unk_id=ids[BERT_UNK],
                              mask_id=ids[BERT_MASK])
    return Tokenizer(backend, cfg)


_WORD_START = "\u2581"  # marks word-initial symbols while learning WordPiece pieces with BPE


MAX_TRAIN_WORD_CHARS = 256   # runs without white space longer than this are cut for training (encoding is unchanged)


def bounded_words(texts: Iterable[str], limit: int = MAX_TRAIN_WORD_CHARS):
    """The texts with every run of more than `limit` non-space characters split into `limit`-sized pieces.

    Tokenizer training counts pairs within words, so one megabyte "word" costs far more than a megabyte of
    ordinary words (minutes instead of seconds); merges never reach such lengths, so the vocabulary learnt
    from real text is the same.
    """
    long_run = re.compile(rf"\S{{{limit + 1},}}")
    for t in texts:
        yield long_run.sub(lambda m: " ".join(m.group(0)[i:i + limit] for i in range(0, len(m.group(0)), limit)), t)


def _train_wordpiece(texts: Iterable[str], vocab_size: int, specials: list[str], lowercase: bool,
                     min_frequency: int) -> _Backend:
    """Learn a WordPiece vocabulary deterministically.

    tokenizers' WordPieceTrainer numbers its "##x" symbols in hash-map order, so ties between
    equally frequent merges (common on small corpora) change from run to run. Instead we learn
    BPE merges on words marked with a leading "\u2581" (all starting symbols are then alphabet
    characters, which the trainer numbers in sorted order), and read each learned symbol as a
    WordPiece piece: "\u2581abc" -> "abc" (word start), "abc" -> "##abc" (inside a word). Every
    character of the corpus and printable ASCII is kept in both forms (even beyond `vocab_size`),
    so nothing seen in training becomes [UNK]; the most frequent merges fill the rest.
    """
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                            lowercase=lowercase)
    learner = _Backend(models.BPE())
    learner.normalizer = normalizer
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(),
        pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="always", split=False),
    ])
    # Printable ASCII is always in the alphabet, so unseen English punctuation is not [UNK].
    ascii_chars = sorted({(c.lower() if lowercase else c) for c in map(chr, range(33, 127))})
    learner.train_from_iterator((t for t in texts), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, initial_alphabet=ascii_chars, show_progress=False))
    symbols = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1])]
    chars = [t for t in symbols if len(t) == 1 and t != _WORD_START]
    base = list(dict.fromkeys([*specials, *(p for c in chars for p in (c, "##" + c))]))
    merged = []
    for t in symbols:
        if len(t) > 1:
            piece = t[1:] if t.startswith(_WORD_START) else "##" + t
            if len(piece) > 1 and piece not in base:
                merged.append(piece)
    pieces = base + list(dict.fromkeys(merged))[: max(0, vocab_size - len(base))]
    backend = bert_wordpiece_backend({p: i for i, p in enumerate(pieces)}, lowercase=lowercase)
    backend.add_special_tokens(specials)
    return backend


def trim_padding(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Drop trailing columns that are padding in every row: (B, L) -> (B, L'), saving text compute."""
    if ids.ndim < 2 or ids.shape[-1] == 0:
        return ids
    flat = ids.reshape(-1, ids.shape[-1])
    used = (flat != pad_id).any(dim=0).nonzero()
    keep = int(used.max()) + 1 if len(used) else 1
    return ids[..., :keep]
