"""SNP-S3's video-text model: one BERT-type network for the text pass and the cross-modal pass.

The shared network (`BertStack`: word, position and token-type embeddings, an embedding LayerNorm and
post-LN blocks of `layers.Transformer`) runs twice with the same weights:

* text pass: `[CLS] text [SEP]` (token type 0, positions from 0) -> token states; CLS -> text pooler (BERT's
  Linear-Tanh) -> level-1 text feature normalize(pooled), as in the authors' release (`text_head: mlp` adds a
  Linear-ReLU-Linear head before the normalisation, an option of ours).
* cross pass: the joint sequence `[CLS text SEP ; clip_1 .. clip_n ; SEP]`. The visual part goes through
  the same embedding layer as `inputs_embeds` (the clip vectors, then the SEP word embedding), with token
  type 1 and its own positions from 0, and the whole stack is run again from the embeddings. A separate
  pooler (`cross_pooler`) reads the joint CLS.

Visual tokens: one per clip, the mean over the clip's frames and the frames' ViT grid (patch) features;
`frames_per_clip` frames make a clip. Level-1 clip features are normalize(MLP(mean)); the cross tokens
use the raw means (through a linear map only when the ViT and text widths differ). Level 1 is scored per clip:
a text against a video is logsumexp over the video's clips of the text-clip cosines (`video_score: logsumexp`, the
release's test-time reduction), or the cosine with the normalised mean clip feature (`video_score: mean`).

`shared=False` gives the three-encoder baseline: a second `BertStack` for the cross pass.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PolymodalModel
from .features import Rows
from .layers import Transformer, init_transformer_
from .vision import VisionConfig, VisionTower


@dataclass
class BertConfig:
    """The shared BERT-type network."""
    vocab_size: int = 30522
    context_length: int = 30      # text tokens incl. CLS/SEP (SNP-S3: 30)
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-12
    type_vocab_size: int = 2      # 0 = text, 1 = visual
    max_visual_tokens: int = 33   # clips + the closing SEP (positions of the visual part start at 0)
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4


@dataclass
class FusionConfig:
    """SNP-S3 model config: `vision` (ViT), `text` (the BERT network) and the fusion switches."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: BertConfig = field(default_factory=BertConfig)
    shared: bool = True            # False = three-encoder baseline (separate cross encoder)
    frames_per_clip: int = 1       # frames averaged into one visual token
    head_dropout: float = 0.1      # dropout in the level-2 score MLP
    pool: str = "cls"              # what the text pooler reads: "cls" (BERT, the authors) | "mean" (of real tokens)
    cross_pool: str = ""           # what the cross pooler reads: "cls" | "mean"; "" = as `pool`
    text_head: str = "none"        # level-1 text feature: "none" = normalize(pooler(CLS)) (authors) | "mlp" (+ an MLP)
    video_score: str = "logsumexp" # text-video level-1 score: "logsumexp" over clips (authors) | "mean" clip feature
    significant_words: dict = field(default_factory=dict)   # the run's significant-word list (masking.SignificantWords)
    model_type: str = "snps3"

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = BertConfig(**self.text)
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.cross_pool not in ("", "cls", "mean"):
            raise ValueError(f"cross_pool must be 'cls', 'mean' or '' (as pool), got {self.cross_pool!r}")
        if self.text_head not in ("none", "mlp"):
            raise ValueError(f"text_head must be 'none' or 'mlp', got {self.text_head!r}")
        if self.video_score not in ("logsumexp", "mean"):
            raise ValueError(f"video_score must be 'logsumexp' or 'mean', got {self.video_score!r}")
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")

    def to_dict(self) -> dict:
        return asdict(self)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        W = cfg.width
        self.word = nn.Embedding(cfg.vocab_size, W)
        self.pos = nn.Embedding(max(cfg.context_length, cfg.max_visual_tokens), W)
        self.token_type = nn.Embedding(cfg.type_vocab_size, W)
        self.norm = nn.LayerNorm(W, eps=cfg.norm_eps)
        for e in (self.word, self.pos, self.token_type):
            nn.init.normal_(e.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the word, position and token-type embedding tables."""
        return {"word.weight", "pos.weight", "token_type.weight"}

    def forward(self, ids: Tensor | None = None, inputs_embeds: Tensor | None = None, token_type: int = 0) -> Tensor:
        """ids (B, L) or inputs_embeds (B, L, W) -> (B, L, W); positions 0..L-1, one token type for the row."""
        x = self.word(ids) if inputs_embeds is None else inputs_embeds                    # (B, L, W)
        L = x.shape[1]
        pos = torch.arange(L, device=x.device)
        typ = torch.full((L,), token_type, dtype=torch.long, device=x.device)
        return self.norm(x + self.pos(pos) + self.token_type(typ))


class BertStack(nn.Module):
    """Embeddings + post-LN transformer (BERT)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act,
                                       norm_first=False, eps=cfg.norm_eps)
        init_transformer_(self.transformer, cfg.width, cfg.layers)

    def encode(self, x: Tensor, real: Tensor) -> Tensor:
        """Embedded (B, L, W) with key mask real (B, L) -> states (B, L, W)."""
        return self.transformer(x, attn_mask=real[:, None, None, :])


@torch.no_grad()
def attention_importance(stack: BertStack, ids: Tensor, real: Tensor) -> Tensor:
    """Attention mass each token receives in a text pass, summed over layers, heads and real queries.

    The stack's attention runs through `scaled_dot_product_attention`, which returns no weights, so the weights
    are computed here from each block's own qkv projection on the same inputs (post-LN: a block attends over its
    input). Used by SNP-S3's attention-guided re-masking.

    Args:
        stack: the text network.
        ids: (B, L) token ids.
        real: (B, L) True at non-padding tokens.
    Returns:
        (B, L) attention mass (0 at padding).
    """
    x = stack.embeddings(ids, token_type=0)                                               # (B, L, W)
    mask = real[:, None, None, :]                                                         # (B, 1, 1, L)
    B, L, D = x.shape
    mass = x.new_zeros(B, L)
    for block in stack.transformer.blocks:
        H = block.attn.heads
        q, k, _ = block.attn.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)       # 3 x (B, H, L, Dh)
        att = (q @ k.transpose(-1, -2)) * (D // H) ** -0.5                                # (B, H, L, L)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1) * real[:, None, :, None]  # real queries only
        mass += att.sum(dim=(1, 2))                                                       # (B, L): mass per key
        x = block(x, mask)
    return mass * real


def _pooler(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def _mlp(width: int, hidden: int, out: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))


class MLMHead(nn.Module):
    """BERT's prediction head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor, word_weight: Tensor) -> Tensor:
        """(..., W) states and the (V, W) word embedding (the tied decoder) -> (..., V) logits."""
        return F.linear(self.norm(F.gelu(self.dense(h))), word_weight, self.bias)


@dataclass
class TextPass:
    """tokens: (B, L, W) states; real: (B, L) key mask; feature: (B, W) normalised level-1 text feature."""
    tokens: Tensor
    real: Tensor
    feature: Tensor


@dataclass
class VideoPass:
    """means: (B, n, Wv) clip means; valid: (B, n); clips: (B, n, W) normalised level-1 clip features;
    video: (B, W) normalised mean of the valid clip features (the dual-encoder video embedding)."""
    means: Tensor
    valid: Tensor
    clips: Tensor
    video: Tensor


@dataclass
class SNPS3VideoFeatures(Rows):
    """Retrieval's video side: the `VideoPass` of each video (video (N, W), means (N, n, Wv), valid, clips)."""
    video: Tensor
    means: Tensor
    valid: Tensor
    clips: Tensor


@dataclass
class SNPS3TextFeatures(Rows):
    """Retrieval's text side: level-1 features (N, W), token states (N, L, W) and ids (N, L), L = the context."""
    feature: Tensor
    tokens: Tensor
    ids: Tensor


class SNPS3Model(PolymodalModel):
    """ViT + the shared BERT network + heads (level 1, cross pooler, level-2 score, ITM, MLM).

    The config also carries the run's significant-word list, so a saved model knows its masking rule
    (`masking_rule`) wherever it is evaluated.

    Args:
        cfg: the model config.
    """

    config_class = FusionConfig

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.config = cfg
        self._rule = None
        t, W = cfg.text, cfg.text.width
        self.vision = VisionTower(cfg.vision)
        self.text_encoder = BertStack(t)
        # With shared weights the cross pass reuses `text_encoder`; it is not registered twice (a second
        # name for the same tensors would break safetensors and double-count parameters).
        self.cross_only = None if cfg.shared else BertStack(t)
        self.text_pooler = _pooler(W)
        self.cross_pooler = _pooler(W)
        self.text_head = _mlp(W, W, W) if cfg.text_head == "mlp" else nn.Identity()
        self.video_head = _mlp(cfg.vision.width, W, W)
        self.visual_proj = nn.Identity() if cfg.vision.width == W else nn.Linear(cfg.vision.width, W)
        # Level 2: dropout on the pooled output, then 768 -> 1536 -> 1 in the paper (the release's order).
        self.score_head = nn.Sequential(nn.Dropout(cfg.head_dropout), _mlp(W, 2 * W, 1))
        self.itm_head = nn.Linear(W, 2)
        self.mlm_head = MLMHead(t)

    @property
    def cross_encoder(self) -> BertStack:
        """The network of the cross pass: `text_encoder` itself when shared."""
        return self.text_encoder if self.cross_only is None else self.cross_only

    # ---- passes -------------------------------------------------------------------------------------
    def text_pass(self, ids: Tensor) -> TextPass:
        """(B, L) ids -> token states, mask and the level-1 text feature."""
        real = ids != self.config.text.pad_token_id                                       # (B, L)
        enc = self.text_encoder
        h = enc.encode(enc.embeddings(ids, token_type=0), real)                           # (B, L, W)
        feature = F.normalize(self.text_head(self.text_pooler(self._read(h, real))), dim=-1)  # (B, W)
        return TextPass(tokens=h, real=real, feature=feature)

    def video_pass(self, frames: Tensor, valid: Tensor | None = None) -> VideoPass:
        """(B, T, 3, H, W) frames -> clip means (one per `frames_per_clip` frames) and level-1 features."""
        B, T = frames.shape[:2]
        f = self.config.frames_per_clip
        if T % f:
            raise ValueError(f"{T} frames do not split into clips of frames_per_clip={f}; "
                             f"set data.num_frames to a multiple of {f}")
        n = T // f
        grid = self.vision(frames.flatten(0, 1)).tokens                                    # (B*T, P, Wv)
        per_frame = grid.mean(1).view(B, n, f, -1)                                        # (B, n, f, Wv)
        w = (torch.ones(B, T, device=frames.device) if valid is None else valid.to(per_frame.dtype))
        w = w.view(B, n, f, 1)
        means = (per_frame * w).sum(2) / w.sum(2).clamp_min(1)                            # (B, n, Wv)
        clip_valid = w.sum(2)[..., 0] > 0                                                 # (B, n)
        clips = F.normalize(self.video_head(means), dim=-1)                               # (B, n, W)
        cw = clip_valid.to(clips.dtype)[..., None]
        video = F.normalize((clips * cw).sum(1) / cw.sum(1).clamp_min(1), dim=-1)          # (B, W)
        return VideoPass(means=means, valid=clip_valid, clips=clips, video=video)

    def cross_pass(self, ids: Tensor, means: Tensor, clip_valid: Tensor) -> tuple[Tensor, Tensor]:
        """The joint pass `[CLS text SEP ; clips ; SEP]` over paired rows.

        Args:
            ids: (N, L) text ids (masked or not).
            means: (N, n, Wv) clip means of each row's video.
            clip_valid: (N, n) bool.
        Returns:
            (states (N, L + n + 1, W), cross pooled (N, W)).
        """
        enc, t = self.cross_encoder, self.config.text
        if means.shape[1] + 1 > t.max_visual_tokens:
            raise ValueError(f"{means.shape[1]} clips + SEP exceed text.max_visual_tokens={t.max_visual_tokens}")
        N = len(ids)
        text = enc.embeddings(ids, token_type=0)                                            # (N, L, W)
        sep = enc.embeddings.word.weight[t.sep_token_id].expand(N, 1, -1)                  # (N, 1, W)
        visual = enc.embeddings(inputs_embeds=torch.cat([self.visual_proj(means), sep], 1), token_type=1)
        x = torch.cat([text, visual], dim=1)                                               # (N, L+n+1, W)
        real = torch.cat([ids != t.pad_token_id, clip_valid.bool(), clip_valid.new_ones(N, 1, dtype=torch.bool)], 1)
        h = enc.encode(x, real)
        return h, self.cross_pooler(self._read(h, real, self.config.cross_pool or self.config.pool))

    def _read(self, h: Tensor, real: Tensor, pool: str | None = None) -> Tensor:
        """(B, L, W) states -> (B, W): the CLS state, or the mean over real positions (`pool: mean`).

        From random initialisation the post-LN CLS state barely depends on the other tokens (the block
        outputs are small next to the normalised embedding), which slows tiny from-scratch runs; BERT
        weights avoid this, so "cls" stays the default.

        Args:
            h: (B, L, W) states; real: (B, L) True at real tokens.
            pool: "cls" | "mean"; None = the config's `pool` (the text pass)."""
        if (pool or self.config.pool) == "cls":
            return h[:, 0]
        w = real.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1).clamp_min(1)

    # ---- the dual-encoder interface (eval tasks) ---------------------------------------------------
    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) ids -> (B, W) level-1 text feature (always L2-normalised)."""
        return self.text_pass(ids).feature

    def encode_video(self, frames: Tensor, valid: Tensor | None = None, normalize: bool = True) -> Tensor:
        """(B, T, 3, H, W) -> (B, W) normalised mean of the level-1 clip features."""
        return self.video_pass(frames, valid).video

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, W): an image as a one-frame video."""
        return self.encode_video(pixels[:, None], None)

    # ---- retrieval (one loop: polymodal.eval.video_retrieval) --------------------------------------
    def video_features(self, frames: Tensor, valid: Tensor | None = None, records: list[dict] | None = None
                       ) -> SNPS3VideoFeatures:
        """The video pass of a batch (the dual-encoder embedding and what re-ranking and word retrieval read)."""
        vp = self.video_pass(frames, valid)
        return SNPS3VideoFeatures(vp.video, vp.means, vp.valid, vp.clips)

    def text_features(self, texts: list[str]) -> SNPS3TextFeatures:
        """The text pass of captions; ids and token states padded to the tokenizer's context length."""
        from ..data.text import trim_padding
        ids = self.tokenizer(list(texts)).to(next(self.parameters()).device)               # (N, L)
        tp = self.text_pass(trim_padding(ids, self.config.text.pad_token_id))
        tokens = F.pad(tp.tokens, (0, 0, 0, ids.shape[1] - tp.tokens.shape[1]))           # (N, L, W)
        return SNPS3TextFeatures(tp.feature, tokens, ids)

    def similarity(self, text: SNPS3TextFeatures, video: SNPS3VideoFeatures, pairs: bool = False) -> Tensor:
        """Level-1 (dual-encoder) scores: (N_t, N_v), or (N,) for aligned `pairs`.

        `video_score: logsumexp` (the release's test-time reduction): logsumexp over a video's valid clips of the
        text-clip cosines; `mean`: the cosine with the normalised mean clip feature (`video.video`)."""
        if self.config.video_score == "mean":
            return (text.feature * video.video).sum(-1) if pairs else text.feature @ video.video.T
        if pairs:
            s = torch.einsum("nw,ncw->nc", text.feature, video.clips)                          # (N, n)
            return s.masked_fill(~video.valid, float("-inf")).logsumexp(-1)
        s = torch.einsum("tw,vcw->tvc", text.feature, video.clips)                             # (N_t, N_v, n)
        return s.masked_fill(~video.valid[None], float("-inf")).logsumexp(-1)

    @property
    def masking_rule(self):
        """The `MaskingRule` of the attached tokenizer and the config's significant words (None without them)."""
        if not self.config.significant_words or self.tokenizer is None:
            return None
        if self._rule is None or self._rule[0] is not self.tokenizer:
            from ..data.masking import SignificantWords, masking_rule
            words = SignificantWords.from_dict(self.config.significant_words, "config.json significant_words")
            self._rule = (self.tokenizer, masking_rule(self.tokenizer, words))
        return self._rule[1]

    def mlm_logits(self, h: Tensor) -> Tensor:
        """(..., W) cross-pass states -> (..., V) logits (decoder tied to the cross network's word embeddings)."""
        return self.mlm_head(h, self.cross_encoder.embeddings.word.weight)

    def text_mlm_logits(self, h: Tensor) -> Tensor:
        """(..., W) text-pass states -> (..., V) logits (the same head, decoder tied to the text network's words)."""
        return self.mlm_head(h, self.text_encoder.embeddings.word.weight)

    def cross_score(self, ids: Tensor, means: Tensor, clip_valid: Tensor) -> Tensor:
        """(N,) level-2 scores of paired rows."""
        return self.score_head(self.cross_pass(ids, means, clip_valid)[1])[:, 0]

    # ---- question answering (read by polymodal.models.vqa.VQAModel) ---------------------------------
    qa_ordered = True    # the cross pass gives the visual tokens positions: frame order needs no extra embedding

    @property
    def qa_width(self) -> int:
        """Width of the pooled output `qa_fuse` returns: the BERT network's."""
        return self.config.text.width

    def qa_check(self, num_frames: int, motion: bool) -> None:
        """Whether a VQA head can read this model for `num_frames` frames (0 = images) and difference images.

        Raises:
            ValueError: images, frames that do not split into clips, or more visual tokens than the cross pass
                has positions for (one line naming the setting to change).
        """
        f, limit = self.config.frames_per_clip, self.config.text.max_visual_tokens
        if num_frames == 0:
            raise ValueError("VQAModel: SNP-S3's cross encoder reads videos (clip tokens), not images; set "
                             "vqa.media: video and data.num_frames")
        if num_frames % f:
            raise ValueError(f"VQAModel: data.num_frames={num_frames} does not split into the SNP-S3 base's clips of "
                             f"frames_per_clip={f}; set data.num_frames to a multiple of {f}")
        if motion and f != 1:
            raise ValueError(f"VQAModel: vqa.motion needs an SNP-S3 base with frames_per_clip 1 (one token per "
                             f"difference image), this one has {f}; set vqa.motion: false")
        tokens = num_frames // f + (num_frames - 1 if motion else 0) + 1        # clips (+ differences) + SEP
        if tokens > limit:
            raise ValueError(f"VQAModel: data.num_frames={num_frames}{' with vqa.motion' if motion else ''} gives "
                             f"{tokens} visual tokens (with SEP), over the SNP-S3 base's text.max_visual_tokens="
                             f"{limit}; lower data.num_frames{' or set vqa.motion: false' if motion else ''}")

    def qa_visual_tokens(self, frames: Tensor) -> Tensor:
        """The cross pass's visual tokens: (B, T, 3, H, W) -> (B, n, 1, Wv), one clip mean per clip."""
        return self.video_pass(frames).means[:, :, None]

    def qa_fuse(self, ids: Tensor, tokens: Tensor) -> Tensor:
        """The multimodal pooled output: the cross pass `[CLS question SEP ; tokens ; SEP]` over (B, L) question
        ids and (B, S, Wv) visual tokens, read by `cross_pooler` -> (B, W)."""
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)        # (B, S)
        return self.cross_pass(ids, tokens, valid)[1]

    def parameter_counts(self) -> dict:
        """Parameters of this model and of the other design (shared <-> three-encoder), each counted once."""
        total = sum(p.numel() for p in self.parameters())
        stack = sum(p.numel() for p in self.text_encoder.parameters())
        if self.config.shared:
            return {"shared": total, "three_encoder": total + stack}
        return {"shared": total - stack, "three_encoder": total}


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (same structure)."""
    for t, p in zip(target.parameters(), source.parameters()):
        t.mul_(momentum).add_(p.detach(), alpha=1 - momentum)


class MomentumEncoders(nn.Module):
    """Frozen EMA copies of the level-1 encoders (MoCo keys): ViT, video head, text network, pooler, head."""

    PARTS = ("vision", "video_head", "text_encoder", "text_pooler", "text_head")
    _read = SNPS3Model._read                     # the passes below are SNPS3Model's, run on these copies

    def __init__(self, model: SNPS3Model):
        super().__init__()
        for name in self.PARTS:
            part = copy.deepcopy(getattr(model, name))
            for p in part.parameters():
                p.requires_grad_(False)
            setattr(self, name, part)
        self.config = model.config

    @torch.no_grad()
    def update(self, model: SNPS3Model, momentum: float) -> None:
        """EMA step towards the online model's parts."""
        for name in self.PARTS:
            momentum_update(getattr(self, name), getattr(model, name), momentum)

    @torch.no_grad()
    def keys(self, ids: Tensor, frames: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(text keys (B, W), clip keys (B, n, W), clip valid (B, n)), L2-normalised, computed as `SNPS3Model`
        computes the level-1 features."""
        vp = SNPS3Model.video_pass(self, frames, valid)
        return SNPS3Model.text_pass(self, ids).feature, vp.clips, vp.valid


def create_snps3_model(cfg: FusionConfig | dict, tokenizer=None) -> SNPS3Model:
    """Build the model; the tokenizer (a BERT-style one with [MASK]) sets vocabulary size and special ids."""
    cfg = cfg if isinstance(cfg, FusionConfig) else FusionConfig(**cfg)
    if tokenizer is not None:
        if getattr(tokenizer, "mask_id", None) is None:
            raise ValueError("SNP-S3 needs a tokenizer with a [MASK] token: set tokenizer.kind=wordpiece "
                             "(BERT style [PAD]/[UNK]/[CLS]/[SEP]/[MASK]) or give tokenizer.path to one")
        t = cfg.text
        t.vocab_size, t.pad_token_id = tokenizer.vocab_size, tokenizer.pad_id
        t.cls_token_id, t.sep_token_id, t.mask_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id
    model = SNPS3Model(cfg)
    if tokenizer is not None:
        model.attach_processors(tokenizer)
    return model


__all__ = ["BertConfig", "FusionConfig", "BertStack", "SNPS3Model", "MomentumEncoders", "create_snps3_model",
           "TextPass", "VideoPass", "SNPS3VideoFeatures", "SNPS3TextFeatures"]

