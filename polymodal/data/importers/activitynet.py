"""`activitynet`: ActivityNet Captions, for video-paragraph retrieval (and its dense captions kept per sentence).

Layout (the `captions.zip` of the ActivityNet Captions release, as CLIP4Clip's
`dataloaders/dataloader_activitynet_retrieval.py` reads it, ArrowLuo/CLIP4Clip):
- `train.json`, `val_1.json`, `val_2.json`: one object `{"v_<YouTube id>": {"duration": seconds,
  "timestamps": [[start, end], ...], "sentences": ["...", ...]}, ...}`: each video's sentences in time order,
  with their spans in seconds. val_1 and val_2 annotate the same videos twice; the paragraph retrieval protocol
  (CLIP4Clip's "val") uses val_1;
- the videos, `v_<id>.mp4` as the ActivityNet downloads name them, or `<id>.<ext>` (CLIP4Clip drops the `v_`),
  any container, under `Activity_Videos/` (CLIP4Clip's README), `videos/` or the root.

The sentences of a video joined in order with spaces are its paragraph (as CLIP4Clip joins them). Records carry
`captions` (the sentences), `paragraph` (joined), `segments` (the timestamps), `duration`, `split` and `id`
(the `v_<id>` key).

Splits: train, val_1, val_2 (default: every split whose JSON is present, kept in each record's `split`).

Options: `video_root` (a folder holding the videos, searched first and recursively).
"""
from __future__ import annotations

from .common import Imported, LayoutError, media_roots, read_json_file
from .options import check_options
from .videofiles import VideoIndex, annotation_files, missing_videos, paragraph, split_files

SPLIT_FILES = {"train": "train.json", "val_1": "val_1.json", "val_2": "val_2.json"}
VIDEO_FOLDERS = ["Activity_Videos", "videos"]
OPTIONS = ("video_root",)


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"video", "captions", "paragraph", "segments", "duration", "split", "id"}` (see the module doc)."""
    check_options("activitynet", options, OPTIONS)
    files = annotation_files(src, list(SPLIT_FILES.values()))
    wanted = split_files(src, files, SPLIT_FILES, "ActivityNet Captions", split)
    index = VideoIndex(media_roots(src, files[SPLIT_FILES[wanted[0]]]), VIDEO_FOLDERS, options.get("video_root"))
    records, missing = [], []
    for name in wanted:
        path = files[SPLIT_FILES[name]]
        data = read_json_file(path)
        if not isinstance(data, dict):
            raise LayoutError(f"{path}: expected an object v_<id> -> {{duration, timestamps, sentences}}")
        for key, v in data.items():
            if not isinstance(v, dict) or not isinstance(v.get("sentences"), list) or not all(
                    isinstance(s, str) for s in v["sentences"]):
                raise LayoutError(f"{path}: {key!r} has no 'sentences' list of strings")
            timestamps = v.get("timestamps") or []
            if len(timestamps) != len(v["sentences"]):
                raise LayoutError(f"{path}: {key!r} has {len(v['sentences'])} sentences but {len(timestamps)} "
                                  f"timestamps")
            if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, (int, float)) for x in t)
                       for t in timestamps):
                raise LayoutError(f"{path}: {key!r}: each timestamp must be [start, end] in seconds")
            kept = [(" ".join(s.split()), t) for s, t in zip(v["sentences"], timestamps) if s.strip()]
            if not kept:
                continue
            stem = key[2:] if key.startswith("v_") else key
            video = index.find(key, stem)
            if video is None:
                missing.append((path.name, f"{key}.mp4"))
                continue
            captions = [s for s, _ in kept]
            record = {"video": video, "captions": captions, "paragraph": paragraph(captions),
                      "segments": [[float(x) for x in t] for _, t in kept], "split": name, "id": key}
            if isinstance(v.get("duration"), (int, float)):
                record["duration"] = float(v["duration"])
            records.append(record)
    notes = missing_videos(missing, len(records), index, "Activity_Videos/v_<id>.mp4")
    return Imported(records, "video", notes=notes)
