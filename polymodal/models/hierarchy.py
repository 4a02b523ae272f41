"""SHE-Net's hierarchical text-video similarity over a `VideoCLIP` (no parameters of its own), and the
`SHENetModel` family: a VideoCLIP whose config carries the hierarchy, so a saved SHE-Net model scores
retrieval with it (`similarity`) wherever it is loaded.

Text side, four levels: the sentence (the tower's EOT/CLS embedding) and the verb, noun and adjective nodes
of the caption's parse (`polymodal.data.syntax`), each node the mean of its tokens' final text-tower states,
projected into the joint space. Video side, three levels: the video (the temporal module's embedding), its
frames (the per-frame embeddings) and the patches of each frame (the image tower's patch tokens through the
same projection). All features are L2-normalised, so every score below is a cosine.

For a text n and a video m (frames t, patches p; only valid frames take part):

- verb k:  a_t = softmax_t(<v_k, f_t> / tau),  s_verb_k = sum_t a_t <v_k, f_t>
- noun k:  b_tp = softmax_p(<u_k, x_tp> / tau),  per frame r_t = sum_p b_tp <u_k, x_tp>,
           s_noun_k = sum_t w_t r_t, where w is the frame attention of the verb the noun attaches to
           (`noun_frames="verb"`, the syntax tree guiding where to look) or uniform over the valid frames
           (`"mean"`, and always for a noun without a verb)
- adjective: as a noun, with the frame weights of the noun it attaches to (uniform without one)
- s = s_sentence + l_v mean_k s_verb_k + l_n mean_k s_noun_k + l_a mean_k s_adj_k; a level a caption has no
  node of contributes 0; a weight of 0 skips its level, so all weights 0 give exactly the sentence score.
- `score_norm="weights"` (the default) divides s by 1 + the sum of the weights of the levels the caption has
  nodes of, so s is a weighted mean of cosines (|s| <= 1) on the scale the logit scale was set for; `"sum"`
  keeps the plain sum (up to 1 + l_v + l_n + l_a: logits that much sharper than a cosine model's, a first loss
  above chance and untrained node terms dominating; measured in docs/results.md, SHE-Net). The divisor depends
  on the text only, so text->video rankings are the same either way; training and video->text differ.

Scores need text-video interaction, so retrieval computes them for blocks of texts x videos
(`polymodal.eval.video_retrieval`); memory per block is about ``Nt * Nv * K * T * P`` floats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from .base import ConfigDict
from .features import Rows
from .video import VideoCLIP, VideoCLIPConfig

KINDS = ("verb", "noun", "adj")
SCORE_NORMS = ("weights", "sum")


@dataclass
class HierarchyConfig(ConfigDict):
    """Weights and temperature of the hierarchical similarity."""
    verb_weight: float = 1.0        # l_v: verb -> frame level
    noun_weight: float = 1.0        # l_n: noun -> patch level
    adj_weight: float = 0.0         # l_a: adjective -> patch level (0 = off, the paper's optional level)
    tau: float = 0.1                # attention temperature over cosines
    noun_frames: str = "verb"       # "verb" | "mean": how a noun's per-frame scores are weighted
    score_norm: str = "weights"     # "weights": s / (1 + active level weights), a cosine scale | "sum": plain sum

    def __post_init__(self):
        if self.score_norm not in SCORE_NORMS:
            raise ConfigError(f"shenet.score_norm: {self.score_norm!r} is not one of {', '.join(SCORE_NORMS)}")
        for name in ("verb_weight", "noun_weight", "adj_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"shenet.{name}: {getattr(self, name)} must be >= 0")
        if not self.tau > 0:
            raise ConfigError(f"shenet.tau: {self.tau} must be > 0")
        if self.noun_frames not in ("verb", "mean"):
            raise ConfigError(f"shenet.noun_frames: {self.noun_frames!r} is not one of verb, mean")

    def weight(self, kind: str) -> float:
        return getattr(self, f"{kind}_weight")


@dataclass
class VideoFeatures(Rows):
    """video (N, E), frames (N, T, E), patches (N, T, P, E), all L2-normalised; valid (N, T) bool."""
    video: Tensor
    frames: Tensor
    patches: Tensor
    valid: Tensor


@dataclass
class TextFeatures:
    """sentence (N, E); nodes[kind] (N, K, E) L2-normalised; node_valid[kind] (N, K) bool;
    heads["noun"] (N, Kn) verb index / heads["adj"] (N, Ka) noun index, -1 = none."""
    sentence: Tensor
    nodes: dict
    node_valid: dict
    heads: dict

    def __getitem__(self, s: slice) -> "TextFeatures":
        return TextFeatures(self.sentence[s], {k: v[s] for k, v in self.nodes.items()},
                            {k: v[s] for k, v in self.node_valid.items()}, {k: v[s] for k, v in self.heads.items()})

    def __len__(self) -> int:
        return len(self.sentence)

    def cpu(self) -> "TextFeatures":
        """On the CPU, features as float32."""
        return TextFeatures(self.sentence.float().cpu(), {k: v.float().cpu() for k, v in self.nodes.items()},
                            {k: v.cpu() for k, v in self.node_valid.items()}, {k: v.cpu() for k, v in self.heads.items()})

    @classmethod
    def cat(cls, parts: list["TextFeatures"]) -> "TextFeatures":
        """The texts of `parts` in order; node counts (K) that differ are padded with invalid nodes."""
        def pad(x: Tensor, K: int, value) -> Tensor:
            return F.pad(x, (0, 0) * (x.dim() - 2) + (0, K - x.shape[1]), value=value)
        Ks = {k: max(p.nodes[k].shape[1] for p in parts) for k in parts[0].nodes}
        return cls(torch.cat([p.sentence for p in parts]),
                   {k: torch.cat([pad(p.nodes[k], Ks[k], 0.0) for p in parts]) for k in Ks},
                   {k: torch.cat([pad(p.node_valid[k], Ks[k], False) for p in parts]) for k in Ks},
                   {k: torch.cat([pad(p.heads[k], Ks[k], -1) for p in parts]) for k in parts[0].heads})


@dataclass
class HierarchyScores:
    """total / sentence / verb / noun / adj: (Nt, Nv) scores (a skipped level is None).
    verb_attention (Nt, Nv, Kv, T), noun_attention (Nt, Nv, Kn, T, P), adj_attention (Nt, Nv, Ka, T, P) and
    noun_frame_weights (Nt, Nv, Kn, T) when asked for (`return_attention=True`); for pairs Nv = 1."""
    total: Tensor
    sentence: Tensor
    verb: Tensor | None = None
    noun: Tensor | None = None
    adj: Tensor | None = None
    verb_attention: Tensor | None = None
    noun_attention: Tensor | None = None
    adj_attention: Tensor | None = None
    noun_frame_weights: Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------
def _check_base(model: nn.Module):
    base = getattr(model, "base", model)
    for name in ("visual", "visual_proj", "text", "text_proj"):
        if not hasattr(base, name):
            raise ConfigError(f"SHE-Net needs a CLIP-style model (a ViT `visual` tower with `visual_proj` and a "
                              f"`text` tower with `text_proj`), but the wrapped model is a {type(base).__name__} "
                              f"without `{name}`; use model_type clip (or an imported HF/OpenCLIP CLIP)")
    kind = getattr(getattr(getattr(model, "config", None), "temporal", None), "kind", "mean")
    if kind == "stan":
        raise ConfigError("SHE-Net: temporal.kind='stan' has no per-frame embeddings to attend over; "
                          "use temporal.kind=mean or transformer")
    return base


def encode_video_features(model: nn.Module, frames: Tensor, valid: Tensor | None = None) -> VideoFeatures:
    """Video, frame and patch features from one pass of the image tower.

    Args:
        model: a `VideoCLIP` over a CLIP (temporal kind mean or transformer).
        frames: (B, T, 3, H, W) normalised frames.
        valid: (B, T) bool, True = real frame; None = all real.
    Returns:
        VideoFeatures; `video` equals `model.encode_video(frames, valid)`.
    """
    base = _check_base(model)
    B, T = frames.shape[:2]
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=frames.device)
    out = base.visual(frames.flatten(0, 1))                             # pooled (B*T, W), tokens (B*T, P, W)
    frame = base.visual_proj(out.pooled).view(B, T, -1)                 # (B, T, E)
    video = model.temporal(frame, valid) if hasattr(model, "temporal") else frame.mean(1)   # (B, E)
    patches = base.visual_proj(out.tokens).view(B, T, out.tokens.shape[1], -1)  # (B, T, P, E)
    return VideoFeatures(F.normalize(video, dim=-1), F.normalize(frame, dim=-1), F.normalize(patches, dim=-1),
                         valid.bool())


def encode_text_features(model: nn.Module, ids: Tensor, nodes: dict, attention_mask: Tensor | None = None
                         ) -> TextFeatures:
    """Sentence and node features from one pass of the text tower.

    Args:
        model: a `VideoCLIP` over a CLIP (or the CLIP itself).
        ids: (B, L) token ids.
        nodes: `polymodal.data.syntax.batch_nodes` tensors: `{kind}_tokens` / `{kind}_mask` (B, K, M) positions
            in the tower's token sequence, `noun_head`, `adj_head` (B, K).
        attention_mask: passed to the text tower.
    Returns:
        TextFeatures; `sentence` equals `model.encode_text(ids)`.
    """
    base = _check_base(model)
    out = base.text(ids, attention_mask)                                 # tokens (B, L', W)
    sentence = F.normalize(base.text_proj(out.pooled), dim=-1)           # (B, E)
    feats, valid, heads = {}, {}, {}
    B, Lp, W = out.tokens.shape
    for kind in KINDS:
        pos, mask = nodes[f"{kind}_tokens"], nodes[f"{kind}_mask"]       # (B, K, M)
        if int(pos.max()) >= Lp:
            raise ValueError(f"{kind}_tokens holds position {int(pos.max())} but the text tower gave {Lp} tokens "
                             "(node positions must come from the same tokenizer and context length)")
        K, M = pos.shape[1:]
        tok = torch.gather(out.tokens, 1, pos.reshape(B, K * M, 1).expand(-1, -1, W)).view(B, K, M, W)
        w = mask.to(tok.dtype)[..., None]                                # (B, K, M, 1)
        mean = (tok * w).sum(2) / w.sum(2).clamp_min(1)                  # (B, K, W)
        feats[kind] = F.normalize(base.text_proj(mean), dim=-1)         # (B, K, E)
        valid[kind] = mask.any(-1)                                       # (B, K)
        if kind != "verb":
            heads[kind] = nodes[f"{kind}_head"]
    return TextFeatures(sentence, feats, valid, heads)


# ---------------------------------------------------------------------------------------------------
# Similarity
# ---------------------------------------------------------------------------------------------------
def _masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over `dim` where mask is True; all-False slices give zeros."""
    x = logits.masked_fill(~mask, float("-inf"))
    a = torch.softmax(x, dim=dim)
    return torch.nan_to_num(a, nan=0.0)


def _node_mean(scores: Tensor, valid: Tensor) -> Tensor:
    """(Nt, Nv, K) scores, (Nt, 1, K) valid -> (Nt, Nv) mean over valid nodes (0 without any)."""
    w = valid.to(scores.dtype)
    return (scores * w).sum(-1) / w.sum(-1).clamp_min(1)


def _gather_nodes(x: Tensor, head: Tensor) -> Tensor:
    """x (Nt, Nv, Kh, T), head (Nt, K) indices (>= 0) -> (Nt, Nv, K, T)."""
    Nt, Nv, _, T = x.shape
    idx = head.clamp_min(0)[:, None, :, None].expand(Nt, Nv, head.shape[1], T)
    return torch.gather(x, 2, idx)


def hierarchical_similarity(text: TextFeatures, video: VideoFeatures, cfg: HierarchyConfig, pairs: bool = False,
                            return_attention: bool = False) -> HierarchyScores:
    """SHE-Net scores of texts against videos (module docstring for the formulas).

    Args:
        text: Nt texts' features.
        video: Nv videos' features.
        cfg: level weights, temperature, noun frame weighting.
        pairs: score text i with video i only (Nt == Nv); the outputs then have Nv = 1.
        return_attention: also return the attention maps.
    Returns:
        HierarchyScores with `total` (Nt, Nv) (or (N, 1) for pairs).
    """
    if pairs and len(text) != len(video):
        raise ValueError(f"pairs=True needs as many texts as videos, got {len(text)} and {len(video)}")
    if pairs:
        sentence = (text.sentence * video.video).sum(-1, keepdim=True)                   # (N, 1)
        fvalid = video.valid[:, None, None, :]                                           # (N, 1, 1, T)
    else:
        sentence = text.sentence @ video.video.T                                         # (Nt, Nv)
        fvalid = video.valid[None, :, None, :]                                           # (1, Nv, 1, T)
    out = HierarchyScores(total=sentence, sentence=sentence)
    need_verb = cfg.verb_weight > 0 or (cfg.noun_frames == "verb" and (cfg.noun_weight > 0 or cfg.adj_weight > 0))
    need_verb = need_verb or return_attention
    total = sentence
    verb_att = None
    divisor = torch.ones(len(text), dtype=sentence.dtype, device=sentence.device)          # (Nt,)
    if need_verb:
        v = text.nodes["verb"]                                                           # (Nt, Kv, E)
        eq = "nke,nte->nkt" if pairs else "nke,mte->nmkt"
        logits = torch.einsum(eq, v, video.frames)                                       # (Nt, Nv, Kv, T)
        if pairs:
            logits = logits[:, None]
        verb_att = _masked_softmax(logits / cfg.tau, fvalid, -1)                         # (Nt, Nv, Kv, T)
        per_node = (verb_att * logits).sum(-1)                                           # (Nt, Nv, Kv)
        out.verb = _node_mean(per_node, text.node_valid["verb"][:, None])
        if cfg.verb_weight > 0:
            total = total + cfg.verb_weight * out.verb
            divisor = divisor + cfg.verb_weight * text.node_valid["verb"].any(-1).to(divisor.dtype)
        if return_attention:
            out.verb_attention = verb_att
    uniform = fvalid.to(sentence.dtype) / fvalid.sum(-1, keepdim=True).clamp_min(1)      # (., ., 1, T)
    noun_w = None
    for kind in ("noun", "adj"):
        if cfg.weight(kind) <= 0 and not (return_attention and kind == "noun"):
            continue
        u = text.nodes[kind]                                                             # (Nt, K, E)
        eq = "nke,ntpe->nktp" if pairs else "nke,mtpe->nmktp"
        logits = torch.einsum(eq, u, video.patches)                                      # (Nt, Nv, K, T, P)
        if pairs:
            logits = logits[:, None]
        att = torch.softmax(logits / cfg.tau, dim=-1)                                    # over the patches of a frame
        per_frame = (att * logits).sum(-1)                                               # (Nt, Nv, K, T)
        head = text.heads[kind]                                                          # (Nt, K)
        has_head = (head >= 0)[:, None, :, None]                                         # (Nt, 1, K, 1)
        base_w = uniform.expand(per_frame.shape)
        if kind == "noun":
            if cfg.noun_frames == "verb" and verb_att is not None:
                w = torch.where(has_head, _gather_nodes(verb_att, head), base_w)
            else:
                w = base_w
            noun_w = w
        else:
            w = base_w if noun_w is None else torch.where(has_head, _gather_nodes(noun_w, head), base_w)
        w = w * fvalid                                                                   # never a padded frame
        score = _node_mean((w * per_frame).sum(-1), text.node_valid[kind][:, None])      # (Nt, Nv)
        setattr(out, kind, score)
        if cfg.weight(kind) > 0:
            total = total + cfg.weight(kind) * score
            divisor = divisor + cfg.weight(kind) * text.node_valid[kind].any(-1).to(divisor.dtype)
        if return_attention:
            setattr(out, f"{kind}_attention", att)
            if kind == "noun":
                out.noun_frame_weights = w
    # "weights": a weighted mean of the levels the text has (every score a cosine, so |total| <= 1).
    out.total = total / divisor[:, None] if cfg.score_norm == "weights" else total          # (Nt, Nv)
    return out


def hierarchical_infonce(scores: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE on a (B, B) text x video score matrix (diagonal = matching pairs).

    Args:
        scores: (B, B) SHE-Net similarities, row = text, column = video.
        scale: the exp'ed logit scale.
    Returns:
        Scalar loss: mean of the text->video and video->text cross entropies.
    """
    logits = scale * scores                                                              # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------------------------------
# Attention hit rates
# ---------------------------------------------------------------------------------------------------
def attention_hit(attention: Tensor, target: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Share of attention on the target units, and the share a uniform attention would put there.

    Args:
        attention: (..., U) weights summing to 1 over the valid units.
        target: (..., U) bool, the ground-truth units (action frames, the object's patches).
        valid: (..., U) bool units that exist (padded frames are not); None = all.
    Returns:
        (hit, uniform), each (...): sum of attention over target units, and |target & valid| / |valid|.
    """
    target = target.bool()
    valid = torch.ones_like(target) if valid is None else valid.bool()
    t = (target & valid).to(attention.dtype)
    hit = (attention * t).sum(-1)
    uniform = t.sum(-1) / valid.to(attention.dtype).sum(-1).clamp_min(1)
    return hit, uniform


def patch_box_mask(box, grid: tuple[int, int], patch: int, scale: float = 1.0) -> Tensor:
    """(gh * gw,) bool, row-major: the patches that overlap a box.

    Args:
        box: [x0, y0, x1, y1] in source pixels (x1, y1 exclusive).
        grid: (gh, gw) patches.
        patch: patch side in model pixels.
        scale: model pixels per source pixel.
    """
    gh, gw = grid
    x0, y0, x1, y1 = (float(c) * scale for c in box)
    cols = torch.arange(gw, dtype=torch.float64) * patch
    rows = torch.arange(gh, dtype=torch.float64) * patch
    in_x = (cols < x1) & (cols + patch > x0)                                          # (gw,)
    in_y = (rows < y1) & (rows + patch > y0)                                          # (gh,)
    return (in_y[:, None] & in_x[None, :]).flatten()


# ---------------------------------------------------------------------------------------------------
# The model family
# ---------------------------------------------------------------------------------------------------
@dataclass
class SHENetSettings:
    """What a SHE-Net model carries beside its video model (the recipe's `shenet:` section sets them)."""
    verb_weight: float = 1.0        # l_v
    noun_weight: float = 1.0        # l_n
    adj_weight: float = 0.0         # l_a (0 = adjective level off)
    tau: float = 0.1                # attention temperature
    noun_frames: str = "verb"       # "verb": a noun's frames weighted by its verb's attention | "mean"
    score_norm: str = "weights"     # "weights": total / (1 + weights of the levels a caption has) | "sum" (unnormalised)
    max_nodes: int = 4              # nodes kept per kind and caption (first in caption order)
    max_node_tokens: int = 8        # tokens kept per node

    def check_settings(self) -> None:
        """Raise ConfigError for a bad value (naming `shenet.<key>`)."""
        self.hierarchy()
        if self.max_nodes < 1 or self.max_node_tokens < 1:
            raise ConfigError(f"shenet.max_nodes ({self.max_nodes}) and shenet.max_node_tokens "
                              f"({self.max_node_tokens}) must be >= 1")

    def settings(self) -> dict:
        """The settings as a dict (the keys `SHENetModel.from_video_model` takes)."""
        from dataclasses import fields
        return {f.name: getattr(self, f.name) for f in fields(SHENetSettings)}

    def hierarchy(self) -> HierarchyConfig:
        """The similarity's weights and temperature."""
        return HierarchyConfig(self.verb_weight, self.noun_weight, self.adj_weight, self.tau, self.noun_frames,
                               self.score_norm)


@dataclass
class SHENetConfig(VideoCLIPConfig, SHENetSettings):
    """A video model (`VideoCLIPConfig`) with SHE-Net's settings: what a saved SHE-Net model's config.json holds."""
    model_type: str = "shenet"

    def __post_init__(self):
        super().__post_init__()
        if self.temporal.kind == "stan":
            raise ConfigError("shenet.temporal.kind: 'stan' has no per-frame embeddings to attend over; "
                              "use mean or transformer")
        self.check_settings()


class SHENetModel(VideoCLIP):
    """A `VideoCLIP` over a CLIP whose retrieval similarity is SHE-Net's syntax hierarchy.

    Captions are parsed (spaCy, `polymodal.data.syntax`) when their features are asked for; `parses` (caption ->
    parse) holds the parses known so far, and callers with a parse cache (training, the `shenet_retrieval`
    task) fill it first. It is not saved.

    Args:
        cfg: an `SHENetConfig`.
        base, temporal: existing modules, as for `VideoCLIP` (see `from_video_model`).
    """

    config_class = SHENetConfig

    def __init__(self, cfg: SHENetConfig, base: nn.Module | None = None, temporal: nn.Module | None = None):
        super().__init__(cfg, base, temporal)
        _check_base(self)
        self.parses: dict = {}
        self._parser = None

    def node_batch(self, texts: list[str], length: int | None = None) -> dict:
        """`polymodal.data.syntax.batch_nodes` tensors of `texts` (parsed now when not in `parses`)."""
        from ..data.syntax import SpacyParser, batch_nodes, readout_shift
        missing = list(dict.fromkeys(t for t in texts if t not in self.parses))
        if missing:
            self._parser = self._parser or SpacyParser()
            self.parses.update(zip(missing, self._parser(missing)))
        tok, c = self.tokenizer, self.config
        return batch_nodes(tok, list(texts), [self.parses[t] for t in texts], length or tok.context_length,
                           readout_shift(c.text), {k: c.max_nodes for k in KINDS}, c.max_node_tokens)

    def video_features(self, frames: Tensor, valid: Tensor | None = None, records: list[dict] | None = None
                       ) -> VideoFeatures:
        """Video, frame and patch features (`encode_video_features`)."""
        return encode_video_features(self, frames, valid)

    def text_features(self, texts: list[str]) -> TextFeatures:
        """Sentence and node features (`encode_text_features`) of captions."""
        ids = self.tokenize(texts)
        nodes = self.node_batch(texts, self.tokenizer.context_length)
        return encode_text_features(self, ids, {k: v.to(ids.device) for k, v in nodes.items()})

    def similarity(self, text: TextFeatures, video: VideoFeatures, pairs: bool = False) -> Tensor:
        """The hierarchy's total score: (N_t, N_v), or (N,) for aligned `pairs`."""
        total = hierarchical_similarity(text, video, self.config.hierarchy(), pairs=pairs).total
        return total[:, 0] if pairs else total
