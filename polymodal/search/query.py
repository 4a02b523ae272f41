"""Queries against an index: text, image or "more like this item", with the best frame time of video hits."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from .embed import SearchError, model_id
from .index import SearchIndex, folder_stamp


def hit_dict(index: SearchIndex, row: int, score: float, query: np.ndarray | None = None) -> dict:
    """The JSON-ready description of item `row` as a hit.

    Args:
        index: the opened index.
        row: the item's id (its row in the index).
        score: inner product with the query.
        query: (D,) the query vector; for a video it picks the best-matching sampled frame.
    Returns:
        Dict: id, score, kind, path, name (file name), caption, and for videos "time" (seconds of the best
        frame, None without a query) and "frame_score".
    """
    it = index.items[row]
    hit = {"id": int(row), "score": float(score), "kind": it["kind"], "path": it["path"],
           "name": os.path.basename(it["path"]) if it["kind"] != "text" else None, "caption": it.get("caption")}
    if it["kind"] == "video":
        hit["time"], hit["frame_score"] = best_frame(index, row, query)
    return hit


def best_frame(index: SearchIndex, row: int, query: np.ndarray | None) -> tuple[float | None, float | None]:
    """(time in seconds, score) of the sampled frame of video `row` closest to `query`; (None, None) when the
    video has no stored frame or there is no query."""
    it = index.items[row]
    start, count = int(it.get("frame_start", 0)), int(it.get("frame_count", 0))
    if query is None or count == 0:
        return None, None
    frames = index.emb.frames[start:start + count].astype(np.float32)       # (T, D)
    scores = frames @ np.asarray(query, np.float32)                          # (T,)
    best = int(np.argmax(scores))
    return float(index.emb.frame_times[start + best]), float(scores[best])


class Searcher:
    """Answers queries on one index with the index's own model.

    `refresh()` re-opens the index when its folder was rewritten (`index add`, a rebuild), so a long-running
    server follows it. Each query reads one version of the index from start to end.

    Args:
        index: an opened `SearchIndex` or its folder.
        model: the model; it must be the one the index was built with (IndexModelMismatch otherwise).

    Attributes:
        generation: how many times the index was re-opened (0 = as first opened).
        reload_error: why the last re-open was refused (the old index stays in use), or None.
    """

    def __init__(self, index, model, recorded: bool = False):
        index = index if isinstance(index, SearchIndex) else SearchIndex.open(index)
        self.model = model.eval()
        self.model_id = model_id(model)
        index.check_model(identity=self.model_id, recorded=recorded)
        self._version = (index, 0)        # (index, generation), replaced as one object by refresh()
        self._lock = threading.Lock()     # one forward pass at a time (the server runs requests in threads)
        self._reload_lock = threading.Lock()
        self._refused_stamp = None
        self.reload_error: str | None = None

    @property
    def index(self) -> SearchIndex:
        return self._version[0]

    @property
    def generation(self) -> int:
        return self._version[1]

    def snapshot(self) -> tuple[SearchIndex, int]:
        """(index, generation) of one version, read together (a request uses one version throughout)."""
        return self._version

    def refresh(self) -> bool:
        """Re-open the index if its folder changed on disk since it was read; True when a new version is in use.

        A new version that cannot be opened, or was built with another model, is refused: the old one stays
        in use and `reload_error` says why (it is tried again once the folder changes again).
        """
        stamp = folder_stamp(self.index.path)
        if stamp is None or stamp == self.index.stamp or stamp == self._refused_stamp:
            return False
        with self._reload_lock:
            if folder_stamp(self.index.path) == self.index.stamp:            # another request re-opened it
                return False
            try:
                new = SearchIndex.open(self.index.path)
                new.check_model(identity=self.model_id)
            except Exception as e:                                           # keep serving the old version
                self._refused_stamp = stamp
                self.reload_error = f"{self.index.path} changed but was not reloaded: {e}"
                return False
            self._version, self.reload_error = (new, self.generation + 1), None
            return True

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_text(self, text: str) -> np.ndarray:
        """(D,) the normalised embedding of one query text."""
        from ..data.text import trim_padding
        if self.model.tokenizer is None:
            raise SearchError("the model has no tokenizer, so text queries are impossible; save it with its tokenizer")
        with self._lock:
            ids = trim_padding(self.model.tokenizer([text]), self.model.config.text.pad_token_id)
            return self.model.encode_text(ids.to(self.device))[0].float().cpu().numpy()

    @torch.no_grad()
    def encode_image(self, image) -> np.ndarray:
        """(D,) the normalised embedding of a PIL image (or an image file path)."""
        from ..data.images import load_image
        if isinstance(image, (str, Path)):
            image = load_image(image)
        with self._lock:
            pixels = self.model.image_transform(image)[None].to(self.device)    # (1, 3, H, W)
            return self.model.encode_image(pixels)[0].float().cpu().numpy()

    def search_vector(self, query: np.ndarray, k: int = 20, exclude: int | None = None,
                      index: SearchIndex | None = None) -> list[dict]:
        """The k best hits for a query vector (D,), best first; `exclude` leaves one id out.

        `index`: the version to search (from `snapshot()`); default the current one.
        """
        index = self.index if index is None else index
        scores, ids = index.search(query[None], k + (exclude is not None))
        hits = [hit_dict(index, int(i), float(s), query) for s, i in zip(scores[0], ids[0])
                if i >= 0 and int(i) != exclude]
        return hits[:k]

    def text(self, text: str, k: int = 20, index: SearchIndex | None = None) -> list[dict]:
        """Hits for a text query (`index` as in `search_vector`)."""
        return self.search_vector(self.encode_text(text), k, index=index)

    def image(self, image, k: int = 20, index: SearchIndex | None = None) -> list[dict]:
        """Hits for an image query, a PIL image or a file path (`index` as in `search_vector`)."""
        return self.search_vector(self.encode_image(image), k, index=index)

    def similar(self, item_id: int, k: int = 20, index: SearchIndex | None = None) -> list[dict]:
        """Hits most like item `item_id` of the index, the item itself left out (`index` as in `search_vector`).

        Raises:
            KeyError: no such id.
        """
        index = self.index if index is None else index
        if not 0 <= int(item_id) < len(index):
            raise KeyError(f"no item with id {item_id} (the index holds ids 0..{len(index) - 1})")
        vector = index.emb.vectors[int(item_id)].astype(np.float32)
        return self.search_vector(vector, k, exclude=int(item_id), index=index)
