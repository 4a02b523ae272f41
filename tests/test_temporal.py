"""Temporal modules (mean, temporal transformer, STAN) and the VideoCLIP wrapper, on tiny models."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from polymodal.config import from_dict
from polymodal.models.clip import CLIP
from polymodal.models.factory import create_model, named_config
from polymodal.models.multiway import M2Encoder
from polymodal.models.temporal import (STANBranch, TemporalConfig, TemporalTransformer, masked_mean,
                                       vision_hidden_states)
from polymodal.models.video import VideoCLIP, VideoCLIPConfig

torch.set_num_threads(1)


def tiny_clip(seed: int = 0, depth: int = 2) -> CLIP:
    torch.manual_seed(seed)
    overrides = {"vision.layers": depth} if depth != 2 else {}
    return create_model("tiny", overrides).eval()   # ViT 32 px, patch 8 (16 patches), width 32, 2 layers


def video(kind: str, seed: int = 0, depth: int = 2, **temporal) -> VideoCLIP:
    model = VideoCLIP.from_image_model(tiny_clip(seed, depth), {"kind": kind, **temporal})
    return model.eval()


def frames(B: int = 2, T: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, 32, 32, generator=g)


def perturb_(module: torch.nn.Module, seed: int = 3, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- config

def test_time_init_sets_the_transformer_time_embedding_scale():
    small, large = video("transformer", layers=1), video("transformer", layers=1, time_init=1.0)
    assert float(small.temporal.time.std()) == pytest.approx(0.02, rel=0.2)
    assert float(large.temporal.time.std()) == pytest.approx(1.0, rel=0.2)


@pytest.mark.parametrize("key, value", [("kind", "lstm"), ("dropout", 1.0), ("drop_path", -0.1), ("time_init", -1.0),
                                        ("max_frames", 0), ("layers", 0), ("heads", -1)])
def test_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=f"temporal.{key}"):
        TemporalConfig(**{key: value})


def test_stan_layers_beyond_tower_depth_is_an_error():
    with pytest.raises(ValueError, match="temporal.stan_layers"):
        video("stan", stan_layers=3)            # the tiny tower has 2 layers


def test_stan_over_every_block_is_refused_not_started_at_the_embeddings():
    """A branch over all L blocks would start at layer 0, whose states already hold the position embeddings its first
    layer re-adds: refused, naming the largest valid value; L - 1 layers start after the first block."""
    with pytest.raises(ValueError, match=r"stan_layers=2 must be below .* 2 layers.*stan_layers <= 1"):
        video("stan", stan_layers=2)
    assert video("stan", stan_layers=2, depth=3).temporal.start == 1
    assert video("stan", stan_layers=1).temporal.start == 1


def test_config_round_trips_through_json_and_reads_through_to_the_base():
    cfg = VideoCLIPConfig(base=named_config("tiny"), temporal=TemporalConfig(kind="transformer", layers=1))
    assert cfg.text.eot_token_id == 999 and cfg.vision.width == 32
    cfg.vision.patch_dropout = 0.25             # an edit through the read-through attribute is saved
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["model_type"] == "video_clip" and data["base"]["vision"]["patch_dropout"] == 0.25
    again = from_dict(VideoCLIPConfig, data)
    assert again.temporal == cfg.temporal and again.vision == cfg.vision


def test_building_from_config_gives_the_base_family():
    clip = VideoCLIP(VideoCLIPConfig(base=named_config("tiny")))
    m2 = VideoCLIP(VideoCLIPConfig(base=named_config("m2-tiny"), temporal=TemporalConfig(kind="transformer")))
    assert isinstance(clip.base, CLIP) and isinstance(m2.base, M2Encoder)
    assert m2.encode_video(frames(T=2)).shape == (2, 32)


# ---------------------------------------------------------------- pooling

def test_masked_mean_ignores_invalid_frames():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    valid = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    x[~valid] = 1e6                              # garbage in padded frames must not leak
    out = masked_mean(x, valid)
    by_hand = torch.stack([(x[0, 0] + x[0, 1] + x[0, 3]) / 3, x[1, 0], torch.zeros(8)])
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(masked_mean(x[:1, :2]), x[0, :2].mean(0, keepdim=True))


def test_mean_pooling_equals_mean_of_per_frame_image_embeddings():
    model, f = video("mean"), frames()
    base = model.base
    per_frame = torch.stack([base.encode_image(f[:, t], normalize=False) for t in range(f.shape[1])], 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(f), F.normalize(per_frame.mean(1), dim=-1))
        valid = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)
        expect = torch.stack([per_frame[0, :3].mean(0), per_frame[1, [0, 2]].mean(0)])
        torch.testing.assert_close(model.encode_video(f, valid), F.normalize(expect, dim=-1))


# ---------------------------------------------------------------- temporal transformer

def test_temporal_transformer_at_init_is_mean_pooling():
    mean, trans, f = video("mean"), video("transformer", layers=2), frames()
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(trans.encode_video(f, valid), mean.encode_video(f, valid), atol=1e-6, rtol=0)
    # ... but it is not a constant: its output projection receives a gradient at once.
    trans.train()
    trans.encode_video(f).sum().backward()
    assert trans.temporal.proj.weight.grad.abs().sum() > 0


def test_temporal_transformer_is_order_sensitive_after_perturbation_and_mean_is_not():
    mean, trans, f = video("mean"), video("transformer", layers=2), frames()
    perturb_(trans.temporal)
    rev = f.flip(1)
    with torch.no_grad():
        assert (trans.encode_video(f) - trans.encode_video(rev)).abs().max() > 1e-3
        torch.testing.assert_close(mean.encode_video(f), mean.encode_video(rev))


def test_temporal_transformer_never_looks_at_padded_frames():
    trans, f = video("transformer", layers=2), frames()
    perturb_(trans.temporal)
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    g = f.clone()
    g[~valid] = torch.randn_like(g[~valid])
    with torch.no_grad():
        torch.testing.assert_close(trans.encode_video(f, valid), trans.encode_video(g, valid))


def test_temporal_transformer_rejects_clips_longer_than_the_time_table():
    module = TemporalTransformer(8, TemporalConfig(kind="transformer", max_frames=3, heads=2))
    with pytest.raises(ValueError, match="temporal.max_frames"):
        module(torch.randn(1, 4, 8))


# ---------------------------------------------------------------- STAN

def test_hidden_states_match_the_tower_forward():
    clip, px = tiny_clip(), frames()[:, 0]
    states = vision_hidden_states(clip.visual, px)
    assert len(states) == clip.config.vision.layers + 1
    with torch.no_grad():
        torch.testing.assert_close(clip.visual.norm(states[-1])[:, 0], clip.visual(px).pooled)


def test_stan_with_one_branch_layer_at_init_reproduces_the_image_model():
    # Zero temporal output, zero time embedding, no position re-add: z_1 = copy(block)(h_{L-1}) = h_L,
    # and norm(h_L + h_L) = norm(h_L) up to the LayerNorm eps.
    model, f = video("stan", stan_layers=1, stan_pos=False), frames()
    with torch.no_grad():
        per_frame = torch.stack([model.base.encode_image(f[:, t], normalize=False) for t in range(4)], 1)
        torch.testing.assert_close(model.encode_frames(f), per_frame, atol=1e-4, rtol=1e-4)


def test_stan_at_init_follows_the_branch_equations():
    """Independent computation with the *tower's* blocks (3 blocks, a branch over the last 2): with zero-initialised
    temporal attention, z1 = block1(h1 + time + cls/pos), z2 = block2(z1 + h2), frame = proj(norm(h3 + z2)[CLS])."""
    model, f = video("stan", stan_layers=2, depth=3), frames(B=2, T=3)
    with torch.no_grad():
        model.temporal.time.normal_(0, 0.5)    # a non-trivial time embedding
        tower, T = model.base.visual, 3
        px = f.flatten(0, 1)                                                  # (B*T, 3, H, W)
        h0 = tower.norm_pre(tower.embed(px))
        h1 = tower.transformer.blocks[0](h0)
        h2 = tower.transformer.blocks[1](h1)
        h3 = tower.transformer.blocks[2](h2)
        pos = torch.cat([(tower.cls + tower.pos[0])[None], tower.pos[1:]])     # (1+P, D)
        time = model.temporal.time[:T].repeat(2, 1)[:, None]                  # (B*T, 1, D)
        z1 = tower.transformer.blocks[1](h1 + time + pos)
        z2 = tower.transformer.blocks[2](z1 + h2)
        expect = model.base.visual_proj(tower.norm(h3[:, 0] + z2[:, 0])).view(2, T, -1)
        torch.testing.assert_close(model.encode_frames(f), expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_video(f), F.normalize(expect.mean(1), dim=-1), atol=1e-5, rtol=1e-5)


def test_stan_mixes_frames_only_through_its_temporal_attention():
    model, f = video("stan", stan_layers=2, depth=3), frames(B=1, T=3)
    g = f.clone()
    g[:, 2] = torch.randn_like(g[:, 2])                                       # change only the last frame
    with torch.no_grad():
        # At init the temporal attention adds 0: frame 0's feature ignores the other frames.
        torch.testing.assert_close(model.encode_frames(f)[:, 0], model.encode_frames(g)[:, 0])
        for t in model.temporal.temporal:
            perturb_(t)
        assert (model.encode_frames(f)[:, 0] - model.encode_frames(g)[:, 0]).abs().max() > 1e-4
        # ... and a padded frame still does not reach the valid ones.
        valid = torch.tensor([[True, True, False]])
        torch.testing.assert_close(model.encode_video(f, valid), model.encode_video(g, valid))


def test_gradients_flow_into_the_stan_branch():
    model, f = video("stan", stan_layers=2, depth=3, drop_path=0.0), frames()
    model.train()
    text = model.encode_text(torch.randint(0, 999, (2, 8)))
    logits = model.scale() * model.encode_video(f) @ text.T
    F.cross_entropy(logits, torch.arange(2)).backward()
    branch: STANBranch = model.temporal
    for name, p in [("time", branch.time), ("temporal out", branch.temporal[0].attn.out.weight),
                    ("spatial qkv", branch.spatial[0].attn.qkv.weight), ("spatial fc2", branch.spatial[1].mlp.fc2.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The branch's spatial blocks are copies: the image tower's own blocks are separate parameters.
    assert branch.spatial[0].attn.qkv.weight is not model.base.visual.transformer.blocks[1].attn.qkv.weight


def test_stan_patch_dropout_keeps_the_same_patches_in_every_frame_of_a_video():
    model = video("stan", stan_layers=1)
    model.config.vision.patch_dropout = 0.5
    model.train()
    seen = []
    hook = model.base.visual.transformer.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    f = frames(B=2, T=1).expand(-1, 3, -1, -1, -1)                           # three identical frames per video
    out = model.encode_video(f)
    hook.remove()
    x = seen[0].view(2, 3, -1, 32)                                            # (B, T, 1+K, D)
    assert x.shape[2] == 1 + 8                                                 # 16 patches, half kept
    torch.testing.assert_close(x[:, 1], x[:, 0])
    torch.testing.assert_close(x[:, 2], x[:, 0])
    assert out.shape == (2, 32) and torch.isfinite(out).all()


def test_stan_needs_a_vit_tower():
    torch.manual_seed(0)
    m2 = create_model("m2-tiny")
    with pytest.raises(ValueError, match="needs a ViT image tower.*kind=transformer"):
        VideoCLIP.from_image_model(m2, {"kind": "stan"})


# ---------------------------------------------------------------- wrapper

def test_patch_dropout_still_applies_for_mean_pooling():
    model = video("mean")
    model.config.vision.patch_dropout = 0.75
    model.train()
    seen = []
    hook = model.base.visual.transformer.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model.encode_video(frames(T=3))
    hook.remove()
    assert seen[0] == (2 * 3, 1 + 4, 32)                                      # (B*T, 1+K, W): 4 of 16 patches


@pytest.mark.parametrize("kind", ["mean", "transformer", "stan"])
def test_one_frame_works_and_encode_image_is_a_one_frame_video(kind):
    model, f = video(kind, stan_layers=1, layers=1), frames(T=1)
    with torch.no_grad():
        out = model.encode_video(f)
        assert out.shape == (2, 32)
        torch.testing.assert_close(model.encode_image(f[:, 0]), out)
        if kind == "mean":
            torch.testing.assert_close(out, model.base.encode_image(f[:, 0]))


def test_from_image_model_keeps_the_base_weights_and_processors():
    base = tiny_clip(seed=5)
    reference = tiny_clip(seed=5)               # an identical, independent copy
    base.tokenizer, base.image_transform = object(), object()
    model = VideoCLIP.from_image_model(base, TemporalConfig(kind="transformer", layers=1))
    ids = torch.randint(0, 999, (3, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), reference.encode_text(ids))
        torch.testing.assert_close(model.scale(), reference.scale())
    assert model.tokenizer is base.tokenizer and model.image_transform is base.image_transform
    sentinel = object()
    model.image_transform = sentinel            # setting it on the wrapper sets it on the base
    assert base.image_transform is sentinel
    assert model.config.to_dict()["base"] == reference.config.to_dict()


@pytest.mark.parametrize("kind", ["transformer", "stan"])
def test_state_dict_round_trip_through_safetensors(kind, tmp_path):
    model, f = video(kind, stan_layers=2, depth=3, layers=1), frames()
    perturb_(model.temporal)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.manual_seed(123)                       # a different random init
    again = VideoCLIP(from_dict(VideoCLIPConfig, json.loads((tmp_path / "config.json").read_text()))).eval()
    again.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_video(f), model.encode_video(f))


def test_save_pretrained_writes_a_folder_the_config_and_weights_rebuild(tmp_path):
    model, f = video("stan", stan_layers=1), frames()
    perturb_(model.temporal)
    model.attach_processors()                   # the default image transform, set on the base
    assert model.base.image_transform is not None
    model.save_pretrained(tmp_path / "v")
    data = json.loads((tmp_path / "v" / "config.json").read_text())
    data.pop("polymodal_version")
    again = VideoCLIP(from_dict(VideoCLIPConfig, data)).eval()
    again.load_state_dict(load_file(str(tmp_path / "v" / "model.safetensors")), strict=True)
    assert (tmp_path / "v" / "preprocessor_config.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_video(f), model.encode_video(f))
