"""Video evaluation throughput at benchmark size: decoding in worker processes against a plain loop.

On an MSR-VTT-shaped set (generated: MovingShapes videos, one caption each, 1,000 by default) it times, in one run:

* `pyav_loop`: a plain single-process PyAV loop (decode every video and apply the image transform), the peer a
  user would write;
* `encode_only`: the model encoding pre-decoded frames (what decoding must hide behind);
* `decode_encode_w0`: polymodal's eval loop (`encode.ClipBatches`) decoding in the main process, then encoding;
* `decode_encode_wN`: the same with N decode workers (`decode_workers=N`), decoding overlapping the encoding.

Ratios printed: each path's videos/s, and `decode_encode_wN / (pyav_loop + encode_only)` (below 1 means the
workers hide decoding behind encoding). Record the `lscpu` model line printed with it.

    python benchmarks/video_throughput.py --n 1000 --workers 2 --out benchmarks/results/video_throughput
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from common import base_parser, machine_info, machine_line, moving_shapes_world, set_threads, write_results


def run(args) -> dict:
    from polymodal.data.manifests import read_manifest
    from polymodal.data.text import train_tokenizer
    from polymodal.data.video import read_video
    from polymodal.encode import clip_batches
    from polymodal.models.factory import create_model
    from polymodal.models.video import VideoCLIP
    set_threads(args.threads)
    data = moving_shapes_world(Path(args.runs) / "data", progress=not args.quiet, n_train=8, n_test=args.n,
                               num_frames=args.frames, image_size=args.image_size)
    records = read_manifest(data / "test.jsonl", media="video").records
    torch.manual_seed(0)
    tok = train_tokenizer([r["caption"] for r in records] * 2, kind="bpe", vocab_size=400)
    model = VideoCLIP.from_image_model(create_model(args.model, tokenizer=tok)).eval()
    rows = {}

    start = time.perf_counter()
    decoded = []
    for r in records:
        clip = read_video(r["video"], num_frames=args.num_frames)
        decoded.append((clip.pixels(model.image_transform), clip.valid))
    rows["pyav_loop"] = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(decoded), args.batch_size):
            part = decoded[s:s + args.batch_size]
            model.encode_video(torch.stack([f for f, _ in part]), torch.stack([v for _, v in part]))
    rows["encode_only"] = time.perf_counter() - start

    for workers in sorted({0, args.workers}):
        start = time.perf_counter()
        with torch.no_grad():
            for _, frames, valid, _ in clip_batches(model, records, args.num_frames, batch_size=args.batch_size,
                                                    workers=workers):
                model.encode_video(frames, valid)
        rows[f"decode_encode_w{workers}"] = time.perf_counter() - start

    n = len(records)
    result = {"command": f"python benchmarks/video_throughput.py --n {args.n} --workers {args.workers} "
                         f"--model {args.model}",
              "machine": machine_info(), "videos": n, "seconds": rows,
              "videos_per_s": {k: n / v for k, v in rows.items()},
              "workers_vs_serial_peer": rows[f"decode_encode_w{args.workers}"] / (rows["pyav_loop"] + rows["encode_only"]),
              "workers_vs_w0": rows[f"decode_encode_w{args.workers}"] / rows["decode_encode_w0"]}
    lines = [f"# Video evaluation throughput ({n} videos, {args.num_frames} frames, {args.image_size} px, model "
             f"{args.model}, {args.threads or 'default'} torch threads)", "", machine_line(result["machine"]), "",
             "| path | seconds | videos/s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {n / v:.1f} |" for k, v in rows.items()]
    lines += ["", f"decode+encode with {args.workers} workers / (plain PyAV loop + encode only): "
                  f"{result['workers_vs_serial_peer']:.2f}x; / with 0 workers: {result['workers_vs_w0']:.2f}x"]
    write_results(Path(args.out), result, "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return result


def main(argv=None) -> dict:
    p = base_parser(__doc__, "benchmarks/results/video_throughput", "runs/video_throughput", threads=1)
    p.add_argument("--n", type=int, default=1000, help="test videos (MSR-VTT 1k-A has 1,000)")
    p.add_argument("--frames", type=int, default=16, help="frames per generated video")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled per video")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="small", help="bundled image-text config wrapped with mean pooling")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decode workers of the compared path")
    p.add_argument("--quiet", action="store_true")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
