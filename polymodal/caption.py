"""Captioning from the command line and captioning evaluation.

* `polymodal caption MODEL IMAGES...`: caption image files or the images of a manifest; writes one
  JSON object per image, {"image": path, "caption": text}, to `--out` (JSONL) or stdout.
* `captioning_eval_manifest` (`polymodal eval MODEL --task captioning --data MANIFEST`): caption each
  distinct image of a manifest and score against its reference captions (BLEU-1..4, CIDEr-D).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .models.coca import GENERATION_METHODS

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


def caption_images(model, paths: list[str], method: str = "beam", max_len: int | None = None,
                   num_beams: int = 4, length_penalty: float = 0.0, top_p: float = 0.9,
                   temperature: float = 1.0, batch_size: int = 16, seed: int = 0, progress: bool = True):
    """Caption image files with `model` (a CoCa with `.tokenizer` and `.image_transform`).

    Yields:
        {"image": path, "caption": text} per image, in input order.
    """
    from .data.images import load_image
    if model.tokenizer is None:
        raise ValueError("caption: the model has no tokenizer (save it with one, or attach model.tokenizer)")
    if model.tokenizer.bos_id != model.bos_id or model.tokenizer.eos_id != model.eos_id:
        raise ValueError(f"caption: tokenizer start/end ids ({model.tokenizer.bos_id}, {model.tokenizer.eos_id}) "
                         f"differ from the model config's bos_token_id/text.eot_token_id "
                         f"({model.bos_id}, {model.eos_id})")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    from tqdm import tqdm
    bar = tqdm(total=len(paths), desc="caption", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pixels = torch.stack([model.image_transform(load_image(p)) for p in chunk]).to(device)
        ids = model.generate(pixels, method=method, max_len=max_len, num_beams=num_beams,
                             length_penalty=length_penalty, top_p=top_p, temperature=temperature,
                             generator=generator)
        for path, row in zip(chunk, ids.cpu()):
            yield {"image": str(path), "caption": model.tokenizer.decode(row)}
        bar.update(len(chunk))
    bar.close()


def caption_main(args: argparse.Namespace) -> list[dict]:
    """Run the `caption` command from parsed arguments; returns the records written."""
    from .hub import load_model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model).to(device).eval()
    if not hasattr(model, "generate"):
        raise ValueError(f"caption: {args.model} is a {type(model).__name__}, not a captioner (model_type 'coca')")
    paths = _image_paths(args.images)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    records = []
    try:
        for rec in caption_images(model, paths, args.method, args.max_len, args.num_beams, args.length_penalty,
                                  args.top_p, args.temperature, args.batch_size, args.seed):
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            records.append(rec)
    finally:
        if args.out:
            out.close()
    return records


def captioning_eval_manifest(model, manifest, limit: int = 0, method: str = "beam", num_beams: int = 3,
                             max_len: int | None = None, length_penalty: float = 0.0, batch_size: int = 32,
                             progress: bool = True, num_examples: int = 5) -> dict:
    """Caption the images of a manifest and score them against the references.

    Records naming the same image file are merged: all their captions are that image's references.

    Args:
        model: a CoCa with `.tokenizer` and `.image_transform`.
        manifest: JSONL/CSV manifest with `image` and `caption`/`captions`.
        limit: evaluate the first `limit` distinct images only (0 = all).
        method, num_beams, max_len, length_penalty: decoding (see `CoCa.generate`).
        num_examples: how many (image, caption, references) triples to include in the result.
    Returns:
        {"BLEU-1".."BLEU-4", "CIDEr-D", "num_images", "method", "examples": [...]}.
    """
    from .data.manifests import read_manifest
    from .eval.captioning import caption_metrics
    references: dict[str, list[str]] = {}
    for record in read_manifest(manifest):
        caps = record.get("captions") or [record["caption"]]
        references.setdefault(record["image"], []).extend([caps] if isinstance(caps, str) else caps)
    paths = list(references)[: limit or None]
    references = {p: references[p] for p in paths}
    model.eval()
    candidates = {r["image"]: r["caption"] for r in caption_images(
        model, paths, method=method, max_len=max_len, num_beams=num_beams, length_penalty=length_penalty,
        batch_size=batch_size, progress=progress)}
    metrics = caption_metrics(candidates, references)
    metrics.update(num_images=len(paths), method=method,
                   examples=[{"image": p, "caption": candidates[p], "references": references[p]}
                             for p in paths[:num_examples]])
    return metrics
