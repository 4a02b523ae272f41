"""LoTLIP checkpoint conversion: a tiny state dict in the authors' key layout (OpenCLIP CustomTextCLIP with an
HF BERT text tower and a timm ViT) loads strictly and matches independent reference forwards."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.convert import lotlip
from polymodal.hub import CheckpointError, load_model

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

V, K, TW, TL, TH = 40, 2, 32, 2, 2          # text: vocab, corners, width, layers, heads
VW, VL, VH, PATCH, IMG = 32, 2, 2, 4, 12    # vision: width, layers, heads, patch, image size
MAXPOS, CTX = 24, 16
PAD, CLS, SEP = 0, 2, 3


def make_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=V + K, hidden_size=TW, num_hidden_layers=TL, num_attention_heads=TH,
                                  intermediate_size=2 * TW + 8, max_position_embeddings=MAXPOS, pad_token_id=PAD,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    bert = transformers.BertModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():        # larger weights, non-trivial LayerNorms and token-type rows: every weight matters
        for name, p in bert.named_parameters():
            if "LayerNorm" in name or "token_type" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(8.0)
    return bert


def make_vit_state(seed=1, head_dim=None):
    """timm ViT weights (`visual.trunk.*`), written by hand in timm's key layout."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    P = (IMG // PATCH) ** 2
    st = {"visual.trunk.cls_token": r(1, 1, VW), "visual.trunk.pos_embed": r(1, 1 + P, VW),
          "visual.trunk.patch_embed.proj.weight": r(VW, 3, PATCH, PATCH), "visual.trunk.patch_embed.proj.bias": r(VW),
          "visual.trunk.norm.weight": 1 + r(VW), "visual.trunk.norm.bias": r(VW)}
    for i in range(VL):
        b = f"visual.trunk.blocks.{i}."
        st.update({b + "norm1.weight": 1 + r(VW), b + "norm1.bias": r(VW),
                   b + "attn.qkv.weight": r(3 * VW, VW), b + "attn.qkv.bias": r(3 * VW),
                   b + "attn.proj.weight": r(VW, VW), b + "attn.proj.bias": r(VW),
                   b + "norm2.weight": 1 + r(VW), b + "norm2.bias": r(VW),
                   b + "mlp.fc1.weight": r(4 * VW, VW), b + "mlp.fc1.bias": r(4 * VW),
                   b + "mlp.fc2.weight": r(VW, 4 * VW), b + "mlp.fc2.bias": r(VW)})
    if head_dim is not None:
        st["visual.head.proj.weight"] = r(head_dim, VW)
    return st


def make_state(embed_dim=VW, head=False, seed=0):
    bert = make_bert(seed)
    st = {f"text.transformer.{k}": v.clone() for k, v in bert.state_dict().items()}
    st["text.proj.weight"] = torch.randn(embed_dim, TW) * 0.2
    st.update(make_vit_state(seed + 1, head_dim=embed_dim if head else None))
    st["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return st, bert


def save_checkpoint(tmp_path, state, config=True):
    """As the authors' training script saves it: {"epoch", "state_dict"} with DDP's "module." prefixes."""
    path = tmp_path / "model.pt"
    torch.save({"epoch": 3, "name": "lotlip", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    if config:
        cfg = {"embed_dim": state["text.proj.weight"].shape[0],
               "vision_cfg": {"timm_model_name": "vit_tiny", "timm_pool": "token", "timm_proj": "none"},
               "text_cfg": {"context_length": CTX, "hf_model_name": "bert-base-uncased", "hf_proj_type": "linear",
                            "hf_pooler_type": "cls_pooler", "num_corner_token": K}}
        (tmp_path / "lotlip_bert-tiny.json").write_text(json.dumps(cfg))
    return path


# ----------------------------------------------------------------------------- references

def lotlip_mask(ids: torch.Tensor, k: int) -> torch.Tensor:
    """The authors' mask rule, written out: (B, L, L) 1 = may attend."""
    B, L = ids.shape
    mask = (ids != PAD).long()[:, None, :].repeat(1, L, 1)
    for i in range(B):
        mask[i, :, : k + 1] = 0            # nobody sees CLS or the corners ...
        mask[i, k + 1:, 0] = 1             # ... except that text sees CLS
        for j in range(k + 1):
            mask[i, j, j] = 1              # ... and CLS / each corner sees itself
    return mask


def reference_text(bert, proj_w, ids_with_corners):
    """BERT with the LoTLIP mask (as a 4-D mask), pooler on CLS + corners, linear projection."""
    mask = lotlip_mask(ids_with_corners, K).bool()[:, None]              # (B, 1, L, L)
    with torch.no_grad():
        h = bert(input_ids=ids_with_corners, attention_mask=mask).last_hidden_state
        pooled = torch.tanh(bert.pooler.dense(h[:, : K + 1]))            # (B, K+1, W)
    return pooled @ proj_w.T


def reference_vit(st, pixels):
    """A plain timm-style ViT forward (pre-LN, eps 1e-6, exact GELU, CLS after the final norm)."""
    t = "visual.trunk."
    x = F.conv2d(pixels, st[t + "patch_embed.proj.weight"], st[t + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([st[t + "cls_token"].expand(len(x), -1, -1), x], 1) + st[t + "pos_embed"]
    ln = lambda y, n: F.layer_norm(y, (VW,), st[t + n + ".weight"], st[t + n + ".bias"], eps=1e-6)  # noqa: E731
    hd = VW // VH
    for i in range(VL):
        b = f"blocks.{i}."
        y = ln(x, b + "norm1")
        q, k, v = F.linear(y, st[t + b + "attn.qkv.weight"], st[t + b + "attn.qkv.bias"]).chunk(3, -1)
        heads = lambda z: z.view(z.shape[0], z.shape[1], VH, hd).transpose(1, 2)  # noqa: E731
        a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(hd), -1) @ heads(v)
        a = a.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(a, st[t + b + "attn.proj.weight"], st[t + b + "attn.proj.bias"])
        y = F.gelu(F.linear(ln(x, b + "norm2"), st[t + b + "mlp.fc1.weight"], st[t + b + "mlp.fc1.bias"]))
        x = x + F.linear(y, st[t + b + "mlp.fc2.weight"], st[t + b + "mlp.fc2.bias"])
    return ln(x, "norm")[:, 0]


def text_batch():
    """Our input (no corners) and the authors' (corner ids V..V+K-1 after CLS)."""
    ours = torch.tensor([[CLS, 11, 12, 13, 14, SEP, PAD, PAD],
                         [CLS, 21, 22, SEP, PAD, PAD, PAD, PAD]])
    corners = torch.arange(V, V + K).expand(2, K)
    theirs = torch.cat([ours[:, :1], corners, ours[:, 1:]], 1)
    return ours, theirs


# ----------------------------------------------------------------------------- tests

def test_detect_file_and_folder(tmp_path):
    state, _ = make_state()
    path = save_checkpoint(tmp_path, state)
    assert lotlip.detect(path) and lotlip.detect(tmp_path)
    other = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, other)
    assert not lotlip.detect(other)
    assert not lotlip.detect(tmp_path / "missing.pt")


def test_text_tower_matches_bert_with_the_lotlip_mask(tmp_path):
    state, bert = make_state()
    model = load_model(save_checkpoint(tmp_path, state), text_heads=TH, vision_heads=VH)
    assert model.config.text.num_readout_tokens == K and model.config.text.context_length == CTX
    ours, theirs = text_batch()
    want = reference_text(bert, state["text.proj.weight"], theirs)           # (B, K+1, E)
    with torch.no_grad():
        got = model.encode_text_readouts(ours, normalize=False)
        cls = model.encode_text(ours, normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, want[:, 0], rtol=1e-4, atol=1e-5)        # inference: CLS feature only
    # The reference really depends on the mask: BERT's plain padding mask gives other corner states.
    with torch.no_grad():
        plain = bert(input_ids=theirs, attention_mask=(theirs != PAD).long()).last_hidden_state
    assert (torch.tanh(bert.pooler.dense(plain[:, :K + 1])) @ state["text.proj.weight"].T - want).abs().max() > 1e-3


def test_vision_tower_matches_a_plain_timm_vit(tmp_path):
    state, _ = make_state()
    model = load_model(save_checkpoint(tmp_path, state), text_heads=TH, vision_heads=VH)
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(got, reference_vit(state, pixels), rtol=1e-4, atol=1e-5)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    assert model.image_transform.image_size == (IMG, IMG)


def test_visual_head_projection_and_position_ids_buffer(tmp_path):
    E = 24
    state, _ = make_state(embed_dim=E, head=True)
    state["text.transformer.embeddings.position_ids"] = torch.arange(MAXPOS)[None]   # older transformers saved it
    model = lotlip.load(save_checkpoint(tmp_path, state, config=False), num_corners=K, context_length=CTX,
                        text_heads=TH, vision_heads=VH)
    pixels = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        got = model.encode_image(pixels, normalize=False)
    torch.testing.assert_close(got, reference_vit(state, pixels) @ state["visual.head.proj.weight"].T,
                               rtol=1e-4, atol=1e-5)
    assert model.config.embed_dim == E


def test_loading_is_strict(tmp_path):
    state, _ = make_state()
    state["text.transformer.encoder.layer.0.attention.self.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        lotlip.load(save_checkpoint(tmp_path, state), text_heads=TH, vision_heads=VH)
    state, _ = make_state()
    del state["visual.trunk.norm.bias"]
    with pytest.raises(CheckpointError, match="missing keys.*visual.norm.bias"):
        lotlip.load(save_checkpoint(tmp_path, state), text_heads=TH, vision_heads=VH)


def test_config_inference_and_refusals():
    rows = lotlip.BERT_BASE_VOCAB + 2
    st = {lotlip._TEXT_MARK: torch.zeros(rows, 64),
          "text.transformer.embeddings.position_embeddings.weight": torch.zeros(512, 64),
          "text.transformer.pooler.dense.weight": torch.zeros(64, 64),
          "text.proj.weight": torch.zeros(64, 64),
          lotlip._VISION_MARK: torch.zeros(64, 3, 16, 16), "visual.trunk.pos_embed": torch.zeros(1, 197, 64)}
    cfg = lotlip.config_from_state(st)
    assert cfg["text"]["num_readout_tokens"] == 2 and cfg["text"]["vocab_size"] == lotlip.BERT_BASE_VOCAB
    assert cfg["text"]["context_length"] == 128 and cfg["text"]["heads"] == 1
    assert cfg["vision"]["image_size"] == 224 and cfg["vision"]["patch_size"] == 16
    assert cfg["text"]["pooler"] == "dense_tanh" and cfg["text"]["norm_first"] is False
    with pytest.raises(lotlip.LoTLIPConfigError, match="hf_proj_type"):
        lotlip.config_from_state(st, {"text_cfg": {"hf_proj_type": "mlp"}})
    with pytest.raises(lotlip.LoTLIPConfigError, match="context_length 600"):
        lotlip.config_from_state(st, context_length=600)
    with pytest.raises(lotlip.LoTLIPConfigError, match="embed_dim"):
        lotlip.config_from_state(dict(st, **{"text.proj.weight": torch.zeros(32, 64)}))


def test_sentence_separators():
    assert lotlip.sentence_separators("A red star. A blue circle. Done.") == "A red star[SEP]A blue circle[SEP]Done."
