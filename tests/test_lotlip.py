"""LoTLIP: corner-token mechanics of the text tower and the multi-caption objective."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from polymodal.methods.clip import ContrastiveTask, LossConfig
from polymodal.methods.lotlip import LoTLIPConfig, LoTLIPTask, combine_losses
from polymodal.models.clip import CLIP, CLIPConfig
from polymodal.models.text import TextConfig, TextTower
from polymodal.models.vision import VisionConfig

torch.set_num_threads(1)

PAD, CLS, SEP = 0, 1, 2


def tower(K=2, causal=False, layers=2, context=16, seed=0, **kw) -> TextTower:
    torch.manual_seed(seed)
    cfg = TextConfig(vocab_size=50, context_length=context, width=32, layers=layers, heads=2, causal=causal,
                     pool="eot" if causal else "cls", eot_token_id=SEP, pad_token_id=PAD, num_readout_tokens=K, **kw)
    return TextTower(cfg).eval()


def bert_ids() -> torch.Tensor:
    """Two rows `[CLS] text [SEP] pad` of different lengths (no corners: the tower inserts them)."""
    return torch.tensor([[CLS, 11, 12, 13, 14, SEP, PAD, PAD],
                         [CLS, 21, 22, SEP, PAD, PAD, PAD, PAD]])


# ----------------------------------------------------------------------------- bidirectional layout

def test_bidirectional_layout_corners_follow_cls():
    t = tower(K=2)
    ids = bert_ids()
    with torch.no_grad():
        out = t(ids)
    assert out.tokens.shape == (2, 8 + 2, 32)
    assert out.readouts.shape == (2, 2, 32)
    # pooled = position 0 (CLS), corners = positions 1..K (no pooler, no projection here)
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])
    torch.testing.assert_close(out.readouts, out.tokens[:, 1:3])
    expected_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(out.mask, expected_mask)


def _dependency_pattern(t: TextTower, ids: torch.Tensor) -> torch.Tensor:
    """(L', L') bool: output state q depends on input embedding k (one layer: exactly the attention mask)."""
    Lp = ids.shape[1] + t.config.num_readout_tokens
    delta = torch.zeros(1, Lp, t.config.width, requires_grad=True)
    handle = t.embed_norm.register_forward_hook(lambda mod, inp, out: out + delta)
    try:
        out = t(ids)
        dep = torch.zeros(Lp, Lp, dtype=torch.bool)
        for q in range(Lp):
            (g,) = torch.autograd.grad(out.tokens[0, q].sum(), delta, retain_graph=True)
            dep[q] = g[0].abs().sum(-1) > 0
    finally:
        handle.remove()
    return dep


def test_bidirectional_attention_pattern_is_the_verified_one():
    K = 2
    t = tower(K=K, layers=1, final_norm=False)
    ids = torch.tensor([[CLS, 11, 12, 13, SEP, PAD, PAD]])
    dep = _dependency_pattern(t, ids)
    # After insertion: [CLS][C0][C1] 11 12 13 [SEP] pad pad (text = positions 3..6, pads 7..8)
    text = [3, 4, 5, 6]
    readouts = [0, 1, 2]
    for q in readouts:          # CLS and each corner: itself and the non-pad text, not each other
        assert dep[q].nonzero().flatten().tolist() == sorted([q] + text), q
    for q in text:              # text: CLS and the text, never the corners, never the pads
        assert dep[q].nonzero().flatten().tolist() == [0] + text, q


def test_perturbing_a_corner_changes_only_that_corner():
    t = tower(K=2)
    ids = bert_ids()
    with torch.no_grad():
        a = t(ids)
        t.readout[0] += torch.randn(32)
        b = t(ids)
    real = a.mask
    torch.testing.assert_close(b.pooled, a.pooled, rtol=0, atol=0)                  # CLS unchanged
    torch.testing.assert_close(b.tokens[:, 3:][real[:, 3:]], a.tokens[:, 3:][real[:, 3:]], rtol=0, atol=0)
    torch.testing.assert_close(b.readouts[:, 1], a.readouts[:, 1], rtol=0, atol=0)   # other corner unchanged
    assert (b.readouts[:, 0] - a.readouts[:, 0]).abs().max() > 1e-3


def test_perturbing_cls_leaves_corners_unchanged_but_changes_text():
    # One layer: corners do not attend to CLS. (With more layers they see CLS indirectly through the
    # text tokens, which do attend to CLS, as in the authors' mask.)
    t = tower(K=2, layers=1)
    ids = bert_ids()
    other = ids.clone()
    other[:, 0] = 7                                   # a different embedding at the CLS position
    with torch.no_grad():
        a, b = t(ids), t(other)
    torch.testing.assert_close(b.readouts, a.readouts, rtol=0, atol=0)
    assert (b.pooled - a.pooled).abs().max() > 1e-3
    assert (b.tokens[0, 3:7] - a.tokens[0, 3:7]).abs().max() > 1e-3  # text sees CLS


def test_changing_text_changes_cls_and_every_corner():
    t = tower(K=2)
    ids = bert_ids()
    other = ids.clone()
    other[0, 2] = 30
    with torch.no_grad():
        a, b = t(ids), t(other)
    for feats in ((a.pooled, b.pooled), (a.readouts[:, 0], b.readouts[:, 0]), (a.readouts[:, 1], b.readouts[:, 1])):
        assert (feats[0][0] - feats[1][0]).abs().max() > 1e-4
        torch.testing.assert_close(feats[0][1], feats[1][1], rtol=0, atol=0)  # the other row is untouched


def test_pad_tokens_change_nothing():
    t = tower(K=2)
    ids = bert_ids()
    mask = ids != PAD
    garbage = torch.where(mask, ids, torch.randint(3, 50, ids.shape))
    with torch.no_grad():
        a = t(ids)
        b = t(garbage, attention_mask=mask)
        # a shorter row with its pads cut away gives the same states as in the padded batch
        c = t(ids[1:, :4])
    real = a.mask
    torch.testing.assert_close(b.pooled, a.pooled, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.readouts, a.readouts, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.tokens[real], a.tokens[real], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c.pooled, a.pooled[1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.readouts, a.readouts[1:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- truncation

def _tokenizer():
    from polymodal.data.text import train_tokenizer
    corpus = ["a large red star in the top left corner.", "there is a small blue circle next to a green square.",
              "the image shows three objects on a white background."] * 5
    return train_tokenizer(corpus, kind="wordpiece", vocab_size=120)


def test_corners_survive_truncation():
    from polymodal.models.factory import create_model
    K, ctx = 3, 12
    tok = _tokenizer()
    model = create_model("tiny", {"text.context_length": ctx, "text.causal": False, "text.num_readout_tokens": K},
                         tokenizer=tok)
    assert model.text.max_tokens == ctx - K == tok.context_length
    long_text = " ".join(["the image shows three objects on a white background."] * 4)
    ids = tok([long_text])
    assert ids.shape == (1, ctx - K)
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id         # truncated content, specials kept
    with torch.no_grad():
        out = model.text(ids)
        feats = model.encode_text_readouts(ids)
    assert out.tokens.shape[1] == ctx and out.readouts.shape == (1, K, model.config.text.width)
    assert bool(out.mask.all())
    assert feats.shape == (1, 1 + K, model.config.embed_dim)
    with pytest.raises(ValueError, match="at most 9"):
        model.text(torch.ones(1, ctx - K + 1, dtype=torch.long))


# ----------------------------------------------------------------------------- inference uses CLS/EOT only

def tiny_clip(K=2, causal=False, seed=0) -> CLIP:
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                     text=TextConfig(vocab_size=50, context_length=16, width=32, layers=2, heads=2, causal=causal,
                                     pool="eot" if causal else "cls", eot_token_id=SEP, pad_token_id=PAD,
                                     num_readout_tokens=K),
                     embed_dim=24)
    return CLIP(cfg)


@pytest.mark.parametrize("causal", [False, True])
def test_encode_text_ignores_corner_weights(causal):
    model = tiny_clip(K=2, causal=causal).eval()
    ids = bert_ids()
    with torch.no_grad():
        before = model.encode_text(ids)
        readouts = model.encode_text_readouts(ids)
        model.text.readout.mul_(-3.0).add_(1.0)
        after = model.encode_text(ids)
        readouts_after = model.encode_text_readouts(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(readouts[:, 0], before, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(readouts_after[:, 0], before, rtol=1e-6, atol=1e-6)
    assert (readouts_after[:, 1:] - readouts[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_encoders_agree_with_the_full_tower_forward(causal):
    """encode_text / encode_text_readouts (which may skip work) give the full forward's CLS and corners."""
    model = tiny_clip(K=2, causal=causal).eval()
    ids = clip_ids() if causal else bert_ids()
    with torch.no_grad():
        full = model.text(ids)
        want = F.normalize(model.text_proj(torch.cat([full.pooled[:, None], full.readouts], 1)), dim=-1)
        torch.testing.assert_close(model.encode_text_readouts(ids), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.encode_text(ids), want[:, 0], rtol=1e-5, atol=1e-6)


def test_retrieval_and_zeroshot_paths_ignore_corners(tmp_path):
    """The eval suite's text encoders (retrieval texts, zero-shot classifier) use only CLS."""
    from polymodal.encode import encode_texts
    from polymodal.eval.zeroshot import build_classifier
    from polymodal.models.factory import create_model
    tok = _tokenizer()
    model = create_model("tiny", {"text.causal": False, "text.num_readout_tokens": 2}, tokenizer=tok).eval()
    texts = ["a large red star in the top left corner.", "a small blue circle."]
    a = encode_texts(model, texts)
    cls_a = build_classifier(model, ["red star", "blue circle"], ["a {}.", "an image of a {}."])
    with torch.no_grad():
        model.text.readout.normal_()
    torch.testing.assert_close(encode_texts(model, texts), a, rtol=0, atol=0)
    torch.testing.assert_close(build_classifier(model, ["red star", "blue circle"], ["a {}.", "an image of a {}."]),
                               cls_a, rtol=0, atol=0)


# ----------------------------------------------------------------------------- causal layout

def clip_ids() -> torch.Tensor:
    """`[SOT] text [EOT] pad` rows of different lengths (SOT = CLS id, EOT = SEP id here)."""
    return torch.tensor([[CLS, 11, 12, 13, SEP, PAD, PAD],
                         [CLS, 21, SEP, PAD, PAD, PAD, PAD]])


def test_causal_layout_corners_before_eot():
    K = 2
    t = tower(K=K, causal=True)
    ids = clip_ids()
    with torch.no_grad():
        out = t(ids)
    # row 0: [SOT] 11 12 13 [C0][C1] [EOT] pad pad ; row 1: [SOT] 21 [C0][C1] [EOT] pad ...
    torch.testing.assert_close(out.readouts[0], out.tokens[0, 4:6])
    torch.testing.assert_close(out.pooled[0], out.tokens[0, 6])
    torch.testing.assert_close(out.readouts[1], out.tokens[1, 2:4])
    torch.testing.assert_close(out.pooled[1], out.tokens[1, 4])
    # With an explicit mask the real positions (text, corners, EOT) are marked; causal towers
    # need none by default (pads come after EOT and are never attended to).
    with torch.no_grad():
        masked = t(ids, attention_mask=ids != PAD)
    assert masked.mask.sum(1).tolist() == [5 + K, 3 + K]
    assert masked.mask[0, :7].all() and masked.mask[1, :5].all()
    torch.testing.assert_close(masked.pooled, out.pooled, rtol=1e-6, atol=1e-6)


def test_causal_attention_pattern():
    K = 2
    t = tower(K=K, causal=True, layers=1, final_norm=False)
    ids = torch.tensor([[CLS, 11, 12, SEP, PAD]])
    dep = _dependency_pattern(t, ids)
    # [SOT] 11 12 [C0] [C1] [EOT] pad : positions 0..2 text, 3..4 corners, 5 EOT
    for q in range(3):
        assert dep[q].nonzero().flatten().tolist() == list(range(q + 1))
    assert dep[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert dep[4].nonzero().flatten().tolist() == [0, 1, 2, 4]
    assert dep[5].nonzero().flatten().tolist() == [0, 1, 2, 5]      # EOT never sees a corner


def test_causal_eot_equals_tower_without_corners_with_shifted_position():
    """EOT feature = the K=0 tower's EOT feature when EOT's position index is moved K places on."""
    K = 2
    t = tower(K=K, causal=True)
    plain = tower(K=0, causal=True)
    state = {k: v for k, v in t.state_dict().items() if k != "readout"}
    plain.load_state_dict(state)
    for row in clip_ids():
        e = int((row == SEP).nonzero()[0])
        with torch.no_grad():
            pos = plain.pos.clone()
            plain.pos[e] = t.pos[e + K]
            want = plain(row[None, : e + 1]).pooled
            plain.pos.copy_(pos)
            got = t(row[None]).pooled
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the objective

def make_batch(B=4, M=2, L=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, 16, 16, generator=g)

    def rows(n):
        ids = torch.full((n, L), PAD)
        for i in range(n):
            k = int(torch.randint(1, L - 2, (1,), generator=g))
            ids[i, 0], ids[i, k + 1] = CLS, SEP
            ids[i, 1:k + 1] = torch.randint(5, 50, (k,), generator=g)
        return ids

    return {"pixels": pixels, "input_ids": rows(B), "long_input_ids": rows(B * M).view(B, M, L)}


def sym_infonce(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def direct_loss(model, batch, w_clip, w_long, normalize="count", only_cls=False):
    """LoTLIP loss written out: every sub-caption encoded on its own, every read-out its own InfoNCE."""
    scale = model.scale()
    img = model.encode_image(batch["pixels"])
    short = sym_infonce(img, model.encode_text(batch["input_ids"]), scale)
    terms = []
    B, M, _ = batch["long_input_ids"].shape
    for m in range(M):
        feats = model.encode_text_readouts(batch["long_input_ids"][:, m])   # (B, 1+K, E)
        for r in range(1 if only_cls else feats.shape[1]):
            terms.append(sym_infonce(img, feats[:, r], scale))
    if normalize == "count":
        return (w_clip * short + w_long * sum(terms)) / (1 + len(terms)), len(terms)
    return w_clip * short + w_long * sum(terms) / len(terms), len(terms)


LOCAL = LossConfig(gather="local", local_loss=False)


@pytest.mark.parametrize("K,normalize,only_cls,w", [(2, "count", False, (1.0, 1.0)), (2, "count", False, (0.5, 2.0)),
                                                     (3, "mean", False, (1.0, 0.7)), (2, "count", True, (1.0, 1.0)),
                                                     (0, "count", False, (1.0, 1.0))])
def test_loss_matches_direct_computation(K, normalize, only_cls, w):
    model = tiny_clip(K=K)
    batch = make_batch()
    cfg = LoTLIPConfig(num_corners=K, w_clip=w[0], w_long=w[1], normalize=normalize,
                       long_features="cls" if only_cls else "all")
    task = LoTLIPTask(model, cfg, LOCAL)
    out = task(batch)
    want, n = direct_loss(model, batch, w[0], w[1], normalize, only_cls)
    assert n == (2 if only_cls else 2 * (K + 1))
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["short"], sym_infonce(model.encode_image(batch["pixels"]),
                                                         model.encode_text(batch["input_ids"]), model.scale()),
                               rtol=1e-5, atol=1e-6)
    assert set(out) == {"loss", "short", "long", "logit_scale"}


def test_no_long_captions_is_plain_clip():
    model = tiny_clip(K=2)
    batch = make_batch()
    clip_batch = {k: v for k, v in batch.items() if k != "long_input_ids"}
    ours = LoTLIPTask(model, LoTLIPConfig(num_corners=2), LOCAL)(clip_batch)
    ref = ContrastiveTask(model, LOCAL)(clip_batch)
    torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-6, atol=1e-7)
    empty = dict(clip_batch, long_input_ids=batch["long_input_ids"][:, :0])
    torch.testing.assert_close(LoTLIPTask(model, LoTLIPConfig(num_corners=2), LOCAL)(empty)["loss"], ref["loss"])
    assert float(ours["long"]) == 0.0


def test_trailing_padding_columns_do_not_change_the_loss():
    model = tiny_clip(K=2)
    batch = make_batch()
    wide = dict(batch)
    wide["input_ids"] = F.pad(batch["input_ids"], (0, 5), value=PAD)
    wide["long_input_ids"] = F.pad(batch["long_input_ids"], (0, 4), value=PAD)
    task = LoTLIPTask(model, LoTLIPConfig(num_corners=2), LOCAL)
    torch.testing.assert_close(task(wide)["loss"], task(batch)["loss"], rtol=1e-6, atol=1e-7)


def test_gradients_reach_corners_only_through_long_texts():
    model = tiny_clip(K=2)
    batch = make_batch()
    task = LoTLIPTask(model, LoTLIPConfig(num_corners=2), LOCAL)
    task(batch)["loss"].backward()
    assert model.text.readout.grad is not None and model.text.readout.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    task({k: v for k, v in batch.items() if k != "long_input_ids"})["loss"].backward()
    g = model.text.readout.grad
    assert g is None or float(g.abs().sum()) == 0.0


def test_combine_losses_and_config_errors():
    s, longs = torch.tensor(2.0), [torch.tensor(1.0), torch.tensor(4.0)]
    assert float(combine_losses(s, longs, 1.0, 1.0, "count")) == pytest.approx(7 / 3)
    assert float(combine_losses(s, longs, 0.5, 2.0, "mean")) == pytest.approx(1 + 5)
    assert float(combine_losses(s, [], 0.5, 2.0, "count")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="long_features"):
        LoTLIPConfig(long_features="corners")
    with pytest.raises(ValueError, match="normalize"):
        LoTLIPConfig(normalize="sum")
    with pytest.raises(ValueError, match="num_corners"):
        LoTLIPConfig(num_corners=-1)
    with pytest.raises(ValueError, match="num_readout_tokens=2"):
        LoTLIPTask(tiny_clip(K=2), LoTLIPConfig(num_corners=4), LOCAL)
    with pytest.raises(ValueError, match="InfoNCE"):
        LoTLIPTask(tiny_clip(K=2), LoTLIPConfig(num_corners=2), LossConfig(kind="siglip"))


def test_task_accepts_a_dict_config_and_default_gather():
    model = tiny_clip(K=2)
    task = LoTLIPTask(model, {"num_corners": 2, "w_long": 0.5}, LossConfig())   # global_with_grad, 1 process
    batch = make_batch()
    want, _ = direct_loss(model, batch, 1.0, 0.5)
    torch.testing.assert_close(task(batch)["loss"], want, rtol=1e-5, atol=1e-6)
    assert copy.deepcopy(task.cfg).w_long == 0.5
