"""Video-text model over any dual encoder we have (CLIP, M2-Encoder; imported HF/OpenCLIP/LoTLIP
checkpoints become one of those).

Frames go through the image tower as one batch of B*T images; a temporal module
(`polymodal.models.temporal`) turns the T frame features of each video into one video embedding.
Texts go through the wrapped model unchanged, so a video model made from a pretrained image model
with `kind="mean"` is the usual zero-shot frame-averaging baseline.

Parameters of the temporal module live under the `temporal.` prefix of the state dict (the wrapped
model's under `base.`), so a recipe can give them their own learning rate (STAN uses 10x).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError, from_dict
from .base import attach_processors, save_pretrained
from .clip import CLIPOutput
from .factory import WrappedConfig
from .families import IMAGE_TEXT, build_model
from .temporal import (STANBranch, TemporalConfig, build_temporal, masked_mean, sample_keep,
                       vision_hidden_states)
from .vision import VisionTower


@dataclass
class VideoCLIPConfig(WrappedConfig):
    """A wrapped image-text model plus a temporal module.

    `base` is the wrapped model's config as its `to_dict()` writes it (any registered family but
    video_clip itself). `vision` / `text` read through to the wrapped config, as for CLIP, so code
    that reads `model.config.text.pad_token_id` works unchanged; edits to them are kept and saved.
    """
    base: dict = field(default_factory=dict)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    model_type: str = "video_clip"

    def base_config(self):
        """The wrapped model's config dataclass, built once from `base` (an image-text family only; later edits to
        it are kept)."""
        if self._base is None and self.base.get("model_type", "clip") not in IMAGE_TEXT:
            raise ConfigError(f"{self.model_type}.base: the wrapped model must be an image-text model (model_type "
                              f"{', '.join(IMAGE_TEXT)}), got {self.base.get('model_type')!r}")
        return super().base_config()


class VideoCLIP(nn.Module):
    """Dual encoder for video-text: `encode_video` (frames -> temporal module), `encode_text` (the base's).

    Args:
        cfg: the config; the wrapped model is built from `cfg.base` (random init) unless `base` is given.
        base: an existing CLIP / M2Encoder to wrap (used as is, not copied); see `from_image_model`.
        temporal: an existing temporal module for `cfg.temporal` (used as is); see `from_video_model`.

    Video-text retrieval (`polymodal.eval.video_retrieval`) asks the model for `video_features`,
    `text_features` and `similarity`; here they are the pooled, normalised embeddings and their cosine.
    Families built on this one (M2-RAAP's Mug/ACG, SHE-Net's hierarchy) override those three.
    """

    config_class = VideoCLIPConfig

    def __init__(self, cfg: VideoCLIPConfig, base: nn.Module | None = None, temporal: nn.Module | None = None):
        super().__init__()
        if base is None:
            base_cfg = cfg.base_config()
            base = build_model(base_cfg)
        self.config = cfg
        self.base = base
        tower = getattr(base, "visual", None)
        if cfg.temporal.kind == "stan" and not isinstance(tower, VisionTower):
            raise ConfigError(f"temporal.kind='stan' needs a ViT image tower (CLIP's `visual`), but the wrapped "
                              f"model is a {type(base).__name__} (model_type {base.config.model_type!r}); use "
                              f"temporal.kind=transformer (or mean) for it")
        self.temporal = temporal if temporal is not None else build_temporal(cfg.temporal, base.config.embed_dim, tower)

    @classmethod
    def from_image_model(cls, model: nn.Module, temporal: TemporalConfig | dict | None = None) -> "VideoCLIP":
        """Wrap an existing (possibly pretrained) image-text model, keeping its weights, tokenizer and
        transform. The model is shared, not copied: training the video model trains it too.

        Args:
            model: a CLIP or M2Encoder (anything `hub.load_model` returns for image-text checkpoints).
            temporal: the temporal config or its dict; default mean pooling.
        Returns:
            The VideoCLIP (in the model's train/eval mode).
        """
        if isinstance(model, VideoCLIP):
            raise ConfigError("from_image_model: the model is already a VideoCLIP")
        if isinstance(temporal, dict) or temporal is None:
            temporal = from_dict(TemporalConfig, temporal or {}, "temporal")
        cfg = VideoCLIPConfig(base=model.config.to_dict(), temporal=copy.deepcopy(temporal))
        cfg._base = model.config   # the same object: the wrapped model and the video config agree
        video = cls(cfg, base=model)
        return video.train(model.training)

    @classmethod
    def from_video_model(cls, video: "VideoCLIP", **settings) -> "VideoCLIP":
        """`video`'s image-text model and temporal module (shared, not copied) as a model of family `cls`.

        Args:
            video: a VideoCLIP (e.g. a saved plain video model an M2-RAAP or SHE-Net run starts from).
            **settings: the fields `cls.config_class` adds to `VideoCLIPConfig`.
        Returns:
            The model (in `video`'s train/eval mode).
        """
        cfg = cls.config_class(base=video.config.base, temporal=copy.deepcopy(video.config.temporal), **settings)
        cfg._base = video.config.base_config()
        return cls(cfg, base=video.base, temporal=video.temporal).train(video.training)

    # ---- processors live on the wrapped model (kept off the state dict) ----
    tokenizer = property(lambda self: self.base.tokenizer, lambda self, v: setattr(self.base, "tokenizer", v))
    image_transform = property(lambda self: self.base.image_transform,
                               lambda self, v: setattr(self.base, "image_transform", v))

    # ---- CLIP-like interface ----
    def scale(self) -> Tensor:
        """The wrapped model's exp'ed, clamped logit scale."""
        return self.base.scale()

    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """(N, L) token ids -> (N, E): the wrapped model's text embedding."""
        return self.base.encode_text(ids, normalize=normalize, attention_mask=attention_mask)

    def encode_frames(self, frames: Tensor, valid: Tensor | None = None) -> Tensor:
        """Per-frame embeddings before temporal pooling, unnormalised.

        For mean/transformer these are the base's image embeddings; for STAN the frame features
        after the branch (tower CLS + branch CLS -> tower norm -> projection).

        Args:
            frames: (B, T, 3, H, W) normalised frames.
            valid: (B, T) bool, True = real frame; None = all real.
        Returns:
            (B, T, E).
        """
        if frames.dim() != 5:
            raise ValueError(f"frames must be (B, T, 3, H, W), got shape {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        pixels = frames.flatten(0, 1)                                   # (B*T, 3, H, W): frames of a video consecutive
        if isinstance(self.temporal, STANBranch):
            x = self._stan_frames(pixels, T, valid)                     # (B*T, E)
        else:
            # Patch dropout (training, vision.patch_dropout > 0) happens inside the tower, per frame.
            x = self.base.encode_image(pixels, normalize=False)         # (B*T, E)
        return x.view(B, T, -1)                                         # (B, T, E)

    def _stan_frames(self, pixels: Tensor, T: int, valid: Tensor | None) -> Tensor:
        """(B*T, 3, H, W) -> (B*T, E) STAN frame features."""
        tower: VisionTower = self.base.visual
        p = tower.config.patch_size
        gh, gw = pixels.shape[-2] // p, pixels.shape[-1] // p
        keep = None
        if self.training and tower.config.patch_dropout > 0:
            # The temporal attention pairs a patch with the same patch in the other frames, so every
            # frame of a video keeps the same patches.
            keep = sample_keep(len(pixels) // T, gh * gw, tower.config.patch_dropout, pixels.device)  # (B, K)
            keep = keep.repeat_interleave(T, dim=0)                     # (B*T, K)
        states = vision_hidden_states(tower, pixels, keep)              # L+1 x (B*T, 1+K, D)
        pos = self.temporal.position_embeddings(tower, gh, gw, keep) if self.temporal.use_pos else None
        z = self.temporal(states, T, valid, pos)                        # (B*T, 1+K, D)
        x = states[-1] + z                                              # tower tokens + branch tokens
        if tower.config.pool == "cls":
            feat = tower.norm(x[:, 0])                                  # (B*T, D)
        else:
            feat = tower.norm(x[:, 1:]).mean(dim=1)
        return self.base.visual_proj(feat)                              # (B*T, E)

    def encode_video(self, frames: Tensor, valid: Tensor | None = None, normalize: bool = True) -> Tensor:
        """(B, T, 3, H, W) frames (+ (B, T) valid mask) -> (B, E) video embeddings.

        Padded frames (valid False) never contribute; a video without valid frames gives zeros.
        """
        x = self.encode_frames(frames, valid)                            # (B, T, E)
        if isinstance(self.temporal, STANBranch):
            x = masked_mean(x, valid)                                    # (B, E)
        else:
            x = self.temporal(x, valid)                                  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_video_and_reversal(self, frames: Tensor, valid: Tensor | None = None,
                                  normalize: bool = True) -> tuple[Tensor, Tensor]:
        """The embeddings of each video and of the same video played backwards (frames and mask flipped in time).

        Mean and transformer pool the same per-frame features, so the image tower runs once; STAN mixes time
        inside the tower's branch, so the reversed clip goes through it again.

        Args:
            frames: (B, T, 3, H, W); valid: (B, T) bool or None.
        Returns:
            (forward (B, E), reversed (B, E)), L2-normalised unless `normalize` is False.
        """
        rvalid = None if valid is None else valid.flip(1)
        if isinstance(self.temporal, STANBranch):
            return (self.encode_video(frames, valid, normalize),
                    self.encode_video(frames.flip(1), rvalid, normalize))
        x = self.encode_frames(frames, valid)                            # (B, T, E)
        fwd, rev = self.temporal(x, valid), self.temporal(x.flip(1), rvalid)   # (B, E) each
        if normalize:
            fwd, rev = F.normalize(fwd, dim=-1), F.normalize(rev, dim=-1)
        return fwd, rev

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, E): each image as a one-frame video."""
        return self.encode_video(pixels[:, None], normalize=normalize)

    # ---- what video-text retrieval compares (one loop: polymodal.eval.video_retrieval) ----
    def video_features(self, frames: Tensor, valid: Tensor | None = None, records: list[dict] | None = None):
        """A batch of videos as the features `similarity` compares: here (B, E) normalised embeddings.

        Args:
            frames: (B, T, 3, H, W); valid: (B, T) bool or None.
            records: the batch's manifest records (read by families that use more than frames, e.g. ACG's
                auxiliary captions); unused here.
        """
        return self.encode_video(frames, valid)

    def text_features(self, texts: list[str]):
        """A batch of captions as the features `similarity` compares: here (N, E) normalised embeddings."""
        return self.encode_text(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> Tensor:
        """(N, L) token ids of `texts` on the model's device, padding columns no text uses removed."""
        from ..data.text import trim_padding
        ids = trim_padding(self.tokenizer(list(texts)), self.config.text.pad_token_id)
        return ids.to(next(self.parameters()).device)

    def similarity(self, text: Tensor, video: Tensor, pairs: bool = False) -> Tensor:
        """Scores of texts against videos (the cosine of the pooled embeddings here).

        Args:
            text: `text_features` of N_t texts; video: `video_features` of N_v videos.
            pairs: score text i with video i only (N_t == N_v).
        Returns:
            (N_t, N_v), or (N_t,) with `pairs`.
        """
        return (text * video).sum(-1) if pairs else text @ video.T

    def forward(self, frames: Tensor, ids: Tensor, attention_mask: Tensor | None = None,
                valid: Tensor | None = None) -> CLIPOutput:
        """frames (B, T, 3, H, W) or images (B, 3, H, W), ids (N, L) -> CLIPOutput (image_embeds = videos)."""
        videos = self.encode_video(frames, valid) if frames.dim() == 5 else self.encode_image(frames)
        return CLIPOutput(videos, self.encode_text(ids, attention_mask=attention_mask), self.scale())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the wrapped model's layers in the backward pass (less memory for long clips)."""
        if hasattr(self.base, "set_grad_checkpointing"):
            self.base.set_grad_checkpointing(enable)
            return
        for tower in (getattr(self.base, "visual", None), getattr(self.base, "text", None)):
            if tower is not None and hasattr(tower, "transformer"):
                tower.transformer.grad_checkpointing = enable

    def attach_processors(self, tokenizer=None, image_transform=None) -> None:
        """Attach a tokenizer and an image transform (to the wrapped model), as `PolymodalModel` does."""
        attach_processors(self, tokenizer, image_transform)

    def save_pretrained(self, directory) -> None:
        """Write config.json, model.safetensors, the tokenizer and the preprocessing config."""
        save_pretrained(self, directory)
