"""Reader options given as `-o KEY=VALUE`: an unknown name is an error that lists the reader's options."""
from __future__ import annotations

import inspect
import sys


def reject_unknown(read, options: dict) -> None:
    """ValueError naming the options in `options` (the reader's `**options` catch-all) and the ones `read` takes.

    Args:
        read: a reader function; its keyword parameters (besides `src` and `split`) are its options.
        options: the names left over after the reader's own parameters took theirs.
    """
    if not options:
        return
    known = [p.name for p in inspect.signature(read).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("src", "split")]
    doc = sys.modules[read.__module__].__doc__ or ""
    fmt = doc.split("`")[1] if doc.count("`") >= 2 else read.__module__
    raise ValueError(f"{fmt}: unknown option(s) {', '.join(sorted(options))}; it takes "
                     f"{', '.join(f'-o {k}=...' for k in known) if known else 'no options'}")


__all__ = ["reject_unknown"]
