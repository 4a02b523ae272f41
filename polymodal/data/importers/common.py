"""What every dataset reader shares: the result type, finding files in a shipped layout, resolving media, writing.

A reader returns an `Imported`: the records (our manifest's fields: `image` or `video` as absolute paths,
`captions` (a list, grouped per item), `split`, and per layout `caption_zh` / `captions_zh`, `long_caption`,
`label`, `prompt` / `chosen` / `rejected` ...), an optional classes dict (written as `classes.json` beside the
manifest), and notes that say what the reader decided (grouped rows, dropped items, guessed folders).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path


class LayoutError(ValueError):
    """A dataset layout that cannot be read: the message names the file (and line or key) and what to do."""


@dataclass
class Imported:
    """A reader's result.

    Attributes:
        records: manifest records (see the module docstring).
        kind: "image", "video", "classification", "preference", "mllm", "vqa", "videoqa" or "mcq" (what the records
            are).
        classes: a classes-file dict (`{"classes": [...], "classes_zh": [...]}`) or None.
        notes: one-line statements of what was grouped, dropped or guessed (printed and kept in the summary).
    """
    records: list
    kind: str = "image"
    classes: dict | None = None
    notes: list = field(default_factory=list)


def find_file(src: Path, names: list[str], what: str) -> Path:
    """`src` itself when it is a file, else the first of `names` (glob patterns) found under `src` (any depth).

    Raises:
        FileNotFoundError: naming `src`, what was looked for and what the layout is.
    """
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist (give the dataset's root folder or its {what})")
    for pattern in names:
        found = sorted(src.rglob(pattern))
        if found:
            return found[0]
    raise FileNotFoundError(f"{src}: no {what} found (looked for {', '.join(names)} in the folder and below)")


def read_json_file(path: Path):
    """JSON of `path`; an error names the file and the position."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def jsonl_objects(path: Path):
    """(line number, object) of each non-empty line of a `.jsonl` or `.jsonl.gz` file.

    Raises:
        LayoutError: a line that is not a JSON object or not UTF-8 (naming the file and line).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise LayoutError(f"{path} line {n}: not UTF-8 ({e.reason} at byte {e.start})") from None
                except json.JSONDecodeError as e:
                    raise LayoutError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise LayoutError(f"{path} line {n}: expected a JSON object, got {type(obj).__name__}")
                yield n, obj
    except (gzip.BadGzipFile, EOFError) as e:
        raise LayoutError(f"{path}: not a readable gzip file ({e})") from None


def media_roots(src, annotation: Path) -> list[Path]:
    """Where a layout's media folders may be: the root folder given, or for an annotation file given directly its
    folder and the folder above (annotations often sit in a subfolder of the dataset root)."""
    src = Path(src)
    return [src] if src.is_dir() else [annotation.parent, annotation.parent.parent]


def media_finder(roots, folders: list[str]):
    """`find(name) -> absolute path or None`: `name` under one of `roots`, or under one of `folders` of them."""
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    bases = [b for r in roots for b in [r] + [r / f for f in folders]]

    def find(name: str) -> str | None:
        for base in bases:
            p = base / name
            if p.is_file() or p.is_dir():
                return str(p.resolve())
        return None
    return find


def require_split(split: str | None, splits: set, src) -> None:
    """ValueError naming the splits a dataset has when `split` is not one of them."""
    if split is not None and split not in splits:
        raise LayoutError(f"{src}: no split {split!r}; it has {', '.join(sorted(splits)) or 'none'} (--split)")


def write_imported(imported: Imported, out, fmt: str, src, split: str | None) -> dict:
    """Write the records to `out` (JSONL/CSV by suffix), a classes file beside it, and return the summary."""
    from ..manifests import write_manifest
    if not imported.records:
        raise LayoutError(f"{src}: no records to import" + (f" in split {split!r}" if split else ""))
    out = Path(out)
    write_manifest(imported.records, out)
    summary = {"format": fmt, "source": str(src), "out": str(out), "split": split, "kind": imported.kind,
               "num_records": len(imported.records)}
    texts = sum(len(r.get("captions") or ([r["caption"]] if "caption" in r else [])) for r in imported.records)
    if texts:
        summary["num_texts"] = texts
    if imported.classes is not None:
        from ...fileio import atomic_open
        with atomic_open(out.parent / "classes.json", "w", encoding="utf-8") as f:
            json.dump(imported.classes, f, ensure_ascii=False, indent=1)
        summary["classes"] = str(out.parent / "classes.json")
        summary["num_classes"] = len(imported.classes["classes"])
    splits = sorted({str(r["split"]) for r in imported.records if "split" in r})
    if splits:
        summary["splits"] = splits
    summary["notes"] = list(imported.notes)
    return summary


__all__ = ["Imported", "LayoutError", "find_file", "read_json_file", "media_roots", "media_finder", "require_split",
           "write_imported"]
