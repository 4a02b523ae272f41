"""Readers of the public dataset layouts: `polymodal data import FORMAT SRC --out MANIFEST [--split S]`.

One small module per layout, each a function `read(src, split, **options) -> Imported` (see `common.py`), listed in
the table `FORMATS` (format name -> "module:function", imported only when used). A reader takes the dataset's root
folder exactly as shipped (it finds its annotation files and media folders there) or, for single-file layouts, the
annotation file itself, and returns our records: media paths resolved, captions grouped per image / video, splits
kept. `import_dataset` writes them as a manifest (and a classes file where the layout has one).

Each reader's docstring names the public code its layout was read from; the tests build small fixtures in each
exact layout. No reader unpickles generally or executes anything from the data.
"""
from __future__ import annotations

import importlib

FORMATS: dict[str, str] = {
    "karpathy": "polymodal.data.importers.karpathy:read",
    "lavis": "polymodal.data.importers.lavis:read",
    "coco-captions": "polymodal.data.importers.coco_captions:read",
    "csv": "polymodal.data.importers.openclip_csv:read",
    "chinese-clip": "polymodal.data.importers.chinese_clip:read",
    "coco-cn": "polymodal.data.importers.coco_cn:read",
    "imagenet": "polymodal.data.importers.imagenet:read",
    "clip-benchmark-wds": "polymodal.data.importers.clip_benchmark_wds:read",
    "urban1k": "polymodal.data.importers.urban1k:read",
    "dci": "polymodal.data.importers.dci:read",
    "iiw": "polymodal.data.importers.iiw:read",
    "sharegpt4v": "polymodal.data.importers.sharegpt4v:read",
    "msrvtt": "polymodal.data.importers.msrvtt:read",
    "msvd": "polymodal.data.importers.msvd:read",
    "didemo": "polymodal.data.importers.didemo:read",
    "activitynet": "polymodal.data.importers.activitynet:read",
    "hh-rlhf": "polymodal.data.importers.hh_rlhf:read",
    "ultrafeedback": "polymodal.data.importers.ultrafeedback:read",
    "parquet": "polymodal.data.importers.parquet:read",
    "llava": "polymodal.data.importers.llava:read",
    "vqav2": "polymodal.data.importers.vqav2:read",
    "textvqa": "polymodal.data.importers.textvqa:read",
    "msrvtt-qa": "polymodal.data.importers.videoqa:read_msrvtt_qa",
    "msvd-qa": "polymodal.data.importers.videoqa:read_msvd_qa",
    "mmbench": "polymodal.data.importers.mmbench:read",
}


def reader(fmt: str):
    """The `read` function of format `fmt` (ValueError listing the formats when unknown)."""
    if fmt not in FORMATS:
        from ...config import did_you_mean
        raise ValueError(f"unknown dataset format {fmt!r}{did_you_mean(fmt, FORMATS)}; known: {', '.join(FORMATS)}")
    module, _, name = FORMATS[fmt].partition(":")
    return getattr(importlib.import_module(module), name)


def import_dataset(fmt: str, src, out, split: str | None = None, **options) -> dict:
    """Read `src` in layout `fmt` and write our manifest to `out` (see `common.write_imported`).

    Returns:
        A summary: format, source, out, split, counts and notes (what was grouped, dropped or guessed).
    """
    import inspect

    from .common import write_imported
    read = reader(fmt)
    params = inspect.signature(read).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):   # a reader with **options checks its own
        from .options import check_options
        check_options(fmt, options, tuple(n for n in params if n not in ("src", "split")))
    imported = read(src, split, **options)
    return write_imported(imported, out, fmt, src, split)


__all__ = ["FORMATS", "reader", "import_dataset"]
