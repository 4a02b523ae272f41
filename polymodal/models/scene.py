"""Two-stream multi-label video scene recognition with label knowledge (docs/methods.md, scene).

A `SceneModel` sits on a `VideoCLIP` (any image-text model we have, wrapped with mean pooling): its image
tower gives per-frame features, its text tower embeds the label names (the "knowledge").

* temporal stream: a transformer over [CLS, frame_1 + time_1, ..., frame_T + time_T (, text)] where the
  optional text token is the video's own text (its title / caption) through the text tower; the CLS output
  is the video feature. Learned time embeddings make it order-aware.
* frame (non-temporal) stream: every frame on its own cross-attends to the C label-name embeddings
  (`layers.Block` with cross-attention; the sequence per frame is the one frame token), is scored against
  the labels, and the per-frame scores are pooled over frames (max by default: "some frame shows it").
  It cannot see frame order, by construction.
* predictions are similarities to the label embeddings: ``scale * cos(head(h), label_c) + bias_c`` with a
  learned scale and per-label bias per stream (each stream has its own head, scale and bias: its own
  classifier over shared label knowledge).
* parent refinement: after scoring, ``z_child += z_parent`` down the tree (parents first, so a grandchild
  gets the sum along its whole path; `refine_with_parents`).
* the ensemble prediction is the mean of the two streams' refined logits.

`freeze_image` / `freeze_text` run the towers without gradients (frozen features from a pretrained model).
A scene model is one family (`model_type: scene`): its config nests the video model's config and the labels, its
weights are one `model.safetensors`, and `polymodal.load_model` reads it back.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..data.labels import LabelHierarchy, hierarchy_from_classes
from .base import ConfigDict, save_pretrained
from .layers import Transformer, init_transformer_

STREAMS = ("both", "temporal", "frame")
SCENE_LABEL_RESIDUAL = 0.5          # what `method: scene` trains with unless scene.model.label_residual says otherwise
FRAME_POOLS = ("max", "mean")
LEGACY_CONFIG = "scene_config.json"         # the side files of scene model folders from before the family
LEGACY_HEADS = "scene_heads.safetensors"


@dataclass
class SceneConfig(ConfigDict):
    """The scene model's own settings (the recipe's `scene.model` keys)."""
    streams: str = "both"          # "both" | "temporal" | "frame": which streams are built and predict
    layers: int = 2                # temporal stream: transformer blocks over the frame tokens
    fusion_layers: int = 1         # frame stream: cross-attention blocks (frame -> label embeddings)
    heads: int = 0                 # attention heads in both streams; 0 = auto (E // 32, at least 1)
    mlp_ratio: float = 4.0
    max_frames: int = 64           # temporal stream: size of the time-embedding table
    use_text: bool = False         # temporal stream: add the video's text feature (title / caption) as a token
    refine: bool = True            # child logits += parent logits down the label tree
    frame_pool: str = "max"        # frame stream: "max" | "mean" of the per-frame logits over valid frames
    freeze_image: bool = False     # frame features without gradients (a frozen image tower)
    freeze_text: bool = False      # label / video-text embeddings without gradients (a frozen text tower)
    label_lang: str = "en"         # "en" | "zh": which label names are embedded
    label_template: str = "{}"     # prompt around each label name, e.g. "a video that {}"
    init_scale: float = 10.0       # initial cosine -> logit scale of each stream
    center_labels: bool = True     # subtract the mean label embedding before normalising (see label_embeddings)
    time_init: float = 1.0         # temporal stream: std of the initial time embeddings, as large as the layer-normed
                                   # frames (about 1 per dimension); at 0.02 the stream started order-blind and stayed so
    label_residual: float = 0.0    # > 0: each stream's classifier adds a learned (C, E) residual to the label
                                   # embeddings, drawn at random with about this norm (0 = off); lets labels whose
                                   # names embed alike (opposite orders) part (see LabelClassifier). 0 here, so models
                                   # saved before it load as they were; the scene method's default is
                                   # SCENE_LABEL_RESIDUAL
    # Filled by the model (not recipe keys): what a saved scene model's config.json holds beside the settings.
    video: dict = field(default_factory=dict)     # the wrapped video model's config
    labels: dict = field(default_factory=dict)    # the label hierarchy (names, parents, groups)
    model_type: str = "scene"

    def __post_init__(self):
        if self.streams not in STREAMS:
            raise ConfigError(f"scene.model.streams must be one of {', '.join(STREAMS)}, got {self.streams!r}")
        if self.frame_pool not in FRAME_POOLS:
            raise ConfigError(f"scene.model.frame_pool must be one of {', '.join(FRAME_POOLS)}, got {self.frame_pool!r}")
        for key in ("layers", "fusion_layers", "max_frames"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"scene.model.{key} must be an integer >= 1, got {v!r}")
        if not isinstance(self.heads, int) or self.heads < 0:
            raise ConfigError(f"scene.model.heads must be an integer >= 0 (0 = auto), got {self.heads!r}")
        if self.label_lang not in ("en", "zh"):
            raise ConfigError(f"scene.model.label_lang must be en or zh, got {self.label_lang!r}")
        if "{}" not in self.label_template:
            raise ConfigError(f"scene.model.label_template needs a '{{}}' for the label name, got "
                              f"{self.label_template!r}")
        if isinstance(self.label_residual, bool) or not isinstance(self.label_residual, (int, float)) \
                or not self.label_residual >= 0:
            raise ConfigError(f"scene.model.label_residual must be a number >= 0 (0 = off), got {self.label_residual!r}")
        if isinstance(self.time_init, bool) or not isinstance(self.time_init, (int, float)) or not self.time_init >= 0:
            raise ConfigError(f"scene.model.time_init must be a number >= 0, got {self.time_init!r}")
        if not self.init_scale > 0:
            raise ConfigError(f"scene.model.init_scale must be > 0, got {self.init_scale!r}")

    def to_dict(self) -> dict:
        """The JSON-ready config; `video` is the wrapped model's current config when the model set it."""
        video = self.video
        data = asdict(replace(self, video={}))
        data["video"] = video.to_dict() if hasattr(video, "to_dict") else copy.deepcopy(video)
        return data

    @property
    def has_temporal(self) -> bool:
        return self.streams in ("both", "temporal")

    @property
    def has_frame(self) -> bool:
        return self.streams in ("both", "frame")


@dataclass
class SceneOutput:
    """Logits (N, C) of each stream (None when that stream is off) and of the ensemble, all refined when
    `refine` is on; `frame_logits` are the frame stream's per-frame logits (N, T, C) before pooling."""
    logits: Tensor
    temporal: Tensor | None = None
    frame: Tensor | None = None
    frame_logits: Tensor | None = None

    def streams(self) -> list[Tensor]:
        """The logits of the streams that are on."""
        return [z for z in (self.temporal, self.frame) if z is not None]


def refine_with_parents(logits: Tensor, parent_index: Tensor) -> Tensor:
    """Add each label's (refined) parent score to its own, from the roots down.

    Args:
        logits: (N, C) scores.
        parent_index: (C,) long, the parent of each label or -1 for a root.
    Returns:
        (N, C): roots unchanged; z'_c = z_c + z'_parent(c), so a label gets the sum along its path to the root.
    Raises:
        ValueError: the parents form a cycle.
    """
    parent = parent_index.tolist()
    depth = [None] * len(parent)

    def depth_of(c, seen=()):
        if depth[c] is None:
            if c in seen:
                raise ValueError("refine_with_parents: the parent indices form a cycle")
            depth[c] = 0 if parent[c] < 0 else depth_of(parent[c], seen + (c,)) + 1
        return depth[c]

    for c in range(len(parent)):
        depth_of(c)
    out = logits
    for d in range(1, max(depth, default=0) + 1):
        idx = torch.tensor([c for c in range(len(parent)) if depth[c] == d], device=logits.device)
        par = parent_index.to(logits.device)[idx]
        out = out.index_copy(1, idx, logits[:, idx] + out[:, par])   # out-of-place: keeps autograd simple
    return out


def _pool_frames(x: Tensor, valid: Tensor | None, how: str) -> Tensor:
    """(B, T, C) per-frame logits -> (B, C) over valid frames; a video without valid frames gives 0."""
    if valid is None:
        return x.amax(1) if how == "max" else x.mean(1)
    v = valid.bool()[..., None]                                      # (B, T, 1)
    if how == "max":
        out = x.masked_fill(~v, float("-inf")).amax(1)
        return torch.where(v.any(1), out, torch.zeros_like(out))
    w = v.to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


class LabelClassifier(nn.Module):
    """scale * cos(head(h), label_c) + bias_c: a stream's classifier over shared label embeddings.

    With `residual` > 0, label_c is normalise(text_c + delta_c), delta a learned (C, E) table. Two labels whose
    names the text tower embeds alike ("moves left then right" / "moves right then left" share every word) get the
    same score from any h without it: only the video-independent bias could tell them apart, so nothing rewards an
    order-aware h either. delta starts at random, with rows of about norm `residual`: a zero start would sit on that
    symmetry (the residuals of two opposite labels get cancelling gradients while h ignores order).
    """

    def __init__(self, dim: int, num_labels: int, init_scale: float, residual: float = 0.0):
        super().__init__()
        self.head = nn.Linear(dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())
        self.bias = nn.Parameter(torch.zeros(num_labels))
        self.label_delta = (nn.Parameter(torch.randn(num_labels, dim) * (residual / dim ** 0.5))   # (C, E)
                            if residual > 0 else None)

    def forward(self, h: Tensor, labels: Tensor) -> Tensor:
        """h (..., E), labels (C, E) unit rows -> (..., C)."""
        if self.label_delta is not None:
            labels = F.normalize(labels + self.label_delta, dim=-1)     # (C, E)
        z = F.normalize(self.head(h), dim=-1) @ labels.T               # (..., C)
        return self.log_scale.clamp(max=4.6).exp() * z + self.bias


class TemporalStream(nn.Module):
    """Order-aware stream: transformer over [CLS, frames + time (, text)] -> CLS -> label scores."""

    def __init__(self, dim: int, num_labels: int, cfg: SceneConfig, heads: int):
        super().__init__()
        self.max_frames = cfg.max_frames
        self.cls = nn.Parameter(torch.randn(dim) * 0.02)
        self.time = nn.Parameter(torch.randn(cfg.max_frames, dim) * cfg.time_init)   # (max_frames, E)
        self.text_type = nn.Parameter(torch.randn(dim) * 0.02)             # marks the text token
        self.norm_in = nn.LayerNorm(dim)
        self.transformer = Transformer(dim, cfg.layers, heads, cfg.mlp_ratio)
        init_transformer_(self.transformer, dim, cfg.layers)
        self.norm = nn.LayerNorm(dim)
        self.classifier = LabelClassifier(dim, num_labels, cfg.init_scale, cfg.label_residual)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the class and text-type tokens and the time embeddings."""
        return {"cls", "time", "text_type"}

    def forward(self, frames: Tensor, valid: Tensor | None, labels: Tensor, text: Tensor | None = None) -> Tensor:
        """frames (B, T, E), valid (B, T), labels (C, E), text (B, E) or None -> (B, C)."""
        B, T, _ = frames.shape
        if T > self.max_frames:
            raise ValueError(f"the clip has {T} frames but the scene temporal stream has {self.max_frames} time "
                             f"positions; sample fewer frames or raise scene.model.max_frames")
        x = self.norm_in(frames) + self.time[:T]                          # (B, T, E)
        tokens = [self.cls.expand(B, 1, -1), x]
        keep = [torch.ones(B, 1, dtype=torch.bool, device=x.device),
                valid.bool() if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)]
        if text is not None:
            tokens.append((self.norm_in(text) + self.text_type)[:, None])   # (B, 1, E)
            keep.append(torch.ones(B, 1, dtype=torch.bool, device=x.device))
        x = torch.cat(tokens, dim=1)                                      # (B, 1+T(+1), E)
        mask = torch.cat(keep, dim=1)[:, None, None, :]                   # (B, 1, 1, S): CLS always valid
        h = self.transformer(x, attn_mask=mask)[:, 0]                     # (B, E)
        return self.classifier(self.norm(h), labels)


class FrameStream(nn.Module):
    """Order-free stream: each frame cross-attends to the label embeddings, is scored, scores pooled."""

    def __init__(self, dim: int, num_labels: int, cfg: SceneConfig, heads: int):
        super().__init__()
        self.pool = cfg.frame_pool
        self.norm_in = nn.LayerNorm(dim)
        self.fusion = Transformer(dim, cfg.fusion_layers, heads, cfg.mlp_ratio, cross_attention=True)
        init_transformer_(self.fusion, dim, cfg.fusion_layers)
        self.norm = nn.LayerNorm(dim)
        self.classifier = LabelClassifier(dim, num_labels, cfg.init_scale, cfg.label_residual)

    def forward(self, frames: Tensor, valid: Tensor | None, labels: Tensor) -> tuple[Tensor, Tensor]:
        """frames (B, T, E), valid (B, T), labels (C, E) -> ((B, C) pooled, (B, T, C) per-frame logits)."""
        B, T, E = frames.shape
        x = self.norm_in(frames).reshape(B * T, 1, E)                     # (B*T, 1, E): frames apart
        context = labels[None].expand(B * T, -1, -1)                      # (B*T, C, E)
        h = self.fusion(x, context=context)[:, 0]                         # (B*T, E)
        per_frame = self.classifier(self.norm(h), labels).view(B, T, -1)  # (B, T, C)
        return _pool_frames(per_frame, valid, self.pool), per_frame


class SceneModel(nn.Module):
    """Two-stream scene recognizer over a `VideoCLIP`.

    Args:
        video: the VideoCLIP whose image tower gives frame features and whose text tower embeds label names
            (it must carry a tokenizer).
        hierarchy: the labels (names, parents, groups).
        cfg: the scene config.
    """

    config_class = SceneConfig

    def __init__(self, video: nn.Module, hierarchy: LabelHierarchy, cfg: SceneConfig | None = None):
        super().__init__()
        cfg = replace(cfg or SceneConfig(), video=video.config, labels=hierarchy.to_dict())
        self.config, self.hierarchy, self.video = cfg, hierarchy, video
        dim = video.config.embed_dim
        heads = cfg.heads or max(1, dim // 32)
        if dim % heads:
            raise ConfigError(f"scene.model.heads={heads} does not divide the embedding size {dim}")
        C = len(hierarchy)
        self._label_ids = None                                               # (tokenizer, (C, L) ids), on first use
        self.register_buffer("parent_index", hierarchy.parent_index(), persistent=False)   # (C,)
        self.temporal = TemporalStream(dim, C, cfg, heads) if cfg.has_temporal else None
        self.frame = FrameStream(dim, C, cfg, heads) if cfg.has_frame else None

    @classmethod
    def from_config(cls, cfg: SceneConfig) -> "SceneModel":
        """A randomly initialised scene model of a saved config (its video model and labels nested in it)."""
        from .factory import build_config
        from .families import build_model
        video = build_model(build_config(cfg.video, where="scene.video"))
        return cls(video, hierarchy_from_classes(cfg.labels, "scene.labels"), cfg)

    # ---- processors and towers ------------------------------------------------------------------------
    tokenizer = property(lambda self: self.video.tokenizer)
    image_transform = property(lambda self: self.video.image_transform)

    def attach_processors(self, tokenizer=None, image_transform=None) -> None:
        """Attach the tokenizer (it embeds the label names) and the image transform to the video model."""
        self.video.attach_processors(tokenizer, image_transform)

    # Aliases so the video-text eval tasks run on a scene model as on its video model.
    def encode_video(self, frames: Tensor, valid: Tensor | None = None, normalize: bool = True) -> Tensor:
        """The video model's (B, E) video embedding."""
        return self.video.encode_video(frames, valid, normalize)

    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """The video model's (N, E) text embedding."""
        return self.video.encode_text(ids, normalize, attention_mask)

    def label_ids(self) -> Tensor:
        """(C, L) token ids of the label prompts, tokenized by the attached tokenizer on first use."""
        tok = self.tokenizer
        if tok is None:
            raise ConfigError("SceneModel: the video model has no tokenizer to embed the label names with; "
                              "attach one (tokenizer.path) or train one (tokenizer.corpus_keys)")
        if self._label_ids is None or self._label_ids[0] is not tok:
            c = self.config
            names = [c.label_template.format(n) for n in self.hierarchy.display_names(c.label_lang)]
            self._label_ids = (tok, tok(names))
        return self._label_ids[1].to(self.parent_index.device)

    def label_embeddings(self) -> Tensor:
        """(C, E) unit label-name embeddings from the text tower.

        Text embeddings of short label names share a large common component (a random tiny tower gives
        cosines near 0.98 between all names; pretrained towers show the same anisotropy, weaker), and a cosine
        classifier cannot separate labels along it. With `center_labels` the mean over labels is removed
        first, so only what tells the names apart is kept.
        """
        with torch.no_grad() if self.config.freeze_text else nullcontext():
            e = self.video.encode_text(self.label_ids())                  # (C, E)
        if self.config.center_labels and len(e) > 1:
            e = F.normalize(e - e.mean(0, keepdim=True), dim=-1)
        return e

    def frame_features(self, frames: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, T, 3, H, W) -> (B, T, E) per-frame image features (unnormalised)."""
        with torch.no_grad() if self.config.freeze_image else nullcontext():
            return self.video.encode_frames(frames, valid)

    def forward(self, frames: Tensor, valid: Tensor | None = None, text_ids: Tensor | None = None) -> SceneOutput:
        """Score a batch of clips.

        Args:
            frames: (B, T, 3, H, W) normalised frames.
            valid: (B, T) bool, True = real frame; None = all.
            text_ids: (B, L) token ids of each video's text; used only when `use_text` is on.
        Returns:
            A `SceneOutput` (logits (B, C) of each stream and of their mean).
        """
        feats = self.frame_features(frames, valid)                        # (B, T, E)
        labels = self.label_embeddings()                                  # (C, E)
        temporal = frame = per_frame = None
        if self.temporal is not None:
            text = None
            if self.config.use_text:
                if text_ids is None:
                    raise ValueError("scene.model.use_text is on but the batch has no text (input_ids)")
                with torch.no_grad() if self.config.freeze_text else nullcontext():
                    text = self.video.encode_text(text_ids, normalize=False)   # (B, E)
            temporal = self._refine(self.temporal(feats, valid, labels, text))
        if self.frame is not None:
            frame, per_frame = self.frame(feats, valid, labels)
            frame = self._refine(frame)
        parts = [z for z in (temporal, frame) if z is not None]
        logits = parts[0] if len(parts) == 1 else torch.stack(parts).mean(0)   # (B, C)
        return SceneOutput(logits, temporal, frame, per_frame)

    def _refine(self, z: Tensor) -> Tensor:
        return refine_with_parents(z, self.parent_index) if self.config.refine else z

    def save_pretrained(self, directory) -> None:
        """One folder: config.json (settings, the video model's config, the labels), model.safetensors, the
        tokenizer and the preprocessing config."""
        save_pretrained(self, directory)


def from_legacy_folder(directory, video: nn.Module) -> SceneModel:
    """A scene model folder written before scene models were one family (a video model's files plus
    ``scene_config.json`` and ``scene_heads.safetensors``), as a `SceneModel` (eval mode).

    Args:
        directory: the folder.
        video: its video model, already loaded from the folder's config.json and model.safetensors.
    """
    from safetensors.torch import load_file

    from ..config import from_dict
    directory = Path(directory)
    cfg_file = directory / LEGACY_CONFIG
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg = from_dict(SceneConfig, data["scene"], str(cfg_file))
        hierarchy = hierarchy_from_classes(data["labels"], str(cfg_file))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg_file}: not a readable scene config ({type(e).__name__}: {e}); re-save the model with "
                          f"`polymodal train` (method: scene)") from None
    model = SceneModel(video, hierarchy, cfg)
    missing, unexpected = model.load_state_dict(load_file(str(directory / LEGACY_HEADS)), strict=False)
    missing = [k for k in missing if not k.startswith("video.")]
    if missing or unexpected:
        raise ConfigError(f"{directory / LEGACY_HEADS}: missing {missing[:5]}, unexpected {unexpected[:5]} keys for "
                          f"the config in {cfg_file}")
    return model.eval()


__all__ = ["SceneConfig", "SceneOutput", "SceneModel", "TemporalStream", "FrameStream", "LabelClassifier",
           "refine_with_parents", "from_legacy_folder", "LEGACY_CONFIG", "LEGACY_HEADS"]
