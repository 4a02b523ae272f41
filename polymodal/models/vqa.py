"""A CoCa answering questions by classification over an answer vocabulary (`method: vqa`, the `vqa` eval task).

The question goes through CoCa's causal text tower and its multimodal decoder, which cross-attends to the image
context (the attentional-pooled image tokens); the decoder's normalised state at the question's EOT position
(it has seen the whole question and, through cross-attention, the image) is the multimodal pooled output. An MLP
head maps it to logits over the answer vocabulary (VQAv2 classifiers' "answers as classes", Teney et al. 2018).

The vocabulary (normalised answers of the training set), each answer's training count and the majority answer of
each question type (the baseline the `vqa` task prints beside every number) live in the config, so a saved
`VQAModel` carries everything its evaluation needs. Saved as one folder: `config.json` (`model_type: "vqa"`, the
CoCa's config nested under `base`), `model.safetensors` and the CoCa's processors.
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
    base: dict = field(default_factory=dict)           # the CoCa's config (with its model_type)
    answers: list = field(default_factory=list)        # the A answers (normal form), in logit order
    answer_counts: list = field(default_factory=list)  # how many training questions had each as consensus answer
    type_majority: dict = field(default_factory=dict)  # question type -> its most common training answer
    hidden: int = 0                                    # head MLP width (0 = 2 x the text width)
    dropout: float = 0.1                               # head dropout (training only)
    num_frames: int = 0                                # 0: questions about images; T: about T-frame videos
    motion: bool = False                               # videos: also encode each frame's difference from the last
    model_type: str = "vqa"

    def __post_init__(self):
        super().__post_init__()
        if self.num_frames < 0:
            raise ValueError(f"vqa config: num_frames must be >= 0 (0 = images), got {self.num_frames}")
        if self.motion and self.num_frames < 2:
            raise ValueError(f"vqa config: motion needs videos of >= 2 frames (num_frames), got {self.num_frames}")
        if self.answer_counts and len(self.answer_counts) != len(self.answers):
            raise ValueError(f"vqa config: {len(self.answer_counts)} answer_counts for {len(self.answers)} answers")



class VQAModel(WrapsEncoder, nn.Module):
    """CoCa + answer head: `answer_logits(pixels, ids) -> (B, A)`, `answer(pixels, questions) -> [str]`.

    Args:
        base: a `CoCa` (its decoder reads the question; its image encoder and contrastive heads stay usable).
        answers: the A answers, normalised.
        answer_counts: training counts of each answer (for the majority baseline); default all 1.
        type_majority: question type -> majority training answer.
        hidden: head MLP width (0 = 2 x text width).
        dropout: head dropout.
        num_frames: 0 for images; T > 0 for videos of T frames: every frame's image context goes to the decoder,
            each frame's tokens plus a learned frame embedding (std 1 at the start, so order is visible from the
            first step), concatenated in time order.
        motion: videos only: also encode the T - 1 difference images frame[t] - frame[t-1] (normalised pixels)
            with the same image encoder and append their contexts, each with its own learned embedding. Objects
            moving, growing or changing colour on a static background are all the difference images show; without
            them the tiny encoder's per-frame contexts barely differ within a video (docs/methods.md).
    """

    config_class = VQAConfig

    def __init__(self, base: nn.Module, answers: list, answer_counts: list | None = None,
                 type_majority: dict | None = None, hidden: int = 0, dropout: float = 0.1, num_frames: int = 0,
                 motion: bool = False):
        super().__init__()
        if not answers:
            raise ValueError("VQAModel: an empty answer vocabulary")
        if not hasattr(base, "decoder") or not hasattr(base, "image_context"):
            raise ValueError(f"VQAModel: a {type(base).__name__} has no multimodal decoder; give a CoCa "
                             f"(model_type 'coca', e.g. a sycoca run's out_dir/model)")
        self.base = base
        counts = list(answer_counts) if answer_counts else [1] * len(answers)
        self.config = VQAConfig(base=base.config.to_dict(), answers=list(answers), answer_counts=counts,
                                type_majority=dict(type_majority or {}), hidden=hidden, dropout=dropout,
                                num_frames=num_frames, motion=motion)
        self.config._base = base.config
        width = base.config.text.width
        self.frame_embed = nn.Parameter(torch.randn(num_frames, width)) if num_frames else None   # (T, Wt)
        self.motion_embed = nn.Parameter(torch.randn(num_frames - 1, width)) if motion else None  # (T-1, Wt)
        h = hidden or 2 * width
        self.head = nn.Sequential(nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout), nn.LayerNorm(h),
                                  nn.Linear(h, len(answers)))

    @classmethod
    def from_config(cls, cfg: VQAConfig) -> "VQAModel":
        """A randomly initialised model of a saved config (the weights are loaded after)."""
        from .families import build_model
        return cls(build_model(cfg.base_config()), list(cfg.answers), list(cfg.answer_counts),
                   dict(cfg.type_majority), cfg.hidden, cfg.dropout, cfg.num_frames,
                   cfg.motion)

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
        """The decoder's context: (B, 3, H, W) images -> (B, N, Wt); (B, T, 3, H, W) videos -> (B, T*N, Wt)."""
        m = self.base
        if pixels.dim() == 4:
            if self.frame_embed is not None:
                raise ValueError(f"VQAModel: a video model (num_frames {self.config.num_frames}) got images "
                                 f"{tuple(pixels.shape)}; give (B, T, 3, H, W) frames")
            return m.image_context(m.visual(pixels).tokens)                  # (B, N, Wt)
        if self.frame_embed is None:
            raise ValueError(f"VQAModel: an image model got frames {tuple(pixels.shape)}; train with vqa.media: video")
        B, T = pixels.shape[:2]
        if T > len(self.frame_embed):
            raise ValueError(f"VQAModel: {T} frames, but the model was trained with {len(self.frame_embed)}")
        ctx = m.image_context(m.visual(pixels.flatten(0, 1)).tokens)         # (B*T, N, Wt)
        ctx = ctx.view(B, T, *ctx.shape[1:]) + self.frame_embed[:T, None]    # (B, T, N, Wt)
        if self.motion_embed is None or T < 2:
            return ctx.flatten(1, 2)                                         # (B, T*N, Wt)
        diff = (pixels[:, 1:] - pixels[:, :-1]).flatten(0, 1)               # (B*(T-1), 3, H, W)
        dctx = m.image_context(m.visual(diff).tokens)
        dctx = dctx.view(B, T - 1, *dctx.shape[1:]) + self.motion_embed[:T - 1, None]
        return torch.cat([ctx.flatten(1, 2), dctx.flatten(1, 2)], dim=1)    # (B, (2T-1)*N, Wt)

    def fused(self, pixels: Tensor, ids: Tensor) -> Tensor:
        """The decoder's multimodal pooled output: images (B, 3, H, W) or frames (B, T, 3, H, W) + (B, L) question
        ids -> (B, Wt)."""
        m = self.base
        context = self.context(pixels)                                       # (B, N or T*N, Wt)
        text = m.text(ids)                                                   # tokens (B, L, Wt)
        x = m.decoder(text.tokens, is_causal=True, context=context)          # (B, L, Wt)
        x = m.decoder_norm(x)
        at = m.text._pool_index(ids)                                         # (B,) the question's EOT
        return x[torch.arange(len(ids), device=x.device), at]                       # (B, Wt)

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
        """One folder: config.json (CoCa config, answers), model.safetensors, processors."""
        from .base import save_pretrained
        save_pretrained(self, directory)


__all__ = ["VQAConfig", "VQAModel"]
