"""Frame shards: every video of a manifest decoded once into tar shards of frames, and read back.

``write_frame_shards`` writes one sample per video (key = the record's index among the manifest's good
records, 9 digits) with the one tar writer of the project (:class:`polymodal.data.shards.ShardWriter`)::

    {key}.json          the record (its ``video`` path as written, ``_line`` kept)
    {key}.frames.json   times, valid, duration, source, strategy, num_frames, format
    {key}.000.jpg ...   one image per frame (or .png)

This is the WebDataset layout, so the ``webdataset`` package reads the shards too.
``read_frame_sample`` turns a sample back into a :class:`~polymodal.data.video.VideoClip`, and
:class:`FrameShardDataset` is the map-style training dataset over a shard folder (M-2RAAP's
``m2raap.frame_shards``). Command line: ``polymodal data frames MANIFEST --out DIR``.
"""
from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
from torch.utils.data import Dataset

from polymodal.data.datasets import BadRecords, BuiltSamples, SampleBuilder, SampleError
from polymodal.data.manifests import SKIP_HINT, ManifestError, SkipNotes, read_manifest
from polymodal.data.shards import ShardWriter, index_tar, read_indexed, resolve_shards
from polymodal.data.video import BAD_FIELD, VideoClip, VideoError, check_read_args, read_video

__all__ = ["write_frame_shards", "read_frame_sample", "FrameShardDataset", "UNREADABLE_FRAMES",
           "main_from_args"]

UNREADABLE_FRAMES = "unreadable_frames"       # skip tag: a frame sample's members cannot be read or decoded


def _encode_image(frame: np.ndarray, image_format: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(frame).save(buf, format="PNG")
    else:
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _sample_members(clip: VideoClip, record: dict, key: str, image_format: str, quality: int,
                    meta: dict) -> list[tuple[str, bytes]]:
    """(name, bytes) tar members of one video sample."""
    members = [(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())]
    frames_meta = {"times": clip.times.tolist(), "valid": clip.valid.tolist(), "duration": clip.duration,
                   "source": clip.source, **meta}
    members.append((f"{key}.frames.json", json.dumps(frames_meta).encode()))
    ext = "png" if image_format == "png" else "jpg"
    for t, frame in enumerate(clip.frames.numpy()):              # frame (H, W, 3) uint8
        members.append((f"{key}.{t:03d}.{ext}", _encode_image(frame, image_format, quality)))
    return members


def _video_path(record: dict, root: str) -> str:
    video = record["video"]
    if not isinstance(video, str) or not video.strip():
        raise VideoError(str(video), BAD_FIELD, "'video' must be a non-empty path string")
    return os.path.normpath(os.path.join(root, os.path.expanduser(video)))


def write_frame_shards(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    num_frames: int = 8,
    strategy: str = "keyframes",
    on_bad_record: str = "error",
    shard_size: int = 1000,
    max_shard_bytes: int = 1 << 30,
    max_side: int | None = None,
    image_format: str = "jpg",
    quality: int = 95,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Decode each record's ``video`` once into tar shards of frames plus a ``shards.json`` index.

    Args:
        manifest_path: JSONL/CSV manifest whose records have a ``video`` field (a file or a
            frame folder, relative to the manifest's folder or absolute).
        out_dir: shard directory (created if needed).
        num_frames, strategy, max_side: as in :func:`~polymodal.data.video.read_video` (no jitter: shards
            are fixed).
        on_bad_record: ``"error"`` raises ManifestError naming the manifest line; ``"skip"``
            skips bad records and videos and counts them by reason in the index.
        shard_size: videos per shard at most.
        max_shard_bytes: tar member bytes per shard at most.
        image_format: ``"jpg"`` or ``"png"`` (lossless).
        quality: JPEG quality.
        overwrite: replace shards already in `out_dir` (otherwise FileExistsError).
        progress: show a tqdm progress bar.

    Returns:
        the index dict written to ``shards.json`` (plus ``paths``: the shard files).
    """
    from tqdm import tqdm

    check_read_args(num_frames, strategy)
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    manifest = read_manifest(manifest_path, on_bad_record=on_bad_record, check_images=False, required=("video",))
    root = os.path.dirname(manifest.path)
    notes = SkipNotes(manifest.skipped, manifest.skipped_examples)   # + the videos that fail to decode
    meta = {"strategy": strategy, "num_frames": num_frames, "format": image_format}
    with ShardWriter(out_dir, shard_size, max_shard_bytes, overwrite) as writer:
        for i, record in enumerate(tqdm(manifest.records, desc="frames", unit="video", disable=not progress)):
            try:
                clip = read_video(_video_path(record, root), num_frames, strategy, max_side=max_side)
            except VideoError as e:
                if on_bad_record == "error":
                    raise ManifestError(f"{manifest.path} line {record.get('_line', '?')}: video "
                                        f"'{record['video']}': {e}; {SKIP_HINT} (--on-bad-record skip)") from e
                notes.note_skip(e.reason, f"{manifest.path}:{record.get('_line', '?')}: {e}")
                continue
            writer.add(_sample_members(clip, record, f"{i:09d}", image_format, quality, meta))
        index = writer.finish(manifest.path, frames=meta, skipped=dict(notes.skipped),
                              skipped_examples=notes.skipped_examples)
    return {**index, "paths": writer.written}


def read_frame_sample(sample: dict) -> VideoClip:
    """Decode a frame-shard sample back into a :class:`~polymodal.data.video.VideoClip`.

    Args:
        sample: {extension: bytes} of one sample, as ``shards.read_tar`` / ``shards.read_indexed`` or the
            ``webdataset`` package give it (``frames.json``, ``000.jpg`` ...; ``__key__`` and other keys
            ignored).

    Returns:
        the clip as stored (JPEG frames carry its compression loss).
    """
    from PIL import Image

    if "frames.json" not in sample:
        raise ValueError(f"not a frame sample: no 'frames.json' member (has {sorted(sample)})")
    meta = json.loads(sample["frames.json"])
    names = sorted(k for k in sample if k.split(".")[0].isdigit() and k.endswith((".jpg", ".png")))
    if len(names) != len(meta["times"]):
        raise ValueError(f"frame sample has {len(names)} frame images for {len(meta['times'])} times")
    frames = []
    for name in names:
        with Image.open(io.BytesIO(sample[name])) as im:
            frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))       # (H, W, 3)
    return VideoClip.from_frames(frames, meta["times"], meta["valid"], meta["duration"], meta.get("source", ""))


class FrameShardDataset(BuiltSamples, Dataset):
    """Map-style dataset over frame shards written by `polymodal data frames` (frames decoded once).

    Opening the dataset reads only the tar headers (:func:`~polymodal.data.shards.index_tar`: each sample's
    member offsets); a sample's JPEG/PNG frames are read from its shard and decoded when it is used, so
    memory does not grow with the data set. Shards must be uncompressed tars (as `polymodal data frames`
    writes them).

    Args:
        source: the shard folder (with `shards.json`), a pattern or a list (see ``resolve_shards``).
        builder: a `SampleBuilder` with media "video".
        on_bad_record: "error" | "skip".
    """

    def __init__(self, source: str, builder: SampleBuilder, on_bad_record: str = "error"):
        if builder.media != "video":
            raise ValueError(f"FrameShardDataset needs a video SampleBuilder, got media {builder.media!r}")
        shards, _ = resolve_shards(source)
        # Offsets only: each sample's frames are read from its shard when the sample is used.
        self.items: list[tuple[str, str, dict]] = []
        for shard in shards:
            for key, members in index_tar(shard):
                self.items.append((shard, key, members))
        if not self.items:
            raise ValueError(f"m2raap.frame_shards: {source} holds no samples; write them with `polymodal data frames`")
        self.builder, self.bad, self.epoch = builder, BadRecords(on_bad_record), 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        shard, key, members = self.items[i]
        where = f"{shard} key {key}"
        try:
            files = read_indexed(shard, members)
            record = json.loads(files["json"])
            clip = read_frame_sample(files)
        except Exception as e:  # a broken member: JSON, JPEG, missing frames
            return self.bad(i, UNREADABLE_FRAMES,
                            f"frame shard {where}: cannot be read ({type(e).__name__}: {e})", e)
        try:
            return self.builder.build(record, i, self.epoch, clip)
        except SampleError as e:
            return self.bad(i, e.reason, f"frame shard {where}: {e.detail}", e)


# ----------------------------------------------------------------------------------------
# Command line: polymodal data frames MANIFEST --out DIR
# ----------------------------------------------------------------------------------------
def main_from_args(args: argparse.Namespace) -> dict:
    """Run ``polymodal data frames`` from parsed arguments and print a JSON summary.

    Args:
        args: namespace produced by a parser set up with `polymodal.data.command_args.frames_arguments`.

    Returns:
        The dict returned by :func:`write_frame_shards`.
    """
    result = write_frame_shards(args.manifest, args.out, num_frames=args.num_frames, strategy=args.strategy,
                                on_bad_record=args.on_bad_record, shard_size=args.shard_size,
                                max_side=args.max_side, image_format=args.image_format, quality=args.quality,
                                overwrite=args.overwrite, progress=not args.no_progress)
    summary = {"out_dir": os.path.abspath(args.out), "num_samples": result["num_samples"],
               "shards": len(result["paths"]), "skipped": result["skipped"]}
    print(json.dumps(summary, indent=1))
    return result
