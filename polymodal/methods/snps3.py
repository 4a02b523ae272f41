"""SNP-S3 (`method: snps3`): one shared BERT-type network, significant-word masking (MSSM) and local
vision-word matching (LVWM) for video-text pre-training.

Model: `polymodal.models.fusion.SNPS3Model` (a ViT, the shared BERT network with a separate cross pooler,
level-1 heads, the level-2 score MLP, ITM and MLM heads); `snps3.shared: false` gives the three-encoder
baseline. It needs a BERT-style tokenizer with [MASK] (`tokenizer.kind: wordpiece`).

Losses (summed with `snps3.weights`, the authors use 1 each); which caption each path sees follows the
released code: level 1 and LVWM the unmasked caption, the cross pass (MLM, level 2, ITM) the masked one.

- level 1: dual-encoder contrast per clip: MoCo (momentum keys, queue negatives only, keys of the query's own video
  left out; the authors' setting) from a saved start, in-batch MIL-NCE over clips from random weights
  (`snps3.level1: auto`; `moco` / `in_batch` force one);
- LVWM: K significant-token states h_k of the text pass, S = logsumexp_k <h_k, v_clip>, MIL-NCE over clips;
  under DDP the two MIL-NCE losses cover the global batch (`loss.gather: global_with_grad`, the default; see
  `clip_contrast_losses`), the cross-encoder losses below each rank's own batch;
- level 2: the score MLP on the cross-pooled output for every text x video pair of the batch, MIL-NCE;
- ITM: the matched pair against one false caption (another video's caption of the batch);
- MLM on the cross pass with MSSM (`snps3.masking: mssm`) or plain MLM (`mlm`);
- text_mlm (weight 0 unless set): MLM on the text pass over the masked caption, the caption-MLM stand-in's objective
  (`recipes/snps3_pretrain_mlm.yaml`); passes whose losses all have weight 0 are not run.

Significant words are counted once on the training captions (`polymodal.data.masking`), saved as
`significant_words.json` in the run folder and carried in the model's config (so a saved model evaluates with the
masking rule it was trained with).

Evaluation `snps3_retrieval` (this module's `snps3_retrieval_task`): dual-encoder text<->video R@1/5/10 (and
re-ranking of each text's top-k videos by the level-2 cross score, `rerank_top_k`), masked-token accuracy of
the cross pass on significant and on other words (every content token masked alone), and word-level
retrieval with the LVWM score (each significant token of a caption ranks the videos; positives are the
videos whose captions contain that token): precision@1 and mAP beside their chance values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.masking import (DEFAULT_STOP_WORDS, IGNORE_INDEX, MaskingRule, batch_rng, load_or_count, mask_batch,
                            remask_by_importance, significant_positions)
from ..data.text import trim_padding
from ..distributed import all_gather_padded, all_gather_with_grad, rank, world_size
from ..losses.contrastive import check_block_gather
from ..losses.matching import KeyQueue, itm_loss, lvwm_scores, mil_nce, mil_nce_blocks, moco_loss
from ..data.manifests import all_captions
from ..models.base import ConfigDict
from .base import Method

EVAL_TASK = "snps3_retrieval"
WORDS_FILE = "significant_words.json"
LOSS_NAMES = ("level1", "lvwm", "level2", "itm", "mlm", "text_mlm")
DEFAULT_WEIGHTS = {"level1": 1.0, "lvwm": 1.0, "level2": 1.0, "itm": 1.0, "mlm": 1.0, "text_mlm": 0.0}


@dataclass
class SNPS3Config(ConfigDict):
    """The recipe's `snps3:` section."""
    vision: dict = field(default_factory=lambda: {"image_size": 32,  # vision tower (frame patches) sizes
                                                   "patch_size": 8, "width": 64, "layers": 2,
                                                   "heads": 4})
    text: dict = field(default_factory=lambda: {"width": 64, "layers": 2, "heads": 4, "context_length": 30})  # text
    shared: bool = True              # False = three-encoder baseline
    frames_per_clip: int = 1         # frames per visual token
    pool: str = "cls"                # the text pooler reads "cls" (authors) or the "mean" of real tokens
    cross_pool: str = ""             # the cross pooler reads "cls" (authors) or "mean"; "" = as pool
    text_head: str = "none"          # level-1 text feature: "none" = normalize(pooler) (authors) | "mlp" (ours)
    video_score: str = "logsumexp"   # retrieval score: "logsumexp" over clips (authors) | "mean" clip feature
    masking: str = "mssm"            # "mssm" | "mlm"
    attention_remask: float = 0.0    # share of batches whose cross-pass MLM input is re-masked by attention
                                     # importance of the text pass (authors: about half); 0 = off
    mask_ratio: float = 0.15         # share of text tokens masked for MLM/MSSM
    top_k: int = 3000                # significant = rank <= top_k
    stop_words: list = field(default_factory=lambda: list(DEFAULT_STOP_WORDS))  # never significant
    significant_words: str = ""      # JSON list; "" = <out_dir>/significant_words.json (counted once)
    vision_init: str = ""            # a saved model (e.g. the CLIP stand-in) whose ViT initialises this one's
                                     # (same sizes; from-scratch runs only); "" = random
    lvwm: bool = True                # local vision-word matching loss
    lvwm_k: int = 3                  # LVWM: frames matched per word (top-k)
    level1: str = "auto"             # "moco" (authors: momentum keys, queue negatives) | "in_batch" (MIL-NCE
                                     # over clips) | "auto": moco when the run starts from model.path, else in_batch
    queue_size: int = 16384          # MoCo queue length (text keys; clip keys in the clip queue)
    queue_exclude_own: bool = True   # leave keys of the query's own video out of its queue negatives
    momentum: float = 0.9999         # MoCo momentum-encoder decay
    temperature: float = 0.05        # contrastive temperature
    weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))  # per-loss weights; text_mlm
                                     # (MLM on the text pass over the masked caption) is the stand-in's objective

    def __post_init__(self):
        from ..config import ConfigError
        if self.masking not in ("mssm", "mlm"):
            raise ConfigError(f"snps3.masking: {self.masking!r} is not one of mssm, mlm")
        unknown = [k for k in self.weights if k not in LOSS_NAMES]
        if unknown:
            raise ConfigError(f"snps3.weights: unknown loss(es) {', '.join(unknown)}; known: {', '.join(LOSS_NAMES)}")
        self.weights = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in self.weights.items()}}
        if self.level1 not in ("auto", "moco", "in_batch"):
            raise ConfigError(f"snps3.level1: {self.level1!r} is not one of auto, moco, in_batch")
        if not 0 <= self.attention_remask <= 1:
            raise ConfigError(f"snps3.attention_remask: {self.attention_remask} must be in [0, 1]")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"snps3.mask_ratio: {self.mask_ratio} must be in (0, 1)")
        if self.lvwm_k < 1 or self.top_k < 1 or self.queue_size < 1 or self.frames_per_clip < 1:
            raise ConfigError("snps3.lvwm_k, top_k, queue_size and frames_per_clip must be >= 1")
        if not 0 <= self.momentum < 1 or self.temperature <= 0:
            raise ConfigError(f"snps3.momentum ({self.momentum}) must be in [0, 1) and snps3.temperature "
                              f"({self.temperature}) > 0")

    def model_config(self):
        """The `FusionConfig` of the model these settings build."""
        from ..models.fusion import FusionConfig
        return FusionConfig(vision=dict(self.vision), text=dict(self.text), shared=self.shared,
                            frames_per_clip=self.frames_per_clip, pool=self.pool, cross_pool=self.cross_pool,
                            text_head=self.text_head, video_score=self.video_score)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
class SNPS3Collate:
    """`ImageTextCollate` plus `masked_ids` (B, L), `mlm_labels` (B, L) and LVWM's `sig_pos` (B, K).

    Masking draws depend only on the run seed and the batch's sample indices (any worker count, resumes).
    """

    def __init__(self, tokenizer, context_length: int | None, rule: MaskingRule, mode: str = "mssm",
                 ratio: float = 0.15, k: int = 3, seed: int = 0):
        from ..data.datasets import ImageTextCollate
        self.base = ImageTextCollate(tokenizer, context_length)
        self.rule, self.mode, self.ratio, self.k, self.seed = rule, mode, ratio, k, seed

    def __call__(self, samples: list) -> dict:
        batch = self.base(samples)
        if "input_ids" not in batch:
            return batch
        rng = batch_rng(self.seed, batch["index"].tolist())
        batch["masked_ids"], batch["mlm_labels"] = mask_batch(batch["input_ids"], self.rule, rng, self.mode,
                                                              self.ratio)
        batch["sig_pos"] = significant_positions(batch["input_ids"], self.rule, self.k, rng)
        batch["mlm_significant"] = self.rule.is_significant(batch["input_ids"])
        return batch


# ---------------------------------------------------------------------------------------------------
# Task
# ---------------------------------------------------------------------------------------------------
class SNPS3Task(nn.Module):
    """The summed SNP-S3 objective over a batch (see the module docstring).

    Args:
        model: an `SNPS3Model`.
        cfg: the `snps3:` section.
        seed: the run's seed (which batches are re-masked by attention, `snps3.attention_remask`).
        gather: `loss.gather` of the in-batch MIL-NCE losses.
        moco: level 1 with MoCo (True) or in-batch MIL-NCE (False); None = `cfg.level1 == "moco"` (the method
            resolves `level1: auto` from whether the run starts from `model.path`).
    Batch keys: `frames` (B, T, 3, H, W), `frame_valid` (B, T), `index` (B,) the record (video) ids,
    `input_ids`, `masked_ids`, `mlm_labels`, `mlm_significant` (B, L) and `sig_pos` (B, K).
    """

    def __init__(self, model: nn.Module, cfg: SNPS3Config, seed: int = 0, gather: str = "global_with_grad",
                 moco: bool | None = None):
        super().__init__()
        from ..models.fusion import MomentumEncoders
        self.model, self.cfg, self.gather = model, cfg, gather
        self.seed = seed            # the run's seed: which batches are re-masked by attention
        self.moco = cfg.level1 == "moco" if moco is None else bool(moco)
        W = model.config.text.width
        if self.moco:
            self.momentum = MomentumEncoders(model)
            self.text_queue = KeyQueue(cfg.queue_size, W)          # text keys: negatives of the clip queries
            self.clip_queue = KeyQueue(cfg.queue_size, W)          # clip keys: negatives of the text queries

    def fsdp_blockers(self) -> list[str]:
        """Why this task cannot train under `train.strategy=fsdp` (empty: it can). The attention re-masking reads
        each text block's qkv projection outside the block's forward, where FSDP keeps it sharded."""
        if self.cfg.attention_remask > 0:
            return ["snps3.attention_remask > 0 reads the text blocks' attention weights outside their forward "
                    "(set snps3.attention_remask=0)"]
        return []

    def _remask_this_batch(self, batch: dict) -> bool:
        """Whether this batch's MLM input is re-masked by attention: a draw seeded by the batch's sample indices."""
        rng = batch_rng(self.seed + 1, batch["index"].tolist())   # a stream apart from the collate's masking
        return bool(rng.random() < self.cfg.attention_remask)

    def remask(self, ids, real):
        """(masked ids, labels) chosen by the text pass's attention importance (see `data.masking`)."""
        from ..models.fusion import attention_importance
        tok = self.model.tokenizer
        specials = [i for i in (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) if i is not None]
        importance = attention_importance(self.model.text_encoder, ids, real)
        return remask_by_importance(ids, importance, tok.mask_id, specials, self.cfg.mask_ratio)

    def moco_level1(self, ids: Tensor, frames: Tensor, valid: Tensor | None, text: Tensor, clips: Tensor,
                    clip_valid: Tensor, owners: Tensor) -> Tensor:
        """Level 1 with momentum keys and queue negatives, per clip as in the authors' release.

        Every valid clip feature is a query against its video's text key (negatives: the text queue); every text
        feature is a query whose positives are all of its video's clip keys (logsumexp over them; negatives: the
        clip queue). With `queue_exclude_own`, queue keys of the query's own video (enqueued at earlier steps) are
        left out of its negatives. The keys are enqueued afterwards (in training).

        Args:
            ids: (B, L) unmasked caption ids; frames (B, T, 3, H, W), valid (B, T): the momentum encoders' inputs.
            text: (B, W) normalised text features; clips: (B, n, W) normalised clip features; clip_valid (B, n).
            owners: (B,) the videos' record ids.
        Returns:
            Scalar loss: the mean of the text-query and the clip-query losses.
        """
        cfg = self.cfg
        if self.training:
            self.momentum.update(self.model, cfg.momentum)
        kt, kc, kvalid = self.momentum.keys(ids, frames, valid)                            # (B, W), (B, n, W), (B, n)
        B, n = clip_valid.shape
        clip_owner = torch.arange(B, device=clips.device)[:, None].expand(B, n)[clip_valid]  # (M,) row of each clip
        exclude = cfg.queue_exclude_own
        loss_clip = moco_loss(clips[clip_valid], kt[clip_owner], self.text_queue.keys.clone(), cfg.temperature,
                              neg_valid=self.text_queue.others_than(owners[clip_owner]) if exclude else None)
        loss_text = moco_loss(text, kc, self.clip_queue.keys.clone(), cfg.temperature, pos_valid=kvalid,
                              neg_valid=self.clip_queue.others_than(owners) if exclude else None)
        if self.training:
            self.text_queue.enqueue_from_all_ranks(kt, owners)
            self.clip_queue.enqueue_from_all_ranks(kc.flatten(0, 1), owners.repeat_interleave(n),
                                                   keep=kvalid.flatten())
        return (loss_text + loss_clip) / 2

    def forward(self, batch: dict) -> dict:
        m, cfg, w = self.model, self.cfg, self.cfg.weights
        pad = m.config.text.pad_token_id
        ids = trim_padding(batch["input_ids"], pad)                                       # (B, L)
        L = ids.shape[1]
        masked, labels = batch["masked_ids"][:, :L], batch["mlm_labels"][:, :L]
        frames, valid = batch["frames"], batch.get("frame_valid")
        B = len(ids)
        owners = batch["index"].to(ids.device)                                            # (B,) video ids
        sig = batch["mlm_significant"][:, :L].to(ids.device)
        out: dict = {}
        stats: dict = {}
        # Passes whose every loss has weight 0 are skipped (the caption-MLM stand-in runs the text pass alone).
        need_level1, need_lvwm = w["level1"] > 0, cfg.lvwm and w["lvwm"] > 0
        need_cross = any(w[k] > 0 for k in ("level2", "itm", "mlm"))
        tp = m.text_pass(ids) if (need_level1 or need_lvwm) else None                     # unmasked caption
        if self.training and cfg.attention_remask > 0 and self._remask_this_batch(batch):
            masked, labels = self.remask(ids, ids != pad)
        if w["text_mlm"] > 0:          # MLM on the text pass over the masked caption (the stand-in's objective)
            real = masked != pad
            enc = m.text_encoder
            h_text = enc.encode(enc.embeddings(masked, token_type=0), real)                # (B, L, W)
            out["text_mlm"], s = _mlm_loss(m.text_mlm_logits(h_text), labels, sig)
            stats.update({f"text_{k}": v for k, v in s.items()})
        vp = m.video_pass(frames, valid) if (need_level1 or need_lvwm or need_cross) else None
        # Level 1: dual-encoder contrast (MoCo per clip, or in-batch MIL-NCE over clips below).
        if need_level1 and self.moco:
            out["level1"] = self.moco_level1(ids, frames, valid, tp.feature, vp.clips, vp.valid, owners)
        # LVWM: significant-word states of the unmasked caption against the clips.
        words = None
        if need_lvwm:
            pos = batch["sig_pos"].to(ids.device).clamp(max=L - 1)                        # (B, K)
            words = torch.gather(tp.tokens, 1, pos[..., None].expand(-1, -1, tp.tokens.shape[-1]))  # (B, K, W)
        if (need_level1 and not self.moco) or words is not None:
            out.update(clip_contrast_losses(vp.clips, vp.valid, cfg.temperature,
                                            tp.feature if need_level1 and not self.moco else None, words, self.gather))
        if need_cross:
            # Cross pass on the masked caption for every text x video pair; MLM and ITM reuse its rows.
            ti = torch.arange(B, device=ids.device).repeat_interleave(B)                   # text of pair i*B+j
            vj = torch.arange(B, device=ids.device).repeat(B)                              # video of pair i*B+j
            h, pooled = m.cross_pass(masked[ti], vp.means[vj], vp.valid[vj])              # (B*B, L+n+1, W), (B*B, W)
            out["level2"] = mil_nce(m.score_head(pooled).view(B, B, 1))
            diag = torch.arange(B, device=ids.device) * (B + 1)
            if B > 1:
                shift = int(torch.randint(1, B, ()))
                false_text = (torch.arange(B, device=ids.device) + shift) % B             # another video's caption
                neg = false_text * B + torch.arange(B, device=ids.device)
                out["itm"] = itm_loss(m.itm_head(pooled[diag]), m.itm_head(pooled[neg]))
            out["mlm"], s = _mlm_loss(m.mlm_logits(h[diag, :L]), labels, sig)              # (B, L, V) logits
            stats.update(s)
        loss = sum(w[k] * v for k, v in out.items())
        return {"loss": loss, **{k: v.detach() for k, v in out.items()}, **stats}


def _mlm_loss(logits: Tensor, labels: Tensor, significant: Tensor) -> tuple[Tensor, dict]:
    """MLM cross-entropy over the chosen positions and the accuracies on significant and other words.

    Args:
        logits: (B, L, V); labels: (B, L) target ids, IGNORE_INDEX elsewhere; significant: (B, L) bool.
    Returns:
        (scalar loss (0 with a graph when nothing is chosen), {"mlm_acc_significant", "mlm_acc_other"} where measured).
    """
    chosen = labels != IGNORE_INDEX
    if not chosen.any():
        return logits.sum() * 0, {}
    loss = F.cross_entropy(logits[chosen], labels[chosen])
    hit = logits.argmax(-1) == labels
    stats = {}
    for name, sel in (("mlm_acc_significant", chosen & significant), ("mlm_acc_other", chosen & ~significant)):
        if sel.any():
            stats[name] = hit[sel].float().mean().detach()
    return loss, stats


def clip_contrast_losses(clips: Tensor, valid: Tensor, temperature: float, text: Tensor | None = None,
                         words: Tensor | None = None, gather: str = "global_with_grad") -> dict:
    """The in-batch MIL-NCE losses over clips: level 1 (with `text`) and LVWM (with `words`).

    With `gather="global_with_grad"` and several ranks, rank r scores its B texts against every rank's clips
    and every rank's texts against its B videos' clips (`mil_nce_blocks`), the features gathered with
    gradient: the loss averaged over ranks and the gradients are those of one process on the global batch.
    `"local"`: each rank's own batch.

    Args:
        clips: (B, n, W) L2-normalised clip features; valid: (B, n) bool, real clips.
        temperature: level 1's temperature (LVWM scores are used as they are, as in one process).
        text: (B, W) L2-normalised sentence features, or None to skip level 1.
        words: (B, K, W) significant-token states, or None to skip LVWM.
        gather: "global_with_grad" | "local".
    Returns:
        {"level1": loss, "lvwm": loss}, each key present when its input is.
    """
    out = {}
    if gather == "local" or world_size() == 1:
        if text is not None:
            out["level1"] = mil_nce(torch.einsum("iw,jcw->ijc", text, clips) / temperature, valid)   # (B, B, n)
        if words is not None:
            out["lvwm"] = mil_nce(lvwm_scores(words, clips), valid)
        return out
    all_clips = all_gather_with_grad(clips)                                                   # (N, n, W)
    all_valid = all_gather_padded(valid, 1, False, size=valid.shape[1])                       # n is the same everywhere
    offset = rank() * len(clips)
    if text is not None:
        all_text = all_gather_with_grad(text)                                                 # (N, W)
        rows = torch.einsum("iw,jcw->ijc", text, all_clips) / temperature                    # (B, N, n)
        cols = torch.einsum("iw,jcw->ijc", all_text, clips) / temperature                    # (N, B, n)
        out["level1"] = mil_nce_blocks(rows, cols, offset, all_valid, valid)
    if words is not None:
        all_words = all_gather_with_grad(words)                                               # (N, K, W)
        out["lvwm"] = mil_nce_blocks(lvwm_scores(words, all_clips), lvwm_scores(all_words, clips), offset,
                                     all_valid, valid)
    return out


# ---------------------------------------------------------------------------------------------------
# Method
# ---------------------------------------------------------------------------------------------------


def init_vision_from(model: nn.Module, path: str) -> None:
    """Copy the ViT of the saved model at `path` (a CLIP's `visual` or an SNP-S3 model's `vision`) into `model.vision`.

    Raises:
        ValueError: naming the path and the first mismatch when the towers differ in config.
    """
    from dataclasses import asdict

    from ..hub import load_model
    from ..models.vision import VisionTower
    src = load_model(path)
    tower = next((t for t in (getattr(src, "visual", None), getattr(src, "vision", None))
                  if isinstance(t, VisionTower)), None)
    if tower is None:
        raise ValueError(f"snps3.vision_init {path}: a {type(src).__name__} without a ViT tower (visual / vision)")
    have, want = asdict(tower.config), asdict(model.vision.config)
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        what = ", ".join(f"{k} ({have.get(k)} vs {want[k]})" for k in diff)
        raise ValueError(f"snps3.vision_init {path}: its ViT differs in {what}; set snps3.vision to the same sizes or "
                         f"leave vision_init empty")
    model.vision.load_state_dict(tower.state_dict())
    print(f"snps3: ViT initialised from {path}", flush=True)


class SNPS3Method(Method):
    """`method: snps3`."""

    config_cls = SNPS3Config
    media = "video"

    def __init__(self, run: Any, cfg: Any = None):
        super().__init__(run, cfg if cfg is not None else SNPS3Config())
        self.rule: MaskingRule | None = None

    def validate(self) -> None:
        d = self.run.data
        if list(getattr(d, "langs", ["en"])) != ["en"]:
            raise ValueError(f"data.langs: SNP-S3 counts significant words with an English spaCy model, got {d.langs}")
        if getattr(d, "shards", None):
            raise ValueError("data.shards: SNP-S3 trains from a video manifest (data.train), not shards")
        if not self.run.tokenizer.path and not self.run.model.path and self.run.tokenizer.kind != "wordpiece":
            raise ValueError(f"tokenizer.kind: SNP-S3 needs a BERT-style tokenizer with [MASK]; set "
                             f"tokenizer.kind=wordpiece (got {self.run.tokenizer.kind!r})")
        check_block_gather(self.run.loss.gather, "SNP-S3's in-batch MIL-NCE losses support")
        if self.cfg.vision_init and self.run.model.path:
            raise ValueError("snps3.vision_init: only for a run from scratch; model.path already brings its ViT")
        if self.run.data.num_frames % self.cfg.frames_per_clip:
            raise ValueError(f"data.num_frames ({self.run.data.num_frames}) must be a multiple of "
                             f"snps3.frames_per_clip ({self.cfg.frames_per_clip})")

    def words_path(self) -> Path:
        return Path(self.cfg.significant_words or Path(self.run.out_dir) / WORDS_FILE)

    def build_model(self, tokenizer) -> nn.Module:
        from ..models.fusion import SNPS3Model, create_snps3_model
        if self.run.model.path:
            from ..hub import load_model
            model = load_model(self.run.model.path)
            if not isinstance(model, SNPS3Model):
                raise ValueError(f"model.path {self.run.model.path}: a {type(model).__name__}, not an SNP-S3 model "
                                 f"(model_type 'snps3'); start from a saved snps3 run's out_dir/model")
            self._adopt_settings(model)
            model.train()
        else:
            model = create_snps3_model(self.cfg.model_config(), tokenizer)
            if self.cfg.vision_init:
                init_vision_from(model, self.cfg.vision_init)
        counts = model.parameter_counts()
        print(f"snps3: parameters shared {counts['shared']:,} | three-encoder {counts['three_encoder']:,} "
              f"({100 * (1 - counts['shared'] / counts['three_encoder']):.1f}% fewer shared)", flush=True)
        return model

    # Settings that shape no parameter: a run that starts from model.path takes the recipe's values for these.
    RECIPE_SETTINGS = ("frames_per_clip", "pool", "cross_pool", "video_score")

    def _adopt_settings(self, model) -> None:
        """Give a loaded model the recipe's parameter-free settings; refuse a recipe whose parameter-shaping
        settings (`shared`, `text_head`) differ from the saved model's (the sizes always come from the model)."""
        want, have = self.cfg.model_config(), model.config
        for key in ("shared", "text_head"):
            if getattr(want, key) != getattr(have, key):
                raise ValueError(f"snps3.{key}: the recipe says {getattr(want, key)!r} but model.path "
                                 f"{self.run.model.path} was saved with {getattr(have, key)!r}; set snps3.{key}="
                                 f"{getattr(have, key)} (it shapes the parameters of the saved model)")
        for key in self.RECIPE_SETTINGS:
            setattr(have, key, getattr(want, key))

    def uses_moco(self) -> bool:
        """Level 1 with MoCo: `level1: moco`, or `auto` when the run starts from a saved model (`model.path`),
        whose keys carry information; from random weights the momentum keys are near-constant and level 1
        collapses (docs/methods.md), so `auto` is in-batch MIL-NCE there."""
        return self.cfg.level1 == "moco" or (self.cfg.level1 == "auto" and bool(self.run.model.path))

    def build_dataset(self, model: nn.Module, rank: int, world_size: int):
        from .base import image_text_dataset
        dataset, per_epoch = image_text_dataset(self.run, model, rank, world_size, media="video")
        captions = all_captions(dataset.manifest.records, self.run.data.caption_key)
        words = load_or_count(self.words_path(), captions, model.tokenizer, self.cfg.top_k, self.cfg.stop_words)
        model.config.significant_words = words.to_dict()   # saved with the model: its eval uses the same rule
        self.rule = model.masking_rule
        return dataset, per_epoch

    def collate(self, model: nn.Module):
        if self.rule is None:
            raise RuntimeError("snps3: build_dataset must run before collate (it counts the significant words)")
        tok = model.tokenizer
        return SNPS3Collate(tok, getattr(tok, "context_length", None), self.rule, self.cfg.masking,
                            self.cfg.mask_ratio, self.cfg.lvwm_k, self.run.train.seed)

    def build_task(self, model: nn.Module) -> nn.Module:
        moco = self.uses_moco()
        print(f"snps3: level 1 {'MoCo (momentum keys, queue negatives)' if moco else 'in-batch MIL-NCE'} "
              f"(snps3.level1={self.cfg.level1}{', model.path set' if self.run.model.path else ''})", flush=True)
        return SNPS3Task(model, self.cfg, seed=self.run.train.seed, gather=self.run.loss.gather, moco=moco)


__all__ = ["SNPS3Config", "SNPS3Method", "SNPS3Task", "SNPS3Collate", "clip_contrast_losses", "EVAL_TASK"]
