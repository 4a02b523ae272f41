"""What a file that is not our manifest probably is, and the command that reads it (used in error messages).

`sniff(path)` looks at the first bytes only: compressed and archive formats by their magic numbers, pickles,
parquet, JSON arrays and the well-known JSON layouts (Karpathy, COCO captions) by their first keys, and CSV / TSV
headers of the OpenCLIP and Chinese-CLIP layouts.
"""
from __future__ import annotations

import re
from pathlib import Path

HEAD = 65536


def sniff(path) -> str:
    """A one-sentence hint naming what `path` looks like and the `polymodal data import` (or key) that reads it;
    "" when it looks like nothing known."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD)
    except OSError:
        return ""
    name = Path(path).name
    if head[:2] == b"\x1f\x8b":
        return (f"{name} is gzip-compressed (HH-RLHF ships train.jsonl.gz): `polymodal data import hh-rlhf {name} "
                f"--out prefs.jsonl` reads it, or decompress it")
    if len(head) > 262 and head[257:262] == b"ustar":
        return (f"{name} is a tar archive: webdataset shards train with data.shards={name}; clip_benchmark's "
                f"classification tars import with `polymodal data import clip-benchmark-wds`")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return (f"{name} is a Python pickle (MSVD's raw-captions.pkl): `polymodal data import msvd ROOT` reads it "
                f"without running any code from it")
    if head[:4] == b"PAR1":
        return f"{name} is a parquet file: `polymodal data import parquet {name} --out MANIFEST` reads preference pairs"
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if text.startswith("["):
        return (f"{name} holds one JSON array, not one JSON object per line: LAVIS annotations import with "
                f"`polymodal data import lavis`, LLaVA conversations with `polymodal data import llava`")
    if text.startswith("{"):
        if '"images"' in text and '"sentences"' in text:
            return f"{name} looks like a Karpathy split file: `polymodal data import karpathy {name} --out MANIFEST`"
        if '"images"' in text and '"annotations"' in text:
            return (f"{name} looks like a COCO captions file: `polymodal data import coco-captions {name} "
                    f"--out MANIFEST`")
        return ""
    first = text.splitlines()[0] if text else ""
    if "\t" in first and re.match(r"^\S+\t[A-Za-z0-9+/]{80,}", first):
        return (f"{name} looks like Chinese-CLIP's base64 image TSV: `polymodal data import chinese-clip ROOT` "
                f"reads it with its texts.jsonl")
    if re.search(r"(^|[\t,])(filepath|title)([\t,]|$)", first):
        return (f"{name} has OpenCLIP's CSV columns: `polymodal data import csv {name} --out MANIFEST -o "
                f"image_key=filepath -o caption_key=title` groups the rows of each image")
    return ""


__all__ = ["sniff"]
