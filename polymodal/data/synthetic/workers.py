"""Running a synthetic world's per-sample function over processes, and clearing what a regeneration replaced,
the same way for every world."""
from __future__ import annotations

import multiprocessing as mp
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def sample_map(workers: int, total: int, initializer: Callable, initargs: tuple,
               max_chunk: int = 64) -> Iterator[Callable]:
    """A `map(fn, tasks)` that runs in `workers` processes (or in this one), set up by `initializer(*initargs)`.

    Args:
        workers: processes; 1 (or a single sample) runs inline.
        total: samples over all calls (decides whether a pool is worth starting).
        initializer, initargs: per-process set-up (e.g. the output folder and config).
        max_chunk: the largest chunk of tasks sent to a worker at once.
    Yields:
        `run(fn, tasks) -> iterator of results in task order`.
    """
    pool = None
    if workers > 1 and total > 1:
        # fork is cheap and the workers never touch torch; spawn elsewhere.
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        pool = ctx.Pool(workers, initializer=initializer, initargs=initargs)
    else:
        initializer(*initargs)

    def run(fn: Callable, tasks: list):
        if pool is None:
            return map(fn, tasks)
        return pool.imap(fn, tasks, chunksize=max(1, min(max_chunk, len(tasks) // (workers * 8) or 1)))

    try:
        yield run
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def remove_stale(folder, pattern: str, keep) -> int:
    """Delete the files of `folder` whose names match `pattern` (the world's own naming) but are not in `keep`:
    what an earlier, larger generation into the same folder left behind. Other files are never touched.

    Args:
        folder: the world's media folder (e.g. out/videos).
        pattern: a regular expression a generated file's whole name matches.
        keep: names (not paths) written by this generation.
    Returns:
        How many files were deleted.
    """
    folder, keep, rx, n = Path(folder), set(keep), re.compile(pattern), 0
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.is_file() and rx.fullmatch(p.name) and p.name not in keep:
            p.unlink()
            n += 1
    return n
