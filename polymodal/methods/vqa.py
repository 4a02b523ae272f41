"""Visual question answering as classification over an answer vocabulary (`method: vqa`; issue #34 item 2).

The model is a `VQAModel` (`polymodal.models.vqa`) over a base that fuses question and image: a CoCa (from
`model.path`: a saved CoCa / SyCoCa run, or `model.name: coca-*` from scratch) whose multimodal decoder reads the
question while cross-attending to the image (its pooled output: the question's EOT state), or, for videos, a saved
SNP-S3 run (`model.path: runs/snps3_*/model`, `vqa.media: video`) whose cross encoder reads
`[CLS question SEP ; clips ; SEP]` (its pooled output: the cross pooler's). The pooled output feeds an MLP over the
answers.

Data: a QA manifest (`polymodal data shapes-qa`, or an imported VQAv2 / TextVQA layout): records with `image`,
`question`, `answers` (a list of human answers; or one `answer`) and optionally `question_type`. With
`vqa.media: video` the records carry `video` instead (`polymodal data moving-qa`, MSRVTT-QA, MSVD-QA): `data.num_frames`
frames (`data.frame_strategy`) go through the image encoder one by one and the fusion reads all their tokens (CoCa:
each frame's context with a learned frame embedding; SNP-S3: one clip mean per clip, ordered by the cross pass's
visual positions). The vocabulary is
built from the training records: every answer that is the consensus (most common normalised answer) of at least
`vqa.min_answer_count` training questions, the `vqa.max_answers` most frequent first; it is stored in the saved
model with each answer's count and every question type's majority answer (the baseline the `vqa` task prints).

Targets are VQAv2 soft scores: each vocabulary answer's VQA accuracy against the question's human answers. Loss:
`soft_ce` (cross-entropy against the scores normalised to sum 1; questions whose answers are all outside the
vocabulary add nothing) or `bce` (binary cross-entropy per answer times the vocabulary size, as the bottom-up
top-down VQA models train).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..models.base import ConfigDict
from .base import Method, build_tokenizer

LOSSES = ("soft_ce", "bce")
ANSWERS = ("classify", "generate")


@dataclass
class VQASection(ConfigDict):
    """The recipe's `vqa:` section."""
    min_answer_count: int = 1       # an answer joins the vocabulary when it is the consensus of >= this many questions
    max_answers: int = 0            # keep the most frequent N answers (0 = all)
    loss: str = "soft_ce"           # "soft_ce" | "bce" over the VQA soft scores
    freeze_base: bool = False       # train the head alone (the base stays as loaded)
    hidden: int = 0                 # head MLP width (0 = 2 x the text width)
    dropout: float = 0.1            # head dropout
    media: str = "image"            # "image" | "video" (records carry `video`; data.num_frames frames per question)
    motion: bool = False            # video: also encode frame-to-frame difference images (VQAModel's `motion`)
    answer: str = "classify"        # "classify" (a head over the answer vocabulary) | "generate" (a CoCa's decoder
                                    # writes the answer after the question; the saved model is the CoCa itself)

    def __post_init__(self):
        if self.answer not in ANSWERS:
            raise ConfigError(f"vqa.answer must be one of {', '.join(ANSWERS)}, got {self.answer!r}")
        if self.answer == "generate" and (self.media != "image" or self.freeze_base):
            raise ConfigError("vqa.answer: generate trains a CoCa's decoder on images: it needs vqa.media: image and "
                              "vqa.freeze_base: false")
        if self.media not in ("image", "video"):
            raise ConfigError(f"vqa.media must be image or video, got {self.media!r}")
        if self.motion and self.media != "video":
            raise ConfigError("vqa.motion needs vqa.media: video (difference images are between video frames)")
        if self.loss not in LOSSES:
            raise ConfigError(f"vqa.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.min_answer_count < 1 or self.max_answers < 0 or self.hidden < 0:
            raise ConfigError("vqa.min_answer_count must be >= 1, vqa.max_answers and vqa.hidden >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"vqa.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class AnswerVocabulary:
    """What the training records say about answers: the vocabulary, counts and per-type majorities."""
    answers: list
    counts: list
    type_majority: dict
    coverage: float                 # share of training questions whose consensus answer is in the vocabulary


def build_vocabulary(records: list[dict], min_count: int = 1, max_answers: int = 0, where: str = "data.train"
                     ) -> AnswerVocabulary:
    """The answer vocabulary of QA records (see the module docstring).

    Args:
        records: QA records with `answers` (or `answer`) and optional `question_type`.
        min_count: least number of questions an answer must be the consensus of.
        max_answers: keep the N most frequent (0 = all).
        where: the manifest, for errors.
    Returns:
        An `AnswerVocabulary` (answers by descending count, ties alphabetical).
    Raises:
        ValueError: a record without answers, or no answer left (naming the setting to change).
    """
    from ..eval.vqa import consensus, record_answers
    counts, by_type = Counter(), defaultdict(Counter)
    for k, r in enumerate(records):
        c = consensus(record_answers(r, f"{where} line {r.get('_line', k + 1)}"))
        counts[c] += 1
        by_type[str(r.get("question_type") or "all")][c] += 1
    ranked = sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
    if max_answers:
        ranked = ranked[:max_answers]
    if not ranked:
        raise ValueError(f"{where}: no answer is the consensus of >= {min_count} questions; lower vqa.min_answer_count")
    kept = set(ranked)
    majority = {t: max(sorted(c), key=lambda a: c[a]) for t, c in by_type.items()}
    return AnswerVocabulary(ranked, [counts[a] for a in ranked], majority,
                            sum(counts[a] for a in kept) / max(len(records), 1))


def soft_targets(answers: list[str], index: dict[str, int]) -> torch.Tensor:
    """(A,) VQA scores of every vocabulary answer for one question's normalised human answers."""
    from ..eval.vqa import soft_scores
    t = torch.zeros(len(index))
    for a, s in soft_scores(answers).items():
        if a in index:
            t[index[a]] = s
    return t


class VQADataset(torch.utils.data.Dataset):
    """QA records -> {"pixels" (3, H, W) or (T, 3, H, W), "question": str, "target" (A,)}; each image decoded once.

    Args:
        records: QA records (image or video paths resolved).
        answers: the vocabulary, in logit order.
        transform: PIL image -> (3, H, W).
        where: the manifest, for errors.
        video_loader: `loader(path, index, epoch) -> VideoClip` for records with `video` (None: images).
    """

    def __init__(self, records: list[dict], answers: list[str], transform, where: str = "data.train",
                 video_loader=None):
        from ..eval.vqa import record_answers
        index = {a: i for i, a in enumerate(answers)}
        self.records, self.transform, self.video_loader, self.epoch = records, transform, video_loader, 0
        self.targets = [soft_targets(record_answers(r, f"{where} line {r.get('_line', k + 1)}"), index)
                        for k, r in enumerate(records)]
        self._pixels: dict = {}

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch                                  # the frames' jitter depends on it

    def __getitem__(self, i: int) -> dict:
        from ..data.images import load_image
        r = self.records[i]
        if self.video_loader is not None:
            frames = self.video_loader(r["video"], index=i, epoch=self.epoch).pixels(self.transform)  # (T, 3, H, W)
            return {"pixels": frames, "question": str(r["question"]), "target": self.targets[i]}
        if r["image"] not in self._pixels:
            self._pixels[r["image"]] = self.transform(load_image(r["image"]))
        return {"pixels": self._pixels[r["image"]], "question": str(r["question"]), "target": self.targets[i]}


class VQACollate:
    """Samples -> {"pixels" (B, 3, H, W), "input_ids" (B, L), "targets" (B, A)}."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict:
        return {"pixels": torch.stack([s["pixels"] for s in samples]),
                "input_ids": self.tokenizer([s["question"] for s in samples]),
                "targets": torch.stack([s["target"] for s in samples])}


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "soft_ce") -> torch.Tensor:
    """The loss of (B, A) answer logits against (B, A) soft scores.

    Args:
        logits: (B, A).
        targets: (B, A) VQA scores in [0, 1].
        kind: "soft_ce" (scores normalised per question; questions with no score are left out) | "bce".
    Returns:
        A scalar (0 with gradient when no question of the batch has a vocabulary answer under soft_ce).
    """
    logits = logits.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
    mass = targets.sum(dim=1)                                                  # (B,)
    keep = mass > 0
    if not keep.any():
        return logits.sum() * 0.0
    p = targets[keep] / mass[keep, None]                                       # (B', A)
    return -(p * F.log_softmax(logits[keep], dim=1)).sum(dim=1).mean()


class VQATask(nn.Module):
    """`batch -> {"loss", "batch_accuracy"}`: the answer loss and the batch's VQA accuracy of the argmax answer."""

    def __init__(self, model: nn.Module, loss: str = "soft_ce"):
        super().__init__()
        self.model, self.kind = model, loss

    def forward(self, batch: dict) -> dict:
        logits = self.model.answer_logits(batch["pixels"], batch["input_ids"])       # (B, A)
        targets = batch["targets"]                                                    # (B, A)
        loss = vqa_loss(logits, targets, self.kind)
        acc = targets.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return {"loss": loss, "batch_accuracy": acc.detach()}


class GenerativeQADataset(torch.utils.data.Dataset):
    """QA records -> {"pixels" (3, H, W), "question": str, "answer": str (the consensus answer)}; each image decoded
    once.

    Args:
        records: QA records (image paths resolved).
        transform: PIL image -> (3, H, W).
        where: the manifest, for errors.
    """

    def __init__(self, records: list[dict], transform, where: str = "data.train"):
        from ..eval.vqa import consensus, record_answers
        self.records, self.transform = records, transform
        self.answers = [consensus(record_answers(r, f"{where} line {r.get('_line', k + 1)}"))
                        for k, r in enumerate(records)]
        self._pixels: dict = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from ..data.images import load_image
        r = self.records[i]
        if r["image"] not in self._pixels:
            self._pixels[r["image"]] = self.transform(load_image(r["image"]))
        return {"pixels": self._pixels[r["image"]], "question": str(r["question"]), "answer": self.answers[i]}


class GenerativeQACollate:
    """Samples -> {"pixels" (B, 3, H, W), "input_ids" (B, L) `[BOS] question answer [EOS]`, "answer_mask" (B, L)}.

    Args:
        model: the CoCa (its tokenizer, special ids and text context are kept, not the model).
    """

    def __init__(self, model):
        from ..models.coca import prompt_answer_ids
        self.rows, self.tokenizer = prompt_answer_ids, model.tokenizer
        self.ids = (model.bos_id, model.eos_id, model.pad_id, model.text.max_tokens, model.config.max_answer_tokens)

    def __call__(self, samples: list[dict]) -> dict:
        ids, is_answer = self.rows(self.tokenizer, [s["question"] for s in samples], [s["answer"] for s in samples],
                                   *self.ids)
        return {"pixels": torch.stack([s["pixels"] for s in samples]), "input_ids": ids, "answer_mask": is_answer}


class GenerativeVQATask(nn.Module):
    """`batch -> {"loss", "answer_token_accuracy"}`: next-token cross-entropy of the answer tokens (and the closing
    EOS) given the image and the question; the question's own tokens are not predicted."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        m, ids = self.model, batch["input_ids"]                                   # (B, L)
        context = m.image_context(m.visual(batch["pixels"]).tokens)               # (B, N, Wt)
        logits = m.decode(m.text(ids).tokens, context)[:, :-1].float()           # (B, L-1, V): predicts ids[:, 1:]
        target = ids[:, 1:].masked_fill(~batch["answer_mask"][:, 1:], -100)       # (B, L-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        counted = target != -100
        acc = (logits.argmax(-1) == target)[counted].float().mean()
        return {"loss": loss, "answer_token_accuracy": acc.detach()}


class VQAMethod(Method):
    """`method: vqa`."""

    config_cls = VQASection
    media = "image"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg if cfg is not None else VQASection())
        self.media = self.cfg.media
        self._records = None
        self._vocab = None

    def validate(self) -> None:
        if not self.run.data.train or self.run.data.shards:
            raise ConfigError("vqa: data.train must be a QA manifest (polymodal data shapes-qa, or polymodal data "
                              "import vqav2 ...); shards are not read by this method")

    def records(self) -> list[dict]:
        """The training records (image, question, answers), read once."""
        if self._records is None:
            from ..data.manifests import read_manifest
            m = read_manifest(self.run.data.train, on_bad_record=self.run.data.on_bad_record,
                              required=(self.media, "question"), media=self.media)
            self._records = m.records
        return self._records

    def vocabulary(self) -> AnswerVocabulary:
        if self._vocab is None:
            self._vocab = build_vocabulary(self.records(), self.cfg.min_answer_count, self.cfg.max_answers,
                                           str(self.run.data.train))
        return self._vocab

    def build_tokenizer(self, out_dir: Path):
        def texts() -> list[str]:
            return [str(r["question"]) for r in self.records()] + list(self.vocabulary().answers)
        return build_tokenizer(self.run, out_dir, texts=texts, min_frequency=1)

    def build_model(self, tokenizer) -> nn.Module:
        from ..models.vqa import VQAModel, check_base
        base = super().build_model(tokenizer)
        if self.cfg.answer == "generate":
            if not (hasattr(base, "generate_text") and hasattr(base, "decode")):
                raise ValueError(f"vqa.answer: generate needs a captioner with a multimodal decoder (a CoCa: "
                                 f"model.name: coca-tiny, or a sycoca run's out_dir/model); model.path/model.name "
                                 f"gives a {type(base).__name__}")
            limit = base.config.max_answer_tokens
            n, longest = max((len(base.tokenizer.encode(a)) + 1, a) for a in self.vocabulary().answers)  # with EOS
            if n > limit:
                raise ConfigError(f"vqa.answer: generate: the answer {longest!r} of {self.run.data.train} takes "
                                  f"{n} tokens with its EOS, over the CoCa's max_answer_tokens {limit}; set "
                                  f"model.overrides.max_answer_tokens (or a larger tokenizer.vocab_size)")
            return base.train()
        frames = self.run.data.num_frames if self.media == "video" else 0
        if not isinstance(base, VQAModel):                     # the base's own checks come before the data's
            check_base(base, frames, self.cfg.motion)
        vocab = self.vocabulary()
        if isinstance(base, VQAModel):                         # continue training a saved VQA model
            if base.config.num_frames != frames:
                raise ValueError(f"model.path {self.run.model.path} answers about "
                                 f"{base.config.num_frames or 'no'} video frames; set vqa.media and data.num_frames "
                                 f"to match it")
            if base.config.motion != self.cfg.motion:
                raise ValueError(f"model.path {self.run.model.path} was trained with vqa.motion "
                                 f"{base.config.motion}; set vqa.motion to match it")
            if base.answers != vocab.answers:
                raise ValueError(f"model.path {self.run.model.path} answers {len(base.answers)} answers, not the "
                                 f"{len(vocab.answers)} of {self.run.data.train}; start from its base model instead")
            model = base
            model.config.frame_strategy = self.run.data.frame_strategy if frames else "uniform"
        else:
            model = VQAModel(base, vocab.answers, vocab.counts, vocab.type_majority, self.cfg.hidden, self.cfg.dropout,
                             frames, self.cfg.motion, self.run.data.frame_strategy if frames else "uniform")
        model.base.requires_grad_(not self.cfg.freeze_base)
        return model.train()

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        # the loader's sampler gives each rank its share
        loader = None
        if self.media == "video":
            from .base import _video_loader
            loader = _video_loader(self.run.data, self.run.train.seed)
        if self.cfg.answer == "generate":
            return GenerativeQADataset(self.records(), model.image_transform, str(self.run.data.train)), None
        return VQADataset(self.records(), model.answers, model.image_transform, str(self.run.data.train),
                          loader), None

    def collate(self, model: nn.Module):
        return GenerativeQACollate(model) if self.cfg.answer == "generate" else VQACollate(model.tokenizer)

    def build_task(self, model: nn.Module) -> nn.Module:
        return GenerativeVQATask(model) if self.cfg.answer == "generate" else VQATask(model, self.cfg.loss)


__all__ = ["VQASection", "AnswerVocabulary", "build_vocabulary", "soft_targets", "vqa_loss", "VQADataset",
           "VQACollate", "VQATask", "GenerativeQADataset", "GenerativeQACollate", "GenerativeVQATask", "VQAMethod"]
