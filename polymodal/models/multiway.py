"""Multiway transformer (BEiT-3 style) and the M2-Encoder dual encoder built from it.

A *multiway* layer runs one self-attention over all tokens, but every token goes through the
LayerNorms, q/k/v and output projections and the FFN of its own modality's *branch*: images use
the `vision` branch, texts the `text` branch. `split` says how many leading tokens are vision tokens
(the rest are text), so a mixed image+text sequence works too.

M2-Encoder (arXiv 2401.15896) stacks two such encoders:

* stage 1 (`layers` multiway layers) is a dual encoder: an image pass uses the vision branch of
  every layer, a text pass the text branch (separate forward passes, never mixed);
* stage 2 (`vl_layers`, 3 in the paper) has one `shared` branch that images and texts both use.
  In the released model these are BEiT-3 multiway layers run with every token routed to branch A,
  so their B copies are never used; we keep only the used copy.

Retrieval uses the stage-2 CLS features, projected (no bias) and L2-normalised.
The layers are pre-LN with "sub-LN" (Magneto): an extra LayerNorm before the attention output
projection and one on the FFN hidden state before `fc2` (torchscale's default, `sub_ln`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_LOGIT_SCALE, ConfigDict, PolymodalModel
from .clip import CLIPOutput
from .layers import activation, grid_size, interpolate_positions

VISION, TEXT, SHARED = "vision", "text", "shared"


@dataclass
class M2VisionConfig:
    image_size: int = 224
    patch_size: int = 16


@dataclass
class M2TextConfig:
    vocab_size: int = 115244      # the released bilingual (GLM sentencepiece) vocabulary
    context_length: int = 52      # tokens incl. [CLS] and the end token
    pad_token_id: int = 50000     # GLM `<|endoftext|>`: pad and end token are the same id
    eot_token_id: int = 50000
    pool: str = "cls"             # "cls" (position 0, the released model) | "eot" (first eot_token_id)


@dataclass
class M2Config(ConfigDict):
    """M2-Encoder sizes. Width, depth and heads are shared by both modalities (one multiway stack);
    `vision` and `text` hold what is modality-specific, so `config.vision.image_size` and
    `config.text.context_length` read as for CLIP."""
    vision: M2VisionConfig = field(default_factory=M2VisionConfig)
    text: M2TextConfig = field(default_factory=M2TextConfig)
    width: int = 768
    layers: int = 9               # stage 1: multiway layers (vision | text branch)
    vl_layers: int = 3            # stage 2: layers with one branch shared by both modalities
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    sub_ln: bool = True           # LayerNorm inside attention (before `out`) and FFN (before `fc2`)
    norm_eps: float = 1e-5
    embed_dim: int = 768          # retrieval embedding size (projection output)
    init_logit_scale: float = DEFAULT_LOGIT_SCALE
    max_logit_scale: float = 100.0
    model_type: str = "m2"



@dataclass
class M2Features:
    """Token states of one modality. stage1: (B, L, W) after stage 1's final norm (the stage-2
    input); stage2: (B, L, W) after stage 2's final norm (equal to stage1 when vl_layers = 0);
    mask: (B, L) True = real token (all True for images)."""
    stage1: Tensor
    stage2: Tensor
    mask: Tensor


def route(branches: nn.ModuleDict, fn, x: Tensor, split: int | None) -> Tensor:
    """Apply `fn(branch, tokens)` with each token going through its own branch.

    Args:
        branches: {"vision", "text"} (multiway) or {"shared"} (one branch for every token).
        fn: callable(branch module, (B, l, *) tokens) -> (B, l, *).
        x: (B, L, *) tokens.
        split: the first `split` tokens use "vision", the rest "text"; ignored with one branch.
    Returns:
        (B, L, *) the outputs, in token order.
    """
    if len(branches) == 1:
        return fn(next(iter(branches.values())), x)
    L = x.shape[1]
    if split is None or not 0 <= split <= L:
        raise ValueError(f"a multiway layer needs 0 <= split <= {L} (leading vision tokens), got {split}")
    if split == L:
        return fn(branches[VISION], x)
    if split == 0:
        return fn(branches[TEXT], x)
    return torch.cat([fn(branches[VISION], x[:, :split]), fn(branches[TEXT], x[:, split:])], dim=1)


class Branch(nn.Module):
    """One modality's weights of a layer: norm1, fused qkv, (sub-LN) attn_norm, out; norm2, fc1,
    (sub-LN) ffn_norm, fc2."""

    def __init__(self, dim: int, hidden: int, eps: float, sub_ln: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps) if sub_ln else nn.Identity()
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps) if sub_ln else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)


class MultiwayBlock(nn.Module):
    """Pre-LN transformer layer with per-modality branches and one joint self-attention.

    Args:
        dim: width D; heads: attention heads; mlp_ratio: FFN hidden / D.
        branches: ("vision", "text") for a multiway layer, ("shared",) for one branch used by all tokens.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-5,
                 sub_ln: bool = True, branches: tuple[str, ...] = (VISION, TEXT)):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.act = activation(act)
        hidden = int(dim * mlp_ratio)
        self.branches = nn.ModuleDict({name: Branch(dim, hidden, eps, sub_ln) for name in branches})

    def forward(self, x: Tensor, key_mask: Tensor | None = None, split: int | None = None) -> Tensor:
        """x: (B, L, D); key_mask: (B, L) True = real token (pads are never attended to);
        split: leading vision tokens (multiway layers only). Returns (B, L, D)."""
        B, L, D = x.shape
        H = self.heads
        qkv = route(self.branches, lambda b, t: b.qkv(b.norm1(t)), x, split)              # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)                     # 3 x (B, H, L, Dh)
        mask = None if key_mask is None else key_mask[:, None, None, :]                   # (B, 1, 1, L)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                        # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(B, L, D)
        x = x + route(self.branches, lambda b, t: b.out(b.attn_norm(t)), y, split)
        return x + route(self.branches, lambda b, t: b.fc2(b.ffn_norm(self.act(b.fc1(b.norm2(t))))), x, split)


class MultiwayEncoder(nn.Module):
    """A stack of `MultiwayBlock`s and a final (per-branch) LayerNorm."""

    def __init__(self, dim: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu",
                 eps: float = 1e-5, sub_ln: bool = True, branches: tuple[str, ...] = (VISION, TEXT)):
        super().__init__()
        self.blocks = nn.ModuleList(MultiwayBlock(dim, heads, mlp_ratio, act, eps, sub_ln, branches)
                                    for _ in range(layers))
        self.norm = nn.ModuleDict({name: nn.LayerNorm(dim, eps=eps) for name in branches})
        self.grad_checkpointing = False

    def forward(self, x: Tensor, key_mask: Tensor | None = None, split: int | None = None) -> Tensor:
        """x: (B, L, D) -> (B, L, D) after the final norm."""
        if key_mask is not None:
            # Zero the pad positions' input, as the released model does: pads are never attended to, so
            # this only makes their own (unused) outputs independent of the pad token.
            x = x * key_mask[..., None].to(x.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, key_mask, split, use_reentrant=False)
            else:
                x = block(x, key_mask, split)
        return route(self.norm, lambda n, t: n(t), x, split)


class M2Encoder(PolymodalModel):
    """M2-Encoder: multiway stage 1 (dual encoder) + shared stage 2, CLS features, linear heads.

    Attributes set by `create_model` / `load_model` (kept off the state dict): `tokenizer`,
    `image_transform`.
    """

    config_class = M2Config

    def __init__(self, cfg: M2Config):
        super().__init__()
        if cfg.text.pool not in ("cls", "eot"):
            raise ValueError(f"text.pool must be 'cls' or 'eot' for M2-Encoder, got {cfg.text.pool!r}")
        self.config = cfg
        W = cfg.width
        grid = cfg.vision.image_size // cfg.vision.patch_size
        self.patch_embed = nn.Conv2d(3, W, cfg.vision.patch_size, cfg.vision.patch_size)
        self.cls = nn.Parameter(torch.zeros(W))
        self.vision_pos = nn.Parameter(torch.empty(1 + grid * grid, W))
        self.token_embed = nn.Embedding(cfg.text.vocab_size, W)
        self.text_pos = nn.Parameter(torch.empty(cfg.text.context_length, W))
        common = dict(dim=W, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, eps=cfg.norm_eps,
                      sub_ln=cfg.sub_ln)
        self.stage1 = MultiwayEncoder(layers=cfg.layers, branches=(VISION, TEXT), **common)
        self.stage2 = MultiwayEncoder(layers=cfg.vl_layers, branches=(SHARED,), **common) if cfg.vl_layers else None
        self.visual_proj = nn.Linear(W, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(W, cfg.embed_dim, bias=False)
        self.init_logit_scale(cfg.init_logit_scale)
        self._init_weights()

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: class token, both position embeddings, the token-embedding table."""
        return {"cls", "vision_pos", "text_pos", "token_embed.weight"}

    def _init_weights(self) -> None:
        """Linear weights normal(fan_in^-0.5) (CLIP-style), embeddings normal(0.02), zero biases; residual
        outputs not scaled (sub-LN already normalises them). BEiT's flat std 0.02 left small models (width 32-128) stuck at
        chance on ShapesWorld: the features barely depended on the image; see docs/methods.md."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=(m.in_channels * m.kernel_size[0] * m.kernel_size[1]) ** -0.5)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.vision_pos, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer in the backward pass (less memory, about a third more compute)."""
        for enc in (self.stage1, self.stage2):
            if enc is not None:
                enc.grad_checkpointing = enable

    # ---- embeddings ----
    def embed_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, 1+P, W): CLS first, learned positions added.
        The position table is resized (bicubic) when H, W differ from the config."""
        x = self.patch_embed(pixels)                                      # (B, W, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                  # (B, P, W)
        side = grid_size(self.vision_pos.shape[0] - 1)
        pos = interpolate_positions(self.vision_pos, (side, side), (gh, gw))  # (1+P, W)
        cls = self.cls.expand(len(x), 1, -1)                              # (B, 1, W)
        return torch.cat([cls, x], dim=1) + pos

    def text_mask(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) True = real token. Default: `ids != pad_token_id`, except that when the pad and end
        token share an id (the released GLM tokenizer) the first end token of each row is real."""
        if attention_mask is not None:
            return attention_mask.bool()
        cfg = self.config.text
        real = ids != cfg.pad_token_id
        if cfg.pad_token_id == cfg.eot_token_id:
            is_end = ids == cfg.eot_token_id
            first = is_end.int().argmax(dim=1, keepdim=True)                  # (B, 1)
            real = real | (torch.arange(ids.shape[1], device=ids.device)[None] <= first)
        return real

    def embed_text(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, W) token + position embeddings."""
        L = ids.shape[1]
        if L > self.config.text.context_length:
            raise ValueError(f"text input has {L} tokens but this model takes at most "
                             f"{self.config.text.context_length} (text.context_length)")
        return self.token_embed(ids) + self.text_pos[:L]

    # ---- towers ----
    def _stage2(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        return x if self.stage2 is None else self.stage2(x, key_mask)

    def image_features(self, pixels: Tensor) -> M2Features:
        """Images through the vision branch of stage 1, then the shared stage 2."""
        x = self.embed_image(pixels)                                      # (B, 1+P, W)
        s1 = self.stage1(x, None, split=x.shape[1])                        # all tokens: vision branch
        mask = torch.ones(s1.shape[:2], dtype=torch.bool, device=s1.device)
        return M2Features(stage1=s1, stage2=self._stage2(s1, None), mask=mask)

    def text_features(self, ids: Tensor, attention_mask: Tensor | None = None) -> M2Features:
        """Texts (bidirectional, pads masked) through the text branch of stage 1, then stage 2."""
        mask = self.text_mask(ids, attention_mask)                        # (B, L)
        s1 = self.stage1(self.embed_text(ids), mask, split=0)              # all tokens: text branch
        return M2Features(stage1=s1, stage2=self._stage2(s1, mask), mask=mask)

    # ---- question answering (read by polymodal.models.vqa.VQAModel) ---------------------------------
    # BEiT-3's vision-language mode: an image and a question in one sequence, image tokens then text tokens through
    # stage 1 (each token in its own modality's branch under one self-attention), then the shared stage 2; the
    # first (image CLS) state is the pooled output, as BEiT-3's VQA head reads it.
    qa_ordered = True    # the image tokens carry their positions

    @property
    def qa_width(self) -> int:
        """Width of the pooled output `qa_fuse` returns."""
        return self.config.width

    def qa_check(self, num_frames: int, motion: bool) -> None:
        """Whether a VQA head can read this model: images only (one line naming the setting otherwise)."""
        if num_frames:
            raise ValueError("VQAModel: M2-Encoder's joint pass reads one image with its question, not video frames; "
                             "set vqa.media: image (or start from a CoCa or an SNP-S3 model for videos)")

    def qa_visual_tokens(self, frames: Tensor) -> Tensor:
        """Embedded image tokens (CLS + patches, positions added): (B, T, 3, H, W) -> (B, T, 1+P, W)."""
        B, T = frames.shape[:2]
        x = self.embed_image(frames.flatten(0, 1))                          # (B*T, 1+P, W)
        return x.view(B, T, *x.shape[1:])

    def qa_fuse(self, ids: Tensor, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The joint pass over image tokens (B, S, W) and question ids (B, L) -> (B, W): the first state of stage 2.

        Args:
            ids: (B, L) question ids (pads masked, or `attention_mask`).
            tokens: (B, S, W) embedded image tokens (`qa_visual_tokens`).
        """
        mask = torch.cat([torch.ones(tokens.shape[:2], dtype=torch.bool, device=ids.device),
                          self.text_mask(ids, attention_mask)], dim=1)      # (B, S+L)
        s1 = self.stage1(torch.cat([tokens, self.embed_text(ids)], dim=1), mask, split=tokens.shape[1])
        return self._stage2(s1, mask)[:, 0]                                # (B, W)

    def _text_pool(self, ids: Tensor, states: Tensor) -> Tensor:
        if self.config.text.pool == "cls":
            return states[:, 0]
        is_eot = ids == self.config.text.eot_token_id
        at = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
        return states[torch.arange(len(ids), device=ids.device), at]

    # ---- CLIP-like interface ----
    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, E) from the stage-2 CLS feature."""
        x = self.visual_proj(self.image_features(pixels).stage2[:, 0])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, E) from the stage-2 CLS (or EOT) feature."""
        x = self.text_proj(self._text_pool(ids, self.text_features(ids, attention_mask).stage2))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixels: Tensor, ids: Tensor, attention_mask: Tensor | None = None) -> CLIPOutput:
        return CLIPOutput(self.encode_image(pixels), self.encode_text(ids, attention_mask=attention_mask),
                          self.scale())


def count_parameters(cfg: M2Config) -> int:
    """Parameters of `M2Encoder(cfg)`, counted on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = M2Encoder(cfg)
    return sum(p.numel() for p in model.parameters())
