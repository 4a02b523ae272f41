"""One training loop for every method.

A *task* (nn.Module) maps a batch to a dict of losses whose "loss" entry is back-propagated. The same
code runs in one process or under `torchrun` (DDP; gloo on CPU, nccl on GPU). Runs resume exactly:
the model, optimizer, RNG states and the position in the data order are all in the checkpoint, and
the learning rate is a pure function of the step.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import ConfigError
from ..fileio import atomic_open
from . import distributed as dist_utils
from .logging import RunLogger, check_log_to
from ..precision import PRECISIONS, autocast, check_precision
from .threads import resolve_threads
from .checkpoint import (atomic_torch_save, latest_checkpoint, load_checkpoint, load_newest_readable, load_sharded,
                         prune_checkpoints, remove_stale_temp_files, restore_task_state, rng_state, save_sharded,
                         set_rng_state, sharded_checkpoint_path)
from .schedule import SCHEDULES, lr_at
from . import sharding
from .sharding import STRATEGIES



@dataclass
class OptimConfig:
    lr: float = 5e-4                # peak learning rate (after warm-up)
    weight_decay: float = 0.1       # AdamW decoupled weight decay (not on 1-d tensors nor what modules declare)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW moment decay rates
    eps: float = 1e-6               # AdamW denominator epsilon
    warmup_steps: int = 50          # linear warm-up from 0 to lr over this many steps
    schedule: str = "cosine"        # "cosine" | "constant"
    min_lr_ratio: float = 0.0       # cosine: the final lr as a fraction of lr
    clip_grad: float = 1.0          # max global grad norm; 0 disables
    accum_steps: int = 1            # micro-batches per optimizer step
    fused: bool = True              # fused AdamW kernel (CPU and CUDA); False = torch's multi-tensor (foreach)
    lr_scale: dict = field(default_factory=dict)  # {parameter-name substring: lr multiplier}, e.g. {"temporal.": 10}

    def validate(self, where: str = "recipe") -> "OptimConfig":
        """Check every value's type and range, so a bad one fails before training starts.

        Args:
            where: the file (or other source) the values came from, for the message.
        Returns:
            self.
        Raises:
            ConfigError: naming `where`, the key (e.g. `optim.lr`), the value and what is allowed.
        """
        _number(self.lr, "optim.lr", where, low=0.0, low_open=True, hint="e.g. optim.lr=5e-4")
        _number(self.weight_decay, "optim.weight_decay", where, low=0.0)
        betas = self.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"{where}: optim.betas must be two numbers in [0, 1), got {betas!r} "
                              f"(e.g. optim.betas=[0.9,0.98])")
        _number(self.eps, "optim.eps", where, low=0.0, low_open=True)
        _integer(self.warmup_steps, "optim.warmup_steps", where, low=0)
        _choice(self.schedule, "optim.schedule", where, SCHEDULES)
        _number(self.min_lr_ratio, "optim.min_lr_ratio", where, low=0.0, high=1.0)
        _number(self.clip_grad, "optim.clip_grad", where, low=0.0, hint="0 disables clipping")
        _integer(self.accum_steps, "optim.accum_steps", where, low=1)
        _boolean(self.fused, "optim.fused", where)
        if not isinstance(self.lr_scale, dict):
            raise ConfigError(f"{where}: optim.lr_scale must be a mapping {{name substring: multiplier}}, "
                              f"got {self.lr_scale!r}")
        for key, value in self.lr_scale.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{where}: optim.lr_scale keys must be non-empty parameter-name substrings, "
                                  f"got {key!r}")
            _number(value, f"optim.lr_scale.{key}", where, low=0.0, low_open=True)
        return self


@dataclass
class TrainConfig:
    steps: int = 1000               # optimizer steps in the whole run
    seed: int = 0                   # seeds the model init, data order and augmentation
    precision: str = "fp32"         # "fp32" | "bf16" (autocast; refused where the hardware only emulates bf16)
    precision_force: bool = False   # run bf16 even where the CPU only emulates it (~25x slower on AVX2)
    log_every: int = 10             # steps between metrics.jsonl lines
    eval_every: int = 0             # 0 = only at the end
    ckpt_every: int = 200           # steps between checkpoints; 0 = none (only the final model)
    keep_last: int = 2              # checkpoints kept (older ones are deleted)
    resume: str = "auto"            # "auto" (latest checkpoint in out_dir if any) | "never" | a checkpoint path
    stop_after: int = 0             # stop (as if killed) after this many steps; 0 = run to the end
    progress: bool = True           # a tqdm progress bar on rank 0
    threads: int | str = 0          # torch threads for this process: N, "auto" (the idle cores now), 0 = torch's default
    max_empty_batches: int = 100    # stop with an error after this many batches in a row had no usable sample
    log_to: list = field(default_factory=lambda: ["jsonl"])  # + "tensorboard": scalars in out_dir/tensorboard/
    val_loss_every: int = 0         # validation loss every N steps and at the end; 0 = none
    val_data: str = ""              # manifest (same form as data.train) whose batches give the validation loss
    compile: bool = False           # run the task's forward through torch.compile (see docs/results.md first)
    report: bool = True             # write report.html at the end of a run (`polymodal report RUN_DIR` redoes it)
    strategy: str = "ddp"           # "ddp" (replicate the model) | "fsdp" (shard params, grads, optimizer state; FSDP2)
    fsdp_offload: bool = False      # fsdp: keep the shards (and the optimizer step) in CPU memory
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less memory, ~1/3 more compute)

    def validate(self, where: str = "recipe") -> "TrainConfig":
        """Check every value's type and range, so a bad one fails before training starts.

        The existence of a `resume` checkpoint path is checked by the Trainer at start-up.

        Args:
            where: the file (or other source) the values came from, for the message.
        Returns:
            self.
        Raises:
            ConfigError: naming `where`, the key (e.g. `train.steps`), the value and what is allowed.
        """
        _integer(self.steps, "train.steps", where, low=1)
        _integer(self.seed, "train.seed", where)
        _choice(self.precision, "train.precision", where, PRECISIONS)
        _boolean(self.precision_force, "train.precision_force", where)
        _boolean(self.compile, "train.compile", where)
        _integer(self.log_every, "train.log_every", where, low=1)
        _integer(self.eval_every, "train.eval_every", where, low=0, hint="0 = only at the end")
        _integer(self.ckpt_every, "train.ckpt_every", where, low=0, hint="0 = no checkpoints")
        _integer(self.keep_last, "train.keep_last", where, low=1)
        if not isinstance(self.resume, (str, Path)) or not str(self.resume).strip():
            raise ConfigError(f"{where}: train.resume must be 'auto', 'never' or a checkpoint path, "
                              f"got {self.resume!r}")
        _integer(self.stop_after, "train.stop_after", where, low=0, hint="0 = run to the end")
        _boolean(self.progress, "train.progress", where)
        if self.threads != "auto":
            _integer(self.threads, "train.threads", where, low=0, hint="0 = torch's default, or auto")
        _integer(self.max_empty_batches, "train.max_empty_batches", where, low=1)
        try:
            check_log_to(self.log_to, where)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _integer(self.val_loss_every, "train.val_loss_every", where, low=0, hint="0 = no validation loss")
        if not isinstance(self.val_data, (str, Path)):
            raise ConfigError(f"{where}: train.val_data must be a manifest path, got {self.val_data!r}")
        _boolean(self.report, "train.report", where)
        _choice(self.strategy, "train.strategy", where, STRATEGIES)
        _boolean(self.fsdp_offload, "train.fsdp_offload", where)
        _boolean(self.activation_checkpointing, "train.activation_checkpointing", where)
        if self.fsdp_offload and self.strategy != "fsdp":
            raise ConfigError(f"{where}: train.fsdp_offload=true needs train.strategy=fsdp (got "
                              f"{self.strategy!r}); set train.strategy=fsdp or train.fsdp_offload=false")
        if self.val_data and not self.val_loss_every:
            raise ConfigError(f"{where}: train.val_data is set but train.val_loss_every is 0; set "
                              f"train.val_loss_every=N (steps) for a validation loss, or remove train.val_data")
        return self


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(v: Any, key: str, where: str, low: float | None = None, high: float | None = None,
            low_open: bool = False, hint: str = "") -> None:
    """A finite real number in [low, high] (or (low, high] with low_open); else ConfigError."""
    ok = _is_real(v) and (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ConfigError(f"{where}: {key} must be a finite number{' ' + rng if rng else ''}, got {v!r}"
                          + (f" ({hint})" if hint else ""))


def _integer(v: Any, key: str, where: str, low: int | None = None, hint: str = "") -> None:
    if not (isinstance(v, int) and not isinstance(v, bool)) or (low is not None and v < low):
        rng = f" >= {low}" if low is not None else ""
        raise ConfigError(f"{where}: {key} must be an integer{rng}, got {v!r}" + (f" ({hint})" if hint else ""))


def _choice(v: Any, key: str, where: str, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(allowed)}, got {v!r}")


def _boolean(v: Any, key: str, where: str) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {v!r}")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DataLoaderStuck(RuntimeError):
    """A data-loader worker gave no batch within its timeout (`data.worker_timeout`)."""


def _bounded_waits(batches):
    """Iterate `batches`, turning torch's worker time-out into a `DataLoaderStuck` that says what to do."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise DataLoaderStuck(f"a data-loader worker gave no batch in time ({e}); a record may hang its "
                                  f"decoder (a network path, a huge or broken file): check the data, raise "
                                  f"data.worker_timeout, or use data.num_workers=0 to see which record") from None
        yield batch


class DataExhausted(RuntimeError):
    """The data gives no usable sample (every record of many batches, or of a whole epoch, was skipped)."""


def no_decay_names(module: nn.Module) -> set[str]:
    """The parameters AdamW must not decay, by the names `module.named_parameters()` gives them.

    Two sources, and no name matching: the generic rule (every tensor with fewer than 2 dimensions: biases,
    norm weights, scales, single tokens), and what each submodule declares with ``no_weight_decay() ->
    set[str]``, names relative to itself (position and time embeddings, class tokens, token-embedding
    tables, learned queries), as open_clip's towers do. A module shared under two prefixes counts once.

    Args:
        module: the task or model the optimizer trains.

    Returns:
        the set of parameter names.

    Raises:
        ValueError: a declaration names something that is not a parameter of its module.
    """
    named = dict(module.named_parameters())
    canonical = {id(p): n for n, p in named.items()}
    out = {n for n, p in named.items() if p.ndim < 2}
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "no_weight_decay", None)
        if not callable(declared):
            continue
        for name in declared():
            try:
                p = sub.get_parameter(name)
            except AttributeError as e:
                raise ValueError(f"{type(sub).__name__} ({prefix or 'the root'}).no_weight_decay() names {name!r}, "
                                 f"which is not one of its parameters") from e
            out.add(canonical[id(p)])
    return out


def param_groups(model: nn.Module, weight_decay: float, lr_scale: dict | None = None) -> list[dict]:
    """AdamW groups: decay on every trainable parameter except those of :func:`no_decay_names`.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: for the decayed group.
        lr_scale: {name substring: multiplier}; a parameter whose name contains a key (the first that
            matches) gets the scheduled learning rate times the multiplier (e.g. STAN's 10x branch).
    Returns:
        Groups with `weight_decay` and `lr_scale` (1.0 for the plain two groups).
    """
    skip = no_decay_names(model)
    scales = [1.0] + sorted({float(v) for v in (lr_scale or {}).values()} - {1.0})
    groups = {(decayed, s): [] for s in scales for decayed in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = name not in skip
        scale = next((float(v) for k, v in (lr_scale or {}).items() if k in name), 1.0)
        groups[(decayed, scale)].append(p)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, scale), params in groups.items() if params or scale == 1.0]


@dataclass
class TrainState:
    step: int = 0                   # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0         # micro-batches of this epoch already consumed
    bad_records: Counter = field(default_factory=Counter)
    bad_seen: set = field(default_factory=set)          # (reason, record index) already counted


class Trainer:
    """Train `task` on the batches produced by `make_loader`.

    Args:
        task: nn.Module; `task(batch)` returns a dict with a scalar "loss" (and other scalars to log).
        make_loader: `make_loader(epoch, skip_batches) -> iterable of batches` for this rank. It must
            give the same batches for the same epoch (so a resumed run sees the same data), skipping
            the first `skip_batches`.
        optim: optimizer settings.
        train: loop settings.
        out_dir: where checkpoints (`checkpoints/step_N.pt`) and `metrics.jsonl` go.
        evaluate: optional `evaluate(task, step) -> dict` run on rank 0 every `eval_every` steps and at
            the end; its numbers are logged with an "eval/" prefix.
        val_loader: optional `val_loader() -> iterable of batches` (this rank's validation batches, the same
            each call); with `train.val_loss_every` the task's losses on them are logged as "val/<name>".

    Raises:
        ConfigError: at construction, for any bad `optim`/`train` value or a `train.resume` path that
            does not exist, so nothing fails after training started.
    """

    def __init__(self, task: nn.Module, make_loader: Callable[[int, int], Iterable[dict]], optim: OptimConfig,
                 train: TrainConfig, out_dir: str | Path, evaluate: Callable | None = None,
                 val_loader: Callable[[], Iterable[dict]] | None = None):
        self.task = task
        self.make_loader = make_loader
        optim.validate(where="config")
        train.validate(where="config")
        self.ocfg, self.tcfg = optim, train
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.evaluate = evaluate
        self.val_loader = val_loader
        if train.val_loss_every and val_loader is None:
            raise ConfigError(f"train.val_loss_every={train.val_loss_every} needs validation batches: set "
                              f"train.val_data to a manifest like data.train, or train.val_loss_every=0")
        if train.resume not in ("auto", "never") and not (Path(train.resume).is_file()
                                                          or (Path(train.resume) / ".metadata").is_file()):
            raise ConfigError(f"train.resume: checkpoint {train.resume} does not exist (or is not a file); "
                              f"give an existing step_N.pt (or step_N.dcp folder), or train.resume=auto (latest in "
                              f"{self.ckpt_dir}) or train.resume=never")
        self.dist = dist_utils.init_distributed()
        self.is_main = self.dist.rank == 0
        self.device = self.dist.device
        # The device is known only here: bf16 on a CPU that emulates it would make every step ~25x slower.
        check_precision(train.precision, self.device, train.precision_force, where="recipe")
        # The plan is checked before the model moves to the device: under FSDP a rank never holds all of it there.
        self.memory_plan = sharding.memory_plan(self.task, train.strategy, self.dist.world_size, train.fsdp_offload)
        if self.is_main:
            print(self.memory_plan.describe(), flush=True)
        sharding.check_memory_plan(self.memory_plan, sharding.available_memory(self.device), self.device,
                                   resident=sharding.resident_bytes(self.task, self.device))
        # Under FSDP a rank other than 0 may bring a task built on the meta device (`run_recipe` does): it gets
        # rank 0's weights once sharded (`sharding.fill_from_rank0`).
        deferred = sharding.has_meta_parameters(self.task)
        if deferred and not (train.strategy == "fsdp" and self.dist.world_size > 1 and not self.is_main):
            raise ValueError("the task has meta-device (unallocated) weights; only ranks other than 0 of a "
                             "train.strategy=fsdp run may build it that way")
        if not deferred:
            self.task.to(self.device)
        if train.activation_checkpointing and sharding.enable_activation_checkpointing(self.task) == 0:
            warnings.warn("train.activation_checkpointing=true, but the task has no block stack to recompute "
                          "(no Transformer/MultiwayEncoder `blocks`, no transformers model): nothing changes",
                          stacklevel=2)
        # FSDP shards over the ranks; in one process there is nothing to shard and the task runs as it is, but the
        # checkpoints stay sharded ones (`step_N.dcp/`) so that a run can move between 1 and W processes.
        self.fsdp = train.strategy == "fsdp"
        self.sharded = self.fsdp and (self.dist.world_size > 1 or dist_utils.is_dist())   # a 1-rank group shards too
        self._replicated: list[nn.Parameter] = []      # FSDP: parameters left unsharded (their grads averaged here)
        self._logged_names: list[str] = []             # the logged numbers the ranks agreed on (`_mean_over_ranks`)
        self._plain_task: nn.Module | None = None      # FSDP: the unsharded task (meta until `full_task` fills it)
        self._full_step = -1
        if self.sharded:
            sharding.check_fsdp_support(self.task)
            self._plain_task = sharding.meta_copy(self.task)
            # bf16 parameters/compute with fp32 reduction where the hardware does bf16 (CUDA); on CPU autocast only.
            mixed = train.precision == "bf16" and self.device.type == "cuda"
            # Whether any rank deferred its build decides the protocol, so every rank asks (one all-reduce).
            any_deferred = dist_utils.all_reduce_min(0 if deferred else 1, self.device) == 0
            full_state = self.task.state_dict() if any_deferred and self.is_main else None
            self._replicated = sharding.apply_fsdp(self.task, self.device, mixed_precision=mixed,
                                                   offload=train.fsdp_offload)
            if any_deferred:
                sharding.fill_from_rank0(self.task, full_state, self.device)
                del full_state          # materialising replaced the meta ranks' unsharded parameters: list them again
                self._replicated = [p for p in self.task.parameters() if p.ndim == 0 and p.requires_grad]
            self.module = self.wrapped = self.task
        else:
            self.module = self.wrapped = dist_utils.wrap_ddp(self.task, self.dist)
        if train.compile:        # the forward only; checkpoints keep reading the plain task's state dict
            self.module = torch.compile(self.module)
        # The fused kernel does the whole update in one pass per tensor (~2.7x faster optimizer step on CPU
        # than foreach in benchmarks/train_step.py); it needs floating-point tensors on CPU or CUDA.
        fused = optim.fused and self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(param_groups(self.task, optim.weight_decay, optim.lr_scale), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)
        self.state = TrainState()
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.logger = RunLogger(self.out_dir, train.log_to, self.metrics_path)
        self._empty_streak = 0                      # batches in a row without a usable sample
        self._empty_reasons: Counter = Counter()    # why the records of those batches were skipped
        self._usable_in_epoch = 0                   # usable batches seen in this epoch (since the loader started)

    # -- checkpoints -------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {"step": self.state.step, "epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch,
                "bad_records": dict(self.state.bad_records), "bad_seen": sorted(self.state.bad_seen),
                "rng": rng_state(), "world_size": self.dist.world_size}

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/step_N.pt` (rank 0), or under FSDP the sharded `checkpoints/step_N.dcp/` (every rank).

        Returns:
            The checkpoint's path on rank 0, None on the other ranks."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_state, optim_state = get_state_dict(self.task, self.optimizer)
            path = save_sharded({"task": model_state, "optimizer": optim_state}, self._trainer_state(),
                                sharded_checkpoint_path(self.ckpt_dir, self.state.step), self.is_main)
            if not self.is_main:
                return None
            prune_checkpoints(self.ckpt_dir, self.tcfg.keep_last)
            return path
        if not self.is_main:
            return None
        path = self.ckpt_dir / f"step_{self.state.step:08d}.pt"
        atomic_torch_save({"task": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                           **self._trainer_state()}, path)
        prune_checkpoints(self.ckpt_dir, self.tcfg.keep_last)
        return path

    def _load_weights(self, ckpt: dict, path: Path) -> None:
        """The checkpoint's task weights and optimizer state into the (possibly sharded) task and optimizer."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        if ckpt.get("sharded"):                      # any world size, sharded or not: DCP re-shards on load
            model_state, optim_state = get_state_dict(self.task, self.optimizer)
            state = {"task": model_state, "optimizer": optim_state}
            load_sharded(state, path)
            set_state_dict(self.task, self.optimizer, model_state_dict=state["task"],
                           optim_state_dict=state["optimizer"])
        elif self.sharded:                           # a plain (DDP) checkpoint into a sharded task
            restore_task_state(self._plain_task, ckpt["task"], path, check_only=True)
            set_state_dict(self.task, self.optimizer, model_state_dict=ckpt["task"],
                           optim_state_dict=_optimizer_state_by_name(self.task, self.optimizer, ckpt["optimizer"]),
                           options=StateDictOptions(full_state_dict=True))
        else:
            restore_task_state(self.task, ckpt["task"], path)     # another model: one line, nothing half-loaded
            self.optimizer.load_state_dict(ckpt["optimizer"])

    def full_task(self) -> nn.Module | None:
        """The task with its full, unsharded weights: the task itself unless FSDP shards it. Under FSDP every rank
        must call it (it gathers the shards); rank 0 gets a plain copy in CPU memory, the others None. The copy is
        refreshed once per step.

        Returns:
            A module to evaluate or save (`save_pretrained`) in one process, or None off rank 0 under FSDP."""
        if not self.sharded:
            return self.task
        if self._full_step != self.state.step:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(self.task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.is_main:
                plain = sharding.materialize_(self._plain_task, "cpu")
                plain.load_state_dict(full)
                own = dict(plain.named_buffers())
                for name, buf in self.task.named_buffers():     # buffers are replicated, never sharded
                    own[name].copy_(buf.detach())
                plain.train(self.task.training)
            self._full_step = self.state.step
        return self._plain_task if self.is_main else None

    def maybe_resume(self) -> None:
        """Load the checkpoint `train.resume` names; "auto" takes the newest readable one in `checkpoints/`.

        A start from step 0 in a folder that already has metrics (a run killed before its first
        checkpoint) drops that run's step lines, like a resume does for the steps after its checkpoint."""
        resume = self.tcfg.resume
        if resume == "never":
            self._truncate_metrics(0)
            return
        if resume == "auto":
            path, ckpt = load_newest_readable(self.ckpt_dir)      # one warning: what was passed over, what is used
        else:
            path = Path(resume)
            if not path.exists():
                raise ConfigError(f"train.resume: checkpoint {path} does not exist")
            ckpt = load_checkpoint(path)
        if ckpt is None:
            self._truncate_metrics(0)
            return
        self._load_weights(ckpt, path)
        self.state = TrainState(ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], Counter(ckpt["bad_records"]),
                                {tuple(x) for x in ckpt.get("bad_seen", [])})
        set_rng_state(ckpt["rng"])
        saved_world = ckpt.get("world_size", self.dist.world_size)
        if saved_world != self.dist.world_size and self.is_main:
            warnings.warn(f"resuming a checkpoint written by {saved_world} rank(s) on {self.dist.world_size}: the data "
                          f"position is exact only if the global batch (data.batch_size x ranks) is the same as "
                          f"then; scale data.batch_size by {saved_world}/{self.dist.world_size}", stacklevel=2)
        self._truncate_metrics(self.state.step)
        self.log({"event": "resumed", "checkpoint": str(path), "step": self.state.step})
        if self.is_main:
            note = " (the run is finished: nothing left to train)" if self.state.step >= self.tcfg.steps else ""
            print(f"resuming from step {self.state.step} (checkpoint {path}){note}", flush=True)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after `step` by the run that died, so the curve has no duplicates.

        Lines that are not a JSON object (a line torn by a kill or a full disk, usually the last) are
        dropped with one warning naming the file and the lines. The file is replaced atomically."""
        if not self.is_main or not self.metrics_path.is_file():
            return
        raw = self.metrics_path.read_bytes()
        kept, torn, dropped = [], [], 0
        for line_no, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                torn.append(line_no)
                continue
            step_of = record.get("step", 0)
            if isinstance(step_of, (int, float)) and step_of > step:
                dropped += 1
                continue
            kept.append(line)
        if torn:
            warnings.warn(f"{self.metrics_path}: dropping line(s) {', '.join(map(str, torn))} that are not "
                          f"complete JSON records (torn by an interrupted write)", stacklevel=3)
        if not torn and not dropped:
            return
        with atomic_open(self.metrics_path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))

    # -- logging -----------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.is_main:
            self.logger.log(record)

    # -- the loop ----------------------------------------------------------------------------
    def _batches(self):
        """Endless stream of batches, resuming inside an epoch when needed.

        Raises:
            DataExhausted: an epoch had no batch, or (read from its start) no usable sample.
        """
        while True:
            skip = self.state.batch_in_epoch
            self._usable_in_epoch = 0
            for batch in _bounded_waits(self.make_loader(self.state.epoch, skip)):
                self.state.batch_in_epoch += 1
                yield batch
            if self.state.batch_in_epoch == 0:
                raise DataExhausted("the training data is empty (no batch in an epoch); check the manifest "
                                    "and that batch_size <= number of records per rank")
            if skip == 0 and self._usable_in_epoch == 0:
                # `_next_usable` has judged every batch of this epoch by now (the generator is lazy).
                raise self._exhausted(f"no usable sample in epoch {self.state.epoch} ({self.state.batch_in_epoch} "
                                      f"batches; skipped: {_reasons(self._empty_reasons)}); fix the data or "
                                      f"check data.on_bad_record and the manifest")
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    def _next_usable(self, batches) -> dict:
        """The next batch on the device; batches whose every record was bad (skip policy) are counted and passed.

        Under DDP the ranks' batches must have one size (the contrastive all-gather needs equal shapes), but
        the skip policy can shorten one rank's batch: every rank then cuts its batch to the smallest size
        (good samples cut this way are counted as `cut_to_match_ranks`), and an empty batch on any rank
        makes every rank pass to the next one, so all ranks run the same collectives.

        Raises:
            DataExhausted: `train.max_empty_batches` batches in a row had no usable sample (on any rank);
                the message gives the skip counts by reason."""
        while True:
            batch = next(batches)
            reasons = batch.get("bad_reasons") or {}
            self._count_bad(batch, reasons)
            empty = "index" in batch and batch["index"].numel() == 0
            if self.dist.world_size == 1:
                usable = batch if not empty else None
            else:
                n = 0 if empty else _batch_size(batch)
                smallest = dist_utils.all_reduce_min(n, self.device)   # every rank gets the same answer
                if smallest < n:
                    self.state.bad_records["cut_to_match_ranks"] += n - smallest
                usable = None if smallest == 0 else trim_batch(batch, smallest) if smallest < n else batch
            if usable is not None:
                self._usable_in_epoch += 1
                self._empty_streak = 0
                self._empty_reasons.clear()
                return self._to_device(usable)
            self._empty_streak += 1
            self._empty_reasons.update(reasons)
            if self._empty_streak >= self.tcfg.max_empty_batches:
                raise self._exhausted(
                    f"no usable sample in {self._empty_streak} consecutive batches (skipped: "
                    f"{_reasons(self._empty_reasons)}); fix the data (the run's skip counts are in "
                    f"{self.metrics_path}) or raise train.max_empty_batches")

    def _count_bad(self, batch: dict, reasons: dict) -> None:
        """Count the batch's bad records once per run: a record already counted in an earlier pass (same reason,
        same record index) is not counted again; records without an index (a broken shard) count each time."""
        known = batch.get("bad_indices")
        if known is None:                                  # a collate that does not say which records
            self.state.bad_records.update(reasons)
            return
        for reason, index in known:
            if index < 0 or (reason, index) not in self.state.bad_seen:
                self.state.bad_records[reason] += 1
                if index >= 0:
                    self.state.bad_seen.add((reason, index))
        rest = Counter(reasons)
        rest.subtract(Counter(r for r, _ in known))
        self.state.bad_records.update({k: v for k, v in rest.items() if v > 0})   # Nones: no index at all

    def _exhausted(self, message: str) -> DataExhausted:
        """The error that ends a run without usable data; the skip counts so far are logged first."""
        self.log({"step": self.state.step, "bad_records": dict(self.state.bad_records)})
        return DataExhausted(message)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def fit(self) -> dict:
        """Run until `train.steps` optimizer steps are done (or `stop_after`). Returns the last logged numbers."""
        threads = resolve_threads(self.tcfg.threads)
        if threads > 0:
            # On a CPU shared with other work (or several ranks per machine), fewer threads than cores
            # can be many times faster: the threads otherwise wait on each other (benchmarks/threads.py).
            torch.set_num_threads(threads)
        if self.is_main:
            params = sum(p.numel() for p in self.task.parameters())
            trained = sum(p.numel() for p in self.task.parameters() if p.requires_grad)
            print(f"train: device {self.device}, {torch.get_num_threads()} torch thread(s) (train.threads="
                  f"{self.tcfg.threads}), {self.dist.world_size} process(es); {trained:,} trained of {params:,} "
                  f"parameters; {self.tcfg.steps} steps", flush=True)
        torch.manual_seed(self.tcfg.seed)
        if self.is_main:
            remove_stale_temp_files(self.ckpt_dir)   # litter of writes a kill interrupted
        self.maybe_resume()
        o, t = self.ocfg, self.tcfg
        stop_at = t.steps if t.stop_after <= 0 else min(t.steps, self.state.step + t.stop_after)
        bar = None
        if self.is_main and t.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=t.steps, initial=self.state.step, desc="train", dynamic_ncols=True)
        batches = self._batches()
        last: dict = {}
        window_samples, window_start = 0, time.perf_counter()
        self.task.train()
        while self.state.step < stop_at:
            lr = lr_at(self.state.step, o.lr, t.steps, o.warmup_steps, o.schedule, o.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            if o.accum_steps > 1 and getattr(self.task, "supports_feature_cache", False):
                micro_batches = [self._next_usable(batches) for _ in range(o.accum_steps)]
                sums = self._feature_cache_step(micro_batches)
                window_samples += sum(_batch_size(b) for b in micro_batches) * self.dist.world_size
            else:
                sums = {}
                for micro in range(o.accum_steps):
                    batch = self._next_usable(batches)
                    sync = micro == o.accum_steps - 1
                    with self._gradient_sync(sync):
                        with autocast(t.precision, self.device):
                            losses = self.module(batch)
                        (losses["loss"] / o.accum_steps).backward()
                    for k, v in losses.items():
                        if torch.is_tensor(v) and v.numel() == 1:
                            sums[k] = sums.get(k, 0.0) + float(v.detach()) / o.accum_steps
                    window_samples += _batch_size(batch) * self.dist.world_size
            if self.sharded:
                sharding.average_replicated_grads(self._replicated)
            if self.dist.world_size > 1:   # log (and check) the mean over ranks, as one vector
                sums = self._mean_over_ranks(sums)
            if not math.isfinite(sums["loss"]):
                kept = latest_checkpoint(self.ckpt_dir)
                raise TrainingDiverged(
                    f"loss became {sums['loss']} at step {self.state.step + 1}; stopping. "
                    f"Last good checkpoint: {kept or 'none written yet'}. Lower optim.lr or enable "
                    f"optim.clip_grad, then resume with train.resume=auto.")
            grad_norm = None
            if o.clip_grad > 0 and self.sharded:
                grad_norm = sharding.clip_grad_norm(list(self.task.parameters()), o.clip_grad)
            elif o.clip_grad > 0:
                grad_norm = float(nn.utils.clip_grad_norm_(self.task.parameters(), o.clip_grad))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            step = self.state.step
            if step % t.log_every == 0 or step == stop_at:
                elapsed = time.perf_counter() - window_start
                last = {"step": step, "epoch": self.state.epoch, "lr": lr, **sums,
                        "samples_per_s": window_samples / max(elapsed, 1e-9)}
                if grad_norm is not None:
                    last["grad_norm"] = grad_norm
                self.log(last)
                window_samples, window_start = 0, time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr:.2e}",
                                    sps=f"{last['samples_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if t.val_loss_every and (step % t.val_loss_every == 0 or step == t.steps):
                self.run_val_loss()
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                self.run_eval()
            if t.ckpt_every and (step % t.ckpt_every == 0 or step == stop_at):
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.state.bad_records:
            self.log({"step": self.state.step, "bad_records": dict(self.state.bad_records)})
        if self.state.step >= t.steps:
            last.update(self.run_eval())
        self.logger.close()
        return last

    def _mean_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Each logged number's mean over the ranks that have it, in one all-reduce of (value, count) pairs over the
        names the ranks agreed on. A task may log a number only where it was measured (an accuracy over the masked
        words of its rows): the vector's last pair counts the names some rank logs that are not agreed yet, and only
        then (rarely: the first steps) do the ranks exchange their names and reduce again."""
        import torch.distributed as dist
        known = self._logged_names
        new = sum(k not in known for k in sums)
        pairs = torch.tensor([[sums.get(k, 0.0), float(k in sums)] for k in known] + [[float(new), 0.0]],
                             device=self.device)
        totals = (dist_utils.all_reduce_mean(pairs) * self.dist.world_size).tolist()      # (K + 1, 2): sums, ranks
        if totals[-1][0] > 0:
            everyone: list = [None] * self.dist.world_size
            dist.all_gather_object(everyone, sorted(sums))
            self._logged_names = sorted(set(known).union(*everyone))
            return self._mean_over_ranks(sums)
        return {k: float(v / c) for k, (v, c) in zip(known, totals[:-1]) if c > 0}

    def _gradient_sync(self, sync: bool):
        """A context in which backward does (sync) or does not (accumulate locally) reduce gradients over ranks."""
        if self.sharded:
            sharding.set_gradient_sync(self.task, sync)
            return nullcontext()
        if not sync and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return self.wrapped.no_sync()
        return nullcontext()

    def _feature_cache_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """Gradient accumulation for a loss over the whole batch (contrastive): the gradient of the loss of all
        micro-batches together, with the activations of one micro-batch at a time.

        The task declares `supports_feature_cache = True` and takes `task(batch, stage="features")` -> {name: (B, ...)
        tensors} and `task(features, stage="loss")` -> the losses of features concatenated over micro-batches. As
        GradCache (Gao et al. 2021), which OpenCLIP's `--accum-freq` approximates:
        1. every micro-batch's features without a graph (the RNG state before each is kept);
        2. the loss over all of them, features as leaves: backward gives d loss / d features, and the gradient of the
           parameters the loss itself uses (logit scale, bias), once;
        3. each micro-batch's features again, with a graph and the same RNG draws (dropout, patch dropout), and
           backward of those features with their gradient from 2.
        The sum over micro-batches is the full batch's gradient (chain rule); peak activations are one micro-batch's.
        Gradients are reduced over ranks by the last backward (FSDP) or one all-reduce at the end (DDP, whose
        reducer expects every parameter in each backward).

        Returns:
            The losses of step 2 as numbers.
        """
        t = self.tcfg
        states, cached = [], []
        with torch.no_grad():
            for batch in micro_batches:
                states.append(rng_state())
                with autocast(t.precision, self.device):
                    feats = self.module(batch, stage="features")
                cached.append({k: v.detach() for k, v in feats.items()})
        after = rng_state()
        if any(c.keys() != cached[0].keys() or any(c[k].shape[1:] != cached[0][k].shape[1:] for k in c)
               for c in cached):
            raise ValueError(f"optim.accum_steps={len(micro_batches)}: the micro-batches' features differ in names or "
                             f"shapes ({[{k: tuple(v.shape) for k, v in c.items()} for c in cached]}), so they cannot "
                             f"be joined into one batch; make the batches uniform or set optim.accum_steps=1")
        leaves = {k: torch.cat([c[k] for c in cached]).requires_grad_(True) for k in cached[0]}
        ddp = isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        ctx = self.wrapped.no_sync() if ddp else nullcontext()
        with ctx:
            sharding.set_gradient_sync(self.task, False)
            with autocast(t.precision, self.device):
                losses = self.module(leaves, stage="loss")
            losses["loss"].backward()
            grads = {k: v.grad for k, v in leaves.items()}
            start = 0
            for i, batch in enumerate(micro_batches):
                rows = len(next(iter(cached[i].values())))
                set_rng_state(states[i])
                sharding.set_gradient_sync(self.task, i == len(micro_batches) - 1)
                with autocast(t.precision, self.device):
                    feats = self.module(batch, stage="features")
                names = [k for k in feats if grads[k] is not None and feats[k].requires_grad]
                torch.autograd.backward([feats[k] for k in names], [grads[k][start:start + rows] for k in names])
                start += rows
        set_rng_state(after)
        if ddp:
            _all_reduce_grads_mean([p for p in self.task.parameters() if p.grad is not None])
        return {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.numel() == 1}

    def run_val_loss(self) -> dict:
        """The task's mean losses over `val_loader()` (eval mode, no gradients), logged as "val/<name>".

        Every rank runs it (a distributed loss gathers across ranks) and the logged numbers are the mean
        over ranks. The RNG states are restored afterwards, so training continues exactly as without it.

        Raises:
            DataExhausted: the validation data gave no usable batch."""
        saved = rng_state()
        sums: dict[str, float] = {}
        count = 0
        self.task.eval()
        with torch.no_grad():
            for batch in _bounded_waits(self.val_loader()):
                if "index" in batch and batch["index"].numel() == 0:
                    continue
                batch = self._to_device(batch)
                with autocast(self.tcfg.precision, self.device):
                    losses = self.module(batch)
                n = _batch_size(batch)
                for k, v in losses.items():
                    if torch.is_tensor(v) and v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v) * n
                count += n
        self.task.train()
        set_rng_state(saved)
        if count == 0:
            raise DataExhausted("train.val_data gave no usable validation batch (fewer records than "
                                "data.batch_size, or every record skipped); use a larger validation manifest")
        names = sorted(sums)
        means = torch.tensor([sums[k] / count for k in names], device=self.device)
        if self.dist.world_size > 1:
            means = dist_utils.all_reduce_mean(means)
        results = {f"val/{k}": v for k, v in zip(names, means.tolist())}
        self.log({"step": self.state.step, **results})
        return results

    def run_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        results = {}
        task = self.full_task()                       # under FSDP every rank gathers; rank 0 evaluates
        if self.is_main:
            task.eval()
            with torch.no_grad():
                results = {f"eval/{k}": v for k, v in self.evaluate(task, self.state.step).items()}
            task.train()
            self.log({"step": self.state.step, **results})
        dist_utils.barrier()
        return results


def _all_reduce_grads_mean(params: list[nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks in one flat all-reduce (what DDP's reducer does)."""
    sharding.average_replicated_grads(params)


def _optimizer_state_by_name(task: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A plain optimizer state dict (parameters numbered in param-group order) keyed by parameter names, the form
    `set_state_dict(..., full_state_dict=True)` takes; the groups are those `param_groups` built for `task`."""
    names = {id(p): n for n, p in task.named_parameters()}
    ordered = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    index = [i for g in saved["param_groups"] for i in g["params"]]
    if len(index) != len(ordered):
        raise ValueError(f"the checkpoint's optimizer has {len(index)} parameters, this task trains {len(ordered)}")
    by_index = dict(zip(index, ordered))
    groups = [{**g, "params": [by_index[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": {by_index[i]: v for i, v in saved["state"].items()}, "param_groups": groups}


def trim_batch(batch: dict, n: int) -> dict:
    """The first `n` samples of a collated batch: tensors and lists of the batch's length are cut,
    everything else (counters, flags) is kept."""
    size = _batch_size(batch)
    cut = lambda v: v[:n] if (torch.is_tensor(v) and v.ndim > 0 or isinstance(v, list)) and len(v) == size else v
    return {k: cut(v) for k, v in batch.items()}


def _reasons(counts: Counter) -> str:
    """`corrupt_image=6400, missing_key=3`, most frequent first; "none recorded" when empty."""
    return ", ".join(f"{k}={v}" for k, v in counts.most_common()) or "none recorded"


def _batch_size(batch: dict) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.ndim > 0:
            return len(v)
    return 0
