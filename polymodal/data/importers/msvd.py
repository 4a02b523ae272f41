"""`msvd`: MSVD (the Microsoft Research Video Description corpus) in CLIP4Clip's layout, for text-video retrieval.

Layout (as CLIP4Clip's `dataloaders/dataloader_msvd_retrieval.py` reads it, ArrowLuo/CLIP4Clip; the files come from
its `msvd_data.zip`, made by collaborative-experts):
- `raw-captions.pkl`: a pickled dict `video_id -> [caption, ...]`, each caption a list of word tokens (CLIP4Clip
  joins them with spaces);
- `train_list.txt`, `val_list.txt`, `test_list.txt`: one video_id a line (1,200 / 100 / 670 videos);
- the videos, `<video_id>.avi` (the official `YouTubeClips/` folder) or any container with that stem, anywhere
  under `YouTubeClips/`, `MSVD_Videos/` (CLIP4Clip's README) or `videos/`.

The pickle is read by an unpickler that builds only dicts, lists, strings, ints, booleans and None: it resolves
no global at all, so a pickle that would import or call anything (a `__reduce__` payload) is refused with an
error before any of it runs, and a caption file of any other shape is refused too.

Splits: train, val, test (default: all three, kept in each record's `split`); retrieval papers report test
(670 videos, about 27k captions). Records: `{"video", "captions", "split", "id"}`, every caption of a video grouped.

Options: `video_root` (a folder holding the videos, searched first and recursively).
"""
from __future__ import annotations

import pickle
from pathlib import Path

from .common import Imported, LayoutError, media_roots, require_split
from .options import check_options
from .videofiles import VideoIndex, annotation_files, missing_videos

CAPTIONS = "raw-captions.pkl"
SPLIT_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
VIDEO_FOLDERS = ["YouTubeClips", "MSVD_Videos", "videos"]
OPTIONS = ("video_root",)


class _Refused(Exception):
    """Internal: the pickle asked for something a caption file never holds."""


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global: only the opcodes for dicts, lists, strings and numbers can succeed."""

    def find_class(self, module, name):
        raise _Refused(f"it names the global {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent reference")


def _check(value, depth: int = 0) -> None:
    """_Refused unless `value` is built of dicts, lists, strings, ints, booleans and None only."""
    if depth > 8:
        raise _Refused("it nests deeper than a caption file")
    if value is None or isinstance(value, (str, int, bool)):
        return
    if isinstance(value, list):
        for v in value:
            _check(v, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
    else:
        raise _Refused(f"it holds a {type(value).__name__}")


def load_captions(path: Path) -> dict[str, list[str]]:
    """video_id -> captions (token lists joined with spaces) from `raw-captions.pkl`, read as data only.

    Raises:
        LayoutError: the file is not a plain pickle of that shape (one line, naming the file and why).
    """
    try:
        with open(path, "rb") as f:
            data = DataOnlyUnpickler(f, encoding="utf-8").load()
        _check(data)
    except _Refused as e:
        raise LayoutError(f"{path}: refused to unpickle: {e}; {CAPTIONS} holds only a dict of caption lists "
                          f"(nothing from it was run)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, MemoryError,
            UnicodeDecodeError) as e:
        raise LayoutError(f"{path}: not a readable pickle ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise LayoutError(f"{path}: expected a dict video_id -> captions, got a {type(data).__name__}")
    out = {}
    for video_id, caps in data.items():
        if not isinstance(caps, list):
            raise LayoutError(f"{path}: the captions of {video_id!r} are a {type(caps).__name__}, not a list")
        texts = [" ".join(str(t) for t in c) if isinstance(c, list) else str(c) for c in caps]
        out[str(video_id)] = [" ".join(t.split()) for t in texts if t.strip()]
    return out


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"video", "captions", "split", "id"}` of MSVD's CLIP4Clip splits (see the module docstring)."""
    check_options("msvd", options, OPTIONS)
    files = annotation_files(src, [CAPTIONS, *SPLIT_LISTS.values()])
    if CAPTIONS not in files:
        raise FileNotFoundError(f"{src}: no {CAPTIONS} found (CLIP4Clip's msvd_data.zip holds it with the split "
                                f"lists)")
    splits = {s for s, n in SPLIT_LISTS.items() if n in files}
    if not splits:
        raise FileNotFoundError(f"{src}: no split list ({', '.join(SPLIT_LISTS.values())}) beside {CAPTIONS}")
    require_split(split, splits, src)
    captions = load_captions(files[CAPTIONS])
    index = VideoIndex(media_roots(src, files[CAPTIONS]), VIDEO_FOLDERS, options.get("video_root"))
    records, missing, uncaptioned = [], [], []
    for name in [s for s in SPLIT_LISTS if s in splits and split in (None, s)]:
        lines = files[SPLIT_LISTS[name]].read_text(encoding="utf-8").splitlines()
        for video_id in [x.strip() for x in lines if x.strip()]:
            if not captions.get(video_id):
                uncaptioned.append(video_id)
                continue
            video = index.find(f"{video_id}.avi", video_id)
            if video is None:
                missing.append((SPLIT_LISTS[name], f"{video_id}.avi"))
                continue
            records.append({"video": video, "captions": captions[video_id], "split": name, "id": video_id})
    notes = []
    if uncaptioned:
        notes.append(f"{len(uncaptioned)} listed video(s) have no caption in {CAPTIONS} and were left out "
                     f"(first: {uncaptioned[0]})")
    notes += missing_videos(missing, len(records), index, "YouTubeClips/<video_id>.avi")
    return Imported(records, "video", notes=notes)
