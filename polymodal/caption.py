"""Captioning from the command line: `polymodal caption MODEL IMAGES...` captions image files or the
images of a manifest and writes one JSON object per image, {"image": path, "caption": text}, to `--out`
(JSONL) or stdout. Generation and its evaluation live in `polymodal.eval.captioning`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models.decoding import GENERATION_METHODS
from .precision import PRECISIONS, check_precision

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def add_caption_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `caption` command's arguments to `parser` and return it."""
    parser.add_argument("model", help="a saved captioner directory (or a bundled config name, random init)")
    parser.add_argument("images", nargs="+", help="image files, or one manifest (.jsonl/.csv) with an 'image' field")
    parser.add_argument("--out", default=None, help="JSONL file to write (default: print to stdout)")
    parser.add_argument("--method", choices=GENERATION_METHODS, default="beam")
    parser.add_argument("--max-len", type=int, default=None, help="most tokens incl. start/end (default: context length)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=0.0, help="beam: rank by logp / len**alpha")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="random seed of nucleus sampling")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16 = bf16 autocast; refused on a CPU without native bf16 unless --precision-force")
    parser.add_argument("--precision-force", action="store_true",
                        help="run bf16 even where it is emulated (about 25x slower on an AVX2 CPU)")
    parser.add_argument("--no-cache", action="store_true", help="decode without the KV cache (slower; same captions)")
    return parser


def _image_paths(items: list[str]) -> list[str]:
    """Expand the positional inputs: one manifest -> its image paths; otherwise the files themselves."""
    if len(items) == 1 and Path(items[0]).suffix.lower() in MANIFEST_SUFFIXES:
        from .data.manifests import read_manifest
        return [r["image"] for r in read_manifest(items[0], required=("image",))]
    missing = [p for p in items if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"caption: image file(s) not found: {', '.join(missing[:5])}")
    return list(items)


def caption_main(args: argparse.Namespace) -> list[dict]:
    """Run the `caption` command from parsed arguments; returns the records written."""
    import torch

    from .eval.captioning import caption_images
    from .hub import load_model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = getattr(args, "precision", "fp32")
    check_precision(precision, device, getattr(args, "precision_force", False), where="caption",
                    key="--precision", force_key="--precision-force")
    model = load_model(args.model).to(device).eval()
    if not hasattr(model, "generate"):
        raise ValueError(f"caption: {args.model} is a {type(model).__name__}, not a captioner (model_type 'coca')")
    paths = _image_paths(args.images)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    records = []
    try:
        for rec in caption_images(model, paths, args.method, args.max_len, args.num_beams, args.length_penalty,
                                  args.top_p, args.temperature, args.batch_size, args.seed,
                                  precision=precision, use_cache=not getattr(args, "no_cache", False)):
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            records.append(rec)
    finally:
        if args.out:
            out.close()
    return records
