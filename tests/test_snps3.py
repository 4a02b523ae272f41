"""SNP-S3: MSSM counts and proportions, significant words against a hand count, weight sharing, MIL-NCE
against a loop, the MoCo queue and its exact resume, and one end-to-end tiny run above chance."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from polymodal.data.masking import (IGNORE_INDEX, MaskingRule, count_significant_words, load_or_count, mask_caption,
                                    num_to_mask, significant_positions)
from polymodal.losses.matching import KeyQueue, mil_nce

SPECIALS = [0, 1, 2, 3]             # pad, unk, cls, sep (bert style); mask is 4
MASK = 4


def _rule(significant=(10, 11, 12, 13), groups=None):
    return MaskingRule(MASK, SPECIALS, 50, significant, groups or {})


def _row(content, L=40):
    ids = [2, *content, 3]
    return torch.tensor(ids + [0] * (L - len(ids)))


def test_num_to_mask_follows_the_fraction_rule():
    # 0.15 L: L=2 -> 0.3 (round up), 6 -> 0.9 (up), 7 -> 1.05, 10 -> 1.5 (up), 12 -> 1.8 (up), 14 -> 2.1, 20 -> 3.0
    want = {1: 0, 2: 1, 3: 1, 4: 1, 6: 1, 7: 1, 8: 1, 10: 2, 12: 2, 14: 2, 20: 3, 30: 5}
    for L, n in want.items():
        frac = 0.15 * L
        manual = int(frac) + (1 if frac - int(frac) >= 0.3 - 1e-9 else 0)
        assert num_to_mask(L) == n == manual, L


def test_mssm_masks_significant_tokens_with_80_10_10():
    rule = _rule(groups={10: [10, 11], 11: [10, 11], 12: [12], 13: [13]})
    content = [10, 20, 11, 21, 12, 22, 13, 23, 10, 24, 11, 25, 12, 26, 13, 27, 10, 28, 11, 29]   # 20 tokens, 10 sig
    ids = _row(content)
    rng = np.random.default_rng(0)
    kinds, replaced = Counter(), Counter()
    for _ in range(3000):
        out, labels = mask_caption(ids, rule, rng, "mssm")
        chosen = (labels != IGNORE_INDEX).nonzero().flatten()
        assert len(chosen) == 3                                       # 0.15 * 20 = 3.0
        assert all(int(ids[p]) in (10, 11, 12, 13) for p in chosen)   # only significant positions
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(out[labels == IGNORE_INDEX], ids[labels == IGNORE_INDEX])
        for p in chosen:
            o, orig = int(out[p]), int(ids[p])
            if o == MASK:
                kinds["mask"] += 1
            elif o == orig:
                kinds["keep"] += 1       # includes random draws that hit the same word
            else:
                kinds["random"] += 1
                assert o in (10, 11, 12, 13)
                replaced[o] += 1
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.02
    # A random draw equals the original with probability P(form == orig): keep = 0.1 + 0.1 * that share.
    assert 0.10 < kinds["keep"] / total < 0.16 and 0.06 < kinds["random"] / total < 0.10
    # Random word: a uniform significant word, then a uniform form of its lemma: 10 and 11 each get
    # 1/4 * 1/2 + 1/4 * 1/2 = 1/4, so every id is about equally likely here.
    assert min(replaced.values()) > 0.6 * max(replaced.values())


def test_mssm_fills_up_with_other_tokens_when_too_few_significant():
    rule = _rule()
    ids = _row([10, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38])   # one sig, n = 3
    rng = np.random.default_rng(1)
    other_hits = Counter()
    for _ in range(2000):
        _, labels = mask_caption(ids, rule, rng, "mssm")
        chosen = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(chosen) == 3 and 1 in chosen                       # the significant token is always chosen
        other_hits.update(p for p in chosen if p != 1)
    assert set(other_hits) == set(range(2, 21))                       # fill-up from every other content token
    counts = np.array(list(other_hits.values()))
    assert counts.min() > 0.7 * counts.mean()                         # uniformly


def test_plain_mlm_draws_among_all_content_tokens():
    rule = _rule()
    ids = _row([10, 11, 12, 13, 20, 21, 22, 23, 24, 25])              # n = 2
    rng = np.random.default_rng(2)
    hits = Counter()
    for _ in range(3000):
        _, labels = mask_caption(ids, rule, rng, "mlm")
        chosen = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(chosen) == 2 and all(1 <= p <= 10 for p in chosen)
        hits.update(chosen)
    share_sig = sum(hits[p] for p in range(1, 5)) / sum(hits.values())
    assert abs(share_sig - 0.4) < 0.03


def test_lvwm_positions_prefer_significant_tokens():
    rule = _rule()
    rng = np.random.default_rng(0)
    ids = torch.stack([_row([10, 20, 11, 21, 12, 13], 12), _row([10, 20, 21], 12), _row([20, 21], 12)])
    pos = significant_positions(ids, rule, 3, rng)
    assert set(pos[0].tolist()) <= {1, 3, 5, 6} and len(set(pos[0].tolist())) == 3
    assert pos[1].tolist() == [1, 1, 1]                               # repeated
    assert set(pos[2].tolist()) <= {1, 2}                             # fallback to other tokens


def _fake_tagger(tags):
    def tag(texts):
        return [[(w, tags.get(w, ("DET", w))[0], tags.get(w, ("DET", w))[1]) for w in t.split()] for t in texts]
    return tag


def test_significant_words_equal_a_hand_count(tmp_path):
    corpus = ["a dog runs", "a dog is running", "two dogs run", "a red dog runs", "a cat runs x", "Dog runs"]
    tags = {"dog": ("NOUN", "dog"), "Dog": ("NOUN", "dog"), "dogs": ("NOUN", "dog"), "runs": ("VERB", "run"),
            "running": ("VERB", "run"), "run": ("VERB", "run"), "is": ("AUX", "be"), "red": ("ADJ", "red"),
            "cat": ("NOUN", "cat"), "x": ("NOUN", "x"), "two": ("NUM", "two")}
    vocab = {"a", "dog", "dogs", "runs", "run", "is", "red", "cat", "x", "two"}      # no "running", no "Dog"
    # Hand count (VERB/NOUN/ADJ, exact vocabulary entries, case kept, len > 1, stop list):
    # runs 4 (Dog runs counts "runs"), dog 3, cat 1, dogs 1, red 1, run 1; "x" length 1; "running"/"Dog" not in vocab.
    got = count_significant_words(corpus, vocab, top_k=10, tagger=_fake_tagger(tags))
    assert got.words == ["runs", "dog", "cat", "dogs", "red", "run"]
    assert got.counts == [4, 3, 1, 1, 1, 1]
    assert got.lemmas["dogs"] == "dog"
    assert count_significant_words(corpus, vocab, top_k=2, tagger=_fake_tagger(tags)).words == ["runs", "dog"]
    assert "cat" not in count_significant_words(corpus, vocab, stop_words=["cat"], tagger=_fake_tagger(tags)).words


def test_significant_words_with_spacy_are_saved_and_reused(tmp_path):
    pytest.importorskip("spacy")
    from polymodal.data.text import train_tokenizer
    corpus = ["a red circle rotates", "a blue square rotates", "a red square jumps"] * 3
    tok = train_tokenizer(corpus, kind="wordpiece", vocab_size=400, min_frequency=1)
    assert {"red", "blue", "square", "rotates"} <= set(tok.backend.get_vocab())
    try:
        words = load_or_count(tmp_path / "sw.json", corpus, tok, top_k=3000)
    except RuntimeError as e:                                           # spaCy model not installed
        pytest.skip(str(e))
    counts = dict(zip(words.words, words.counts))
    # Hand count: each caption three times; "a" is a DET and one character long.
    assert counts["red"] == 6 and counts["square"] == 6 and counts["rotates"] == 6 and counts["blue"] == 3
    assert "a" not in counts
    saved = json.loads((tmp_path / "sw.json").read_text())
    assert saved["words"] == words.words
    again = load_or_count(tmp_path / "sw.json", [], tok, top_k=3000, tagger=lambda t: 1 / 0)   # no recount
    assert again.words == words.words


def test_mil_nce_equals_a_direct_loop():
    torch.manual_seed(0)
    B, C = 5, 3
    s = torch.randn(B, B, C)
    valid = torch.ones(B, C, dtype=torch.bool)
    valid[2, 2] = False
    total = 0.0
    for i in range(B):
        num = sum(np.exp(float(s[i, i, c])) for c in range(C) if valid[i, c])
        den = sum(np.exp(float(s[i, j, c])) for j in range(B) for c in range(C) if valid[j, c])
        den += sum(np.exp(float(s[j, i, c])) for j in range(B) for c in range(C) if valid[i, c])
        total += np.log(den) - np.log(num)
    assert float(mil_nce(s, valid)) == pytest.approx(total / B, rel=1e-5)


def test_key_queue_enqueues_dequeues_and_resumes_from_a_state_dict():
    q = KeyQueue(5, 2)
    k1 = torch.arange(6.0).view(3, 2)
    q.enqueue(k1)
    assert int(q.ptr) == 3 and int(q.filled) == 3 and torch.equal(q.keys[:3], k1)
    k2 = 10 + torch.arange(8.0).view(4, 2)
    q.enqueue(k2)                                                      # wraps: oldest two keys overwritten
    assert int(q.ptr) == 2 and int(q.filled) == 5
    assert torch.equal(q.keys, torch.cat([k2[2:], k1[2:], k2[:2]]))
    fresh = KeyQueue(5, 2)
    fresh.load_state_dict(q.state_dict())
    k3 = -torch.ones(1, 2)
    q.enqueue(k3)
    fresh.enqueue(k3)
    assert torch.equal(q.keys, fresh.keys) and int(q.ptr) == int(fresh.ptr) == 3


# ---------------------------------------------------------------------------------------------------
# Model-level tests
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(moving_world):
    return moving_world(n_train=120, n_test=8, seed=1, num_frames=4)


@pytest.fixture(scope="module")
def parts(world):
    from polymodal.data.masking import SignificantWords
    from polymodal.data.text import train_tokenizer
    from polymodal.data.masking import masking_rule
    texts = [json.loads(line)["caption"] for line in (world / "train.jsonl").read_text().splitlines()]
    tok = train_tokenizer(texts, kind="wordpiece", vocab_size=300)
    vocab = tok.backend.get_vocab()
    words = SignificantWords([w for w in ("circle", "square", "red", "blue", "moves") if w in vocab], [1] * 5)
    return tok, masking_rule(tok, words)


def _batch(world, tok, rule, model, n=6, seed=0):
    from polymodal.data.datasets import ManifestDataset, SampleBuilder
    from polymodal.methods.snps3 import SNPS3Collate
    ds = ManifestDataset(world / "train.jsonl", SampleBuilder(model.image_transform, media="video"))
    return SNPS3Collate(tok, tok.context_length, rule, seed=seed)([ds[i] for i in range(n)])


def test_shared_network_has_one_optimizer_entry_per_parameter(world, parts):
    from polymodal.methods.snps3 import SNPS3Config, SNPS3Task
    from polymodal.models.fusion import create_snps3_model
    from polymodal.train.loop import param_groups
    tok, rule = parts
    torch.manual_seed(0)
    shared = create_snps3_model(SNPS3Config().model_config(), tok)
    three = create_snps3_model(SNPS3Config(shared=False).model_config(), tok)
    assert shared.cross_encoder is shared.text_encoder and three.cross_encoder is not three.text_encoder
    stack = sum(p.numel() for p in shared.text_encoder.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_shared + stack == sum(p.numel() for p in three.parameters())
    want = {"shared": n_shared, "three_encoder": n_shared + stack}
    assert shared.parameter_counts() == three.parameter_counts() == want
    task = SNPS3Task(shared, SNPS3Config(queue_size=16))
    groups = param_groups(task, 0.1)
    entries = [p for g in groups for p in g["params"]]
    assert len(entries) == len({id(p) for p in entries}) == len(list(shared.parameters()))
    # The cross pass alone puts gradient on the text network's own tensors (no separate copy).
    b = _batch(world, tok, rule, shared)
    vp = shared.video_pass(b["frames"], b["frame_valid"])
    _, pooled = shared.cross_pass(b["masked_ids"], vp.means, vp.valid)
    shared.zero_grad()
    pooled.sum().backward()
    assert shared.text_encoder.transformer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert shared.text_encoder.embeddings.token_type.weight.grad[1].abs().sum() > 0    # visual tokens: type 1
    assert shared.text_pooler[0].weight.grad is None                                    # separate cross pooler


def test_task_checkpoint_resumes_moco_state_exactly(world, parts):
    from polymodal.methods.snps3 import SNPS3Config, SNPS3Task
    from polymodal.models.fusion import create_snps3_model
    tok, rule = parts
    cfg = SNPS3Config(queue_size=64, momentum=0.9, level1="moco")

    def make():
        torch.manual_seed(0)
        return SNPS3Task(create_snps3_model(cfg.model_config(), tok), cfg)

    a = make()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    batches = [_batch(world, tok, rule, a.model, seed=s) for s in range(3)]
    torch.manual_seed(1)
    out = a(batches[0])
    out["loss"].backward()
    opt.step()
    clips = int(batches[0]["frame_valid"].sum())                       # one clip key per real frame here
    assert int(a.text_queue.ptr) == 6 and int(a.clip_queue.filled) == clips
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert any(k.startswith("momentum.") for k in state) and "text_queue.keys" in state and "clip_queue.owner" in state
    b = make()
    b.load_state_dict(state)
    for t in (a, b):
        t.eval()                                                       # no dropout; eval keeps the queue
    torch.manual_seed(2)
    la = a(batches[1])["loss"].item()
    torch.manual_seed(2)
    lb = b(batches[1])["loss"].item()
    assert la == lb
    a.train(), b.train()
    for t in (a, b):
        t.model.score_head[0].p = 0.0                                  # dropout off for an exact comparison
        torch.manual_seed(3)
        t(batches[2])
    assert torch.equal(a.text_queue.keys, b.text_queue.keys) and int(a.text_queue.ptr) == int(b.text_queue.ptr) == 12
    assert torch.equal(a.clip_queue.owner, b.clip_queue.owner)
    assert torch.equal(a.momentum.text_pooler[0].weight, b.momentum.text_pooler[0].weight)


def test_snps3_recipe_trains_a_tiny_model_above_chance(world, tmp_path, monkeypatch):
    import polymodal.methods
    from polymodal.methods.snps3 import SNPS3Method
    from polymodal.train.run import load_recipe, run_recipe
    monkeypatch.setitem(polymodal.methods.METHODS, "snps3", SNPS3Method)
    cfg = load_recipe(None, [
        "method=snps3", f"out_dir={tmp_path}/run", f"data.train={world}/train.jsonl", "data.batch_size=16",
        "data.num_frames=2", "train.steps=100", "train.log_every=10", "train.ckpt_every=0", "train.progress=false",
        "train.threads=1", "optim.lr=2e-3", "optim.warmup_steps=5", "optim.clip_grad=5", "tokenizer.kind=wordpiece",
        "tokenizer.vocab_size=300", "snps3={level1: in_batch}",
        f"eval={{tasks: [{{task: snps3_retrieval, data: {world}/train.jsonl, num_frames: 2, limit: 48, "
        f"rerank_top_k: 5, max_mask_queries: 300}}]}}"])
    final = run_recipe(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert (tmp_path / "run" / "significant_words.json").is_file()
    p = "eval/snps3_retrieval/"
    # 48 training videos: chance R@10 is 10/48 = 21%; masked-token chance is 1/300. The run sees these videos
    # in training, so this checks learning end to end (masking, both passes, losses, eval), not generalisation;
    # 100 tiny steps move retrieval only a little (the cross losses start slowest), hence the modest bar.
    assert final[p + "text_to_video_R@10"] > 25.0, final
    assert final[p + "masked_acc_significant"] > 10.0, final
    assert final[p + "word_mAP"] > final[p + "word_chance"], final
    from polymodal.cli import main
    from polymodal.hub import load_model
    model = load_model(tmp_path / "run" / "model")
    assert model.config.shared and model.tokenizer.mask_id is not None
    # The saved model carries its significant words: the CLI reproduces every number of the training eval.
    out = tmp_path / "again.json"
    assert main(["eval", str(tmp_path / "run" / "model"), "--task", "snps3_retrieval", "--data",
                 f"{world}/train.jsonl", "--num-frames", "2", "--limit", "48", "-o", "rerank_top_k=5",
                 "-o", "max_mask_queries=300", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again == pytest.approx({k[len(p):]: v for k, v in final.items() if k.startswith(p)}, abs=1e-4)


def test_attention_importance_matches_explicit_softmax_weights_and_remask_picks_the_top_tokens():
    from polymodal.data.masking import IGNORE_INDEX, remask_by_importance
    from polymodal.models.fusion import BertConfig, BertStack, attention_importance
    torch.manual_seed(0)
    stack = BertStack(BertConfig(vocab_size=50, width=16, layers=2, heads=2, context_length=12)).eval()
    ids = torch.tensor([[1, 7, 8, 9, 10, 2, 0, 0], [1, 11, 12, 2, 0, 0, 0, 0]])
    real = ids != 0
    mass = attention_importance(stack, ids, real)
    # Independent: hook the blocks' inputs and recompute each layer's softmax(q k^T / sqrt(d)) by hand.
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in stack.transformer.blocks]
    with torch.no_grad():
        stack.encode(stack.embeddings(ids, token_type=0), real)
    for h in hooks:
        h.remove()
    want = torch.zeros(ids.shape)
    for block, x in zip(stack.transformer.blocks, inputs):
        B, L, D = x.shape
        H, d = block.attn.heads, D // block.attn.heads
        qkv = block.attn.qkv(x).view(B, L, 3, H, d)
        for b in range(B):
            for hh in range(H):
                q, k = qkv[b, :, 0, hh], qkv[b, :, 1, hh]
                logits = (q @ k.T) / d ** 0.5
                logits[:, ~real[b]] = float("-inf")
                w = logits.softmax(-1)
                want[b] += w[real[b]].sum(0)
    torch.testing.assert_close(mass, want * real, rtol=1e-4, atol=1e-5)
    masked, labels = remask_by_importance(ids, mass, mask_id=4, special_ids=[0, 1, 2], ratio=0.15)
    # 4 content tokens in row 0 -> max(int(0.6), 1) = 1 masked, the most attended one; row 1 the same.
    for b in range(2):
        content = [i for i in range(8) if int(ids[b, i]) not in (0, 1, 2)]
        top = max(content, key=lambda i: float(mass[b, i]))
        assert (labels[b] != IGNORE_INDEX).nonzero().flatten().tolist() == [top]
        assert int(masked[b, top]) == 4 and int(labels[b, top]) == int(ids[b, top])


def test_attention_remasking_replaces_the_collate_masks_in_training(world, parts):
    from polymodal.data.masking import IGNORE_INDEX
    from polymodal.methods.snps3 import SNPS3Config, SNPS3Task
    from polymodal.models.fusion import create_snps3_model
    tok, rule = parts
    torch.manual_seed(0)
    cfg = SNPS3Config(queue_size=16, attention_remask=1.0)
    task = SNPS3Task(create_snps3_model(cfg.model_config(), tok), cfg).train()
    batch = _batch(world, tok, rule, task.model)
    seen = {}
    original = task.model.cross_pass
    task.model.cross_pass = lambda ids, *a: (seen.setdefault("ids", ids), original(ids, *a))[1]
    out = task(batch)
    assert torch.isfinite(out["loss"])
    from polymodal.data.text import trim_padding
    ids = trim_padding(batch["input_ids"], tok.pad_id)
    want, _ = task.remask(ids, ids != tok.pad_id)
    B = len(ids)
    assert torch.equal(seen["ids"][:: B + 1], want)           # the diagonal (matched) pairs carry the re-masked ids
    assert not torch.equal(want, batch["masked_ids"][:, :ids.shape[1]])
    assert ((want == tok.mask_id).sum(1) >= 1).all() and IGNORE_INDEX == -100


def test_snps3_refuses_a_gather_mode_its_mil_nce_blocks_cannot_do(world, tmp_path, monkeypatch):
    import polymodal.methods
    from polymodal.config import ConfigError
    from polymodal.methods.snps3 import SNPS3Method
    from polymodal.train.run import load_recipe
    monkeypatch.setitem(polymodal.methods.METHODS, "snps3", SNPS3Method)
    with pytest.raises(ConfigError, match="loss.gather: SNP-S3's in-batch MIL-NCE losses support local or "
                                          "global_with_grad"):
        load_recipe(None, ["method=snps3", f"out_dir={tmp_path}/run", f"data.train={world}/train.jsonl",
                           "tokenizer.kind=wordpiece", "loss.gather=grouped"])


# ---------------------------------------------------------------------------------------------------
# Level 1 as in the release (issue 31): no text head, per-clip MoCo, same-video keys out of the queue
# ---------------------------------------------------------------------------------------------------
def test_level1_text_feature_is_the_normalised_pooler_output_with_no_head(parts):
    import torch.nn.functional as F
    from polymodal.methods.snps3 import SNPS3Config
    from polymodal.models.fusion import create_snps3_model
    tok, _ = parts
    torch.manual_seed(0)
    model = create_snps3_model(SNPS3Config().model_config(), tok).eval()
    ids = tok(["a red circle moves left", "a big blue square"])
    enc = model.text_encoder
    h = enc.encode(enc.embeddings(ids, token_type=0), ids != tok.pad_id)
    want = F.normalize(model.text_pooler(h[:, 0]), dim=-1)                       # BERT pooler(CLS), normalised
    torch.testing.assert_close(model.text_pass(ids).feature, want)
    assert not any(n.startswith("text_head") for n, _ in model.named_parameters())
    mlp = create_snps3_model(SNPS3Config(text_head="mlp").model_config(), tok)  # our former head, now an option
    assert any(n.startswith("text_head") for n, _ in mlp.named_parameters())


def _moco_task(tok, exclude: bool, temperature: float = 0.5):
    import torch.nn.functional as F
    from polymodal.methods.snps3 import SNPS3Config, SNPS3Task
    from polymodal.models.fusion import create_snps3_model
    torch.manual_seed(0)
    cfg = SNPS3Config(level1="moco", queue_size=8, temperature=temperature, queue_exclude_own=exclude,
                      weights={"lvwm": 0, "level2": 0, "itm": 0, "mlm": 0})
    task = SNPS3Task(create_snps3_model(cfg.model_config(), tok), cfg).eval()   # eval: no EMA step, no enqueue
    g = torch.Generator().manual_seed(1)
    W = task.model.config.text.width
    for q in (task.text_queue, task.clip_queue):
        q.enqueue(F.normalize(torch.randn(8, W, generator=g), dim=-1), torch.arange(100, 108))
    return task


def _moco_reference(task, batch, pad_id, temperature: float = 0.5):
    """The release's per-clip MoCo loss by loops: each valid clip against its video's text key, each text against
    all of its video's clip keys (summed in the numerator); queue keys as negatives, minus those of the query's own
    video when the task excludes them. The momentum copies still equal the model (no EMA step yet)."""
    from polymodal.data.text import trim_padding
    m, T = task.model, temperature
    ids = trim_padding(batch["input_ids"], pad_id)
    with torch.no_grad():
        t = m.text_pass(ids).feature
        vp = m.video_pass(batch["frames"], batch["frame_valid"])

    def negatives(queue, q, owner):
        keep = [k for k in range(queue.size) if not (task.cfg.queue_exclude_own and int(queue.owner[k]) == owner)]
        return sum(torch.exp(queue.keys[k] @ q / T) for k in keep)

    clip_losses, text_losses = [], []
    for i in range(len(ids)):
        owner = int(batch["index"][i])
        valid = [c for c in range(vp.clips.shape[1]) if vp.valid[i, c]]
        for c in valid:
            pos = torch.exp(vp.clips[i, c] @ t[i] / T)
            clip_losses.append(-torch.log(pos / (pos + negatives(task.text_queue, vp.clips[i, c], owner))))
        pos = sum(torch.exp(t[i] @ vp.clips[i, c] / T) for c in valid)
        text_losses.append(-torch.log(pos / (pos + negatives(task.clip_queue, t[i], owner))))
    return (torch.stack(clip_losses).mean() + torch.stack(text_losses).mean()) / 2


def test_moco_level1_scores_every_clip_and_takes_all_clip_keys_of_the_video_as_positives(world, parts):
    tok, rule = parts
    task = _moco_task(tok, exclude=False)
    b = _batch(world, tok, rule, task.model, n=4)
    with torch.no_grad():
        got = task(b)["level1"]
    torch.testing.assert_close(got, _moco_reference(task, b, tok.pad_id), rtol=1e-5, atol=1e-5)


def test_moco_queue_leaves_out_keys_of_the_querys_own_video(world, parts):
    tok, rule = parts
    losses = {}
    for exclude in (True, False):
        task = _moco_task(tok, exclude=exclude)
        b = _batch(world, tok, rule, task.model, n=4)
        own = int(b["index"][0])
        with torch.no_grad():          # an earlier step's keys of video 0 (here: its current features) in both queues
            from polymodal.data.text import trim_padding
            kt = task.model.text_pass(trim_padding(b["input_ids"], tok.pad_id)).feature[:1]
            kc = task.model.video_pass(b["frames"][:1], b["frame_valid"][:1]).clips[0, :2]
            task.text_queue.enqueue(kt, torch.tensor([own]))
            task.clip_queue.enqueue(kc, torch.tensor([own, own]))
            losses[exclude] = task(b)["level1"]
        torch.testing.assert_close(losses[exclude], _moco_reference(task, b, tok.pad_id), rtol=1e-5, atol=1e-5)
    # The stale keys of the positive are near-duplicates of it: kept as negatives they raise the loss.
    assert float(losses[False]) > float(losses[True]) + 0.01


def test_key_queue_keeps_owners_and_leaves_out_padding_rows():
    from polymodal.losses.matching import KeyQueue
    q = KeyQueue(4, 2)
    assert q.others_than(torch.tensor([5])).all()                      # random start keys belong to no video
    q.enqueue_from_all_ranks(torch.eye(2).repeat(2, 1), torch.tensor([7, 7, 8, 8]),
                             keep=torch.tensor([True, False, True, True]))
    assert int(q.filled) == 3 and q.owner[:3].tolist() == [7, 8, 8]
    assert q.others_than(torch.tensor([8, 9])).tolist() == [[True, False, False, True], [True, True, True, True]]


def test_level1_auto_is_in_batch_from_scratch_and_moco_from_a_saved_start(world, tmp_path):
    from pathlib import Path
    from polymodal.train.run import load_recipe
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "snps3_full.yaml"
    base = [f"out_dir={tmp_path}/run", f"data.train={world}/train.jsonl"]
    scratch = load_recipe(recipe, base).method_impl
    assert scratch.cfg.level1 == "auto" and not scratch.uses_moco()
    assert load_recipe(recipe, base + [f"model.path={tmp_path}/start"]).method_impl.uses_moco()
    assert load_recipe(recipe, base + ["snps3.level1=moco"]).method_impl.uses_moco()


def test_video_score_is_the_logsumexp_over_clips_of_the_text_clip_cosines(world, parts):
    from polymodal.methods.snps3 import SNPS3Config
    from polymodal.models.fusion import SNPS3TextFeatures, create_snps3_model
    tok, rule = parts
    torch.manual_seed(0)
    model = create_snps3_model(SNPS3Config().model_config(), tok).eval()
    b = _batch(world, tok, rule, model, n=3)
    b["frame_valid"][1, 2:] = False                                     # video 1 has fewer real frames
    with torch.no_grad():
        video = model.video_features(b["frames"], b["frame_valid"])
        ids = b["input_ids"]
        text = SNPS3TextFeatures(model.text_pass(ids).feature, None, ids)
        got, pairs = model.similarity(text, video), model.similarity(text, video, pairs=True)
    want = torch.zeros(3, 3)
    for i in range(3):
        for j in range(3):
            want[i, j] = torch.log(sum(torch.exp(text.feature[i] @ video.clips[j, c])
                                       for c in range(video.clips.shape[1]) if video.valid[j, c]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pairs, want.diag(), rtol=1e-5, atol=1e-5)


def test_text_mlm_alone_runs_the_text_pass_on_the_masked_caption_and_nothing_else(world, parts):
    import torch.nn.functional as F
    from polymodal.data.text import trim_padding
    from polymodal.methods.snps3 import SNPS3Config, SNPS3Task
    from polymodal.models.fusion import create_snps3_model
    tok, rule = parts
    torch.manual_seed(0)
    cfg = SNPS3Config(weights={"level1": 0, "lvwm": 0, "level2": 0, "itm": 0, "mlm": 0, "text_mlm": 1})
    task = SNPS3Task(create_snps3_model(cfg.model_config(), tok), cfg).eval()
    b = _batch(world, tok, rule, task.model)
    out = task(b)
    assert {k for k in out if not k.startswith("text_mlm_acc")} == {"loss", "text_mlm"}
    L = trim_padding(b["input_ids"], tok.pad_id).shape[1]
    masked, labels = b["masked_ids"][:, :L], b["mlm_labels"][:, :L]
    m, enc = task.model, task.model.text_encoder
    h = enc.encode(enc.embeddings(masked, token_type=0), masked != tok.pad_id)
    head = m.mlm_head
    logits = F.linear(head.norm(F.gelu(head.dense(h))), enc.embeddings.word.weight, head.bias)
    chosen = labels != IGNORE_INDEX
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[chosen], labels[chosen]))
    out["loss"].backward()
    assert all(p.grad is None for p in m.vision.parameters())          # the video is never encoded


def test_vision_init_copies_a_saved_vit_of_the_same_sizes_and_names_a_mismatch(parts, tmp_path):
    from polymodal.methods.snps3 import SNPS3Config, init_vision_from
    from polymodal.models.fusion import create_snps3_model
    tok, _ = parts
    torch.manual_seed(0)
    source = create_snps3_model(SNPS3Config().model_config(), tok)
    source.save_pretrained(tmp_path / "src")
    torch.manual_seed(1)
    model = create_snps3_model(SNPS3Config().model_config(), tok)
    init_vision_from(model, str(tmp_path / "src"))
    for (name, a), b in zip(source.vision.state_dict().items(), model.vision.state_dict().values()):
        assert torch.equal(a, b), name
    wider = create_snps3_model(SNPS3Config(vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                                   "heads": 4}).model_config(), tok)
    with pytest.raises(ValueError, match=r"its ViT differs in width \(64 vs 32\)"):
        init_vision_from(wider, str(tmp_path / "src"))
