"""Video reading with PyAV: frame sampling strategies and clear errors.

``read_video(path, num_frames=8, strategy=...)`` returns a :class:`VideoClip` of T frames:

- ``"uniform"``: the clip is split into T equal segments of time; from each, the frame whose
  presentation time is nearest the segment's centre (or a seeded random point of the segment
  with ``jitter=True``). Frames are chosen by timestamp, so variable frame rate does not skew
  the choice, and reached by seeking to the preceding key frame and decoding forward, so they
  are exactly the frames a full sequential decode gives.
- ``"keyframes"``: the codec's key frames only (the decoder skips all other frames), spread
  evenly over the clip when there are more than T.
- ``"scene"``: the frames where the picture changes most (see :func:`_read_scene`).

Anything PyAV opens works (mp4, mkv, webm, avi, animated GIF ...), and so does a folder of
frame images (sorted by name, ``folder_fps`` frames per second). Bad inputs raise
:class:`VideoError` with a ``reason`` tag a skip policy can count; PyAV's own exceptions never
leak out.

Videos decoded once into tar shards of frames (``polymodal data frames``) live in
:mod:`polymodal.data.frame_shards`.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["VideoError", "VideoClip", "read_video", "video_info", "check_read_args", "STRATEGIES"]

STRATEGIES = ("uniform", "keyframes", "scene")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SCENE_THUMB = 32          # side of the thumbnails the scene score compares

# Reasons a video can be rejected for (VideoError.reason; the keys of skip counts).
MISSING = "missing"
EMPTY = "empty"
UNREADABLE = "unreadable"
NO_VIDEO_STREAM = "no_video_stream"
NO_FRAMES = "no_frames"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
BAD_FIELD = "bad_field"          # a manifest record's 'video' is not a path (same tag as manifests.py)

_HINTS = {
    MISSING: "check the path (relative paths are taken from the manifest's folder)",
    EMPTY: "the file has no content; re-download or re-export it",
    UNREADABLE: "it is not a video FFmpeg can open; re-encode it, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
    NO_VIDEO_STREAM: "the file holds no video (audio only?); point the record at a video file",
    NO_FRAMES: "the video stream holds no frames; re-encode or drop the file",
    TRUNCATED: "the file looks cut short (unfinished recording or download); re-download or re-encode it",
    DECODE_ERROR: "the video data is corrupt there; re-encode the file, e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`",
    BAD_FIELD: "write the record's 'video' as a path to a video file or frame folder",
}

# Leading bytes of containers we can name: a file that starts like one but does not open is cut short.
_SIGNATURES = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"), (0, b"GIF8"), (0, b"OggS"), (0, b"FLV"))


class VideoError(ValueError):
    """A video cannot be read. The message names the file (and the time, mid-stream) and a fix.

    Attributes:
        path: the file or folder.
        reason: short tag (``"missing"``, ``"empty"``, ``"unreadable"``, ``"no_video_stream"``,
            ``"no_frames"``, ``"truncated"``, ``"decode_error"``) for counting skipped records.
        time: seconds into the video where it failed, or None.
    """

    def __init__(self, path: str, reason: str, detail: str, time: float | None = None):
        self.path, self.reason, self.detail, self.time = path, reason, detail, time
        where = f"{path} at {time:.3f} s" if time is not None else path
        super().__init__(f"{where}: {detail} [{reason}]; {_HINTS.get(reason, '')}".rstrip("; "))


@dataclass
class VideoClip:
    """T frames sampled from a video.

    Attributes:
        frames: uint8 (T, H, W, 3) RGB.
        times: float64 (T,) presentation time of each frame in seconds (as stored in the file).
        valid: bool (T,); False marks a frame that repeats an earlier one (padding when the
            video has fewer frames than asked for).
        duration: seconds from the first frame's start to the last frame's end.
        source: the file or folder read.
    """

    frames: torch.Tensor
    times: torch.Tensor
    valid: torch.Tensor
    duration: float
    source: str

    def __len__(self) -> int:
        return len(self.frames)

    def pixels(self, transform) -> torch.Tensor:
        """The frames through an image transform (PIL image -> (3, H, W) tensor): (T, 3, H, W)."""
        from PIL import Image
        return torch.stack([transform(Image.fromarray(f.numpy())) for f in self.frames])

    @classmethod
    def from_frames(cls, frames: list[np.ndarray], times, valid, duration: float, source: str) -> "VideoClip":
        """A clip from decoded frames.

        Args:
            frames: T uint8 (H, W, 3) RGB arrays of one size.
            times: T presentation times in seconds.
            valid: T booleans (False: a padding repeat).
            duration: seconds the clip spans.
            source: the file or folder read.

        Returns:
            the clip, frames stacked to (T, H, W, 3).
        """
        return cls(frames=torch.from_numpy(np.stack(frames)), times=torch.tensor(times, dtype=torch.float64),
                   valid=torch.as_tensor(np.asarray(valid, dtype=bool)), duration=float(duration), source=source)


# ----------------------------------------------------------------------------------------
# Small pure helpers
# ----------------------------------------------------------------------------------------
def _output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) after shrinking so the longer side is at most `max_side` (aspect kept)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _nearest(times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the entry of sorted `times` nearest each target (ties go to the earlier one)."""
    right = np.clip(np.searchsorted(times, targets), 0, len(times) - 1)
    left = np.clip(right - 1, 0, len(times) - 1)
    take_left = np.abs(targets - times[left]) <= np.abs(times[right] - targets)
    return np.where(take_left, left, right)


def _uniform_targets(start: float, end: float, num_frames: int, jitter: bool, seed: int) -> np.ndarray:
    """T times: the centre of each of T equal segments of [start, end), or a seeded random point in it."""
    offsets = np.random.default_rng(seed).random(num_frames) if jitter else np.full(num_frames, 0.5)
    return start + (np.arange(num_frames) + offsets) * (end - start) / num_frames


def _spread(n: int, num_frames: int) -> np.ndarray:
    """T indices into n < T items, each repeated in place so the order stays by time."""
    return (np.arange(num_frames) * n) // num_frames


def _even(n: int, num_frames: int) -> np.ndarray:
    """T indices spread evenly over n items (the centres of T equal index segments); pads if n < T."""
    if n <= num_frames:
        return _spread(n, num_frames)
    return ((np.arange(num_frames) + 0.5) * n / num_frames).astype(np.int64)


def _first_occurrence(indices: np.ndarray) -> np.ndarray:
    """True where an index is seen for the first time (later repeats are padding)."""
    seen: set[int] = set()
    out = np.zeros(len(indices), dtype=bool)
    for i, v in enumerate(indices.tolist()):
        out[i] = v not in seen
        seen.add(v)
    return out


def _clip(frames: list[np.ndarray], times: list[float], valid, duration: float, source: str) -> VideoClip:
    return VideoClip.from_frames(frames, times, valid, duration, source)


def check_read_args(num_frames: int, strategy: str) -> None:
    """Raise ValueError unless `num_frames` >= 1 and `strategy` is one of :data:`STRATEGIES`."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


# ----------------------------------------------------------------------------------------
# Opening files; PyAV errors become VideoError
# ----------------------------------------------------------------------------------------
def _looks_like_container(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    return any(head[off:off + len(sig)] == sig for off, sig in _SIGNATURES)


def _open(path: str):
    """Open `path` with PyAV; return (container, video stream)."""
    import av

    if not os.path.exists(path):
        raise VideoError(path, MISSING, "file not found")
    if os.path.getsize(path) == 0:
        raise VideoError(path, EMPTY, "the file is empty (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.FFmpegError as e:
        # A known container signature that FFmpeg cannot open usually means its index (an mp4
        # 'moov' box, written last) is missing because the file was cut short.
        reason = TRUNCATED if _looks_like_container(path) else UNREADABLE
        raise VideoError(path, reason, f"FFmpeg cannot open it ({_av_message(e)})") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise VideoError(path, UNREADABLE, f"cannot open it ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise VideoError(path, NO_VIDEO_STREAM, f"no video stream (has: {', '.join(kinds)})")
    return container, container.streams.video[0]


def _av_message(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


@dataclass
class _Index:
    """What one demux pass (no decoding) tells about a video stream."""

    pts: np.ndarray          # (N,) int64 presentation timestamps, sorted
    key_pts: np.ndarray      # (K,) int64 timestamps of key packets, sorted
    end_pts: int             # end of the last frame
    time_base: float


def _declared_end(container, stream) -> float | None:
    """The stream's end time as the header declares it (None if unknown)."""
    if stream.duration and stream.time_base:
        start = stream.start_time or 0
        return float((start + stream.duration) * stream.time_base)
    if container.duration and len(container.streams) == 1:     # several streams: the longest decides
        return container.duration / 1e6
    return None


def _scan(path: str, container, stream) -> _Index | None:
    """Demux the stream once (cheap: no decoding). None when packets carry no timestamps."""
    import av

    pts, keys, ends = [], [], []
    tb = float(stream.time_base)
    try:
        for packet in container.demux(stream):
            if packet.size == 0:                      # the flush packet at the end
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            ends.append(packet.pts + (packet.duration or 0))
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError as e:
        at = max(pts) * tb if pts else 0.0
        raise VideoError(path, TRUNCATED, f"reading stops ({_av_message(e)})", at) from None
    if not pts:
        declared = _declared_end(container, stream)
        if declared:
            raise VideoError(path, TRUNCATED, f"no complete frame although {declared:.3f} s are declared", 0.0)
        raise VideoError(path, NO_FRAMES, "the video stream holds no frames")
    order = np.sort(np.asarray(pts, dtype=np.int64))
    end = max(ends)
    if end <= order[-1]:                              # no packet durations: add a typical frame gap
        end = int(order[-1] + (np.median(np.diff(order)) if len(order) > 1 else 1))
    index = _Index(order, np.sort(np.asarray(keys or [order[0]], dtype=np.int64)), int(end), tb)
    _check_complete(path, stream, container, index)
    return index


def _check_complete(path: str, stream, container, index: _Index) -> None:
    """Raise TRUNCATED when the header promises clearly more than the packets hold."""
    last = float(index.pts[-1]) * index.time_base
    if stream.frames and len(index.pts) < stream.frames:
        raise VideoError(path, TRUNCATED, f"{len(index.pts)} of {stream.frames} frames present", last)
    declared = _declared_end(container, stream)
    if declared is not None:
        gap = float(np.median(np.diff(index.pts))) * index.time_base if len(index.pts) > 1 else 0.0
        if declared - index.end_pts * index.time_base > max(0.5, 3 * gap):
            raise VideoError(path, TRUNCATED, f"frames end at {index.end_pts * index.time_base:.3f} s of "
                                              f"{declared:.3f} s declared", last)


def _frames(path: str, container, stream) -> Iterator[Any]:
    """Decode `stream` from the container's current position; decode errors become VideoError."""
    import av

    last = None
    try:
        for frame in container.decode(stream):
            last = frame.time
            yield frame
    except av.FFmpegError as e:
        at = last if last is not None else 0.0
        raise VideoError(path, DECODE_ERROR, f"decoding fails ({_av_message(e)})", at) from None


class _RGB:
    """Decoded frames -> (H, W, 3) uint8 RGB arrays, shrunk to `max_side` or to a given size.

    Keeps one reformatter per output size: ``frame.to_ndarray`` builds a new scaler context for
    every frame, which costs about 1 ms at 224x224, ten times the conversion itself.
    """

    def __init__(self, max_side: int | None):
        self.max_side = max_side
        self.reformatters: dict[tuple[int, int], Any] = {}

    def __call__(self, frame, size: tuple[int, int] | None = None) -> np.ndarray:
        from av.video.reformatter import VideoReformatter

        width, height = size or _output_size(frame.width, frame.height, self.max_side)
        if (width, height) not in self.reformatters:
            self.reformatters[width, height] = VideoReformatter()
        return self.reformatters[width, height].reformat(frame, format="rgb24", width=width,
                                                         height=height).to_ndarray()


def _frame_time(frame, i: int, stream) -> float:
    if frame.time is not None:
        return float(frame.time)
    rate = stream.average_rate or stream.guessed_rate or 25
    return i / float(rate)


# ----------------------------------------------------------------------------------------
# Strategies on files
# ----------------------------------------------------------------------------------------
class _Source:
    """An open video file: container, its first video stream, and a rewind that never fails.

    Strategies make one demux pass (`_scan`) and then decode; going back to the start is a
    seek, and where a format cannot seek the file is simply opened again.
    """

    def __init__(self, path: str):
        self.path = path
        self.container, self.stream = _open(path)

    def rewind(self) -> None:
        import av

        try:
            self.container.seek(0)
        except (av.FFmpegError, OSError):
            self.container.close()
            self.container, self.stream = _open(self.path)

    def frames(self) -> Iterator[Any]:
        return _frames(self.path, self.container, self.stream)

    def scan(self) -> _Index | None:
        return _scan(self.path, self.container, self.stream)

    def close(self) -> None:
        self.container.close()


def _read_uniform_sequential(src: _Source, num_frames, jitter, seed, max_side) -> VideoClip:
    """Uniform sampling by a full decode from the start (fallback when timestamps or seeking fail)."""
    rgb = _RGB(max_side)
    src.rewind()
    arrays, times = [], []
    for i, frame in enumerate(src.frames()):
        arrays.append(rgb(frame))
        times.append(_frame_time(frame, i, src.stream))
    if not arrays:
        raise VideoError(src.path, NO_FRAMES, "no frame decodes")
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    t = t[order]
    gap = float(np.median(np.diff(t))) if len(t) > 1 else 1.0 / float(src.stream.average_rate or 25)
    picks = _nearest(t, _uniform_targets(t[0], t[-1] + gap, num_frames, jitter, seed))
    return _clip([arrays[order[i]] for i in picks], t[picks].tolist(), _first_occurrence(picks),
                 t[-1] + gap - t[0], src.path)


def _decode_at(src: _Source, index: _Index, targets: list[int], max_side) -> dict[int, np.ndarray] | None:
    """Frames at the given pts (sorted, unique): seek to each one's key frame, decode forward.

    Targets sharing a key frame are served by one seek. Returns None when the container does
    not land where asked (the caller then decodes sequentially).
    """
    import av

    rgb = _RGB(max_side)
    out: dict[int, np.ndarray] = {}
    current_key, frames = None, None
    for target in targets:
        key = int(index.key_pts[max(0, np.searchsorted(index.key_pts, target, side="right") - 1)])
        if frames is None or key != current_key:
            try:
                src.container.seek(key, stream=src.stream, backward=True, any_frame=False)
            except (av.FFmpegError, OSError):
                return None
            frames, current_key = src.frames(), key
        for frame in frames:
            if frame.pts is None:
                return None
            if frame.pts < target:
                continue
            if frame.pts > target:              # overshot: the seek landed after the key frame
                return None
            out[target] = rgb(frame)
            break
        else:
            return None
    return out


def _read_uniform(src: _Source, num_frames, jitter, seed, max_side) -> VideoClip:
    index = src.scan()
    if index is None:
        return _read_uniform_sequential(src, num_frames, jitter, seed, max_side)
    tb = index.time_base
    times = index.pts * tb
    picks = _nearest(times, _uniform_targets(times[0], index.end_pts * tb, num_frames, jitter, seed))
    wanted = sorted({int(index.pts[i]) for i in picks})
    got = _decode_at(src, index, wanted, max_side)
    if got is None or len(got) != len(wanted):
        return _read_uniform_sequential(src, num_frames, jitter, seed, max_side)
    return _clip([got[int(index.pts[i])] for i in picks], times[picks].tolist(), _first_occurrence(picks),
                 (index.end_pts - index.pts[0]) * tb, src.path)


def _read_keyframes(src: _Source, num_frames, max_side) -> VideoClip:
    """Key frames only: the decoder skips every other frame (``skip_frame = "NONKEY"``).

    A demux pass counts the key packets first, so only the T chosen key frames are converted
    to RGB; if the decoder's key frames differ from the packet flags, a second pass picks
    from the key frames it actually returned.
    """
    rgb = _RGB(max_side)
    index = src.scan()
    duration = (index.end_pts - index.pts[0]) * index.time_base if index is not None else None

    def decode(wanted: set[int] | None) -> tuple[list[int], dict[int, np.ndarray], list[float]]:
        src.rewind()
        src.stream.codec_context.skip_frame = "NONKEY"
        seen, kept, times = [], {}, []
        for i, frame in enumerate(src.frames()):
            seen.append(i)
            times.append(_frame_time(frame, i, src.stream))
            if wanted is None or i in wanted:
                kept[i] = rgb(frame)
        return seen, kept, times

    expected = len(index.key_pts) if index is not None else 0
    picks = _even(expected, num_frames) if expected else None
    seen, kept, times = decode(set(picks.tolist()) if picks is not None else None)
    if not seen:
        raise VideoError(src.path, NO_FRAMES, "no key frame decodes")
    if len(seen) != expected:                 # the decoder disagrees with the packet flags
        picks = _even(len(seen), num_frames)
        if not all(i in kept for i in picks.tolist()):
            seen, kept, times = decode(set(picks.tolist()))
    if duration is None:
        duration = times[-1] - times[0]
    return _clip([kept[i] for i in picks], [times[i] for i in picks], _first_occurrence(picks), duration, src.path)


def _scene_score(prev: np.ndarray | None, thumb: np.ndarray) -> float:
    if prev is None:
        return float("inf")
    return float(np.abs(thumb.astype(np.int16) - prev.astype(np.int16)).mean())


def _top_scene(items: Iterator[tuple[np.ndarray, Any]], num_frames: int, full) -> tuple[list, int]:
    """Keep the T highest-scoring frames of a stream in a heap (bounded memory).

    `items` yields (thumbnail, handle); `full(handle)` makes the array kept for a frame.
    Returns (kept frames in time order as (index, array), number of frames seen).
    """
    heap: list[tuple[float, int, np.ndarray]] = []
    prev, n = None, 0
    for i, (thumb, handle) in enumerate(items):
        score = _scene_score(prev, thumb)
        prev, n = thumb, i + 1
        entry = (score, -i)                      # ties: the earlier frame wins
        if len(heap) < num_frames:
            heapq.heappush(heap, (*entry, full(handle)))
        elif entry > heap[0][:2]:
            heapq.heapreplace(heap, (*entry, full(handle)))
    return sorted(((-neg, arr) for _, neg, arr in heap), key=lambda x: x[0]), n


def _read_scene(src: _Source, num_frames, max_side) -> VideoClip:
    """Scene-change sampling: every frame is decoded and shrunk to a 32x32 thumbnail whose mean
    absolute difference to the previous thumbnail is its score (the first frame always counts);
    the T highest-scoring frames are returned in time order, so cuts and big motion win."""
    rgb = _RGB(max_side)
    src.scan()                                    # only to notice a truncated file
    src.rewind()
    times: list[float] = []

    def items():
        for i, frame in enumerate(src.frames()):
            times.append(_frame_time(frame, i, src.stream))
            yield rgb(frame, (SCENE_THUMB, SCENE_THUMB)), frame

    kept, n = _top_scene(items(), num_frames, rgb)
    if n == 0:
        raise VideoError(src.path, NO_FRAMES, "no frame decodes")
    gap = float(np.median(np.diff(times))) if n > 1 else 1.0 / float(src.stream.average_rate or 25)
    return _pad_sorted(kept, times, num_frames, times[-1] + gap - times[0], src.path)


def _pad_sorted(kept: list, times: list[float], num_frames: int, duration: float, path: str) -> VideoClip:
    """Clip from (index, array, ...) items in time order, padded by in-place repeats to T."""
    picks = _spread(len(kept), num_frames) if len(kept) < num_frames else np.arange(num_frames)
    return _clip([kept[j][1] for j in picks], [times[kept[j][0]] for j in picks], _first_occurrence(picks),
                 duration, path)


# ----------------------------------------------------------------------------------------
# Folders of frame images
# ----------------------------------------------------------------------------------------
def _folder_files(path: str) -> list[str]:
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."))
    if not names:
        raise VideoError(path, EMPTY, f"the folder holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
    return [os.path.join(path, n) for n in names]


def _load_image(path: str, folder: str, index: int, fps: float, max_side: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError ...)
        raise VideoError(folder, UNREADABLE, f"frame image {os.path.basename(path)} cannot be read "
                                             f"({type(e).__name__}: {e})", index / fps) from None
    size = _output_size(im.width, im.height, max_side)
    if size != im.size:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _read_folder(path, num_frames, strategy, jitter, seed, max_side, fps) -> VideoClip:
    from PIL import Image

    files = _folder_files(path)
    n = len(files)
    times = np.arange(n) / fps
    load = lambda i: _load_image(files[i], path, i, fps, max_side)  # noqa: E731
    if strategy == "uniform":
        picks = _nearest(times, _uniform_targets(0.0, n / fps, num_frames, jitter, seed))
    elif strategy == "keyframes":                 # still images: every frame is a key frame
        picks = _even(n, num_frames)
    else:
        def items():
            for i in range(n):
                arr = load(i)
                yield np.asarray(Image.fromarray(arr).resize((SCENE_THUMB, SCENE_THUMB), Image.BILINEAR)), arr
        kept, _ = _top_scene(items(), num_frames, lambda arr: arr)
        return _pad_sorted(kept, times.tolist(), num_frames, n / fps, path)
    cache = {i: load(i) for i in sorted(set(picks.tolist()))}
    return _clip([cache[i] for i in picks], times[picks].tolist(), _first_occurrence(picks), n / fps, path)


# ----------------------------------------------------------------------------------------
# Public reading API
# ----------------------------------------------------------------------------------------
def read_video(
    path: str | os.PathLike,
    num_frames: int = 8,
    strategy: str = "uniform",
    jitter: bool = False,
    seed: int = 0,
    max_side: int | None = None,
    folder_fps: float = 1.0,
) -> VideoClip:
    """Read T frames of a video file (any format PyAV decodes, animated GIF) or a frame folder.

    Args:
        path: the video file, or a folder of frame images (sorted by name).
        num_frames: T, frames returned; shorter videos repeat frames (``valid`` False).
        strategy: ``"uniform"`` (segment centres by time), ``"keyframes"`` (codec key frames)
            or ``"scene"`` (largest content changes); see the module docstring.
        jitter: uniform only: a random point of each segment instead of its centre.
        seed: seeds the jitter (same seed, same frames).
        max_side: shrink frames on decode so the longer side is at most this (aspect kept).
        folder_fps: frames per second of a frame folder (times = index / folder_fps).

    Returns:
        a :class:`VideoClip` with T frames in time order.

    Raises:
        VideoError: the video is missing, empty, unreadable, truncated or has no video stream.
    """
    check_read_args(num_frames, strategy)
    path = os.fspath(path)
    if os.path.isdir(path):
        if folder_fps <= 0:
            raise ValueError(f"folder_fps must be > 0, got {folder_fps}")
        return _read_folder(path, num_frames, strategy, jitter, seed, max_side, folder_fps)
    src = _Source(path)
    try:
        if strategy == "uniform":
            return _read_uniform(src, num_frames, jitter, seed, max_side)
        if strategy == "keyframes":
            return _read_keyframes(src, num_frames, max_side)
        return _read_scene(src, num_frames, max_side)
    finally:
        src.close()


def video_info(path: str | os.PathLike, count_keyframes: bool = True, folder_fps: float = 1.0) -> dict:
    """Basic facts about a video file or frame folder.

    Args:
        path: the video file or frame folder.
        count_keyframes: demux the file once (no decoding) to count frames and key frames.
        folder_fps: frames per second of a frame folder.

    Returns:
        dict with ``duration`` (s), ``num_frames`` (None if unknown), ``fps``, ``width``,
        ``height``, ``codec`` and ``num_keyframes`` (None unless counted).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = _folder_files(path)
        from PIL import Image
        with Image.open(files[0]) as im:
            width, height = im.size
        return {"duration": len(files) / folder_fps, "num_frames": len(files), "fps": float(folder_fps), "width": width,
                "height": height, "codec": "images", "num_keyframes": len(files)}
    container, stream = _open(path)
    try:
        rate = stream.average_rate or stream.guessed_rate
        info = {"duration": _declared_end(container, stream), "num_frames": stream.frames or None,
                "fps": float(rate) if rate else None, "width": stream.codec_context.width,
                "height": stream.codec_context.height, "codec": stream.codec_context.name, "num_keyframes": None}
        if container.duration and info["duration"] is None:
            info["duration"] = container.duration / 1e6
        if count_keyframes:
            index = _scan(path, container, stream)
            if index is not None:
                info.update(num_frames=len(index.pts), num_keyframes=len(index.key_pts),
                            duration=float((index.end_pts - index.pts[0]) * index.time_base))
        return info
    finally:
        container.close()
