"""SyCoCa ablation on ShapesWorld: CoCa vs SyCoCa with random masking vs SyCoCa with attentive masking.
One command:

    python benchmarks/sycoca_ablation.py --out docs/results/sycoca

1. Generates ShapesWorld once (`--data`, default runs/sycoca_ablation/data; reused when the settings match).
2. Trains recipes/sycoca_{coca,random,attentive}.yaml (same data, steps, seed; only `sycoca.masking`
   differs); a finished run with the same config is reused.
3. Evaluates each on the test split (nothing is tuned on it): retrieval R@1 both ways, zero-shot top-1
   (64 colour+shape classes), BLEU-4 and CIDEr-D of greedy captions against the 4 references per image.
4. TG-MIM analysis on `--analysis-images` test images with their short caption (which names one object:
   the salient one, whose box ShapesWorld records). The task is rebuilt from the run's config and its
   last checkpoint (the MIM head lives in the task, not in the saved model):
   * masked-patch reconstruction error with the true caption vs a shuffled one (another image's caption),
     under the same mask (chosen from the true caption by the run's own rule, fixed seed);
   * where masks fall: the fraction of masked patches that overlap the named object ("hit rate") for the
     run's training rule, for pure text relevance (the `mask_ratio` most relevant patches), and for
     random masks; the object's share of all patches is what random masking hits on average.
5. Over `--seeds` (default: `--seed`): mean ± std of every number, the paired difference SyCoCa - CoCa per
   seed, and a verdict per claim: shown (every seed agrees), not shown (none does) or mixed.
6. `--pooler-init scaled` re-initialises CoCa's attentional poolers after construction
   (`benchmarks/pooler_init.py`: queries N(0, 1), fan-in projections) for every variant.
7. Writes `<out>/results.json` and `<out>/results.md` (tables, caption examples, which claims show).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (VERDICT_RULE, cached_metrics, claim_lines, command_line, experiment_parser,  # noqa: E402
                               finish, over_seeds, paired_difference, pm, pm_diff, prepare, verdict)
from benchmarks.pooler_init import INITS, itc_stats, train_with_init  # noqa: E402

RANDOM_DRAWS = 10    # random masks per image for the random-mask hit rate
VARIANTS = (  # name, recipe, label
    ("coca", "sycoca_coca.yaml", "CoCa (ITC + IC)"),
    ("random", "sycoca_random.yaml", "SyCoCa, random masking"),
    ("attentive", "sycoca_attentive.yaml", "SyCoCa, attentive masking"),
)


def parse_args(argv=None):
    p = experiment_parser(__doc__, "docs/results/sycoca", "runs/sycoca_ablation",
                          "CoCa config name (default: the recipes' coca-small)")
    p.add_argument("--seed", type=int, default=0, help="training seed (when --seeds is not given)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: --seed)")
    p.add_argument("--pooler-init", default="default", choices=INITS,
                   help="CoCa attentional-pooler initialisation (see benchmarks/pooler_init.py)")
    p.add_argument("--analysis-images", type=int, default=256, help="test images for the TG-MIM analysis")
    p.add_argument("--caption-images", type=int, default=0, help="test images to caption (0 = all)")
    return p.parse_args(argv)


def _evaluate(model, data: Path, args) -> dict:
    from polymodal.eval.captioning import captioning_eval_manifest
    from polymodal.eval.tasks import run_suite

    m = run_suite(model, retrieval=str(data / "test.jsonl"), classes=str(data / "classes.json"))
    cap = captioning_eval_manifest(model, data / "test.jsonl", limit=args.caption_images, method="greedy",
                                   progress=not args.quiet, num_examples=4)
    return {"t2i_R1": float(m["retrieval/text_to_image_R@1"]), "i2t_R1": float(m["retrieval/image_to_text_R@1"]),
            "zeroshot_top1": float(m["zeroshot/top1"]), "BLEU-4": 100.0 * cap["BLEU-4"],
            "CIDEr-D": 100.0 * cap["CIDEr-D"], "examples": cap["examples"]}


def _analysis_batch(model, data: Path, n: int) -> tuple[dict, list, int, int]:
    """Test images, their short captions and the box of the object each caption names.

    Returns:
        (batch {pixels, input_ids}, per-image [salient box], box frame side in pixels, patch side in that frame).
    """
    from PIL import Image

    from polymodal.data.images import load_image
    from polymodal.data.manifests import read_manifest

    records = read_manifest(data / "test.jsonl").records[:n]
    pixels = torch.stack([model.image_transform(load_image(r["image"])) for r in records])
    ids = model.tokenizer([r["caption"] for r in records])
    boxes = [[r["objects"][r["salient"]]["bbox"]] for r in records]
    with Image.open(records[0]["image"]) as im:
        frame = im.size[0]                                   # ShapesWorld images are square
    patch = model.config.vision.patch_size * frame // model.config.vision.image_size
    return {"pixels": pixels, "input_ids": ids}, boxes, frame, patch


def _mim_analysis(model, cfg, batch: dict, boxes: list, frame: int, patch: int) -> dict:
    """Reconstruction error true vs shuffled caption and mask hit rates for one trained run."""
    from polymodal.methods.sycoca import SyCoCaTask, mask_hit_rate, object_patches, reconstruction_error
    from polymodal.models.mim import patch_relevance, select_mask
    from polymodal.train.checkpoint import latest_checkpoint, load_checkpoint

    sy = cfg.sycoca
    out: dict = {}
    B = len(boxes)
    objects = object_patches(boxes, frame, patch)                          # (B, P)
    out["object_share"] = float(objects.float().mean())
    P = objects.shape[1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vis = model.visual(batch["pixels"])
        text_emb = model.encode_text(batch["input_ids"])                  # (B, E), reused for the task's mask
        relevance = patch_relevance(text_emb, model.patch_embeds(vis.tokens), model.scale())
    top = select_mask(P, sy.mask_ratio, relevance, attentive_ratio=1.0, direction=sy.direction)
    out["hit_relevance_topk"] = mask_hit_rate(top, boxes, frame, patch)
    out["hit_random"] = sum(mask_hit_rate(select_mask(P, sy.mask_ratio, None, batch_size=B, generator=g), boxes,
                                          frame, patch) for _ in range(RANDOM_DRAWS)) / RANDOM_DRAWS
    if sy.masking == "none":
        return out
    task = SyCoCaTask(model, sy).eval()
    ckpt = latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{cfg.out_dir}: no checkpoint with the TG-MIM head (train.ckpt_every must be > 0)")
    task.load_state_dict(load_checkpoint(ckpt)["task"])
    with torch.no_grad():
        mask = task.choose_mask(vis.tokens, text_emb, generator=g)
        shuffled = batch["input_ids"].roll(1, dims=0)                     # image i reads image i-1's caption
        true_err = reconstruction_error(task, batch, batch["input_ids"], mask=mask)
        shuf_err = reconstruction_error(task, batch, shuffled, mask=mask)
    out.update(hit_training_rule=mask_hit_rate(mask, boxes, frame, patch), mim_true=float(true_err.mean()),
               mim_shuffled=float(shuf_err.mean()), mim_true_lower_share=float((true_err < shuf_err).float().mean()))
    return out


def _per_seed(v: dict, key) -> list[float]:
    return [key(r) if callable(key) else r[key] for r in v["per_seed"]]


def _retrieval(r: dict) -> float:
    return (r["t2i_R1"] + r["i2t_R1"]) / 2


def claims(variants: dict) -> list[dict]:
    """The synthetic claims of docs/methods.md, SyCoCa, each with its numbers, the paired per-seed difference it
    rests on and a verdict over seeds (shown: every seed agrees; not shown: none; mixed)."""
    c, r, a = variants["coca"], variants["random"], variants["attentive"]
    gap = {n: paired_difference(_per_seed(v, "mim_shuffled"), _per_seed(v, "mim_true")) for n, v in
           (("attentive", a), ("random", r))}
    both = {"values": gap["attentive"]["values"] + gap["random"]["values"]}          # every seed of both variants
    hit = paired_difference(_per_seed(a, "hit_training_rule"), _per_seed(a, "hit_random"))
    ret = {n: paired_difference(_per_seed(v, _retrieval), _per_seed(c, _retrieval)) for n, v in
           (("attentive", a), ("random", r))}
    zs = {n: paired_difference(_per_seed(v, "zeroshot_top1"), _per_seed(c, "zeroshot_top1")) for n, v in
          (("attentive", a), ("random", r))}
    # "At least as good": a seed agrees when SyCoCa is not below CoCa (ties count as agreement).
    ret_verdict = verdict(ret["attentive"], ties_agree=True)
    out = [
        {"claim": "masked-patch reconstruction error is lower with the true caption than with a shuffled one "
                  "(attentive and random SyCoCa)",
         "numbers": f"attentive {a['mim_true']:.4f} vs {a['mim_shuffled']:.4f}, shuffled - true "
                    f"{pm_diff(gap['attentive'], 4)}; random {r['mim_true']:.4f} vs {r['mim_shuffled']:.4f}, "
                    f"{pm_diff(gap['random'], 4)}",
         "verdict": verdict(both)},
        {"claim": "attentive masking hits the patches of the object the caption names more than random masking",
         "numbers": f"hit rate attentive rule {100 * a['hit_training_rule']:.1f}% vs random masks "
                    f"{100 * a['hit_random']:.1f}% (object share {100 * a['object_share']:.1f}%), paired "
                    f"{pm_diff({**hit, **{k: 100 * hit[k] for k in ('mean', 'std', 'min', 'max')}})} points",
         "verdict": verdict(hit)},
        {"claim": "retrieval (mean of T2I and I2T R@1) is at least as good as CoCa alone",
         "numbers": f"CoCa {_retrieval(c):.1f}, attentive {_retrieval(a):.1f}, random {_retrieval(r):.1f}; "
                    f"attentive - CoCa {pm_diff(ret['attentive'])}, random - CoCa {pm_diff(ret['random'])}",
         "verdict": ret_verdict},
        {"claim": "(not a paper claim; reported because single seeds flipped) attentive SyCoCa raises zero-shot "
                  "top-1 over CoCa",
         "numbers": f"attentive - CoCa {pm_diff(zs['attentive'])}, random - CoCa {pm_diff(zs['random'])}",
         "verdict": verdict(zs["attentive"])},
    ]
    for cl in out:
        cl["shown"] = cl["verdict"] == "shown"
    return out


def render_markdown(result: dict) -> str:
    st, ch, variants = result["settings"], result["chance"], result["variants"]
    n = len(st["seeds"])
    f = lambda v, k, d=1, scale=1.0: (pm(scale * v[k], scale * v["std"][k], n, d) if k in v else "n/a")
    lines = [
        "# SyCoCa ablation on ShapesWorld",
        "",
        f"Command: `{st['command']}`  ",
        f"Data: ShapesWorld seed {st['data_seed']}, {st['n_train']} training images, test {st['n_test']} images "
        f"x 4 captions. Model `{st['model']}`{''.join(f' ({s})' for s in st['sets'])}, {st['steps']} steps of "
        f"batch {st['batch_size']}, seeds {st['seeds']} (mean ± sample std over seeds), pooler init "
        f"`{st['pooler_init']}`; only `sycoca.masking` differs between the runs. Torch threads {st['threads']}. "
        f"Total wall time {result['seconds']['total']:.0f} s.",
        "",
        "| variant | T2I R@1 | I2T R@1 | zero-shot top-1 | BLEU-4 | CIDEr-D | ITC plateau exit step | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants.values():
        lines.append(f"| {v['label']} | {f(v, 't2i_R1')} | {f(v, 'i2t_R1')} | {f(v, 'zeroshot_top1')} | "
                     f"{f(v, 'BLEU-4')} | {f(v, 'CIDEr-D')} | {f(v, 'plateau_step', 0)} | {v['train_s']:.0f} |")
    if n > 1:
        lines += ["", "Paired difference against CoCa (same seed), mean ± std (min..max, seeds > 0):", "",
                  "| variant | T2I R@1 | I2T R@1 | zero-shot top-1 | CIDEr-D |", "|---|---|---|---|---|"]
        for name, d in result["paired"].items():
            lines.append(f"| {variants[name]['label']} - CoCa | {pm_diff(d['t2i_R1'])} | {pm_diff(d['i2t_R1'])} | "
                         f"{pm_diff(d['zeroshot_top1'])} | {pm_diff(d['CIDEr-D'])} |")
    lines += [
        "", f"Chance: T2I R@1 {ch['t2i_R1']:.2f}, zero-shot top-1 {ch['zeroshot_top1']:.2f}. BLEU-4 and CIDEr-D "
        "x 100, greedy decoding. I2T R@1 is low for every model: many captions are word for word the same for "
        "several test images, and ties are scored pessimistically. ITC plateau exit: first logged step with ITC "
        f"loss < ln({st['batch_size']}) - 0.5.",
        "",
        f"## TG-MIM: reconstruction and where the masks fall ({st['analysis_images']} test images, short caption)",
        "",
        "| variant | MIM error, true caption | MIM error, shuffled caption | images where true < shuffled % | "
        "hit rate, training rule % | hit rate, top relevance % | hit rate, random masks (10 draws) % |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants.values():
        lines.append(f"| {v['label']} | {f(v, 'mim_true', 4)} | {f(v, 'mim_shuffled', 4)} | "
                     f"{f(v, 'mim_true_lower_share', 1, 100)} | {f(v, 'hit_training_rule', 1, 100)} | "
                     f"{f(v, 'hit_relevance_topk', 1, 100)} | {f(v, 'hit_random', 1, 100)} |")
    share = next(iter(variants.values()))["object_share"]
    lines += [
        "", f"Masks cover {100 * st['mask_ratio']:.0f}% of the patches. The named object overlaps {100 * share:.1f}% "
        "of all patches: what random masking hits on average; a mask that covered the whole object would hit "
        f"{100 * min(1.0, share / st['mask_ratio']):.0f}%. \"Training rule\" is the run's own mask (attentive: "
        f"{100 * st['attentive_ratio']:.0f}% of the masked patches by text relevance, the rest random); \"top "
        "relevance\" masks only the most text-relevant patches by each model's own relevance (CoCa has no MIM "
        "head but the same relevance can be computed). MIM error: MSE on the masked patches of per-patch "
        "normalised pixels; the shuffled caption is the previous test image's caption, under the same mask. Errors "
        "compare captions within a row, not rows: attentive masks hide the object, which is harder to redraw.",
        "", f"## Greedy caption examples (attentive SyCoCa, seed {st['seeds'][0]})", "",
    ]
    for e in variants["attentive"]["examples"]:
        lines.append(f"- `{Path(e['image']).name}`: \"{e['caption']}\" (reference: \"{e['references'][0]}\")")
    lines += ["", "## Claims (docs/methods.md, SyCoCa) at this scale",
              "", f"Verdict over seeds: {VERDICT_RULE}.", ""]
    return "\n".join(lines + claim_lines(result["claims"])) + "\n"


def run_variant(args, data: Path, runs: Path, name: str, recipe: str, seed: int) -> dict:
    """Train (or reuse) one variant at one seed and measure it (evaluation numbers cached in the run folder)."""
    from polymodal.hub import load_model

    tag = name if args.pooler_init == "default" else f"{name}_{args.pooler_init}"
    run_dir = runs / f"{tag}_s{seed}"
    print(f"[sycoca] {tag} seed {seed}: training", flush=True)
    model_dir, seconds, cfg, reused = train_with_init(Path(args.recipes) / recipe, run_dir, data, args, seed,
                                                      args.sets, args.pooler_init, runs / f"init_{tag}_s{seed}")

    def measure() -> dict:
        model = load_model(model_dir).eval()
        batch, boxes, frame, patch = _analysis_batch(model, data, args.analysis_images)
        return {**_evaluate(model, data, args), **_mim_analysis(model, cfg, batch, boxes, frame, patch)}

    key = {"eval": "sycoca_ablation", "test": str(data / "test.jsonl"), "analysis_images": args.analysis_images,
           "caption_images": args.caption_images}
    out = {**cached_metrics(run_dir, key, measure, reused), **itc_stats(run_dir, args.batch_size),
           "train_s": seconds, "sycoca": dict(cfg.sycoca.to_dict() if hasattr(cfg.sycoca, "to_dict")
                                               else vars(cfg.sycoca))}
    print(f"[sycoca] {tag} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()
                                                      if isinstance(v, float)), flush=True)
    return out


def run(args) -> dict:
    out, runs, data, start = prepare(args)
    seeds = list(args.seeds) if args.seeds else [args.seed]
    variants: dict = {}
    for name, recipe, label in VARIANTS:
        res = over_seeds(seeds, lambda seed, name=name, recipe=recipe: run_variant(args, data, runs, name, recipe,
                                                                                 seed))
        first = res["per_seed"][0]
        variants[name] = {"label": label, **res["mean"], "std": res["std"], "seeds": seeds,
                          "per_seed": [{k: v for k, v in r.items() if k not in ("examples", "sycoca")}
                                       for r in res["per_seed"]],
                          "examples": first["examples"]}
    sycoca_cfg = first["sycoca"]
    paired = {name: {k: paired_difference(_per_seed(variants[name], k), _per_seed(variants["coca"], k))
                     for k in ("t2i_R1", "i2t_R1", "zeroshot_top1", "BLEU-4", "CIDEr-D")}
              for name in ("random", "attentive")}
    n_classes = len(json.loads((data / "classes.json").read_text())["classes"])
    result = {
        "settings": {"command": command_line("sycoca_ablation.py", __name__ == "__main__"),
                     "data_seed": args.data_seed, "n_train": args.n_train, "n_test": args.n_test,
                     "steps": args.steps, "batch_size": args.batch_size, "seed": seeds[0], "seeds": seeds,
                     "pooler_init": args.pooler_init,
                     "model": args.model or "coca-small (recipes)", "sets": args.sets,
                     "analysis_images": min(args.analysis_images, args.n_test),
                     "mask_ratio": sycoca_cfg["mask_ratio"], "attentive_ratio": sycoca_cfg["attentive_ratio"],
                     "threads": torch.get_num_threads()},
        "chance": {"t2i_R1": 100.0 / args.n_test, "zeroshot_top1": 100.0 / n_classes},
        "variants": variants,
        "paired": paired,
    }
    result["claims"] = claims(variants)
    return finish(out, result, start, render_markdown, "sycoca")


if __name__ == "__main__":
    run(parse_args())
