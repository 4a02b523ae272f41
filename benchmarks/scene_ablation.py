"""Scene recognition ablation (docs/methods.md, scene): which stream learns which labels, and what distillation and
parent refinement add.

Variants (all `method: scene` on one MovingShapes world, same model size, steps and seeds):
  temporal                 temporal stream only
  frame                    frame-level stream only (cannot see frame order, by construction)
  both                     both streams, no distillation
  both_distill_softmax     both streams + self-distillation, KL of softmaxes over the labels
  both_distill_bernoulli   both streams + self-distillation, per-label Bernoulli KLs
  both_distill_norefine    distillation of the default `scene.distill_kind`, without parent-score refinement
  both_distill_bernoulli_w0.2  per-label distillation at distill_weight 0.2 (a diagnostic: the per-label term is
                           about 5x the softmax one at equal weight)
  temporal_nores           temporal stream without the label residual (`label_residual` 0; a diagnostic)
  both_distill_nores       the distilled pair (default kind) without the label residual
  temporal_time002         temporal stream with its old start, `time_init` 0.02 (a diagnostic)

The start: `--model-path` (a saved image-text model, e.g. the CLIP stand-in), `--standin` (build or reuse
`benchmarks.common.clip_standin` in `--runs`: a tiny CLIP trained on still MovingShapes frames), or else a
randomly initialised tiny CLIP.

The world has compound order actions (`compound_fraction`: "moves left then right", "grows then shrinks", ...), whose
frames are exactly those of the opposite compound in another order, plus single-frame labels (shape, colour,
background). Label groups come from the world's classes.json: `order_dependent` (single actions and compounds),
`order_compound` (compounds only) and `single_frame` (shape, colour, background).

Per variant and seed it reports test mAP, mAP per label group (also for each stream of a two-stream model), micro /
macro F1 at the validation-chosen threshold, hit@1 and hierarchy consistency; then the mean over seeds and a verdict
per claim. Writes `results.json` and `results.md` into `--out`; data and run folders go to `--runs`.

    python benchmarks/scene_ablation.py --out docs/results/scene_ablation --runs runs/scene_ablation --standin  # full
    python benchmarks/scene_ablation.py --out /tmp/scene_ablation --quick                                # smoke
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, base_parser, cached_metrics, moving_shapes_world,  # noqa: E402
                               paired_difference, pm, seed_summary, set_threads, verdict, write_results)

VARIANTS = {
    "temporal": {"model": {"streams": "temporal"}, "distill_weight": 0.0},
    "frame": {"model": {"streams": "frame"}, "distill_weight": 0.0},
    "both": {"model": {"streams": "both"}, "distill_weight": 0.0},
    "both_distill_softmax": {"model": {"streams": "both"}, "distill_weight": 1.0, "distill_kind": "softmax"},
    "both_distill_bernoulli": {"model": {"streams": "both"}, "distill_weight": 1.0, "distill_kind": "bernoulli"},
    "both_distill_norefine": {"model": {"streams": "both", "refine": False}, "distill_weight": 1.0},   # default kind
    # diagnostic: the per-label KL sums C two-outcome KLs, a larger term than one softmax KL; at a fifth of the weight
    # its logged size is about the softmax term's (does the kind matter, or only the strength of the pull?)
    "both_distill_bernoulli_w0.2": {"model": {"streams": "both"}, "distill_weight": 0.2, "distill_kind": "bernoulli"},
    # diagnostics without the learned label residual (scene.model.label_residual 0; the method's default is 0.5):
    # opposite order labels ("moves left then right" / "moves right then left") have near-identical name embeddings
    "temporal_nores": {"model": {"streams": "temporal", "label_residual": 0.0}, "distill_weight": 0.0},
    "both_distill_nores": {"model": {"streams": "both", "label_residual": 0.0}, "distill_weight": 1.0},  # default kind
    # diagnostic: the temporal stream's old start, time embeddings of std 0.02 beside layer-normed frames (it stayed
    # order-blind: docs/results/scene_ablation_time002)
    "temporal_time002": {"model": {"streams": "temporal", "time_init": 0.02}, "distill_weight": 0.0},
}


def distilled() -> str:
    """The variant that distils with the method's default `scene.distill_kind` (the claims' "distilled pair")."""
    from polymodal.methods.scene import SceneSection
    return f"both_distill_{SceneSection().distill_kind}"
GROUPS = ("order_dependent", "order_compound", "single_frame")
KEYS = ("mAP", *(f"mAP_{g}" for g in GROUPS), "order_pair_acc", "f1_micro", "f1_macro", "hit@1", "consistency")
# per-stream keys of a two-stream model (the eval task reports them as temporal/... and frame/...)
STREAM_METRICS = ("mAP", *(f"mAP_{g}" for g in GROUPS), "order_pair_acc", "consistency")
STREAM_KEYS = tuple(f"{s}/{k}" for s in ("temporal", "frame") for k in STREAM_METRICS)


# Order labels and their opposites: the reversed video (single actions) or the swapped halves (compounds) shows the
# opposite label with exactly the same frames.
OPPOSITE_PAIRS = [("moves left", "moves right"), ("moves up", "moves down"), ("grows", "shrinks"),
                  ("appears", "disappears"), ("moves left then right", "moves right then left"),
                  ("moves up then down", "moves down then up"), ("grows then shrinks", "shrinks then grows"),
                  ("appears then disappears", "disappears then appears")]


def order_pair_accuracy(model_dir: Path, manifest: Path, num_frames: int) -> dict:
    """How often each stream scores a video's order label above its opposite (ties count half): 50 is chance, and
    the frame stream, which sees the same frames for both, cannot beat it on a world where both directions occur.

    Args:
        model_dir: a saved scene model.
        manifest: test records (`scene_labels`).
        num_frames: frames per video (all of them).
    Returns:
        {"order_pair_acc" (ensemble), "temporal/order_pair_acc", "frame/order_pair_acc" (those the model has),
        "order_pairs": number of (video, label) pairs}.
    """
    import torch

    from polymodal.encode import read_records
    from polymodal.eval.scene import scene_scores
    from polymodal.hub import load_model
    model = load_model(model_dir).eval()
    names = model.hierarchy.names
    opposite = {a: b for a, b in OPPOSITE_PAIRS} | {b: a for a, b in OPPOSITE_PAIRS}
    records = read_records(manifest, 0, required=("video",), media="video")
    with torch.no_grad():
        scores, kept = scene_scores(model, records, num_frames)
    pairs = [(i, names.index(n), names.index(opposite[n])) for i, r in enumerate(kept) for n in r["scene_labels"]
             if n in opposite]
    out: dict = {"order_pairs": len(pairs)}
    for stream, z in scores.items():
        wins = [1.0 if z[i, a] > z[i, b] else 0.5 if z[i, a] == z[i, b] else 0.0 for i, a, b in pairs]
        key = "order_pair_acc" if stream == "ensemble" else f"{stream}/order_pair_acc"
        out[key] = 100 * sum(wins) / len(wins) if wins else math.nan
    return out


def temporal_feature(stream, frames, valid):
    """The feature a `TemporalStream` scores: norm(transformer([CLS, LN(frames) + time])[CLS]) (no text token).

    Args:
        stream: a TemporalStream. frames: (B, T, E) frame embeddings. valid: (B, T) bool or None.
    Returns:
        (B, E).
    """
    import torch
    B, T, _ = frames.shape
    x = torch.cat([stream.cls.expand(B, 1, -1), stream.norm_in(frames) + stream.time[:T]], dim=1)   # (B, 1+T, E)
    keep = torch.cat([torch.ones(B, 1, dtype=torch.bool), valid.bool() if valid is not None
                      else torch.ones(B, T, dtype=torch.bool)], dim=1)[:, None, None, :]
    return stream.norm(stream.transformer(x, attn_mask=keep)[:, 0])


def order_probe(model_path: str, data: Path, num_frames: int, seed: int = 0, where: str = "frames") -> dict:
    """Is order readable from the start's frame features at all? A linear probe per opposite-label pair.

    The start's image tower embeds every frame (as the scene model's frozen tower does); for each pair of
    `OPPOSITE_PAIRS`, a logistic regression on the train videos that carry either label predicts which one, from the
    concatenated frame embeddings in time order (order visible) and, as the control, from their mean (order
    invisible: the two labels have the same frames). Accuracy on the test videos, pooled over pairs.

    Args:
        model_path: the image-text start (`model.path`) or a saved scene model (its video model's tower is used).
        data: the MovingShapes world (train.jsonl, test.jsonl).
        num_frames: frames per video (all of them).
        seed: the probe's seed.
        where: "frames" (the image tower's frame embeddings) or "temporal" (a saved scene model's temporal-stream
            feature, the CLS output its classifier reads: does the trained stream carry order?).
    Returns:
        {"ordered": accuracy (%), "mean_pooled": accuracy (%), "n_test": test videos probed, "per_pair": {...}}.
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from polymodal.encode import clip_batches, read_records
    from polymodal.hub import load_model
    from polymodal.models.scene import SceneModel
    from polymodal.models.video import VideoCLIP
    model = load_model(model_path).eval()
    video = model.video if isinstance(model, SceneModel) else VideoCLIP.from_image_model(model).eval()
    opposite = {a: (a, b) for a, b in OPPOSITE_PAIRS} | {b: (a, b) for a, b in OPPOSITE_PAIRS}

    def features(split: str):
        recs = [r for r in read_records(data / f"{split}.jsonl", 0, required=("video",), media="video")
                if any(n in opposite for n in r["scene_labels"])]
        feats, kept = [], []
        with torch.no_grad():
            for idx, frames, valid, _ in clip_batches(video, recs, num_frames, "uniform", 32):
                f = video.encode_frames(frames, valid)                       # (B, T, E)
                if where == "temporal":
                    f = temporal_feature(model.temporal, f, valid)[:, None]   # (B, 1, E)
                feats.append(torch.nn.functional.normalize(f, dim=-1).cpu())
                kept += [recs[i] for i in idx]
        return torch.cat(feats).numpy(), kept

    (ftr, rtr), (fte, rte) = features("train"), features("test")
    out: dict = {"per_pair": {}}
    hits = {"ordered": 0, "mean_pooled": 0}
    total = 0
    for a, b in OPPOSITE_PAIRS:
        def pick(recs):
            return [(i, 1 if a in r["scene_labels"] else 0) for i, r in enumerate(recs)
                    if a in r["scene_labels"] or b in r["scene_labels"]]
        tr, te = pick(rtr), pick(rte)
        if not te or len({y for _, y in tr}) < 2:
            continue
        res = {"n_test": len(te)}
        for name, view in (("ordered", lambda f: f.reshape(len(f), -1)), ("mean_pooled", lambda f: f.mean(1))):
            x_tr, y_tr = view(ftr[[i for i, _ in tr]]), np.array([y for _, y in tr])
            x_te, y_te = view(fte[[i for i, _ in te]]), np.array([y for _, y in te])
            clf = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(x_tr, y_tr)
            correct = int((clf.predict(x_te) == y_te).sum())
            res[name] = 100 * correct / len(te)
            hits[name] += correct
        total += len(te)
        out["per_pair"][f"{a} / {b}"] = res
    out.update({k: 100 * v / total if total else math.nan for k, v in hits.items()}, n_test=total)
    return out


def _yaml_flow(obj) -> str:
    return json.dumps(obj)          # JSON is YAML flow syntax


def world_sizes(args) -> dict:
    """Generator settings of the ablation world (quick: a smoke-test world)."""
    if args.quick:
        return dict(n_train=96, n_val=24, n_test=24, num_frames=4, image_size=32)
    return dict(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, num_frames=args.num_frames,
                image_size=args.image_size)


def make_world(data: Path, sizes: dict, compound_fraction: float, quick: bool) -> None:
    """Generate the MovingShapes world into `data` unless a world with the same settings is there."""
    moving_shapes_world(data, progress=not quick, **sizes, compound_fraction=compound_fraction, pair_fraction=0.4,
                        static_fraction=0.1)


def chance_map(data: Path) -> dict:
    """Expected mAP of random scores on the test split, per label group: the mean prevalence of the labels with
    a positive (the AP of a random ranking is the label's prevalence)."""
    classes = json.loads((data / "classes.json").read_text(encoding="utf-8"))
    recs = [json.loads(line) for line in (data / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    count = {n: 0 for n in classes["classes"]}
    for r in recs:
        for n in r["scene_labels"]:
            count[n] += 1

    def mean_prev(names):
        prev = [count[n] / len(recs) for n in names if count[n]]
        return 100 * sum(prev) / len(prev) if prev else math.nan
    out = {"mAP": mean_prev(classes["classes"]), "order_pair_acc": 50.0}
    out.update({f"mAP_{g}": mean_prev(classes["groups"][g]) for g in GROUPS})
    return out


def run(args) -> dict:
    """Train and evaluate every variant and seed; returns the raw results."""
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    set_threads(args.threads)
    runs = Path(args.runs)
    data = runs / "data"
    sizes = world_sizes(args)
    make_world(data, sizes, args.compound_fraction, args.quick)
    T = sizes["num_frames"]                 # every frame: a frame subset would break the compounds' frame-set equality
    steps = args.steps or (40 if args.quick else 2000)
    w = args.width
    start_path = args.model_path
    if args.standin:
        from benchmarks import common
        if not hasattr(common, "clip_standin"):
            raise SystemExit("--standin needs benchmarks.common.clip_standin (the CLIP stand-in builder); give "
                             "--model-path instead")
        start_path = str(common.clip_standin(runs, threads=args.threads, image_size=sizes["image_size"],
                                             num_frames=T))
    if start_path:
        model = [f"model.path={start_path}"]
    else:
        model = ["model.name=tiny"] if args.quick else [
            "model.name=tiny", f"model.overrides={{vision.width: {w}, vision.heads: 4, text.width: {w}, "
                               f"text.heads: 4, embed_dim: {w}}}"]
    results: dict = {}
    for name in args.variants:
        section = VARIANTS[name]
        for seed in args.seeds:
            run_dir = runs / f"{name}_s{seed}"
            scene = {"classes": str(data / "classes.json"),
                     "model": {"layers": 1 if args.quick else 2, "freeze_image": args.freeze_image, **section["model"]},
                     "distill_weight": section["distill_weight"],
                     **({"distill_kind": section["distill_kind"]} if "distill_kind" in section else {})}
            ev = {"tasks": [{"task": "scene", "data": str(data / "test.jsonl"), "val": str(data / "val.jsonl"),
                             "num_frames": T}]}
            cfg = load_recipe(None, model + [
                "method=scene", f"out_dir={run_dir}", f"data.train={data / 'train.jsonl'}",
                f"data.batch_size={args.batch_size}", f"data.num_frames={T}", f"train.steps={steps}",
                f"train.log_every={max(1, steps // 10)}", "train.ckpt_every=0", "train.progress=false",
                f"train.threads={args.threads}", f"train.seed={seed}", f"optim.lr={args.lr}",
                f"optim.warmup_steps={min(50, max(5, steps // 20))}",
                f"tokenizer.vocab_size={200 if args.quick else 512}",
                "tokenizer.corpus_keys=[caption, scene_labels]", f"scene={_yaml_flow(scene)}",
                f"eval={_yaml_flow(ev)}"])
            model_dir, seconds, reused = train_or_reuse(cfg, fresh=args.fresh)   # a finished identical run is reused
            final = json.loads((run_dir / "final_metrics.json").read_text())
            final.update({f"eval/scene/{k}": v for k, v in cached_metrics(
                run_dir, {"eval": "order_pairs", "data": str(data / "test.jsonl"), "num_frames": T},
                lambda: order_pair_accuracy(model_dir, data / "test.jsonl", T), reused).items()})
            row = {k: final.get(f"eval/scene/{k}", math.nan) for k in KEYS + STREAM_KEYS}
            row["seconds"] = seconds
            results.setdefault(name, {})[str(seed)] = row
            print(name, seed, {k: round(v, 2) for k, v in row.items() if v == v}, flush=True)
    probe = None
    if start_path and not args.quick:          # can order be read from the start's frame features at all?
        probe_file = runs / "order_probe.json"
        key = {"model": str(start_path), "data": str(data), "num_frames": T}
        if probe_file.is_file() and json.loads(probe_file.read_text()).get("key") == key:
            probe = json.loads(probe_file.read_text())["probe"]
        else:
            probe = order_probe(start_path, data, T)
            probe_file.write_text(json.dumps({"key": key, "probe": probe}, indent=1))
    return {"chance": chance_map(data), "order_probe": probe, "sizes": sizes, "compound_fraction": args.compound_fraction, "steps": steps, "seeds": args.seeds,
            "lr": args.lr, "freeze_image": args.freeze_image, "batch_size": args.batch_size, "width": w, "quick": args.quick,
            "start": start_path or "random init", "distilled": distilled(), "runs": results}


def _values(rows: dict, key: str) -> list[float]:
    return [r.get(key, math.nan) for r in rows.values()]


def _stats(rows: dict, key: str) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds, NaN values left out (NaN, NaN when none is left)."""
    s = seed_summary(_values(rows, key), drop_missing=True)
    return s["mean"], s["std"]


def _fmt(rows: dict, key: str) -> str:
    s = seed_summary(_values(rows, key), drop_missing=True)
    return pm(s["mean"], s["std"], s["n"])


def verdicts(res: dict) -> list[dict]:
    """One verdict per claim of the paper, from the seed means (a difference counts only beyond the seed spread).

    A comparison a > b is `common.verdict` of the paired per-seed differences with a margin: "shown" when every
    seed agrees and the mean difference exceeds the larger of the two standard deviations, "not shown" when no
    seed agrees or the difference is within that noise, "mixed" when the seeds disagree.
    """
    runs = res["runs"]
    dist = res.get("distilled") or distilled()

    def cmp(a: tuple[str, str], b: tuple[str, str]) -> dict:
        (va, ka), (vb, kb) = a, b
        if va not in runs or vb not in runs:
            return {"verdict": "not run"}
        ma, sa = _stats(runs[va], ka)
        mb, sb = _stats(runs[vb], kb)
        seeds = [s for s in runs[va] if s in runs[vb]
                 if not math.isnan(runs[va][s].get(ka, math.nan)) and not math.isnan(runs[vb][s].get(kb, math.nan))]
        per_seed = [runs[va][s][ka] - runs[vb][s][kb] for s in seeds]
        if not per_seed:
            v = "not measurable"            # the metric is NaN (e.g. consistency when no child label is predicted)
        elif len(per_seed) < 2:
            v = "not judged (1 seed)"
        else:
            v = verdict(paired_difference([runs[va][s][ka] for s in seeds], [runs[vb][s][kb] for s in seeds]),
                        margin=max(sa, sb))
        return {"a": f"{va} {ka}", "b": f"{vb} {kb}", "mean_a": ma, "mean_b": mb, "diff": ma - mb,
                "per_seed_diff": per_seed, "verdict": v}

    out = [
        {"claim": "order labels are learned by the temporal stream (temporal-only beats frame-only on order labels)",
         **cmp(("temporal", "mAP_order_dependent"), ("frame", "mAP_order_dependent"))},
        {"claim": "compound order labels: temporal-only beats frame-only",
         **cmp(("temporal", "mAP_order_compound"), ("frame", "mAP_order_compound"))},
        {"claim": "inside the distilled pair, the temporal stream beats the frame stream on order labels",
         **cmp((dist, "temporal/mAP_order_dependent"), (dist, "frame/mAP_order_dependent"))},
        {"claim": "the temporal stream tells an order label from its opposite (temporal-only order-pair accuracy "
                  "beats frame-only, which cannot)",
         **cmp(("temporal", "order_pair_acc"), ("frame", "order_pair_acc"))},
        {"claim": "with the learned label residual the temporal stream tells an order label from its opposite better "
                  "than without (order-pair accuracy)",
         **cmp(("temporal", "order_pair_acc"), ("temporal_nores", "order_pair_acc"))},
        {"claim": "the learned label residual raises temporal-only mAP",
         **cmp(("temporal", "mAP"), ("temporal_nores", "mAP"))},
        {"claim": "the learned label residual raises the distilled pair's mAP",
         **cmp((dist, "mAP"), ("both_distill_nores", "mAP"))},
        {"claim": "the default time-embedding start (time_init 1) lets the temporal stream tell an order label from "
                  "its opposite better than the old one (0.02)",
         **cmp(("temporal", "order_pair_acc"), ("temporal_time002", "order_pair_acc"))},
        {"claim": "inside the distilled pair, the temporal stream tells an order label from its opposite better than "
                  "the frame stream",
         **cmp((dist, "temporal/order_pair_acc"), (dist, "frame/order_pair_acc"))},
        {"claim": "single-frame labels are learned by the frame stream (frame-only beats temporal-only on them)",
         **cmp(("frame", "mAP_single_frame"), ("temporal", "mAP_single_frame"))},
        {"claim": "inside the distilled pair, the frame stream beats the temporal stream on single-frame labels",
         **cmp((dist, "frame/mAP_single_frame"), (dist, "temporal/mAP_single_frame"))},
        {"claim": "the distilled pair beats the temporal stream alone (mAP)",
         **cmp((dist, "mAP"), ("temporal", "mAP"))},
        {"claim": "the distilled pair beats the frame stream alone (mAP)",
         **cmp((dist, "mAP"), ("frame", "mAP"))},
        {"claim": "distillation helps the pair (the distilled pair beats both streams without it, mAP)",
         **cmp((dist, "mAP"), ("both", "mAP"))},
        {"claim": "per-label (Bernoulli) distillation beats label-softmax distillation (mAP)",
         **cmp(("both_distill_bernoulli", "mAP"), ("both_distill_softmax", "mAP"))},
        {"claim": "per-label (Bernoulli) distillation beats label-softmax distillation (micro F1 at the val threshold)",
         **cmp(("both_distill_bernoulli", "f1_micro"), ("both_distill_softmax", "f1_micro"))},
        {"claim": "per-label (Bernoulli) distillation at weight 0.2 beats label-softmax distillation at weight 1 (mAP)",
         **cmp(("both_distill_bernoulli_w0.2", "mAP"), ("both_distill_softmax", "mAP"))},
        {"claim": "per-label distillation at weight 0.2 beats it at weight 1 (mAP; the pull's strength matters)",
         **cmp(("both_distill_bernoulli_w0.2", "mAP"), ("both_distill_bernoulli", "mAP"))},
        {"claim": "parent refinement raises hierarchy consistency",
         **cmp((dist, "consistency"), ("both_distill_norefine", "consistency"))},
        {"claim": "parent refinement does not cost mAP (refined minus unrefined mAP > 0)",
         **cmp((dist, "mAP"), ("both_distill_norefine", "mAP"))},
    ]
    return out


def write_table(res: dict, out: Path) -> str:
    """Write results.md (tables and verdicts) and results.json into `out`; returns the markdown."""
    s = res["sizes"]
    lines = [f"# Scene ablation ({'quick smoke run' if res['quick'] else 'reduced run'})", "",
             f"MovingShapes {s['n_train']} train / {s['n_val']} val / {s['n_test']} test videos, {s['num_frames']} "
             f"frames (all used), {s['image_size']} px, compound_fraction {res['compound_fraction']}; tiny model "
             f"width {res['width']}, start: {res.get('start', 'random init')}"
             f"{' (image tower frozen)' if res.get('freeze_image') else ''}, {res['steps']} steps x batch "
             f"{res['batch_size']}, lr {res['lr']}, seeds "
             f"{res['seeds']}. Test split, threshold chosen on val; mean ± sample std over seeds (per-seed numbers in "
             "results.json).", "",
             "| variant | " + " | ".join(KEYS) + " | seconds |", "|---" * (len(KEYS) + 2) + "|"]
    for name, rows in res["runs"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(rows, k) for k in KEYS) + f" | {_stats(rows, 'seconds')[0]:.0f} |")
    ch = res.get("chance", {})
    lines.append("| chance (random scores) | " + " | ".join(f"{ch[k]:.1f}" if k in ch else "" for k in KEYS) + " | |")
    lines += ["", "Per stream inside the two-stream models (the ensemble is the table above):", "",
              "| variant | stream | " + " | ".join(STREAM_METRICS) + " |", "|---" * (len(STREAM_METRICS) + 2) + "|"]
    for name, rows in res["runs"].items():
        for st in ("temporal", "frame"):
            if any(isinstance(r.get(f"{st}/mAP"), float) and r[f"{st}/mAP"] == r[f"{st}/mAP"] for r in rows.values()):
                lines.append(f"| {name} | {st} | " + " | ".join(_fmt(rows, f"{st}/{k}") for k in STREAM_METRICS) + " |")
    probe = res.get("order_probe")
    if probe:
        lines += ["", "Linear probe on the start's frozen frame features (logistic regression per opposite-label pair, "
                      f"train videos -> {probe['n_test']} test videos): which of the two labels, from the frames in "
                      f"time order: **{probe['ordered']:.1f}%**; from their mean (order hidden): "
                      f"{probe['mean_pooled']:.1f}% (chance 50).", "",
                  "| pair | test videos | in time order | mean-pooled |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['n_test']} | {v['ordered']:.1f} | {v['mean_pooled']:.1f} |"
                  for k, v in probe["per_pair"].items()]
    res["verdicts"] = verdicts(res)
    lines += ["", f"Claims ({VERDICT_RULE}; shown also needs the mean difference beyond the larger seed std):", ""]
    for v in res["verdicts"]:
        if v["verdict"] == "not run":
            lines.append(f"- {v['claim']}: not run")
            continue
        if v["verdict"] == "not measurable":
            lines.append(f"- {v['claim']}: **not measurable** (NaN on every seed: {v['a']}, {v['b']})")
            continue
        lines.append(f"- {v['claim']}: **{v['verdict']}** ({v['a']} {v['mean_a']:.1f} vs {v['b']} {v['mean_b']:.1f}, "
                     f"diff {v['diff']:+.1f}; per seed {', '.join(f'{d:+.1f}' for d in v['per_seed_diff'])})")
    text = "\n".join(lines) + "\n"
    write_results(out, res, text)
    return text


def main(argv=None) -> None:
    p = base_parser(__doc__, None, runs="", seeds=[0, 1, 2], threads=1,
                    out_help="results folder (results.json, results.md)")
    p.epilog = "--runs: the generated world and the run folders (default: runs/scene_ablation, or <out> with --quick)"
    p.add_argument("--quick", action="store_true", help="tiny world and few steps: a smoke run, not a result")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default 2000; 40 with --quick)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--num-frames", type=int, default=8, help="frames per video, all of them fed to the model")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--compound-fraction", type=float, default=1.0,
                   help="share of the unpaired action videos that do a compound order action (default 1)")
    p.add_argument("--width", type=int, default=64, help="tower width (not with --quick)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--freeze-image", action="store_true", help="keep the image tower fixed")
    p.add_argument("--model-path", default="", help="start from this saved image-text model (default: random init)")
    p.add_argument("--standin", action="store_true",
                   help="start from the CLIP stand-in (benchmarks.common.clip_standin, built once in --runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fresh", action="store_true", help="retrain runs even when a finished identical run exists")
    p.add_argument("--merge", nargs="+", default=[], metavar="RESULTS_JSON",
                   help="no training: one table in --out from the results.json of runs made in parts (--variants)")
    args = p.parse_args(argv)
    if args.merge:
        res = None
        for part in args.merge:
            r = json.loads(Path(part).read_text(encoding="utf-8"))
            res = dict(r, runs={}) if res is None else res
            res["runs"].update(r["runs"])
            res["order_probe"] = res.get("order_probe") or r.get("order_probe")
        res["merged_from"] = list(args.merge)
        print(write_table(res, Path(args.out)))
        return
    if args.quick:
        args.lr, args.batch_size = 3e-3, 16
    args.runs = args.runs or (args.out if args.quick else "runs/scene_ablation")
    print(write_table(run(args), Path(args.out)))


if __name__ == "__main__":
    main()
