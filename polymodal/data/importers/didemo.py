"""`didemo`: DiDeMo (Distinct Describable Moments) in CLIP4Clip's layout, for video-paragraph retrieval.

Layout (as CLIP4Clip's `dataloaders/dataloader_didemo_retrieval.py` reads it, ArrowLuo/CLIP4Clip; the annotation
files are those of LisaAnne/LocalizingMoments, the split lists those of collaborative-experts):
- `train_data.json`, `val_data.json`, `test_data.json`: a list of moments `{"video": "<flickr name>.<ext>",
  "description": "...", "times": [[start, end], ...], ...}`; `times` holds each annotator's choice of 5-second
  chunks (indices 0-5, end inclusive), so a moment spans [mean start * 5, (mean end + 1) * 5] seconds;
- optional `train_list.txt`, `val_list.txt`, `test_list.txt` (one video name a line): when present, only the
  listed videos are kept, as CLIP4Clip does;
- the videos, in the mixed containers Flickr served (.mov, .mp4, .avi, .m4v, .3gp ...) or re-encoded: a video is
  found by its name, else by its stem with any video extension, under `DiDeMo_Videos/` (CLIP4Clip's README),
  `videos/` or the root.

Each video's descriptions, in file order, are its sentences; CLIP4Clip's paragraph protocol joins them with
spaces. Records carry both, `captions` (the sentences) and `paragraph` (joined), plus `segments` (each sentence's
[start, end] in seconds, from `times` as above), `split` and `id` (the `video` name).

Splits: train, val, test (default: every split whose JSON is present, kept in each record's `split`).

Options: `video_root` (a folder holding the videos, searched first and recursively).
"""
from __future__ import annotations

from .common import Imported, LayoutError, media_roots, read_json_file
from .options import check_options
from .videofiles import VideoIndex, annotation_files, missing_videos, paragraph, split_files

SPLIT_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}
SPLIT_LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
VIDEO_FOLDERS = ["DiDeMo_Videos", "videos"]
CHUNK_SECONDS = 5.0
OPTIONS = ("video_root",)


def _segment(times, where: str) -> list[float]:
    """[start, end] seconds of a moment from its annotators' chunk choices."""
    if not isinstance(times, list) or not times or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                        for x in t) for t in times):
        raise LayoutError(f"{where}: 'times' must be a list of [start, end] chunk pairs, got {times!r}")
    start = sum(float(t[0]) for t in times) / len(times)
    end = sum(float(t[1]) for t in times) / len(times)
    return [start * CHUNK_SECONDS, (end + 1) * CHUNK_SECONDS]


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"video", "captions", "paragraph", "segments", "split", "id"}` of DiDeMo (see the module docstring)."""
    check_options("didemo", options, OPTIONS)
    files = annotation_files(src, [*SPLIT_FILES.values(), *SPLIT_LISTS.values()])
    wanted = split_files(src, files, SPLIT_FILES, "DiDeMo", split)
    index = VideoIndex(media_roots(src, files[SPLIT_FILES[wanted[0]]]), VIDEO_FOLDERS, options.get("video_root"))
    records, missing, notes = [], [], []
    for name in wanted:
        path = files[SPLIT_FILES[name]]
        moments = read_json_file(path)
        if not isinstance(moments, list):
            raise LayoutError(f"{path}: expected a list of moments {{video, description, times}}")
        listed = None
        if SPLIT_LISTS[name] in files:
            lines = files[SPLIT_LISTS[name]].read_text(encoding="utf-8").splitlines()
            listed = {x.strip() for x in lines if x.strip()}
        videos: dict[str, dict] = {}
        unlisted = set()
        for k, m in enumerate(moments):
            where = f"{path} [{k}]"
            if not isinstance(m, dict) or not isinstance(m.get("video"), str) or not isinstance(
                    m.get("description"), str):
                raise LayoutError(f"{where}: a moment needs 'video' and 'description' strings")
            if listed is not None and m["video"] not in listed:
                unlisted.add(m["video"])
                continue
            if not m["description"].strip():
                continue
            v = videos.setdefault(m["video"], {"captions": [], "segments": []})
            v["captions"].append(" ".join(m["description"].split()))
            v["segments"].append(_segment(m.get("times"), where))
        if unlisted:
            notes.append(f"{len(unlisted)} video(s) of {path.name} are not in {SPLIT_LISTS[name]} and were left out")
        for video_name, v in videos.items():
            video = index.find(video_name)
            if video is None:
                missing.append((path.name, video_name))
                continue
            records.append({"video": video, "captions": v["captions"], "paragraph": paragraph(v["captions"]),
                            "segments": v["segments"], "split": name, "id": video_name})
    notes += missing_videos(missing, len(records), index, "DiDeMo_Videos/<video name>")
    return Imported(records, "video", notes=notes)
