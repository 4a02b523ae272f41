"""M2-RAAP (`method: m2raap`): adapting an image-text model to zero-shot video-text retrieval, step by step.

Builds on `video_clip` (same model building: any dual encoder wrapped by `VideoCLIP` with the
`m2raap.temporal` module; STAN's 10x branch learning rate is `optim.lr_scale: {"temporal.": 10}`). The four
steps of the paper map onto:

1. filtering and caption rewriting: `polymodal.eval.filtering` (run before training; train on its output);
2. key frames: `data.frame_strategy: keyframes` (decoded every epoch), or frames decoded once into shards by
   `polymodal data frames` and read here with `m2raap.frame_shards`;
3. temporal modelling: `m2raap.temporal` (`kind: stan`, the side branch of METHODS.md section 5);
4. feature enhancement: `m2raap.similarity: mug` (the Mug head, `models.video_heads`) and `m2raap.acg: true`
   (auxiliary-caption guidance: captions from the manifest field `m2raap.aux_field`, or generated per frame by
   a CoCa captioner at `m2raap.aux_captioner`, embedded by the text tower and fused by a gated residual).

Our reconstruction (the authors released no code): the ACG fusion (`models.video_heads.ACGFusion`: gate 0 at
init, identity projection, caption embeddings from the current text tower without gradient), where Mug reads
its frame features (after the STAN branch; the plain image embeddings for `kind: mean`), frame-shard reading,
and the captioner's frame choice (uniform frames). Under DDP the Mug loss covers the global batch
(`loss.gather: global_with_grad`, the default; `mug_block_loss`) or each rank's own (`local`). The final `out_dir/model` is the VideoCLIP; the ACG head is saved beside its weights as
`m2raap_heads.safetensors` with `m2raap.json` (read them back with `load_m2raap`).
"""
from __future__ import annotations

import json
import os
import types
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.datasets import ImageTextCollate
from ..data.frame_shards import FrameShardDataset
from ..distributed import all_gather_padded, all_gather_with_grad, all_reduce_max, rank, world_size
from ..losses.contrastive import block_infonce, build_contrastive_loss, check_block_gather
from ..models.base import ConfigDict
from ..models.video_heads import ACG_LEVELS, ACGFusion, mug_loss, mug_similarity, pool_frames, text_token_features
from .base import image_text_dataset
from .clip import trim_padding
from .video_clip import VideoCLIPMethod

SIMILARITIES = ("mean", "mug")
HEADS_FILE = "m2raap_heads.safetensors"
HEADS_CONFIG = "m2raap.json"


@dataclass
class M2RAAPConfig(ConfigDict):
    """The recipe's `m2raap:` section."""
    temporal: dict = field(default_factory=dict)   # TemporalConfig keys, as video_clip: kind mean|transformer|stan ...
    similarity: str = "mean"        # "mean": cosine of pooled video and text embeddings | "mug": the Mug head
    mug_tau: float = 100.0          # Mug: softmax(tau R) inside the head
    mug_temperature: float = 0.01   # Mug: cross-entropy temperature
    mug_block: int = 64             # Mug evaluation: texts/videos per block (bounded memory)
    acg: bool = False               # auxiliary-caption guidance on/off
    acg_level: str = "video"        # "video": mean caption embedding added to every frame | "frame": caption k, frame k
    aux_field: str = "aux_captions"  # record field with the auxiliary caption(s): a string or a list
    aux_captioner: str = ""         # a CoCa model folder: generate the aux captions instead of reading aux_field
    aux_frames: int = 1             # captioner: frames captioned per video (uniformly spread)
    max_aux: int = 8                # at most this many aux captions per video (the first ones)
    frame_shards: str = ""          # frames decoded once by `polymodal data frames` (used instead of data.train)

    def __post_init__(self):
        from ..models.temporal import TemporalConfig
        TemporalConfig(**self.temporal)            # validates the keys and values now, naming temporal.<key>
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"m2raap.similarity: {self.similarity!r} is not one of {', '.join(SIMILARITIES)}")
        if self.acg_level not in ACG_LEVELS:
            raise ValueError(f"m2raap.acg_level: {self.acg_level!r} is not one of {', '.join(ACG_LEVELS)}")
        for key in ("mug_tau", "mug_temperature"):
            if not getattr(self, key) > 0:
                raise ValueError(f"m2raap.{key}: {getattr(self, key)} must be > 0")
        for key in ("mug_block", "aux_frames", "max_aux"):
            if getattr(self, key) < 1:
                raise ValueError(f"m2raap.{key}: {getattr(self, key)} must be >= 1")


# ---- auxiliary captions ---------------------------------------------------------------------------------
def aux_captions_of(record: dict, aux_field: str, max_aux: int) -> list[str]:
    """The record's auxiliary captions (a string or a list in `aux_field`), at most `max_aux`; [] if none."""
    value = record.get(aux_field)
    if value is None:
        return []
    caps = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    return [c for c in caps if c.strip()][:max_aux]


@torch.no_grad()
def caption_videos(captioner, records: list[dict], num_frames: int = 1, batch_size: int = 16,
                   max_len: int | None = None) -> list[list[str]]:
    """Caption `num_frames` uniformly spread frames of each record's video with a CoCa (greedy decoding).

    Args:
        captioner: a CoCa (`generate`, `tokenizer`, `image_transform`).
        records: records with absolute `video` paths.
        num_frames: frames captioned per video.
        batch_size: frames per `generate` call.
        max_len: caption length limit (default the text context length).
    Returns:
        one list of `num_frames` captions per record, in frame order.
    """
    from PIL import Image

    from ..data.video import read_video
    if captioner.tokenizer is None:
        raise ValueError("m2raap.aux_captioner: the captioner has no tokenizer; save it with one")
    device = next(captioner.parameters()).device
    was_training = captioner.training
    captioner.eval()
    pixels, owner = [], []
    for i, r in enumerate(records):
        clip = read_video(r["video"], num_frames=num_frames)
        pixels.extend(captioner.image_transform(Image.fromarray(f.numpy())) for f in clip.frames)
        owner.extend([i] * len(clip.frames))
    out: list[list[str]] = [[] for _ in records]
    for s in range(0, len(pixels), batch_size):
        ids = captioner.generate(torch.stack(pixels[s:s + batch_size]).to(device), method="greedy", max_len=max_len)
        for j, row in enumerate(ids.cpu()):
            out[owner[s + j]].append(captioner.tokenizer.decode(row))
    captioner.train(was_training)
    return out


def add_aux_captions(manifest: str | os.PathLike, captioner, out: str | os.PathLike, aux_field: str = "aux_captions",
                     num_frames: int = 1, on_bad_record: str = "error") -> str:
    """Write a copy of `manifest` whose records carry `aux_field` generated by `captioner` (see `caption_videos`).

    Returns:
        the written manifest's path.
    """
    from ..data.manifests import read_manifest, write_manifest
    records = read_manifest(manifest, on_bad_record=on_bad_record, media="video").records
    caps = caption_videos(captioner, records, num_frames)
    write_manifest([{**r, aux_field: c} for r, c in zip(records, caps)], out)
    return str(out)


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
def encode_aux(model: nn.Module, aux_ids: Tensor, aux_mask: Tensor) -> Tensor:
    """(B, K, L) aux-caption ids -> (B, K, E) normalised text embeddings (no gradient; padding rows zero)."""
    B, K, L = aux_ids.shape
    ids = trim_padding(aux_ids.reshape(B * K, L), model.config.text.pad_token_id)
    with torch.no_grad():
        emb = model.encode_text(ids).view(B, K, -1)                                  # (B, K, E)
    return emb * aux_mask[..., None].to(emb.dtype)


def mug_block_loss(tokens: Tensor, mask: Tensor, frames: Tensor, valid: Tensor | None, tau: float,
                   temperature: float, gather: str = "global_with_grad") -> Tensor:
    """The Mug cross-entropy of a batch, over the global batch under DDP.

    With `gather="global_with_grad"` and several ranks, token features (padded to the longest text of any
    rank) and frame features are gathered with gradient, and rank r scores its texts against every video and
    every text against its videos (`losses.contrastive.block_infonce`): averaged over ranks, the loss and its
    gradients equal `mug_loss` of one process on the whole batch. `"local"` (or one process) is `mug_loss` of
    the local batch.

    Args:
        tokens: (B, L, E) L2-normalised text token features; mask (B, L) bool, True = real token.
        frames: (B, T, E) L2-normalised frame features; valid (B, T) bool or None (all real).
        tau, temperature: `m2raap.mug_tau`, `m2raap.mug_temperature`.
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
    """Video-text training with the optional Mug similarity and ACG fusion.

    Batch: `frames` (B, T, 3, H, W), `frame_valid` (B, T), `input_ids` (B, L), and with ACG `aux_input_ids`
    (B, K, L) and `aux_mask` (B, K).

    Args:
        model: a VideoCLIP.
        cfg: the `m2raap:` section.
        loss: the recipe's `loss:` section (used by `similarity: mean`).
    """

    def __init__(self, model: nn.Module, cfg: M2RAAPConfig, loss=None):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.loss = build_contrastive_loss(loss)
        self.gather = getattr(loss, "gather", "local")
        self.acg = ACGFusion(model.config.embed_dim, cfg.acg_level) if cfg.acg else None

    def frame_features(self, frames: Tensor, valid: Tensor | None, aux_ids: Tensor | None = None,
                       aux_mask: Tensor | None = None) -> Tensor:
        """(B, T, E) frame features (unnormalised), ACG-fused when ACG is on and aux ids are given."""
        x = self.model.encode_frames(frames, valid)                                   # (B, T, E)
        if self.acg is not None and aux_ids is not None:
            x = self.acg(x, encode_aux(self.model, aux_ids, aux_mask), aux_mask)
        return x

    def forward(self, batch: dict) -> dict:
        valid = batch.get("frame_valid")
        x = self.frame_features(batch["frames"], valid, batch.get("aux_input_ids"), batch.get("aux_mask"))
        ids = trim_padding(batch["input_ids"], self.model.config.text.pad_token_id)
        out: dict = {}
        if self.cfg.similarity == "mug":
            tokens, mask = text_token_features(self.model, ids)                       # (B, L, E), (B, L)
            frames = torch.nn.functional.normalize(x, dim=-1)
            loss = mug_block_loss(tokens, mask, frames, valid, self.cfg.mug_tau, self.cfg.mug_temperature,
                                  self.gather)
            out["mug"] = loss.detach()
        else:
            video = pool_frames(self.model, x, valid)                                 # (B, E)
            text = self.model.encode_text(ids)                                        # (B, E)
            loss = self.loss(video, text, self.model.scale())
            out["contrastive"] = loss.detach()
            out["logit_scale"] = self.model.scale().detach()
        if self.acg is not None:
            out["acg_gate"] = self.acg.gate.detach().abs().mean()
        return {"loss": loss, **out}


# ---- evaluation with Mug / ACG --------------------------------------------------------------------------
@torch.no_grad()
def m2raap_scores(task: M2RAAPTask, records: list[dict], caption_key: str = "caption", num_frames: int = 8,
                  strategy: str = "uniform", batch_size: int = 16, on_bad_record: str = "error",
                  aux: list[list[str]] | None = None, where: str = "manifest"
                  ) -> tuple[Tensor, list[int], list[dict], dict]:
    """Every caption of the records scored against every readable video with the task's heads.

    Args:
        task: an M2RAAPTask (its model, Mug / ACG heads and config).
        records: manifest records with absolute `video` paths and captions (and `aux_field` when ACG reads it).
        caption_key: "caption", "caption_zh" ... (plural lists used when present).
        num_frames, strategy: frame sampling (see `data.video.read_video`).
        batch_size: videos encoded at once.
        on_bad_record: "error" | "skip" for unreadable videos.
        aux: aux captions per record (e.g. from a captioner), overriding the record field.
        where: the manifest's name for messages.
    Returns:
        (scores (N_texts, N_videos) float32: cosine of pooled embeddings, or Mug; the video index of each text;
        the kept records; {"num_skipped", "num_without_aux"}).
    """
    from ..eval.suite import captions_by_record, encode_texts
    from ..eval.video_retrieval import clip_batches
    model, cfg = task.model, task.cfg
    device = next(model.parameters()).device
    kept, feats, valids = [], [], []
    without_aux = 0
    for idx, frames, valid, _ in clip_batches(model, records, num_frames, strategy, batch_size,
                                              on_bad_record=on_bad_record, where=where):
        caps = [aux[i][:cfg.max_aux] if aux is not None else aux_captions_of(records[i], cfg.aux_field, cfg.max_aux)
                for i in idx]
        without_aux += sum(not c for c in caps)
        aux_ids = aux_mask = None
        if task.acg is not None:
            K = max(1, max(len(c) for c in caps))
            ids = model.tokenizer([c[k] if k < len(c) else "" for c in caps for k in range(K)])
            aux_ids = ids.view(len(caps), K, -1).to(device)                           # (B, K, L)
            aux_mask = torch.tensor([[k < len(c) for k in range(K)] for c in caps], device=device)
        x = task.frame_features(frames, valid, aux_ids, aux_mask)                     # (B, T, E)
        if cfg.similarity == "mug":
            feats.append(torch.nn.functional.normalize(x, dim=-1).float().cpu())
            valids.append(valid.cpu())
        else:
            feats.append(pool_frames(model, x, valid).float().cpu())
        kept.extend(records[i] for i in idx)
    skipped = len(records) - len(kept)
    texts, owner = captions_by_record(kept, caption_key, where)
    if cfg.similarity == "mug":
        vid, vmask = torch.cat(feats), torch.cat(valids)
        tok, tmask = [], []
        for s in range(0, len(texts), 256):
            ids = trim_padding(model.tokenizer(texts[s:s + 256]), model.config.text.pad_token_id).to(device)
            t, m = text_token_features(model, ids)
            tok.append(t.float().cpu())
            tmask.append(m.cpu())
        L = max(t.shape[1] for t in tok)
        tok = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])) for t in tok])       # (N_t, L, E)
        tmask = torch.cat([torch.nn.functional.pad(m, (0, L - m.shape[1])) for m in tmask])         # (N_t, L)
        scores = mug_similarity(tok, tmask, vid, vmask, tau=cfg.mug_tau, block_size=cfg.mug_block)  # (N_t, N_v)
    else:
        scores = encode_texts(model, texts) @ torch.cat(feats).T                                    # (N_t, N_v)
    return scores, owner, kept, {"num_skipped": skipped, "num_without_aux": without_aux}


def m2raap_video_retrieval(task: M2RAAPTask, manifest, caption_key: str = "caption", limit: int = 0,
                           num_frames: int = 8, strategy: str = "uniform", batch_size: int = 16,
                           on_bad_record: str = "error", aux: list[list[str]] | None = None) -> dict:
    """Text<->video retrieval with the task's similarity (cosine or Mug) and ACG fusion (see `m2raap_scores`).

    Args:
        task: an M2RAAPTask.
        manifest: JSONL/CSV of `video` records with captions.
        caption_key, limit, num_frames, strategy, batch_size, on_bad_record: as in `video_retrieval_eval`.
        aux: aux captions per record (of the first `limit` records), overriding the manifest field.
    Returns:
        the keys of `video_retrieval_eval`, plus `num_without_aux` (ACG runs) and `num_skipped` (when > 0).
    """
    from ..eval.retrieval import retrieval_metrics
    from ..eval.suite import read_records
    records = read_records(manifest, limit, on_bad_record, required=("video",), media="video")
    was_training = task.training
    task.eval()
    try:
        scores, owner, kept, info = m2raap_scores(task, records, caption_key, num_frames, strategy, batch_size,
                                                  on_bad_record, aux, str(manifest))
    finally:
        task.train(was_training)
    metrics = retrieval_metrics(scores.T.contiguous(), torch.tensor(owner))
    out = {k.replace("image", "video"): v for k, v in metrics.items()}
    out.update(num_videos=len(kept), num_texts=len(owner))
    if task.acg is not None:
        out["num_without_aux"] = info["num_without_aux"]
    if info["num_skipped"]:
        import warnings
        warnings.warn(f"{manifest}: skipped {info['num_skipped']} video(s) that cannot be read")
        out["num_skipped"] = info["num_skipped"]
    return out


# ---- saving / loading the heads -------------------------------------------------------------------------
class _ModelWithHeads:
    """What `final_model` returns: saves the VideoCLIP, then the M2-RAAP heads into the same folder."""

    def __init__(self, task: M2RAAPTask):
        self.task = task

    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_file

        from ..fileio import atomic_open
        self.task.model.save_pretrained(directory)
        directory = Path(directory)
        if self.task.acg is not None:
            state = {k: v.detach().contiguous() for k, v in self.task.acg.state_dict().items()}
            save_file(state, str(directory / HEADS_FILE))
        with atomic_open(directory / HEADS_CONFIG, "w", encoding="utf-8") as f:
            json.dump(self.task.cfg.to_dict(), f, indent=1)


def load_m2raap(directory) -> M2RAAPTask:
    """A saved M2-RAAP run's `out_dir/model` back as an `M2RAAPTask` (VideoCLIP + ACG head, in eval mode)."""
    from safetensors.torch import load_file

    from ..config import from_dict
    from ..hub import load_model
    directory = Path(directory)
    model = load_model(directory)
    cfg_file = directory / HEADS_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: {directory} is not an M2-RAAP model folder "
                                f"(load it with polymodal.load_model instead)")
    cfg = from_dict(M2RAAPConfig, json.loads(cfg_file.read_text()), str(cfg_file))
    task = M2RAAPTask(model, cfg)
    if task.acg is not None:
        task.acg.load_state_dict(load_file(str(directory / HEADS_FILE)))
    return task.eval()


# ---- the method -----------------------------------------------------------------------------------------
class M2RAAPMethod(VideoCLIPMethod):
    """`method: m2raap`."""

    config_cls = M2RAAPConfig
    media = "video"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg)
        self._captioner = None
        self._aux_cache: dict[str, list[list[str]]] = {}

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
        return [p for p in (self.cfg.frame_shards, self.cfg.aux_captioner) if p]

    def captioner(self):
        """The CoCa at `m2raap.aux_captioner`, loaded once."""
        if self._captioner is None:
            from ..hub import load_model
            self._captioner = load_model(self.cfg.aux_captioner).eval()
            if not hasattr(self._captioner, "generate"):
                raise ValueError(f"m2raap.aux_captioner: {self.cfg.aux_captioner} is not a captioner (model_type "
                                 f"coca); give a CoCa / SyCoCa model folder")
        return self._captioner

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        c, d = self.cfg, self.run.data
        extra = ("label", "labels", "lang") + ((c.aux_field,) if c.acg else ())
        if c.frame_shards:
            from ..data.config import builder_from_config
            builder = builder_from_config(d, model.image_transform, model.tokenizer, self.run.train.seed,
                                          media="video", extra_keys=extra)
            return FrameShardDataset(c.frame_shards, builder, d.on_bad_record), None
        run = self.run
        if c.acg and c.aux_captioner:
            out = Path(self.run.out_dir) / "train_aux.jsonl"
            if not out.is_file():                     # a resumed run reuses the captions it trained on
                add_aux_captions(d.train, self.captioner(), out, c.aux_field, c.aux_frames, d.on_bad_record)
            run = types.SimpleNamespace(data=replace(d, train=str(out)), train=self.run.train)
        return image_text_dataset(run, model, rank, world_size, media="video", extra_keys=extra)

    def collate(self, model: nn.Module):
        tok = model.tokenizer
        return M2RAAPCollate(tok, getattr(tok, "context_length", None),
                             self.cfg.aux_field if self.cfg.acg else None, self.cfg.max_aux)

    def build_task(self, model: nn.Module) -> nn.Module:
        return M2RAAPTask(model, self.cfg, self.run.loss)

    def _aux_for(self, manifest: str, spec_options: dict) -> list[list[str]] | None:
        if not (self.cfg.acg and self.cfg.aux_captioner):
            return None
        if manifest not in self._aux_cache:
            from ..eval.suite import read_records
            records = read_records(manifest, spec_options.get("limit", 0), spec_options.get("on_bad_record", "error"),
                                   required=("video",), media="video")
            self._aux_cache[manifest] = caption_videos(self.captioner(), records, self.cfg.aux_frames)
        return self._aux_cache[manifest]

    def evaluate(self, task: nn.Module, specs: list, progress: bool = False) -> dict:
        """Video retrieval through the task's heads (Mug / ACG) when they are on; other tasks as usual."""
        from ..eval.tasks import evaluate
        own = [s for s in specs if s.task == "video_retrieval" and (self.cfg.similarity == "mug" or self.cfg.acg)]
        rest = [s for s in specs if s not in own]
        out = evaluate(task.model, rest, progress=progress) if rest else {}
        was_training = task.training
        task.eval()
        try:
            for spec in own:
                o = dict(spec.options)
                lang = o.pop("lang", "en")
                o.pop("progress", None)
                o.pop("cache", None)
                m = m2raap_video_retrieval(task, spec.data, "caption" if lang == "en" else f"caption_{lang}",
                                           aux=self._aux_for(spec.data, o), **o)
                out.update({f"{spec.prefix}/{k}": v for k, v in m.items()})
        finally:
            task.train(was_training)
        return out

    def final_model(self, task: nn.Module):
        return _ModelWithHeads(task)


__all__ = ["M2RAAPConfig", "M2RAAPMethod", "M2RAAPTask", "M2RAAPCollate", "FrameShardDataset", "caption_videos",
           "add_aux_captions", "aux_captions_of", "encode_aux", "m2raap_scores", "m2raap_video_retrieval",
           "load_m2raap", "mug_block_loss"]
