"""The method protocol: how one family plugs into the one Trainer without `train/` knowing its name.

A method is a subclass of `Method` in its own module plus one row of the table in
`polymodal/methods/__init__.py`. It provides, each with a working default for image-text dual encoders:

- `config_cls`: the dataclass of the recipe section named after the method (None = no section);
- `validate()`: cross-section checks, run when the recipe is loaded (before anything is built);
- `paths()`: extra files the run will open, checked to exist at start-up;
- `build_tokenizer(out_dir)`, `build_model(tokenizer)`: the model (from `model.path` or a named config);
- `build_dataset(model, rank, world_size)` and `collate(model)`: the data for its batch keys;
- `build_task(model)`: an nn.Module, `batch -> dict of scalar losses` with a "loss" entry;
- `final_model(task)`: what is saved as `out_dir/model` (default `task.model`), a model of one family of
  `polymodal.models.families` that carries everything its evaluation needs;
- `evaluate(task, specs)`: the numbers of the recipe's `eval` tasks, always on `final_model(task)` through the
  eval table (`eval.tasks.evaluate`), so training reports what `polymodal eval out_dir/model` reproduces.

The run config handed to a method (`self.run`) is duck-typed: it has the sections `model`, `tokenizer`,
`data`, `loss`, `optim`, `train`, `eval` and `out_dir`; methods never import `polymodal.train`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..data.text import trim_padding
from ..distributed import rank as dist_rank
from ..losses.contrastive import LossConfig, build_contrastive_loss


@dataclass
class ModelSpec:
    """The recipe's `model` section."""
    name: str = "small"                  # bundled config, used when `path` is empty
    path: str = ""                       # start from weights on disk (any format load_model reads)
    overrides: dict = field(default_factory=dict)  # dotted keys, e.g. {"text.context_length": 128}


@dataclass
class TokenizerSpec:
    """The recipe's `tokenizer` section."""
    path: str = ""                       # a tokenizer directory; empty = train one on the training captions
    kind: str = "bpe"                    # "bpe" | "wordpiece" when training
    vocab_size: int = 2048               # when training one: the vocabulary size
    corpus_keys: list = field(default_factory=lambda: ["caption", "long_caption"])  # record fields it trains on

    def validate(self, where: str = "tokenizer") -> None:
        if self.kind not in ("bpe", "wordpiece"):
            raise ValueError(f"{where}.kind: {self.kind!r} is not one of bpe, wordpiece")
        if self.vocab_size < 16:
            raise ValueError(f"{where}.vocab_size: {self.vocab_size} must be >= 16")


class Method:
    """Base of every method: image-text contrastive training of a dual encoder, overridable piece by piece.

    Args:
        run: the run config (sections model, tokenizer, data, loss, optim, train, eval, out_dir).
        cfg: an instance of `config_cls` (the recipe section named after the method), or None.
    """

    config_cls: type | None = None
    media: str = "image"                 # what training records carry: "image" | "video" | "none"

    def __init__(self, run: Any, cfg: Any = None):
        self.run = run
        self.cfg = cfg

    # ---- checks before anything is built ------------------------------------------------------------
    def validate(self) -> None:
        """Cross-section checks; raise ValueError naming the key. Runs when the recipe is loaded."""

    def paths(self) -> list[str]:
        """Files (beyond data, eval, model and tokenizer paths) the run opens; checked to exist at start-up."""
        return []

    def check_data(self) -> None:
        """Checks of the recipe against its manifests' content, at start-up (`train.run.check_data`), before
        anything is built; raise ConfigError naming the key, the file and the fix."""

    def check_world(self, world: dict, path: Path) -> None:
        """Checks of the recipe against a generated world's summary (`world.json` beside `data.train`, read at
        start-up by `train.run.check_data`); raise ConfigError naming the key and the fix."""

    def model_overrides(self) -> dict:
        """Dotted config overrides the method needs on a model built from a named config."""
        return {}

    # ---- building -----------------------------------------------------------------------------------
    def build_tokenizer(self, out_dir: Path):
        """Load `tokenizer.path`, reuse the run folder's, or train one on the training captions."""
        return build_tokenizer(self.run, out_dir, self.media)

    def build_model(self, tokenizer) -> nn.Module:
        """`model.path` loaded (any format `load_model` reads), else the named config with the overrides."""
        from ..hub import load_model
        from ..models.factory import create_model
        spec = self.run.model
        if spec.path:
            model = load_model(spec.path)
            model.train()
            if tokenizer is not None and not model.tokenizer:
                model.attach_processors(tokenizer, model.image_transform)
            return model
        overrides = {**self.model_overrides(), **dict(spec.overrides)}
        return create_model(spec.name, overrides, tokenizer=tokenizer)

    def build_dataset(self, model: nn.Module, rank: int, world_size: int) -> tuple[Any, int | None]:
        """The training dataset and, for streams, the batches per epoch every rank stops at (else None)."""
        return image_text_dataset(self.run, model, rank, world_size, media=self.media)

    def collate(self, model: nn.Module):
        """The batch collate for this method's samples."""
        from ..data.datasets import ImageTextCollate
        tok = model.tokenizer
        return ImageTextCollate(tok, getattr(tok, "context_length", None))

    def build_task(self, model: nn.Module) -> nn.Module:
        """The training objective: `task(batch) -> {"loss": scalar, ...}`; `task.model` is the model."""
        return ContrastiveTask(model, self.run.loss)

    def evaluate(self, task: nn.Module, specs: list, progress: bool = False) -> dict:
        """The eval tasks' numbers (`prefix/metric` keys) for `final_model(task)`: the model that is saved, so
        every number equals `polymodal eval out_dir/model --task T` on the same data."""
        from ..eval.tasks import evaluate
        return evaluate(self.final_model(task), specs, progress=progress)

    def final_model(self, task: nn.Module) -> nn.Module:
        """The model written to `out_dir/model` with `save_pretrained` (and evaluated): one model family, so
        `polymodal.load_model(out_dir/model)` returns it as it is."""
        return task.model


class ContrastiveTask(nn.Module):
    """Image-text contrastive objective over a dual encoder.

    Args:
        model: anything with `encode_image`, `encode_text` and `scale()` (CLIP, M2Encoder).
        loss: the recipe's `loss` section (kind, gather mode, groups).
    """

    def __init__(self, model: nn.Module, loss: LossConfig | None = None):
        super().__init__()
        self.model = model
        self.loss = build_contrastive_loss(loss)

    def text_ids(self, batch: dict) -> Tensor:
        pad = self.model.config.text.pad_token_id
        return trim_padding(batch["input_ids"], pad)

    # The Trainer's feature-cache accumulation (`optim.accum_steps` > 1) may call the two stages separately.
    supports_feature_cache = True

    def forward(self, batch: dict, stage: str = "all") -> dict:
        """The contrastive loss of a batch, or one of its two stages.

        Args:
            batch: {"pixels": (B, 3, H, W), "input_ids": (B, L)}; for stage "loss", the features instead.
            stage: "all"; "features" -> {"image": (B, E), "text": (B, E)}; "loss" -> the losses of given features
                (the Trainer's feature-cache accumulation concatenates micro-batches' features).
        Returns:
            {"loss", "contrastive", "logit_scale"} scalars, or the features.
        """
        if stage == "loss":
            return self._loss(batch["image"], batch["text"])
        image = self.model.encode_image(batch["pixels"])          # (B, E)
        text = self.model.encode_text(self.text_ids(batch))       # (B, E)
        if stage == "features":
            return {"image": image, "text": text}
        return self._loss(image, text)

    def _loss(self, image: Tensor, text: Tensor) -> dict:
        loss = self.loss(image, text, self.model.scale())
        return {"loss": loss, "contrastive": loss.detach(), "logit_scale": self.model.scale().detach()}


# ---- shared building blocks (used by the defaults and by methods that extend them) -------------------
def build_tokenizer(run: Any, out_dir: Path, media: str = "image", texts: Callable[[], list] | None = None,
                    **train_options):
    """Load the tokenizer, reuse the one saved in the run folder, or train one on the training texts.

    Args:
        run: the run config (sections `tokenizer`, `model`, `data`).
        out_dir: the run folder (`out_dir/tokenizer` is reused on resume).
        media: what the training manifest's records carry (for reading it).
        texts: the training texts, when a method has its own (e.g. preference pairs); default: the manifest's
            `tokenizer.corpus_keys` in every training language.
        train_options: passed on to `train_tokenizer` (e.g. `context_length`, `min_frequency`).
    Returns:
        A tokenizer, or None when `model.path` brings its own.
    """
    from ..data.text import Tokenizer, train_tokenizer
    if run.tokenizer.path:
        return Tokenizer.from_dir(run.tokenizer.path)
    if run.model.path:                                  # pretrained weights come with their tokenizer
        return None
    if _named_config_has_tokenizer(run.model):          # e.g. vit-b-32: the bundled CLIP BPE tokenizer
        return None
    saved = Path(out_dir) / "tokenizer"
    if (saved / "tokenizer.json").is_file():           # a resumed run reuses its tokenizer
        return Tokenizer.from_dir(saved)
    if texts is not None:
        corpus = texts()
    else:
        if not run.data.train:
            raise ValueError("tokenizer.path is empty and data.train is not set: nothing to train a tokenizer on; "
                             "give tokenizer.path (a tokenizer folder) or data.train (a manifest)")
        corpus = _manifest_texts(run, media)
    tok = train_tokenizer(corpus, kind=run.tokenizer.kind, vocab_size=run.tokenizer.vocab_size, **train_options)
    if dist_rank() == 0:
        tok.save(saved)
    return tok


def _named_config_has_tokenizer(spec: Any) -> bool:
    """True when the bundled config `model.name` (with its overrides) ships its own tokenizer (OpenAI's CLIP
    vocabulary): nothing to train, with `data.train` or with `data.shards`."""
    from ..data.text import bundled_tokenizer
    from ..models.factory import build_config, list_configs
    if spec.name not in list_configs():
        return False
    try:
        text = getattr(build_config(spec.name, dict(spec.overrides)), "text", None)
    except (ValueError, KeyError, TypeError):
        return False
    return text is not None and bundled_tokenizer(text.vocab_size, text.eot_token_id, getattr(text, "pool", "eot"),
                                                  8) is not None


def _manifest_texts(run: Any, media: str) -> list[str]:
    """The texts of the training manifest under `tokenizer.corpus_keys` (and their other-language keys)."""
    from ..data.manifests import read_manifest
    manifest = read_manifest(run.data.train, on_bad_record="skip", check_images=False, media=media)
    keys = []
    for key in run.tokenizer.corpus_keys:
        keys.append(key)
        keys.extend(f"{key}_{lang}" for lang in run.data.langs if lang != "en")
    texts = []
    for r in manifest.records:
        for key in keys:
            value = r.get(key)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(v for v in value if isinstance(v, str))
    if not texts:
        raise ValueError(f"{run.data.train}: no caption text under {', '.join(keys)} to train a tokenizer on")
    return texts


def image_text_dataset(run: Any, model: nn.Module, rank: int, world_size: int, media: str = "image",
                       **builder_args) -> tuple[Any, int | None]:
    """The training dataset of a data section: shards (images) or a manifest, one copy per training language.

    Args:
        run: the run config.
        model: gives the image transform and tokenizer.
        rank, world_size: this process's place (shards split themselves over ranks).
        media: "image" | "video" | "none".
        **builder_args: further `SampleBuilder` arguments.
    Returns:
        (dataset, batches per epoch for streams or None).
    """
    from ..data.config import builder_from_config
    from ..data.datasets import ManifestDataset
    d, seed = run.data, run.train.seed
    transform = model.image_transform if media != "none" else None
    if d.shards:
        from ..data.shards import ShardDataset, resolve_shards
        builder = builder_from_config(d, transform, model.tokenizer, seed, media=media, **builder_args)
        dataset = ShardDataset(d.shards, builder, on_bad_record=d.on_bad_record, seed=seed, rank=rank,
                               world_size=world_size, image_decoder=_pixel_limited_decoder(d.max_image_pixels))
        # Whole shards per rank give ranks different sample counts; DDP needs equal step counts,
        # so every rank stops an epoch after the same number of batches.
        shards, counts = resolve_shards(d.shards)
        if counts is None and world_size > 1:         # no shards.json (e.g. img2dataset's folders): count once
            from ..data.shards import count_samples
            counts = count_samples(shards)
        per_epoch = sum(counts.values()) // (world_size * d.batch_size) if counts else None
        return dataset, per_epoch
    if not d.train:
        raise ValueError("data.train (a manifest) or data.shards must be set")
    from ..data.manifests import read_manifest
    manifest = read_manifest(d.train, on_bad_record=d.on_bad_record, media=media)
    datasets = [ManifestDataset(manifest, builder_from_config(d, transform, model.tokenizer, seed, caption_key=key,
                                                              media=media, **builder_args),
                                on_bad_record=d.on_bad_record, image_loader=_pixel_limited_loader(d.max_image_pixels),
                                video_loader=_video_loader(d, seed))
                for key in d.caption_keys()]
    if len(datasets) == 1:
        return datasets[0], None
    dataset = torch.utils.data.ConcatDataset(datasets)
    dataset.set_epoch = lambda e: [ds.set_epoch(e) for ds in datasets]
    dataset.manifest = manifest
    return dataset, None


class _pixel_limited_loader:
    """`load_image` with the data section's pixel limit (a class, so DataLoader workers can pickle it)."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def __call__(self, path):
        from ..data.images import load_image
        return load_image(path, max_pixels=self.max_pixels)


class _pixel_limited_decoder:
    """Shard image bytes -> PIL image with the pixel limit checked from the header before decoding."""

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def __call__(self, data: bytes):
        from ..data.images import load_image_bytes
        return load_image_bytes(data, "shard member", max_pixels=self.max_pixels)


class _video_loader:
    """`read_video` with the data section's frame count, strategy and jitter (picklable for workers)."""

    def __init__(self, data: Any, seed: int):
        self.num_frames, self.strategy, self.seed = data.num_frames, data.frame_strategy, seed
        self.jitter, self.max_side = data.frame_jitter, data.max_frame_side or None

    def __call__(self, path, index: int = 0, epoch: int = 0):
        from ..data.video import read_video
        # Jitter depends only on (run seed, epoch, record): resumed runs and any worker count see the same frames.
        seed = int(np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, index, 3]).integers(2 ** 31))
        return read_video(path, num_frames=self.num_frames, strategy=self.strategy,
                          jitter=self.jitter and self.strategy == "uniform", seed=seed, max_side=self.max_side)
