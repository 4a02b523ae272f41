"""Atomic file writes: readers see the old file or the complete new one, never a partial file."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    mask = os.umask(0)           # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def usual_permissions(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything below it) the permissions a plain `open` / `mkdir` would: the
    temporary files and folders atomic writes start from are owner-only (0600 / 0700)."""
    mask = _umask()
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in items:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush, fsync and rename it to `path`.

    Args:
        path: destination; parent folders are created.
        mode: "w" (text) or "wb" (binary).
        **kwargs: passed to the file object (encoding, newline).
    Yields:
        The open temporary file. On an exception it is deleted and `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())        # mkstemp makes 0600: give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
