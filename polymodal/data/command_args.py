"""The arguments of the `polymodal data` commands whose modules import torch (`frames`, `filter`, `shard`), kept
apart so `polymodal data frames --help` answers without loading torch; each command's module runs it."""
from __future__ import annotations

import argparse

from .manifests import BAD_RECORD_POLICIES

FRAME_STRATEGIES = ("uniform", "keyframes", "scene")       # polymodal.data.video.STRATEGIES (a test keeps them equal)
REWRITERS = ("template", "none", "lm")                     # polymodal data filter --rewrite


def frames_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``polymodal data frames`` options to `parser`.

    Args:
        parser: an (sub)parser.

    Returns:
        The same parser.
    """
    parser.add_argument("manifest", help="JSONL or CSV manifest whose records have a 'video' field")
    parser.add_argument("--out", required=True, help="output directory for shard-*.tar and shards.json")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per video (default 8)")
    parser.add_argument("--strategy", choices=FRAME_STRATEGIES, default="keyframes",
                        help="frame choice: codec key frames, uniform in time, or scene changes (default keyframes)")
    parser.add_argument("--max-side", type=int, default=None, help="shrink frames so the longer side is at most this")
    parser.add_argument("--format", dest="image_format", choices=("jpg", "png"), default="jpg",
                        help="frame image format (default jpg)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--shard-size", type=int, default=1000, help="videos per shard at most (default 1000)")
    parser.add_argument("--on-bad-record", choices=BAD_RECORD_POLICIES, default="error",
                        help="error: stop at the first bad record or video; skip: skip and count them")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def filter_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `polymodal data filter` options to `parser`.

    Args:
        parser: an (sub)parser.
    Returns:
        The same parser.
    """
    parser.add_argument("manifest", help="JSONL/CSV manifest whose records have 'video' and captions")
    parser.add_argument("--model", required=True, help="scoring model: a saved model dir, HF CLIP dir, OpenCLIP "
                                                       "checkpoint or named config")
    parser.add_argument("--out", required=True, help="filtered manifest to write (scores in 'filter_score')")
    sel = parser.add_mutually_exclusive_group(required=True)
    sel.add_argument("--keep", type=float, help="keep this top fraction of pairs, e.g. 0.5")
    sel.add_argument("--threshold", type=float, help="keep pairs scoring at least this cosine similarity")
    parser.add_argument("--caption-key", default="caption", help="caption field to score (default caption)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per video for scoring (default 8)")
    parser.add_argument("--strategy", default="uniform", choices=FRAME_STRATEGIES,
                        help="frame sampling for scoring (default uniform)")
    parser.add_argument("--rewrite", default="template", choices=REWRITERS,
                        help="caption rewriting of kept pairs: template (normalise), none, lm (--rewrite-model)")
    parser.add_argument("--rewrite-model", default="", help="local causal-LM folder for --rewrite lm")
    parser.add_argument("--batch-size", type=int, default=16, help="videos per batch (default 16)")
    parser.add_argument("--on-bad-record", choices=BAD_RECORD_POLICIES, default="error",
                        help="error: stop at the first bad record or video; skip: skip and count them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_size(text: str) -> int:
    """'500M', '1G', '2.5e8' -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def shard_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of ``polymodal data shard MANIFEST --out DIR`` to `parser`."""
    parser.add_argument("manifest", help="JSONL or CSV manifest to shard")
    parser.add_argument("--out", required=True, help="output directory for shard-*.tar and shards.json")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--max-size", type=parse_size, default=1 << 30,
                        help="bytes per shard at most, e.g. 500M or 1G (default 1G)")
    parser.add_argument("--on-bad-record", choices=BAD_RECORD_POLICIES, default="error",
                        help="error: stop at the first bad record; skip: skip and count them")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


__all__ = ["FRAME_STRATEGIES", "REWRITERS", "frames_arguments", "filter_arguments", "parse_size", "shard_arguments"]
