"""`polymodal data import FORMAT SRC --out MANIFEST [--split S] [-o KEY=VALUE ...]`."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `data import` command's arguments."""
    from . import FORMATS
    parser.add_argument("format", choices=list(FORMATS), metavar="FORMAT",
                        help=f"the dataset's layout: {', '.join(FORMATS)}")
    parser.add_argument("src", help="the dataset's root folder as shipped, or its annotation file")
    parser.add_argument("--out", required=True, help="the manifest to write (.jsonl, or .csv)")
    parser.add_argument("--split", default=None, help="only this split (default: every split, kept per record)")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="a reader option (see the format's documentation), e.g. -o image_key=filepath")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run `polymodal data import`: write the manifest, print the summary as JSON and return it."""
    from ...config import ConfigError, apply_overrides
    from . import import_dataset
    try:
        options = apply_overrides({}, args.option)
    except ConfigError as e:
        raise ValueError(f"--option: {e}") from None
    summary = import_dataset(args.format, args.src, args.out, args.split, **options)
    for note in summary["notes"]:
        print(f"note: {note}")
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
