"""M2-RAAP ablation on MovingShapes: add one step at a time (filtering, key frames, STAN, Mug, ACG).

Every run starts from the CLIP stand-in (`benchmarks/common.py::clip_standin`: `recipes/clip_moving_standin.yaml`
trained on still MovingShapes frames, built once and cached by content), which is also the frozen filter model. Rows (equal optimizer steps and batch size):
  base         noisy pairs (30% mismatched captions), uniform frames decoded every epoch, mean pooling, cosine
  +filter      pairs filtered by the frozen base model (top `--keep`), same steps
  +keyframes   codec key frames decoded once into frame shards (`write_frame_shards`), training reads the shards
  +stan        STAN side branch (last layers, zero-init temporal output, 10x branch lr)
  +mug         the Mug similarity head (training loss and evaluation)
  +acg         auxiliary-caption guidance, captions from an oracle "captioner" (what one frame shows: size,
               colour, shape of the subject; no action), fused by the gated residual

Training differs per row; the test protocol does not (uniform frames, decoded from the videos).
Table: text->video R@1/5/10 and MdR on a clean test split, order accuracy (`polymodal.eval.order`: a text of an
order-sensitive pair scores its own video above the time-reversed partner, a tie counts half; chance 50%), data
kept, decode and training seconds; mean ± sample std over seeds. Run: `python benchmarks/m2raap_ablation.py`
(full) or `--quick` (minutes, proves it works).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (base_parser, clip_standin, command_line, moving_shapes_world, pm_values,  # noqa: E402
                               seed_summary, set_threads, write_results)

ROWS = ("base", "+filter", "+keyframes", "+stan", "+mug", "+acg")


def prepare(data: Path, n_train: int, n_test: int, seed: int, num_frames: int, image_size: int,
            mismatch: float) -> tuple[Path, Path]:
    """A clean MovingShapes world (cached), then a noisy copy of its train split (`mismatch` of the captions
    swapped) and the test split with oracle aux captions."""
    from polymodal.data.manifests import read_manifest, write_manifest
    from polymodal.data.synthetic.moving_shapes import apply_mismatches
    noisy, test = data / "train_noisy.jsonl", data / "test_aux.jsonl"
    moving_shapes_world(data, n_train=n_train, n_test=n_test, n_val=0, seed=seed, num_frames=num_frames,
                        image_size=image_size)

    def with_aux(records):
        for r in records:
            s = r["subject"]
            r["aux_captions"] = [f"a {s['size']} {s['color']} {s['shape']}"]
        return records

    train = with_aux(read_manifest(data / "train.jsonl", media="video").records)
    apply_mismatches(train, seed, "train", mismatch)
    write_manifest(train, noisy)
    write_manifest(with_aux(read_manifest(data / "test.jsonl", media="video").records), test)
    return noisy, test


def order_accuracy(run_model: Path, test: Path, frames: int, strategy: str) -> float:
    """`polymodal.eval.order.order_pair_accuracy` of the saved model's own scores (Mug or cosine; ties count half)."""
    from polymodal.eval.order import order_pair_accuracy
    from polymodal.eval.video_retrieval import retrieval_features
    from polymodal.hub import load_model
    model = load_model(run_model)
    feats = retrieval_features(model, test, num_frames=frames, strategy=strategy)
    scores = model.similarity(feats.text, feats.video)                                         # (T, V)
    return order_pair_accuracy(scores, feats.owner, [r.get("pair_id") for r in feats.records])["pair_accuracy"]


def train(out: Path, train_manifest: Path, test: Path, steps: int, batch: int, frames: int, seed: int,
          m2raap: dict, data_extra: list[str], lr_scale: bool, strategy: str, base: Path,
          threads: int = 1) -> tuple[dict, float]:
    """One run of `method: m2raap`; returns (final metrics, seconds)."""
    from polymodal.train.run import load_recipe, run_recipe
    overrides = [
        "method=m2raap", f"out_dir={out}", f"model.path={base}", f"data.train={train_manifest}",
        f"data.batch_size={batch}", f"data.num_frames={frames}", f"train.steps={steps}", f"train.seed={seed}",
        "train.log_every=10", "train.ckpt_every=0", "train.progress=false", f"train.threads={threads}",
        "train.resume=never", "optim.lr=1e-3", "optim.warmup_steps=5",
        f"m2raap={json.dumps(m2raap)}",
        f"eval={{tasks: [{{task: video_retrieval, data: {test}, num_frames: {frames}, strategy: {strategy}}}]}}",
    ] + data_extra + (['optim.lr_scale={"temporal.": 10}'] if lr_scale else [])
    start = time.perf_counter()
    final = run_recipe(load_recipe(None, overrides))
    secs = time.perf_counter() - start
    final["order_acc"] = order_accuracy(out / "model", test, frames, strategy)
    return final, secs


def main(argv=None) -> dict:
    p = base_parser(__doc__, str(ROOT / "benchmarks" / "results" / "m2raap_ablation"), "runs/m2raap_ablation",
                    seeds=[0, 1], threads=1, out_help="where results.json / results.md go")
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--mismatch", type=float, default=0.3)
    p.add_argument("--keep", type=float, default=0.7, help="filter: top fraction kept")
    p.add_argument("--pretrain-steps", type=int, default=0, help="stand-in CLIP steps (0 = its recipe's)")
    p.add_argument("--pretrain-images", type=int, default=8000, help="stand-in CLIP training frames")
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs (minutes)")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_test, a.steps, a.batch_size, a.num_frames = 96, 32, 40, 16, 2
        a.pretrain_steps, a.pretrain_images = 80, 400
    set_threads(a.threads)
    from polymodal.prepare.filtering import filter_manifest
    from polymodal.data.frame_shards import write_frame_shards
    from polymodal.hub import load_model
    runs = Path(a.runs)
    noisy, test = prepare(runs / "data", a.n_train, a.n_test, 0, 8, a.image_size, a.mismatch)
    n_noisy = sum(1 for _ in open(noisy))
    t0 = time.perf_counter()
    base = clip_standin(runs, a.threads, image_size=a.image_size, n_train=a.pretrain_images,
                        steps=a.pretrain_steps or None)
    pretrain_secs = time.perf_counter() - t0
    results: dict = {"args": vars(a), "rows": {r: [] for r in ROWS}, "pretrain_seconds": pretrain_secs}
    for seed in a.seeds:
        final, secs = train(runs / f"s{seed}" / "base", noisy, test, a.steps, a.batch_size, a.num_frames, seed, {}, [],
                            False, "uniform", base, a.threads)
        results["rows"]["base"].append({**final, "seconds": secs, "decode_seconds": 0.0, "kept": n_noisy})
        # +filter: the base model (frozen) scores the noisy pairs
        clean = runs / f"s{seed}" / "train_filtered.jsonl"
        t0 = time.perf_counter()
        summary = filter_manifest(noisy, load_model(base), clean, keep=a.keep, num_frames=a.num_frames)
        filter_secs = time.perf_counter() - t0
        final, secs = train(runs / f"s{seed}" / "filter", clean, test, a.steps, a.batch_size, a.num_frames, seed,
                            {}, [], False, "uniform", base, a.threads)
        results["rows"]["+filter"].append({**final, "seconds": secs, "decode_seconds": 0.0, "kept": summary["num_kept"],
                                           "filter_seconds": filter_secs,
                                           "mismatched_kept": summary.get("mismatched_kept")})
        # +keyframes: decode key frames once into shards
        shards = runs / f"s{seed}" / "frames_kf"
        t0 = time.perf_counter()
        write_frame_shards(clean, shards, num_frames=a.num_frames, strategy="keyframes", overwrite=True, progress=False)
        decode = time.perf_counter() - t0
        steps = [("+keyframes", {}, False), ("+stan", {"temporal": {"kind": "stan", "stan_layers": 2}}, True),
                 ("+mug", {"temporal": {"kind": "stan", "stan_layers": 2}, "similarity": "mug"}, True),
                 ("+acg", {"temporal": {"kind": "stan", "stan_layers": 2}, "similarity": "mug", "acg": True}, True)]
        for name, m2, scale in steps:
            final, secs = train(runs / f"s{seed}" / name.strip("+"), clean, test, a.steps, a.batch_size, a.num_frames,
                                seed, {**m2, "frame_shards": str(shards)}, [], scale, "uniform", base, a.threads)
            results["rows"][name].append({**final, "seconds": secs, "decode_seconds": decode,
                                          "kept": summary["num_kept"]})
    keys = ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "text_to_video_median_rank")
    table = ["| step | R@1 | R@5 | R@10 | MdR | order acc | data kept | decode s | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    means = {}
    for name in ROWS:
        rs = results["rows"][name]
        per_seed = {k: [r[f"eval/video_retrieval/{k}"] for r in rs] for k in keys}
        per_seed.update(order_acc=[r["order_acc"] for r in rs], kept=[r["kept"] for r in rs],
                        decode=[r["decode_seconds"] for r in rs], train=[r["seconds"] for r in rs])
        means[name] = {k: seed_summary(v)["mean"] for k, v in per_seed.items()}
        means[name]["per_seed_R1"] = [round(v, 2) for v in per_seed[keys[0]]]
        cells = [pm_values(per_seed[k]) for k in (*keys, "order_acc")]
        m = means[name]
        table.append(f"| {name} | " + " | ".join(cells)
                     + f" | {m['kept']:.0f} | {m['decode']:.1f} | {m['train']:.1f} |")
    results["means"] = means
    results["command"] = command_line("m2raap_ablation.py", __name__ == "__main__")
    write_results(Path(a.out), json.loads(json.dumps(results, default=str)),
                  f"`{results['command']}`\n\nMean ± sample std over seeds {a.seeds}.\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    return results


if __name__ == "__main__":
    main()
