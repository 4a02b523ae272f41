"""Tokenizers: layout of specials, file formats and parity with transformers, training."""
import json
from collections import Counter

import pytest
import regex
import torch

from polymodal.data.text import Tokenizer, train_tokenizer

# --------------------------------------------------------------------------- a tiny CLIP BPE, written here


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE: printable Latin-1 bytes stand
    for themselves, the other bytes get code points from 256 upwards in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


B2U = _bytes_to_unicode()
CLIP_PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
CORPUS = ("a photo of a cat sitting on the table . a photo of two dogs in the park . "
          "the cat's toy is red ; a red car parked near the tree . photos of cats and dogs").split()


def _words(text):
    text = " ".join(text.split()).lower()
    return ["".join(B2U[b] for b in w.encode("utf-8")) for w in CLIP_PATTERN.findall(text)]


def _symbols(word):
    return list(word[:-1]) + [word[-1] + "</w>"]


def _learn_merges(n):
    """Greedy BPE on CORPUS: merge the most frequent adjacent pair (ties: smallest pair)."""
    words = Counter(tuple(_symbols(w)) for t in CORPUS for w in _words(t))
    merges = []
    for _ in range(n):
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


def _bpe(word, ranks):
    """Reference BPE: repeatedly merge the adjacent pair with the best (lowest) rank."""
    syms = _symbols(word)
    while len(syms) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(syms, syms[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        syms = syms[:i] + [syms[i] + syms[i + 1]] + syms[i + 2:]
    return syms


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_bpe")
    merges = _learn_merges(60)
    alphabet = [B2U[b] for b in range(256)]
    vocab_list = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                  encoding="utf-8")
    return d, vocab, {m: r for r, m in enumerate(merges)}


def _ref_clip_ids(text, vocab, ranks):
    return [vocab[s] for w in _words(text) for s in _bpe(w, ranks)]


SENTENCES = ["A photo of a cat sitting on the table.", "Two DOGS   in the park!!", "the cat's toy is red; 42 cats",
             "photos of café dogs, 一只猫", "parked near the tree they'll go", "", "   ", "a" * 30 + " " + "b?" * 5]


# --------------------------------------------------------------------------- CLIP files


def test_clip_bpe_matches_reference_and_transformers(clip_dir):
    d, vocab, ranks = clip_dir
    tok = Tokenizer.from_dir(d)
    hf = pytest.importorskip("transformers").CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    assert tok.style == "clip" and tok.bos_id == vocab["<|startoftext|>"] and tok.eos_id == vocab["<|endoftext|>"]
    for s in SENTENCES:
        ref = _ref_clip_ids(s, vocab, ranks)
        assert tok.encode(s) == ref, s
        assert hf(s, add_special_tokens=False)["input_ids"] == ref, s
    # merges were used: "photo" is one token, not 5 bytes
    assert len(tok.encode("photo")) == 1


@pytest.mark.parametrize("L", [6, 12, 77])
def test_clip_rows_match_transformers_with_truncation(clip_dir, L):
    d, vocab, _ = clip_dir
    eot = vocab["<|endoftext|>"]
    tok = Tokenizer.from_dir(d, pad_id=eot)  # HF's CLIPTokenizer pads with EOT
    hf = pytest.importorskip("transformers").CLIPTokenizer.from_pretrained(str(d), local_files_only=True)
    ours = tok(SENTENCES, context_length=L)
    ref = hf(SENTENCES, padding="max_length", truncation=True, max_length=L, return_tensors="pt")["input_ids"]
    assert torch.equal(ours, ref)


def test_clip_default_pad_is_zero_like_openai(clip_dir):
    d, vocab, ranks = clip_dir
    tok = Tokenizer.from_dir(d)
    ids, mask = tok.tokenize_with_mask(["a cat"], context_length=8)
    content = _ref_clip_ids("a cat", vocab, ranks)
    assert ids[0].tolist() == [tok.bos_id, *content, tok.eos_id] + [0] * (6 - len(content))
    assert mask[0].tolist() == [True] * (len(content) + 2) + [False] * (6 - len(content))
    assert tok.decode(ids[0]) == "a cat"


# --------------------------------------------------------------------------- specials layout


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_vocab")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", "a", "the", "cat", "dog", "play",
              "##ing", "##s", "photo", "of", "on", "table", "cafe", "in", "park", "un", "##believ", "##able",
              "猫", "狗", "在", "桌", "子", "上", "一", "只", "。", "，"]
    (d / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return d


def test_short_and_long_rows_keep_start_and_end(bert_dir):
    tok = Tokenizer.from_dir(bert_dir)
    short, long = "a cat", "the dog playing in the park on a table " * 12
    out = tok([short, long], context_length=10)
    assert out.shape == (2, 10)
    s_ids, l_ids = tok.encode(short), tok.encode(long)
    assert out[0].tolist() == [tok.cls_id, *s_ids, tok.sep_id] + [tok.pad_id] * (8 - len(s_ids))
    assert out[1].tolist() == [tok.cls_id, *l_ids[:8], tok.sep_id]
    single = tok(long)  # a str gives a (1, L) batch at the default context length
    assert single.shape == (1, tok.context_length) and single[0, -1] == tok.sep_id
    assert single.dtype == torch.long
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=1)


# --------------------------------------------------------------------------- BERT vocab.txt


BERT_SENTENCES = ["A cat playing on the table.", "Dogs in the PARK, unbelievable!", "Café photo of a dog?",
                  "一只猫在桌子上。", "猫 and 狗，在 park", "xyz unknown words", "  spaced   out  "]


@pytest.mark.parametrize("lower", [True, False])
def test_wordpiece_matches_transformers_bert(bert_dir, lower):
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # pure Python

    (bert_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    try:
        tok = Tokenizer.from_dir(bert_dir)
    finally:
        (bert_dir / "tokenizer_config.json").unlink()
    assert tok.style == "bert" and tok.lowercase is lower
    legacy = BertTokenizerLegacy(str(bert_dir / "vocab.txt"), do_lower_case=lower)
    fast = transformers.BertTokenizer(vocab=str(bert_dir / "vocab.txt"), do_lower_case=lower)
    L = 9
    ours = tok(BERT_SENTENCES, context_length=L)
    for ref in (legacy, fast):
        for s in BERT_SENTENCES:
            assert tok.encode(s) == ref(s, add_special_tokens=False)["input_ids"], s
        expected = ref(BERT_SENTENCES, padding="max_length", truncation=True, max_length=L,
                       return_tensors="pt")["input_ids"]
        assert torch.equal(ours, expected)
    # Chinese characters are single tokens, not [UNK]
    zh = tok.encode("一只猫在桌子上")
    assert len(zh) == 7 and tok.unk_id not in zh
    assert tok.decode(tok("一只猫在桌子上。")[0]) == "一只猫在桌子上。"


# --------------------------------------------------------------------------- tokenizer.json and round trips


def test_hf_saved_dirs_load_from_tokenizer_json(clip_dir, bert_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    d, vocab, _ = clip_dir
    for src, cls, style in ((d, transformers.CLIPTokenizer, "clip"), (bert_dir, transformers.BertTokenizer, "bert")):
        hf = cls.from_pretrained(str(src), local_files_only=True)
        out = tmp_path / style
        hf.save_pretrained(str(out))
        for name in ("vocab.json", "merges.txt", "vocab.txt"):  # force the tokenizer.json path
            (out / name).unlink(missing_ok=True)
        tok = Tokenizer.from_dir(out)
        assert tok.style == style
        texts = SENTENCES if style == "clip" else BERT_SENTENCES
        ref = Tokenizer.from_dir(src)
        assert torch.equal(tok(texts, context_length=12), ref(texts, context_length=12))
        assert tok.batch_decode(tok(texts[:3])) == ref.batch_decode(ref(texts[:3]))


@pytest.mark.parametrize("which", ["clip", "bert"])
def test_save_and_from_dir_round_trip(clip_dir, bert_dir, tmp_path, which):
    src = clip_dir[0] if which == "clip" else bert_dir
    tok = Tokenizer.from_dir(src, context_length=20)
    tok.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    back = Tokenizer.from_dir(tmp_path / "saved")
    texts = SENTENCES + BERT_SENTENCES
    assert back.context_length == 20 and back.style == tok.style
    assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)
    assert torch.equal(back(texts), tok(texts))


def test_missing_or_empty_dir_names_dir_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*vocab\.txt"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json.*merges\.txt.*vocab\.txt"):
        Tokenizer.from_dir(tmp_path / "empty")


# --------------------------------------------------------------------------- training

EN = ["a photo of a {} on the {}", "two {}s playing near the {}", "the {} is next to a small {}",
      "a close up of the {} and the {}"]
ZH = ["一只{}在{}上", "两只{}在{}旁边玩", "{}和{}的照片", "桌子上有一只{}和一个{}"]
EN_N = ["cat", "dog", "car", "tree", "table", "bird", "boat", "house", "chair", "flower"]
ZH_N = ["猫", "狗", "汽车", "树", "桌子", "鸟", "船", "房子", "椅子", "花"]


def _captions(n=200):
    out = []
    for i in range(n):
        a, b = (i * 7) % 10, (i * 3 + 1) % 10
        if i % 2:
            out.append(ZH[i % 4].format(ZH_N[a], ZH_N[b]))
        elif i % 5 == 0:
            out.append(EN[i % 4].format(EN_N[a], EN_N[b]) + " 和 " + ZH_N[b])
        else:
            out.append(EN[i % 4].format(EN_N[a], EN_N[b]).capitalize() + ".")
    return out


def _squash(text):
    return "".join(text.lower().split())


def _cjk(ch):
    return "\u4e00" <= ch <= "\u9fff"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_trained_tokenizer_round_trips_mixed_text(kind):
    caps = _captions()
    tok = train_tokenizer(caps, kind=kind, vocab_size=600)
    assert tok.style == ("clip" if kind == "bpe" else "bert")
    rows = tok(caps, context_length=64)
    assert (rows[:, 0] == tok.bos_id).all()
    for cap, text in zip(caps, tok.batch_decode(rows)):
        assert _squash(text) == _squash(cap)
    if kind == "bpe":  # byte-level BPE gives back the (lower-cased) text exactly
        assert tok.decode(tok(caps[2])[0]) == caps[2].lower()
    for cap in caps:
        ids = tok.encode(cap)
        if tok.unk_id is not None:
            assert tok.unk_id not in ids
        for i in ids:  # pre-splitting keeps every CJK character in a token of its own
            piece = tok.decode([i])
            assert sum(map(_cjk, piece)) <= 1, (cap, piece)
    for ch in "猫狗树鸟":  # frequent characters are single tokens
        assert len(tok.encode(ch)) == 1, ch


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_training_is_deterministic(kind):
    a = train_tokenizer(_captions(), kind=kind, vocab_size=500)
    b = train_tokenizer(_captions(), kind=kind, vocab_size=500)
    assert a.backend.to_str() == b.backend.to_str()
    assert a.backend.get_vocab_size() <= 500


def test_trained_tokenizer_saves_and_loads(tmp_path):
    tok = train_tokenizer(_captions(), kind="bpe", vocab_size=400, context_length=16)
    tok.save(tmp_path)
    back = Tokenizer.from_dir(tmp_path)
    assert back.pad_id == tok.pad_id == 0 and back.context_length == 16
    assert torch.equal(back(_captions()), tok(_captions()))


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_saved_tokenizer_loads_in_transformers_autotokenizer_with_the_same_ids(tmp_path, kind):
    from transformers import AutoTokenizer

    caps = _captions() + ["a very long caption " * 20]
    tok = train_tokenizer(caps, kind=kind, vocab_size=500, context_length=24)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    got = hf(caps, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    assert torch.equal(got["input_ids"], tok(caps))
    assert hf.pad_token_id == tok.pad_id and hf.eos_token_id == tok.eos_id
    # Our own reader still prefers polymodal_tokenizer.json and is unaffected by the post-processor.
    assert torch.equal(Tokenizer.from_dir(tmp_path)(caps), tok(caps))


def test_tokenizer_training_cuts_runs_without_spaces_and_keeps_ordinary_words():
    """A megabyte without white space stalled tokenizer training for minutes (issue 30, finding 4)."""
    from polymodal.data.text import bounded_words
    assert list(bounded_words(["a bb " + "x" * 7], limit=3)) == ["a bb xxx xxx x"]
    assert list(bounded_words(["ordinary words stay"])) == ["ordinary words stay"]     # the default: 256
    texts = ["a red circle moves left"] * 20
    plain = train_tokenizer(texts, kind="bpe", vocab_size=80)
    with_blob = train_tokenizer(texts + ["q" * 1_000_000], kind="bpe", vocab_size=80)
    assert plain("a red circle").tolist() == with_blob("a red circle").tolist()
