"""A LLaVA-style multimodal LLM: image tower -> projector -> image tokens placed before the prompt of a
causal language model; answer-only next-token loss; option likelihoods; greedy/beam generation.

Sequence layout (one row; N image tokens, prompt left-padded to Lp, continuation right-padded to Lc):

    [img_1 .. img_N][pad .. pad prompt_1 .. prompt_p][SEP answer_1 .. answer_a EOS pad ..]

SEP is the tokenizer's start token (`bos_token_id`): it opens every answer, so generation starts from it
and the CoCa decoders' `greedy_search` / `beam_search` (which begin each row with a start token) are
reused as they are. Pads are masked out of attention and positions count real tokens only, so a row's
logits do not depend on how much padding its batch needed.

Language models:
* `CausalDecoder`: our own small pre-LN decoder (learned positions, tied output head), for CPU work;
* any transformers causal LM (`AutoModelForCausalLM`): from a local directory (`lm_path`), or a config
  dict (`hf_lm`, e.g. a tiny random GPT-2 or Llama built in a test). Saved models keep the HF config in
  their config.json, so loading needs neither the original directory nor the network.

`transformers` is imported only when an HF LM is used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ConfigDict, PolymodalModel, save_pretrained
from .coca import beam_search, greedy_search
from .layers import Transformer, init_transformer_
from .vision import VisionConfig, VisionTower

PROJECTORS = ("linear", "mlp")
IMAGE_TOKENS = ("patches", "all")


@dataclass
class CausalLMConfig:
    vocab_size: int = 1024
    context_length: int = 96      # positions, image tokens included
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"


@dataclass
class MLLMConfig(ConfigDict):
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=32, patch_size=8, width=32,
                                                                      layers=2, heads=2))
    lm: CausalLMConfig = field(default_factory=CausalLMConfig)   # our decoder (unused when hf_lm/lm_path is set)
    hf_lm: dict = field(default_factory=dict)    # a transformers causal-LM config dict; non-empty = use it
    lm_path: str = ""               # local HF causal-LM directory whose weights start the LM (build time only)
    projector: str = "mlp"          # "linear" | "mlp" (LLaVA-1.5's Linear-GELU-Linear)
    image_tokens: str = "patches"   # "patches" (P tokens) | "all" (CLS + patches)
    max_prompt_tokens: int = 32     # prompts are cut to their last this-many tokens
    max_answer_tokens: int = 16     # SEP + answer + EOS
    bos_token_id: int = 1           # SEP: opens every answer
    eos_token_id: int = 2
    pad_token_id: int = 0
    model_type: str = "mllm"

    def __post_init__(self):
        if self.projector not in PROJECTORS:
            raise ValueError(f"mllm.projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.image_tokens not in IMAGE_TOKENS:
            raise ValueError(f"mllm.image_tokens must be one of {IMAGE_TOKENS}, got {self.image_tokens!r}")
        if self.max_answer_tokens < 2 or self.max_prompt_tokens < 1:
            raise ValueError("mllm: max_answer_tokens must be >= 2 (SEP + EOS) and max_prompt_tokens >= 1")


# Named starting points (`model.name` of an ASD recipe); dotted overrides apply on top.
MLLM_PRESETS: dict[str, dict] = {
    # A mean-pooled token first (image_tokens "all" + pool "mean"): a frozen random tower's mean token carries
    # the figure's colour linearly, which a tiny LM learns to read in a few hundred steps.
    "mllm-tiny": {"vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2, "pool": "mean"},
                  "lm": {"width": 64, "layers": 2, "heads": 4, "context_length": 96}, "image_tokens": "all"},
    "mllm-small": {"vision": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "heads": 4},
                   "lm": {"width": 192, "layers": 4, "heads": 6, "context_length": 160}},
}


@dataclass
class MLLMOutput:
    """logits (B, Lc-1, V): predictions of continuation tokens 1..Lc-1; nll (B,): mean answer-token NLL."""
    logits: Tensor
    nll: Tensor


class CausalDecoder(nn.Module):
    """Our small causal LM over embeddings: `embed_tokens(ids)` and `forward(embeds, mask, positions)`."""

    def __init__(self, cfg: CausalLMConfig):
        super().__init__()
        self.config = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act)
        self.norm = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_transformer_(self.transformer, cfg.width, cfg.layers)

    @property
    def width(self) -> int:
        return self.config.width

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: position embeddings and the token-embedding table (tied to the head)."""
        return {"pos", "token_embed.weight"}

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.token_embed(ids)                                       # (B, L, D)

    def forward(self, embeds: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """embeds (B, L, D), mask (B, L) True = real, positions (B, L) -> logits (B, L, V)."""
        L = embeds.shape[1]
        if int(positions.max()) >= self.config.context_length:
            raise ValueError(f"mllm: a sequence of {int(positions.max()) + 1} positions exceeds lm.context_length "
                             f"{self.config.context_length}; raise lm.context_length or shorten prompts")
        x = embeds + self.pos[positions]                                   # (B, L, D)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None] & mask[:, None, :]                          # (B, Lq, Lk)
        allowed |= torch.eye(L, dtype=torch.bool, device=x.device)[None]   # pads see themselves: no empty rows
        x = self.norm(self.transformer(x, attn_mask=allowed[:, None]))
        return x @ self.token_embed.weight.T                               # tied head (B, L, V)


class HFCausalLM(nn.Module):
    """A transformers causal LM behind the same two calls as `CausalDecoder`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def embed_tokens(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def forward(self, embeds: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        out = self.model(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=positions, use_cache=False)
        return out.logits


def hf_causal_lm_from_config(config: dict) -> nn.Module:
    """A randomly initialised transformers causal LM from a config dict (needs its `model_type`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = dict(config)
    kind = config.pop("model_type", None)
    if not kind:
        raise ValueError("mllm.hf_lm: the config dict needs a `model_type` (e.g. 'gpt2', 'llama')")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config))


def load_hf_causal_lm(path: str) -> nn.Module:
    """A transformers causal LM from a local directory (never the network)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"mllm.lm_path: {path} is not a transformers model directory (no config.json); "
                                f"give a local folder written by save_pretrained")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)


class MLLM(PolymodalModel):
    """Image tower + projector + causal LM.

    Args:
        cfg: the model config.
        vision: an image tower to use instead of building `cfg.vision` (e.g. `load_model(clip_dir).visual`);
            its config is copied into `cfg.vision` so the saved model rebuilds it.
        lm: a transformers causal LM module to use as is (its config goes to `cfg.hf_lm`).
    """

    config_class = MLLMConfig

    def __init__(self, cfg: MLLMConfig, vision: VisionTower | None = None, lm: nn.Module | None = None):
        super().__init__()
        self.config = cfg
        if vision is not None:
            cfg.vision = vision.config
        self.visual = vision if vision is not None else VisionTower(cfg.vision)
        if lm is None and cfg.lm_path and not cfg.hf_lm:
            lm = load_hf_causal_lm(cfg.lm_path)
        if lm is not None:
            cfg.hf_lm = {k: v for k, v in lm.config.to_dict().items() if _json_ok(v)}
            self.lm = HFCausalLM(lm)
        elif cfg.hf_lm:
            self.lm = HFCausalLM(hf_causal_lm_from_config(cfg.hf_lm))
        else:
            self.lm = CausalDecoder(cfg.lm)
        Wv, D = cfg.vision.width, self.lm.width
        self.projector = (nn.Linear(Wv, D) if cfg.projector == "linear"
                          else nn.Sequential(nn.Linear(Wv, D), nn.GELU(), nn.Linear(D, D)))

    @property
    def vocab_size(self) -> int:
        if isinstance(self.lm, HFCausalLM):
            return self.lm.model.get_input_embeddings().num_embeddings
        return self.config.lm.vocab_size

    # ---- pieces ---------------------------------------------------------------------------------
    def image_embeds(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> projected image tokens (B, N, D)."""
        out = self.visual(pixels)
        tokens = out.tokens                                                # (B, P, Wv)
        if self.config.image_tokens == "all":
            tokens = torch.cat([out.pooled[:, None], tokens], dim=1)      # (B, 1+P, Wv)
        return self.projector(tokens)

    def continuation_logits(self, image: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, cont_ids: Tensor,
                            cont_mask: Tensor) -> Tensor:
        """Logits at every continuation position: (B, Lc, V); position j predicts continuation token j+1.

        Args:
            image: (B, N, D) projected image tokens.
            prompt_ids, prompt_mask: (B, Lp) left-padded prompt.
            cont_ids, cont_mask: (B, Lc) right-padded continuation starting with SEP.
        """
        N, Lp = image.shape[1], prompt_ids.shape[1]
        text = self.lm.embed_tokens(torch.cat([prompt_ids, cont_ids], dim=1))           # (B, Lp+Lc, D)
        x = torch.cat([image.to(text.dtype), text], dim=1)                              # (B, N+Lp+Lc, D)
        mask = torch.cat([prompt_mask.new_ones(image.shape[:2]), prompt_mask, cont_mask], dim=1).bool()
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)                        # real tokens only
        logits = self.lm(x, mask, positions)                                            # (B, L, V)
        return logits[:, N + Lp:]

    def forward(self, pixels: Tensor, prompt_ids: Tensor, prompt_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor) -> MLLMOutput:
        """Answer-only next-token NLL (mean over each row's answer tokens and EOS).

        Args:
            pixels: (B, 3, H, W).
            prompt_ids, prompt_mask: (B, Lp) left-padded prompts (`encode_prompts`).
            answer_ids, answer_mask: (B, La) right-padded `[SEP] answer [EOS]` (`encode_answers`).
        """
        logits = self.continuation_logits(self.image_embeds(pixels), prompt_ids, prompt_mask, answer_ids,
                                          answer_mask)[:, :-1]                          # (B, La-1, V)
        return MLLMOutput(logits, token_nll(logits, answer_ids[:, 1:], answer_mask[:, 1:], reduction="mean"))

    # ---- text -----------------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("mllm: no tokenizer attached; call model.attach_processors(tokenizer)")
        return self.tokenizer

    def encode_prompts(self, prompts: Sequence[str], device=None) -> tuple[Tensor, Tensor]:
        """Left-padded prompt ids and mask (B, Lp), each cut to its last `max_prompt_tokens` tokens."""
        tok, limit = self._tok(), self.config.max_prompt_tokens
        rows = [tok.encode(p)[-limit:] or [self.config.pad_token_id] for p in prompts]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = True
        return ids.to(device), mask.to(device)

    def encode_answers(self, answers: Sequence[str], device=None) -> tuple[Tensor, Tensor]:
        """Right-padded `[SEP] answer [EOS]` ids and mask (B, La), answers cut to fit `max_answer_tokens`."""
        tok, c = self._tok(), self.config
        rows = [[c.bos_token_id, *tok.encode(a)[: c.max_answer_tokens - 2], c.eos_token_id] for a in answers]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = True
        return ids.to(device), mask.to(device)

    # ---- scoring and generation -----------------------------------------------------------------
    def option_logprobs(self, pixels: Tensor, prompts: Sequence[str], options) -> Tensor:
        """Summed log-probability of each option as the answer: (B, K).

        Args:
            pixels: (B, 3, H, W).
            prompts: B questions.
            options: K option strings shared by every row, or B lists of K strings.
        """
        B = len(prompts)
        per_row = [list(options)] * B if options and isinstance(options[0], str) else [list(o) for o in options]
        if len(per_row) != B or len({len(o) for o in per_row}) != 1:
            raise ValueError("answer_probabilities: give K options shared by all rows, or B lists of K options each")
        K = len(per_row[0])
        device = pixels.device
        image = self.image_embeds(pixels)                                              # (B, N, D)
        pid, pm = self.encode_prompts(prompts, device)
        aid, am = self.encode_answers([o for row in per_row for o in row], device)    # (B*K, La)
        rep = torch.arange(B, device=device).repeat_interleave(K)
        logits = self.continuation_logits(image[rep], pid[rep], pm[rep], aid, am)[:, :-1]
        nll = token_nll(logits, aid[:, 1:], am[:, 1:], reduction="sum")               # (B*K,)
        return (-nll).view(B, K)

    @torch.no_grad()
    def answer_probabilities(self, images: Tensor, prompts: Sequence[str], options) -> Tensor:
        """Option likelihoods normalised over the options (our reading of "the model's answer").

        Returns:
            (B, K) float, rows sum to 1 (arguments as for `option_logprobs`).
        """
        return F.softmax(self.option_logprobs(images, prompts, options).float(), dim=-1)

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompts: Sequence[str], method: str = "greedy", max_len: int | None = None,
                 num_beams: int = 4, length_penalty: float = 0.0) -> Tensor:
        """Answer ids (B, T): SEP first, then tokens up to and including EOS, then pads (CoCa's search).

        Args:
            pixels: (B, 3, H, W); prompts: B questions.
            method: "greedy" | "beam".
            max_len: most tokens including SEP and EOS (default `max_answer_tokens`).
        """
        c = self.config
        image = self.image_embeds(pixels)
        pid, pm = self.encode_prompts(prompts, pixels.device)

        def step(ids: Tensor, rows: Tensor) -> Tensor:
            real = torch.ones_like(ids, dtype=torch.bool)                  # generated tokens are never pads
            return self.continuation_logits(image[rows], pid[rows], pm[rows], ids, real)[:, -1]   # (N, V)

        kw = dict(batch_size=len(prompts), bos_id=c.bos_token_id, eos_id=c.eos_token_id, pad_id=c.pad_token_id,
                  max_len=max_len or c.max_answer_tokens, device=pixels.device)
        if method == "greedy":
            return greedy_search(step, **kw)
        if method == "beam":
            return beam_search(step, num_beams=num_beams, length_penalty=length_penalty, **kw)
        raise ValueError(f"mllm.generate: unknown method {method!r}; choose greedy or beam")

    def generate_text(self, pixels: Tensor, prompts: Sequence[str], **kwargs) -> list[str]:
        """`generate`, decoded with the attached tokenizer."""
        return self._tok().batch_decode(self.generate(pixels, prompts, **kwargs))

    # ---- files ----------------------------------------------------------------------------------
    def attach_processors(self, tokenizer=None, image_transform=None) -> None:
        """Attach the tokenizer and an image transform (default: `ImageTransform` at the tower's size)."""
        from ..data.images import ImageTransform
        self.tokenizer = tokenizer
        self.image_transform = image_transform or ImageTransform(self.config.vision.image_size)

    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors (+ tokenizer + preprocessor_config.json), swapped in atomically.

        HF LMs tie their input and output embeddings; the shared writer copies tied tensors (safetensors refuses
        shared memory) and loading fills both names with the same values."""
        save_pretrained(self, directory)


def _json_ok(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Per-row NLL of `targets` under `logits`, over the positions where `mask` is True.

    Args:
        logits: (B, L, V); targets, mask: (B, L).
        reduction: "mean" (per-row mean over counted tokens) or "sum".
    Returns:
        (B,) float.
    """
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none") * mask   # (B, L)
    total = nll.sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if reduction == "mean" else total


def mllm_config(name: str = "mllm-tiny", overrides: dict | None = None, tokenizer=None) -> MLLMConfig:
    """A config from a preset name (`MLLM_PRESETS`) plus dotted overrides; special ids from `tokenizer`."""
    import copy
    from ..config import from_dict, set_dotted
    if name not in MLLM_PRESETS:
        raise ValueError(f"unknown MLLM preset {name!r}; known: {', '.join(MLLM_PRESETS)}")
    data = copy.deepcopy(MLLM_PRESETS[name])
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    cfg = from_dict(MLLMConfig, data, f"model {name}")
    if tokenizer is not None:
        cfg.lm.vocab_size = tokenizer.vocab_size
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    return cfg


def create_mllm(cfg: MLLMConfig, tokenizer=None, vision: VisionTower | None = None, lm: nn.Module | None = None,
                image_transform=None) -> MLLM:
    """Build an `MLLM` and attach its tokenizer and image transform (default: `ImageTransform` at the tower's size)."""
    model = MLLM(cfg, vision=vision, lm=lm)
    model.attach_processors(tokenizer, image_transform)
    return model
