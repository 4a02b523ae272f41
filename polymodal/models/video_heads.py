"""Video-text heads of M2-RAAP: the Mug token-frame similarity and ACG (auxiliary-caption guided) fusion.

* Mug ("simple" mode of the public Mug-STAN code): with L2-normalised text token features w_l and frame
  features f_t, R[l, t] = <w_l, f_t>. Text->video: for every real token, softmax(tau R) over frames weights
  R into one score per token; a second softmax(tau .) over the real tokens weights those into one number.
  Video->text is the mirror (softmax over tokens, then over frames). The score is the mean of the two, and
  training uses a symmetric cross-entropy over the score matrix with temperature 0.01. Padded text tokens
  never count; padded frames (`valid` False) never count either (our addition: the public code has no
  frame padding).
* ACG fusion (our design, not the paper's; the paper only names the strategy): the text tower embeds a
  video's auxiliary captions (from a captioner, or given in the manifest); a gated residual
  `f + gate * proj(a)` adds them to the frame features before temporal pooling. `gate` starts at 0, so at
  initialisation the fused video embedding equals the plain one exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from ..data.text import trim_padding
from .features import Rows
from .video import VideoCLIP, VideoCLIPConfig

NEG = -1e4           # masked logits (finite, so a row without real entries gives zeros, not NaN)
ACG_LEVELS = ("video", "frame")


# ---- token and frame features -------------------------------------------------------------------------
def text_token_features(model: nn.Module, ids: Tensor, normalize: bool = True) -> tuple[Tensor, Tensor]:
    """Every token's projected text feature, and which tokens are real.

    Works for CLIP-like models (a `text` TextTower and `text_proj`), M2-Encoder (`text_features`) and a
    VideoCLIP around either.

    Args:
        model: the (video) dual encoder.
        ids: (N, L) token ids.
        normalize: L2-normalise each token feature.
    Returns:
        (tokens (N, L', E), mask (N, L') bool, True = real token). Causal towers count tokens up to and
        including the pooled (EOT) position; bidirectional towers use their attention mask.
    """
    base = getattr(model, "base", model)
    if hasattr(base, "text_features"):                                 # M2-Encoder: stage-2 token states
        feats = base.text_features(ids)
        tokens, mask = base.text_proj(feats.stage2), feats.mask        # (N, L, E), (N, L)
    else:
        tower = base.text
        if getattr(tower.config, "num_readout_tokens", 0):
            raise ValueError("text_token_features: towers with read-out (corner) tokens are not supported by the "
                             "Mug head; use m2raap.similarity=mean")
        out = tower(ids)
        tokens = base.text_proj(out.tokens)                            # (N, L, E)
        if tower.config.causal:
            pool_at = tower._pool_index(ids)                           # (N,) EOT position
            mask = torch.arange(ids.shape[1], device=ids.device)[None] <= pool_at[:, None]
        else:
            mask = out.mask.bool()
    tokens = F.normalize(tokens, dim=-1) if normalize else tokens
    return tokens, mask.bool()


# ---- Mug similarity -------------------------------------------------------------------------------------
def _mug_block(txt: Tensor, tmask: Tensor, vid: Tensor, vmask: Tensor, tau: float) -> Tensor:
    """(n, L, E) tokens, (n, L) mask, (m, T, E) frames, (m, T) mask -> (n, m) Mug scores."""
    R = torch.einsum("nld,mtd->nmlt", txt, vid)                        # (n, m, L, T)
    both = tmask[:, None, :, None] & vmask[None, :, None, :]           # (n, m, L, T)
    logits = torch.where(both, tau * R, torch.full_like(R, NEG))
    t_tok = (torch.softmax(logits, dim=-1) * R * both).sum(-1)        # (n, m, L): per token, over frames
    v_frm = (torch.softmax(logits, dim=-2) * R * both).sum(-2)        # (n, m, T): per frame, over tokens
    tok_ok = tmask[:, None, :].expand_as(t_tok)
    frm_ok = vmask[None, :, :].expand_as(v_frm)
    t2v = (torch.softmax(torch.where(tok_ok, tau * t_tok, torch.full_like(t_tok, NEG)), -1) * t_tok * tok_ok).sum(-1)
    v2t = (torch.softmax(torch.where(frm_ok, tau * v_frm, torch.full_like(v_frm, NEG)), -1) * v_frm * frm_ok).sum(-1)
    return (t2v + v2t) / 2                                             # (n, m)


def mug_similarity(text_tokens: Tensor, text_mask: Tensor, frames: Tensor, frame_valid: Tensor | None = None,
                   tau: float = 100.0, block_size: int = 64) -> Tensor:
    """Mug scores of every text against every video, computed in blocks so memory stays bounded.

    Args:
        text_tokens: (N_text, L, E) L2-normalised token features.
        text_mask: (N_text, L) bool, True = real token.
        frames: (N_video, T, E) L2-normalised frame features.
        frame_valid: (N_video, T) bool, True = real frame; None = all real.
        tau: the softmax sharpness inside the head (100 in Mug-STAN).
        block_size: texts and videos per block; temporary memory ~ block_size**2 * L * T floats.
    Returns:
        (N_text, N_video) scores in [-1, 1].
    """
    if text_tokens.dim() != 3 or frames.dim() != 3 or text_tokens.shape[-1] != frames.shape[-1]:
        raise ValueError(f"mug_similarity needs (N, L, E) text tokens and (M, T, E) frames with the same E, got "
                         f"{tuple(text_tokens.shape)} and {tuple(frames.shape)}")
    if block_size < 1:
        raise ValueError(f"mug_similarity: block_size must be >= 1, got {block_size}")
    tmask = text_mask.bool()
    vmask = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device) if frame_valid is None \
        else frame_valid.bool()
    rows = []
    for i in range(0, len(text_tokens), block_size):
        cols = [_mug_block(text_tokens[i:i + block_size], tmask[i:i + block_size], frames[j:j + block_size],
                           vmask[j:j + block_size], tau) for j in range(0, len(frames), block_size)]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


def mug_loss(scores: Tensor, temperature: float | Tensor = 0.01) -> Tensor:
    """Symmetric cross-entropy over a square (B_text, B_video) Mug score matrix, pairs on the diagonal.

    Args:
        scores: (B, B) from `mug_similarity`, row i = text i, column i = its video.
        temperature: logits = scores / temperature (0.01 in Mug-STAN; a tensor, e.g. 1 / a learnable logit scale,
            passes its gradient on).
    Returns:
        scalar loss.
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"mug_loss needs a square (B, B) score matrix, got {tuple(scores.shape)}")
    logits = scores / temperature
    labels = torch.arange(len(scores), device=scores.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---- ACG fusion -----------------------------------------------------------------------------------------
class ACGFusion(nn.Module):
    """Gated residual that adds auxiliary-caption embeddings to frame features (our design).

    `level="video"`: the K caption embeddings of a video are averaged (masked) and added to every frame;
    `level="frame"`: caption k is added to frame k (K must equal T). fused = f + gate * proj(a), with a
    per-channel `gate` initialised to 0 (fused == f at init) and `proj` initialised to the identity.

    Args:
        dim: E, the embedding width.
        level: "video" | "frame".
    """

    def __init__(self, dim: int, level: str = "video"):
        super().__init__()
        if level not in ACG_LEVELS:
            raise ValueError(f"acg level must be one of {', '.join(ACG_LEVELS)}, got {level!r}")
        self.level = level
        self.proj = nn.Linear(dim, dim)
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, frames: Tensor, aux: Tensor, aux_mask: Tensor | None = None) -> Tensor:
        """Fuse.

        Args:
            frames: (B, T, E) frame features (before temporal pooling).
            aux: (B, K, E) auxiliary-caption embeddings.
            aux_mask: (B, K) bool, True = a real caption; None = all real. A video without captions is unchanged.
        Returns:
            (B, T, E) fused frame features.
        """
        B, T, _ = frames.shape
        mask = torch.ones(aux.shape[:2], dtype=torch.bool, device=aux.device) if aux_mask is None else aux_mask.bool()
        w = mask.to(aux.dtype)[..., None]                                # (B, K, 1)
        if self.level == "video":
            a = (aux * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)   # (B, 1, E)
            has = mask.any(1)[:, None, None].to(aux.dtype)                               # (B, 1, 1)
        else:
            if aux.shape[1] != T:
                raise ValueError(f"acg level 'frame' needs one auxiliary caption per frame: {aux.shape[1]} "
                                 f"captions for {T} frames; use level 'video' or caption every frame")
            a, has = aux * w, w                                                           # (B, T, E), (B, T, 1)
        return frames + self.gate * self.proj(a) * has                                     # (B, T, E)


def pool_frames(model: nn.Module, frames: Tensor, valid: Tensor | None = None, normalize: bool = True) -> Tensor:
    """The VideoCLIP temporal pooling of (B, T, E) frame features -> (B, E), as `encode_video` does it."""
    from .temporal import STANBranch, masked_mean
    if isinstance(model.temporal, STANBranch):
        x = masked_mean(frames, valid)                                  # the branch already mixed time
    else:
        x = model.temporal(frames, valid)
    return F.normalize(x, dim=-1) if normalize else x


# ---- the M2-RAAP model family ---------------------------------------------------------------------------
SIMILARITIES = ("mean", "mug")


@dataclass
class M2RAAPSettings:
    """What an M2-RAAP model carries beside its video model (the recipe's `m2raap:` section sets them)."""
    similarity: str = "mean"        # "mean": cosine of pooled video and text embeddings | "mug": the Mug head
    mug_tau: float = 100.0          # Mug: softmax(tau R) inside the head
    mug_block: int = 64             # Mug scoring: texts/videos per block (bounded memory)
    acg: bool = False               # auxiliary-caption guidance on/off (an `acg` head in the weights)
    acg_level: str = "video"        # "video": mean caption embedding added to every frame | "frame": caption k, frame k
    aux_field: str = "aux_captions"  # record field with the auxiliary caption(s): a string or a list
    max_aux: int = 8                # at most this many aux captions per video (the first ones)

    def check_settings(self) -> None:
        """Raise ConfigError for a bad value (naming `m2raap.<key>`)."""
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"m2raap.similarity: {self.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if self.acg_level not in ACG_LEVELS:
            raise ConfigError(f"m2raap.acg_level: {self.acg_level!r} is not one of {', '.join(ACG_LEVELS)}")
        if not self.mug_tau > 0:
            raise ConfigError(f"m2raap.mug_tau: {self.mug_tau} must be > 0")
        for key in ("mug_block", "max_aux"):
            if getattr(self, key) < 1:
                raise ConfigError(f"m2raap.{key}: {getattr(self, key)} must be >= 1")

    def settings(self) -> dict:
        """The settings as a dict (the keys `M2RAAPModel.from_video_model` takes)."""
        return {f.name: getattr(self, f.name) for f in fields(M2RAAPSettings)}


@dataclass
class M2RAAPConfig(VideoCLIPConfig, M2RAAPSettings):
    """A video model (`VideoCLIPConfig`: the wrapped image-text model and the temporal module) with M2-RAAP's
    video-text similarity and ACG head; what a saved M2-RAAP model's config.json holds."""
    model_type: str = "m2raap"

    def __post_init__(self):
        super().__post_init__()
        self.check_settings()


@dataclass
class TokenFeatures(Rows):
    """Mug's text side: (N, L, E) L2-normalised token features and the (N, L) mask of real tokens."""
    tokens: Tensor
    mask: Tensor
    PAD: ClassVar[dict] = {"tokens": 0.0, "mask": False}


@dataclass
class FrameFeatures(Rows):
    """Mug's video side: (N, T, E) L2-normalised frame features and the (N, T) mask of real frames."""
    frames: Tensor
    valid: Tensor


def aux_captions_of(record: dict, aux_field: str, max_aux: int) -> list[str]:
    """The record's auxiliary captions (a string or a list in `aux_field`), at most `max_aux`; [] if none."""
    value = record.get(aux_field)
    if value is None:
        return []
    caps = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    return [c for c in caps if c.strip()][:max_aux]


class M2RAAPModel(VideoCLIP):
    """A `VideoCLIP` with M2-RAAP's feature enhancement: the ACG head fuses auxiliary-caption embeddings into
    the frame features, and the Mug head scores texts against videos token by frame (or the pooled cosine).

    Args:
        cfg: an `M2RAAPConfig`.
        base, temporal: existing modules to use, as for `VideoCLIP` (see `from_video_model`).
    """

    config_class = M2RAAPConfig

    def __init__(self, cfg: M2RAAPConfig, base: nn.Module | None = None, temporal: nn.Module | None = None):
        super().__init__(cfg, base, temporal)
        self.acg = ACGFusion(self.config.embed_dim, cfg.acg_level) if cfg.acg else None

    # ---- features ---------------------------------------------------------------------------------------
    def aux_ids(self, captions: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Token ids (B, K, L) and mask (B, K) of each video's auxiliary captions (K = the most of any video)."""
        K = max(1, max(len(c) for c in captions))
        ids = self.tokenize([c[k] if k < len(c) else "" for c in captions for k in range(K)])   # (B*K, L)
        mask = torch.tensor([[k < len(c) for k in range(K)] for c in captions], device=ids.device)
        return ids.view(len(captions), K, -1), mask

    def encode_aux(self, aux_ids: Tensor, aux_mask: Tensor) -> Tensor:
        """(B, K, L) aux-caption ids -> (B, K, E) normalised text embeddings (no gradient; padding rows zero)."""
        B, K, L = aux_ids.shape
        ids = trim_padding(aux_ids.reshape(B * K, L), self.config.text.pad_token_id)
        with torch.no_grad():
            emb = self.encode_text(ids).view(B, K, -1)                                 # (B, K, E)
        return emb * aux_mask[..., None].to(emb.dtype)

    def fused_frames(self, frames: Tensor, valid: Tensor | None = None, aux_ids: Tensor | None = None,
                     aux_mask: Tensor | None = None) -> Tensor:
        """(B, T, E) frame features (unnormalised), ACG-fused when the head is on and aux ids are given."""
        x = self.encode_frames(frames, valid)                                          # (B, T, E)
        if self.acg is not None and aux_ids is not None:
            x = self.acg(x, self.encode_aux(aux_ids, aux_mask), aux_mask)
        return x

    def video_features(self, frames: Tensor, valid: Tensor | None = None, records: list[dict] | None = None):
        """Pooled embeddings (B, E), or `FrameFeatures` for Mug; ACG reads each record's `aux_field`."""
        aux_ids = aux_mask = None
        if self.acg is not None and records is not None:
            aux_ids, aux_mask = self.aux_ids([aux_captions_of(r, self.config.aux_field, self.config.max_aux)
                                              for r in records])
        x = self.fused_frames(frames, valid, aux_ids, aux_mask)                        # (B, T, E)
        if self.config.similarity == "mug":
            if valid is None:
                valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            return FrameFeatures(F.normalize(x, dim=-1), valid.bool())
        return pool_frames(self, x, valid)

    def text_features(self, texts: list[str]):
        """Pooled embeddings (N, E), or `TokenFeatures` for Mug."""
        ids = self.tokenize(texts)
        if self.config.similarity == "mug":
            return TokenFeatures(*text_token_features(self, ids))
        return self.encode_text(ids)

    def similarity(self, text, video, pairs: bool = False) -> Tensor:
        """Mug scores (or cosines) of texts against videos: (N_t, N_v), or (N_t,) for aligned `pairs`."""
        if self.config.similarity != "mug":
            return super().similarity(text, video, pairs)
        c = self.config
        if not pairs:
            return mug_similarity(text.tokens, text.mask, video.frames, video.valid, tau=c.mug_tau,
                                  block_size=c.mug_block)
        b = c.mug_block
        return torch.cat([mug_similarity(text.tokens[i:i + b], text.mask[i:i + b], video.frames[i:i + b],
                                         video.valid[i:i + b], tau=c.mug_tau, block_size=b).diagonal()
                          for i in range(0, len(text), b)])

    def retrieval_counts(self, records: list[dict]) -> dict:
        """`num_without_aux`: evaluated videos without an auxiliary caption (only with the ACG head)."""
        if self.acg is None:
            return {}
        c = self.config
        return {"num_without_aux": sum(not aux_captions_of(r, c.aux_field, c.max_aux) for r in records)}


def from_legacy_folder(directory, video: VideoCLIP) -> M2RAAPModel:
    """An M2-RAAP model folder written before M2-RAAP models were one family (a video model's files plus
    ``m2raap.json`` and, with ACG, ``m2raap_heads.safetensors``), as an `M2RAAPModel` (eval mode).

    Args:
        directory: the folder.
        video: its video model, already loaded from the folder's config.json and model.safetensors.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    directory = Path(directory)
    cfg_file = directory / "m2raap.json"
    try:
        section = json.loads(cfg_file.read_text(encoding="utf-8"))
        settings = {f.name: section[f.name] for f in fields(M2RAAPSettings) if f.name in section}
        model = M2RAAPModel.from_video_model(video, **settings)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{cfg_file}: not a readable M2-RAAP config ({type(e).__name__}: {e}); re-save the model "
                          f"with `polymodal train` (method: m2raap)") from None
    if model.acg is not None:
        heads = directory / "m2raap_heads.safetensors"
        try:
            model.acg.load_state_dict(load_file(str(heads)))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{heads}: the ACG head cannot be read ({type(e).__name__}); re-save the model with "
                              f"`polymodal train` (method: m2raap)") from None
    return model.eval()


__all__ = ["text_token_features", "mug_similarity", "mug_loss", "ACGFusion", "pool_frames", "ACG_LEVELS",
           "M2RAAPConfig", "M2RAAPSettings", "M2RAAPModel", "TokenFeatures", "FrameFeatures", "aux_captions_of", "SIMILARITIES",
           "from_legacy_folder"]
