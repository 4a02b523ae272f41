"""Recipes: a typed `RunConfig` read from YAML (+ `key=value` overrides) and `run_recipe`, which builds
the tokenizer, model, data, task and evaluation, trains, and writes the final model and metrics.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ..methods.clip import ContrastiveTask, LossConfig
from . import distributed as dist_utils
from .loop import OptimConfig, TrainConfig, Trainer

METHODS = ("clip", "lotlip", "m2", "sycoca")


@dataclass
class ModelSpec:
    name: str = "small"                  # bundled config, used when `path` is empty
    path: str = ""                       # start from weights on disk (any format load_model reads)
    overrides: dict = field(default_factory=dict)  # dotted keys, e.g. {"text.context_length": 128}


@dataclass
class TokenizerSpec:
    path: str = ""                       # a tokenizer directory; empty = train one on the training captions
    kind: str = "bpe"                    # "bpe" | "wordpiece" when training
    vocab_size: int = 2048
    corpus_keys: list = field(default_factory=lambda: ["caption", "long_caption"])


@dataclass
class DataConfig:
    train: str = ""                      # manifest (JSONL/CSV)
    shards: str = ""                     # webdataset shard folder; used instead of `train` when set
    batch_size: int = 64                 # per rank
    num_workers: int = 0
    on_bad_record: str = "error"         # "error" | "skip"
    caption_key: str = "caption"
    num_subcaptions: int = 0             # LoTLIP: sub-captions sampled from the long caption
    subcaption_sentences: list = field(default_factory=lambda: [1, 3])
    langs: list = field(default_factory=lambda: ["en"])  # caption languages mixed in training


@dataclass
class EvalConfig:
    retrieval: str = ""                  # manifest for short-caption retrieval (and zero-shot)
    longtext: str = ""                   # manifest with long captions (hard set)
    zeroshot: str = ""                   # manifest with labels (default: `retrieval`)
    classes: str = ""                    # classes.json for zero-shot
    langs: list = field(default_factory=lambda: ["en"])
    limit: int = 0                       # evaluate the first N records (0 = all)


def _method_configs():
    """Method sections of a recipe (imported lazily: each method's module is its own)."""
    import importlib
    found = {}
    for name, cls in (("lotlip", "LoTLIPConfig"), ("sycoca", "SyCoCaConfig")):
        try:
            found[name] = getattr(importlib.import_module(f"..methods.{name}", __package__), cls)
        except ModuleNotFoundError:
            continue
    return found


@dataclass
class RunConfig:
    method: str = "clip"                 # clip | lotlip | m2 | sycoca
    out_dir: str = "runs/clip"
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lotlip: dict = field(default_factory=dict)   # LoTLIPConfig keys (validated by the method)
    sycoca: dict = field(default_factory=dict)   # SyCoCaConfig keys (validated by the method)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Read a recipe YAML, apply `key=value` overrides and validate every key.

    Raises:
        ConfigError: naming the file and the unknown/mistyped key, listing the allowed keys.
    """
    data = dict(base or {})
    where = "recipe"
    if path is not None:
        data.update(load_yaml(path))
        where = str(path)
    apply_overrides(data, list(overrides or []))
    cfg = from_dict(RunConfig, data, where)
    if cfg.method not in METHODS:
        raise ConfigError(f"{where}: method {cfg.method!r} is not one of {', '.join(METHODS)}")
    for name, cls in _method_configs().items():
        setattr(cfg, name, from_dict(cls, getattr(cfg, name), f"{where}.{name}"))
    if cfg.data.shards and list(cfg.data.langs) != ["en"]:
        raise ConfigError(f"{where}: data.langs={list(cfg.data.langs)} needs data.train (a manifest): streams from "
                          f"data.shards read only the `{cfg.data.caption_key}` captions")
    return cfg


def build_tokenizer(cfg: RunConfig, out_dir: Path):
    """Load the tokenizer, or train one on the training captions (saved in the run folder)."""
    from ..data.text import Tokenizer, train_tokenizer
    if cfg.tokenizer.path:
        return Tokenizer.from_dir(cfg.tokenizer.path)
    saved = out_dir / "tokenizer"
    if (saved / "tokenizer.json").is_file():           # a resumed run reuses its tokenizer
        return Tokenizer.from_dir(saved)
    if not cfg.data.train:
        raise ConfigError("tokenizer.path is empty and data.train is not set: nothing to train a tokenizer on")
    from ..data.manifests import read_manifest
    manifest = read_manifest(cfg.data.train, on_bad_record="skip", check_images=False)
    keys = []
    for key in cfg.tokenizer.corpus_keys:
        keys.append(key)
        keys.extend(f"{key}_{lang}" for lang in cfg.data.langs if lang != "en")
    texts = []
    for r in manifest.records:
        for key in keys:
            value = r.get(key)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(v for v in value if isinstance(v, str))
    tok = train_tokenizer(texts, kind=cfg.tokenizer.kind, vocab_size=cfg.tokenizer.vocab_size)
    if dist_utils.rank() == 0:
        tok.save(saved)
    return tok


def build_model(cfg: RunConfig, tokenizer):
    from ..hub import load_model
    from ..models.factory import attach_processors, create_model
    if cfg.model.path:
        model = load_model(cfg.model.path)
        model.train()
        if tokenizer is not None and model.tokenizer is None:
            attach_processors(model, tokenizer, model.image_transform)
        return model
    overrides = dict(cfg.model.overrides)
    if cfg.method == "lotlip":
        overrides.setdefault("text.num_readout_tokens", cfg.lotlip.num_corners)
    return create_model(cfg.model.name, overrides, tokenizer=tokenizer)


def build_task(cfg: RunConfig, model):
    if cfg.method in ("clip", "m2"):
        return ContrastiveTask(model, cfg.loss)
    if cfg.method == "lotlip":
        from ..methods.lotlip import LoTLIPTask
        return LoTLIPTask(model, cfg.lotlip, cfg.loss)
    if cfg.method == "sycoca":
        from ..methods.sycoca import SyCoCaTask
        return SyCoCaTask(model, cfg.sycoca, cfg.loss)
    raise ConfigError(f"unknown method {cfg.method!r}")


def build_loader_factory(cfg: RunConfig, model):
    """`make_loader(epoch, skip_batches)` for the Trainer, over a manifest or shards."""
    from ..data.datasets import ImageTextDataset, build_loader, set_loader_epoch
    info = dist_utils.DistInfo(rank=dist_utils.rank(), world_size=dist_utils.world_size())
    d = cfg.data
    budget = model.tokenizer.context_length
    langs = list(d.langs)
    per_epoch = None
    if d.shards:
        from ..data.shards import ShardDataset, resolve_shards
        dataset = ShardDataset(d.shards, model.image_transform, tokenizer=model.tokenizer,
                               caption_key=d.caption_key, on_bad_record=d.on_bad_record,
                               long_caption_key="long_caption" if d.num_subcaptions else None,
                               num_subcaptions=d.num_subcaptions, subcaption_sentences=tuple(d.subcaption_sentences),
                               seed=cfg.train.seed, context_length=budget, rank=info.rank,
                               world_size=info.world_size)
        # Whole shards per rank give ranks different sample counts; DDP needs equal step counts,
        # so every rank stops an epoch after the same number of batches.
        _, counts = resolve_shards(d.shards)
        if counts:
            per_epoch = sum(counts.values()) // (info.world_size * d.batch_size)
    else:
        if not d.train:
            raise ConfigError("data.train (a manifest) or data.shards must be set")
        keys = [d.caption_key] + [f"{d.caption_key}_{lang}" for lang in langs if lang != "en"]
        datasets = [ImageTextDataset(d.train, model.image_transform, tokenizer=model.tokenizer, caption_key=key,
                                     on_bad_record=d.on_bad_record,
                                     long_caption_key="long_caption" if d.num_subcaptions else None,
                                     num_subcaptions=d.num_subcaptions,
                                     subcaption_sentences=tuple(d.subcaption_sentences), seed=cfg.train.seed,
                                     context_length=budget) for key in keys]
        dataset = datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)
        if len(datasets) > 1:
            dataset.set_epoch = lambda e: [ds.set_epoch(e) for ds in datasets]
    loader = build_loader(dataset, d.batch_size, shuffle=True, num_workers=d.num_workers, seed=cfg.train.seed,
                          drop_last=True, rank=info.rank, world_size=info.world_size,
                          tokenizer=model.tokenizer, context_length=budget)

    skipped = dict(getattr(getattr(dataset, "manifest", None), "skipped", {}) or {})
    if skipped and info.rank == 0:
        print(f"warning: {dataset.manifest.report()}")

    def make_loader(epoch: int, skip_batches: int):
        set_loader_epoch(loader, epoch)
        if not d.shards:
            if skip_batches:
                loader.sampler.skip(skip_batches)
            return loader
        # Streams cannot seek: replay the epoch (same order for the same epoch) and drop what was done.
        return itertools.islice(loader, skip_batches, per_epoch)

    make_loader.manifest_skipped = skipped
    return make_loader


def build_evaluate(cfg: RunConfig):
    e = cfg.eval
    if not (e.retrieval or e.longtext or e.zeroshot):
        return None
    from ..eval.suite import run_suite

    def evaluate(task, step: int) -> dict:
        return run_suite(task.model, retrieval=e.retrieval or None, longtext=e.longtext or None,
                         zeroshot=e.zeroshot or None, classes=e.classes or None, langs=tuple(e.langs),
                         limit=e.limit)

    return evaluate


def run_recipe(cfg: RunConfig) -> dict:
    """Train (or resume) the run described by `cfg`; writes `out_dir/{config.json, metrics.jsonl,
    checkpoints/, model/, final_metrics.json}` and returns the final metrics."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.init_distributed()
    torch.manual_seed(cfg.train.seed)
    if dist_utils.rank() == 0:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False))
    tokenizer = build_tokenizer(cfg, out_dir)
    dist_utils.barrier()
    model = build_model(cfg, tokenizer)
    task = build_task(cfg, model)
    make_loader = build_loader_factory(cfg, model)
    trainer = Trainer(task, make_loader, cfg.optim, cfg.train, out_dir, build_evaluate(cfg))
    if make_loader.manifest_skipped:
        trainer.log({"step": 0, "manifest_skipped": make_loader.manifest_skipped})
    final = trainer.fit()
    if dist_utils.rank() == 0 and trainer.state.step >= cfg.train.steps:
        model.save_pretrained(out_dir / "model")
        from ..eval.report import write_json
        write_json(out_dir / "final_metrics.json", {"step": trainer.state.step, **final})
    return final
