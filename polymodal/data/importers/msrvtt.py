"""`msrvtt`: MSR-VTT in CLIP4Clip's layout (its `msrvtt_data.zip` and the videos), for text-video retrieval.

Layout (as CLIP4Clip's `dataloaders/dataloader_msrvtt_retrieval.py` reads it, ArrowLuo/CLIP4Clip, with the file
names of its README):
- `MSRVTT_JSFUSION_test.csv`: the 1k-A test split (JSFusion's), columns `key,vid_key,video_id,sentence`, one row
  per (video, caption): 1,000 videos with one caption each;
- `MSRVTT_train.9k.csv` / `MSRVTT_train.7k.csv`: one column `video_id`, the training videos of the 9k and 7k splits;
- `MSRVTT_data.json`: the official annotation, `{"videos": [...], "sentences": [{"video_id", "caption",
  "sen_id"}, ...]}`: 20 captions per video, where the training splits take their captions;
- the videos, `<video_id>.mp4` (or another container with that stem), under `MSRVTT_Videos/` (CLIP4Clip's
  README), `videos/all/` (the layout of later CLIP4Clip-based code), or the official archives' `TrainValVideo/` and
  `TestVideo/`.
The annotation files sit anywhere below the root folder given (`msrvtt_data/` in the zip); given one of them
directly, its folder and the folder above are searched for the videos.

Splits: `test` (1k-A: one caption per video), `train9k` and `train7k` (every caption of each video, grouped,
in the order of `MSRVTT_data.json`). Default: every split whose files are present, kept in each record's `split`
(a video of train7k is also in train9k). Records: `{"video", "captions", "split", "id"}` (id = video_id).

Options: `video_root` (a folder holding the videos, searched first and recursively).
"""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from .common import Imported, LayoutError, media_roots, read_json_file, require_split
from .options import check_options
from .videofiles import VideoIndex, annotation_files, missing_videos

TEST_CSV = "MSRVTT_JSFUSION_test.csv"
TRAIN_CSVS = {"train9k": "MSRVTT_train.9k.csv", "train7k": "MSRVTT_train.7k.csv"}
DATA_JSON = "MSRVTT_data.json"
VIDEO_FOLDERS = ["MSRVTT_Videos", "videos/all", "TrainValVideo", "TestVideo", "videos"]
OPTIONS = ("video_root",)


def _csv_rows(path: Path, columns: tuple) -> list[dict]:
    """The rows of a CSV with a header naming at least `columns` (LayoutError naming the file otherwise)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            absent = [c for c in columns if c not in header]
            if absent:
                raise LayoutError(f"{path}: no column {absent[0]!r} (the header has {', '.join(header) or 'nothing'}; "
                                  f"expected {', '.join(columns)})")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _sentences(path: Path) -> dict[str, list[str]]:
    """video_id -> its captions, in file order, from MSRVTT_data.json."""
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise LayoutError(f"{path}: not MSRVTT_data.json (expected an object with a 'sentences' list)")
    out: dict[str, list[str]] = defaultdict(list)
    for k, s in enumerate(data["sentences"]):
        if not isinstance(s, dict) or not isinstance(s.get("caption"), str) or "video_id" not in s:
            raise LayoutError(f"{path}: sentences[{k}] has no 'video_id' / 'caption' string")
        if s["caption"].strip():
            out[str(s["video_id"])].append(s["caption"].strip())
    return out


def read(src, split: str | None = None, **options) -> Imported:
    """Records `{"video", "captions", "split", "id"}` of MSR-VTT's CLIP4Clip splits (see the module docstring)."""
    check_options("msrvtt", options, OPTIONS)
    files = annotation_files(src, [TEST_CSV, *TRAIN_CSVS.values(), DATA_JSON])
    splits = ({"test"} if TEST_CSV in files else set()) | {s for s, n in TRAIN_CSVS.items() if n in files}
    if not splits:
        raise FileNotFoundError(f"{src}: no MSR-VTT split file found (looked for {TEST_CSV}, "
                                f"{', '.join(TRAIN_CSVS.values())}; CLIP4Clip's msrvtt_data.zip holds them)")
    require_split(split, splits, src)
    wanted = [s for s in ("test", "train9k", "train7k") if s in splits and split in (None, s)]
    notes = []
    if any(s != "test" for s in wanted) and DATA_JSON not in files:
        if split is not None:
            raise FileNotFoundError(f"{src}: split {split} takes its captions from {DATA_JSON}, which is not there")
        notes.append(f"{', '.join(s for s in wanted if s != 'test')} left out: {DATA_JSON} (their captions) not found")
        wanted = [s for s in wanted if s == "test"]
        if not wanted:
            raise FileNotFoundError(f"{src}: the training splits take their captions from {DATA_JSON}, which is not "
                                    f"there (CLIP4Clip's msrvtt_data.zip holds it)")
    anchor = files[TEST_CSV] if "test" in wanted else files[TRAIN_CSVS[wanted[0]]]
    index = VideoIndex(media_roots(src, anchor), VIDEO_FOLDERS, options.get("video_root"))
    sentences = _sentences(files[DATA_JSON]) if any(s != "test" for s in wanted) else {}
    records, missing, uncaptioned = [], [], []
    for name in wanted:
        source = files[TEST_CSV if name == "test" else TRAIN_CSVS[name]]
        if name == "test":
            grouped: dict[str, list[str]] = {}
            for row in _csv_rows(source, ("video_id", "sentence")):
                if row["video_id"] and row["sentence"]:
                    grouped.setdefault(row["video_id"], []).append(row["sentence"])
            items = list(grouped.items())
        else:
            ids = [r["video_id"] for r in _csv_rows(source, ("video_id",)) if r["video_id"]]
            uncaptioned += [v for v in ids if not sentences.get(v)]
            items = [(v, list(sentences[v])) for v in ids if sentences.get(v)]
        for video_id, captions in items:
            video = index.find(f"{video_id}.mp4", video_id)
            if video is None:
                missing.append((source.name, f"{video_id}.mp4"))
                continue
            records.append({"video": video, "captions": captions, "split": name, "id": video_id})
    if uncaptioned:
        notes.append(f"{len(uncaptioned)} training video(s) have no caption in {DATA_JSON} and were left out "
                     f"(first: {uncaptioned[0]})")
    notes += missing_videos(missing, len(records), index, "MSRVTT_Videos/<video_id>.mp4")
    return Imported(records, "video", notes=notes)
