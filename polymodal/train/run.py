"""Recipes: a typed `RunConfig` read from YAML (+ `key=value` overrides) and `run_recipe`, which asks the
recipe's method (`polymodal.methods.METHODS`) for its tokenizer, model, data, task and evaluation, trains
with the one Trainer, and writes the final model and metrics. Nothing here names a method.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, apply_overrides, did_you_mean, from_dict, load_yaml, to_dict
from ..data.config import DataConfig
from ..eval.tasks import EvalConfig
from ..losses.contrastive import LossConfig
from ..methods import DEFAULT_METHOD, METHODS, get_method
from ..methods.base import ModelSpec, TokenizerSpec
from . import distributed as dist_utils
from .loop import OptimConfig, TrainConfig, Trainer


@dataclass
class RunConfig:
    """A whole run. The section named after `method` is the method's own config; it is
    parsed by the method's `config_cls` and kept in `method_config` (not a recipe key)."""
    method: str = DEFAULT_METHOD         # a name in polymodal.methods.METHODS
    out_dir: str = "runs/run"               # checkpoints, metrics, the final model and the report go here
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method_config: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The recipe as nested dicts (written to `out_dir/config.json`; loadable again as a recipe)."""
        out = {k: v for k, v in to_dict(self).items() if k != "method_config"}
        if self.method_config is not None:
            out[self.method] = to_dict(self.method_config)
        return out

    def __getattr__(self, name: str):
        # `cfg.<method name>` reads the method's section, as the recipe spells it.
        d = self.__dict__
        if "method" in d and name == d["method"] and d.get("method_config") is not None:
            return d["method_config"]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def method_impl(self):
        """The method object (`methods.base.Method`) this run uses."""
        return get_method(self.method)(self, self.method_config)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Read a recipe YAML, apply `key=value` overrides and validate every key and value.

    `base` holds defaults under the file: a section the file also has is merged key by key.

    An error that only the overrides cause is blamed on the override (`override 'optim.lrr=1': ...`), not
    on the file; unknown keys get a "did you mean".

    Raises:
        ConfigError: naming the file (or the override) and the unknown/mistyped key or bad value.
    """
    data = copy.deepcopy(dict(base or {}))
    where = "recipe"
    if path is not None:        # the file's values win over `base`, section by section
        for key, value in load_yaml(path).items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        where = str(path)
    overrides = list(overrides or [])
    try:
        return _build_run(apply_overrides(copy.deepcopy(data), overrides), where)
    except ConfigError as err:
        if not overrides or path is None:       # no file to blame instead
            raise
        try:                          # the file alone: if it is fine, an override is to blame
            _build_run(copy.deepcopy(data), where)
        except ConfigError:
            raise err from None
        for i, item in enumerate(overrides):     # the first override after which the recipe is broken
            try:
                _build_run(apply_overrides(copy.deepcopy(data), overrides[:i + 1]), where)
            except ConfigError as single:
                message = str(single)
                if message.startswith(where):
                    message = message[len(where):].lstrip(".:")
                raise ConfigError(f"override {item!r}: {message.strip()}") from None
        raise ConfigError(f"overrides {' '.join(overrides)}: {err}") from None


def _build_run(data: dict, where: str) -> RunConfig:
    name = data.get("method", DEFAULT_METHOD)
    try:
        cls = get_method(name)
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: method {name!r} is not one of {', '.join(METHODS)}"
                          f"{did_you_mean(name, METHODS)}") from None
    section = data.pop(name, None) if isinstance(name, str) and name not in RunConfig.__dataclass_fields__ else None
    strays = [k for k in data if k in METHODS and k not in RunConfig.__dataclass_fields__]
    if strays:
        raise ConfigError(f"{where}: section {strays[0]!r} belongs to method {strays[0]!r}, but this recipe's "
                          f"method is {name!r}; remove the section or set method: {strays[0]}")
    if "method_config" in data:
        raise ConfigError(f"{where}: unknown key 'method_config'; put the method's settings under `{name}:`")
    cfg = from_dict(RunConfig, data, where)
    try:
        if cls.config_cls is not None:
            cfg.method_config = from_dict(cls.config_cls, section or {}, f"{where}.{name}")
        elif section:
            raise ConfigError(f"{where}: method {name!r} takes no `{name}:` section")
        validate_run(cfg, where)
    except ConfigError:
        raise
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{where}: {e.args[0] if e.args else e}") from None
    return cfg


def validate_run(cfg: RunConfig, where: str = "recipe") -> None:
    """Check every section's values (and the method's cross-section rules); raises ValueError naming the key."""
    cfg.optim.validate(where)
    cfg.train.validate(where)
    cfg.loss.validate()
    cfg.data.validate()
    cfg.tokenizer.validate()
    cfg.eval.specs()
    cfg.method_impl.validate()


def check_paths(cfg: RunConfig) -> None:
    """Every file the run will open must exist now, not after training: data, eval, tokenizer, model; and
    `out_dir` must be a folder the run can write (not a file, not on a read-only file system).

    Raises:
        FileNotFoundError: naming the recipe key and the path.
        ConfigError: `out_dir` (or a folder on its way) is a file, or cannot be written.
    """
    import os
    out = Path(cfg.out_dir)
    probe = out                                  # the nearest part of out_dir that exists
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == out else f"has a file on its way ({probe})"
        raise ConfigError(f"out_dir: {out} {where}, not a folder; give a folder path, e.g. out_dir=runs/my_run")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir: cannot write in {probe} (read-only file system or no permission); give a "
                          f"folder you can write, e.g. out_dir=runs/my_run")
    if cfg.data.shards:                           # a folder, a glob or a brace range: every shard must exist
        from ..data.shards import resolve_shards
        try:
            resolve_shards(cfg.data.shards)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"data.shards: {e} (checked before training; fix the path, e.g. "
                                    f"data.shards=data/shards or data.shards='data/shards/{{00000..00009}}.tar')") from None
    wanted = [("data.train", cfg.data.train), ("model.path", cfg.model.path),
              ("train.val_data", cfg.train.val_data), ("tokenizer.path", cfg.tokenizer.path)]
    wanted += [("eval", p) for p in cfg.eval.paths()]
    wanted += [(cfg.method, p) for p in cfg.method_impl.paths()]
    if cfg.train.resume not in ("auto", "never"):
        wanted.append(("train.resume", cfg.train.resume))
    if cfg.model.path and not Path(cfg.model.path).exists():
        from ..hub import resolve_hub_id
        if resolve_hub_id(cfg.model.path) is not None:            # a hub id in the cache (or downloaded)
            wanted = [w for w in wanted if w[0] != "model.path"]
    for key, path in wanted:
        if path and not Path(path).exists():
            if key == "model.path":
                raise FileNotFoundError(f"model.path: {path} does not exist (checked before training): "
                                        f"{_start_hint(Path(path))}")
            raise FileNotFoundError(f"{key}: {path} does not exist (checked before training; fix the path in the "
                                    f"recipe or override it, e.g. {key.split()[0]}=...)")


def _start_hint(path: Path) -> str:
    """How to get the start a recipe names: `runs/<name>/model` is built by `recipes/<name>.yaml` when there is one."""
    run = path.parent if path.name == "model" else None
    recipe = Path("recipes") / f"{run.name}.yaml" if run is not None else None
    build = (f"build it first with `polymodal train {recipe}` (its header names the data it reads), "
             if recipe is not None and recipe.is_file() else "")
    return (f"{build}point model.path at a saved model or hub id you have, or set model.path= (empty) to train the "
            f"recipe's named config from random weights")


def _world_frames(manifest) -> tuple[int | None, dict, Path]:
    """Frames per video of the generated world whose `world.json` sits beside `manifest` (None: no such file),
    with the world's summary and the file's path."""
    import json
    world_file = Path(manifest).parent / "world.json"
    if not world_file.is_file():
        return None, {}, world_file
    try:
        world = json.loads(world_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{world_file}: unreadable ({e}); regenerate the data or remove the file") from None
    frames = (world.get("config") or {}).get("num_frames") if isinstance(world, dict) else None
    return (frames if isinstance(frames, int) else None), (world if isinstance(world, dict) else {}), world_file


def check_data(cfg: RunConfig) -> None:
    """The recipe against what the data says of itself: the method's own checks of its manifests
    (`Method.check_data`), the eval tasks' checks of theirs (`eval.tasks.check_task_data`: QA and MCQ records), and a generated video world's `world.json` beside `data.train` or an evaluation's data
    (frames per video; the method may check more, `Method.check_world`).

    Raises:
        ConfigError: naming the recipe key, the world file and the fix.
    """
    from ..eval.tasks import check_task_data
    method = cfg.method_impl
    method.check_data()
    specs = cfg.eval.specs()
    for spec in specs:
        check_task_data(spec)
    if method.media != "video":
        return
    wanted = [("data.num_frames", cfg.data.num_frames, cfg.data.train)] if cfg.data.train else []
    wanted += [(f"eval {s.task} num_frames", s.options["num_frames"], s.data)
               for s in specs if "num_frames" in s.options]
    for key, n, manifest in wanted:
        frames, world, world_file = _world_frames(manifest)
        if frames is not None and n > frames:
            raise ConfigError(f"{key}={n}: the videos beside {manifest} have {frames} frames ({world_file}), so "
                              f"frames would repeat; set {key.split()[-1]}={frames} or regenerate with "
                              f"--num-frames {n}")
        if key == "data.num_frames" and world:
            method.check_world(world, world_file)


def build_task(cfg: RunConfig, model):
    """The recipe's training objective over `model` (the method's `build_task`)."""
    return cfg.method_impl.build_task(model)


def build_loader_factory(cfg: RunConfig, method, model):
    """`make_loader(epoch, skip_batches)` for the Trainer, over the method's dataset and collate."""
    from ..data.datasets import build_loader, set_loader_epoch
    info = dist_utils.DistInfo(rank=dist_utils.rank(), world_size=dist_utils.world_size())
    d = cfg.data
    dataset, per_epoch = method.build_dataset(model, info.rank, info.world_size)
    streaming = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = build_loader(dataset, d.batch_size, shuffle=True, num_workers=d.num_workers, seed=cfg.train.seed,
                          drop_last=True, rank=info.rank, world_size=info.world_size,
                          collate_fn=method.collate(model), timeout=d.worker_timeout if d.num_workers else 0)

    skipped = dict(getattr(getattr(dataset, "manifest", None), "skipped", {}) or {})
    if skipped and info.rank == 0:
        print(f"warning: {dataset.manifest.report()}")

    def make_loader(epoch: int, skip_batches: int):
        set_loader_epoch(loader, epoch)
        if not streaming:
            if skip_batches:
                loader.sampler.skip(skip_batches)
            return loader
        # Streams cannot seek: replay the epoch (same order for the same epoch) and drop what was done.
        return itertools.islice(loader, skip_batches, per_epoch)

    make_loader.manifest_skipped = skipped
    make_loader.num_samples = len(dataset) if not streaming else None
    make_loader.batches_per_epoch = len(loader) if not streaming else per_epoch
    return make_loader


def build_val_loader(cfg: RunConfig, method, model):
    """`val_loader()` for the Trainer's validation loss: the batches of `train.val_data`, made like the training
    batches (the method's dataset and collate, `data.batch_size`, this rank's share) and the same every call;
    None when the recipe asks for no validation loss."""
    if not cfg.train.val_data or not cfg.train.val_loss_every:
        return None
    import dataclasses
    val_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=cfg.train.val_data, shards=""))
    make = build_loader_factory(val_cfg, val_cfg.method_impl, model)
    return lambda: make(0, 0)


def build_evaluate(cfg: RunConfig, method):
    """`evaluate(task, step) -> dict` for the Trainer, or None when the recipe lists no evaluation."""
    specs = cfg.eval.specs()
    if not specs:
        return None

    def evaluate(task, step: int) -> dict:
        return method.evaluate(task, specs)

    return evaluate


def write_eval_commands(cfg: RunConfig, out_dir: Path) -> None:
    """`out_dir/eval_commands.json`: for every eval of the recipe, the `polymodal eval` command that gives its
    numbers again from `out_dir/model` ({prefix: command line})."""
    import shlex

    from ..eval.report import write_json
    from ..eval.tasks import eval_command
    commands = {spec.prefix: shlex.join(["polymodal", *eval_command(spec, str(out_dir / "model"))])
                for spec in cfg.eval.specs()}
    if commands:
        write_json(out_dir / "eval_commands.json", commands)


def _build_model_and_task(cfg: RunConfig, method, tokenizer):
    """The method's model and task. Under `train.strategy=fsdp` with several ranks, ranks other than 0 build them on
    the meta device (no memory: a 10B model is not built once per process) and receive rank 0's weights once the
    Trainer has sharded the task. A model that cannot be built there (code that reads tensor values while building)
    is built normally, with one warning."""
    if cfg.train.strategy == "fsdp" and dist_utils.world_size() > 1 and dist_utils.rank() != 0:
        try:
            with torch.device("meta"):
                model = method.build_model(tokenizer)
                return model, method.build_task(model)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            import warnings
            warnings.warn(f"rank {dist_utils.rank()}: the model cannot be built on the meta device ({type(e).__name__}: "
                          f"{e}); building it in memory (rank 0's weights still replace it)", stacklevel=2)
    model = method.build_model(tokenizer)
    return model, method.build_task(model)


def run_recipe(cfg: RunConfig) -> dict:
    """Train (or resume) the run described by `cfg`; writes `out_dir/{config.json, metrics.jsonl,
    checkpoints/, model/, final_metrics.json, eval_commands.json}`, the run's `report.html` / `report.md` / `curves.png`
    (`train.report`) and `tensorboard/` (`train.log_to`), and returns the final metrics.

    Every path the run opens is checked before anything is built, and the method builds its model, data and
    task before the first step, so a bad recipe fails in seconds, not after training."""
    check_paths(cfg)
    check_data(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.init_distributed()
    torch.manual_seed(cfg.train.seed)
    if dist_utils.rank() == 0:
        from ..eval.report import write_json
        write_json(out_dir / "config.json", cfg.to_dict())
    method = cfg.method_impl
    tokenizer = method.build_tokenizer(out_dir)
    dist_utils.barrier()
    model, task = _build_model_and_task(cfg, method, tokenizer)
    from ..eval.tasks import check_model
    evaluated = method.final_model(task)
    for spec in cfg.eval.specs():                  # a task the saved model cannot run fails now, not at the first eval
        check_model(spec.task, evaluated)
    make_loader = build_loader_factory(cfg, method, model)
    trainer = Trainer(task, make_loader, cfg.optim, cfg.train, out_dir, build_evaluate(cfg, method),
                      val_loader=build_val_loader(cfg, method, model))
    if make_loader.manifest_skipped:
        trainer.log({"step": 0, "manifest_skipped": make_loader.manifest_skipped})
    if dist_utils.rank() == 0:
        size = f"{make_loader.num_samples:,} samples" if make_loader.num_samples is not None else "a stream of shards"
        per = make_loader.batches_per_epoch
        print(f"data: {size}, batch {cfg.data.batch_size} per process, "
              f"{f'{per:,} steps per epoch' if per else 'steps per epoch unknown (no shard counts)'}", flush=True)
    final = trainer.fit()
    finished = trainer.state.step >= cfg.train.steps
    full = trainer.full_task() if finished else None     # under FSDP every rank gathers the shards; rank 0 saves
    if dist_utils.rank() == 0 and finished:
        method.final_model(full).save_pretrained(out_dir / "model")
        from ..eval.report import write_json
        skips = {}
        if trainer.state.bad_records:                 # each bad record once, by reason
            skips["bad_records"] = dict(trainer.state.bad_records)
        if make_loader.manifest_skipped:              # records the manifest reader left out
            skips["manifest_skipped"] = dict(make_loader.manifest_skipped)
        write_json(out_dir / "final_metrics.json", {"step": trainer.state.step, **final, **skips})
        write_eval_commands(cfg, out_dir)
        if cfg.train.report:
            from ..run_report import report_after_training
            report_after_training(out_dir)
    return final


__all__ = ["RunConfig", "load_recipe", "run_recipe", "build_task", "check_paths", "validate_run"]
