"""FAISS indexes over a collection's embeddings, with the model's identity and the items' metadata beside them.

An index folder holds `index.json` (format, kind and parameters, `model_id`, the model's path or name,
count, dimension, recall@10 of an approximate index against exact search), the embeddings exactly as
`embed.write_embeddings` writes them (`vectors.npy`, `items.jsonl`, frames ...) and, for IVF and HNSW,
`index.faiss`. The exact index ("flat", inner product = cosine on normalised vectors) is rebuilt from
`vectors.npy` when opened, which is a memory copy. The folder is written beside its final place and swapped
in whole (`models.base.replace_dir`), so a reader never sees half an index.

`add_to_index` embeds only the files whose (path, size, mtime) is new, replaces the entries of files
that changed, keeps everything else, and rebuilds the FAISS structure over all vectors.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embed import (FORMAT_VERSION, EmbedSettings, Embeddings, SearchError, collect_items, embed_items,
                    empty_embeddings, item_key, join_chunks, load_embeddings, model_id, write_embeddings)

INDEX_KINDS = ("flat", "ivf", "hnsw")
RECALL_QUERIES = 1000          # stored vectors used as queries when measuring recall@10 at build time


class IndexModelMismatch(SearchError):
    """A query model is not the one an index was built with."""


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("search needs faiss: pip install faiss-cpu (or pip install -e .[search])") from None
    return faiss


def default_nlist(n: int) -> int:
    """IVF lists for n vectors: about 2 sqrt(n) (FAISS suggests 4-16 sqrt(n) for millions of vectors; fewer lists
    train faster and suit the 10k-1M photos of a personal collection), with at least 39 training vectors per list
    (FAISS's minimum)."""
    return max(1, min(int(2 * math.sqrt(max(n, 1))), n // 39))


def make_faiss_index(vectors: np.ndarray, kind: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                     hnsw_m: int = 32, ef_search: int = 128, seed: int = 0):
    """A FAISS inner-product index over `vectors` (N, D).

    Args:
        vectors: (N, D) L2-normalised embeddings (any float dtype; FAISS gets float32).
        kind: "flat" (exact), "ivf" (inverted lists, k-means trained on the vectors) or "hnsw" (graph).
        nlist: IVF lists (default `default_nlist(N)`); nprobe: lists searched (default max(1, nlist // 8)).
        hnsw_m: HNSW neighbours per node; ef_search: HNSW search breadth.
        seed: k-means seed (IVF).
    Returns:
        (the index, dict of the parameters used).
    """
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise SearchError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    d = x.shape[1]
    if kind == "flat" or (kind == "ivf" and len(x) < 39):   # too few vectors to train lists: exact is exact
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index, {"kind": "flat", **({"requested": kind} if kind != "flat" else {})}
    if kind == "ivf":
        nlist = int(nlist or default_nlist(len(x)))
        nprobe = int(nprobe or max(1, nlist // 8))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.add(x)
        index.nprobe = nprobe
        return index, {"kind": "ivf", "nlist": nlist, "nprobe": nprobe}
    index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(40, 2 * int(hnsw_m))
    index.add(x)
    index.hnsw.efSearch = int(ef_search)
    return index, {"kind": "hnsw", "m": int(hnsw_m), "ef_search": int(ef_search)}


def _set_search_params(index, params: dict) -> None:
    if params.get("kind") == "ivf":
        index.nprobe = int(params["nprobe"])
    elif params.get("kind") == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])


def recall_at_k(index, vectors: np.ndarray, k: int = 10, queries: int = RECALL_QUERIES, seed: int = 0) -> float:
    """Mean fraction of the exact top-k (brute force inner product) that `index` returns, over stored vectors
    used as queries.

    Args:
        index: a FAISS index over `vectors`.
        vectors: (N, D) the indexed vectors.
        k: cut-off.
        queries: how many stored vectors (a seeded random subset) serve as queries.
    Returns:
        recall@k in [0, 1] (1.0 for an empty collection).
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(x) == 0:
        return 1.0
    k = min(k, len(x))
    rows = np.random.default_rng(seed).choice(len(x), size=min(queries, len(x)), replace=False)
    q = x[rows]
    exact = np.argpartition(-(q @ x.T), k - 1, axis=1)[:, :k]           # (Q, k) top-k as a set, without FAISS
    _, got = index.search(q, k)                                           # (Q, k)
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, got)]
    return float(np.mean(hits) / k)


def _temp_prefix(out: Path) -> str:
    """Name prefix of the folder an index is written into before it is swapped in (the writer's pid inside)."""
    return f".{out.name}.tmp-"


def remove_stale_temp_dirs(out: str | os.PathLike) -> list[Path]:
    """Delete the half-written index folders that killed builds left beside `out`.

    They are `.<name>.tmp-<pid>-XXXX` folders whose process is gone, and the `.<name>.XXXXXXXX` folders of
    earlier versions. The embedding caches `.<name>.parts` / `.<name>.add-parts` are kept (a build resumes
    from them) and are removed by the run that finishes.

    Args:
        out: the index folder (it need not exist).
    Returns:
        The removed folders.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    ours = re.compile(rf"^{re.escape(_temp_prefix(out))}(\d+)-[A-Za-z0-9_]+$")
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.[a-z0-9_]{{8}}$")     # tempfile.mkdtemp's 8 characters
    removed = []
    for p in out.parent.iterdir():
        m = ours.match(p.name)
        if not (m and not _process_alive(int(m.group(1))) or legacy.match(p.name)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                  # another user's process: alive
        return True
    return True


def check_out_dir(out: str | os.PathLike, what: str = "--out") -> Path:
    """`out` as a folder this run can write: not an existing file, on a writable file system.

    Raises:
        SearchError: `out` (or a folder on its way) is a file, or the place is read-only (one line, with the fix).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SearchError(f"{what}: {out} is a file, not a folder; give a folder path for the index")
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SearchError(f"{what}: {probe} (on the way to {out}) is a file, not a folder; give another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SearchError(f"{what}: cannot write in {probe} (read-only file system or no permission); give a "
                          f"folder you can write, e.g. under your home folder")
    return out


def _write_failure(e: OSError, out: Path, kept: str) -> SearchError:
    """One line for a write that failed (disk full, I/O error, read-only): what is kept and what to do."""
    try:
        free = f"{shutil.disk_usage(out.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    cause = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "the file system is read-only" if e.errno == errno.EROFS else f"{e.strerror or e}"
    return SearchError(f"cannot write index {out}: {cause} ({free} on {out.parent}); {kept}. Free space (or "
                       f"fix the cause) and run the same command again")


def _write_index_dir(emb: Embeddings, out: Path, kind: str, params: dict, model_source: str | None,
                     extra: dict | None = None) -> dict:
    """Build the FAISS part, measure recall and write everything into a temporary folder swapped in at `out`."""
    from ..models.base import replace_dir
    faiss = _faiss()
    start = time.perf_counter()
    index, used = make_faiss_index(emb.vectors, kind, **params) if len(emb.items) else (None, {"kind": kind})
    build_s = time.perf_counter() - start
    recall = recall_at_k(index, emb.vectors) if index is not None and used["kind"] != "flat" else 1.0
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        info = {"model": model_source, "index": used, "recall_at_10": recall, "build_seconds": round(build_s, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {})}
        write_embeddings(emb, tmp, None)
        os.replace(tmp / "embed.json", tmp / "embed-meta.json")
        if index is not None and used["kind"] != "flat":
            faiss.write_index(index, str(tmp / "index.faiss"))
        meta = {**json.loads((tmp / "embed-meta.json").read_text()), **info}
        (tmp / "embed-meta.json").unlink()
        (tmp / "index.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_failure(e, out, "the old index is kept as it was" if out.exists() else
                                 "nothing was written") from e
        raise
    replace_dir(tmp, out)
    return meta


def build_index_from_embeddings(emb: Embeddings, out: str | os.PathLike, kind: str = "flat",
                                model_source: str | None = None, nlist: int | None = None,
                                nprobe: int | None = None, hnsw_m: int = 32, ef_search: int = 128,
                                extra: dict | None = None) -> dict:
    """Write an index folder for embeddings already computed.

    Args:
        emb: the embeddings (an empty one makes an empty index that answers every query with no hit).
        out: the index folder (replaced atomically if it exists).
        kind: "flat" (exact, default), "ivf" or "hnsw".
        model_source: the model's path or name, so `polymodal search INDEX` can load it again.
        nlist, nprobe, hnsw_m, ef_search: see `make_faiss_index`.
        extra: more fields for index.json (e.g. the embedding settings).
    Returns:
        The index.json dict (with "recall_at_10": 1.0 for exact search).
    """
    params = {"nlist": nlist, "nprobe": nprobe} if kind == "ivf" else {"hnsw_m": hnsw_m, "ef_search": ef_search} \
        if kind == "hnsw" else {}
    return _write_index_dir(emb, Path(out), kind, params, model_source, extra)


def build_index(model, data: str | os.PathLike, out: str | os.PathLike, kind: str = "flat",
                settings: EmbedSettings | None = None, model_source: str | None = None, progress: bool = True,
                on_chunk=None, allow_empty: bool = False, **params) -> dict:
    """`polymodal index build`: embed a folder/manifest and write an index folder.

    The embedding chunks live in `.<name>.parts/` beside `out` until the index is written, so a killed build
    started again resumes where it stopped.

    Args:
        model: the model; data: folder, manifest or .txt; out: index folder; kind: see `make_faiss_index`.
        settings: embedding settings; model_source: recorded for later loads; progress: progress bar.
        on_chunk: see `embed.embed_items`.
        allow_empty: write an empty index when nothing is found (default: SearchError).
        **params: nlist, nprobe, hnsw_m, ef_search.
    Returns:
        The index.json dict, plus "skipped" (count).
    """
    settings = settings or EmbedSettings()
    out = check_out_dir(out)                  # before any file is read or embedded
    items, skipped = collect_items(data)
    if not items and not allow_empty:
        raise SearchError(f"{data}: no image, video or text found; point --data at a folder of photos or a manifest")
    parts = out.parent / f".{out.name}.parts"
    identity = model_id(model)
    try:
        emb = embed_items(model, items, parts, settings, progress, on_chunk, identity)
    except OSError as e:
        raise _write_failure(e, out, f"{'the old index is kept; ' if out.exists() else ''}the finished chunks in "
                                     f"{parts} are reused by the next run") from e
    emb.skipped = skipped + emb.skipped
    if not emb.items and not allow_empty:
        raise SearchError(f"{data}: none of the {len(items)} files could be read (e.g. "
                          f"{emb.skipped[0]['detail'] if emb.skipped else '?'})")
    meta = build_index_from_embeddings(emb, out, kind, model_source, extra=_settings_extra(settings, data), **params)
    shutil.rmtree(parts, ignore_errors=True)
    return meta


def _settings_extra(settings: EmbedSettings, data) -> dict:
    return {"num_frames": settings.num_frames, "float16": settings.float16, "sources": [str(Path(data).resolve())]}


# ----------------------------------------------------------------------------------------------- opening
def folder_stamp(path: str | os.PathLike) -> tuple | None:
    """What changes whenever an index folder is rewritten (`index add`, a rebuild): the folder's inode (the new
    folder is swapped in whole) and index.json's inode, mtime and size. None when the folder cannot be read."""
    try:
        folder, meta = os.stat(path), os.stat(Path(path) / "index.json")
    except OSError:
        return None
    return folder.st_ino, meta.st_ino, meta.st_mtime_ns, meta.st_size


@dataclass
class SearchIndex:
    """An opened index folder.

    Attributes:
        path: the folder; info: index.json; emb: the stored embeddings and items; faiss_index: None when empty.
    """

    path: Path
    info: dict
    emb: Embeddings
    faiss_index: object | None
    stamp: tuple | None = None      # `folder_stamp` of the folder as read

    @property
    def items(self) -> list[dict]:
        return self.emb.items

    def __len__(self) -> int:
        return len(self.emb.items)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "SearchIndex":
        """Open an index folder written by `build_index` / `build_index_from_embeddings`.

        Raises:
            SearchError: not an index folder, or a newer format.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"index {path} does not exist; build it with `polymodal index build`")
        for _ in range(3):      # a rewrite swapped in while reading: read again, so files never mix two versions
            stamp = folder_stamp(path)
            emb, info = load_embeddings(path, "index.json")
            if folder_stamp(path) == stamp:
                break
        if info.get("format_version", 0) > FORMAT_VERSION:
            raise SearchError(f"{path}: index format {info['format_version']} is newer than this polymodal "
                              f"({FORMAT_VERSION}); upgrade polymodal")
        index = None
        if len(emb.items):
            faiss = _faiss()
            params = info.get("index", {})
            if params.get("kind", "flat") == "flat":
                index = faiss.IndexFlatIP(emb.dim)
                index.add(np.ascontiguousarray(emb.vectors, dtype=np.float32))
            else:
                index = faiss.read_index(str(path / "index.faiss"))
                _set_search_params(index, params)
        return cls(path, info, emb, index, stamp)

    def check_model(self, model=None, identity: str | None = None, recorded: bool = False) -> None:
        """Raise IndexModelMismatch unless the model (or its `model_id`) is the one the index was built with.

        Args:
            recorded: the model was loaded from the path the index records (no --model given): a mismatch then
                means that model changed since indexing, and the message says so.
        """
        identity = identity or model_id(model)
        if identity != self.info.get("model_id"):
            if recorded:
                raise IndexModelMismatch(
                    f"the model at {self.info.get('model')} (recorded in {self.path}) has changed since the index was "
                    f"built (id {str(self.info.get('model_id'))[:19]}... then, {identity[:19]}... now); rebuild the "
                    f"index with `polymodal index build`, or pass --model with the model it was built with")
            raise IndexModelMismatch(
                f"{self.path} was built with another model ({self.info.get('model') or 'unknown'}, "
                f"id {str(self.info.get('model_id'))[:19]}...) than the one given (id {identity[:19]}...); "
                f"query it with that model or rebuild the index with `polymodal index build`")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Args:
            queries: (Q, D) float query vectors.
            k: hits per query.
        Returns:
            scores (Q, k') float32 and ids (Q, k') int64 with k' = min(k, len(self)); an empty index gives k' = 0.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.emb.dim:
            raise SearchError(f"query has dimension {q.shape[1]}, the index {self.path} holds {self.emb.dim}")
        k = min(int(k), len(self))
        if self.faiss_index is None or k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, ids = self.faiss_index.search(q, k)
        return scores, ids


# ----------------------------------------------------------------------------------------------- adding files
def add_to_index(model, index_dir: str | os.PathLike, data: str | os.PathLike, progress: bool = True,
                 settings: EmbedSettings | None = None, on_chunk=None, prune: bool = False) -> dict:
    """`polymodal index add`: embed only new or changed files of `data` and rewrite the index.

    A file counts as known when its (path, size, mtime) is in the index; a known path with another size or
    mtime is re-embedded and replaces its old entry. Files of the index that `data` does not list are kept,
    unless `prune` is set and the file no longer exists (texts are never pruned: they are not files).

    Args:
        model: must be the index's model (IndexModelMismatch otherwise).
        index_dir: an existing index folder.
        data: folder, manifest or .txt file.
        progress: progress bar; settings: batch and chunk sizes (frames per video and float16 come from the index).
        on_chunk: see `embed.embed_items`.
        prune: drop the entries of image/video files that are gone from disk.
    Returns:
        Dict: added, replaced, unchanged, removed, skipped (counts), and the new index.json under "index".
    """
    index = SearchIndex.open(index_dir)
    identity = model_id(model)
    index.check_model(identity=identity)
    info = index.info
    base = settings or EmbedSettings()
    settings = EmbedSettings(batch_size=base.batch_size, chunk_size=base.chunk_size,
                             num_frames=int(info.get("num_frames", base.num_frames)),
                             float16=bool(info.get("float16", base.float16)))
    items, skipped = collect_items(data)
    known = {item_key(it) for it in index.items}
    paths = {it["path"] for it in index.items}
    new = [it for it in items if item_key(it) not in known]
    replaced = {it["path"] for it in new if it["path"] in paths}
    index_dir = check_out_dir(index_dir, "INDEX")
    parts = index_dir.parent / f".{index_dir.name}.add-parts"
    try:
        fresh = embed_items(model, new, parts, settings, progress, on_chunk, identity)
    except OSError as e:
        raise _write_failure(e, index_dir, f"the old index is kept; the finished chunks in {parts} are reused by "
                                           f"the next run") from e
    old = index.emb
    gone = {it["path"] for it in old.items
            if prune and it.get("kind") != "text" and not os.path.exists(it["path"])}
    keep_rows = [i for i, it in enumerate(old.items) if it["path"] not in replaced and it["path"] not in gone]
    merged = join_chunks([_as_chunk(old, keep_rows), _as_chunk(fresh, range(len(fresh.items)))], old.dim,
                         identity, old.vectors.dtype)
    merged.skipped = skipped + fresh.skipped
    used = info.get("index", {})
    kind = used.get("requested") or used.get("kind", "flat")
    # HNSW keeps its settings; IVF lists are retrained for the new size (nlist and nprobe by default).
    params = {"hnsw_m": used.get("m", 32), "ef_search": used.get("ef_search", 128)} if kind == "hnsw" else {}
    sources = sorted(set(info.get("sources", [])) | {str(Path(data).resolve())})
    extra = {"num_frames": settings.num_frames, "float16": settings.float16, "sources": sources}
    try:
        meta = build_index_from_embeddings(merged, index_dir, kind, info.get("model"), extra=extra, **params)
    except SearchError as e:
        if parts.is_dir():
            raise SearchError(f"{e} (the new files' embeddings stay in {parts} for that run)") from e
        raise
    shutil.rmtree(parts, ignore_errors=True)
    n_replaced = len(replaced & {it["path"] for it in fresh.items})
    return {"added": len(fresh.items) - n_replaced, "replaced": n_replaced, "unchanged": len(keep_rows),
            "removed": len(gone), "skipped": len(merged.skipped), "index": meta}


def _as_chunk(emb: Embeddings, rows) -> dict:
    """Rows of an Embeddings as a chunk dict (`embed.embed_chunk` layout), frames renumbered."""
    rows = list(rows)
    items, frames, owner, times = [], [], [], []
    for new_row, r in enumerate(rows):
        it = {k: v for k, v in emb.items[r].items() if k not in ("frame_start", "frame_count")}
        mine = np.nonzero(emb.frame_owner == r)[0]
        frames.append(emb.frames[mine])
        owner.append(np.full(len(mine), new_row, np.int64))
        times.append(emb.frame_times[mine])
        items.append(it)
    dim = emb.vectors.shape[1]
    return {"vectors": emb.vectors[rows] if rows else np.zeros((0, dim), emb.vectors.dtype),
            "frames": np.concatenate(frames) if frames else np.zeros((0, dim), emb.frames.dtype),
            "frame_owner": np.concatenate(owner) if owner else np.zeros(0, np.int64),
            "frame_times": np.concatenate(times) if times else np.zeros(0, np.float64),
            "items": items, "skipped": []}


def empty_index(out: str | os.PathLike, model, model_source: str | None = None) -> dict:
    """Write an index with no item for `model` (it answers every query with no hit)."""
    from .embed import embedding_dim
    return build_index_from_embeddings(empty_embeddings(embedding_dim(model), model_id(model)), out, "flat",
                                       model_source)
