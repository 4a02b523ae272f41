"""M2-RAAP ablation on MovingShapes: add one step at a time (filtering, key frames, STAN, Mug, ACG).

Every run starts from the CLIP stand-in (`benchmarks/common.py::clip_standin`: `recipes/clip_moving_standin.yaml`
trained on still MovingShapes frames, built once and cached by content), which is also the frozen filter model.
Rows (equal optimizer steps and batch size; `ROWS` below):
  base               noisy pairs (30% mismatched captions), uniform frames decoded every epoch, mean pooling,
                     the learnable logit scale
  +filter            pairs filtered by the frozen stand-in (top `--keep`), same steps
  +keyframes         codec key frames decoded once into frame shards (`write_frame_shards`), read from the shards
  +stan              STAN side branch over the last block (10x branch lr), mean head, learnable temperature
  +stan @0.01        the same at Mug-STAN's fixed temperature 0.01 (the public code uses it for both heads)
  +mug               the Mug head at the base rows' learnable temperature: the head alone changes
  +mug @0.01         the Mug head at 0.01: head and temperature change (what the old '+mug' row measured)
  +acg (oracle, label leakage)  ACG on +mug with "a {size} {colour} {shape}" of the record itself: on the test
                     split that is the test record's own label, leaked into the video side
  +acg (captioner)   ACG on +mug with aux captions written by `polymodal data aux-captions` with a CoCa trained
                     on the stand-in's frames (train and test alike): no label leakage

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

from benchmarks.common import (VERDICT_RULE, base_parser, claim, claim_lines, clip_standin, command_line,  # noqa: E402
                               machine_info, machine_line, moving_shapes_world, paired_difference, pm_diff, pm_values,
                               seed_summary, set_threads, verdict, write_results)


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
    """One run of `method: m2raap` (a finished identical run is reused); returns (final metrics, seconds)."""
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    overrides = [
        "method=m2raap", f"out_dir={out}", f"model.path={base}", f"data.train={train_manifest}",
        f"data.batch_size={batch}", f"data.num_frames={frames}", f"train.steps={steps}", f"train.seed={seed}",
        "train.log_every=10", "train.ckpt_every=0", "train.progress=false", f"train.threads={threads}",
        "train.resume=never", "optim.lr=1e-3", "optim.warmup_steps=5",
        f"m2raap={json.dumps(m2raap)}",
        f"eval={{tasks: [{{task: video_retrieval, data: {test}, num_frames: {frames}, strategy: {strategy}}}]}}",
    ] + data_extra + (['optim.lr_scale={"temporal.": 10}'] if lr_scale else [])
    model_dir, secs, _ = train_or_reuse(load_recipe(None, overrides))
    final = json.loads((out / "final_metrics.json").read_text())
    final["order_acc"] = order_accuracy(model_dir, test, frames, strategy)
    return final, secs


def train_captioner(runs: Path, standin_model: Path, steps: int, threads: int) -> Path:
    """A CoCa (`recipes/sycoca_coca.yaml` with the 32 px `coca-tiny`) trained on the stand-in's still frames: the
    captioner `polymodal data aux-captions` uses for the ACG row without label leakage."""
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    data = standin_model.parent.parent / "data"                         # clip_standin: <key>/run/model, <key>/data
    cfg = load_recipe(ROOT / "recipes" / "sycoca_coca.yaml", [
        f"out_dir={runs / 'captioner'}", "model.name=coca-tiny", "tokenizer.vocab_size=512",
        f"data.train={data / 'train.jsonl'}", f"eval.retrieval={data / 'val.jsonl'}",
        f"eval.classes={data / 'classes.json'}", f"train.steps={steps}", "train.ckpt_every=0",
        f"train.threads={threads}", "train.progress=false", "train.report=false"])
    model_dir, _, _ = train_or_reuse(cfg)
    return model_dir


def captioner_hits(manifest: Path) -> dict:
    """How often the aux caption names the actor's colour and shape (the video's subject), in %."""
    from polymodal.data.manifests import read_manifest
    records = read_manifest(manifest, media="video").records
    caps = [(r.get("aux_captions") or [""])[0] for r in records]
    shape = [r["subject"]["shape"] in c for r, c in zip(records, caps)]
    colour = [(r["subject"]["color"] or "") in c or (r.get("color_to") or "#") in c for r, c in zip(records, caps)]
    return {"shape": 100 * sum(shape) / len(records), "colour": 100 * sum(colour) / len(records),
            "example": caps[0]}


# name -> (base row it adds to, m2raap settings, branch lr x10, which training manifest / test manifest)
BASE_TEMP = {"mean_temperature": 0.0, "mug_temperature": 0.0}      # the learnable logit scale for both heads
FIXED_TEMP = {"mean_temperature": 0.01, "mug_temperature": 0.01}   # Mug-STAN's released temperature, both heads
STAN = {"kind": "stan", "stan_layers": 1}
ROWS = {
    "base": ("noisy pairs, uniform frames decoded every epoch, mean pooling, learnable temperature", {}),
    "+filter": ("pairs filtered by the frozen stand-in (top --keep)", {}),
    "+keyframes": ("codec key frames decoded once into shards", {}),
    "+stan": ("STAN branch (10x branch lr), mean head, learnable temperature", {"temporal": STAN, **BASE_TEMP}),
    "+stan @0.01": ("as +stan, mean head at the released fixed temperature 0.01", {"temporal": STAN, **FIXED_TEMP}),
    "+mug": ("Mug head at the base rows' learnable temperature (the head alone)",
             {"temporal": STAN, "similarity": "mug", **BASE_TEMP}),
    "+mug @0.01": ("Mug head at the released 0.01 (head and temperature: the old '+mug' row)",
                   {"temporal": STAN, "similarity": "mug", **FIXED_TEMP}),
    "+acg (oracle, label leakage)": ("ACG on +mug; aux caption = the record's own subject (on the test split: its "
                                     "label, leaked)", {"temporal": STAN, "similarity": "mug", "acg": True, **BASE_TEMP}),
    "+acg (captioner)": ("ACG on +mug; aux captions by a CoCa trained on the stand-in frames (`polymodal data "
                         "aux-captions`), train and test alike",
                         {"temporal": STAN, "similarity": "mug", "acg": True, **BASE_TEMP}),
}


def main(argv=None) -> dict:
    p = base_parser(__doc__, str(ROOT / "benchmarks" / "results" / "m2raap_ablation"), "runs/m2raap_ablation",
                    seeds=[0, 1, 2], threads=1, out_help="where results.json / results.md go")
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
    p.add_argument("--captioner-steps", type=int, default=600, help="CoCa captioner steps on the stand-in frames")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every run, e.g. 'optim.lr=1e-4' (repeatable; use another --runs)")
    p.add_argument("--standin-runs", default="runs", help="where the CLIP stand-in is built and cached (<dir>/standin/<key>; "
                   "shared by every video benchmark)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs (minutes)")
    a = p.parse_args(argv)
    if a.quick:
        a.n_train, a.n_test, a.steps, a.batch_size, a.num_frames = 96, 32, 40, 16, 2
        a.pretrain_steps, a.pretrain_images, a.captioner_steps = 80, 400, 20
    set_threads(a.threads)
    from polymodal.data.frame_shards import write_frame_shards
    from polymodal.hub import load_model
    from polymodal.prepare.aux_captions import add_aux_captions
    from polymodal.prepare.filtering import filter_manifest
    runs = Path(a.runs)
    noisy, test = prepare(runs / "data", a.n_train, a.n_test, 0, 8, a.image_size, a.mismatch)
    n_noisy = sum(1 for _ in open(noisy))
    t0 = time.perf_counter()
    base = clip_standin(Path(a.standin_runs), a.threads, image_size=a.image_size, n_train=a.pretrain_images,
                        steps=a.pretrain_steps or None)
    pretrain_secs = time.perf_counter() - t0
    results: dict = {"args": vars(a), "rows": {r: [] for r in a.rows}, "pretrain_seconds": pretrain_secs,
                     "standin": str(base)}
    coca_test = None
    if "+acg (captioner)" in a.rows:
        captioner = load_model(train_captioner(runs, base, a.captioner_steps, a.threads)).eval()
        coca_test = runs / "data" / "test_coca.jsonl"
        add_aux_captions(runs / "data" / "test.jsonl", captioner, coca_test)
        results["captioner_test_hits"] = captioner_hits(coca_test)
    for seed in a.seeds:
        if "base" in a.rows:
            final, secs = train(runs / f"s{seed}" / "base", noisy, test, a.steps, a.batch_size, a.num_frames, seed,
                                BASE_TEMP, a.sets, False, "uniform", base, a.threads)
            results["rows"]["base"].append({**final, "seconds": secs, "decode_seconds": 0.0, "kept": n_noisy})
        # +filter: the stand-in (frozen) scores the noisy pairs
        clean = runs / f"s{seed}" / "train_filtered.jsonl"
        t0 = time.perf_counter()
        summary = filter_manifest(noisy, load_model(base), clean, keep=a.keep, num_frames=a.num_frames)
        filter_secs = time.perf_counter() - t0
        if "+filter" in a.rows:
            final, secs = train(runs / f"s{seed}" / "filter", clean, test, a.steps, a.batch_size, a.num_frames, seed,
                                BASE_TEMP, a.sets, False, "uniform", base, a.threads)
            results["rows"]["+filter"].append({**final, "seconds": secs, "decode_seconds": 0.0,
                                               "kept": summary["num_kept"], "filter_seconds": filter_secs,
                                               "mismatched_kept": summary.get("mismatched_kept")})
        # +keyframes: decode key frames once into shards
        shards = runs / f"s{seed}" / "frames_kf"
        t0 = time.perf_counter()
        write_frame_shards(clean, shards, num_frames=a.num_frames, strategy="keyframes", overwrite=True, progress=False)
        decode = time.perf_counter() - t0
        coca_shards = None
        for name in [r for r in a.rows if r not in ("base", "+filter")]:
            m2 = {**ROWS[name][1]} if name != "+keyframes" else dict(BASE_TEMP)
            shard_dir, eval_manifest = shards, test
            if name == "+acg (captioner)":
                if coca_shards is None:
                    coca_train = runs / f"s{seed}" / "train_filtered_coca.jsonl"
                    add_aux_captions(clean, captioner, coca_train)
                    coca_shards = runs / f"s{seed}" / "frames_kf_coca"
                    write_frame_shards(coca_train, coca_shards, num_frames=a.num_frames, strategy="keyframes",
                                       overwrite=True, progress=False)
                shard_dir, eval_manifest = coca_shards, coca_test
            tag = name.strip("+").replace(" ", "_").replace("(", "").replace(")", "").replace(",", "").replace("@", "t")
            final, secs = train(runs / f"s{seed}" / tag, clean, eval_manifest, a.steps, a.batch_size, a.num_frames,
                                seed, {**m2, "frame_shards": str(shard_dir)}, a.sets, "temporal" in m2, "uniform", base,
                                a.threads)
            results["rows"][name].append({**final, "seconds": secs, "decode_seconds": decode,
                                          "kept": summary["num_kept"]})
    keys = ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "text_to_video_median_rank")
    table = ["| step | R@1 | R@5 | R@10 | MdR | order acc | data kept | decode s | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    means, per_seed_all = {}, {}
    for name in a.rows:
        rs = results["rows"][name]
        per_seed = {k: [r[f"eval/video_retrieval/{k}"] for r in rs] for k in keys}
        per_seed.update(order_acc=[r["order_acc"] for r in rs], kept=[r["kept"] for r in rs],
                        decode=[r["decode_seconds"] for r in rs], train=[r["seconds"] for r in rs])
        per_seed_all[name] = per_seed
        means[name] = {k: seed_summary(v)["mean"] for k, v in per_seed.items()}
        means[name]["per_seed_R1"] = [round(v, 2) for v in per_seed[keys[0]]]
        cells = [pm_values(per_seed[k]) for k in (*keys, "order_acc")]
        m = means[name]
        table.append(f"| {name} | " + " | ".join(cells)
                     + f" | {m['kept']:.0f} | {m['decode']:.1f} | {m['train']:.1f} |")
    results["means"] = means
    results["claims"] = claims(per_seed_all)
    results["command"] = command_line("m2raap_ablation.py", __name__ == "__main__")
    info = machine_info()
    hits = results.get("captioner_test_hits")
    notes = ["Rows: " + "; ".join(f"**{n}**: {ROWS[n][0]}" for n in a.rows) + "."]
    if hits:
        notes.append(f"Captioner (CoCa, {a.captioner_steps} steps on the stand-in frames) on the test videos: the aux "
                     f"caption names the actor's shape in {hits['shape']:.0f}% and its colour in {hits['colour']:.0f}% "
                     f"(e.g. \"{hits['example']}\").")
    md = (f"`{results['command']}`\n\nMean ± sample std over seeds {a.seeds}. Machine: {machine_line(info)}.\n\n"
          + "\n".join(table) + "\n\n" + "\n\n".join(notes) + "\n\n"
          + f"Claims ({VERDICT_RULE}):\n\n" + "\n".join(claim_lines(results["claims"])) + "\n")
    results["machine"] = info
    write_results(Path(a.out), json.loads(json.dumps(results, default=str)), md)
    print("\n".join(table))
    return results


def claims(per_seed: dict) -> list[dict]:
    """Paired per-seed verdicts of the steps against the row they add to (R@1; key frames: time and R@1)."""
    def pair(a, b, key="text_to_video_R@1", direction=1):
        d = paired_difference(per_seed[a][key], per_seed[b][key])
        return claim(f"{a} vs {b}: {key} {'higher' if direction > 0 else 'lower'}",
                     f"{pm_values(per_seed[a][key])} vs {pm_values(per_seed[b][key])}; paired {pm_diff(d)}",
                     verdict(d, direction))
    steps = [("+filter", "base"), ("+keyframes", "+filter"), ("+stan", "+keyframes"), ("+mug", "+stan"),
             ("+mug @0.01", "+stan @0.01"), ("+mug @0.01", "+mug"), ("+acg (captioner)", "+mug"),
             ("+acg (oracle, label leakage)", "+mug")]
    out = [pair(a, b) for a, b in steps if a in per_seed and b in per_seed]
    if "+keyframes" in per_seed and "+filter" in per_seed:
        out.append(pair("+keyframes", "+filter", "train", -1))
    for a, b in (("+stan", "+keyframes"),):
        if a in per_seed and b in per_seed:
            out.append(pair(a, b, "order_acc"))
    return out


if __name__ == "__main__":
    main()
