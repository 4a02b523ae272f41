"""What the video readers share: finding a layout's annotation files and indexing its videos by name.

Video datasets ship their clips in containers that vary within one set (DiDeMo mixes .mov, .mp4, .avi, .3gp ...)
and are often re-encoded before use (to .mp4 or .webm, keeping the stem), so a video is found by its file name
or, failing that, by its stem with any video extension. The index walks the layout's known video folders
(recursively) and the root folder itself (not below), and first the folder given as the `video_root` option
(recursively).
"""
from __future__ import annotations

from pathlib import Path

from .common import LayoutError, require_split

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv", ".3gp", ".3g2", ".wmv",
                  ".flv", ".mts", ".m2ts", ".ts", ".vob")


def annotation_files(src, names: list[str]) -> dict[str, Path]:
    """{name: path} of the layout files `names` present: beside `src` when it is a file, else found under the folder
    `src` (any depth; the first in sorted order)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist (give the dataset's root folder or one of its "
                                f"annotation files: {', '.join(names)})")
    if src.is_file():
        return {n: src.parent / n for n in names if (src.parent / n).is_file()}
    found = {}
    for n in names:
        hits = sorted(p for p in src.rglob(n) if p.is_file())
        if hits:
            found[n] = hits[0]
    return found


def split_files(src, files: dict[str, Path], split_files: dict[str, str], dataset: str, split: str | None) -> list:
    """The splits to read, in `split_files` order: those whose annotation file is present and that `split` asks for
    (None = all).

    Raises:
        FileNotFoundError: no split's file is present (naming the files looked for).
        LayoutError: `split` is not among the present ones.
    """
    present = {s for s, n in split_files.items() if n in files}
    if not present:
        raise FileNotFoundError(f"{src}: no {dataset} annotation file found (looked for "
                                f"{', '.join(split_files.values())})")
    require_split(split, present, src)
    return [s for s in split_files if s in present and split in (None, s)]


class VideoIndex:
    """Videos under a layout's roots, by file name and by stem (see the module docstring).

    Args:
        roots: the dataset root (or an annotation file's folder and the one above).
        folders: the layout's video folders under a root, walked recursively when present.
        video_root: a folder given by the user (the `video_root` option), walked first.
    """

    def __init__(self, roots, folders: list[str], video_root=None):
        self.by_name: dict[str, str] = {}
        self.by_stem: dict[str, str] = {}
        self.searched: list[str] = []
        if video_root is not None:
            video_root = Path(video_root)
            if not video_root.is_dir():
                raise FileNotFoundError(f"video_root {video_root} is not a folder")
            self._add(video_root.rglob("*"), video_root)
        for root in [Path(r) for r in roots]:
            for folder in folders:
                if (root / folder).is_dir():
                    self._add((root / folder).rglob("*"), root / folder)
            if root.is_dir():
                self._add(root.iterdir(), root)

    def _add(self, paths, where: Path) -> None:
        self.searched.append(str(where))
        for p in sorted(paths):
            if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
                path = str(p.resolve())
                self.by_name.setdefault(p.name, path)
                self.by_stem.setdefault(p.stem, path)

    def __len__(self) -> int:
        return len(self.by_name)

    def find(self, *names: str) -> str | None:
        """The first of `names` found as a file name, else as a stem (with its own extension dropped when it has a
        video one); None when none is there."""
        for name in names:
            if name in self.by_name:
                return self.by_name[name]
        for name in names:
            stem = name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in VIDEO_SUFFIXES else name
            for key in (stem, name):             # "a.mov" re-encoded as "a.mp4", or as "a.mov.mp4"
                if key in self.by_stem:
                    return self.by_stem[key]
        return None


def missing_videos(missing: list[tuple[str, str]], found: int, index: VideoIndex, hint: str) -> list[str]:
    """Notes for videos listed but absent; LayoutError when none of the listed videos was found.

    Args:
        missing: (annotation file name, video name) of each video looked up in vain.
        found: how many records kept a video.
        index: the index searched (its folders are named in the error).
        hint: where the layout keeps its videos, e.g. "MSRVTT_Videos/<video_id>.mp4".
    """
    if not missing:
        return []
    where = " and ".join(dict.fromkeys(f for f, _ in missing))
    if not found:
        searched = ", ".join(index.searched) or "nothing"
        raise LayoutError(f"{where}: none of the {len(missing)} listed videos was found (first: {missing[0][1]}; "
                          f"searched {searched}); put them in {hint} or give -o video_root=FOLDER")
    return [f"{len(missing)} video(s) listed in {where} were not found and were left out (first: {missing[0][1]})"]


def paragraph(sentences: list[str]) -> str:
    """The sentences of a video joined in order with single spaces (the paragraph of video-paragraph retrieval)."""
    return " ".join(" ".join(s.split()) for s in sentences if s.strip())


__all__ = ["VIDEO_SUFFIXES", "VideoIndex", "annotation_files", "missing_videos", "paragraph", "split_files"]
