"""Import checkpoints in the released M2-Encoder layout (alipay/Ant-Multi-Modal-Framework, prj/M2_Encoder).

The released model is a torchscale BEiT-3 (`backbone.*`, stage 1) plus a second torchscale encoder
(`backbone_vl.*`, stage 2) and linear ITC heads. Its key layout (per layer `i`, branch `X` in {A, B};
A = vision, B = language):

    backbone.vision_embed.proj.{weight,bias}            conv patch embedding (with bias)
    backbone.vision_embed.cls_token  (1, 1, D)          backbone.vision_embed.mask_token (MIM only)
    backbone.text_embed.weight       (V, D)
    backbone.encoder.embed_positions.A.weight  (2 + 1 + P, D)   vision positions, fairseq offset 2
    backbone.encoder.embed_positions.B.weight  (max_source_positions, D)  text positions, offset 2
    backbone.encoder.layers.i.self_attn_layer_norm.X    backbone.encoder.layers.i.final_layer_norm.X
    backbone.encoder.layers.i.self_attn.{q,k,v,out}_proj.X     .self_attn.inner_attn_ln.X (sub-LN)
    backbone.encoder.layers.i.ffn.X.{fc1,fc2,ffn_layernorm}
    backbone.encoder.layer_norm.X
    backbone_vl.layers.i.* / backbone_vl.layer_norm.X   (same names; no embeddings)
    itc_vl_image_proj.fc.weight, itc_vl_text_proj.fc.weight   (E, D), no bias: stage-2 heads
    itc_image_proj.fc.weight, itc_text_proj.fc.weight         stage-1 heads (not used for retrieval)
    logit_scale, logit_vl_scale, pooler.dense.*, norm.*

Positions start at row 2 (fairseq), so rows 0-1 of both tables are never read. Stage 2 routes every
token to branch A, so the `backbone_vl.*.B.*` copies are never used.

Mapping into `polymodal.models.multiway.M2Encoder`: stage-1 branches A/B -> `stage1.blocks.i.branches.
{vision,text}`, stage-2 branch A -> `stage2.blocks.i.branches.shared`; q/k/v are fused into `qkv`;
`itc_vl_*_proj` -> `visual_proj`/`text_proj`; `logit_scale` -> `logit_scale` (the released inference
code pairs it with the stage-2 features). Keys the retrieval path never reads are dropped by
explicit rules (`DROPPED`); any other key, or any missing one, is an error that lists them.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from ..models.factory import attach_processors
from ..models.layers import grid_size, interpolate_positions
from ..models.multiway import M2Config, M2Encoder, M2TextConfig, M2VisionConfig
from .common import (CheckpointError, count_layers, list_keys, load_state_strict, peek_keys, read_json, read_weights,
                     search_config, weights_in_folder)

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
POSITION_OFFSET = 2  # fairseq: position ids start at 2
MARKER = "backbone.encoder.layers.0.self_attn.q_proj.A.weight"

# Released keys that the retrieval path never reads (see the module docstring), as regexes.
DROPPED = (
    r"backbone_vl\..*\.B\.",                 # stage-2 language copies: stage 2 runs everything through A
    r"backbone\.vision_embed\.mask_token",   # masked image modelling only
    r"itc_(image|text)_proj\.",              # stage-1 ITC heads
    r"logit_vl_scale",
    r"pooler\.", r"norm\.",                  # unused VLMo heads
    r"visual_tokenizer\.",                   # BEiT-2 tokenizer for MIM pretraining
)

# BEiT-3 size names -> heads (the width alone does not give the head count).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 4096: 32}

# The released preprocessing: bicubic resize to a square, then (x - 0.5) / 0.5.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _weights_path(path: Path) -> Path:
    """The weights file for `path` (a file, or a directory holding exactly one weights file)."""
    if path.is_file():
        return path
    files = weights_in_folder(path, WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise FileNotFoundError(f"{path}: expected one weights file ({'/'.join(WEIGHT_SUFFIXES)}), found {found}; "
                                f"pass the file itself")
    return files[0]


def read_checkpoint(path, trust_pickle: bool = False) -> dict:
    """Read a released M2-Encoder state dict (.safetensors, or a torch pickle: .ckpt/.pt/.pth/.bin).

    Args:
        path: the weights file, or a directory holding one.
        trust_pickle: load pickles with `weights_only=False` (runs code from the file: only for files
            you trust). Needed when a Lightning checkpoint stores objects besides tensors.
    Returns:
        {released key: tensor}, out of Lightning (`state_dict`), DeepSpeed (`module`, `_forward_module.`)
        or plain dicts.
    Raises:
        CheckpointError: a pickle that `weights_only=True` refuses (the message names the file).
    """
    return read_weights(_weights_path(Path(path)), trust_pickle=trust_pickle,
                        fix="if you trust this file, load it with trust_pickle=True")


def _peek_has_marker(path: Path) -> bool:
    """Whether a weights file holds the multiway layout, without unpickling a zip pickle (a Lightning
    checkpoint with hyper-parameter objects is found even though `weights_only=True` refuses it)."""
    if path.suffix != ".safetensors" and zipfile.is_zipfile(path):
        # torch's zip format: the pickle holds the dict keys as plain strings.
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            return bool(names) and MARKER.encode() in z.read(names[0])
    return any(k.endswith(MARKER) for k in peek_keys(path))


def detect(path) -> bool:
    """True when `path` (a weights file, or a directory holding one) has the released multiway layout."""
    path = Path(path)
    try:
        if path.is_dir():
            files = weights_in_folder(path, WEIGHT_SUFFIXES)
            return len(files) == 1 and _peek_has_marker(files[0])
        return path.is_file() and path.suffix in WEIGHT_SUFFIXES and _peek_has_marker(path)
    except Exception:  # noqa: BLE001 - detection never fails: an unreadable file is simply not ours
        return False


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def _is_m2_config(data) -> dict | None:
    """`data` when it is our M2 config (`model_type: m2`) or the released one (vlmo keys), else None."""
    if isinstance(data, dict) and (data.get("model_type") == "m2" or "beit3_vl_layers" in data
                                   or "encoder_layers" in data):
        return data
    return None


def _find_config(weights: Path) -> dict | None:
    """A config json beside the weights: `config.json` (which must be valid JSON), else the first
    other `*.json` that is an M2 config (files that are not JSON are passed over)."""
    globbed = [c for c in sorted(weights.parent.glob("*.json")) if c.name != "config.json"]
    found = search_config([weights.parent / "config.json", *globbed], _is_m2_config, lenient=globbed)
    return found[0] if found is not None else None


def _sizes_from_config(data: dict) -> dict:
    """Our M2Config fields from our config dict or a released (vlmo) config dict."""
    if data.get("model_type") == "m2":
        out = {k: data[k] for k in ("width", "layers", "vl_layers", "heads", "mlp_ratio", "embed_dim") if k in data}
        if "vision" in data:
            out.update({f"vision.{k}": v for k, v in data["vision"].items()})
        if "text" in data:
            out.update({f"text.{k}": v for k, v in data["text"].items()})
        return out
    names = {"encoder_embed_dim": "width", "encoder_layers": "layers", "beit3_vl_layers": "vl_layers",
             "encoder_attention_heads": "heads", "out_embed_dim": "embed_dim", "image_size": "vision.image_size",
             "patch_size": "vision.patch_size", "vocab_size": "text.vocab_size", "max_text_len": "text.context_length"}
    out = {ours: data[theirs] for theirs, ours in names.items() if theirs in data}
    if "heads" not in out and "beit_version" in data:
        out["heads"] = {"base": 12, "large": 16, "huge": 32}.get(data["beit_version"], out.get("heads"))
    return out


def infer_sizes(state: dict) -> dict:
    """The sizes that the tensor shapes of a released state dict determine."""
    def layer_count(prefix: str) -> int:
        return count_layers(state, re.escape(prefix) + r"(\d+)\.", "M2-Encoder checkpoint")

    try:
        vocab, width = state["backbone.text_embed.weight"].shape
        patch = state["backbone.vision_embed.proj.weight"].shape[-1]
        vision_rows = state["backbone.encoder.embed_positions.A.weight"].shape[0]
        hidden = state["backbone.encoder.layers.0.ffn.A.fc1.weight"].shape[0]
        embed_dim = state["itc_vl_image_proj.fc.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"cannot infer the M2-Encoder sizes: key {e.args[0]!r} is missing") from None
    side = grid_size(vision_rows - POSITION_OFFSET - 1)
    return {
        "width": int(width), "layers": layer_count("backbone.encoder.layers."),
        "vl_layers": layer_count("backbone_vl.layers."), "mlp_ratio": hidden / width, "embed_dim": int(embed_dim),
        "sub_ln": "backbone.encoder.layers.0.self_attn.inner_attn_ln.A.weight" in state,
        "vision.patch_size": int(patch), "vision.image_size": int(side * patch), "text.vocab_size": int(vocab),
    }


def build_m2_config(state: dict, config: dict | None = None, **overrides) -> tuple[M2Config, int]:
    """Our config for a released state dict.

    Shapes decide what they can (width, depths, vocabulary, patch size, trained image size, ...);
    `config` (ours or the released json) must agree with them and adds what they cannot (heads,
    context length). `overrides` (`heads`, `image_size`, `context_length` or any dotted M2Config
    field) win over both; a different `image_size` resizes the vision position table.

    Returns:
        (config, trained image size)
    """
    shapes = infer_sizes(state)
    given = _sizes_from_config(config) if config else {}
    for key, value in given.items():
        if key in shapes and shapes[key] != value and key != "vision.image_size":
            raise CheckpointError(f"the config says {key}={value} but the checkpoint's tensors give {shapes[key]}")
    sizes = {**given, **shapes}
    trained_size = shapes["vision.image_size"]
    sizes["vision.image_size"] = given.get("vision.image_size", trained_size)
    aliases = {"image_size": "vision.image_size", "context_length": "text.context_length",
               "pad_token_id": "text.pad_token_id", "eot_token_id": "text.eot_token_id", "pool": "text.pool"}
    for key, value in overrides.items():
        sizes[aliases.get(key, key)] = value
    sizes.setdefault("heads", HEADS_BY_WIDTH.get(sizes["width"], max(1, sizes["width"] // 64)))
    text_rows = state.get("backbone.encoder.embed_positions.B.weight")
    if "text.context_length" not in sizes and text_rows is not None:
        # The released default (52), unless the table is too short for it.
        sizes["text.context_length"] = min(M2TextConfig.context_length, text_rows.shape[0] - POSITION_OFFSET)
    vision = {k.split(".", 1)[1]: v for k, v in sizes.items() if k.startswith("vision.")}
    text = {k.split(".", 1)[1]: v for k, v in sizes.items() if k.startswith("text.")}
    top = {k: v for k, v in sizes.items() if "." not in k}
    try:
        cfg = M2Config(vision=M2VisionConfig(**vision), text=M2TextConfig(**text), **top)
    except TypeError as e:
        raise CheckpointError(f"bad M2-Encoder config value: {e}") from None
    return cfg, trained_size


# ---------------------------------------------------------------------------------------------
# key mapping
# ---------------------------------------------------------------------------------------------
def _branch_sources(ours: str, theirs: str, X: str, sub_ln: bool) -> dict:
    """Our branch keys -> released source keys (a list: q/k/v are concatenated into qkv)."""
    m = {}
    parts = [("norm1", f"self_attn_layer_norm.{X}"), ("out", f"self_attn.out_proj.{X}"),
             ("norm2", f"final_layer_norm.{X}"), ("fc1", f"ffn.{X}.fc1"), ("fc2", f"ffn.{X}.fc2")]
    if sub_ln:
        parts += [("attn_norm", f"self_attn.inner_attn_ln.{X}"), ("ffn_norm", f"ffn.{X}.ffn_layernorm")]
    for p in ("weight", "bias"):
        for a, b in parts:
            m[f"{ours}.{a}.{p}"] = [f"{theirs}.{b}.{p}"]
        m[f"{ours}.qkv.{p}"] = [f"{theirs}.self_attn.{n}_proj.{X}.{p}" for n in "qkv"]
    return m


def key_sources(cfg: M2Config) -> dict[str, list[str]]:
    """For each of our state-dict keys, the released key(s) it is built from."""
    m = {
        "patch_embed.weight": ["backbone.vision_embed.proj.weight"],
        "patch_embed.bias": ["backbone.vision_embed.proj.bias"],
        "cls": ["backbone.vision_embed.cls_token"],
        "vision_pos": ["backbone.encoder.embed_positions.A.weight"],
        "token_embed.weight": ["backbone.text_embed.weight"],
        "text_pos": ["backbone.encoder.embed_positions.B.weight"],
        "visual_proj.weight": ["itc_vl_image_proj.fc.weight"],
        "text_proj.weight": ["itc_vl_text_proj.fc.weight"],
        "logit_scale": ["logit_scale"],
    }
    for i in range(cfg.layers):
        for ours, X in (("vision", "A"), ("text", "B")):
            m.update(_branch_sources(f"stage1.blocks.{i}.branches.{ours}", f"backbone.encoder.layers.{i}", X, cfg.sub_ln))
    for ours, X in (("vision", "A"), ("text", "B")):
        for p in ("weight", "bias"):
            m[f"stage1.norm.{ours}.{p}"] = [f"backbone.encoder.layer_norm.{X}.{p}"]
    for i in range(cfg.vl_layers):
        m.update(_branch_sources(f"stage2.blocks.{i}.branches.shared", f"backbone_vl.layers.{i}", "A", cfg.sub_ln))
    if cfg.vl_layers:
        for p in ("weight", "bias"):
            m[f"stage2.norm.shared.{p}"] = [f"backbone_vl.layer_norm.A.{p}"]
    return m


def convert_state_dict(state: dict, cfg: M2Config, trained_image_size: int | None = None,
                       ignore: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """Map a released state dict onto `M2Encoder(cfg)` names.

    Args:
        state: {released key: tensor}.
        cfg: the target config (see `build_m2_config`).
        trained_image_size: the image size the vision position table was trained for; when it differs
            from `cfg.vision.image_size` the table is resized (bicubic, CLS row kept).
        ignore: extra regexes of released keys to drop (e.g. heads of other pretraining tasks).
    Returns:
        (our state dict, the released keys dropped by the `DROPPED` / `ignore` rules)
    Raises:
        CheckpointError: listing missing released keys and unexpected ones (neither used nor dropped).
    """
    sources = key_sources(cfg)
    used = {k for srcs in sources.values() for k in srcs}
    drop = re.compile("|".join(f"(?:{r})" for r in DROPPED + tuple(ignore)))
    missing = sorted(k for k in used if k not in state)
    unexpected = sorted(k for k in state if k not in used and not drop.match(k))
    if missing or unexpected:
        lines = ["the checkpoint does not match the M2-Encoder layout for this config "
                 f"(width {cfg.width}, {cfg.layers}+{cfg.vl_layers} layers):"]
        if missing:
            lines.append(list_keys("missing keys", missing))
        if unexpected:
            lines.append(list_keys("unexpected keys", unexpected) + "; pass ignore=(regex, ...) to drop them")
        raise CheckpointError("\n".join(lines))
    dropped = sorted(k for k in state if k not in used)

    out = {ours: (torch.cat([state[s] for s in srcs]) if len(srcs) > 1 else state[srcs[0]])
           for ours, srcs in sources.items()}
    out["cls"] = out["cls"].reshape(-1)                                             # (1, 1, D) -> (D,)
    # Fairseq offset: rows 0-1 of both position tables are never read.
    vision_pos = out["vision_pos"][POSITION_OFFSET:]                                # (1 + P, D)
    old = grid_size(vision_pos.shape[0] - 1)
    new = cfg.vision.image_size // cfg.vision.patch_size
    if trained_image_size is not None and old != trained_image_size // cfg.vision.patch_size:
        raise CheckpointError(f"vision position table has a {old}x{old} grid, not the trained image size "
                              f"{trained_image_size} / patch {cfg.vision.patch_size}")
    out["vision_pos"] = interpolate_positions(vision_pos, (old, old), (new, new))
    text_pos = out["text_pos"][POSITION_OFFSET:]
    L = cfg.text.context_length
    if text_pos.shape[0] < L:
        raise CheckpointError(f"the text position table has {text_pos.shape[0] + POSITION_OFFSET} rows "
                              f"({text_pos.shape[0]} usable after the offset {POSITION_OFFSET}), fewer than "
                              f"text.context_length={L}; pass context_length={text_pos.shape[0]} or less")
    out["text_pos"] = text_pos[:L]                                                  # rows past L never trained
    return {k: v.contiguous() for k, v in out.items()}, dropped


def load(path, config=None, tokenizer=None, image_transform=None, ignore: tuple[str, ...] = (),
         trust_pickle: bool = False, **overrides) -> M2Encoder:
    """Load a released M2-Encoder checkpoint as an `M2Encoder`.

    Args:
        path: the weights file (.ckpt/.pt/.pth/.bin/.safetensors) or a directory holding one.
        config: a config dict or json path, ours or the released one (`configs/Encoder_0.4B.json`);
            default: a json beside the weights when there is one, else sizes from tensor shapes
            (heads then follow BEiT-3's sizes: 768 -> 12, 1024 -> 16, 4096 -> 32, else width / 64).
        tokenizer: a polymodal tokenizer to attach (the released GLM sentencepiece vocabulary:
            [CLS]=50002, <|endoftext|>=50000 as end and pad token).
        image_transform: preprocessing; default: bicubic squash to the image size, mean = std = 0.5.
        ignore: extra regexes of released keys to drop.
        trust_pickle: allow `weights_only=False` for pickles you trust.
        **overrides: `heads`, `image_size` (resizes the position table), `context_length`, or any
            dotted M2Config field.
    Returns:
        The model in eval mode, with `.tokenizer` and `.image_transform` attached.
    Raises:
        CheckpointError: missing / unexpected keys, shapes that disagree with the config.
    """
    path = Path(path)
    weights = _weights_path(path)
    state = read_checkpoint(weights, trust_pickle=trust_pickle)
    if isinstance(config, (str, Path)):
        config_file, config = config, read_json(config)
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: holds a JSON {type(config).__name__}, not a config object; pass "
                                  f"our M2 config or the released one (configs/Encoder_0.4B.json)")
    if config is None:
        config = _find_config(weights)
    cfg, trained = build_m2_config(state, config, **overrides)
    ours, _ = convert_state_dict(state, cfg, trained, ignore)
    model = M2Encoder(cfg)
    load_state_strict(model, ours, str(weights))
    if image_transform is None:
        from ..data.images import ImageTransform
        image_transform = ImageTransform(cfg.vision.image_size, mean=IMAGE_MEAN, std=IMAGE_STD, resize="squash",
                                         interpolation="bicubic")
    attach_processors(model, tokenizer, image_transform)
    return model.eval()


__all__ = ["detect", "load", "read_checkpoint", "build_m2_config", "infer_sizes", "key_sources",
           "convert_state_dict", "DROPPED"]
