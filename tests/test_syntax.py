"""Caption nodes -> token positions (BPE, WordPiece, split words, truncation, read-outs), the parse cache, spaCy rules."""
import json

import pytest
import torch

from polymodal.data.syntax import (ParseCache, batch_nodes, cache_path, node_token_positions, parse_chinese,
                                   readout_shift)
from polymodal.data.text import train_tokenizer

CORPUS = ["a small red striped circle moves to the left", "a large star becomes larger",
          "a blue square does not move", "a green dotted triangle fades from red to blue"] * 10
TEXT = "a small red striped circle moves to the left"
WORDS = ["small", "red", "striped", "circle", "moves", "left"]


def _parse(text, words):
    """Hand-made nodes at each word's first occurrence (independent of spaCy)."""
    nodes = []
    for w in words:
        s = text.index(w)
        nodes.append({"kind": "noun", "text": w, "start": s, "end": s + len(w), "head": None})
    return nodes


def _piece_text(tok, ids, positions):
    """The characters the tokens at `positions` of row `ids` stand for (markers stripped)."""
    pieces = [tok.backend.id_to_token(int(ids[p])) for p in positions]
    return "".join(p.replace("\u0120", "").replace("##", "") for p in pieces)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
@pytest.mark.parametrize("vocab", [70, 300])
def test_node_positions_pick_the_words_tokens_in_the_tokenizer_row(kind, vocab):
    # 70: most words split into several tokens; 300: some whole words (BPE: the leading space inside the token).
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=vocab)
    ids = tok([TEXT])[0]
    pos = node_token_positions(tok, TEXT, _parse(TEXT, WORDS))
    assert any(len(p) > 1 for p in pos) if vocab == 70 else any(len(p) == 1 for p in pos)
    for w, p in zip(WORDS, pos):
        assert p == sorted(p) and p == list(range(p[0], p[-1] + 1))
        assert _piece_text(tok, ids, p) == w, (w, p)
        assert int(ids[0]) == tok.bos_id and 0 not in p           # the start token is never a node token


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_truncation_drops_cut_tokens_and_keeps_the_rest(kind):
    tok = train_tokenizer(CORPUS, kind=kind, vocab_size=70)
    L = 9
    ids = tok([TEXT], context_length=L)[0]
    pos = node_token_positions(tok, TEXT, _parse(TEXT, WORDS), context_length=L)
    assert int(ids[L - 1]) == tok.eos_id
    for w, p in zip(WORDS, pos):
        assert all(1 <= q <= L - 2 for q in p)                     # content positions only
        if p:
            assert w.startswith(_piece_text(tok, ids, p))          # a cut word keeps its first pieces
    assert pos[-1] == [] and pos[0] != []
    full = node_token_positions(tok, TEXT, _parse(TEXT, WORDS))
    assert [len(p) for p in pos] != [len(p) for p in full]        # something really was cut
    out = batch_nodes(tok, [TEXT], [_parse(TEXT, WORDS)], L)
    assert int(out["noun_mask"][0].any(-1).sum()) == sum(1 for p in pos if p)


def test_readout_shift_moves_positions_for_bidirectional_towers_only():
    from polymodal.models.text import TextConfig
    tok = train_tokenizer(CORPUS, kind="wordpiece", vocab_size=70)
    assert readout_shift(TextConfig(causal=False, num_readout_tokens=3)) == 3
    assert readout_shift(TextConfig(causal=True, num_readout_tokens=3)) == 0
    base = node_token_positions(tok, TEXT, _parse(TEXT, WORDS))
    shifted = node_token_positions(tok, TEXT, _parse(TEXT, WORDS), shift=3)
    assert shifted == [[q + 3 for q in p] for p in base]


def test_batch_nodes_tensors_and_attachments():
    tok = train_tokenizer(CORPUS, kind="bpe", vocab_size=70)
    parse = [{"kind": "adj", "text": "red", "start": 8, "end": 11, "head": 1},
             {"kind": "noun", "text": "circle", "start": 20, "end": 26, "head": 2},
             {"kind": "verb", "text": "moves", "start": 27, "end": 32, "head": None}]
    out = batch_nodes(tok, [TEXT, "a large star"], [parse, []])
    pos = node_token_positions(tok, TEXT, parse)
    assert out["verb_tokens"][0, 0][out["verb_mask"][0, 0]].tolist() == pos[2]
    assert out["noun_tokens"][0, 0][out["noun_mask"][0, 0]].tolist() == pos[1]
    assert out["noun_head"].tolist() == [[0], [-1]] and out["adj_head"].tolist() == [[0], [-1]]
    assert not out["verb_mask"][1].any()                           # a caption without nodes: all invalid


class CountingParser:
    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += len(texts)
        return [_parse(t, [t.split()[1]]) for t in texts]


def test_parse_cache_is_hit_on_the_second_epoch_and_by_a_new_run(tmp_path):
    from polymodal.methods.shenet import NodeCollate
    manifest = tmp_path / "train.jsonl"
    path = cache_path(manifest)
    assert path == tmp_path / "train.syntax.json"
    captions = sorted(set(CORPUS))
    parser = CountingParser()
    cache = ParseCache(path, parser)
    assert cache.update(CORPUS) == len(captions)                   # build time: each caption once
    tok = train_tokenizer(CORPUS, kind="bpe", vocab_size=70)
    collate = NodeCollate(tok, None, cache.parses, parser=parser)
    for _epoch in range(2):
        for i in range(0, len(CORPUS), 8):
            batch = collate([{"caption": c, "index": j} for j, c in enumerate(CORPUS[i:i + 8])])
            assert batch["noun_mask"].any()
    assert parser.calls == len(captions)                           # the epochs parsed nothing
    again = CountingParser()
    reloaded = ParseCache(path, again)
    assert reloaded.update(CORPUS) == 0 and again.calls == 0 and reloaded.parses == cache.parses
    assert json.loads(path.read_text())["parses"][captions[0]] == cache.parses[captions[0]]
    assert reloaded.update(["a new caption"]) == 1 and again.calls == 1


def test_spacy_rules_give_verb_noun_adjective_and_attachments():
    from polymodal.data.syntax import SpacyParser
    parser = SpacyParser()
    (nodes,) = parser([TEXT])
    by_text = {n["text"]: (i, n) for i, n in enumerate(nodes)}
    assert by_text["moves"][1]["kind"] == "verb"                   # tagged NOUN by the small model; ROOT rule
    i_circle, circle = by_text["circle"]
    assert circle["kind"] == "noun" and circle["head"] == by_text["moves"][0]
    for adj in ("small", "red", "striped"):                        # "striped" (VERB amod) is a modifier
        assert by_text[adj][1]["kind"] == "adj" and by_text[adj][1]["head"] == i_circle
    for n in nodes:
        assert TEXT[n["start"]:n["end"]] == n["text"]


def test_chinese_nodes_from_jieba_have_spans_and_no_attachments():
    text = "一个红色圆形向左移动"
    nodes = parse_chinese(text)
    kinds = {n["text"]: n["kind"] for n in nodes}
    assert kinds.get("圆形") == "noun" and any(k == "verb" for k in kinds.values())
    for n in nodes:
        assert text[n["start"]:n["end"]] == n["text"] and n["head"] is None
    tok = train_tokenizer([text] * 5, kind="wordpiece", vocab_size=40)
    pos = node_token_positions(tok, text, nodes)
    assert all(len(p) == len(n["text"]) for p, n in zip(pos, nodes))   # one token per Chinese character
    assert torch.tensor([q for p in pos for q in p]).min() >= 1
