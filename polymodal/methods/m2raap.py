"""M2-RAAP (`method: m2raap`): adapting an image-text model to zero-shot video-text retrieval, step by step.

Builds on `video_clip` (same model building: any dual encoder wrapped by `VideoCLIP` with the
`m2raap.temporal` module; STAN's 10x branch learning rate is `optim.lr_scale: {"temporal.": 10}`). The four
steps of the paper map onto:

1. filtering and caption rewriting: `polymodal data filter` (run before training; train on its output);
2. key frames: `data.frame_strategy: keyframes` (decoded every epoch), or frames decoded once into shards by
   `polymodal data frames` and read here with `m2raap.frame_shards`;
3. temporal modelling: `m2raap.temporal` (`kind: stan`, the side branch of docs/methods.md, M2-RAAP);
4. feature enhancement: `m2raap.similarity: mug` (the Mug head) and `m2raap.acg: true` (auxiliary-caption
   guidance: captions from the manifest field `m2raap.aux_field`, e.g. written by `polymodal data aux-captions`
   with a CoCa captioner; embedded by the text tower and fused by a gated residual).

The model is an `M2RAAPModel` (`polymodal.models.video_heads`): the VideoCLIP with the ACG head and the
similarity settings in its own config, so `out_dir/model` loads back (`polymodal.load_model`) as exactly the
model training evaluated, and `polymodal eval out_dir/model --task video_retrieval` scores with Mug / ACG.

Our reconstruction (the authors released no code): the ACG fusion (`models.video_heads.ACGFusion`: gate 0 at
init, identity projection, caption embeddings from the current text tower without gradient), where Mug reads
its frame features (after the STAN branch; the plain image embeddings for `kind: mean`) and frame-shard
reading. Under DDP the Mug loss covers the global batch (`loss.gather: global_with_grad`, the default;
`mug_block_loss`) or each rank's own (`local`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..data.datasets import ImageTextCollate
from ..data.frame_shards import FrameShardDataset
from ..distributed import all_gather_padded, all_gather_with_grad, all_reduce_max, rank, world_size
from ..losses.contrastive import block_infonce, build_contrastive_loss, check_block_gather
from ..models.base import ConfigDict
from ..models.video_heads import (M2RAAPModel, M2RAAPSettings, aux_captions_of, mug_loss, mug_similarity,
                                  pool_frames, text_token_features)
from .base import image_text_dataset
from .clip import trim_padding
from .video_clip import VideoCLIPMethod

@dataclass
class M2RAAPSection(M2RAAPSettings, ConfigDict):
    """The recipe's `m2raap:` section: the model's own settings (`M2RAAPSettings`), its temporal module, the Mug
    training temperature and where decoded frames are read from."""
    temporal: dict = field(default_factory=dict)   # TemporalConfig keys, as video_clip: kind mean|transformer|stan ...
    mug_temperature: float = 0.01   # Mug: cross-entropy temperature (training; 0.01 as Mug-STAN, 0 = the model's learnable logit scale)
    mean_temperature: float = 0.0   # similarity mean: 0 = the model's learnable logit scale | > 0 a fixed temperature (Mug-STAN: 0.01)
    frame_shards: str = ""          # frames decoded once by `polymodal data frames` (used instead of data.train)

    def __post_init__(self):
        from ..models.temporal import TemporalConfig
        TemporalConfig(**self.temporal)            # validates the keys and values now, naming temporal.<key>
        self.check_settings()
        for key in ("mug_temperature", "mean_temperature"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"m2raap.{key}: {getattr(self, key)} must be >= 0 (0 = the model's learnable "
                                  f"logit scale, > 0 a fixed temperature)")


# ---- data: samples carry their aux captions; frame shards -------------------------------------------------
class M2RAAPCollate(ImageTextCollate):
    """`ImageTextCollate` plus `aux_input_ids` (B, K, L) and `aux_mask` (B, K) from each sample's aux captions.

    Args:
        tokenizer, context_length: as for ImageTextCollate.
        aux_field: the sample key holding the aux captions (copied from the record); None = no ACG.
        max_aux: at most this many captions per sample.
    """

    def __init__(self, tokenizer=None, context_length=None, aux_field: str | None = None, max_aux: int = 8):
        super().__init__(tokenizer, context_length)
        self.aux_field, self.max_aux = aux_field, max_aux

    def __call__(self, samples: list[dict | None]) -> dict:
        batch = super().__call__(samples)
        if self.aux_field is None or "input_ids" not in batch:
            return batch
        good = [s for s in samples if s is not None and "_bad" not in s]
        caps = [aux_captions_of(s, self.aux_field, self.max_aux) for s in good]
        K = max(1, max(len(c) for c in caps))
        flat = [c[k] if k < len(c) else "" for c in caps for k in range(K)]
        ids = self._tokenize(flat)                                                    # (B*K, L)
        batch["aux_input_ids"] = ids.view(len(good), K, ids.shape[-1])                # (B, K, L)
        batch["aux_mask"] = torch.tensor([[k < len(c) for k in range(K)] for c in caps])  # (B, K)
        return batch


# ---- the objective --------------------------------------------------------------------------------------
def mug_block_loss(tokens: Tensor, mask: Tensor, frames: Tensor, valid: Tensor | None, tau: float,
                   temperature: float | Tensor, gather: str = "global_with_grad") -> Tensor:
    """The Mug cross-entropy of a batch, over the global batch under DDP.

    With `gather="global_with_grad"` and several ranks, token features (padded to the longest text of any
    rank) and frame features are gathered with gradient, and rank r scores its texts against every video and
    every text against its videos (`losses.contrastive.block_infonce`): averaged over ranks, the loss and its
    gradients equal `mug_loss` of one process on the whole batch. `"local"` (or one process) is `mug_loss` of
    the local batch.

    Args:
        tokens: (B, L, E) L2-normalised text token features; mask (B, L) bool, True = real token.
        frames: (B, T, E) L2-normalised frame features; valid (B, T) bool or None (all real).
        tau: `m2raap.mug_tau`.
        temperature: logits = scores / temperature (a float, or a tensor such as 1 / the learnable logit scale).
        gather: "local" | "global_with_grad".
    Returns:
        Scalar loss.
    """
    if gather == "local" or world_size() == 1:
        return mug_loss(mug_similarity(tokens, mask, frames, valid, tau=tau, block_size=len(frames)), temperature)
    if valid is None:
        valid = torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    length = all_reduce_max(tokens.shape[1], tokens.device)                  # one collective for tokens and mask
    all_tokens = all_gather_padded(tokens, 1, 0.0, size=length)
    all_mask = all_gather_padded(mask, 1, False, size=length)
    all_frames, all_valid = all_gather_with_grad(frames), all_gather_padded(valid, 1, False, size=valid.shape[1])
    rows = mug_similarity(tokens, mask, all_frames, all_valid, tau=tau, block_size=len(all_frames))   # (B, W*B)
    cols = mug_similarity(all_tokens, all_mask, frames, valid, tau=tau, block_size=len(all_tokens))   # (W*B, B)
    return block_infonce(rows / temperature, cols / temperature, rank() * len(frames))


class M2RAAPTask(nn.Module):
    """Video-text training with the optional Mug similarity and ACG fusion of an `M2RAAPModel`.

    Batch: `frames` (B, T, 3, H, W), `frame_valid` (B, T), `input_ids` (B, L), and with ACG `aux_input_ids`
    (B, K, L) and `aux_mask` (B, K).

    A temperature of 0 uses the model's learnable logit scale (logits = scale * score, as a CLIP trains), a
    positive one is fixed (logits = score / temperature; the logit scale then gets no gradient). An ablation of the
    head holds this equal across rows: Mug-STAN trains both its heads at 0.01.

    Args:
        model: an M2RAAPModel (its config says which heads are on).
        mug_temperature: the Mug cross-entropy temperature (0 = learnable scale).
        loss: the recipe's `loss:` section (used by `similarity: mean`).
        mean_temperature: the mean head's temperature (0 = learnable scale).
    """

    def __init__(self, model: M2RAAPModel, mug_temperature: float = 0.01, loss=None, mean_temperature: float = 0.0):
        super().__init__()
        self.model, self.mug_temperature, self.mean_temperature = model, mug_temperature, mean_temperature
        self.loss = build_contrastive_loss(loss)
        self.gather = getattr(loss, "gather", "local")

    def _scale(self, temperature: float) -> Tensor:
        """Logits per unit of score: the model's learnable scale (temperature 0) or 1 / temperature."""
        if temperature == 0:
            return self.model.scale()
        return torch.tensor(1.0 / temperature, device=self.model.scale().device)

    def forward(self, batch: dict) -> dict:
        m, c = self.model, self.model.config
        valid = batch.get("frame_valid")
        x = m.fused_frames(batch["frames"], valid, batch.get("aux_input_ids"), batch.get("aux_mask"))  # (B, T, E)
        ids = trim_padding(batch["input_ids"], c.text.pad_token_id)
        out: dict = {}
        if c.similarity == "mug":
            tokens, mask = text_token_features(m, ids)                                # (B, L, E), (B, L)
            frames = torch.nn.functional.normalize(x, dim=-1)
            scale = self._scale(self.mug_temperature)
            loss = mug_block_loss(tokens, mask, frames, valid, c.mug_tau, 1.0 / scale, self.gather)
            out["mug"] = loss.detach()
        else:
            video = pool_frames(m, x, valid)                                          # (B, E)
            text = m.encode_text(ids)                                                 # (B, E)
            scale = self._scale(self.mean_temperature)
            loss = self.loss(video, text, scale)
            out["contrastive"] = loss.detach()
        out["logit_scale"] = scale.detach()
        if m.acg is not None:
            out["acg_gate"] = m.acg.gate.detach().abs().mean()
        return {"loss": loss, **out}


# ---- the method -----------------------------------------------------------------------------------------
class M2RAAPMethod(VideoCLIPMethod):
    """`method: m2raap`."""

    config_cls = M2RAAPSection
    media = "video"

    def validate(self) -> None:
        c = self.cfg
        kind = c.temporal.get("kind", "mean")
        if c.similarity == "mug" and kind == "transformer":
            raise ValueError("m2raap.similarity=mug scores frame features, which a temporal transformer only pools; "
                             "use m2raap.temporal.kind=stan (frames mixed in time by the branch) or mean")
        if c.similarity == "mug" and self.run.loss.kind != "infonce":
            raise ValueError(f"m2raap.similarity=mug trains with its own cross-entropy (m2raap.mug_temperature); "
                             f"loss.kind={self.run.loss.kind!r} does not apply: set loss.kind=infonce")
        if c.similarity == "mug":
            check_block_gather(self.run.loss.gather, "m2raap.similarity=mug supports")
        if c.frame_shards and self.run.data.langs != ["en"]:
            raise ValueError("m2raap.frame_shards reads only the `caption` captions; set data.langs=[en]")

    def paths(self) -> list[str]:
        return [self.cfg.frame_shards] if self.cfg.frame_shards else []

    def check_data(self) -> None:
        """ACG on with no auxiliary caption in the training or a video evaluation's manifest: nothing to fuse."""
        c = self.cfg
        if not c.acg:
            return
        from ..data.manifests import read_manifest
        manifests = [("data.train", self.run.data.train)] if self.run.data.train and not c.frame_shards else []
        manifests += [(f"eval {s.task}", s.data) for s in self.run.eval.specs() if s.task == "video_retrieval"]
        for key, path in manifests:
            records = read_manifest(path, on_bad_record="skip", required=(), media="none", allow_empty=True).records
            if records and not any(aux_captions_of(r, c.aux_field, c.max_aux) for r in records):
                raise ConfigError(f"m2raap.acg is on but no record of {path} ({key}) has a '{c.aux_field}' caption: "
                                  f"write them with `polymodal data aux-captions {path} --captioner COCA_MODEL --out "
                                  f"...` and point {key.split()[0]} at the result, or set m2raap.acg=false")

    def build_model(self, tokenizer) -> nn.Module:
        """The video model (as `video_clip` builds it) with the recipe's M2-RAAP settings; a saved M2-RAAP model
        continues with its own heads (its settings must equal the recipe's)."""
        model = super().build_model(tokenizer)
        settings = self.cfg.settings()
        if isinstance(model, M2RAAPModel):
            differ = [k for k, v in settings.items() if getattr(model.config, k) != v]
            if differ:
                raise ValueError(f"model.path {self.run.model.path} is an M2-RAAP model with other settings than the "
                                 f"recipe's m2raap section ({', '.join(f'{k}: {getattr(model.config, k)!r}' for k in differ)}); "
                                 f"set them to the model's values")
            return model
        return M2RAAPModel.from_video_model(model, **settings)

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        c, d = self.cfg, self.run.data
        extra = ("label", "labels", "lang") + ((c.aux_field,) if c.acg else ())
        if c.frame_shards:
            from ..data.config import builder_from_config
            builder = builder_from_config(d, model.image_transform, model.tokenizer, self.run.train.seed,
                                          media="video", extra_keys=extra)
            return FrameShardDataset(c.frame_shards, builder, d.on_bad_record), None
        dataset, per_epoch = image_text_dataset(self.run, model, rank, world_size, media="video", extra_keys=extra)
        if c.acg and rank == 0:
            records = dataset.manifest.records
            missing = sum(not aux_captions_of(r, c.aux_field, c.max_aux) for r in records)
            if missing:
                print(f"warning: m2raap.acg is on but {missing} of {len(records)} training videos in {d.train} have no "
                      f"'{c.aux_field}' caption (ACG leaves those unchanged); write them with `polymodal data "
                      f"aux-captions {d.train} --captioner COCA_MODEL --out ...`", flush=True)
        return dataset, per_epoch

    def collate(self, model: nn.Module):
        tok = model.tokenizer
        return M2RAAPCollate(tok, getattr(tok, "context_length", None),
                             self.cfg.aux_field if self.cfg.acg else None, self.cfg.max_aux)

    def build_task(self, model: nn.Module) -> nn.Module:
        return M2RAAPTask(model, self.cfg.mug_temperature, self.run.loss, self.cfg.mean_temperature)

__all__ = ["M2RAAPSection", "M2RAAPMethod", "M2RAAPTask", "M2RAAPCollate", "FrameShardDataset", "mug_block_loss"]
