"""LoTLIP checkpoints (OpenCLIP `CustomTextCLIP`: HF BERT text tower + timm ViT) -> polymodal `CLIP`.

Facts this converter relies on, from the authors' code (github.com/wuw2019/LoTLIP, `open_clip/`):

* `model_configs/lotlip_bert-ViT-B-{16,32}.json`: embed_dim 768; vision `timm_model_name`
  vit_base_patch{16,32}_224.augreg_in21k with `timm_pool="token"`, `timm_proj="none"`; text
  `hf_model_name` bert-base-uncased, `hf_proj_type="linear"`, `hf_pooler_type="cls_pooler"`,
  `context_length` 128, `num_corner_token` 2.
* Keys (`CustomTextCLIP`): `visual.trunk.*` (timm ViT: `cls_token`, `pos_embed`,
  `patch_embed.proj`, pre-LN `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`,
  final `norm`; LayerNorm eps 1e-6, exact GELU); `visual.head.*` is empty with `timm_proj="none"`
  (the image feature is the normed CLS state itself; a `visual.head.proj` Linear with
  `timm_proj="linear"`); `text.transformer.*` (HF `BertModel` with its pooler); `text.proj.weight`
  (Linear, no bias); `logit_scale`. Checkpoints saved by their training script nest the weights
  under "state_dict" with "module." prefixes.
* `hf_model.py` (`HFTextEncoder`): the K corner tokens are new vocabulary rows
  (`resize_token_embeddings` to vocab + K) and the tokenizer writes `[CLS][Corner0]..[CornerK-1] text
  [SEP]`, so corners take positions 1..K with token type 0. The mask: CLS and each corner see
  themselves and the non-pad text, not each other; text sees CLS and text, not the corners. All K+1
  states go through BERT's pooler (dense + tanh) and `proj`; inference uses the CLS feature.
* Their HF tokenizer wrapper replaces ". " by "[SEP]" between sentences for BERT (see
  `sentence_separators`), and OpenCLIP's default preprocessing (OpenAI mean/std, 224, bicubic,
  shortest-side resize) applies to a checkpoint loaded from a path.

Mapping into our modules: a bidirectional post-LN text tower (`causal=False, norm_first=False,
embed_norm=True, final_norm=False`, eps 1e-12, exact GELU, `pool="cls"`, `pooler="dense_tanh"`,
`num_readout_tokens=K`); BERT's q/k/v are fused into `qkv` (rows q | k | v);
`token_type_embeddings[0]` is folded into the position table, which keeps its first
`context_length` rows (default 128, as the released configs); the corner rows of the word
embeddings become `text.readout`. The image tower is a timm ViT (`patch_bias=True, ln_pre=False`,
eps 1e-6). Without a `visual.head` our image projection is set to the identity (embed_dim must then
equal the ViT width, as in the released models). Loading is strict otherwise.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import (BlockRule, count_layers, find_weights, finish_clip, given_config, mlp_ratio, peek_keys,
                     read_weights, rename_state_dict, require_weights, search_config, strip_prefixes,
                     tokenizer_beside)

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
DIR_WEIGHTS = ("model.pt", "model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
               "pytorch_model.bin", "model.bin", "epoch_latest.pt")
BERT_BASE_VOCAB = 30522            # bert-base-uncased, the text tower of every released LoTLIP model
# Buffers some transformers versions saved; they carry no information (arange / zeros).
IGNORED_KEYS = ("text.transformer.embeddings.position_ids", "text.transformer.embeddings.token_type_ids")
_TEXT_MARK = "text.transformer.embeddings.word_embeddings.weight"
_VISION_MARK = "visual.trunk.patch_embed.proj.weight"

_BERT_LAYER = r"^text\.transformer\.encoder\.layer\.(\d+)\.(.+)$"
_BERT_LAYER_RENAMES = {
    "attention.output.dense": "attn.out",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "norm2",
}
_VIT_BLOCK = r"^visual\.trunk\.blocks\.(\d+)\.(.+)$"
_VIT_BLOCK_RENAMES = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.out", "norm2": "norm2",
                      "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCKS = (
    BlockRule(_BERT_LAYER, "text.transformer.blocks.{}", _BERT_LAYER_RENAMES,
              qkv=("attention.self.query", "attention.self.key", "attention.self.value")),
    BlockRule(_VIT_BLOCK, "visual.transformer.blocks.{}", _VIT_BLOCK_RENAMES),
)
_POS_KEY = "text.transformer.embeddings.position_embeddings.weight"
_TOKEN_TYPE_KEY = "text.transformer.embeddings.token_type_embeddings.weight"
_RENAMES = {
    "text.transformer.embeddings.LayerNorm.weight": "text.embed_norm.weight",
    "text.transformer.embeddings.LayerNorm.bias": "text.embed_norm.bias",
    "text.transformer.pooler.dense.weight": "text.pooler.0.weight",
    "text.transformer.pooler.dense.bias": "text.pooler.0.bias",
    "text.proj.weight": "text_proj.weight",
    "visual.trunk.patch_embed.proj.weight": "visual.patch_embed.weight",
    "visual.trunk.patch_embed.proj.bias": "visual.patch_embed.bias",
    "visual.trunk.norm.weight": "visual.norm.weight",
    "visual.trunk.norm.bias": "visual.norm.bias",
    "visual.trunk.norm_pre.weight": "visual.norm_pre.weight",
    "visual.trunk.norm_pre.bias": "visual.norm_pre.bias",
    "visual.trunk.cls_token": "visual.cls",
    "visual.trunk.pos_embed": "visual.pos",
    "visual.head.proj.weight": "visual_proj.weight",
    "visual.head.proj.bias": "visual_proj.bias",
    "logit_scale": "logit_scale",
}


class LoTLIPConfigError(ValueError):
    """The checkpoint uses an option polymodal cannot reproduce, or a needed setting is missing."""


# ------------------------------------------------------------------ files and detection

def _is_lotlip_keys(keys) -> bool:
    names = set(strip_prefixes(dict.fromkeys(keys)))
    return _TEXT_MARK in names and _VISION_MARK in names


def detect(path) -> bool:
    """True for a LoTLIP checkpoint: a weights file (or a folder holding `model.pt`, ...) whose keys
    have a BERT text tower under `text.transformer.` and a timm ViT under `visual.trunk.`."""
    weights = find_weights(path, DIR_WEIGHTS, SUFFIXES)
    if weights is None:
        return False
    try:
        return _is_lotlip_keys(peek_keys(weights))
    except Exception:  # unreadable or not a state dict: not ours to take
        return False


def find_model_config(weights: Path, config=None) -> dict:
    """The OpenCLIP model config (dict with text_cfg/vision_cfg), or {} when none is found.

    Args:
        weights: the checkpoint file.
        config: a dict, a JSON path (an `open_clip_config.json` or a model config such as
            `lotlip_bert-ViT-B-16.json`), or None to look beside the weights.
    Returns:
        The model config dict ({} when none is found beside the weights).
    Raises:
        CheckpointError: a config file (given, or one of the fixed names beside the weights) is not
            valid JSON; files matched by `lotlip*.json` that are not JSON are passed over.
    """
    def parse(data):
        if isinstance(data, dict) and isinstance(data.get("model_cfg"), dict):
            return data["model_cfg"]
        return data if isinstance(data, dict) and "text_cfg" in data else None

    if config is not None:
        return given_config(config, parse, "OpenCLIP model config", "text_cfg", LoTLIPConfigError)[0]
    folder = weights.parent
    globbed = sorted(folder.glob("lotlip*.json"))
    found = search_config([folder / "open_clip_config.json", folder / "config.json", folder / f"{weights.stem}.json",
                           *globbed], parse, lenient=globbed)
    return found[0] if found is not None else {}


# ------------------------------------------------------------------ config

def config_from_state(state: dict, model_cfg: dict | None = None, num_corners: int | None = None,
                      context_length: int | None = None, text_heads: int | None = None,
                      vision_heads: int | None = None, where: str = "LoTLIP checkpoint") -> dict:
    """Our CLIP config dict for a LoTLIP state dict (prefixes stripped).

    Sizes come from the weight shapes. What the weights cannot tell is taken from the arguments,
    then from the OpenCLIP model config, then from the released models' values:
    K (`text_cfg.num_corner_token`; else rows - 30522, bert-base-uncased), context length
    (`text_cfg.context_length`, else 128), heads (width // 64, as BERT-base and ViT-B).

    Raises:
        LoTLIPConfigError: an option without an exact equivalent, or inconsistent sizes.
    """
    model_cfg = model_cfg or {}
    t_cfg, v_cfg = model_cfg.get("text_cfg") or {}, model_cfg.get("vision_cfg") or {}
    if t_cfg.get("hf_proj_type", "linear") != "linear":
        raise LoTLIPConfigError(f"{where}: text_cfg.hf_proj_type={t_cfg['hf_proj_type']!r}; only 'linear' (the "
                                f"released models) is supported")
    if t_cfg.get("hf_pooler_type", "cls_pooler") != "cls_pooler":
        raise LoTLIPConfigError(f"{where}: text_cfg.hf_pooler_type={t_cfg['hf_pooler_type']!r}; only 'cls_pooler' "
                                f"is supported")
    if v_cfg.get("timm_pool", "token") != "token":
        raise LoTLIPConfigError(f"{where}: vision_cfg.timm_pool={v_cfg['timm_pool']!r}; only 'token' is supported")
    if "text.proj.0.weight" in state:
        raise LoTLIPConfigError(f"{where}: the text projection is an MLP (hf_proj_type='mlp'); not supported")
    if any(k.startswith("visual.head.mlp.") for k in state):
        raise LoTLIPConfigError(f"{where}: the image head is an MLP (timm_proj='mlp'); not supported")
    if any(k.startswith("visual.trunk.fc_norm.") for k in state):
        raise LoTLIPConfigError(f"{where}: the ViT has fc_norm (average pooling); only CLS pooling is supported")

    rows, width = state[_TEXT_MARK].shape
    if num_corners is None:
        num_corners = t_cfg.get("num_corner_token")
    if num_corners is None:
        if not BERT_BASE_VOCAB <= rows <= BERT_BASE_VOCAB + 64:
            raise LoTLIPConfigError(f"{where}: cannot tell the number of corner tokens ({rows} vocabulary rows is not "
                                    f"bert-base-uncased's {BERT_BASE_VOCAB} + K); pass num_corners= or config=")
        num_corners = rows - BERT_BASE_VOCAB
    num_corners = int(num_corners)
    vocab = rows - num_corners
    if vocab <= 0:
        raise LoTLIPConfigError(f"{where}: num_corners={num_corners} but the word embeddings have only {rows} rows")
    max_pos = state[_POS_KEY].shape[0]
    ctx = int(context_length or t_cfg.get("context_length") or min(128, max_pos))
    if not num_corners + 2 <= ctx <= max_pos:
        raise LoTLIPConfigError(f"{where}: context_length {ctx} must be in [{num_corners + 2}, {max_pos}] "
                                f"(the BERT position table has {max_pos} rows)")
    t_layers = count_layers(state, _BERT_LAYER, where)
    inter = state["text.transformer.encoder.layer.0.intermediate.dense.weight"].shape[0] if t_layers else 4 * width
    has_pooler = "text.transformer.pooler.dense.weight" in state
    if num_corners > 0 and not has_pooler:
        raise LoTLIPConfigError(f"{where}: corner tokens without BERT's pooler (text.transformer.pooler.dense) "
                                f"are not a layout LoTLIP's code produces")
    t_heads = text_heads or width // 64
    text = {
        "vocab_size": vocab, "context_length": ctx, "width": width, "layers": t_layers, "heads": t_heads,
        "mlp_ratio": mlp_ratio(width, inter), "act": "gelu", "causal": False, "norm_first": False,
        "embed_norm": True, "final_norm": False, "norm_eps": 1e-12, "pool": "cls",
        "pooler": "dense_tanh" if has_pooler else "none",
        "eot_token_id": 102 if vocab == BERT_BASE_VOCAB else vocab - 1,   # [SEP]; unused by CLS pooling
        "pad_token_id": 0, "num_readout_tokens": num_corners,
    }

    v_width, _, patch, patch_w = state[_VISION_MARK].shape
    if patch != patch_w:
        raise LoTLIPConfigError(f"{where}: non-square patches {patch}x{patch_w}")
    n_pos = state["visual.trunk.pos_embed"].shape[1]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid != n_pos - 1:
        raise LoTLIPConfigError(f"{where}: visual.trunk.pos_embed has {n_pos} rows, not 1 + a square grid "
                                f"(a ViT without a class-token position is not supported)")
    v_layers = count_layers(state, _VIT_BLOCK, where)
    v_inter = state["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0] if v_layers else 4 * v_width
    vision = {
        "image_size": grid * patch, "patch_size": patch, "width": v_width, "layers": v_layers,
        "heads": vision_heads or v_width // 64, "mlp_ratio": mlp_ratio(v_width, v_inter), "act": "gelu",
        "patch_bias": "visual.trunk.patch_embed.proj.bias" in state, "ln_pre": "visual.trunk.norm_pre.weight" in state,
        "norm_eps": 1e-6, "pool": "cls",
    }
    embed_dim = state["text.proj.weight"].shape[0]
    if "visual.head.proj.weight" in state:
        if state["visual.head.proj.weight"].shape != (embed_dim, v_width):
            raise LoTLIPConfigError(f"{where}: visual.head.proj.weight {tuple(state['visual.head.proj.weight'].shape)} "
                                    f"does not map width {v_width} to embed_dim {embed_dim}")
    elif v_width != embed_dim:
        raise LoTLIPConfigError(f"{where}: no visual.head projection, so the ViT width {v_width} must equal "
                                f"embed_dim {embed_dim} (text.proj rows)")
    proj_bias = "visual.head.proj.bias" in state or "text.proj.bias" in state
    for heads, w, name in ((t_heads, width, "text"), (vision["heads"], v_width, "vision")):
        if heads <= 0 or w % heads:
            raise LoTLIPConfigError(f"{where}: {name} width {w} is not divisible by {heads} heads; pass "
                                    f"{name}_heads=")
    return {"model_type": "clip", "embed_dim": embed_dim, "vision": vision, "text": text, "proj_bias": proj_bias}


# ------------------------------------------------------------------ weights

def convert_state_dict(state: dict, cfg: dict) -> dict:
    """Rename and reshape a LoTLIP state dict (prefixes stripped) into ours for config `cfg`.

    Keys matching no rule keep their names (a q/k/v triple with a member missing stays unfused), so
    strict loading reports them.
    """
    t, v = cfg["text"], cfg["vision"]
    K, V, ctx = t["num_readout_tokens"], t["vocab_size"], t["context_length"]
    ours = rename_state_dict(state, _RENAMES, _BLOCKS, IGNORED_KEYS)
    if _TEXT_MARK in ours:
        words = ours.pop(_TEXT_MARK)
        ours["text.token_embed.weight"] = words[:V]
        if K:
            ours["text.readout"] = words[V:V + K]                         # the corner tokens' rows
    token_type = ours.pop(_TOKEN_TYPE_KEY, None)
    if _POS_KEY in ours:
        if token_type is None:
            raise LoTLIPConfigError(f"{_TOKEN_TYPE_KEY} is missing; BERT's position table cannot be used without it")
        # BERT adds token type 0 to every position: fold it into the position table.
        ours["text.pos"] = ours.pop(_POS_KEY)[:ctx] + token_type[0]
    if "visual.cls" in ours:
        ours["visual.cls"] = ours["visual.cls"].reshape(-1)                  # (1, 1, W) -> (W,)
    if "visual.pos" in ours:
        pos = ours["visual.pos"]
        ours["visual.pos"] = pos.reshape(pos.shape[-2], pos.shape[-1])      # (1, 1+P, W) -> (1+P, W)
    if "logit_scale" in ours:
        ours["logit_scale"] = ours["logit_scale"].reshape(())
    E, W = cfg["embed_dim"], v["width"]
    if "visual_proj.weight" not in ours:
        # timm_proj="none": the image feature is the CLS state; the identity keeps it exactly.
        ours["visual_proj.weight"] = torch.eye(E, W, dtype=ours["visual.norm.weight"].dtype)
    if cfg["proj_bias"]:
        ours.setdefault("visual_proj.bias", ours["visual_proj.weight"].new_zeros(E))
        ours.setdefault("text_proj.bias", ours["text_proj.weight"].new_zeros(E))
    return ours


def sentence_separators(text: str, sep_token: str = "[SEP]") -> str:
    """LoTLIP's text preparation for BERT towers: every ". " becomes `sep_token` (their HF tokenizer
    wrapper joins `text.split('. ')` with the separator). Apply it to long captions before our
    tokenizer to reproduce their evaluation inputs."""
    return sep_token.join(text.split(". "))


def load(path, config=None, num_corners: int | None = None, context_length: int | None = None,
         text_heads: int | None = None, vision_heads: int | None = None, **kwargs):
    """Load a LoTLIP checkpoint as a polymodal CLIP with corner tokens.

    Args:
        path: the weights file (`model.pt`, a training checkpoint, .bin or .safetensors) or a folder
            holding one (names in `DIR_WEIGHTS`).
        config: optional OpenCLIP model config (path or dict, e.g. the authors'
            `lotlip_bert-ViT-B-16.json`); default: looked for beside the weights.
        num_corners: K; default from the config, else word-embedding rows - 30522.
        context_length: text positions kept (corners included); default the config's (128).
        text_heads, vision_heads: attention heads; default width // 64 (12 for the released models).
    Returns:
        The CLIP in eval mode, `.tokenizer` from tokenizer files beside the weights (else None), and
        OpenCLIP's default image preprocessing at the ViT's resolution.
    Raises:
        LoTLIPConfigError: an unsupported option; CheckpointError: weights that do not fit.
    """
    if kwargs:
        raise TypeError(f"LoTLIP loading takes config=, num_corners=, context_length=, text_heads=, vision_heads=; "
                        f"got {sorted(kwargs)}")
    from ..data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform

    weights = require_weights(path, DIR_WEIGHTS, SUFFIXES, "LoTLIP")
    state = strip_prefixes(read_weights(weights))
    if not _is_lotlip_keys(state):
        raise LoTLIPConfigError(f"{weights}: not a LoTLIP checkpoint (needs {_TEXT_MARK} and {_VISION_MARK})")
    model_cfg = find_model_config(weights, config)
    cfg = config_from_state(state, model_cfg, num_corners, context_length, text_heads, vision_heads, str(weights))
    tokenizer = tokenizer_beside(weights.parent, files=("tokenizer.json", "vocab.txt"))  # BERT vocabularies
    transform = ImageTransform(cfg["vision"]["image_size"], mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                               resize="shortest", interpolation="bicubic")
    return finish_clip(cfg, str(weights), convert_state_dict(state, cfg), f"{weights} (LoTLIP, converted)",
                       tokenizer, transform)


__all__ = ["detect", "load", "config_from_state", "convert_state_dict", "find_model_config",
           "sentence_separators", "LoTLIPConfigError"]
