"""Text as Image (arXiv 2312.04160): multi-label recognition learnt from sentences only, as a method.

`method: text_as_image` adapts a frozen dual encoder (`model.path`) to the C labels of `text_as_image.classes`:

1. Sentences for random label sets are written (`polymodal.data.sentences`, the `text_as_image.sentences`
   section) and their labels read back with `extract_labels`; sentences naming no label are dropped.
2. The frozen text tower encodes them once; the embeddings are cached on disk
   (`polymodal.eval.multilabel.cached_text_embeddings`, keyed by the model and the sentences).
3. The one Trainer trains a `MultiLabelAdapter` (`polymodal.models.multilabel`) on the embeddings, each
   perturbed by Gaussian noise of std `sigma` (the stand-in for image embeddings across the modality gap),
   with ASL or a ranking loss. Only the adapter is in the task module, so only it is optimised and
   checkpointed; the frozen model is held beside it.
4. Evaluation (`eval.tasks` entries with `task: multilabel`) scores image embeddings with the adapter;
   `out_dir/model` is the adapter folder (`load_adapter` reads it back).

Noise is drawn per sample from a generator seeded by (train.seed, epoch, index), so a resumed run sees
exactly the noise of an uninterrupted one.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.sentences import SentenceConfig, extract_labels, generate_sentences, load_synonyms
from ..losses.multilabel import asymmetric_loss, ranking_loss
from ..models.base import ConfigDict
from ..models.multilabel import AdapterConfig, MultiLabelAdapter, perturb
from .base import Method

LOSSES = ("asl", "ranking")


@dataclass
class TextAsImageConfig(ConfigDict):
    """The recipe's `text_as_image:` section (the frozen model is the recipe's `model.path`)."""
    classes: str = ""                    # classes.json (first of labels/shapes/classes) or a text file of names
    lang: str = "en"                     # prompt names: `<key>_<lang>` of classes.json for lang != en
    adjective_keys: list = field(default_factory=list)   # classes.json lists used as adjective groups, e.g. [sizes, colors]
    synonyms: str = ""                   # JSON {label: [synonyms]} for reading labels back from sentences
    plurals: dict = field(default_factory=dict)          # explicit plurals, e.g. {person: people}
    sentences: SentenceConfig = field(default_factory=SentenceConfig)
    seed: int = 0                        # seeds the sentences; train.seed seeds the adapter, data order and noise
    prompts: list = field(default_factory=lambda: ["en"])  # label prompts: ["en"] / ["zh"] / templates with {}
    sigma: float = 0.05                  # std of the perturbation of the training embeddings (0 = off)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # embed_dim is replaced by the model's
    loss: str = "asl"                    # "asl" | "ranking"
    gamma_neg: float = 4.0               # ASL focusing of negatives
    gamma_pos: float = 0.0               # ASL focusing of positives
    clip: float = 0.05                   # ASL probability margin of negatives
    margin: float = 1.0                  # ranking loss margin (in logits)
    cache_dir: str = ""                  # sentence-embedding cache; "" = <out_dir>/embeddings
    encode_batch_size: int = 256         # sentences per text-tower call

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"text_as_image.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not self.sigma >= 0:
            raise ValueError(f"text_as_image.sigma must be >= 0, got {self.sigma}")
        if self.encode_batch_size < 1:
            raise ValueError(f"text_as_image.encode_batch_size must be >= 1, got {self.encode_batch_size}")


# ---- data ---------------------------------------------------------------------------------------------
class SentenceEmbeddingDataset(torch.utils.data.Dataset):
    """Sentence embeddings with their multi-hot targets; item i of epoch e is perturbed with noise drawn
    from a generator seeded by (seed, e, i), so the noise depends only on those (not on workers or resume).

    Args:
        embeddings: (N, E) sentence embeddings.
        targets: (N, C) 0/1 labels.
        sigma: noise std (see `models.multilabel.perturb`); 0 = normalised embeddings unchanged.
        seed: the noise seed.
    """

    def __init__(self, embeddings: Tensor, targets: Tensor, sigma: float = 0.0, seed: int = 0):
        embeddings, targets = torch.as_tensor(embeddings).float(), torch.as_tensor(targets).float()
        if embeddings.dim() != 2 or targets.dim() != 2 or len(embeddings) != len(targets):
            raise ValueError(f"embeddings (N, E) and targets (N, C) must have the same N, got "
                             f"{tuple(embeddings.shape)} and {tuple(targets.shape)}")
        if len(embeddings) == 0:
            raise ValueError("no training sentence (every sentence was dropped or none was written)")
        self.embeddings, self.targets, self.sigma, self.seed = embeddings, targets, float(sigma), int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, i: int) -> dict:
        x = self.embeddings[i:i + 1]                                     # (1, E)
        gen = None
        if self.sigma > 0:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * len(self) + int(i))
        return {"embedding": perturb(x, self.sigma, gen)[0], "targets": self.targets[i], "index": int(i)}


def collate_sentences(samples: list[dict]) -> dict:
    """Stack samples into {"embedding": (B, E), "targets": (B, C), "index": (B,)}."""
    return {"embedding": torch.stack([s["embedding"] for s in samples]),
            "targets": torch.stack([s["targets"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}


# ---- task ---------------------------------------------------------------------------------------------
class TextAsImageTask(nn.Module):
    """The adapter and its multi-label loss; `forward(batch) -> {"loss"}`.

    The frozen encoder is held outside the module tree (`frozen_model`), so the optimizer, the checkpoints
    and `.to(device)` see only the adapter.

    Args:
        adapter: the trainable `MultiLabelAdapter`.
        cfg: the loss settings (`loss`, `gamma_neg`, `gamma_pos`, `clip`, `margin`).
        frozen_model: the dual encoder the embeddings come from (used by evaluation).
    """

    def __init__(self, adapter: MultiLabelAdapter, cfg: TextAsImageConfig, frozen_model: nn.Module | None = None):
        super().__init__()
        self.adapter, self.cfg = adapter, cfg
        self._frozen = (frozen_model,)            # a tuple: not registered as a submodule

    @property
    def frozen_model(self) -> nn.Module | None:
        return self._frozen[0]

    def forward(self, batch: dict) -> dict:
        c = self.cfg
        logits = self.adapter(batch["embedding"])                        # (B, C)
        if c.loss == "asl":
            loss = asymmetric_loss(logits, batch["targets"], c.gamma_neg, c.gamma_pos, c.clip)
        else:
            loss = ranking_loss(logits, batch["targets"], c.margin)
        return {"loss": loss}


# ---- the method ---------------------------------------------------------------------------------------
class TextAsImageMethod(Method):
    """`method: text_as_image`: train a multi-label adapter on sentences for a frozen dual encoder."""

    config_cls = TextAsImageConfig
    media = "none"

    def __init__(self, run, cfg=None):
        super().__init__(run, cfg)
        self._data: tuple[list[str], Tensor] | None = None

    # ---- checks ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        c = self.cfg
        if not c.classes:
            raise ValueError("text_as_image.classes: give the label names (classes.json or a text file)")
        c.sentences.validate("text_as_image.sentences")
        for i, item in enumerate(self.run.eval.tasks):
            if isinstance(item, dict) and item.get("task") == "multilabel" and item.get("adapter"):
                raise ValueError(f"eval.tasks[{i}].adapter: text_as_image evaluates the adapter it trains; "
                                 f"remove the `adapter` option")

    def paths(self) -> list[str]:
        c = self.cfg
        return [p for p in (c.classes, c.synonyms, c.sentences.lm_path if c.sentences.generator == "lm" else "") if p]

    # ---- labels and sentences -------------------------------------------------------------------------
    def label_names(self) -> tuple[list[str], list[str]]:
        """(names that sentences and records use, names that go into the prompts)."""
        from ..eval.multilabel import load_label_names
        return load_label_names(self.cfg.classes, self.cfg.lang)

    def adjective_groups(self) -> list[list[str]]:
        """The lists of classes.json named by `adjective_keys` (e.g. ShapesWorld's sizes and colours)."""
        keys = list(self.cfg.adjective_keys)
        if not keys:
            return []
        path = Path(self.cfg.classes)
        data = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else {}
        missing = [k for k in keys if not isinstance(data.get(k), list)]
        if missing:
            raise KeyError(f"text_as_image.adjective_keys: {path} has no list {missing[0]!r} "
                           f"(adjective groups are read from a classes.json)")
        return [list(data[k]) for k in keys]

    def training_sentences(self) -> tuple[list[str], Tensor]:
        """The training sentences and their (N, C) labels read back from them (computed once)."""
        if self._data is None:
            c = self.cfg
            names, _ = self.label_names()
            sentences = generate_sentences(c.sentences, names, self.adjective_groups(), seed=c.seed,
                                           plurals=c.plurals, progress=self.run.train.progress)
            targets = extract_labels(sentences, names, load_synonyms(c.synonyms or None), c.plurals)
            keep = (targets.sum(1) > 0).tolist()
            if not all(keep):
                warnings.warn(f"text_as_image: dropped {len(keep) - sum(keep)} of {len(keep)} sentences that name "
                              f"none of the labels")
                sentences = [s for s, k in zip(sentences, keep) if k]
                targets = targets[torch.tensor(keep)]
            self._data = (sentences, targets)
        return self._data

    def training_embeddings(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """(N, E) embeddings of the training sentences by the frozen model (through the cache), (N, C) targets."""
        from ..eval.multilabel import cached_text_embeddings
        sentences, targets = self.training_sentences()
        cache = self.cfg.cache_dir or str(Path(self.run.out_dir) / "embeddings")
        emb = cached_text_embeddings(model, sentences, cache, self.cfg.encode_batch_size,
                                     progress=self.run.train.progress)
        return emb, targets

    def label_embeds(self, model: nn.Module) -> Tensor:
        """(C, E) prompt embeddings of the label names: the adapter's classifier starts from them."""
        from ..eval.multilabel import label_embeddings
        return label_embeddings(model, self.label_names()[1], self.cfg.prompts)

    # ---- building -------------------------------------------------------------------------------------
    def build_tokenizer(self, out_dir: Path):
        """The model's own tokenizer (`model.path`), `tokenizer.path`, or one trained on the sentences."""
        from ..data.text import Tokenizer, train_tokenizer
        run = self.run
        if run.model.path:
            return None
        if run.tokenizer.path:
            return Tokenizer.from_dir(run.tokenizer.path)
        saved = Path(out_dir) / "tokenizer"
        if (saved / "tokenizer.json").is_file():
            return Tokenizer.from_dir(saved)
        sentences, _ = self.training_sentences()
        tok = train_tokenizer(sentences + self.label_names()[1], kind=run.tokenizer.kind,
                              vocab_size=run.tokenizer.vocab_size)
        from ..distributed import rank
        if rank() == 0:
            tok.save(saved)
        return tok

    def build_model(self, tokenizer) -> nn.Module:
        """The frozen dual encoder: eval mode, no gradients."""
        model = super().build_model(tokenizer)
        model.eval()
        model.requires_grad_(False)
        return model

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        emb, targets = self.training_embeddings(model)
        return SentenceEmbeddingDataset(emb, targets, self.cfg.sigma, seed=self.run.train.seed), None

    def collate(self, model: nn.Module):
        return collate_sentences

    def build_task(self, model: nn.Module) -> nn.Module:
        names, _ = self.label_names()
        w = self.label_embeds(model)                                     # (C, E)
        acfg = replace(self.cfg.adapter, embed_dim=w.shape[1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.run.train.seed)                       # the adapter's init depends on the seed only
            adapter = MultiLabelAdapter(acfg, w, names)
        return TextAsImageTask(adapter, self.cfg, frozen_model=model)

    # ---- the saved model ------------------------------------------------------------------------------
    def final_model(self, task: nn.Module) -> nn.Module:
        """The frozen encoder with the trained adapter (`AdaptedEncoder`): evaluated and saved as one model."""
        from ..models.multilabel import AdaptedEncoder
        model = task.frozen_model.to(task.adapter.label_embeds.device)
        return AdaptedEncoder(model, task.adapter)


__all__ = ["SentenceEmbeddingDataset", "TextAsImageConfig", "TextAsImageMethod", "TextAsImageTask",
           "collate_sentences"]
