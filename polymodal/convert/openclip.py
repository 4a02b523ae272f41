"""OpenCLIP checkpoints (ViT image tower + CLIP text transformer) -> polymodal `CLIP`.

An OpenCLIP checkpoint is a state dict (.safetensors, .bin, .pt or .pth; training checkpoints nest it
under "state_dict" and DDP adds "module." prefixes) plus a model config: either the `model_cfg` of an
`open_clip_config.json` or a plain model config such as OpenCLIP's `model_configs/ViT-B-32.json`
(`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`). Hub-style directories hold
`open_clip_model.safetensors` / `open_clip_pytorch_model.bin` next to `open_clip_config.json`.

Layout facts this converter relies on (OpenCLIP's `VisionTransformer`, `TextTransformer`, `CLIP`):

* image: `visual.conv1` (no bias), `visual.class_embedding`, `visual.positional_embedding`,
  `visual.ln_pre`, pre-LN blocks `visual.transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias,
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post` on all tokens, then the CLS token
  (`pool_type="tok"`) times `visual.proj` (width x embed: `x @ proj`, so our Linear weight is proj.T);
* text: `token_embedding`, `positional_embedding`, causal blocks `transformer.resblocks.N...`,
  `ln_final`, pooled at `argmax(ids)` (the EOT token has the largest id in the CLIP vocabulary),
  times `text_projection` (width x embed, `x @ text_projection`; an `nn.Linear` when `proj_bias`);
* `in_proj_weight` stacks q | k | v rows, the same order as our fused `qkv`;
* `logit_scale` (a scalar, or shape (1,) with `nonscalar_logit_scale`).

`CustomTextCLIP` checkpoints keep the text tower under a `text.` prefix; it is stripped.
Options without an equivalent here (layer scale, attentional pooling, timm or HF towers, SigLIP's
logit bias, bidirectional text) are refused with an error naming the option.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from .common import (WEIGHT_SUFFIXES, BlockRule, find_weights, finish_clip, given_config, peek_keys, read_weights,
                     rename_state_dict, require_weights, search_config, strip_prefixes, tokenizer_beside)

SUFFIXES = WEIGHT_SUFFIXES
DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Entries of OpenAI's original state dicts that are plain numbers, not weights.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

_BLOCK_RENAMES = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.in_proj_weight": "attn.qkv.weight",   # rows q | k | v, as ours
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.out",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RENAMES = {
    "visual.conv1.weight": "visual.patch_embed.weight",
    "visual.class_embedding": "visual.cls",
    "visual.positional_embedding": "visual.pos",
    "visual.ln_pre.weight": "visual.norm_pre.weight",
    "visual.ln_pre.bias": "visual.norm_pre.bias",
    "visual.ln_post.weight": "visual.norm.weight",
    "visual.ln_post.bias": "visual.norm.bias",
    "token_embedding.weight": "text.token_embed.weight",
    "positional_embedding": "text.pos",
    "ln_final.weight": "text.norm.weight",
    "ln_final.bias": "text.norm.bias",
    "text_projection.weight": "text_proj.weight",
    "text_projection.bias": "text_proj.bias",
}
_BLOCKS = (
    BlockRule(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$", "visual.transformer.blocks.{}", _BLOCK_RENAMES),
    BlockRule(r"^transformer\.resblocks\.(\d+)\.(.+)$", "text.transformer.blocks.{}", _BLOCK_RENAMES),
)
_NEEDS = "embed_dim, vision_cfg, text_cfg, or a model_cfg holding them"


class OpenCLIPConfigError(ValueError):
    """The OpenCLIP model config is missing or uses an option polymodal cannot reproduce."""


# ------------------------------------------------------------------ detection and files

def detect(path) -> bool:
    """True for an OpenCLIP ViT checkpoint file (its keys hold `visual.conv1.weight`, possibly under
    "module."), or a directory with `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`."""
    path = Path(path)
    weights = find_weights(path, DIR_WEIGHTS, SUFFIXES)
    if path.is_dir() or weights is None:
        return weights is not None
    try:
        keys = peek_keys(weights)
    except Exception:  # not a state dict we can read (a full pickle, a corrupt file): not ours to take
        return False
    return any(k.endswith("visual.conv1.weight") for k in keys)


def _parse_config(data) -> tuple[dict, dict] | None:
    """(model_cfg, preprocess_cfg) from an open_clip_config.json or plain model config; None if neither."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("model_cfg"), dict):
        return data["model_cfg"], data.get("preprocess_cfg") or {}
    if "vision_cfg" in data and "text_cfg" in data:
        return data, {}
    return None


def find_config(weights: Path, config=None) -> tuple[dict, dict, str]:
    """Locate and read the OpenCLIP model config for `weights`.

    Args:
        weights: the checkpoint file (or hub-style directory).
        config: a path to a config JSON, or an already-parsed dict; None = look beside the weights
            for open_clip_config.json, config.json and <stem>.json.
    Returns:
        (model_cfg, preprocess_cfg, source label).
    Raises:
        FileNotFoundError / OpenCLIPConfigError: no usable config (the message lists where it looked).
        CheckpointError: the config file is not valid JSON (the message names it).
    """
    if config is not None:
        parsed, source = given_config(config, _parse_config, "OpenCLIP model config", _NEEDS, OpenCLIPConfigError)
        return (*parsed, source)
    folder = weights if weights.is_dir() else weights.parent
    candidates = [folder / "open_clip_config.json", folder / "config.json"]
    if not weights.is_dir():
        candidates.append(folder / f"{weights.stem}.json")
    found = search_config(candidates, _parse_config)
    if found is not None:
        return (*found[0], str(found[1]))
    raise FileNotFoundError(
        f"{weights}: no OpenCLIP model config found; looked for {', '.join(str(c) for c in candidates)} "
        f"(an open_clip_config.json or a model config with embed_dim/vision_cfg/text_cfg). "
        f"Pass config=<path to the model config JSON>, e.g. OpenCLIP's model_configs/ViT-B-32.json")


# ------------------------------------------------------------------ config translation

def _eps(cfg: dict) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def _refuse(where: str, option: str, value) -> None:
    raise OpenCLIPConfigError(f"{where}: {option}={value!r} is not supported by polymodal's CLIP "
                              f"(no equivalent layer); this checkpoint cannot be converted exactly")


def config_from_openclip(model_cfg: dict, where: str = "OpenCLIP config") -> dict:
    """Translate an OpenCLIP model config into our CLIP config dict.

    Args:
        model_cfg: dict with embed_dim, vision_cfg, text_cfg and optionally quick_gelu.
        where: a label for error messages.
    Returns:
        A dict for `polymodal.models.factory.build_config`.
    Raises:
        OpenCLIPConfigError: an option without an exact equivalent here.
    """
    v, t = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    # option -> value that we support (anything else is refused); absent options take OpenCLIP defaults.
    must = {
        "vision_cfg": (v, {"timm_model_name": None, "ls_init_value": None, "attentional_pool": False,
                           "act_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False,
                           "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                           "scale_fc": False}),
        "text_cfg": (t, {"hf_model_name": None, "ls_init_value": None, "embed_cls": False,
                         "no_causal_mask": False, "proj_type": "linear", "act_kwargs": None,
                         "text_arch": "clip", "qk_norm": False, "scaled_cosine_attn": False,
                         "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                         "scale_fc": False}),
    }
    for section, (cfg, allowed) in must.items():
        for option, ok in allowed.items():
            if cfg.get(option, ok) not in (ok, None):
                _refuse(f"{where} {section}", option, cfg.get(option))
    if model_cfg.get("init_logit_bias") is not None:
        _refuse(where, "init_logit_bias", model_cfg["init_logit_bias"])
    layers = v.get("layers", 12)
    if not isinstance(layers, int):
        _refuse(f"{where} vision_cfg", "layers", layers)  # a tuple means ModifiedResNet
    image_size, patch_size = v.get("image_size", 224), v.get("patch_size", 16)
    for name, value in (("image_size", image_size), ("patch_size", patch_size)):
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                _refuse(f"{where} vision_cfg", name, value)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    pool_type = v.get("pool_type", "tok")
    if pool_type not in ("tok", "avg"):
        _refuse(f"{where} vision_cfg", "pool_type", pool_type)
    if pool_type == "avg" and v.get("final_ln_after_pool"):
        # ln_post after averaging differs from averaging normalised tokens (for "tok" it is the same).
        _refuse(f"{where} vision_cfg", "final_ln_after_pool", True)
    width = v.get("width", 768)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vision = {
        "image_size": int(image_size),
        "patch_size": int(patch_size),
        "width": width,
        "layers": layers,
        "heads": width // v.get("head_width", 64),
        "mlp_ratio": float(v.get("mlp_ratio", 4.0)),
        "act": act,
        "patch_bias": False,
        "ln_pre": not v.get("no_ln_pre", False),
        "norm_eps": _eps(v),
        "pool": "cls" if pool_type == "tok" else "mean",
        "patch_dropout": float(v.get("patch_dropout", 0.0)),
    }
    text_pool = t.get("pool_type", "argmax")
    if text_pool not in ("argmax", "eos", "first"):
        _refuse(f"{where} text_cfg", "pool_type", text_pool)
    if text_pool == "eos" and t.get("eos_id") is None:
        raise OpenCLIPConfigError(f"{where} text_cfg: pool_type='eos' needs eos_id")
    vocab = t.get("vocab_size", 49408)
    text = {
        "vocab_size": vocab,
        "context_length": t.get("context_length", 77),
        "width": t.get("width", 512),
        "layers": t.get("layers", 12),
        "heads": t.get("heads", 8),
        "mlp_ratio": float(t.get("mlp_ratio", 4.0)),
        "act": act,
        "causal": True,
        "norm_eps": _eps(t),
        "pool": {"argmax": "argmax", "eos": "eot", "first": "cls"}[text_pool],
        # With argmax pooling the CLIP tokenizer's EOT is the last vocabulary entry.
        "eot_token_id": t["eos_id"] if text_pool == "eos" else vocab - 1,
        "pad_token_id": t.get("pad_id", 0),
    }
    return {"model_type": "clip", "embed_dim": model_cfg.get("embed_dim", 512), "vision": vision, "text": text,
            "proj_bias": bool(t.get("proj_bias", False))}


# ------------------------------------------------------------------ weights

def convert_state_dict(state: dict, proj_bias: bool = False) -> dict:
    """Rename an OpenCLIP CLIP state dict to ours.

    Args:
        state: the OpenCLIP weights ("module." / "_orig_mod." prefixes already stripped or not).
        proj_bias: our model has projection biases (OpenCLIP `text_cfg.proj_bias`); the image
            projection, which has none in OpenCLIP, gets a zero bias.
    Returns:
        Our state dict; keys matching no rule keep their OpenCLIP names (strict loading reports them).
    """
    state = strip_prefixes(state)
    if any(k.startswith("text.") for k in state):  # CustomTextCLIP keeps the text tower under "text."
        state = {k[5:] if k.startswith("text.") else k: v for k, v in state.items()}
    ours = rename_state_dict(state, _RENAMES, _BLOCKS, IGNORED_KEYS)
    # Parameters used as `x @ p` (W, E): our Linear weight is p.T (E, W).
    if "visual.proj" in ours:
        proj = ours.pop("visual.proj")
        ours["visual_proj.weight"] = proj.t().contiguous()
        if proj_bias:
            ours["visual_proj.bias"] = proj.new_zeros(proj.shape[1])
    if "text_projection" in ours:
        ours["text_proj.weight"] = ours.pop("text_projection").t().contiguous()
    if "logit_scale" in ours:
        ours["logit_scale"] = ours["logit_scale"].reshape(())
    return ours


# ------------------------------------------------------------------ the other way: ours -> OpenCLIP

def openclip_config_from(cfg) -> dict:
    """The OpenCLIP model config (`model_cfg`) of our CLIP config: the inverse of `config_from_openclip`.

    Args:
        cfg: a `CLIPConfig` (our dual encoder).
    Returns:
        {embed_dim, quick_gelu, vision_cfg, text_cfg} for OpenCLIP's `CLIP`.
    Raises:
        OpenCLIPConfigError: an option OpenCLIP's CLIP has no exact equivalent for (named in the message).
    """
    v, t = cfg.vision, cfg.text
    where = "export to OpenCLIP"
    checks = [("text.num_readout_tokens", t.num_readout_tokens, 0), ("text.causal", t.causal, True),
              ("text.norm_first", t.norm_first, True), ("text.embed_norm", t.embed_norm, False),
              ("text.final_norm", t.final_norm, True), ("text.pooler", t.pooler, "none"),
              ("vision.patch_bias", v.patch_bias, False), ("text.act", t.act, v.act)]
    for name, value, ok in checks:
        if value != ok:
            raise OpenCLIPConfigError(f"{where}: {name}={value!r} has no OpenCLIP equivalent (needs {ok!r})")
    if v.act not in ("gelu", "quick_gelu"):
        raise OpenCLIPConfigError(f"{where}: act={v.act!r} has no OpenCLIP equivalent (gelu or quick_gelu)")
    if v.width % v.heads:
        raise OpenCLIPConfigError(f"{where}: vision.width {v.width} is not a multiple of vision.heads {v.heads}")
    if v.pool not in ("cls", "mean"):
        raise OpenCLIPConfigError(f"{where}: vision.pool={v.pool!r} has no OpenCLIP equivalent (cls or mean)")
    vision = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
              "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio,
              "pool_type": "tok" if v.pool == "cls" else "avg"}
    if not v.ln_pre:
        vision["no_ln_pre"] = True
    if v.patch_dropout:
        vision["patch_dropout"] = v.patch_dropout
    pool = {"eot": "eos", "argmax": "argmax", "cls": "first"}[t.pool]
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio, "pool_type": pool, "pad_id": t.pad_token_id}
    if pool == "eos":
        text["eos_id"] = t.eot_token_id
    if cfg.proj_bias:
        text["proj_bias"] = True
    for section, eps in ((vision, v.norm_eps), (text, t.norm_eps)):
        if eps != 1e-5:
            section["norm_kwargs"] = {"eps": eps}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": v.act == "quick_gelu", "vision_cfg": vision, "text_cfg": text}


def to_openclip_state_dict(model) -> dict:
    """Our CLIP's weights under OpenCLIP's names and layout: the inverse of `convert_state_dict`.

    Args:
        model: a polymodal `CLIP` that `openclip_config_from` accepts.
    Returns:
        {OpenCLIP key: tensor} (fresh contiguous tensors, ready for safetensors).
    Raises:
        OpenCLIPConfigError: the image projection has a non-zero bias (OpenCLIP's `visual.proj` has none).
    """
    inverse = {ours: theirs for theirs, ours in _RENAMES.items()}
    block_inverse = {ours: theirs for theirs, ours in _BLOCK_RENAMES.items()}
    towers = {"visual.transformer.blocks.": "visual.transformer.resblocks.", "text.transformer.blocks.":
              "transformer.resblocks."}
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach()
        if key == "visual_proj.weight":
            out["visual.proj"] = value.t()
        elif key == "visual_proj.bias":
            if value.abs().max() > 0:
                raise OpenCLIPConfigError("export to OpenCLIP: visual_proj has a non-zero bias; OpenCLIP's "
                                          "visual.proj has none")
        elif key == "text_proj.weight":
            out["text_projection.weight" if model.config.proj_bias else "text_projection"] = (
                value if model.config.proj_bias else value.t())
        elif key == "text_proj.bias":
            out["text_projection.bias"] = value
        elif key == "logit_scale":
            out[key] = value.reshape(())
        elif key in inverse:
            out[inverse[key]] = value
        else:
            prefix = next((p for p in towers if key.startswith(p)), None)
            if prefix is None:
                raise OpenCLIPConfigError(f"export to OpenCLIP: {key} has no OpenCLIP equivalent")
            index, _, inner = key[len(prefix):].partition(".")
            base, _, kind = inner.rpartition(".")
            name = block_inverse.get(inner) or (f"{block_inverse[base]}.{kind}" if base in block_inverse else None)
            if name is None:
                raise OpenCLIPConfigError(f"export to OpenCLIP: {key} has no OpenCLIP equivalent")
            out[f"{towers[prefix]}{index}.{name}"] = value
    return {k: v.clone().contiguous() for k, v in out.items()}


def _image_transform(preprocess: dict, image_size: int):
    from ..data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
    mode = preprocess.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        warnings.warn(f"OpenCLIP resize_mode={mode!r} has no equivalent; using 'shortest' + centre crop",
                      stacklevel=3)
        mode = "shortest"
    size = preprocess.get("size", image_size)
    return ImageTransform(size, mean=preprocess.get("mean", OPENAI_CLIP_MEAN), std=preprocess.get("std", OPENAI_CLIP_STD),
                          resize=mode, interpolation=preprocess.get("interpolation", "bicubic"))


def _bundled_tokenizer(text: dict):
    """polymodal's bundled CLIP BPE tokenizer when the text tower has OpenAI's vocabulary, else None."""
    from ..data.text import bundled_tokenizer
    return bundled_tokenizer(text["vocab_size"], text["eot_token_id"], pool=text.get("pool", "eot"))


def load(path, config=None, **kwargs):
    """Load an OpenCLIP checkpoint as a polymodal CLIP.

    Args:
        path: the weights file (.safetensors/.bin/.pt/.pth) or an OpenCLIP hub-style directory.
        config: the model config JSON path (or dict); default: found beside the weights.
        **kwargs: none others are used; an unexpected one is an error.
    Returns:
        The CLIP model (eval mode), `.tokenizer` from tokenizer files beside the weights (else the
        bundled CLIP BPE tokenizer for OpenAI's 49408-id vocabulary, else None),
        `.image_transform` from the config's preprocess_cfg (else OpenAI CLIP preprocessing).
    Raises:
        FileNotFoundError: no model config found (the message lists where it looked).
        OpenCLIPConfigError: the config uses an option polymodal cannot reproduce.
        CheckpointError: a weight was not consumed or one of ours was not filled.
    """
    if kwargs:
        raise TypeError(f"OpenCLIP loading takes only config=, got {sorted(kwargs)}")
    path = Path(path)
    weights = require_weights(path, DIR_WEIGHTS, SUFFIXES, "OpenCLIP")
    model_cfg, preprocess, source = find_config(path, config)
    ours_cfg = config_from_openclip(model_cfg, source)
    state = convert_state_dict(read_weights(weights), proj_bias=ours_cfg["proj_bias"])
    tokenizer = tokenizer_beside(path if path.is_dir() else path.parent) or _bundled_tokenizer(ours_cfg["text"])
    return finish_clip(ours_cfg, source, state, f"{weights} (OpenCLIP, converted with {source})", tokenizer,
                       _image_transform(preprocess, ours_cfg["vision"]["image_size"]))


__all__ = ["detect", "load", "find_config", "config_from_openclip", "convert_state_dict", "openclip_config_from",
           "to_openclip_state_dict", "OpenCLIPConfigError"]
