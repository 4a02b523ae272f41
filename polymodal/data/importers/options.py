"""Reader options (`-o KEY=VALUE`): each reader names the ones it takes, and an unknown one is a one-line error."""
from __future__ import annotations

import inspect
import sys

from .common import LayoutError


def check_options(fmt: str, options: dict, known: tuple) -> None:
    """LayoutError naming an unknown option of format `fmt`, the closest known one and all of them."""
    from ...config import did_you_mean
    for name in options:
        if name not in known:
            raise LayoutError(f"{fmt}: unknown option {name!r}{did_you_mean(name, known)}; its options: "
                              f"{', '.join(known) or 'none'} (-o KEY=VALUE)")


def reject_unknown(read, options: dict) -> None:
    """`check_options` for a reader whose keyword parameters are its options and whose `**options` caught the
    rest (`options`): the format name is read from the reader module's docstring."""
    if not options:
        return
    known = tuple(p.name for p in inspect.signature(read).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("src", "split"))
    doc = sys.modules[read.__module__].__doc__ or ""
    check_options(doc.split("`")[1] if doc.count("`") >= 2 else read.__module__, options, known)


__all__ = ["check_options", "reject_unknown"]
