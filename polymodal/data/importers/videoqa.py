"""`msrvtt-qa` and `msvd-qa`: the open-ended video QA sets of Xu et al. (ACM MM 2017), as video QA records.

Layout (as xudejing/video-question-answering releases them and the public MSRVTT-QA / MSVD-QA loaders read them):
- `train_qa.json`, `val_qa.json`, `test_qa.json`: a JSON list of `{"question", "answer", "video_id", "id",
  "category_id"}` (one answer per question);
- MSRVTT-QA: `video_id` N is MSR-VTT's `video<N>.mp4` (under `video/`, `videos/`, `MSRVTT_Videos/` or the root);
- MSVD-QA: `video_id` N is `vid<N>` of `youtube_mapping.txt` (lines `<youtube clip name> vid<N>`), whose clip is
  `YouTubeClips/<clip name>.avi`.
Re-releases that give the video by name (`"video": "video7010.mp4"`) instead of `video_id` are read too.

Splits: train, val, test (the files present; all by default). Records: `{"video", "question", "answer", "answers":
[answer], "question_type", "question_id", "split"}`; `question_type` is the question's first word (what, who, how,
when, where: the types these sets report accuracy by).

Options: `video_root` (a folder holding the videos, searched first and recursively).
"""
from __future__ import annotations

from .common import Imported, LayoutError, media_roots, read_json_file
from .options import check_options
from .textvqa import first_word
from .videofiles import VideoIndex, annotation_files, missing_videos, split_files

FILES = {"train": "train_qa.json", "val": "val_qa.json", "test": "test_qa.json"}
MAPPING = "youtube_mapping.txt"
FOLDERS = {"msrvtt-qa": ["video", "videos", "MSRVTT_Videos", "TrainValVideo", "TestVideo"],
           "msvd-qa": ["YouTubeClips", "video", "videos", "MSVD_Videos"]}
OPTIONS = ("video_root",)


def _mapping(path) -> dict[str, str]:
    """MSVD-QA's `vid<N>` -> YouTube clip name, from youtube_mapping.txt."""
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise LayoutError(f"{path} line {n}: expected '<clip name> vid<N>', got {line!r}")
        out[parts[1]] = parts[0]
    return out


def _read(fmt: str, src, split: str | None, options: dict) -> Imported:
    check_options(fmt, options, OPTIONS)
    files = annotation_files(src, [*FILES.values(), MAPPING])
    splits = split_files(src, files, FILES, fmt.upper(), split)
    mapping = _mapping(files[MAPPING]) if fmt == "msvd-qa" and MAPPING in files else None
    index = VideoIndex(media_roots(src, files[FILES[splits[0]]]), FOLDERS[fmt], options.get("video_root"))
    records, missing = [], []
    for name in splits:
        path = files[FILES[name]]
        rows = read_json_file(path)
        if not isinstance(rows, list):
            raise LayoutError(f"{path}: not a video QA file (expected a JSON list of {{question, answer, video_id}})")
        for k, r in enumerate(rows):
            if not isinstance(r, dict) or "question" not in r or "answer" not in r or not ({"video_id", "video"} & set(r)):
                raise LayoutError(f"{path}: entry [{k}] needs question, answer and video_id (or video)")
            if "video" in r:
                names = [str(r["video"])]
            elif fmt == "msrvtt-qa":
                names = [f"video{r['video_id']}.mp4"]
            else:
                vid = f"vid{r['video_id']}"
                if mapping is not None and vid not in mapping:
                    raise LayoutError(f"{path}: entry [{k}]: {vid} is not in {MAPPING}")
                names = [f"{mapping[vid]}.avi"] if mapping is not None else [vid]
            video = index.find(*names)
            if video is None:
                missing.append((path.name, names[0]))
                continue
            answer = str(r["answer"])
            records.append({"video": video, "question": r["question"], "answer": answer, "answers": [answer],
                            "question_type": first_word(r["question"]), "question_id": r.get("id", k),
                            "split": name})
    notes = []
    if fmt == "msvd-qa" and mapping is None and any("video_id" in r for r in rows):
        notes.append(f"no {MAPPING} found: video ids were looked up as vid<N> file names")
    hint = "video/video<N>.mp4" if fmt == "msrvtt-qa" else "YouTubeClips/<clip name>.avi"
    notes += missing_videos(missing, len(records), index, hint)
    return Imported(records, "videoqa", notes=notes)


def read_msrvtt_qa(src, split: str | None = None, **options) -> Imported:
    """MSRVTT-QA records (see the module docstring)."""
    return _read("msrvtt-qa", src, split, options)


def read_msvd_qa(src, split: str | None = None, **options) -> Imported:
    """MSVD-QA records (see the module docstring)."""
    return _read("msvd-qa", src, split, options)
