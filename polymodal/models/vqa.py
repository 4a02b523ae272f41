"""A multimodal model answering questions by classification over an answer vocabulary (`method: vqa`, the `vqa`
eval task).

The base supplies the multimodal pooled output (`qa_fuse`):

* CoCa (images or videos): the question goes through the causal text tower and the multimodal decoder, which
  cross-attends to the image context (the attentional-pooled image tokens of every frame); the decoder's normalised
  state at the question's EOT position (it has seen the whole question and, through cross-attention, the image) is
  the pooled output.
* SNP-S3 (videos): the cross pass over `[CLS question SEP ; clip_1 .. clip_n ; SEP]` (the clip means, token type 1
  with their own positions), read by the cross pooler: the output SNP-S3's level-2 and ITM heads read.

An MLP head maps it to logits over the answer vocabulary (VQAv2 classifiers' "answers as classes", Teney et al.
2018).

The vocabulary (normalised answers of the training set), each answer's training count and the majority answer of
each question type (the baseline the `vqa` task prints beside every number) live in the config, so a saved
`VQAModel` carries everything its evaluation needs. Saved as one folder: `config.json` (`model_type: "vqa"`, the
base's config nested under `base`), `model.safetensors` and the base's processors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import WrapsEncoder
from .factory import WrappedConfig


@dataclass
class VQAConfig(WrappedConfig):
    """config.json of a `VQAModel`."""
    base: dict = field(default_factory=dict)           # the base's config (CoCa or SNP-S3, with its model_type)
    answers: list = field(default_factory=list)        # the A answers (normal form), in logit order
    answer_counts: list = field(default_factory=list)  # how many training questions had each as consensus answer
    type_majority: dict = field(default_factory=dict)  # question type -> its most common training answer
    hidden: int = 0                                    # head MLP width (0 = 2 x the text width)
    dropout: float = 0.1                               # head dropout (training only)
    num_frames: int = 0                                # 0: questions about images; T: about T-frame videos
    motion: bool = False                               # videos: also encode each frame's difference from the last
    frame_strategy: str = "uniform"                    # videos: how the evaluation picks the frames (as training did)
    model_type: str = "vqa"

    def __post_init__(self):
        super().__post_init__()
        if self.num_frames < 0:
            raise ValueError(f"vqa config: num_frames must be >= 0 (0 = images), got {self.num_frames}")
        if self.motion and self.num_frames < 2:
            raise ValueError(f"vqa config: motion needs videos of >= 2 frames (num_frames), got {self.num_frames}")
        if self.answer_counts and len(self.answer_counts) != len(self.answers):
            raise ValueError(f"vqa config: {len(self.answer_counts)} answer_counts for {len(self.answers)} answers")



def check_base(base: nn.Module, num_frames: int, motion: bool) -> None:
    """Whether `base` can carry an answer head for `num_frames` frames (0 = images), with or without `motion`.

    Raises:
        ValueError: a base without the question-answering methods (`qa_width`, `qa_check`, `qa_visual_tokens`,
            `qa_fuse`), or settings its `qa_check` refuses (one line naming what to give or set).
    """
    if not all(hasattr(base, name) for name in ("qa_width", "qa_check", "qa_visual_tokens", "qa_fuse")):
        raise ValueError(f"VQAModel: a {type(base).__name__} has neither a multimodal decoder nor a cross encoder; "
                         f"vqa needs a CoCa (model.name: coca-tiny / coca-small, or a sycoca run's out_dir/model), an "
                         f"M2-Encoder (model.name: m2-tiny, or an m2 run's out_dir/model) or an SNP-S3 model (an snps3 "
                         f"run's out_dir/model, with vqa.media: video)")
    base.qa_check(num_frames, motion)


class VQAModel(WrapsEncoder, nn.Module):
    """A multimodal base + answer head: `answer_logits(pixels, ids) -> (B, A)`, `answer(pixels, questions) -> [str]`.

    The base supplies the multimodal pooled output through `qa_check`, `qa_visual_tokens`, `qa_fuse` and
    `qa_width` (its width), and says with `qa_ordered` whether its fusion sees token positions; `CoCa` (decoder),
    `SNPS3Model` (cross encoder) and `M2Encoder` (joint multiway pass) have them, so this class has no per-family
    branches.

    Args:
        base: a `CoCa` (its decoder reads the question, cross-attending to the frames' image contexts), an
            `SNPS3Model` (its cross pass reads `[CLS question SEP ; clips ; SEP]`, videos only) or an `M2Encoder`
            (image and question tokens in one multiway sequence, images only); its other heads stay usable.
        answers: the A answers, normalised.
        answer_counts: training counts of each answer (for the majority baseline); default all 1.
        type_majority: question type -> majority training answer.
        hidden: head MLP width (0 = 2 x text width).
        dropout: head dropout.
        num_frames: 0 for images; T > 0 for videos of T frames: every frame's visual tokens go to the fusion,
            concatenated in time order. A base whose fusion sees no positions (CoCa) gets a learned frame
            embedding added to each frame's tokens (std 1 at the start, so order is visible from the first step).
        motion: videos only: also encode the T - 1 difference images frame[t] - frame[t-1] (normalised pixels)
            with the same image encoder and append their tokens (CoCa: each with its own learned embedding).
            Objects moving, growing or changing colour on a static background are all the difference images show;
            without them the tiny encoder's per-frame tokens barely differ within a video (docs/methods.md).
        frame_strategy: videos: how the `vqa` evaluation picks the frames ("uniform" | "keyframes" | "scene"; the
            training run's `data.frame_strategy`, so a model is scored on frames chosen as it was trained on).
    Raises:
        ValueError: an empty vocabulary, a base without a multimodal fusion, or settings the base cannot read
            (the base's `qa_check`: e.g. SNP-S3 with images or too many frames).
    """

    config_class = VQAConfig

    def __init__(self, base: nn.Module, answers: list, answer_counts: list | None = None,
                 type_majority: dict | None = None, hidden: int = 0, dropout: float = 0.1, num_frames: int = 0,
                 motion: bool = False, frame_strategy: str = "uniform"):
        super().__init__()
        if not answers:
            raise ValueError("VQAModel: an empty answer vocabulary")
        check_base(base, num_frames, motion)
        self.base = base
        counts = list(answer_counts) if answer_counts else [1] * len(answers)
        self.config = VQAConfig(base=base.config.to_dict(), answers=list(answers), answer_counts=counts,
                                type_majority=dict(type_majority or {}), hidden=hidden, dropout=dropout,
                                num_frames=num_frames, motion=motion, frame_strategy=frame_strategy)
        self.config._base = base.config
        width = base.qa_width                                                # W of the pooled output
        embed = num_frames and not base.qa_ordered
        self.frame_embed = nn.Parameter(torch.randn(num_frames, width)) if embed else None            # (T, Wt)
        self.motion_embed = nn.Parameter(torch.randn(num_frames - 1, width)) if embed and motion else None  # (T-1, Wt)
        h = hidden or 2 * width
        self.head = nn.Sequential(nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(h),
                                  nn.Linear(h, len(answers)))

    @classmethod
    def from_config(cls, cfg: VQAConfig) -> "VQAModel":
        """A randomly initialised model of a saved config (the weights are loaded after)."""
        from .families import build_model
        return cls(build_model(cfg.base_config()), list(cfg.answers), list(cfg.answer_counts),
                   dict(cfg.type_majority), cfg.hidden, cfg.dropout, cfg.num_frames,
                   cfg.motion, cfg.frame_strategy)

    answers = property(lambda self: list(self.config.answers))
    def majority_answer(self, question_type: str | None = None) -> str:
        """The baseline's answer: the question type's majority training answer, else the overall one."""
        if question_type is not None and question_type in self.config.type_majority:
            return self.config.type_majority[question_type]
        counts = self.config.answer_counts
        return self.config.answers[max(range(len(counts)), key=counts.__getitem__)]

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed: the frame (and motion) embeddings."""
        return {name for name in ("frame_embed", "motion_embed") if getattr(self, name) is not None}

    def context(self, pixels: Tensor) -> Tensor:
        """The fusion's visual tokens: (B, 3, H, W) images -> (B, K, Wc); (B, T, 3, H, W) videos -> (B, S, Wc)
        (S = T' * K, plus the difference images' with `motion`; T' = T, or SNP-S3's clips)."""
        m, frames = self.base, self.config.num_frames
        if pixels.dim() == 4:
            if frames:
                raise ValueError(f"VQAModel: a video model (num_frames {frames}) got images "
                                 f"{tuple(pixels.shape)}; give (B, T, 3, H, W) frames")
            return m.qa_visual_tokens(pixels[:, None])[:, 0]                 # (B, K, Wc)
        if not frames:
            raise ValueError(f"VQAModel: an image model got frames {tuple(pixels.shape)}; train with vqa.media: video")
        T = pixels.shape[1]
        if T > frames:
            raise ValueError(f"VQAModel: {T} frames, but the model was trained with {frames}")
        tok = m.qa_visual_tokens(pixels)                                     # (B, T', K, Wc)
        if self.frame_embed is not None:
            tok = tok + self.frame_embed[:tok.shape[1], None]
        parts = [tok.flatten(1, 2)]                                          # (B, T'*K, Wc)
        if self.config.motion and T >= 2:
            diff = pixels[:, 1:] - pixels[:, :-1]                            # (B, T-1, 3, H, W)
            dtok = m.qa_visual_tokens(diff)                                  # (B, T-1, K, Wc)
            if self.motion_embed is not None:
                dtok = dtok + self.motion_embed[:T - 1, None]
            parts.append(dtok.flatten(1, 2))                                 # (B, (T-1)*K, Wc)
        return torch.cat(parts, dim=1)                                       # (B, S, Wc)

    def fused(self, pixels: Tensor, ids: Tensor) -> Tensor:
        """The base's multimodal pooled output: images (B, 3, H, W) or frames (B, T, 3, H, W) + (B, L) question
        ids -> (B, W)."""
        return self.base.qa_fuse(ids, self.context(pixels))                  # (B, W)

    def answer_logits(self, pixels: Tensor, ids: Tensor) -> Tensor:
        """(B, 3, H, W) images (or (B, T, 3, H, W) frames) + (B, L) question ids -> (B, A) answer logits."""
        fused = self.fused(pixels, ids)
        return self.head(fused.to(self.head[0].weight.dtype))

    forward = answer_logits

    def answer(self, pixels: Tensor, questions: list[str]) -> list[str]:
        """The most likely answer to each question about the matching image."""
        ids = self.tokenizer(questions).to(pixels.device)
        return [self.config.answers[i] for i in self.answer_logits(pixels, ids).argmax(dim=1).tolist()]

    def save_pretrained(self, directory) -> None:
        """One folder: config.json (base config, answers), model.safetensors, processors."""
        from .base import save_pretrained
        save_pretrained(self, directory)


__all__ = ["VQAConfig", "VQAModel", "check_base"]
