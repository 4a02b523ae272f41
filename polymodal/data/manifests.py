"""Image-text manifests: JSONL or CSV files that list images and their captions.

A manifest record is one JSON object per line (JSONL) or one CSV row with a header:

- ``image``: path to the image file, relative to the manifest's folder or absolute.
- ``caption`` (string) or ``captions`` (list of strings): the short caption(s).
- optional ``long_caption`` (string), ``label`` (a class index or a class name), ``labels`` (list of
  indices or names), ``lang`` (e.g. ``"en"``, ``"zh"``).
- labels given by name are kept as strings, so readers that do not need labels (retrieval, contrastive
  training) take them as they are; ``read_manifest(..., classes=...)`` maps them to class indices through
  a classes file or list, and a name that is not a class is a bad record (reason ``unknown_label``)
  naming the label, the line and the classes file.
- any other field is kept as is and passed through to the record dict.

CSV specifics: the first row names the columns; an empty cell means "field absent";
``label`` is an integer when it reads as one, else a class name (a non-integer number such as ``2.5``
is a bad field); ``captions`` and ``labels`` are either a JSON array
(``["a cat", "a dog"]``) or a ``|``-separated string (``a cat|a dog``; use the JSON form when a
caption contains ``|``); items of ``labels`` that look like integers become ints. Other columns
stay strings. ``.tsv`` files are read the same way with a tab delimiter. Every other suffix is
read as JSONL.

A directory given as the manifest is read as an image folder (one subfolder per class, see
:mod:`polymodal.data.folders`): each image is a record with a templated caption and its folder's label.
A folder whose subfolders are not classes (WordNet ids, the split or media folders of a public layout, a single
subfolder) is refused with the `polymodal data import` command that reads it.

Video records carry ``video`` instead of ``image``: a video file or a folder of frame images,
resolved like image paths; text-only records carry neither. Which one a reader needs is its
``media`` argument (``"image"``, ``"video"`` or ``"none"``).

The file is read as bytes and decoded line by line, so a byte that is not UTF-8 makes only that
line a bad record (reason ``bad_encoding``). A manifest with no usable record is an error.

Bad records (malformed line, bad encoding, missing required key, empty caption, wrong field type,
missing image or video) either raise :class:`ManifestError` naming the file, line and reason
(``on_bad_record="error"``) or are skipped and counted by reason (``"skip"``); nothing is
dropped silently. Whether an image *decodes* is checked lazily by the datasets, not here.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..fileio import atomic_open

__all__ = ["ManifestError", "Manifest", "read_manifest", "write_manifest", "BAD_RECORD_POLICIES", "read_image_folder",
           "is_image_folder", "folder_class_name", "IMAGE_EXTENSIONS", "DEFAULT_CAPTION"]

BAD_RECORD_POLICIES = ("error", "skip")
MEDIA_KINDS = ("image", "video", "none")   # what a record must point to (see read_manifest's `media`)
MAX_EXAMPLES_PER_REASON = 3     # how many "file:line" examples a skipped reason keeps for the report
SKIP_HINT = "use data.on_bad_record=skip to skip and count such records"

# Reasons a record can be rejected for (the keys of Manifest.skipped).
MALFORMED = "malformed_line"
MISSING_KEY = "missing_key"
EMPTY_CAPTION = "empty_caption"
BAD_FIELD = "bad_field"
MISSING_IMAGE = "missing_image"
MISSING_VIDEO = "missing_video"
BAD_ENCODING = "bad_encoding"
UNKNOWN_LABEL = "unknown_label"


class ManifestError(ValueError):
    """A manifest (or a record or image it points to) cannot be used; the message names the place."""


class _BadRecord(Exception):
    """Internal: one record is bad for `reason`; `detail` says how."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SkipNotes:
    """What a reader skipped: `skipped` (Counter by reason) and `skipped_examples` (reason -> examples).

    A base of the readers' result dataclasses (they declare both fields), and usable alone: `SkipNotes(
    skipped, examples)` starts from copies of another reader's notes, which stay as they are.
    """

    def __init__(self, skipped=None, skipped_examples: dict | None = None):
        self.skipped = Counter(skipped or {})
        self.skipped_examples = {k: list(v) for k, v in (skipped_examples or {}).items()}

    def note_skip(self, reason: str, example: str) -> None:
        """Count one skipped item under `reason`, keeping the first few `"file:line: detail"` examples."""
        self.skipped[reason] += 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(example)

    def skip_report(self, what: str, source: str) -> str:
        """One line per skip reason with its count and examples; "" when nothing was skipped."""
        return "\n".join(f"skipped {n} {what} of {source}: {reason} (e.g. "
                         f"{'; '.join(self.skipped_examples.get(reason, []))})"
                         for reason, n in sorted(self.skipped.items()))


@dataclass
class Manifest(SkipNotes):
    """The good records of a manifest plus what was skipped.

    Attributes:
        path: the manifest file (absolute).
        records: one dict per good record; ``image`` is an absolute path, ``_line`` the 1-based
            line number in the file (where the record starts), other fields as read.
        skipped: count of skipped records by reason (empty under ``on_bad_record="error"``).
        skipped_examples: per reason, the first few ``"file:line: detail"`` strings.
    """

    path: str
    records: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)

    def captions_of(self, i: int, key: str = "caption") -> list[str]:
        """All captions of record `i` under `key` (``"caption"`` also gathers ``captions``)."""
        return captions_of_record(self.records[i], key)

    def where(self, i: int) -> str:
        """``"file:line"`` of record `i`, for error messages."""
        return f"{self.path}:{self.records[i].get('_line', '?')}"

    def report(self) -> str:
        """One line per skip reason with its count and examples; "" when nothing was skipped."""
        return self.skip_report("record(s)", self.path)

    def write(self, path: str | os.PathLike) -> None:
        """Write the records to `path` (see :func:`write_manifest`)."""
        write_manifest(self.records, path)


def captions_of_record(record: dict, key: str = "caption") -> list[str]:
    """The list of captions of a record.

    Args:
        record: a manifest record.
        key: ``"caption"`` returns ``captions`` if present, else ``[caption]``; any other key
            returns the field itself as a list (a string becomes a one-element list).

    Returns:
        list of strings (empty if the record has none).
    """
    if key == "caption" and "captions" in record:
        value = record["captions"]
    else:
        value = record.get(key)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_manifest(
    path: str | os.PathLike,
    on_bad_record: str = "error",
    check_images: bool = True,
    required: Sequence[str] | None = None,
    media: str = "image",
    allow_empty: bool = False,
    classes=None,
) -> Manifest:
    """Read a JSONL or CSV manifest.

    Args:
        path: the manifest file (``.csv``/``.tsv`` read as CSV/TSV, anything else as JSONL), or an image
            folder with one subfolder per class (``media="image"``; see `polymodal.data.folders`).
        on_bad_record: ``"error"`` raises :class:`ManifestError` at the first bad record;
            ``"skip"`` drops bad records and counts them in ``Manifest.skipped``.
        check_images: check that each image file (or video file / frame folder) exists; decoding is
            checked later, lazily.
        required: keys every record must have; ``"caption"`` is satisfied by ``captions`` too.
            Default: the media key and ``"caption"`` (just ``"caption"`` for ``media="none"``).
        media: what the records point to: ``"image"`` (an ``image`` file), ``"video"`` (a ``video``
            file or frame folder) or ``"none"`` (text only). ``image`` and ``video`` fields are resolved
            and checked whenever present.
        allow_empty: accept a manifest with no usable record (default: :class:`ManifestError`).
        classes: map ``label`` / ``labels`` given by name to class indices: a list of names or a classes
            file (see :func:`polymodal.data.labels.class_names`). An unknown name or an index outside the
            classes is a bad record (``unknown_label``). Default: labels are kept as written.

    Returns:
        a :class:`Manifest` with image and video paths resolved to absolute paths.

    Raises:
        FileNotFoundError: the manifest file does not exist.
        ManifestError: a bad record under ``on_bad_record="error"``; no usable record at all.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    if media not in MEDIA_KINDS:
        raise ValueError(f"media must be one of {MEDIA_KINDS}, got {media!r}")
    if required is None:
        required = ("caption",) if media == "none" else (media, "caption")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and media == "image":     # an image folder, one subfolder per class
        return _folder_manifest(path, classes)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest file not found: {path}")
    root = os.path.dirname(path)
    manifest = Manifest(path=path)
    label_map = None
    if classes is not None:
        from .labels import class_names
        names, source = class_names(classes)
        label_map = ({n: i for i, n in enumerate(names)}, source)
    suffix = os.path.splitext(path)[1].lower()
    rows = _csv_rows(path, "\t" if suffix == ".tsv" else ",") if suffix in (".csv", ".tsv") else _jsonl_rows(path)
    for line, raw in rows:
        try:
            if isinstance(raw, _BadRecord):
                raise raw
            record = _validate(raw, root, required, check_images)
            if label_map is not None:
                record = _map_labels(record, *label_map)
        except _BadRecord as bad:
            if on_bad_record == "error":
                hint = _layout_hint(path) if not manifest.records else ""
                raise ManifestError(f"{path} line {line}: {bad.detail} [{bad.reason}]; " +
                                    (hint if hint else SKIP_HINT)) from None
            manifest.note_skip(bad.reason, f"{path}:{line}: {bad.detail}")
            continue
        record["_line"] = line
        manifest.records.append(record)
    if not manifest.records and not allow_empty:
        why = f" ({manifest.report()})" if manifest.skipped else " (the file has no record)"
        hint = _layout_hint(path)
        raise ManifestError(f"{path}: no usable record{why}; " +
                            (hint if hint else "fix the manifest or point data.train at another one"))
    return manifest


def _layout_hint(path: str) -> str:
    """What the file probably is and the command that reads it (see `polymodal.data.sniff`), or ""."""
    from .sniff import sniff
    return sniff(path)


# ---- image folders: one subfolder per class ----------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_CAPTION = "a photo of a {}."


def folder_class_name(folder: str) -> str:
    """The class name of a subfolder: underscores read as spaces (``red_car`` -> ``red car``)."""
    return " ".join(folder.replace("_", " ").split())


def _class_folders(root: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    """{subfolder name: its image files (recursively, sorted)} for the non-hidden subfolders holding images."""
    exts = {e.lower() for e in extensions}
    out = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in exts
                       and not any(part.startswith(".") for part in f.relative_to(sub).parts))
        if files:
            out[sub.name] = files
    return out


def is_image_folder(path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    """True for a directory with at least one subfolder that holds image files."""
    path = Path(path)
    return path.is_dir() and bool(_class_folders(path, extensions))


def read_image_folder(root, caption_template: str = DEFAULT_CAPTION, classes=None,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[dict], list[str]]:
    """Records and class names of an image folder (one subfolder per class).

    Args:
        root: the folder.
        caption_template: the caption of each image, with ``{}`` for the class name (for training and
            retrieval; zero-shot evaluation uses its own prompts).
        classes: optional class list (names, or a classes file for `polymodal.data.labels.class_names`) that
            fixes the order of the indices; every subfolder must be one of them (classes without a folder
            are allowed: they get no images).
        extensions: file endings counted as images (case-insensitive).
    Returns:
        (records, class names). Records are ``{"image": absolute path, "caption": ..., "label": index,
        "class": name, "_line": n}`` (n counts images from 1, for messages), sorted by class then file.
    Raises:
        FileNotFoundError: `root` is not a directory.
        ManifestError: no subfolder holds images, or a subfolder is not in `classes` (naming both).
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if caption_template.count("{}") != 1:
        raise ValueError(f"caption_template {caption_template!r} needs exactly one '{{}}' for the class name")
    folders = _class_folders(root, extensions)
    if not folders:
        raise ManifestError(f"{root}: no subfolder holds images ({', '.join(extensions)}); an image folder has one "
                            f"subfolder per class (e.g. {root}/cat/001.jpg), or give a manifest file")
    if classes is None:
        _refuse_non_class_folders(root, list(folders))
    found = {folder_class_name(f): f for f in folders}
    if len(found) < len(folders):
        raise ManifestError(f"{root}: two subfolders give the same class name once '_' is read as a space; "
                            f"rename one")
    if classes is None:
        names = sorted(found)
    else:
        from .labels import class_names
        names, source = class_names(classes)
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise ManifestError(f"{root}/{found[unknown[0]]}: class {unknown[0]!r} is not in {source}; add it "
                                f"there or move the folder out")
    records = []
    for label, name in enumerate(names):
        for f in folders.get(found.get(name, ""), []):
            records.append({"image": str(f), "caption": caption_template.format(name), "label": label,
                            "class": name, "_line": len(records) + 1})
    return records, names


# Subfolder names that are a layout's splits or media folders, not classes (lower case).
SPLIT_LIKE_FOLDERS = {"image", "images", "photos", "train2014", "val2014", "test2014", "train2017", "val2017",
                      "train", "val", "valid", "test", "flickr30k-images", "flickr30k_images"}
_WNID = re.compile(r"^n\d{8}$")


def _refuse_non_class_folders(root: Path, names: list[str]) -> None:
    """ManifestError (one line, naming the `polymodal data import` command that fits) when the subfolders holding
    images are not classes: WordNet ids, split or media folders of a public layout, or a single subfolder.
    (Any class list given to `read_image_folder` says the folders are classes and skips this.)"""
    entries = {p.name.lower() for p in root.iterdir()}
    lower = {n.lower() for n in names}
    listed = ", ".join(f"{n}/" for n in sorted(names))
    fix = None
    if all(_WNID.match(n) for n in names):
        fix = ("the subfolders are WordNet ids (ImageNet synsets), not class names", "imagenet")
    elif lower <= SPLIT_LIKE_FOLDERS or len(names) == 1:
        if lower == {"image"} and "caption" in entries:
            fix = ("image/ beside caption/ is Urban-1k's layout", "urban1k")
        elif lower == {"photos"} and {"annotations", "complete", "splits.json"} & entries:
            fix = ("photos/ beside annotations/ is DCI's layout", "dci")
        elif "loc_synset_mapping.txt" in entries or \
                any(p.is_dir() and _WNID.match(p.name) for n in names for p in (root / n).iterdir()):
            fix = (f"{listed} hold WordNet-id class folders: ImageNet splits", "imagenet")
        elif lower & {"train2014", "val2014", "flickr30k-images", "flickr30k_images"} or \
                ("images" in lower and any(root.glob("dataset_*.json"))):
            fix = (f"{listed} are the image folders of a caption set", "karpathy")
        elif lower <= SPLIT_LIKE_FOLDERS:
            fix = (f"{listed} are split or media folders", None)
        else:
            fix = (f"only {listed} holds images, and one class is not a classification set", None)
    if fix is None:
        return
    why, fmt = fix
    todo = (f"import it with `polymodal data import {fmt} {root} --out MANIFEST`" if fmt else
            "give the folder whose subfolders are the classes, a manifest, or a class list that names them")
    raise ManifestError(f"{root}: not an image folder of classes ({why}); {todo}")


def _folder_manifest(path: str, classes) -> Manifest:
    """A Manifest of an image folder's records (see :func:`read_image_folder`)."""
    records, _ = read_image_folder(path, classes=classes)
    return Manifest(path=path, records=records)


def _encoding_error(raw: bytes, e: UnicodeDecodeError) -> _BadRecord:
    """The bad-record for a line whose bytes are not UTF-8 (the column counts characters, from 1)."""
    column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
    return _BadRecord(BAD_ENCODING, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                                    f"re-save the file as UTF-8")


def _decoded_lines(path: str) -> Iterator[tuple[int, bytes, str | None, UnicodeDecodeError | None]]:
    """(line number, raw bytes, text or None, decode error or None) for each line of `path`.

    Lines are split at b"\n" and decoded one by one; a UTF-8 byte-order mark on the first line is dropped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield line_no, raw, None, e


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object or _BadRecord) for each non-empty line."""
    for line_no, raw, text, error in _decoded_lines(path):
        if error is not None:
            yield line_no, _encoding_error(raw, error)
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield line_no, _BadRecord(MALFORMED, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield line_no, _BadRecord(MALFORMED, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield line_no, obj


def _csv_rows(path: str, delimiter: str) -> Iterator[tuple[int, Any]]:
    """Yield (line number where the row starts, dict or _BadRecord) for each non-empty CSV row.

    Lines with bytes that are not UTF-8 are decoded with ``surrogateescape`` so that the CSV structure
    (quotes spanning lines) stays intact; a row containing such a line is a ``bad_encoding`` record."""
    errors: dict[int, _BadRecord] = {}        # line number -> its encoding error

    def lines() -> Iterator[str]:
        for line_no, raw, text, error in _decoded_lines(path):
            if error is not None:
                errors[line_no] = _encoding_error(raw, error)
                text = raw.decode("utf-8", errors="surrogateescape")
            yield text

    reader = csv.reader(lines(), delimiter=delimiter)
    header = None
    prev_end = 0                          # reader.line_num after the previous row
    for row in reader:
        start, prev_end = prev_end + 1, reader.line_num
        bad_lines = [n for n in range(start, prev_end + 1) if n in errors]
        if bad_lines:                         # reported at the first line with a bad byte
            bad = errors[bad_lines[0]]
            if header is None:                # without the column names no row can be read
                raise ManifestError(f"{path} line {bad_lines[0]} (the header): {bad.detail}")
            yield bad_lines[0], bad
            continue
        if not row or all(not c.strip() for c in row):
            continue
        if header is None:
            header = [c.strip() for c in row]
            continue
        if len(row) != len(header):
            yield start, _BadRecord(MALFORMED, f"{len(row)} fields where the header has {len(header)}")
            continue
        try:
            yield start, _parse_csv_row(dict(zip(header, row)))
        except _BadRecord as bad:
            yield start, bad


def _parse_csv_row(row: dict[str, str]) -> dict:
    """Turn CSV strings into the same types as JSONL (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if value == "":
            continue                          # empty cell = absent field
        if key == "label":
            out[key] = _maybe_int(value)
            if isinstance(out[key], str) and _is_number(out[key]):
                raise _BadRecord(BAD_FIELD, f"'label' must be an integer or a class name, got {value!r}")
        elif key in ("captions", "labels"):
            out[key] = _parse_list_cell(key, value)
            if key == "labels":
                out[key] = [_maybe_int(v) for v in out[key]]
        else:
            out[key] = value
    return out


def _parse_list_cell(key: str, value: str) -> list:
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadRecord(MALFORMED, f"'{key}' is not a valid JSON array ({e.msg})") from None
        if not isinstance(items, list):
            raise _BadRecord(BAD_FIELD, f"'{key}' must be a JSON array")
        return items
    return [v.strip() for v in value.split("|")]


def _maybe_int(v: Any) -> Any:
    if isinstance(v, str):
        s = v.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        return s
    return v


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _map_labels(record: dict, index: dict, source: str) -> dict:
    """`label` / `labels` as class indices (raises _BadRecord for a name that is not a class)."""
    from .labels import LabelError, resolve_label
    try:
        if "label" in record:
            record = {**record, "label": resolve_label(record["label"], index, source)}
        if "labels" in record:
            record = {**record, "labels": [resolve_label(v, index, source) for v in record["labels"]]}
    except LabelError as err:
        raise _BadRecord(UNKNOWN_LABEL, str(err)) from None
    return record


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _validate(record: dict, root: str, required: Sequence[str], check_images: bool) -> dict:
    """Check one record's keys and types; resolve its image path. Raises _BadRecord."""
    for key in required:
        present = ("caption" in record or "captions" in record) if key == "caption" else key in record
        if not present:
            wanted = "'caption' or 'captions'" if key == "caption" else repr(key)
            raise _BadRecord(MISSING_KEY, f"missing key {wanted}")
    if "caption" in record:
        if not isinstance(record["caption"], str):
            raise _BadRecord(BAD_FIELD, f"'caption' must be a string, got {type(record['caption']).__name__}")
        if not record["caption"].strip():
            raise _BadRecord(EMPTY_CAPTION, "empty 'caption'")
    if "captions" in record:
        caps = record["captions"]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise _BadRecord(BAD_FIELD, "'captions' must be a list of strings")
        if not caps or any(not c.strip() for c in caps):
            raise _BadRecord(EMPTY_CAPTION, "empty 'captions' list or an empty caption in it")
    if "long_caption" in record and not isinstance(record["long_caption"], str):
        raise _BadRecord(BAD_FIELD, "'long_caption' must be a string")
    if "label" in record:
        label = record["label"]
        if not (_is_int(label) or (isinstance(label, str) and label.strip())):
            raise _BadRecord(BAD_FIELD, f"'label' must be an integer or a class name, got {label!r}")
    if "labels" in record:
        labels = record["labels"]
        if not isinstance(labels, list) or not all(_is_int(v) or isinstance(v, str) for v in labels):
            raise _BadRecord(BAD_FIELD, "'labels' must be a list of integers or strings")
    if "image" in record:
        image = record["image"]
        if not isinstance(image, str) or not image.strip():
            raise _BadRecord(BAD_FIELD, f"'image' must be a non-empty path string, got {image!r}")
        resolved = os.path.normpath(os.path.join(root, os.path.expanduser(image)))
        if check_images and not os.path.isfile(resolved):
            if os.path.exists(resolved):
                raise _BadRecord(BAD_FIELD, f"image '{image}' is not a regular file (a FIFO, device or folder: "
                                            f"{resolved}); list image files only")
            raise _BadRecord(MISSING_IMAGE, f"image '{image}' not found (looked for {resolved})")
        record = {**record, "image": resolved}
    if "video" in record:
        video = record["video"]
        if not isinstance(video, str) or not video.strip():
            raise _BadRecord(BAD_FIELD, f"'video' must be a non-empty path string, got {video!r}")
        resolved = os.path.normpath(os.path.join(root, os.path.expanduser(video)))
        if check_images and not (os.path.isfile(resolved) or os.path.isdir(resolved)):   # a file or frame folder
            raise _BadRecord(MISSING_VIDEO, f"video '{video}' not found (looked for {resolved})")
        record = {**record, "video": resolved}
    return record


def write_manifest(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write records as a manifest, atomically (temporary file + rename).

    Image paths are written relative to the new manifest's folder (absolute if that is
    impossible, e.g. another drive); relative input paths are taken relative to the current
    directory. Keys starting with ``_`` (such as ``_line``) are internal and not written.

    Args:
        records: record dicts as in :attr:`Manifest.records`.
        path: destination; ``.csv``/``.tsv`` writes CSV/TSV (lists as JSON arrays), else JSONL.
    """
    path = os.path.abspath(os.fspath(path))
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    rows = []
    for record in records:
        row = {k: v for k, v in record.items() if not k.startswith("_")}
        for key in ("image", "video"):
            if key in row:
                media_path = os.path.abspath(row[key])
                try:
                    row[key] = os.path.relpath(media_path, root)
                except ValueError:
                    row[key] = media_path
        rows.append(row)
    suffix = os.path.splitext(path)[1].lower()
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        if suffix in (".csv", ".tsv"):
            _write_csv(rows, f, "\t" if suffix == ".tsv" else ",")
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_csv(rows: list[dict], f, delimiter: str) -> None:
    header: list[str] = []
    for row in rows:
        header.extend(k for k in row if k not in header)
    writer = csv.writer(f, delimiter=delimiter)
    writer.writerow(header)
    for row in rows:
        cells = []
        for key in header:
            value = row.get(key)
            if value is None:
                cells.append("")
            elif isinstance(value, (list, dict)):
                cells.append(json.dumps(value, ensure_ascii=False))
            else:
                cells.append(str(value))
        writer.writerow(cells)


def all_captions(records: Iterable[dict], key: str = "caption") -> list[str]:
    """Every caption of `key` and of its plural list (`caption` -> `captions`) in the records, in order
    (e.g. the texts a parser or a word counter must see once before training)."""
    plural = key.replace("caption", "captions", 1)
    out = []
    for r in records:
        for k in (key, plural):
            v = r.get(k)
            out.extend([v] if isinstance(v, str) else [c for c in (v or []) if isinstance(c, str)])
    return out
