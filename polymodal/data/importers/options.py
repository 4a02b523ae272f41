"""Reader options (`-o KEY=VALUE`): each reader names the ones it takes, and an unknown one is a one-line error."""
from __future__ import annotations

from .common import LayoutError


def check_options(fmt: str, options: dict, known: tuple) -> None:
    """LayoutError naming an unknown option of format `fmt`, the closest known one and all of them."""
    from ...config import did_you_mean
    for name in options:
        if name not in known:
            raise LayoutError(f"{fmt}: unknown option {name!r}{did_you_mean(name, known)}; its options: "
                              f"{', '.join(known) or 'none'} (-o KEY=VALUE)")


__all__ = ["check_options"]
