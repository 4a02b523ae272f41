"""Video decoding: uniform frames by seeking vs a full sequential decode, key-frame extraction, loader clips/s.

A 60 s 224x224 H.264 clip at 25 fps (1500 frames) with a key frame every 250 frames (libx264's
usual keyint) is made once in `--work` (reused when present; default: a temporary folder), plus
a copy with FFmpeg's default GOP of 12 frames, to show how the gain of seeking depends on the
key-frame spacing. Then, median of `--repeats` runs each:

(a) 8 uniform frames (`polymodal.data.video.read_video`, seek to the preceding key frame and
    decode forward) vs decoding every frame from the start and keeping the same 8 (RGB
    conversion of those 8 only; a second baseline converts every frame, as readers that return
    the whole video do; both reuse one scaler context, like `read_video`). Both give identical
    frames (checked). The ratio is bounded by total frames / frames the seeking path must
    decode (reported as `frames_decoded`).
(b) key-frame extraction (`strategy="keyframes"`: the decoder skips non-key frames).
(c) loader throughput: `read_video` clips/s over `--clips` short clips (5 s, GOP 50), for
    the uniform and keyframes strategies, one process.

    python benchmarks/video_decode.py [--work DIR] [--repeats 3] [--clips 8]
                                      [--out benchmarks/results/video_decode.json]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import base_parser, machine_info, machine_line  # noqa: E402
from polymodal.data import video  # noqa: E402

SIDE, FPS = 224, 25


def frame_content(i: int) -> np.ndarray:
    """A moving gradient with a drifting square: changes every frame, compresses like real footage."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    img = np.stack([(x + 2 * i) % 256, (y + i) % 256, ((x + y) // 2 + 3 * i) % 256], axis=-1).astype(np.uint8)
    cx, cy = (20 + 3 * i) % (SIDE - 40), (60 + 2 * i) % (SIDE - 40)
    img[cy:cy + 40, cx:cx + 40] = (255 - 3 * i % 256, 40, 200)
    return img


def make_clip(path: Path, seconds: float, gop: int) -> Path:
    """Encode a libx264 clip (yuv420p, preset veryfast) unless `path` exists."""
    import av

    if path.exists():
        return path
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width = s.height = SIDE
        s.pix_fmt = "yuv420p"
        s.codec_context.gop_size = gop
        s.codec_context.options = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(int(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(frame_content(i), format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


def sequential_pick(path: Path, times: list[float], convert_all: bool) -> list[np.ndarray]:
    """Decode every frame from the start; keep (convert to RGB) the frames at `times`."""
    import av

    from av.video.reformatter import VideoReformatter

    rgb = VideoReformatter()                       # one scaler context, as read_video uses
    wanted, kept = {round(t, 6) for t in times}, {}
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            t = round(float(frame.time), 6)
            if convert_all or t in wanted:
                arr = rgb.reformat(frame, format="rgb24", width=frame.width, height=frame.height).to_ndarray()
                if t in wanted:
                    kept[t] = arr
    return [kept[round(t, 6)] for t in times]


def frames_decoded_by_seeking(path: Path, num_frames: int) -> int:
    """Frames the seeking path decodes: per key frame used, from it up to its last target."""
    container, stream = video._open(str(path))
    try:
        index = video._scan(str(path), container, stream)
    finally:
        container.close()
    times = index.pts * index.time_base
    picks = video._nearest(times, video._uniform_targets(times[0], index.end_pts * index.time_base, num_frames,
                                                         False, 0))
    last_by_key: dict[int, int] = {}
    for i in picks:
        k = int(np.searchsorted(index.key_pts, index.pts[i], side="right") - 1)
        last_by_key[k] = max(last_by_key.get(k, 0), int(i))
    return sum(last - int(np.searchsorted(index.pts, index.key_pts[k])) + 1 for k, last in last_by_key.items())


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    runs, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs, out


def seek_vs_sequential(path: Path, repeats: int, num_frames: int = 8) -> dict:
    seek_s, seek_runs, clip = timed(lambda: video.read_video(path, num_frames), repeats)
    times = clip.times.tolist()
    seq_s, seq_runs, seq = timed(lambda: sequential_pick(path, times, False), repeats)
    all_s, all_runs, _ = timed(lambda: sequential_pick(path, times, True), repeats)
    identical = all(np.array_equal(a, b) for a, b in zip(clip.frames.numpy(), seq))
    info = video.video_info(path)
    return {"file": str(path), "frames": info["num_frames"], "keyframes": info["num_keyframes"],
            "frames_decoded": frames_decoded_by_seeking(path, num_frames), "identical_frames": identical,
            "seek_s": seek_s, "sequential_s": seq_s, "sequential_rgb_all_s": all_s,
            "ratio": seq_s / seek_s, "ratio_vs_rgb_all": all_s / seek_s,
            "runs": {"seek": seek_runs, "sequential": seq_runs, "sequential_rgb_all": all_runs}}


def run(args) -> dict:
    """Print the machine, make (or reuse) the clips, measure, print and write the JSON results."""
    torch.set_num_threads(1)
    cpu = machine_info()
    print(f"machine: {machine_line(cpu)}", flush=True)
    if args.work:
        return measure(args, Path(args.work), cpu)
    with tempfile.TemporaryDirectory(prefix="video_decode_") as tmp:     # clips deleted afterwards
        return measure(args, Path(tmp), cpu)


def measure(args, work: Path, cpu: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    long_250 = make_clip(work / "clip60s_gop250.mp4", 60, 250)
    long_12 = make_clip(work / "clip60s_gop12.mp4", 60, 12)
    shorts = [make_clip(work / f"short{i}_5s_gop50.mp4", 5, 50) for i in range(args.clips)]
    print(f"clips ready in {work} ({time.time() - t0:.1f} s)", flush=True)

    result = {"machine": cpu, "av": __import__("av").__version__, "torch": torch.__version__,
              "video": f"{SIDE}x{SIDE} H.264 (libx264 veryfast, yuv420p) {FPS} fps", "repeats": args.repeats,
              "seek_vs_sequential": {}}
    for name, path in (("60s_gop250", long_250), ("60s_gop12", long_12)):
        r = seek_vs_sequential(path, args.repeats)
        result["seek_vs_sequential"][name] = r
        print(f"(a) {name}: 8 uniform frames by seeking {r['seek_s']:.3f} s vs sequential {r['sequential_s']:.3f} s "
              f"-> {r['ratio']:.1f}x ({r['ratio_vs_rgb_all']:.1f}x vs converting every frame); decodes "
              f"{r['frames_decoded']} of {r['frames']} frames ({r['keyframes']} key frames); identical="
              f"{r['identical_frames']}", flush=True)

    key_s, key_runs, clip = timed(lambda: video.read_video(long_250, 8, strategy="keyframes"), args.repeats)
    key12_s, key12_runs, clip12 = timed(lambda: video.read_video(long_12, 8, strategy="keyframes"), args.repeats)
    result["keyframes"] = {"60s_gop250": {"seconds": key_s, "runs": key_runs, "valid": int(clip.valid.sum())},
                           "60s_gop12": {"seconds": key12_s, "runs": key12_runs, "valid": int(clip12.valid.sum())}}
    print(f"(b) key frames (8): gop250 {key_s:.3f} s ({int(clip.valid.sum())} distinct), gop12 {key12_s:.3f} s",
          flush=True)

    result["loader"] = {}
    for strategy in ("uniform", "keyframes"):
        seconds, runs, _ = timed(lambda: [video.read_video(p, 8, strategy=strategy) for p in shorts], args.repeats)
        result["loader"][strategy] = {"clips": len(shorts), "seconds": seconds, "clips_per_s": len(shorts) / seconds,
                                      "runs": runs}
        print(f"(c) loader {strategy}: {len(shorts) / seconds:.1f} clips/s (5 s clips, 8 frames, one process)",
              flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}", flush=True)
    return result


def parse_args(argv=None):
    p = base_parser(__doc__, str(Path(__file__).resolve().parent / "results" / "video_decode.json"), threads=None,
                    out_help="JSON results file")
    p.add_argument("--work", default="", help="folder for the generated clips (default: a new temp folder)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--clips", type=int, default=8, help="short clips for the loader throughput")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
