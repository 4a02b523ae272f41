"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename.

A crash during a save leaves the previous checkpoints untouched; a checkpoint appears under its
final name in one rename. What a crash can still leave behind is handled here too: the temporary
files of interrupted writes (`.step_N.pt.XXXX.tmp`, removed by `remove_stale_temp_files`), and a
newest checkpoint that is incomplete for another reason (a copy cut short, a disk that lied about
fsync): `latest_checkpoint` skips files whose zip directory cannot be read, with a warning.
"""
from __future__ import annotations

import errno
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_open

_NAME = re.compile(r"^step_(\d+)\.pt$")
# What `atomic_open` names its temporary file for `step_N.pt` (see fileio.atomic_open).
_TEMP_NAME = re.compile(r"^\.step_\d+\.pt\..+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, not a checkpoint, or refused for safety)."""


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
    return removed


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in `folder` (by name, temporary files excluded), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def is_complete_checkpoint(path: Path) -> bool:
    """Cheap completeness check: the zip directory at the end of the file reads and lists a pickle.

    A truncated file loses the directory, so this catches cut-short files without reading the tensors.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            size = Path(path).stat().st_size
            return any(n.endswith("data.pkl") for n in names) and all(
                i.header_offset + i.compress_size <= size for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint in `folder`, or None.

    Newer files that are incomplete (see `is_complete_checkpoint`) are passed over with a warning.
    """
    for _, path in reversed(list_checkpoints(folder)):
        if is_complete_checkpoint(path):
            return path
        warnings.warn(f"checkpoint {path} is incomplete or not a checkpoint (truncated?); ignoring it and "
                      f"using an older one", stacklevel=2)
    return None


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (keep_last <= 0 keeps everything)."""
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(folder)[:-keep_last]:
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
        The saved dict (tensors on the CPU).
    Raises:
        CheckpointError: the file is truncated or not a checkpoint, or holds pickled objects other
            than tensors and plain containers (refused for safety: loading them could run code).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, which would run the file's code: never say that.
        raise CheckpointError(f"checkpoint {path} holds pickled objects other than tensors and is refused for "
                              f"safety; delete it to resume from an older one") from None
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated. "
                              f"Delete it to resume from an older one") from e
