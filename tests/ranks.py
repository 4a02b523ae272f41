"""Gloo ranks for the distributed tests: a deadline instead of a hang, and the rare fault of a rank that has finished
its work but aborts or hangs while gloo tears its process group down.

That fault ("terminate called without an active exception", or a rank stuck with no Python frame left after the
test's last collective) has been seen a few times a day under load, never before a rank's work was done, and it is
not what these tests measure: a rank marks its work done (`done`) once everything it writes is on disk, and
`run_ranks` accepts a teardown fault only after every rank did (with a warning naming it); any fault before that,
and any Python exception, fails the test as before.
"""
import time
import warnings
from pathlib import Path

import pytest


def done(out_dir, rank: int) -> None:
    """Rank `rank` has written everything the test reads (call it just before ending the process group)."""
    Path(out_dir, f".rank{rank}.done").touch()


def run_ranks(worker, args: tuple, world: int, out_dir, timeout_s: float = 600, grace_s: float = 60,
              finished=None) -> None:
    """Run `worker(rank, *args)` in `world` spawned processes and wait for them.

    Args:
        worker, args: as `torch.multiprocessing.start_processes`.
        world: processes.
        out_dir: where the ranks' `done` marks go (cleared first).
        timeout_s: the whole run's deadline (the test fails after it).
        grace_s: how long ranks that all finished may take to exit before they are ended.
        finished: `rank -> bool` instead of the `done` marks (e.g. a rank's result file exists).
    """
    import torch.multiprocessing as mp
    marks = [Path(out_dir, f".rank{r}.done") for r in range(world)]
    for m in marks:
        m.unlink(missing_ok=True)
    all_done = (lambda: all(finished(r) for r in range(world))) if finished else (lambda: all(m.exists() for m in marks))
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline, done_at = time.monotonic() + timeout_s, None
    while True:
        try:
            if ctx.join(timeout=1):
                return
        except mp.ProcessExitedException as e:              # a signal or an exit code, not a Python exception
            if not all_done():
                raise
            _end(ctx)
            warnings.warn(f"a rank faulted in process-group teardown after its work was done ({e}); results kept")
            return
        if all_done():
            done_at = done_at or time.monotonic()
            if time.monotonic() - done_at > grace_s:
                _end(ctx)
                warnings.warn(f"a rank hung in process-group teardown for {grace_s:.0f} s after its work was done; "
                              f"ended, results kept")
                return
        if time.monotonic() > deadline:
            _end(ctx)
            pytest.fail(f"distributed workers (W={world}) did not finish within {timeout_s} s")


def _end(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(5)
