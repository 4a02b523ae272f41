"""WebDataset-style tar shards: the one shard writer and readers, and image shards from a manifest.

:class:`ShardWriter` writes every kind of shard (image shards here, frame shards in
:mod:`polymodal.data.frame_shards`); :func:`read_tar` streams a shard's samples, :func:`index_tar` /
:func:`read_indexed` read them on demand, :func:`resolve_shards` turns a folder or pattern into shard paths.

Layout of a shard directory::

    shard-000000.tar  shard-000001.tar ...  shards.json

Each sample in a shard is two tar members sharing a key (the record's index in the manifest,
zero-padded to 9 digits): ``{key}.{ext}`` holds the original bytes of the image file as-is
(``ext`` is the file's suffix, ``jpeg`` written as ``jpg``) and ``{key}.json`` the record without
its ``image`` path (``_line`` is kept, so errors can name the manifest line). This is the
WebDataset convention (key = member name up to the first dot), so the shards also open with
the ``webdataset`` package. We read and write them with the standard ``tarfile`` module:
fewer moving parts, exact control of which (rank, worker) reads which sample, and
deterministic bytes (mtime 0, uid 0) so rewriting the same manifest gives identical shards.
``shards.json`` lists shard names and sample counts.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import tarfile
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from polymodal.data.datasets import UNREADABLE_IMAGE, BadRecords, BuiltSamples, SampleBuilder, SampleError
from polymodal.data.manifests import read_manifest

__all__ = ["ShardWriter", "write_shards", "resolve_shards", "read_tar", "index_tar", "read_indexed", "ShardDataset",
           "shard_main", "INDEX_NAME", "SHARD_PATTERN"]

INDEX_NAME = "shards.json"
SHARD_PATTERN = "shard-%06d.tar"
INCOMPLETE_SAMPLE = "incomplete_sample"
UNREADABLE_SHARD = "unreadable_shard"
_TAR_BLOCK = 512


def _image_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = {"jpeg": "jpg"}.get(ext, ext)
    return ext if ext and "." not in ext else "img"


def _member_size(nbytes: int) -> int:
    """Bytes a member takes in a tar: one header block plus the data rounded up to blocks."""
    return _TAR_BLOCK + -(-nbytes // _TAR_BLOCK) * _TAR_BLOCK


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes tar shards ``shard-%06d.tar`` and their ``shards.json`` index; the one writer of image and frame shards.

    A sample is a list of tar members sharing a key. A shard is closed when it holds `max_count` samples or
    when the next sample would push it past `max_size` bytes (a single larger sample still gets its own
    shard). Each shard is written under a temporary name and renamed, members carry mtime 0 and uid 0 (the
    same samples give the same bytes), and the index is written atomically last. Use it as a context
    manager: an exception deletes the shard being written and leaves earlier files as they were.

    Args:
        out_dir: the shard directory (created if needed).
        max_count: samples per shard at most.
        max_size: bytes of tar members per shard at most (headers and block padding included; the file
            can be up to 10 KiB larger: tar pads its end to a 10 KiB record).
        overwrite: replace shards already in `out_dir` (otherwise FileExistsError).
    """

    def __init__(self, out_dir: str | os.PathLike, max_count: int = 1000, max_size: int = 1 << 30,
                 overwrite: bool = False):
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        os.makedirs(self.out_dir, exist_ok=True)
        self.old = sorted(glob.glob(os.path.join(self.out_dir, "shard-*.tar")))
        if (self.old or os.path.exists(os.path.join(self.out_dir, INDEX_NAME))) and not overwrite:
            raise FileExistsError(f"{self.out_dir} already holds shards; pass overwrite=True (--overwrite) to "
                                  f"replace them")
        self.max_count, self.max_size = max_count, max_size
        self.written: list[str] = []
        self.counts: list[int] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp, self._count, self._size = "", 0, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()

    def add(self, members: Sequence[tuple[str, bytes]]) -> None:
        """Append one sample: its (member name, bytes), names ``{key}.{extension}``."""
        size = sum(_member_size(len(data)) for _, data in members)
        if self._tar is not None and (self._count >= self.max_count or self._size + size > self.max_size):
            self._close_shard()
        if self._tar is None:
            self._tmp = os.path.join(self.out_dir, "." + SHARD_PATTERN % len(self.written) + ".tmp")
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        for name, data in members:
            _add_member(self._tar, name, data)
        self._count += 1
        self._size += size

    def finish(self, manifest: str, **fields: Any) -> dict:
        """Close the last shard, delete stale shards of an earlier, longer run and write ``shards.json``.

        Args:
            manifest: the source manifest's path, recorded in the index.
            **fields: more index entries (``skipped``, ``skipped_examples``, ``frames`` ...).

        Returns:
            the index written: ``manifest``, ``num_samples``, ``shards`` ([{name, count}]) and `fields`.
        """
        from polymodal.fileio import atomic_open

        self._close_shard()
        for path in self.old:
            if path not in self.written:
                os.unlink(path)
        index = {"manifest": manifest, "num_samples": sum(self.counts),
                 "shards": [{"name": os.path.basename(p), "count": c} for p, c in zip(self.written, self.counts)],
                 **fields}
        with atomic_open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, ensure_ascii=False)
        return index

    def abort(self) -> None:
        """Drop the shard being written (closed shards stay)."""
        if self._tar is not None:
            self._tar.close()
            os.unlink(self._tmp)
            self._tar = None

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = os.path.join(self.out_dir, SHARD_PATTERN % len(self.written))
        os.replace(self._tmp, final)
        self.written.append(final)
        self.counts.append(self._count)
        self._tar, self._tmp, self._count, self._size = None, "", 0, 0


def write_shards(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_count: int = 1000,
    max_size: int = 1 << 30,
    on_bad_record: str = "error",
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Write a manifest's image samples into tar shards plus a ``shards.json`` index (see :class:`ShardWriter`).

    Args:
        manifest_path: the JSONL/CSV manifest.
        out_dir: the shard directory (created if needed).
        max_count: samples per shard at most.
        max_size: bytes of tar members per shard at most (see :class:`ShardWriter`).
        on_bad_record: policy for bad manifest records (see ``read_manifest``); skipped counts
            are recorded in the index.
        overwrite: replace existing shards in `out_dir` (otherwise FileExistsError).
        progress: show a tqdm progress bar.

    Returns:
        the paths of the shards written, in order.
    """
    from tqdm import tqdm

    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    manifest = read_manifest(manifest_path, on_bad_record=on_bad_record)
    with ShardWriter(out_dir, max_count, max_size, overwrite) as writer:
        for i, record in enumerate(tqdm(manifest.records, desc="shards", unit="sample", disable=not progress)):
            key = f"{i:09d}"
            with open(record["image"], "rb") as f:
                image_bytes = f.read()
            meta = json.dumps({k: v for k, v in record.items() if k != "image"}, ensure_ascii=False).encode()
            writer.add([(f"{key}.{_image_ext(record['image'])}", image_bytes), (f"{key}.json", meta)])
        writer.finish(manifest.path, skipped=dict(manifest.skipped), skipped_examples=manifest.skipped_examples)
    return writer.written


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..012}`` numeric ranges (WebDataset style), zero-padded like the first bound."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
    out = []
    for n in range(lo, hi + 1):
        out.extend(_expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():]))
    return out


def resolve_shards(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], dict[str, int] | None]:
    """Shard paths (and per-shard counts when an index exists) from a directory, pattern or list.

    Args:
        source: a shard directory (uses ``shards.json`` if present, else ``shard-*.tar``),
            a glob pattern, a brace range (``shard-{000000..000009}.tar``), one file, or a list.

    Returns:
        (paths, counts by path or None).
    """
    counts = None
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
    else:
        source = os.fspath(source)
        if os.path.isdir(source):
            index_path = os.path.join(source, INDEX_NAME)
            if os.path.isfile(index_path):
                with open(index_path, encoding="utf-8") as f:
                    index = json.load(f)
                paths = [os.path.join(source, s["name"]) for s in index["shards"]]
                counts = {p: s["count"] for p, s in zip(paths, index["shards"])}
            else:                                    # ours (shard-*.tar), or img2dataset's / webdataset's (*.tar)
                paths = sorted(glob.glob(os.path.join(source, "shard-*.tar"))) or \
                    sorted(glob.glob(os.path.join(source, "*.tar")))
            if not paths:
                raise FileNotFoundError(f"no shards in {source} (expected {INDEX_NAME}, shard-*.tar or *.tar)")
        elif "{" in source:
            paths = _expand_braces(source)
        elif any(c in source for c in "*?["):
            paths = sorted(glob.glob(source))
            if not paths:
                raise FileNotFoundError(f"no shard matches {source}")
        else:
            paths = [source]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shard not found: {p}")
    return paths, counts


def _grouped_members(tar: tarfile.TarFile, value) -> Iterator[tuple[str, dict]]:
    """Yield (key, {extension: value(member)}) per sample of an open tar; members of a sample are consecutive."""
    key, files = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, base = os.path.split(member.name)
        stem, _, ext = base.partition(".")
        member_key = f"{folder}/{stem}" if folder else stem
        item = value(member)
        if member_key != key:
            if files:
                yield key, files
            key, files = member_key, {}
        files[ext] = item
    if files:
        yield key, files


def read_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the samples of a tar shard (one pass, no seeking; compressed tars work too).

    Args:
        path: the shard file.

    Returns:
        an iterator of (key, {extension: bytes}) per sample; members of a sample are consecutive.
    """
    with tarfile.open(path, "r|*") as tar:            # streaming: one pass, no seeking
        yield from _grouped_members(tar, lambda m: tar.extractfile(m).read())


def index_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {extension: (byte offset, size)}) per sample of an uncompressed tar, for reading on demand.

    Only the member headers are read (one pass); `read_indexed` fetches a sample's bytes later, so a
    dataset over many shards holds offsets, not frames, in memory.

    Raises:
        ValueError: the tar is compressed (no random access), naming the file.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
        raise ValueError(f"{path}: a compressed tar cannot be read on demand; write uncompressed shards "
                         f"(`polymodal data frames` does) or decompress it")
    with tarfile.open(path, "r:") as tar:
        return list(_grouped_members(tar, lambda m: (m.offset_data, m.size)))


def count_samples(paths: Sequence[str]) -> dict[str, int]:
    """Samples per shard, from the member headers (one pass each; shards without a `shards.json` index).

    Args:
        paths: tar shards (compressed ones are read through, uncompressed ones by headers only).
    Returns:
        {path: number of samples}.
    """
    counts = {}
    for path in paths:
        with tarfile.open(path, "r:*") as tar:
            counts[path] = sum(1 for _ in _grouped_members(tar, lambda m: None))
    return counts


def read_indexed(path: str, members: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    """The bytes of one sample's members from `index_tar`'s offsets: {extension: bytes}."""
    out = {}
    with open(path, "rb") as f:
        for ext, (offset, size) in members.items():
            f.seek(offset)
            out[ext] = f.read(size)
            if len(out[ext]) != size:
                raise ValueError(f"{path}: member .{ext} at byte {offset} is cut short (the shard changed or is "
                                 f"truncated)")
    return out


def _decode_image(data: bytes) -> Any:
    """Bytes -> upright PIL RGB image, converted like ``images.load_image`` (alpha over white,
    16-bit scaled) so shards and manifests give the same pixels; raises on a broken file."""
    from PIL import Image, ImageOps

    from polymodal.data.images import to_rgb  # lazy: keeps this module light to import

    with Image.open(io.BytesIO(data)) as im:
        im.load()                                     # decode now: truncation only fails here
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block: the pixels are still fine, keep them as stored
            pass
        return to_rgb(im)


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle a stream with a buffer of `size` items (WebDataset-style); deterministic given rng."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(BuiltSamples, IterableDataset):
    """Iterate over tar shards, yielding the same sample dicts as ``ManifestDataset``.

    Splitting: the shard list (shuffled per epoch with (seed, epoch), the same order on every
    rank) is dealt out over ``world_size * num_workers`` splits, split ``rank * num_workers +
    worker``. With fewer shards than splits it warns and falls back to per-sample splitting:
    every split reads all shards and keeps every ``num_splits``-th sample. Either way the
    splits are disjoint and together cover the data once per epoch. With whole shards per
    split, ranks can see different numbers of samples; a DDP trainer should bound the steps
    per epoch (the index's ``num_samples`` / world size / batch size, rounded down).

    Shuffling: shard order plus a buffer of `shuffle_buffer` samples seeded by (seed, epoch,
    split). ``index`` of a sample is its record index in the source manifest (the key).

    Args:
        source: shard directory, pattern or list (see :func:`resolve_shards`).
        builder: the :class:`SampleBuilder` (media "image") that turns records into samples.
        on_bad_record: "error" or "skip", as in ``ManifestDataset``.
        seed: seed of the shard order and the shuffle buffer (the builder has its own for captions).
        shuffle: shuffle shard order and samples each epoch.
        shuffle_buffer: samples held in the shuffle buffer (0 or 1: no sample shuffle).
        rank, world_size: this process's place in the distributed job.
        image_decoder: callable bytes -> PIL RGB image (default: Pillow with EXIF rotation).
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str],
        builder: SampleBuilder,
        on_bad_record: str = "error",
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        image_decoder: Callable[[bytes], Any] | None = None,
    ):
        if builder.media != "image":
            raise ValueError(f"ShardDataset reads image shards; the builder's media is {builder.media!r} "
                             f"(write video clips with `polymodal data frames`)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.bad = BadRecords(on_bad_record)
        self.shards, counts = resolve_shards(source)
        self.num_samples = sum(counts.values()) if counts is not None else None
        self.builder = builder
        self.on_bad_record = on_bad_record
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.image_decoder = image_decoder or _decode_image
        self.epoch = 0

    def _split(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _raw(self, shards: list[str], split: int, num_splits: int, per_sample: bool) -> Iterator[tuple]:
        """Yield (shard, key, files) of this split, or a bad marker for an unreadable shard."""
        position = 0
        for shard in shards:
            try:
                for key, files in read_tar(shard):
                    if not per_sample or position % num_splits == split:
                        yield shard, key, files
                    position += 1
            except (tarfile.TarError, OSError, EOFError) as e:
                if not per_sample or split == 0:     # report a broken shard once, not once per split
                    yield shard, None, e

    def __iter__(self) -> Iterator[dict]:
        split, num_splits = self._split()
        order = list(self.shards)
        if self.shuffle:
            np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch]).shuffle(order)
        per_sample = len(order) < num_splits
        if per_sample:
            warnings.warn(f"{len(order)} shards for {num_splits} (rank x worker) splits: every split reads "
                          f"all shards and keeps every {num_splits}-th sample; write more shards for speed")
        mine = order if per_sample else order[split::num_splits]
        stream = self._raw(mine, split, num_splits, per_sample)
        if self.shuffle and self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch, split, 2])
            stream = _buffer_shuffle(stream, self.shuffle_buffer, rng)
        for shard, key, files in stream:
            yield self._sample(shard, key, files)

    def _sample(self, shard: str, key: str | None, files: Any) -> dict:
        if key is None:                               # the shard itself could not be read
            message = f"shard {shard} cannot be read ({type(files).__name__}: {files})"
            return self.bad(-1, UNREADABLE_SHARD, message, files)
        index = int(os.path.basename(key)) if os.path.basename(key).isdigit() else -1
        where = f"shard {shard} key {key}"
        image_ext = next((ext for ext in files if ext not in ("json", "txt", "cls")), None)
        if image_ext is None or not ({"json", "txt", "cls"} & set(files)):
            message = f"{where}: needs an image and a .json, .txt or .cls member, has {sorted(files)}"
            return self.bad(index, INCOMPLETE_SAMPLE, message, None)
        try:
            record = json.loads(files["json"]) if "json" in files else {}
            # img2dataset keeps the caption in `<key>.txt` (its .json is metadata); clip_benchmark's webdataset
            # sets keep a class index in `<key>.cls`.
            if "txt" in files and "caption" not in record and "captions" not in record:
                record["caption"] = files["txt"].decode("utf-8").strip()
            if "cls" in files and "label" not in record:
                record["label"] = int(files["cls"].decode("utf-8").strip())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self.bad(index, "malformed_line", f"{where}: .json / .txt member is not valid UTF-8 JSON / text "
                                                     f"({e})", e)
        except ValueError as e:
            return self.bad(index, "malformed_line", f"{where}: .cls member is not an integer class index ({e})", e)
        if "_line" in record:
            where += f" (manifest line {record['_line']})"
        try:
            image = self.image_decoder(files[image_ext])
        except Exception as e:  # decoders raise many types (OSError, SyntaxError, ValueError ...)
            return self.bad(index, UNREADABLE_IMAGE,
                             f"{where}: image '{key}.{image_ext}' cannot be read ({type(e).__name__}: {e})", e)
        try:
            return self.builder.build(record, index, self.epoch, image)
        except SampleError as e:
            return self.bad(index, e.reason, f"{where}: {e.detail}", e)


def shard_main(args: argparse.Namespace) -> int:
    """Run ``polymodal data shard``; prints a one-line summary. Returns the exit code."""
    paths = write_shards(args.manifest, args.out, max_count=args.max_count, max_size=args.max_size,
                         on_bad_record=args.on_bad_record, overwrite=args.overwrite, progress=not args.no_progress)
    with open(os.path.join(args.out, INDEX_NAME), encoding="utf-8") as f:
        index = json.load(f)
    skipped = f", skipped {index['skipped']}" if index["skipped"] else ""
    print(f"wrote {index['num_samples']} samples in {len(paths)} shards to {os.path.abspath(args.out)}{skipped}")
    return 0
