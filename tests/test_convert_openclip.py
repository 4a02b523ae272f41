"""OpenCLIP checkpoints load into polymodal and match an independent OpenCLIP-layout forward pass.

open_clip is not a dependency, so this file holds its own small plain-torch model with OpenCLIP's
parameter names and computation (nn.MultiheadAttention over (L, B, D), `x @ proj` projections,
argmax text pooling); its state dict is the checkpoint under test.
"""
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import polymodal
from polymodal.convert import openclip
from polymodal.hub import CheckpointError
from polymodal.models.clip import CLIP

EMBED, WIDTH, LAYERS, IMAGE, PATCH, VOCAB, CTX = 24, 32, 2, 32, 8, 100, 16


def model_cfg(quick_gelu=True, **text_extra):
    return {"embed_dim": EMBED, "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "layers": LAYERS,
                           "head_width": 16},
            "text_cfg": {"context_length": CTX, "vocab_size": VOCAB, "width": WIDTH, "heads": 2,
                         "layers": LAYERS, **text_extra}}


class RefBlock(nn.Module):
    def __init__(self, d, heads, quick_gelu):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        act = (lambda x: x * torch.sigmoid(1.702 * x)) if quick_gelu else F.gelu
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", _Fn(act)),
                                              ("c_proj", nn.Linear(4 * d, d))]))

    def forward(self, x, mask=None):            # x: (L, B, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class RefTransformer(nn.Module):
    def __init__(self, d, layers, heads, quick_gelu):
        super().__init__()
        self.resblocks = nn.ModuleList(RefBlock(d, heads, quick_gelu) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class RefVisual(nn.Module):
    def __init__(self, quick_gelu):
        super().__init__()
        grid = IMAGE // PATCH
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = RefTransformer(WIDTH, LAYERS, WIDTH // 16, quick_gelu)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)                       # (B, P, W)
        cls = self.class_embedding + torch.zeros(len(x), 1, WIDTH)
        x = torch.cat([cls, x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)[:, 0] @ self.proj


class RefCLIP(nn.Module):
    """OpenCLIP's CLIP (ViT + causal text transformer) with its parameter names."""

    def __init__(self, quick_gelu=True):
        super().__init__()
        self.visual = RefVisual(quick_gelu)
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CTX, WIDTH) * 0.1)
        self.transformer = RefTransformer(WIDTH, LAYERS, 2, quick_gelu)
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(2.5))

    def encode_text(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((CTX, CTX), float("-inf")).triu(1)                     # additive causal mask
        x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection


def make_reference(quick_gelu=True, seed=0):
    torch.manual_seed(seed)
    ref = RefCLIP(quick_gelu).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if name.endswith(("proj", "text_projection")):
                p.mul_(WIDTH ** -0.5)
    return ref


def inputs():
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(1, 90, (3, CTX), generator=g)
    ids[:, 0] = 98
    for row, end in enumerate((4, 10, CTX - 1)):
        ids[row, end] = 99                        # EOT: the largest id
        ids[row, end + 1:] = 0
    return pixels, ids


def assert_matches(model, ref):
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), ref.visual(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, normalize=False), ref.encode_text(ids), atol=1e-5, rtol=0)
        assert torch.allclose(model.logit_scale, ref.logit_scale)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_safetensors_with_stem_config(tmp_path, quick_gelu):
    ref = make_reference(quick_gelu)
    save_file(ref.state_dict(), str(tmp_path / "ViT-tiny.safetensors"))
    (tmp_path / "ViT-tiny.json").write_text(json.dumps(model_cfg(quick_gelu)))
    assert openclip.detect(tmp_path / "ViT-tiny.safetensors")
    model = polymodal.load_model(tmp_path / "ViT-tiny.safetensors")
    assert isinstance(model, CLIP) and model.config.vision.act == ("quick_gelu" if quick_gelu else "gelu")
    assert_matches(model, ref)


def test_bin_file_with_explicit_config(tmp_path):
    ref = make_reference()
    torch.save(ref.state_dict(), tmp_path / "weights.bin")
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "ViT-tiny.json").write_text(json.dumps(model_cfg()))
    model = polymodal.load_model(tmp_path / "weights.bin", config=tmp_path / "cfgs" / "ViT-tiny.json")
    assert_matches(model, ref)


def test_training_checkpoint_nested_with_module_prefix(tmp_path):
    ref = make_reference()
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg()}))
    assert openclip.detect(tmp_path / "epoch_3.pt")
    assert_matches(polymodal.load_model(tmp_path / "epoch_3.pt"), ref)


def test_hub_style_directory_with_preprocess_cfg(tmp_path):
    ref = make_reference()
    save_file(ref.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg(),
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "resize_mode": "squash",
                           "interpolation": "bilinear"}}))
    model = polymodal.load_model(tmp_path)
    assert_matches(model, ref)
    t = model.image_transform
    assert t.mean == (0.5, 0.5, 0.5) and t.resize == "squash" and t.interpolation == "bilinear"
    assert t.image_size == (IMAGE, IMAGE)
    assert model.tokenizer is None


def test_text_projection_with_bias(tmp_path):
    ref = make_reference()
    state = ref.state_dict()
    proj = state.pop("text_projection")
    bias = torch.randn(EMBED)
    state["text_projection.weight"], state["text_projection.bias"] = proj.t().contiguous(), bias
    save_file(state, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(model_cfg(proj_bias=True)))
    model = polymodal.load_model(tmp_path / "m.safetensors")
    pixels, ids = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, normalize=False), ref.encode_text(ids) + bias,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), ref.visual(pixels), atol=1e-5, rtol=0)


def test_missing_config_names_where_it_looked(tmp_path):
    save_file(make_reference().state_dict(), str(tmp_path / "lonely.safetensors"))
    with pytest.raises(FileNotFoundError) as err:
        polymodal.load_model(tmp_path / "lonely.safetensors")
    msg = str(err.value)
    for name in ("open_clip_config.json", "config.json", "lonely.json", "config="):
        assert name in msg


def test_unsupported_option_is_refused(tmp_path):
    save_file(make_reference().state_dict(), str(tmp_path / "m.safetensors"))
    cfg = model_cfg()
    cfg["vision_cfg"]["ls_init_value"] = 1e-5
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(openclip.OpenCLIPConfigError, match="ls_init_value"):
        polymodal.load_model(tmp_path / "m.safetensors")


def test_extra_and_missing_keys_are_listed(tmp_path):
    state = make_reference().state_dict()
    del state["visual.ln_pre.bias"]
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    save_file(state, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(model_cfg()))
    with pytest.raises(CheckpointError) as err:
        polymodal.load_model(tmp_path / "m.safetensors")
    assert "visual.norm_pre.bias" in str(err.value)
    assert "visual.transformer.resblocks.0.ls_1.gamma" in str(err.value)


def test_detect_rejects_other_files(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "y.pt").write_bytes(b"not a pickle")
    (tmp_path / "z.txt").write_text("hello")
    assert not any(openclip.detect(tmp_path / n) for n in ("x.safetensors", "y.pt", "z.txt"))
