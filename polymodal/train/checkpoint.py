"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A crash during a save leaves the previous checkpoints untouched; a checkpoint appears under its
final name in one rename. What a crash can still leave behind is handled here too: the temporary
files of interrupted writes (`.step_N.pt.XXXX.tmp`, removed by `remove_stale_temp_files`), and a
newest checkpoint that is incomplete for another reason (a copy cut short, a disk that lied about
fsync): `latest_checkpoint` and `load_newest_readable` skip files whose zip directory cannot be read (or
that are plain pickles), with one warning naming them and the checkpoint used instead; `restore_task_state`
says in one line when a checkpoint was written for another model.

Under `train.strategy: fsdp` a checkpoint is a folder `step_N.dcp/` written by every rank at once with
`torch.distributed.checkpoint` (each rank writes its shards; `.metadata` is written last) plus `trainer.pt` (step,
data position, RNG states: rank 0's). It is made atomic the same way: the ranks write `.step_N.dcp.tmp/`, and rank 0
renames it once every rank is done. A folder without `.metadata` or `trainer.pt` is incomplete and passed over. It
loads at any world size (DCP re-shards on load), and into an unsharded model in one process.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..convert.common import CheckpointError as _LoadError
from ..fileio import atomic_open

_NAME = re.compile(r"^step_(\d+)\.pt$")
# What `atomic_open` names its temporary file for `step_N.pt` (see fileio.atomic_open).
_TEMP_NAME = re.compile(r"^\.step_\d+\.pt\..+\.tmp$")
# Sharded checkpoints (folders) and the folder ranks write into before the rename.
_DIR_NAME = re.compile(r"^step_(\d+)\.dcp$")
_TEMP_DIR_NAME = re.compile(r"^\.step_\d+\.dcp(\.old)?\.tmp$")
TRAINER_FILE = "trainer.pt"


class CheckpointError(_LoadError, RuntimeError):
    """A checkpoint file cannot be read (truncated, not a checkpoint, refused for safety) or does not fit the
    model being trained. A user error (the loaders' `CheckpointError`): the command line prints one line."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (usually a full disk); earlier checkpoints are kept."""


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save `obj` to `path` atomically.

    Args:
        obj: what to save (tensors, dicts, numbers).
        path: destination file; its folder is created.
    Raises:
        CheckpointWriteError: the write failed (disk full, I/O error); the message names the file and
            the free space, the temporary file is removed and any earlier file at `path` is untouched.
    """
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        # A write error inside torch's zip writer surfaces as RuntimeError("[enforce fail at
        # inline_container.cc:...] ... unexpected pos ..." or "... file write failed"); the flush, fsync
        # and rename raise OSError (ENOSPC, EIO, EDQUOT). Other RuntimeErrors are not about the file.
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        raise CheckpointWriteError(getattr(e, "errno", None) or errno.EIO, _write_failure_message(path, e)) from e


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e)
    return "inline_container" in text or "write failed" in text or "PytorchStreamWriter" in text


def _write_failure_message(path: Path, e: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    earlier = [p.name for _, p in list_checkpoints(path.parent) if p != path]
    kept = f"earlier checkpoints are kept ({', '.join(earlier[-2:])})" if earlier else "no earlier checkpoint exists"
    return (f"cannot write checkpoint {path} ({type(e).__name__}: {e}); the disk may be full ({free} on "
            f"{path.parent}); {kept}. Free space (or lower train.keep_last), then resume the run with "
            f"train.resume=auto")


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted checkpoint writes left in `folder`.

    Only call this when no other process writes checkpoints there (rank 0, before training starts).

    Args:
        folder: the checkpoint folder (missing is fine).
    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMP_NAME.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
        elif _TEMP_DIR_NAME.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `folder` (by name, temporary files excluded), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name) or _DIR_NAME.match(p.name))]
    return sorted(found)


def is_complete_checkpoint(path: Path) -> bool:
    """Cheap completeness check: the zip directory at the end of the file reads and lists a pickle.

    A truncated file loses the directory, so this catches cut-short files without reading the tensors. A sharded
    checkpoint (folder) is complete when DCP's `.metadata` (written after every rank's shards) and a complete
    `trainer.pt` are there.
    """
    if Path(path).is_dir():
        return (Path(path) / ".metadata").is_file() and is_complete_checkpoint(Path(path) / TRAINER_FILE)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            size = Path(path).stat().st_size
            return any(n.endswith("data.pkl") for n in names) and all(
                i.header_offset + i.compress_size <= size for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def why_incomplete(path: Path) -> str:
    """Why `is_complete_checkpoint(path)` is False, in words ("" when it is complete)."""
    if is_complete_checkpoint(path):
        return ""
    if Path(path).is_dir():
        return "is an incomplete sharded checkpoint (no .metadata or trainer.pt: a write was cut short?)"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if head[:1] == b"\x80":
        return "is a plain pickle, not a torch checkpoint (refused: unpickling could run code)"
    if head == b"PK":
        return "is incomplete (truncated?)"
    return "is not a checkpoint (no zip archive)" if head else "is incomplete (truncated?): the file is empty"


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None.

    Newer files that are incomplete (see `is_complete_checkpoint`) are passed over with one warning that
    names each of them and the checkpoint used instead.
    """
    passed = []
    for _, path in reversed(list_checkpoints(folder)):
        why = why_incomplete(path)
        if not why:
            _warn_passed_over(passed, path)
            return path
        passed.append(f"checkpoint {path} {why}")
    _warn_passed_over(passed, None)
    return None


def _warn_passed_over(passed: list[str], used: Path | None) -> None:
    if passed:
        warnings.warn(f"{'; '.join(passed)}; ignoring {'it' if len(passed) == 1 else 'them'} and "
                      f"{f'using {used.name}, the newest readable one' if used else 'finding no older checkpoint'}",
                      stacklevel=3)


def load_newest_readable(folder: Path) -> tuple[Path | None, dict | None]:
    """(path, contents) of the newest checkpoint in `folder` that loads, or (None, None).

    Newer ones that are incomplete, plain pickles, or refused by `load_checkpoint` are passed over with one
    warning naming each of them, why, and the checkpoint used instead (so a resume says where it resumed from).
    """
    passed = []
    for _, path in reversed(list_checkpoints(folder)):
        why = why_incomplete(path)
        if why:
            passed.append(f"checkpoint {path} {why}")
            continue
        try:
            state = load_checkpoint(path)
        except CheckpointError as e:
            passed.append(str(e).split("; ")[0])
            continue
        _warn_passed_over(passed, path)
        return path, state
    _warn_passed_over(passed, None)
    return None, None


def restore_task_state(task: torch.nn.Module, state: dict, path: Path, check_only: bool = False) -> None:
    """Load a checkpoint's task weights into `task`, or say in one line why it was written for another model.

    Keys and shapes are compared before anything is loaded, so a refused checkpoint changes nothing.

    Args:
        task: the module being trained (its `state_dict()` keys are the reference).
        state: the checkpoint's "task" entry.
        path: the checkpoint file, for the message.
        check_only: compare only, load nothing (the caller loads, e.g. into a sharded task).
    Raises:
        CheckpointError: missing or unexpected keys, or tensors of another shape (counts and first names).
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds no task weights (got {type(state).__name__}); it is not a "
                              f"polymodal training checkpoint")
    own = task.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in state and torch.is_tensor(state[k]) and tuple(state[k].shape) != tuple(own[k].shape)]
    _check_same_model(path, missing, unexpected, reshaped)
    if not check_only:
        task.load_state_dict(state)


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep_last]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def rng_state() -> dict:
    """Every RNG a training step may touch."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by the Trainer.

    Args:
        path: the checkpoint file.
    Returns:
        The saved dict (tensors on the CPU). For a sharded checkpoint (folder) the dict of `trainer.pt` with
        `"sharded": path` added; the weights and optimizer state are read by `load_sharded`.
    Raises:
        CheckpointError: the file is truncated or not a checkpoint, or holds pickled objects other
            than tensors and plain containers (refused for safety: loading them could run code).
    """
    if Path(path).is_dir():
        state = load_checkpoint(Path(path) / TRAINER_FILE)
        return {**state, "sharded": str(path)}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, which would run the file's code: never say that.
        raise CheckpointError(f"checkpoint {path} holds pickled objects other than tensors and is refused for "
                              f"safety; delete it to resume from an older one") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated. "
                              f"Delete it to resume from an older one") from e


def sharded_checkpoint_path(folder: Path, step: int) -> Path:
    """Where the sharded checkpoint of `step` goes: `folder/step_{step:08d}.dcp`."""
    return Path(folder) / f"step_{step:08d}.dcp"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_sharded(state: dict, extras: dict, path: Path, is_main: bool) -> Path:
    """Write a sharded checkpoint atomically; every rank calls it (a collective).

    Args:
        state: {"task": model state dict, "optimizer": optimizer state dict} as
            `torch.distributed.checkpoint.state_dict.get_state_dict` gives them (DTensors under FSDP).
        extras: plain values rank 0 writes to `trainer.pt` (step, data position, RNG states).
        path: the final folder (`sharded_checkpoint_path`).
        is_main: True on rank 0, which prepares the temporary folder, writes `trainer.pt` and renames.
    Returns:
        `path`.
    Raises:
        CheckpointWriteError: a rank could not write (disk full); the temporary folder is removed by the next
            start (`remove_stale_temp_files`) and earlier checkpoints are kept.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    distributed = dist.is_available() and dist.is_initialized()
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)             # litter of a save a kill interrupted
        tmp.mkdir(parents=True)
    if distributed:
        dist.barrier()
    try:
        with warnings.catch_warnings():          # DCP warns that one process means no process group: we know
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed)
        if is_main:
            atomic_torch_save(extras, tmp / TRAINER_FILE)
    except (OSError, RuntimeError) as e:
        raise CheckpointWriteError(getattr(e, "errno", None) or errno.EIO, _write_failure_message(path, e)) from e
    if distributed:
        dist.barrier()                                       # every rank's shards and .metadata are on disk
    if is_main:
        _fsync_dir(tmp)
        if path.exists():                                    # a step written again after a resume further back
            old = path.parent / f".{path.name}.old.tmp"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    if distributed:
        dist.barrier()
    return path


def load_sharded(state: dict, path: Path) -> None:
    """Fill `state` ({"task": ..., "optimizer": ...} from `get_state_dict`) in place from the sharded checkpoint at
    `path`, at any world size; every rank calls it.

    The checkpoint's keys are compared with the model's first, so a checkpoint of another model fails in one line.

    Raises:
        CheckpointError: the checkpoint holds other weights (missing, unknown or reshaped), or cannot be read.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - re-raised with the folder name
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it to resume from "
                              f"an older one") from e
    own = {f"task.{k}": tuple(v.shape) for k, v in state["task"].items() if torch.is_tensor(v)}
    saved = {k: tuple(getattr(v, "size", ())) for k, v in meta.items() if k.startswith("task.")}
    missing = [k[5:] for k in own if k not in saved]
    unexpected = [k[5:] for k in saved if k not in own]
    reshaped = [f"{k[5:]} {saved[k]} vs {own[k]}" for k in own if k in saved and saved[k] != own[k]]
    _check_same_model(path, missing, unexpected, reshaped)
    distributed = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not distributed)


def _check_same_model(path, missing: list[str], unexpected: list[str], reshaped: list[str]) -> None:
    """Raise `CheckpointError` naming what differs when a checkpoint's weights are not this model's."""
    if not (missing or unexpected or reshaped):
        return

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    parts = [f"{len(missing)} weight(s) of this model missing ({some(missing)})" if missing else "",
             f"{len(unexpected)} unknown to it ({some(unexpected)})" if unexpected else "",
             f"{len(reshaped)} of another shape ({some(reshaped)})" if reshaped else ""]
    raise CheckpointError(f"checkpoint {path} was written for another model: {'; '.join(p for p in parts if p)}. "
                          f"Resume it with the recipe that wrote it, or start afresh in another out_dir (or with "
                          f"train.resume=never)")
