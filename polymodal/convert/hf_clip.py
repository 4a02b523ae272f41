"""Hugging Face transformers `CLIPModel` directories -> polymodal `CLIP`.

A directory written by `CLIPModel.save_pretrained` holds `config.json` (model_type "clip", with
`text_config` and `vision_config`) and `model.safetensors` (or `pytorch_model.bin`, or shards with an
index). The architecture is the same as ours; the differences are names and three details:

* HF keeps separate q/k/v projections; ours is one fused `qkv` Linear (rows q | k | v).
* HF applies `post_layernorm` to the CLS state only; ours normalises every token. The pooled CLS
  feature is identical.
* HF pools text at `argmax(ids)` when `eos_token_id == 2` (configs older than transformers PR
  #24773) and at the first `eos_token_id` otherwise: our `pool="argmax"` / `pool="eot"`.

The HF text tower also takes a padding `attention_mask`; with causal attention and pads after EOT it
does not change the EOT state, so our causal tower needs no mask.
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import (BlockRule, CheckpointError, find_weights, finish_clip, mlp_ratio, read_json, read_json_object,
                     read_weights, rename_state_dict, tokenizer_beside)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_PICKLE_FIX = ("if you trust it, re-save the folder with save_pretrained(..., safe_serialization=True) "
               "to get model.safetensors")

# HF `hidden_act` -> our activation name.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

# Non-persistent buffers that older checkpoints still contain; they carry no information.
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# Per-layer renames (HF suffix -> ours); q/k/v are fused separately.
_LAYER_RENAMES = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.out",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

# Whole-key renames outside the encoder layers.
_RENAMES = {
    "vision_model.embeddings.class_embedding": "visual.cls",
    "vision_model.embeddings.patch_embedding.weight": "visual.patch_embed.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.pos",
    "vision_model.pre_layrnorm.weight": "visual.norm_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.norm_pre.bias",
    "vision_model.post_layernorm.weight": "visual.norm.weight",
    "vision_model.post_layernorm.bias": "visual.norm.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embed.weight",
    "text_model.embeddings.position_embedding.weight": "text.pos",
    "text_model.final_layer_norm.weight": "text.norm.weight",
    "text_model.final_layer_norm.bias": "text.norm.bias",
    "visual_projection.weight": "visual_proj.weight",
    "text_projection.weight": "text_proj.weight",
    "logit_scale": "logit_scale",
}

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_BLOCKS = (
    BlockRule(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$", "visual.transformer.blocks.{}", _LAYER_RENAMES, _QKV),
    BlockRule(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$", "text.transformer.blocks.{}", _LAYER_RENAMES, _QKV),
)


def detect(path) -> bool:
    """True for a directory with `model.safetensors`/`pytorch_model.bin` (or shards) and an HF CLIP
    `config.json`, or a `config.json` that is not valid JSON (so that `load` names the broken file)."""
    path = Path(path)
    if not path.is_dir() or find_weights(path, WEIGHT_FILES + INDEX_FILES) is None:
        return False
    if not (path / "config.json").is_file():
        return False
    try:
        config = read_json(path / "config.json")
    except CheckpointError:
        return True
    if not isinstance(config, dict):
        return False
    return config.get("model_type") == "clip" or ("text_config" in config and "vision_config" in config)


def _activation(name: str, where: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act {name!r} is not supported; known: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def config_from_hf(hf: dict, where: str = "config.json") -> dict:
    """Translate an HF `CLIPConfig` dict into our CLIP config dict (the `config.json` schema).

    Args:
        hf: the parsed HF config.json.
        where: a label for error messages.
    Returns:
        A dict for `polymodal.models.factory.build_config`.
    """
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    # HF fills unspecified sub-config values with CLIPVisionConfig / CLIPTextConfig defaults.
    v_hidden, t_hidden = v.get("hidden_size", 768), t.get("hidden_size", 512)
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"{where}: vision_config.num_channels={v['num_channels']} is not supported (RGB only)")
    eos = t.get("eos_token_id", 49407)
    vision = {
        "image_size": v.get("image_size", 224),
        "patch_size": v.get("patch_size", 32),
        "width": v_hidden,
        "layers": v.get("num_hidden_layers", 12),
        "heads": v.get("num_attention_heads", 12),
        "mlp_ratio": mlp_ratio(v_hidden, v.get("intermediate_size", 3072)),
        "act": _activation(v.get("hidden_act", "quick_gelu"), f"{where} vision_config"),
        "patch_bias": False,
        "ln_pre": True,
        "norm_eps": float(v.get("layer_norm_eps", 1e-5)),
        "pool": "cls",
    }
    text = {
        "vocab_size": t.get("vocab_size", 49408),
        "context_length": t.get("max_position_embeddings", 77),
        "width": t_hidden,
        "layers": t.get("num_hidden_layers", 12),
        "heads": t.get("num_attention_heads", 8),
        "mlp_ratio": mlp_ratio(t_hidden, t.get("intermediate_size", 2048)),
        "act": _activation(t.get("hidden_act", "quick_gelu"), f"{where} text_config"),
        "causal": True,
        "norm_eps": float(t.get("layer_norm_eps", 1e-5)),
        # eos_token_id == 2 is HF's marker for the legacy argmax pooling (see module docstring).
        "pool": "argmax" if eos == 2 else "eot",
        "eot_token_id": eos,
        "pad_token_id": t.get("pad_token_id", 1),
    }
    return {"model_type": "clip", "embed_dim": hf.get("projection_dim", 512), "vision": vision, "text": text}


def convert_state_dict(hf_state: dict) -> dict:
    """Rename HF CLIPModel weights to ours, fusing q/k/v into `qkv`.

    Args:
        hf_state: {HF key: tensor}.
    Returns:
        Our state dict. Keys that match no rule are kept under their HF name, so strict loading
        reports them as unexpected; a q/k/v triple with a member missing is also left unfused and
        reported.
    """
    return rename_state_dict(hf_state, _RENAMES, _BLOCKS, IGNORED_KEYS)


def to_hf_state_dict(model) -> dict:
    """The inverse of `convert_state_dict` for a plain CLIP (no read-out tokens): HF CLIPModel keys."""
    inverse = {ours: hf for hf, ours in _RENAMES.items()}
    layer_inverse = {ours: hf for hf, ours in _LAYER_RENAMES.items()}
    out = {}
    for key, value in model.state_dict().items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        m = re.match(r"^(visual|text)\.transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise ValueError(f"{key}: no HF CLIPModel equivalent")
        tower, layer, name, kind = m.groups()
        prefix = f"{'vision' if tower == 'visual' else 'text'}_model.encoder.layers.{layer}"
        if name == "attn.qkv":
            for c, part in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.self_attn.{c}_proj.{kind}"] = part
        elif name in layer_inverse:
            out[f"{prefix}.{layer_inverse[name]}.{kind}"] = value
        else:
            raise ValueError(f"{key}: no HF CLIPModel equivalent")
    return out


def hf_config_from(cfg, logit_scale: float | None = None, bos_token_id: int | None = None) -> dict:
    """The HF `CLIPConfig` dict (config.json) of our CLIP config: the inverse of `config_from_hf`.

    Args:
        cfg: a `CLIPConfig` (our dual encoder).
        logit_scale: the model's current log-scale, written as `logit_scale_init_value` (default: the config's).
        bos_token_id: the tokenizer's start id (default: the end id minus one, as in CLIP's vocabulary).
    Returns:
        The config.json dict for `transformers.CLIPModel`.
    Raises:
        ValueError: an option HF's CLIPModel has no exact equivalent for (named in the message).
    """
    v, t = cfg.vision, cfg.text
    checks = [("text.num_readout_tokens", t.num_readout_tokens, 0), ("text.causal", t.causal, True),
              ("text.norm_first", t.norm_first, True), ("text.embed_norm", t.embed_norm, False),
              ("text.final_norm", t.final_norm, True), ("text.pooler", t.pooler, "none"),
              ("vision.patch_bias", v.patch_bias, False), ("vision.ln_pre", v.ln_pre, True),
              ("vision.pool", v.pool, "cls"), ("proj_bias", cfg.proj_bias, False)]
    for name, value, ok in checks:
        if value != ok:
            raise ValueError(f"export to HF CLIP: {name}={value!r} has no transformers CLIPModel equivalent "
                             f"(needs {ok!r})")
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
    for tower in (v, t):
        if tower.act not in acts:
            raise ValueError(f"export to HF CLIP: act={tower.act!r} has no HF equivalent ({sorted(acts)})")
    if t.pool == "cls":
        raise ValueError("export to HF CLIP: text.pool='cls' has no HF equivalent (CLIPModel pools at EOS)")
    # HF pools at the first eos_token_id, or at argmax(ids) when eos_token_id == 2 (legacy configs).
    # argmax equals "first EOT" when EOT is the largest id; otherwise keep argmax through the legacy marker.
    if t.pool == "eot" and t.eot_token_id == 2:
        raise ValueError("export to HF CLIP: text.eot_token_id=2 means argmax pooling to transformers; "
                         "re-number the end token")
    eos = t.eot_token_id if (t.pool == "eot" or t.eot_token_id == t.vocab_size - 1) else 2
    bos = max(t.eot_token_id - 1, 0) if bos_token_id is None else bos_token_id   # informational for CLIPModel
    text = {"model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "max_position_embeddings": t.context_length,
            "hidden_act": acts[t.act], "layer_norm_eps": t.norm_eps, "eos_token_id": eos,
            "bos_token_id": bos, "pad_token_id": t.pad_token_id, "projection_dim": cfg.embed_dim}
    vision = {"model_type": "clip_vision_model", "hidden_size": v.width,
              "intermediate_size": int(v.width * v.mlp_ratio),
              "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
              "patch_size": v.patch_size, "num_channels": 3, "hidden_act": acts[v.act], "layer_norm_eps": v.norm_eps,
              "projection_dim": cfg.embed_dim}
    scale = cfg.init_logit_scale if logit_scale is None else float(logit_scale)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": scale, "text_config": text, "vision_config": vision, "torch_dtype": "float32"}


def _read_weights(path: Path) -> tuple[dict, str]:
    """(state dict, source label) from single-file or sharded HF weights."""
    found = find_weights(path, WEIGHT_FILES + INDEX_FILES)
    if found is None:
        raise FileNotFoundError(f"{path}: no {' / '.join(WEIGHT_FILES + INDEX_FILES)}")
    if found.name in WEIGHT_FILES:
        return read_weights(found, fix=_PICKLE_FIX), str(found)
    weight_map = read_json_object(found, "an HF shard index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{found}: has no \"weight_map\" object (shard index of an HF checkpoint); "
                              f"fix or replace the file")
    state: dict = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_weights(path / shard, fix=_PICKLE_FIX))
    return state, str(found)


def _bundled_tokenizer(text: dict):
    """polymodal's bundled CLIP BPE tokenizer when the text tower has OpenAI's vocabulary, else None."""
    from ..data.text import bundled_tokenizer
    return bundled_tokenizer(text["vocab_size"], text["eot_token_id"], pool=text.get("pool", "eot"))


def load(path, **kwargs):
    """Load an HF CLIPModel directory as a polymodal CLIP.

    Args:
        path: the directory (config.json + weights; tokenizer and preprocessor_config.json optional).
        **kwargs: none are used; an unexpected one is an error.
    Returns:
        The CLIP model (eval mode) with `.tokenizer` (from the directory's tokenizer files; else the
        bundled CLIP BPE tokenizer for OpenAI's 49408-id vocabulary; else None) and `.image_transform`
        (from preprocessor_config.json, else the default).
    Raises:
        FileNotFoundError: no config.json or no weights.
        CheckpointError: config.json (or the shard index) is not valid JSON, a pickle that
            `weights_only=True` refuses, or an HF weight was not consumed or one of ours was not filled.
    """
    if kwargs:
        raise TypeError(f"HF CLIP loading takes no options, got {sorted(kwargs)}")
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist; an HF CLIP directory needs the config.json "
                                f"that save_pretrained writes")
    cfg = config_from_hf(read_json_object(config_file, "an HF CLIPConfig"), str(config_file))
    state, source = _read_weights(path)
    transform = None
    if (path / "preprocessor_config.json").is_file():
        from ..data.images import from_hf_preprocessor_config
        transform = from_hf_preprocessor_config(path / "preprocessor_config.json")
    return finish_clip(cfg, str(config_file), convert_state_dict(state), f"{source} (HF CLIP, converted)",
                       tokenizer_beside(path) or _bundled_tokenizer(cfg["text"]), transform)


__all__ = ["detect", "load", "config_from_hf", "convert_state_dict", "to_hf_state_dict", "hf_config_from",
           "CheckpointError"]
