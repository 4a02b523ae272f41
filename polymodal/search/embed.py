"""Embedding a collection for search: images, videos (frames + pooled) and texts, in resumable chunks.

A collection is a folder (scanned recursively for image and video files, hidden folders skipped), a
manifest (JSONL/CSV records with `image`, `video` or only a caption) or a `.txt` file (one text per line).
Items are sorted by path, cut into chunks of `chunk_size`, and each finished chunk is written to
`OUT/chunks/<key>.npz` at once, where the key hashes the model, the settings and every item's path, size and
modification time. A killed run started again finds the finished chunks by their keys and computes only the
others; a chunk whose files changed gets a new key and is recomputed. At the end the chunks are joined into
`vectors.npy`, `items.jsonl`, `frames.npy` / `frame_owner.npy` / `frame_times.npy` (video frames),
`skipped.jsonl` and `embed.json`, each written atomically.

Videos get one pooled embedding (the model's `encode_video`, or the mean of its frame embeddings, see
`polymodal.encode.encode_clips`) plus one embedding per sampled frame with its time, so a
search can say where in the video the match is.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..fileio import atomic_open

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv")
KINDS = ("image", "video", "text")
FORMAT_VERSION = 1


class SearchError(ValueError):
    """A collection, embedding folder or index cannot be used; the message names the place and the fix."""


# ----------------------------------------------------------------------------------------------- model identity
def model_id(model) -> str:
    """A fingerprint of everything that decides a model's embeddings: config, weights, preprocessing, tokenizer.

    Two loads of the same saved model give the same id; a retrained or differently initialised model, or
    a changed image transform, gives another one. An index stores it and refuses queries from other models.

    Args:
        model: a polymodal model (`config`, `state_dict()`, optional `image_transform` and `tokenizer`).
    Returns:
        "sha256:" followed by 64 hex digits.
    """
    h = hashlib.sha256()
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else model.config
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    transform = getattr(model, "image_transform", None)
    if transform is not None and hasattr(transform, "to_dict"):
        h.update(json.dumps(transform.to_dict(), sort_keys=True, default=str).encode())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        h.update(repr(tokenizer).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------- collecting items
SYMLINK, NOT_A_FILE, MISSING_FILE, UNREADABLE = "symlink", "not_a_file", "missing_file", "unreadable"


class _Skip(Exception):
    """A path that is not indexed: `reason` (one of the names above) and a one-line `detail`."""

    def __init__(self, path: str, reason: str, detail: str):
        super().__init__(detail)
        self.entry = {"path": path, "reason": reason, "detail": f"{path}: {detail}"}


def _file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else
            "a folder" if stat.S_ISDIR(mode) else "not a regular file")


def _stat(path: str, folder_ok: bool = False) -> os.stat_result:
    """`os.lstat` of a file to index; _Skip for a link, a FIFO, a device, a socket, or one that is gone.

    A frame folder (`folder_ok`, a manifest's `video`) counts its files' bytes and newest mtime."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise _Skip(path, MISSING_FILE, "file not found") from None
    except OSError as e:
        raise _Skip(path, UNREADABLE, f"cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise _Skip(path, SYMLINK, "a symbolic link; symbolic links are not followed (to files or folders "
                                   "alike): index the target's own folder instead")
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return st
    raise _Skip(path, NOT_A_FILE, f"{_file_kind(st.st_mode)}, not a file; only regular files are indexed")


def _media_item(path: str, kind: str, caption: str | None = None) -> dict:
    """An item dict for a media file (size, mtime and inode recorded: the server serves only that file)."""
    st = _stat(path, folder_ok=kind == "video")
    size, mtime = st.st_size, st.st_mtime_ns
    if stat.S_ISDIR(st.st_mode):
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                est = entry.stat(follow_symlinks=False)
                size, mtime = size + est.st_size, max(mtime, est.st_mtime_ns)
    return {"kind": kind, "path": path, "caption": caption, "size": size, "mtime_ns": mtime, "ino": st.st_ino}


def _text_item(text: str, source: str) -> dict:
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {"kind": "text", "path": f"{source}#{digest}", "caption": text, "size": len(text.encode()), "mtime_ns": 0}


def scan_folder(folder: str | os.PathLike, skipped: list[dict] | None = None) -> list[dict]:
    """Image and video files under `folder` (recursive; hidden files and folders skipped), sorted by path.

    Only regular files are indexed. Symbolic links are never followed, to files and to folders alike (a link
    could make files outside the folder searchable and downloadable); they, FIFOs, sockets, devices and
    folders that cannot be listed are left out and reported in `skipped`.

    Args:
        folder: the folder.
        skipped: a list that receives one entry {"path", "reason", "detail"} per left-out path (reasons:
            "symlink", "not_a_file", "missing_file", "unreadable").
    Returns:
        Item dicts: kind ("image" / "video"), absolute path, caption None, size, mtime_ns, ino.
    """
    root = os.path.abspath(os.fspath(folder))
    skipped = [] if skipped is None else skipped
    items = []

    def cannot_list(err: OSError) -> None:
        skipped.append(_Skip(err.filename or root, UNREADABLE, f"folder cannot be listed ({err.strerror})").entry)

    for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list):     # never follows folder links
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append(_Skip(os.path.join(dirpath, d), SYMLINK, "a symbolic link to a folder; symbolic "
                                     "links are not followed (to files or folders alike)").entry)
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            kind = "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None
            if kind:
                try:
                    items.append(_media_item(os.path.join(dirpath, name), kind))
                except _Skip as skip:
                    skipped.append(skip.entry)
    return sorted(items, key=lambda it: it["path"])


def collect_items(data: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """The items of a folder, a manifest or a text file, and the records that could not be used.

    Args:
        data: a folder (see `scan_folder`); a `.txt` file (one text per non-empty line); or a JSONL/CSV
            manifest whose records carry `image`, `video` or only `caption` (a text item). A record's
            `caption` is kept as the item's caption. A manifest names its files itself: a path that is a
            symbolic link is indexed as the file it points to (its real path is recorded), a missing file or
            one that is not a regular file (FIFO, device) is skipped.
    Returns:
        (items sorted by path, skipped entries {"path", "reason", "detail"}).
    Raises:
        FileNotFoundError: `data` does not exist.
    """
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data: {data} does not exist (give a folder of images/videos or a manifest)")
    if path.is_dir():
        skipped: list[dict] = []
        return scan_folder(path, skipped), skipped
    if not path.is_file():
        raise SearchError(f"--data: {data} is {_file_kind(path.stat().st_mode)}; give a folder of images/videos, "
                          f"a manifest or a .txt file")
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return sorted((_text_item(t.strip(), str(path.resolve())) for t in lines if t.strip()),
                      key=lambda it: it["path"]), []
    from ..data.manifests import read_manifest
    manifest = read_manifest(path, on_bad_record="skip", required=(), media="none", allow_empty=True)
    items, seen, skipped = [], set(), []
    for r in manifest.records:
        caption = r.get("caption") or (r.get("captions") or [None])[0]
        if "image" in r or "video" in r:
            kind = "image" if "image" in r else "video"
            file = os.path.realpath(r[kind]) if os.path.islink(r[kind]) else r[kind]   # the user named it
            try:
                item = _media_item(file, kind, caption)
            except _Skip as skip:
                skipped.append(skip.entry)
                continue
        elif caption:
            item = _text_item(caption, manifest.path)
        else:
            continue
        if item["path"] not in seen:           # a file listed twice (several captions) is embedded once
            seen.add(item["path"])
            items.append(item)
    skipped = [{"path": ex.split(": ", 1)[0], "reason": reason, "detail": ex}
               for reason, examples in manifest.skipped_examples.items() for ex in examples] + skipped
    return sorted(items, key=lambda it: it["path"]), skipped


def item_key(item: dict) -> tuple:
    """What decides whether a file changed: (path, size, mtime_ns)."""
    return item["path"], int(item["size"]), int(item["mtime_ns"])


# ----------------------------------------------------------------------------------------------- embedding
@dataclass
class EmbedSettings:
    """How a collection is embedded (part of every chunk's key)."""

    batch_size: int = 32
    chunk_size: int = 256           # items per chunk file: the unit of resumption
    num_frames: int = 8             # frames sampled per video (uniform in time)
    float16: bool = False           # store vectors as float16 (half the disk; scores change by ~1e-3)

    def key_dict(self) -> dict:
        return {"num_frames": self.num_frames, "float16": self.float16, "version": FORMAT_VERSION}


@dataclass
class Embeddings:
    """Vectors of a collection and what they stand for.

    Attributes:
        vectors: (N, D) L2-normalised item embeddings (float32 or float16), row i = items[i].
        items: N item dicts (kind, path, caption, size, mtime_ns; videos also frame_start, frame_count).
        frames: (F, D) per-frame embeddings of the videos, grouped by video in item order.
        frame_owner: (F,) int64 row of `vectors` each frame belongs to.
        frame_times: (F,) float64 seconds.
        skipped: entries {"path", "reason", "detail"} of files that could not be read.
        model_id: `model_id(model)` of the model that made them.
    """

    vectors: np.ndarray
    items: list[dict]
    frames: np.ndarray
    frame_owner: np.ndarray
    frame_times: np.ndarray
    skipped: list[dict] = field(default_factory=list)
    model_id: str = ""

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def empty_embeddings(dim: int, model_identity: str, dtype=np.float32) -> Embeddings:
    """An Embeddings with no item (dimension `dim`)."""
    return Embeddings(np.zeros((0, dim), dtype), [], np.zeros((0, dim), dtype), np.zeros(0, np.int64),
                      np.zeros(0, np.float64), [], model_identity)


def embedding_dim(model) -> int:
    """The model's embedding size, from one dummy image."""
    device = next(model.parameters()).device
    size = model.config.vision.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])


def _chunk_key(model_identity: str, settings: EmbedSettings, items: list[dict]) -> str:
    payload = json.dumps([model_identity, settings.key_dict(), [[it["kind"], *item_key(it)] for it in items]])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@torch.no_grad()
def _embed_images(model, items: list[dict], batch_size: int) -> tuple[dict[int, np.ndarray], list[dict]]:
    """Embed the image items; returns {position: (D,) vector} and the skipped entries."""
    from ..data.images import ImageError, load_image
    device = next(model.parameters()).device
    out, skipped, pending = {}, [], []

    def flush():
        pixels = torch.stack([p[1] for p in pending]).to(device)                    # (B, 3, H, W)
        vecs = model.encode_image(pixels).float().cpu().numpy()                      # (B, D)
        out.update({p[0]: v for p, v in zip(pending, vecs)})
        pending.clear()

    for pos, it in enumerate(items):
        try:
            pending.append((pos, model.image_transform(load_image(it["path"]))))
        except (ImageError, OSError) as e:
            skipped.append({"path": it["path"], "reason": "unreadable_image", "detail": str(e)})
            continue
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return out, skipped


@torch.no_grad()
def _embed_videos(model, items: list[dict], settings: EmbedSettings):
    """Embed the video items: {position: (pooled (D,), frames (T', D), times (T',))} and the skipped entries."""
    from ..data.video import VideoError, read_video
    from ..encode import encode_clips
    device = next(model.parameters()).device
    out, skipped = {}, []
    for pos, it in enumerate(items):
        try:
            clip = read_video(it["path"], num_frames=settings.num_frames, strategy="uniform")
        except (VideoError, OSError) as e:
            skipped.append({"path": it["path"], "reason": "unreadable_video", "detail": str(e)})
            continue
        frames = clip.pixels(model.image_transform)                                   # (T, 3, H, W)
        frames, valid = frames[None].to(device), clip.valid[None].to(device)          # (1, T, 3, H, W), (1, T)
        pooled = encode_clips(model, frames, valid)[0].float().cpu().numpy()          # (D,)
        keep = clip.valid.numpy()
        per_frame = []
        for s in range(0, int(keep.sum()), settings.batch_size):   # only real frames, in batches
            sel = frames[0][torch.from_numpy(keep)][s:s + settings.batch_size]
            per_frame.append(model.encode_image(sel).float().cpu().numpy())
        out[pos] = (pooled, np.concatenate(per_frame), clip.times.numpy()[keep].astype(np.float64))
    return out, skipped


def _embed_texts(model, items: list[dict], batch_size: int) -> dict[int, np.ndarray]:
    from ..encode import encode_texts
    if not items:
        return {}
    vecs = encode_texts(model, [it["caption"] for it in items], batch_size=batch_size).numpy()
    return dict(enumerate(vecs))


def embed_chunk(model, items: list[dict], settings: EmbedSettings, dim: int) -> dict:
    """Embed one chunk of items.

    Returns:
        Dict of arrays: vectors (n, D) of the readable items in order, frames (F, D), frame_owner (F,)
        (row in `vectors`), frame_times (F,), and "items" / "skipped" lists.
    """
    by_kind = {k: [(i, it) for i, it in enumerate(items) if it["kind"] == k] for k in KINDS}
    if by_kind["text"] and getattr(model, "tokenizer", None) is None:
        raise SearchError("the model has no tokenizer, so texts cannot be embedded; save it with its tokenizer")
    images, skipped_i = _embed_images(model, [it for _, it in by_kind["image"]], settings.batch_size)
    videos, skipped_v = _embed_videos(model, [it for _, it in by_kind["video"]], settings)
    texts = _embed_texts(model, [it for _, it in by_kind["text"]], settings.batch_size)
    done: dict[int, tuple] = {}
    for results, kind in ((images, "image"), (videos, "video"), (texts, "text")):
        for pos, value in results.items():
            done[by_kind[kind][pos][0]] = value
    vectors, kept, frames, owner, times = [], [], [], [], []
    for i in sorted(done):
        value = done[i]
        item = dict(items[i])
        if item["kind"] == "video":
            pooled, per_frame, t = value
            frames.append(per_frame)
            owner.append(np.full(len(per_frame), len(kept), np.int64))
            times.append(t)
            value = pooled
        vectors.append(value)
        kept.append(item)
    dtype = np.float16 if settings.float16 else np.float32
    return {"vectors": np.asarray(vectors, dtype).reshape(len(kept), dim),
            "frames": (np.concatenate(frames) if frames else np.zeros((0, dim))).astype(dtype),
            "frame_owner": np.concatenate(owner) if owner else np.zeros(0, np.int64),
            "frame_times": np.concatenate(times) if times else np.zeros(0, np.float64),
            "items": kept, "skipped": skipped_i + skipped_v}


def _write_chunk(path: Path, chunk: dict) -> None:
    meta = json.dumps({"items": chunk["items"], "skipped": chunk["skipped"]}, ensure_ascii=False).encode()
    with atomic_open(path, "wb") as f:
        np.savez(f, vectors=chunk["vectors"], frames=chunk["frames"], frame_owner=chunk["frame_owner"],
                 frame_times=chunk["frame_times"], meta=np.frombuffer(meta, np.uint8))


def _read_chunk(path: Path) -> dict | None:
    """A finished chunk, or None when the file is unreadable (then it is recomputed)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return {"vectors": z["vectors"], "frames": z["frames"], "frame_owner": z["frame_owner"],
                    "frame_times": z["frame_times"], **meta}
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def join_chunks(chunks: list[dict], dim: int, model_identity: str, dtype) -> Embeddings:
    """Concatenate chunk dicts (see `embed_chunk`) into one `Embeddings`, giving videos their frame ranges."""
    vectors, items, frames, owner, times, skipped = [], [], [], [], [], []
    n = f = 0
    for c in chunks:
        chunk_items = [dict(it) for it in c["items"]]
        for row, it in enumerate(chunk_items):
            if it["kind"] == "video":
                mine = np.nonzero(c["frame_owner"] == row)[0]
                it["frame_start"], it["frame_count"] = f + int(mine[0]) if len(mine) else f, int(len(mine))
        vectors.append(c["vectors"])
        frames.append(c["frames"])
        owner.append(c["frame_owner"] + n)
        times.append(c["frame_times"])
        items.extend(chunk_items)
        skipped.extend(c["skipped"])
        n += len(chunk_items)
        f += len(c["frames"])
    if not chunks:
        return empty_embeddings(dim, model_identity, dtype)
    return Embeddings(np.concatenate(vectors).astype(dtype, copy=False), items,
                      np.concatenate(frames).astype(dtype, copy=False), np.concatenate(owner).astype(np.int64),
                      np.concatenate(times).astype(np.float64), skipped, model_identity)


def embed_items(model, items: list[dict], work_dir: str | os.PathLike, settings: EmbedSettings | None = None,
                progress: bool = True, on_chunk: Callable[[int, int], None] | None = None,
                model_identity: str | None = None) -> Embeddings:
    """Embed `items` chunk by chunk, reusing the finished chunks found in `work_dir/chunks`.

    Args:
        model: a polymodal model in eval mode, with `image_transform` (and `tokenizer` for texts).
        items: item dicts from `collect_items` / `scan_folder`, in a fixed order.
        work_dir: where chunk files go (`work_dir/chunks/<key>.npz`); chunks of other runs are left alone.
        settings: batch/chunk sizes, frames per video, float16.
        progress: a tqdm bar over items.
        on_chunk: called as `on_chunk(i, n_chunks)` after chunk i was computed and written (not for reused
            chunks); tests use it to interrupt a run.
        model_identity: `model_id(model)` when already known.
    Returns:
        The `Embeddings` of the readable items, in item order.
    """
    from tqdm.auto import tqdm
    settings = settings or EmbedSettings()
    if settings.chunk_size < 1 or settings.batch_size < 1 or settings.num_frames < 1:
        raise SearchError(f"chunk_size, batch_size and num_frames must be >= 1, got {settings}")
    identity = model_identity or model_id(model)
    dim = embedding_dim(model)
    chunk_dir = Path(work_dir) / "chunks"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    groups = [items[s:s + settings.chunk_size] for s in range(0, len(items), settings.chunk_size)]
    results = []
    bar = tqdm(total=len(items), desc="embed", unit="item", disable=not progress, dynamic_ncols=True)
    try:
        for i, group in enumerate(groups):
            path = chunk_dir / f"{_chunk_key(identity, settings, group)}.npz"
            chunk = _read_chunk(path) if path.is_file() else None
            if chunk is None:
                chunk = embed_chunk(model, group, settings, dim)
                _write_chunk(path, chunk)
                if on_chunk is not None:
                    on_chunk(i, len(groups))
            results.append(chunk)
            bar.update(len(group))
    finally:
        bar.close()
    return join_chunks(results, dim, identity, np.float16 if settings.float16 else np.float32)


def chunk_files(work_dir: str | os.PathLike) -> list[Path]:
    """The chunk files in `work_dir/chunks` (finished chunks of any run)."""
    d = Path(work_dir) / "chunks"
    return sorted(d.glob("*.npz")) if d.is_dir() else []


# ----------------------------------------------------------------------------------------------- saving / loading
def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_embeddings(emb: Embeddings, out: str | os.PathLike, info: dict | None = None) -> None:
    """Write `emb` into folder `out`: vectors.npy, items.jsonl, frames.npy, frame_owner.npy, frame_times.npy,
    skipped.jsonl and embed.json (written last, so a folder with embed.json is complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_npy(out / "vectors.npy", emb.vectors)
    _write_npy(out / "frames.npy", emb.frames)
    _write_npy(out / "frame_owner.npy", emb.frame_owner)
    _write_npy(out / "frame_times.npy", emb.frame_times)
    _write_jsonl(out / "items.jsonl", emb.items)
    _write_jsonl(out / "skipped.jsonl", emb.skipped)
    meta = {"format_version": FORMAT_VERSION, "model_id": emb.model_id, "count": len(emb.items), "dim": emb.dim,
            "dtype": str(emb.vectors.dtype), "frames": int(len(emb.frames)), "skipped": len(emb.skipped),
            **(info or {})}
    with atomic_open(out / "embed.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file (an empty list when it has none)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_embeddings(folder: str | os.PathLike, meta_name: str = "embed.json") -> tuple[Embeddings, dict]:
    """Read a folder written by `write_embeddings` (or an index folder, `meta_name="index.json"`).

    Returns:
        (the Embeddings, the meta dict).
    Raises:
        SearchError: the folder is missing its meta file or a part of it.
    """
    folder = Path(folder)
    meta_path = folder / meta_name
    if not meta_path.is_file():
        raise SearchError(f"{folder}: no {meta_name}; it is not a finished "
                          f"{'index' if meta_name == 'index.json' else 'embedding'} folder (build it again)")
    again = "build it again" + (" with `polymodal index build`" if meta_name == "index.json" else "")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError) else ""
        raise SearchError(f"{meta_path}: not valid JSON{where}; the folder is damaged: {again}") from None
    except OSError as e:
        raise SearchError(f"{meta_path} cannot be read ({e.strerror or e}); {again}") from None
    if not isinstance(meta, dict):
        raise SearchError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}; {again}")
    try:
        emb = Embeddings(np.load(folder / "vectors.npy"), read_jsonl(folder / "items.jsonl"),
                         np.load(folder / "frames.npy"), np.load(folder / "frame_owner.npy"),
                         np.load(folder / "frame_times.npy"), read_jsonl(folder / "skipped.jsonl"),
                         meta.get("model_id", ""))
    except (OSError, ValueError) as e:
        raise SearchError(f"{folder}: a part is missing or damaged ({' '.join(str(e).split())[:200]}); "
                          f"{again}") from None
    if not all(isinstance(it, dict) and isinstance(it.get("path"), str) and it.get("kind") in KINDS
               for it in emb.items):
        raise SearchError(f"{folder}/items.jsonl: an entry is not an item {{kind, path, ...}}; {again}")
    if len(emb.vectors) != len(emb.items):
        raise SearchError(f"{folder}: vectors.npy has {len(emb.vectors)} rows but items.jsonl {len(emb.items)}; "
                          f"build it again")
    return emb, meta


def embed_collection(model, data: str | os.PathLike, out: str | os.PathLike, settings: EmbedSettings | None = None,
                     progress: bool = True, on_chunk=None, model_source: str | None = None) -> Embeddings:
    """`polymodal embed`: embed a folder/manifest/text file into `out` (resumable, see the module docstring).

    Args:
        model: the model.
        data: folder, manifest or .txt file.
        out: output folder (its `chunks/` subfolder is the resume cache).
        settings: see `EmbedSettings`.
        progress: progress bar.
        on_chunk: see `embed_items`.
        model_source: the model path or name, recorded in embed.json.
    Returns:
        The Embeddings written.
    Raises:
        SearchError: `data` holds no image, video or text.
    """
    if Path(out).exists() and not Path(out).is_dir():
        raise SearchError(f"--out: {out} is a file, not a folder; give a folder path for the embeddings")
    items, skipped = collect_items(data)
    if not items:
        raise SearchError(f"{data}: no image ({', '.join(IMAGE_SUFFIXES)}), video ({', '.join(VIDEO_SUFFIXES)}) "
                          f"or text found; point --data at a folder of photos or a manifest")
    settings = settings or EmbedSettings()
    emb = embed_items(model, items, out, settings, progress, on_chunk)
    emb.skipped = skipped + emb.skipped
    keep = {p.name for p in _planned_chunk_paths(emb.model_id, settings, items)}
    for stale in chunk_files(out):              # chunks of earlier, different runs
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    write_embeddings(emb, out, {"model": model_source, "data": str(Path(data).resolve()),
                                "num_frames": settings.num_frames})
    return emb


def _planned_chunk_paths(identity: str, settings: EmbedSettings, items: list[dict]) -> list[Path]:
    return [Path(f"{_chunk_key(identity, settings, items[s:s + settings.chunk_size])}.npz")
            for s in range(0, len(items), settings.chunk_size)]
