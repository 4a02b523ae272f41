"""Contrastive captioner (CoCa): image encoder with attentional pooling, a causal unimodal text
encoder, and a multimodal text decoder that cross-attends to image tokens; plus batched decoding.

Layout of one forward pass (widths: Wv vision, Wt text, E embedding):

* image: `VisionTower` -> patch tokens (B, P, Wv) -> two attentional poolers:
  one learned query -> `visual_proj` -> contrastive image embedding (B, E);
  `num_image_queries` queries -> decoder context (B, N, Wt) (0 = all patch tokens, projected).
* text: `TextTower` (causal, pooled at EOT) -> contrastive text embedding (B, E) from the EOT state
  and token states (B, L, Wt). Because the tower is causal, the EOT state plays the role of CoCa's
  appended CLS token and the token states at position t see only tokens <= t.
* decoder: `Transformer(cross_attention=True)` over the text token states, causal self-attention,
  cross-attention to the image context -> `lm_head` -> next-token logits (B, L, V).

The captioning loss is next-token cross-entropy over positions up to and including the first EOT.

Decoding (`greedy_search`, `beam_search`, `nucleus_sample`) is written against a `step` callable
so it can be tested on hand-made models; `CoCa.generate` binds it to the model. By default it binds
a `CachedStep`: the text tower and the decoder run one new token per step with their self-attention
keys/values kept in per-layer `KVCache`s, and the decoder's cross-attention keys/values of each
image are computed once (`use_cache=False` re-runs both on the whole prefix every step; the two give
the same tokens, tests/test_kv_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_LOGIT_SCALE, ConfigDict, PolymodalModel
from .layers import Attention, Transformer, init_transformer_
from .text import TextConfig, TextOutput, TextTower
from .vision import VisionConfig, VisionOutput, VisionTower

# step(ids (N, t), rows (N,)) -> next-token logits (N, V); `rows` index the batch items.
StepFn = Callable[[Tensor, Tensor], Tensor]


class IncrementalStep:
    """A decoding step with per-sequence state (e.g. a KV cache), driven by the decoding functions.

    Protocol: `start(num_slots, per_item)` once (slot s decodes for batch item s // per_item; beam
    search has per_item = num_beams); then every step `__call__(ids (N, t), slots (N,))` with the
    full prefixes, whose last column is the only new token since the slot's previous call, and
    distinct slots in ascending order (all of them, or the unfinished ones); and, in
    beam search, `reorder(src (num_slots,), length)` after each step: slot s continues slot src[s].
    """

    def start(self, num_slots: int, per_item: int) -> None:
        raise NotImplementedError

    def __call__(self, ids: Tensor, slots: Tensor) -> Tensor:
        raise NotImplementedError

    def reorder(self, src: Tensor, length: int) -> None:
        raise NotImplementedError


class _StatelessStep(IncrementalStep):
    """A plain `StepFn` (re-reads the whole prefix) behind the incremental protocol."""

    def __init__(self, fn: StepFn):
        self.fn, self.per_item = fn, 1

    def start(self, num_slots: int, per_item: int) -> None:
        self.per_item = per_item

    def __call__(self, ids: Tensor, slots: Tensor) -> Tensor:
        return self.fn(ids, slots // self.per_item)

    def reorder(self, src: Tensor, length: int) -> None:
        pass


def _as_incremental(step: StepFn | IncrementalStep) -> IncrementalStep:
    return step if isinstance(step, IncrementalStep) else _StatelessStep(step)

from .decoding import GENERATION_METHODS  # noqa: E402 (re-exported: the names live in a torch-free module)


@dataclass
class CoCaConfig(ConfigDict):
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)   # unimodal text encoder (causal, pool "eot")
    embed_dim: int = 512
    decoder_layers: int = 6         # multimodal decoder blocks (width and heads follow the text tower)
    num_image_queries: int = 64     # attentional-pooling queries for the decoder context; 0 = all patches
    contrastive_pool: str = "attention"   # "attention" (one learned query, CoCa) | "cls" (the tower's pooled)
    bos_token_id: int = 49406       # start token of generated captions; pad/eos: text.pad/eot_token_id
    init_logit_scale: float = DEFAULT_LOGIT_SCALE
    max_logit_scale: float = 100.0
    pooler_init: str = "scaled"     # attentional poolers: "scaled" (queries N(0,1), fan-in Linears) | "torch"
    max_answer_tokens: int = 8      # prompted answers (generative VQA): answer tokens incl. EOS; a prompt keeps its
                                    # last text.context_length - 1 - this many tokens, in training and generation alike
    model_type: str = "coca"



@dataclass
class CoCaOutput:
    """image_embeds (B, E), text_embeds (B, E) L2-normalised; logit_scale: exp'ed scalar;
    logits (B, L, V): next-token logits at each text position."""
    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor
    logits: Tensor


POOLER_INITS = ("scaled", "torch")


@torch.no_grad()
def scale_pooler_init_(pooler: "AttentionalPooler", generator: torch.Generator | None = None) -> None:
    """Re-initialise one attentional pooler: queries N(0, 1), every Linear in it N(0, 1/fan_in), zero biases.

    Why: with queries N(0, 1/D) and torch's default Linear init the pooling logits of a small pooler have a
    standard deviation of about 0.06, so attention starts uniform (mean pooling) and the contrastive image
    embedding barely depends on where the objects are; unit queries and fan-in projections give logits of
    standard deviation about 1. Measured over 3 seeds (docs/results.md, issue #23): at coca-small it raised
    T2I R@5 in every seed (+13.4 +- 8.4); at coca-tiny 2 of 3 seeds (+4.0 +- 8.2).
    """
    pooler.query.copy_(torch.randn(pooler.query.shape, generator=generator))
    for lin in pooler.modules():
        if isinstance(lin, nn.Linear):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * lin.in_features ** -0.5)
            if lin.bias is not None:
                lin.bias.zero_()


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending to a token set (CoCa's task-specific attentional pooling).

    Args:
        dim: query/output width D.
        context_dim: width of the tokens pooled over.
        num_queries: number of learned queries N.
        heads: attention heads.
    """

    def __init__(self, dim: int, context_dim: int, num_queries: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(num_queries, dim) * dim ** -0.5)
        self.norm_context = nn.LayerNorm(context_dim)
        self.context_proj = nn.Linear(context_dim, dim) if context_dim != dim else nn.Identity()
        self.attn = Attention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the learned queries."""
        return {"query"}

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, P, Dc) -> (B, N, D)."""
        ctx = self.context_proj(self.norm_context(x))                       # (B, P, D)
        q = self.query.expand(len(x), -1, -1)                               # (B, N, D)
        return self.norm(self.attn(q, context=ctx))

    def per_token(self, x: Tensor) -> Tensor:
        """What the pooler would output if its attention fell entirely on one token: (B, P, Dc) -> (B, P, D).

        Attention output = out(sum_j a_j v_j); with one-hot a this is out(v_j), so these features live
        in the same space as the pooled output (used to score patches against text).
        """
        ctx = self.context_proj(self.norm_context(x))                       # (B, P, D)
        D = ctx.shape[-1]
        w_v, b_v = self.attn.qkv.weight[2 * D:], None
        if self.attn.qkv.bias is not None:
            b_v = self.attn.qkv.bias[2 * D:]
        v = F.linear(ctx, w_v, b_v)                                         # (B, P, D)
        return self.norm(self.attn.out(v))


class CoCa(PolymodalModel):
    """Contrastive captioner: `encode_image`, `encode_text`, `forward` (embeddings + caption logits),
    `generate` (captions as token ids) and `save_pretrained`."""

    config_class = CoCaConfig

    def __init__(self, cfg: CoCaConfig):
        super().__init__()
        t, v = cfg.text, cfg.vision
        if not t.causal:
            raise ValueError("coca: text.causal must be true (the decoder reads causal text states)")
        if t.pool not in ("eot", "argmax"):
            raise ValueError(f"coca: text.pool must be 'eot' or 'argmax' for a causal text encoder, got {t.pool!r} "
                             f"(position 0 of a causal tower sees nothing but itself)")
        if t.num_readout_tokens:
            raise ValueError("coca: text.num_readout_tokens must be 0 (read-out tokens would sit between "
                             "the caption and EOT and break next-token prediction)")
        if cfg.contrastive_pool not in ("attention", "cls"):
            raise ValueError(f"coca.contrastive_pool must be 'attention' or 'cls', got {cfg.contrastive_pool!r}")
        if cfg.num_image_queries < 0 or cfg.decoder_layers < 1:
            raise ValueError("coca: num_image_queries must be >= 0 and decoder_layers >= 1")
        if cfg.pooler_init not in POOLER_INITS:
            raise ValueError(f"coca.pooler_init must be one of {', '.join(POOLER_INITS)}, got {cfg.pooler_init!r}")
        self.config = cfg
        self.visual = VisionTower(v)
        self.text = TextTower(t)
        self.contrastive_pooler = (AttentionalPooler(v.width, v.width, 1, v.heads)
                                   if cfg.contrastive_pool == "attention" else None)
        if cfg.num_image_queries > 0:
            self.context_pooler = AttentionalPooler(t.width, v.width, cfg.num_image_queries, t.heads)
        else:
            self.context_pooler = nn.Sequential(nn.Linear(v.width, t.width), nn.LayerNorm(t.width))
        self.visual_proj = nn.Linear(v.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(t.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=v.width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=t.width ** -0.5)
        self.decoder = Transformer(t.width, cfg.decoder_layers, t.heads, t.mlp_ratio, t.act,
                                   eps=t.norm_eps, cross_attention=True)
        init_transformer_(self.decoder, t.width, cfg.decoder_layers)
        self.decoder_norm = nn.LayerNorm(t.width, eps=t.norm_eps)
        self.lm_head = nn.Linear(t.width, t.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=t.width ** -0.5)
        self.init_logit_scale(cfg.init_logit_scale)
        if cfg.pooler_init == "scaled":     # last, so every other weight is what "torch" gives for the same seed
            for pooler in (self.contrastive_pooler, self.context_pooler):
                if isinstance(pooler, AttentionalPooler):
                    scale_pooler_init_(pooler)

    # Special ids: one source of truth each (pad/eos live in the text config, as for CLIP).
    @property
    def pad_id(self) -> int:
        return self.config.text.pad_token_id

    @property
    def eos_id(self) -> int:
        return self.config.text.eot_token_id

    @property
    def bos_id(self) -> int:
        return self.config.bos_token_id


    # ---- image side -------------------------------------------------------------------------
    def image_embed(self, vis: VisionOutput, normalize: bool = True) -> Tensor:
        """Contrastive image embedding from a vision output: (B, E)."""
        if self.contrastive_pooler is None:
            x = vis.pooled                                                  # (B, Wv)
        else:
            x = self.contrastive_pooler(vis.tokens)[:, 0]                   # (B, Wv)
        x = self.visual_proj(x)
        return F.normalize(x, dim=-1) if normalize else x

    def patch_embeds(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        """Patch tokens mapped into the contrastive space: (B, P, Wv) -> (B, P, E).

        With attentional pooling each patch goes through the pooler's value/output path (the pooled
        embedding if all attention fell on that patch); with "cls" pooling the token is projected directly.
        """
        x = tokens if self.contrastive_pooler is None else self.contrastive_pooler.per_token(tokens)
        x = self.visual_proj(x)
        return F.normalize(x, dim=-1) if normalize else x

    def image_context(self, tokens: Tensor) -> Tensor:
        """Decoder context from patch tokens: (B, P, Wv) -> (B, N, Wt) (N = num_image_queries or P)."""
        return self.context_pooler(tokens)

    # ---- question answering (read by polymodal.models.vqa.VQAModel) ---------------------------------
    qa_ordered = False   # the decoder's cross-attention sees no positions: a VQA model adds frame embeddings

    @property
    def qa_width(self) -> int:
        """Width of the pooled output `qa_fuse` returns (and of the visual tokens): the text width."""
        return self.config.text.width

    def qa_check(self, num_frames: int, motion: bool) -> None:
        """Whether a VQA head can read this model for `num_frames` frames (0 = images): a CoCa reads both."""

    def qa_visual_tokens(self, frames: Tensor) -> Tensor:
        """The decoder context of each frame: (B, T, 3, H, W) -> (B, T, N, Wt) (N = num_image_queries or P)."""
        B, T = frames.shape[:2]
        ctx = self.image_context(self.visual(frames.flatten(0, 1)).tokens)  # (B*T, N, Wt)
        return ctx.view(B, T, *ctx.shape[1:])

    def qa_fuse(self, ids: Tensor, tokens: Tensor) -> Tensor:
        """The multimodal pooled output: the decoder reads the question (B, L) while cross-attending to the visual
        tokens (B, S, Wt); its normalised state at the question's EOT (it has seen the whole question) -> (B, Wt)."""
        text = self.text(ids)                                               # tokens (B, L, Wt)
        x = self.decoder_norm(self.decoder(text.tokens, is_causal=True, context=tokens))   # (B, L, Wt)
        at = self.text._pool_index(ids)                                     # (B,) the question's EOT
        return x[torch.arange(len(ids), device=x.device), at]               # (B, Wt)

    def encode_image(self, pixels: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, E)."""
        return self.image_embed(self.visual(pixels), normalize)

    # ---- text side --------------------------------------------------------------------------
    def text_embed(self, out: TextOutput, normalize: bool = True) -> Tensor:
        """Contrastive text embedding from the EOT state: (B, E)."""
        x = self.text_proj(out.pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids: Tensor, normalize: bool = True, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) token ids -> (B, E)."""
        return self.text_embed(self.text(ids, attention_mask), normalize)

    def decode(self, text_tokens: Tensor, context: Tensor) -> Tensor:
        """Multimodal decoder: text states (B, L, Wt) + image context (B, N, Wt) -> logits (B, L, V)."""
        x = self.decoder(text_tokens, is_causal=True, context=context)     # (B, L, Wt)
        return self.lm_head(self.decoder_norm(x))

    def forward(self, pixels: Tensor, ids: Tensor) -> CoCaOutput:
        """Embeddings of both sides and next-token logits of the caption `ids` given the image."""
        vis = self.visual(pixels)
        txt = self.text(ids)
        logits = self.decode(txt.tokens, self.image_context(vis.tokens))
        return CoCaOutput(self.image_embed(vis), self.text_embed(txt), self.scale(), logits)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, pixels: Tensor, method: str = "greedy", max_len: int | None = None,
                 num_beams: int = 4, top_p: float = 0.9, temperature: float = 1.0,
                 length_penalty: float = 0.0, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> Tensor:
        """Caption images.

        Args:
            pixels: (B, 3, H, W) normalised images.
            method: "greedy" | "beam" | "nucleus".
            max_len: most tokens per sequence including BOS (and EOS); default and maximum: the
                text tower's context length.
            num_beams: beams per image (beam search).
            top_p: nucleus mass (nucleus sampling).
            temperature: logits are divided by it before beam scoring / sampling.
            length_penalty: beam search ranks sequences by sum log-prob / length**length_penalty.
            generator: random generator for nucleus sampling.
            use_cache: decode incrementally with a KV cache (`CachedStep`); False re-runs the text
                tower and decoder on the whole prefix every step (same tokens, slower).
        Returns:
            (B, T) LongTensor, T <= max_len: BOS first, then tokens up to and including EOS, then pads.
        """
        # Inference mode drops autograd's per-operation bookkeeping (a third of a cached step's CPU
        # time on coca-small); the clone outside it gives callers an ordinary tensor they may modify.
        with torch.inference_mode():
            ids = self._generate(pixels, method, max_len, num_beams, top_p, temperature, length_penalty,
                                 generator, use_cache)
        return ids.clone()

    @torch.no_grad()
    def generate_text(self, pixels: Tensor, prompts: Sequence[str], method: str = "greedy") -> list[str]:
        """Answers to prompts about images: greedy continuation of `[BOS] prompt` up to EOS (generative VQA).

        Rows are decoded in groups of equal prompt length, re-running the towers on the whole prefix each step
        (prompts differ in length, and answers are a few tokens).

        Args:
            pixels: (B, 3, H, W) normalised images.
            prompts: B questions.
            method: "greedy" (the only decoding offered for prompted answers).
        Returns:
            B answer strings.
        """
        if method != "greedy":
            raise ValueError(f"CoCa.generate_text: only greedy decoding answers prompts, got method {method!r}")
        context = self.image_context(self.visual(pixels).tokens)            # (B, N, Wt)
        prefixes, lengths = prompt_answer_rows(self.tokenizer, prompts, None, self.bos_id, self.eos_id,
                                               self.text.max_tokens, self.config.max_answer_tokens)
        out: list = [None] * len(prompts)
        for n in sorted(set(lengths)):
            rows = [i for i, m in enumerate(lengths) if m == n]
            seq = torch.tensor([prefixes[i] for i in rows], device=pixels.device)   # (R, n)
            ctx = context[rows]
            done = torch.zeros(len(rows), dtype=torch.bool, device=pixels.device)
            for _ in range(min(self.config.max_answer_tokens, self.text.max_tokens - n)):
                nxt = self.decode(self.text(seq).tokens, ctx)[:, -1].argmax(-1)   # (R,)
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                done |= nxt == self.eos_id
                if bool(done.all()):
                    break
            for i, r in zip(rows, seq[:, n:].tolist()):
                out[i] = self.tokenizer.decode(r)                            # up to its EOS
        return out

    def _generate(self, pixels: Tensor, method: str, max_len: int | None, num_beams: int, top_p: float,
                  temperature: float, length_penalty: float, generator: torch.Generator | None,
                  use_cache: bool) -> Tensor:
        limit = self.text.max_tokens
        max_len = limit if max_len is None else max_len
        if not 2 <= max_len <= limit:
            raise ValueError(f"generate: max_len must be in [2, {limit}] (the text context length), got {max_len}")
        vocab = self.config.text.vocab_size
        if not 0 <= self.bos_id < vocab:
            raise ValueError(f"generate: bos_token_id {self.bos_id} is outside the vocabulary ({vocab} tokens); "
                             f"set the config's bos_token_id to the tokenizer's bos_id")
        context = self.image_context(self.visual(pixels).tokens)           # (B, N, Wt)

        def full_step(ids: Tensor, rows: Tensor) -> Tensor:
            txt = self.text(ids)
            return self.decode(txt.tokens, context[rows])[:, -1]            # (N, V)

        step = CachedStep(self, context, max_len) if use_cache else full_step

        kw = dict(batch_size=len(pixels), bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                  max_len=max_len, device=pixels.device)
        if method == "greedy":
            return greedy_search(step, **kw)
        if method == "beam":
            return beam_search(step, num_beams=num_beams, length_penalty=length_penalty,
                               temperature=temperature, **kw)
        if method == "nucleus":
            return nucleus_sample(step, top_p=top_p, temperature=temperature, generator=generator, **kw)
        raise ValueError(f"generate: unknown method {method!r}; choose one of {', '.join(GENERATION_METHODS)}")


class CachedStep(IncrementalStep):
    """Incremental CoCa decoding: one new token per call through the text tower and the decoder.

    Self-attention keys/values of both stacks live in per-layer `KVCache`s (one slot per decoded
    sequence); the decoder's cross-attention keys/values are projected once from the image context
    and gathered per slot. Each call computes the logits `decode(text(ids).tokens, context)[:, -1]`
    would give for the same prefixes.

    Args:
        model: the CoCa (its text tower must be causal without read-out tokens, as CoCa requires).
        context: (B, N, Wt) decoder context of the B images (`model.image_context`).
        max_len: most positions a sequence reaches (<= the text context length).
    """

    def __init__(self, model: "CoCa", context: Tensor, max_len: int):
        self.model, self.max_len = model, max_len
        self.cross_kv = model.decoder.context_kv(context)                   # per layer 2 x (B, H, N, Dh)
        self.num_items = len(context)
        self.start(self.num_items, 1)

    def start(self, num_slots: int, per_item: int) -> None:
        self.per_item = per_item
        self.num_slots = num_slots
        self.text_caches = self.model.text.transformer.new_caches(num_slots, self.max_len)
        self.decoder_caches = self.model.decoder.new_caches(num_slots, self.max_len)
        # Cross-attention keys/values per slot (slot s reads image s // per_item).
        self.slot_cross_kv = self.cross_kv if per_item == 1 else [
            (k.repeat_interleave(per_item, 0), v.repeat_interleave(per_item, 0)) for k, v in self.cross_kv]

    def __call__(self, ids: Tensor, slots: Tensor) -> Tensor:
        """ids (N, t): prefixes whose last token is new; slots (N,) distinct, ascending -> logits (N, V)."""
        text, pos = self.model.text, ids.shape[1] - 1
        everyone = len(slots) == self.num_slots                             # distinct slots: all, in order
        cache_slots = None if everyone else slots
        x = text.token_embed(ids[:, -1:]) + text.pos[pos]                   # (N, 1, Wt)
        x = text.embed_norm(x)
        x = text.transformer.step(x, self.text_caches, cache_slots, pos)    # (N, 1, Wt)
        x = text.norm(x)
        cross = self.slot_cross_kv if everyone else [(k[slots], v[slots]) for k, v in self.slot_cross_kv]
        x = self.model.decoder.step(x, self.decoder_caches, cache_slots, pos, cross)
        return self.model.lm_head(self.model.decoder_norm(x))[:, -1]       # (N, V)

    def reorder(self, src: Tensor, length: int) -> None:
        for cache in (*self.text_caches, *self.decoder_caches):
            cache.reorder(src, length)


def caption_mask(ids: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """(B, L) bool: positions up to and including the first EOS.

    Only the first EOS matters, so a pad id that is also a real token (CLIP pads with id 0, "!")
    or equals EOS is handled. A row without EOS (a truncated foreign sequence) counts every
    position before its trailing pads.
    """
    is_eos = ids == eos_id
    valid = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0             # no EOS strictly before
    no_eos = ~is_eos.any(dim=1)
    if no_eos.any():
        pos = torch.arange(ids.shape[1], device=ids.device)
        last_real = torch.where(ids != pad_id, pos, torch.full_like(pos, -1)).max(dim=1).values  # (B,)
        valid = torch.where(no_eos[:, None], pos[None] <= last_real[:, None], valid)
    return valid


def prompt_answer_rows(tokenizer, prompts: Sequence[str], answers: Sequence[str] | None, bos_id: int, eos_id: int,
                       limit: int, answer_tokens: int) -> tuple[list[list[int]], list[int]]:
    """`[BOS] prompt [answer EOS]` id lists and each row's prompt length (BOS included). Each prompt keeps its last
    `limit - 1 - answer_tokens` content tokens whether or not an answer follows, so a model generates from the
    prefix it was trained on.

    Raises:
        ValueError: an answer longer than `answer_tokens` (with its EOS), or no room left for the prompt.
    """
    room = limit - 1 - answer_tokens                                        # content tokens a prompt keeps
    if room < 1:
        raise ValueError(f"max_answer_tokens {answer_tokens} leaves no room for the question in the text context "
                         f"({limit} tokens); lower it or raise text.context_length")
    rows, prompt_lengths = [], []
    for i, p in enumerate(prompts):
        a = [*tokenizer.encode(answers[i]), eos_id] if answers is not None else []
        if len(a) > answer_tokens:
            raise ValueError(f"answer {answers[i]!r} takes {len(a)} tokens with its EOS, over max_answer_tokens "
                             f"{answer_tokens}; raise model.overrides.max_answer_tokens")
        q = [bos_id, *tokenizer.encode(p)[-room:]]
        rows.append(q + a)
        prompt_lengths.append(len(q))
    return rows, prompt_lengths


def prompt_answer_ids(tokenizer, prompts: Sequence[str], answers: Sequence[str] | None, bos_id: int, eos_id: int,
                      pad_id: int, limit: int, answer_tokens: int) -> tuple[Tensor, Tensor]:
    """`prompt_answer_rows`, right-padded: (B, L) ids and (B, L) True where a token is an answer token or the
    closing EOS (the positions a generative VQA loss predicts)."""
    rows, prompt_lengths = prompt_answer_rows(tokenizer, prompts, answers, bos_id, eos_id, limit, answer_tokens)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    is_answer = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (r, n) in enumerate(zip(rows, prompt_lengths)):
        ids[i, :len(r)] = torch.tensor(r)
        is_answer[i, n:len(r)] = True
    return ids, is_answer


def caption_loss(logits: Tensor, ids: Tensor, eos_id: int, pad_id: int) -> Tensor:
    """Next-token cross-entropy: logits[:, t] predicts ids[:, t+1], over targets up to the first EOS.

    Args:
        logits: (B, L, V) decoder logits.
        ids: (B, L) the caption fed to the decoder (BOS first).
        eos_id, pad_id: special ids; targets after the first EOS (see `caption_mask`) are ignored.
    Returns:
        Scalar mean over the counted target tokens.
    """
    target = ids[:, 1:]                                                    # (B, L-1)
    valid = caption_mask(ids, eos_id, pad_id)[:, 1:]
    target = target.masked_fill(~valid, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100)


# ---- decoding strategies ---------------------------------------------------------------------
def _check_decode(max_len: int, where: str) -> None:
    if max_len < 2:
        raise ValueError(f"{where}: max_len must be >= 2 (BOS plus one token), got {max_len}")


def _run_sampler(step: StepFn | IncrementalStep, pick: Callable[[Tensor], Tensor], batch_size: int, bos_id: int,
                 eos_id: int, pad_id: int, max_len: int, device) -> Tensor:
    """Shared loop of greedy/nucleus decoding: `pick(logits (N, V)) -> (N,)` chooses the next tokens."""
    step = _as_incremental(step)
    step.start(batch_size, 1)                                              # slot = batch row
    seqs = torch.full((batch_size, max_len), pad_id, dtype=torch.long, device=device)
    seqs[:, 0] = bos_id
    alive = torch.ones(batch_size, dtype=torch.bool, device=device)
    used = 1                                                               # columns written so far
    for t in range(1, max_len):
        rows = alive.nonzero().squeeze(1)                                 # (N,)
        if len(rows) == 0:
            break
        nxt = pick(step(seqs[rows, :t], rows))                            # (N,)
        seqs[rows, t] = nxt
        alive[rows] = nxt != eos_id
        used = t + 1
    return seqs[:, :used]


def greedy_search(step: StepFn | IncrementalStep, batch_size: int, bos_id: int, eos_id: int, pad_id: int, max_len: int,
                  device=None) -> Tensor:
    """Greedy decoding (argmax each step); rows stop at EOS and are padded after it.

    Args:
        step: step(ids (N, t), rows (N,)) -> next-token logits (N, V) for the unfinished rows, or an
            `IncrementalStep` (e.g. `CachedStep`).
        batch_size, bos_id, eos_id, pad_id, max_len: sequence layout (max_len counts BOS).
    Returns:
        (B, T) LongTensor, T <= max_len.
    """
    _check_decode(max_len, "greedy_search")
    return _run_sampler(step, lambda logits: logits.argmax(dim=-1), batch_size, bos_id, eos_id, pad_id,
                        max_len, device)


def nucleus_sample(step: StepFn | IncrementalStep, batch_size: int, bos_id: int, eos_id: int, pad_id: int, max_len: int,
                   top_p: float = 0.9, temperature: float = 1.0, generator: torch.Generator | None = None,
                   device=None) -> Tensor:
    """Nucleus (top-p) sampling: sample from the smallest set of most likely tokens with mass >= top_p.

    The most likely token is always kept, so a tiny top_p is greedy decoding.

    Returns:
        (B, T) LongTensor, T <= max_len.
    """
    _check_decode(max_len, "nucleus_sample")
    if not 0 < top_p <= 1:
        raise ValueError(f"nucleus_sample: top_p must be in (0, 1], got {top_p}")
    if temperature <= 0:
        raise ValueError(f"nucleus_sample: temperature must be > 0 (use method='greedy' for argmax), got {temperature}")

    def pick(logits: Tensor) -> Tensor:
        probs = F.softmax(logits.float() / temperature, dim=-1)            # (N, V)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p                         # mass of strictly more likely tokens
        keep = before < top_p                                               # the top token always (before = 0)
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=generator)  # (N, 1)
        return order.gather(1, choice).squeeze(1)

    return _run_sampler(step, pick, batch_size, bos_id, eos_id, pad_id, max_len, device)


def beam_search(step: StepFn | IncrementalStep, batch_size: int, bos_id: int, eos_id: int, pad_id: int, max_len: int,
                num_beams: int = 4, length_penalty: float = 0.0, temperature: float = 1.0,
                device=None, return_scores: bool = False):
    """Batched beam search.

    Each item keeps `num_beams` hypotheses; a hypothesis that emitted EOS stays in the beam with its
    score frozen (it extends only by a pad at log-prob 0), so finished and running hypotheses
    compete for the same slots by their summed log-prob. Since sums only fall as a hypothesis
    grows, with length_penalty 0 and enough beams to hold every sequence the result is the exact
    best sequence. The returned hypothesis is the best among the final beams by
    `sum log p / len**length_penalty` (len = generated tokens, EOS included, BOS not).

    Args:
        step: step(ids (N, t), rows (N,)) -> next-token logits (N, V); rows index the batch items.
            Or an `IncrementalStep`: it is called with slots item * num_beams + beam and told to
            `reorder` after every step.
        batch_size, bos_id, eos_id, pad_id, max_len: sequence layout (max_len counts BOS).
        num_beams: hypotheses per item (K).
        length_penalty: exponent of the length normalisation (0 = raw sum, 1 = mean log-prob).
        temperature: logits / temperature before log-softmax.
        return_scores: also return the (B,) normalised scores of the returned sequences.
    Returns:
        (B, T) LongTensor (T <= max_len), and the scores when asked.
    """
    _check_decode(max_len, "beam_search")
    if num_beams < 1:
        raise ValueError(f"beam_search: num_beams must be >= 1, got {num_beams}")
    if temperature <= 0:
        raise ValueError(f"beam_search: temperature must be > 0, got {temperature}")
    B, K = batch_size, num_beams
    step = _as_incremental(step)
    step.start(B * K, K)                                                   # slot = item * K + beam
    seqs = torch.full((B, K, max_len), pad_id, dtype=torch.long, device=device)
    seqs[:, :, 0] = bos_id
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0                                                     # one live start, no duplicate beams
    done = torch.zeros(B, K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    slots_all = torch.arange(B * K, device=device).view(B, K)
    for t in range(1, max_len):
        live = ~done & torch.isfinite(scores)                              # (B, K)
        if not live.any():
            break
        flat = live.nonzero()                                              # (N, 2) -> (item, beam)
        logits = step(seqs[flat[:, 0], flat[:, 1], :t], slots_all[flat[:, 0], flat[:, 1]])  # (N, V)
        V = logits.shape[-1]
        logp = torch.full((B, K, V), float("-inf"), device=device)
        logp[flat[:, 0], flat[:, 1]] = F.log_softmax(logits.float() / temperature, dim=-1)
        # Finished hypotheses (rows not computed above, so all -inf) continue only with a pad at no cost.
        frozen = done & torch.isfinite(scores)
        logp[frozen.nonzero(as_tuple=True) + (torch.full((int(frozen.sum()),), pad_id, device=device),)] = 0.0
        cand = (scores[..., None] + logp).view(B, K * V)                  # (B, K*V)
        top, idx = cand.topk(K, dim=1)                                    # (B, K)
        beam, tok = idx // V, idx % V
        step.reorder((slots_all[:, :1] + beam).view(-1), t)               # new slot (b, k) <- (b, beam[b, k])
        seqs = seqs.gather(1, beam[..., None].expand(-1, -1, max_len)).clone()
        was_done = done.gather(1, beam)
        lengths = lengths.gather(1, beam)
        seqs[:, :, t] = torch.where(was_done, torch.full_like(tok, pad_id), tok)
        lengths = lengths + (~was_done).long()
        done = was_done | (tok == eos_id)
        scores = top
    norm = scores / lengths.clamp(min=1).float() ** length_penalty if length_penalty else scores.clone()
    norm[~torch.isfinite(scores)] = float("-inf")
    best = norm.argmax(dim=1)                                              # (B,)
    items = torch.arange(B, device=device)
    out = seqs[items, best, : 1 + int(lengths[items, best].max())]
    if return_scores:
        return out, norm[items, best]
    return out
