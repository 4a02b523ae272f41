"""Scalar reward models (Hummer; docs/methods.md); their loss is `losses.preference.bradley_terry_loss`.

Two backbones share one interface (`format`, `encode`, `forward(ids, mask) -> (B,)`, `score`, `save_pretrained`,
a `.tokenizer`):

- `HFRewardModel`: any local HF directory that `AutoModelForSequenceClassification` accepts (GPT-2, Llama,
  BERT ... a causal LM directory gets a fresh one-label `score` head). Saved with transformers' own
  `save_pretrained`, so `AutoModelForSequenceClassification.from_pretrained(dir)` (and TRL) load it back
  and give the same rewards. `transformers` is imported only here, only when such a model is used.
- `TextRewardModel`: polymodal's text tower (`models/text.py`) plus a linear head on the pooled (EOT) state,
  for CPU-size work; saved as `config.json` (`model_type: "text_reward"`) + `model.safetensors` + tokenizer.

`polymodal.load_model(path)` reads either kind (our folders through the one loader, HF sequence-classification
folders through `polymodal.convert.hf_reward`); `HFRewardModel.from_pretrained` also starts one from an HF
causal-LM folder.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from ..data.preference import render_text
from .base import CONFIG_FILE, replace_dir, save_pretrained
from .text import TextConfig, TextTower

MODEL_TYPE = "text_reward"
HF_EXTRA_FILE = "polymodal_reward.json"      # our formatting settings beside an HF reward model
TEMPLATES = ("trl", "plain", "chat", "auto")

__all__ = ["RewardConfig", "TextRewardModel", "HFRewardModel", "is_hf_model_dir", "encode_polymodal", "encode_hf",
           "TextEncoder", "MODEL_TYPE", "HF_EXTRA_FILE"]


# ---- tokenisation -------------------------------------------------------------------------------------
def encode_polymodal(tok, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """A polymodal Tokenizer's `[SOT] content [EOT] pad` rows, content cut from the left (the response's end is
    kept), padded to the longest row: ids (B, L) and mask (B, L) with L <= max_length."""
    L = max_length
    rows = [[tok.bos_id, *(c[-(L - 2):] if L > 2 else []), tok.eos_id] for c in tok._content(list(texts))]
    width = max((len(r) for r in rows), default=2)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return ids, mask


def _hf_rows(tok, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text, cut from the left to `max_length` by the tokenizer (None = uncut).

    A text that already starts with the BOS token (a chat template wrote it) gets no special tokens added, as
    `apply_chat_template(tokenize=True)` does; any other gets the tokenizer's own.
    """
    bos = getattr(tok, "bos_token", None)
    chat = [bool(bos) and t.startswith(bos) for t in texts]
    rows: list = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, c in enumerate(chat) if c == flag]
        if idx:
            enc = tok([texts[i] for i in idx], add_special_tokens=not flag, truncation=max_length is not None,
                      max_length=max_length)
            for i, r in zip(idx, enc["input_ids"]):
                rows[i] = r
    return rows


def encode_hf(tok, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """An HF tokenizer's rows (see `_hf_rows`), cut from the left, right-padded: ids and mask (B, L)."""
    rows = _hf_rows(tok, list(texts), max_length)
    width = max((len(r) for r in rows), default=1)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


class TextEncoder:
    """`texts -> (ids, mask)` with a tokenizer and a length budget; picklable for loader workers."""

    def __init__(self, fn, tokenizer, max_length: int):
        self.fn, self.tokenizer, self.max_length = fn, tokenizer, int(max_length)

    def __call__(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.fn(self.tokenizer, texts, self.max_length)


# ---- shared behaviour ----------------------------------------------------------------------------------
class _RewardBase(nn.Module):
    """What both backbones share: formatting a (prompt, response) pair and scoring texts in batches."""

    separator = "\n"
    template = "plain"
    max_length = 128

    def format(self, prompt, response) -> str:
        """The text the model scores for one (prompt, response); strings or message lists."""
        return render_text(prompt, response, self.separator)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Texts -> ids (B, L) and mask (B, L), cut from the left so the response end is always kept."""
        raise NotImplementedError

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text before the `max_length` cut (special tokens included)."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """(N,) rewards of `texts` (eval mode is the caller's business)."""
        device = next(self.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.encode(list(texts[i:i + batch_size]))
            out.append(self(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def score_pairs(self, pairs, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """(N,), (N,) rewards of the chosen and rejected responses of `PreferencePair`s."""
        chosen = [self.format(p.prompt, p.chosen) for p in pairs]
        rejected = [self.format(p.prompt, p.rejected) for p in pairs]
        return self.score(chosen, batch_size), self.score(rejected, batch_size)


# ---- our own text tower ---------------------------------------------------------------------------------
@dataclass
class RewardConfig:
    """config.json of a `TextRewardModel`."""
    text: TextConfig = field(default_factory=TextConfig)
    separator: str = "\n"            # between prompt and response (plain template)
    model_type: str = MODEL_TYPE

    def to_dict(self) -> dict:
        return asdict(self)


class TextRewardModel(_RewardBase):
    """polymodal's text tower with a scalar head on the pooled state.

    Args:
        config: the tower and formatting settings; the tower's `eot_token_id`, `pad_token_id` and `vocab_size`
            must match the tokenizer's (`from_tokenizer` sets them).
        tokenizer: a `polymodal.data.text.Tokenizer` (attached, not part of the state dict).
    """

    config_class = RewardConfig

    def __init__(self, config: RewardConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.separator = config.separator
        self.max_length = config.text.context_length
        self.tower = TextTower(config.text)
        self.head = nn.Linear(config.text.width, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.tokenizer = tokenizer

    @classmethod
    def from_tokenizer(cls, tokenizer, text: dict | None = None, separator: str = "\n") -> "TextRewardModel":
        """A fresh model whose tower matches `tokenizer` (vocabulary, EOT and pad ids).

        Args:
            tokenizer: a polymodal Tokenizer.
            text: `TextConfig` keys (width, layers, heads, context_length ...).
            separator: between prompt and response.
        """
        keys = dict(text or {})
        unknown = [k for k in keys if k not in TextConfig.__dataclass_fields__]
        if unknown:
            raise ValueError(f"reward.text: unknown key(s) {unknown}; allowed: {sorted(TextConfig.__dataclass_fields__)}")
        keys.update(vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                    causal=keys.get("causal", True), pool="eot")
        keys.setdefault("width", 64)
        keys.setdefault("layers", 2)
        keys.setdefault("heads", 2)
        keys.setdefault("context_length", 64)
        return cls(RewardConfig(text=TextConfig(**keys), separator=separator), tokenizer)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.tokenizer is None:
            raise ValueError("this reward model has no tokenizer attached; load it from a folder with tokenizer files")
        return encode_polymodal(self.tokenizer, texts, self.max_length)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(c) + 2 for c in self.tokenizer._content(list(texts))]

    def text_encoder(self) -> "TextEncoder":
        """A picklable `texts -> (ids, mask)` for data-loader collates (holds the tokenizer, not the model)."""
        return TextEncoder(encode_polymodal, self.tokenizer, self.max_length)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids (B, L), mask (B, L) -> rewards (B,)."""
        out = self.tower(ids, attention_mask=None if self.config.text.causal else mask, pooled_only=True)
        return self.head(out.pooled).squeeze(-1)                              # (B,)

    def attach_processors(self, tokenizer=None, image_transform=None) -> None:
        """Attach the tokenizer (a reward model reads no images)."""
        self.tokenizer = tokenizer

    def save_pretrained(self, directory) -> None:
        """config.json (with `polymodal_version`), model.safetensors and the tokenizer, swapped in atomically."""
        save_pretrained(self, directory)


# ---- any local HF model ---------------------------------------------------------------------------------
class HFRewardModel(_RewardBase):
    """An `AutoModelForSequenceClassification` with one label, plus its tokenizer.

    Args:
        hf_model: the transformers model (`num_labels == 1`).
        tokenizer: its `PreTrainedTokenizer(Fast)`; a missing pad token becomes the EOS token (as TRL does).
        max_length: tokens per text (cut from the left).
        separator: between prompt and response for the plain template.
        template: how a (prompt, response) becomes the scored text.
            "trl" (default; TRL's RewardTrainer): strings are prompt + response + the EOS token (unless the
            response already ends with it); message lists go through the tokenizer's chat template.
            "plain": prompt, `separator`, response (message lists as `role: content` lines), no EOS.
            "chat": always the chat template (strings become one user and one assistant turn).
            "auto": the chat template for message lists when the tokenizer has one, else plain (the earlier
            default; kept so the models saved with it score as they were trained).
    """

    def __init__(self, hf_model, tokenizer, max_length: int = 512, separator: str = "\n", template: str = "trl"):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"reward template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.max_length, self.separator, self.template = int(max_length), separator, template
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.truncation_side = "left"          # keep the response's end, where the reward is read
        tokenizer.padding_side = "right"
        # GPT-2-like models find the last real token through config.pad_token_id.
        hf_model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, directory, max_length: int | None = None, template: str | None = None,
                        separator: str | None = None, dtype: torch.dtype | None = None) -> "HFRewardModel":
        """Load a local HF directory (a causal LM gets a new one-label head; nothing is ever downloaded).

        Args:
            directory: holds config.json, the weights and the tokenizer files.
            max_length, template, separator: override the values saved beside the model (polymodal_reward.json);
                a folder without that file was trained elsewhere and gets TRL's rendering ("trl").
            dtype: weights' dtype (default float32).
        Raises:
            FileNotFoundError: the folder or its config.json is missing.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no config.json (an HF model directory is needed; polymodal never "
                                    f"downloads weights)")
        extra = {}
        if (directory / HF_EXTRA_FILE).is_file():
            extra = json.loads((directory / HF_EXTRA_FILE).read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        hf = AutoModelForSequenceClassification.from_pretrained(str(directory), num_labels=1, local_files_only=True,
                                                                dtype=dtype or torch.float32)
        if max_length is None:
            max_length = extra.get("max_length") or min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
        return cls(hf, tokenizer, max_length, separator if separator is not None else extra.get("separator", "\n"),
                   template or extra.get("template", "trl"))

    def format(self, prompt, response) -> str:
        messages = isinstance(prompt, list) or isinstance(response, list)
        has_chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.template == "trl" and not messages:
            eos = self.tokenizer.eos_token or ""
            text = (prompt or "") + response
            return text if text.endswith(eos) else text + eos
        if not (self.template in ("trl", "chat") or (self.template == "auto" and has_chat and messages)):
            return render_text(prompt, response, self.separator)
        if not has_chat:
            raise ValueError(f"reward template {self.template!r}: the tokenizer has no chat template to render "
                             f"message lists; give the model folder one (tokenizer_config.json 'chat_template') "
                             f"or set reward.template=plain")
        as_msgs = lambda x, role: x if isinstance(x, list) else ([{"role": role, "content": x}] if x else [])
        return self.tokenizer.apply_chat_template(as_msgs(prompt, "user") + as_msgs(response, "assistant"),
                                                  tokenize=False)

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return encode_hf(self.tokenizer, texts, self.max_length)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(r) for r in _hf_rows(self.tokenizer, list(texts))]

    def text_encoder(self) -> "TextEncoder":
        """A picklable `texts -> (ids, mask)` for data-loader collates (holds the tokenizer, not the model)."""
        return TextEncoder(encode_hf, self.tokenizer, self.max_length)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """ids (B, L), mask (B, L) -> rewards (B,)."""
        return self.hf(input_ids=ids, attention_mask=None if mask is None else mask.long()).logits[:, 0]

    def save_pretrained(self, directory) -> None:
        """transformers' own files (config, safetensors weights, tokenizer) + our formatting settings."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.hf.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / HF_EXTRA_FILE).write_text(json.dumps({"max_length": self.max_length, "separator": self.separator,
                                                         "template": self.template}, indent=2))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, directory)


def is_hf_model_dir(path) -> bool:
    """A folder with an HF config.json (one without `polymodal_version`)."""
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(raw, dict) and "polymodal_version" not in raw and "model_type" in raw
