"""Weight decay is declared by the modules (`no_weight_decay()`), not guessed from parameter names."""
import pytest
import torch
from torch import nn

from polymodal.train.loop import no_decay_names, param_groups


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.zeros(6, 4))
        self.embed = nn.Linear(4, 4)                  # an ordinary layer, whatever its name

    def no_weight_decay(self) -> set[str]:
        return {"pos", "table.weight"}


def test_no_decay_names_joins_declarations_with_prefixes_and_the_1d_rule():
    shared = _Tokens()
    root = nn.Module()
    root.a, root.b, root.proj = shared, shared, nn.Linear(4, 2)        # one module under two names
    root.scale = nn.Parameter(torch.tensor(1.0))
    assert no_decay_names(root) == {"a.pos", "a.table.weight", "a.embed.bias", "proj.bias", "scale"}
    groups = param_groups(root, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(shared.embed.weight), id(root.proj.weight)}


def test_a_declaration_naming_no_parameter_is_an_error():
    class Typo(_Tokens):
        def no_weight_decay(self):
            return {"poss"}
    with pytest.raises(ValueError, match=r"Typo \(the root\).*'poss'"):
        no_decay_names(Typo())


# ---- every family: tiny models -------------------------------------------------------------------------
def _clip(**over):
    from polymodal.models.factory import create_model
    torch.manual_seed(0)
    return create_model("tiny", over or None)


def _video(kind):
    from polymodal.models.video import VideoCLIP
    extra = {"stan_layers": 1} if kind == "stan" else {}
    return VideoCLIP.from_image_model(_clip(), {"kind": kind, **extra})


def _sycoca():
    from polymodal.methods.sycoca import SyCoCaConfig, SyCoCaTask
    from polymodal.models.factory import create_model
    return SyCoCaTask(create_model("coca-tiny"), SyCoCaConfig(decoder_width=32, decoder_heads=2, decoder_layers=1))


def _scene_streams():
    from polymodal.models.scene import FrameStream, SceneConfig, TemporalStream
    m = nn.Module()
    m.frame, m.temporal = FrameStream(32, 5, SceneConfig(layers=1), 2), TemporalStream(32, 5, SceneConfig(layers=1), 2)
    return m


def _snps3():
    from polymodal.models.fusion import FusionConfig, create_snps3_model
    return create_snps3_model(FusionConfig(text={"vocab_size": 100, "width": 32, "layers": 2, "heads": 2},
                                           vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                                   "heads": 2}))


def _adapter():
    from polymodal.models.multilabel import AdapterConfig, MultiLabelAdapter
    return MultiLabelAdapter(AdapterConfig(embed_dim=16, hidden_dim=24, train_classifier=True), torch.randn(5, 16))


def _tokenizer(vocab_size):
    from polymodal.data.text import train_tokenizer
    return train_tokenizer(["a b c d e f g h"] * 10, vocab_size=vocab_size, context_length=16, min_frequency=1)


def _reward():
    from polymodal.models.reward import TextRewardModel
    return TextRewardModel.from_tokenizer(_tokenizer(200), {"width": 32, "layers": 2, "heads": 2, "context_length": 8})


def _mllm():
    from polymodal.models.mllm import create_mllm, mllm_config
    tok = _tokenizer(300)
    return create_mllm(mllm_config("mllm-tiny", {"lm.width": 32, "lm.heads": 2}, tok), tok)


def _create(name):
    from polymodal.models.factory import create_model
    return lambda: create_model(name)


VISION = {"visual.cls", "visual.pos"}
TEXT = {"text.pos", "text.token_embed.weight"}
# family -> (builder, the 2-d (or larger) parameters that must stay undecayed: exactly these)
FAMILIES = {
    "clip": (_clip, VISION | TEXT),
    "clip_readout": (lambda: _clip(**{"text.num_readout_tokens": 2}), VISION | TEXT | {"text.readout"}),
    "m2": (_create("m2-tiny"), {"cls", "vision_pos", "text_pos", "token_embed.weight"}),
    "coca": (_create("coca-tiny"), VISION | TEXT | {"contrastive_pooler.query", "context_pooler.query"}),
    "sycoca_mim": (_sycoca, {f"model.{n}" for n in VISION | TEXT | {"contrastive_pooler.query",
                                                                    "context_pooler.query"}}
                   | {"mim_head.pos", "mim_head.mask_token"}),
    "video_mean": (lambda: _video("mean"), {f"base.{n}" for n in VISION | TEXT}),
    "video_transformer": (lambda: _video("transformer"), {f"base.{n}" for n in VISION | TEXT} | {"temporal.time"}),
    "video_stan": (lambda: _video("stan"), {f"base.{n}" for n in VISION | TEXT} | {"temporal.time"}),
    "scene_streams": (_scene_streams, {"temporal.cls", "temporal.time", "temporal.text_type"}),
    "snps3": (_snps3, {"vision.cls", "vision.pos", "text_encoder.embeddings.word.weight",
                       "text_encoder.embeddings.pos.weight", "text_encoder.embeddings.token_type.weight"}),
    "multilabel": (_adapter, {"label_embeds"}),
    "reward": (_reward, {"tower.pos", "tower.token_embed.weight"}),
    "mllm": (_mllm, VISION | {"lm.pos", "lm.token_embed.weight"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layers_decay_and_declared_embeddings_do_not(family):
    build, declared = FAMILIES[family]
    model = build()
    skip = no_decay_names(model)
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    layers = {names[id(m.weight)] for m in model.modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    assert layers and not layers & skip                     # patch convs, `embed` / `text_embed` Linears decay
    assert {n for n in skip if params[n].ndim >= 2} == {n for n in declared if params[n].ndim >= 2}
    assert declared <= skip                                 # 1-d tokens too (declared or by the generic rule)
