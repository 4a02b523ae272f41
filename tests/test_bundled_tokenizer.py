"""The bundled CLIP BPE tokenizer: ids equal to transformers' CLIPTokenizer, attached to OpenAI-shaped configs."""
import gzip
import hashlib
import json
from importlib import resources

import pytest
import torch

import polymodal
from polymodal.data.text import (CLIP_VOCAB_FILE, MissingTokenizer, TokenizerMissingError, bundled_tokenizer,
                                 clip_bpe_tokenizer, has_tokenizer, is_clip_bpe)

VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"   # see polymodal/data/vocab/README.md

TEXTS = [
    "a photo of a cat",
    "A PHOTO of a Cat",                                  # case
    "Hello, World!!! It's 2024... (really?) #tag @me",    # punctuation, contractions, digits
    "they're here; we'll see -- don't; I'd've",
    "naïve café – Zürich, Ångström, façade",             # accents, en dash
    "e\u0301te\u0301 (decomposed accents)",              # NFD input: both normalise to NFC
    "日本語のテキスト と 中文字符",                         # CJK
    "emoji 🐱🚗 and symbols ©®™ ½",
    "  lots   of\tspace\nand lines  ",
    "<|endoftext|> a special in the text",
    " ".join(["word"] * 120),                            # longer than 77: truncated, EOT kept
    "x" * 400,
    "",                                                  # empty: SOT EOT
]


def _byte_table() -> list[str]:
    """Printable stand-ins for the 256 bytes, in CLIP vocabulary order (written here, independently)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i, _ in enumerate(others)]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers.CLIPTokenizer from a vocab.json / merges.txt derived here from the bundled merges file."""
    transformers = pytest.importorskip("transformers")
    path = resources.files("polymodal.data") / "vocab" / CLIP_VOCAB_FILE
    with path.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = _byte_table()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("hf_clip_tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return transformers.CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


def test_vocabulary_file_is_the_recorded_one():
    path = resources.files("polymodal.data") / "vocab" / CLIP_VOCAB_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256


def test_known_openai_ids():
    # OpenAI CLIP's ids for this prompt, as published with the original tokenizer.
    tok = clip_bpe_tokenizer()
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert tok.vocab_size == 49408 and tok.decode(tok("A Photo of a CAT!")[0]) == "a photo of a cat !"


def test_ids_equal_transformers_clip_tokenizer(hf_tokenizer):
    tok = clip_bpe_tokenizer()
    ours, mask = tok.tokenize_with_mask(TEXTS)
    theirs = hf_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert ours.shape == theirs["input_ids"].shape == (len(TEXTS), 77)
    assert torch.equal(mask, theirs["attention_mask"].bool())
    # Same ids on real tokens; ours pads with 0 (OpenAI / OpenCLIP), transformers with EOT.
    assert torch.equal(ours[mask], theirs["input_ids"][mask])
    assert (ours[~mask] == 0).all()
    last = mask.sum(1) - 1
    assert (ours[:, 0] == 49406).all() and (ours.gather(1, last[:, None]) == 49407).all()
    long_row = ours[TEXTS.index(" ".join(["word"] * 120))]
    assert mask[TEXTS.index("x" * 400)].all() and long_row[-1] == 49407 and long_row[1] == long_row[75]
    for text in TEXTS[:9]:       # content ids without specials agree too, at any length
        assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_shorter_context_truncates_like_transformers(hf_tokenizer):
    tok = clip_bpe_tokenizer(context_length=16)
    ours = tok(TEXTS)
    theirs = hf_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    mask = theirs["attention_mask"].bool()
    assert torch.equal(ours[mask], theirs["input_ids"][mask])


def test_bundled_tokenizer_only_for_the_clip_vocabulary():
    assert bundled_tokenizer(49408, 49407) is not None
    assert bundled_tokenizer(49408, 2, pool="argmax") is not None          # legacy HF CLIP configs
    assert bundled_tokenizer(4096, 4095) is None and bundled_tokenizer(49408, 5) is None
    assert is_clip_bpe(clip_bpe_tokenizer())


def test_openai_shaped_named_config_has_the_tokenizer_and_the_readme_snippet_runs():
    from PIL import Image
    torch.manual_seed(0)
    model = polymodal.load_model("vit-b-16", overrides={"vision.layers": 1, "text.layers": 1})
    assert has_tokenizer(model) and model.tokenizer.context_length == 77
    pixels = model.image_transform(Image.new("RGB", (50, 40), (200, 30, 30)))[None]
    ids = model.tokenizer(["a photo of a cat", "a dog"])
    with torch.no_grad():
        sims = model.encode_image(pixels) @ model.encode_text(ids).T
    assert sims.shape == (1, 2) and torch.isfinite(sims).all()


def test_config_without_a_tokenizer_says_so_in_one_line(tmp_path):
    model = polymodal.load_model("tiny")
    assert isinstance(model.tokenizer, MissingTokenizer) and not has_tokenizer(model)
    with pytest.raises(TokenizerMissingError) as err:
        model.tokenizer(["a photo of a cat"])
    msg = str(err.value)
    assert "'tiny'" in msg and "train_tokenizer" in msg and "\n" not in msg
    with pytest.raises(TokenizerMissingError, match="'tiny'"):
        model.tokenizer.bos_id
    model.save_pretrained(tmp_path / "m")                 # saving still works: no tokenizer files
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    assert polymodal.load_model(tmp_path / "m").tokenizer is None


def test_given_tokenizer_wins_over_the_bundled_one():
    from polymodal.data.text import train_tokenizer
    tok = train_tokenizer(["a red cat", "a blue dog"] * 5, vocab_size=300)
    model = polymodal.load_model("tiny", tokenizer=tok)
    assert model.tokenizer is tok and model.config.text.vocab_size == tok.vocab_size
