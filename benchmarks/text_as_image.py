"""Text as Image on ShapesWorld: a multi-label adapter trained on sentences only, tested on images.

    python benchmarks/text_as_image.py --out docs/results/text_as_image

1. Generates ShapesWorld (`--data`; reused when its meta.json has the same counts and seed).
2. Trains a small CLIP with `run_recipe` (or loads `--model`). With `--captions scene` (default)
   the CLIP is trained on captions naming every object ("a picture of a large red star, a small
   blue circle and ..."), written from each record's `objects` into `train_scene.jsonl`; with
   `--captions short` on the data set's captions, which name only the salient object.
3. Trains a multi-label adapter with `run_recipe` on `recipes/text_as_image.yaml` (overridden from the
   options below) at every sigma in `--sigmas` (several seeds): the method writes sentences for random
   sets of 1..k shapes (template generator with size and colour adjectives, or a local causal LM with
   `--lm`), extracts their labels, encodes them once (cached on disk, shared by all runs) and the one
   Trainer fits the adapter. Finished runs of the same recipe are reused.
4. Multi-label recognition of the 8 shapes on the test images (targets: each record's `labels`):
   zero-shot prompts, then every adapter. The sigma reported as "chosen" is the one with the best mean
   mAP on the *val* images.
5. Modality gap on the test set: image embeddings vs the embeddings of their captions.
6. Writes `<out>.json` and `<out>.md`.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (base_parser, command_line, machine_info, machine_line, pm, seed_summary,  # noqa: E402
                               set_threads, shapes_world)
from benchmarks.common import write_results as write_files  # noqa: E402

RECIPE = ROOT / "recipes" / "text_as_image.yaml"   # the adapter's recipe; its prompts are ShapesWorld's wording
# Caption frames of the scene captions the CLIP is trained on (the recipe's sentence frames are the same).
SHAPES_SENTENCE_FRAMES = ["{objects}.", "a picture of {objects}.", "an image with {objects}.",
                          "{objects} in the picture."]


def parse_args(argv=None):
    p = base_parser(__doc__, "docs/results/text_as_image", "runs/text_as_image", seeds=[0, 1, 2],
                    out_help="writes <out>.json and <out>.md")
    p.add_argument("--data", default="", help="ShapesWorld folder (default <runs>/data)")
    p.add_argument("--n-train", type=int, default=10000)
    p.add_argument("--n-val", type=int, default=500)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--model", default="", help="a trained CLIP to use instead of training one")
    p.add_argument("--captions", choices=("scene", "short"), default="scene", help="CLIP training captions")
    p.add_argument("--adjective-prob", type=float, default=0.5,
                   help="scene captions: chance that an object's size (and, separately, colour) is named")
    p.add_argument("--clip-config", default="small", help="bundled model config of the CLIP")
    p.add_argument("--steps", type=int, default=1500, help="CLIP optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--sentences", type=int, default=5000, help="training sentences")
    p.add_argument("--max-labels", type=int, default=4, help="labels per sentence: 1..k")
    p.add_argument("--lm", default="", help="local causal LM folder for the sentences (default: templates)")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--adapter-batch", type=int, default=128)
    p.add_argument("--adapter-lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--loss", choices=("asl", "ranking"), default="asl")
    p.add_argument("--seed", type=int, default=0, help="CLIP training seed and sentence seed (--seeds: adapters)")
    p.add_argument("--fresh", action="store_true", help="retrain the CLIP even when a finished run exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data and CLIP

def _ensure_data(args, data: Path) -> None:
    shapes_world(data, args.n_train, args.n_test, args.n_val, 0, args.data_seed)


def scene_caption(record: dict, rng: random.Random, adjective_prob: float = 0.5) -> str:
    """A caption naming every object of a ShapesWorld record, in random order.

    Each object's size and colour are each named with probability ``adjective_prob``: with both
    always named, colour alone tells the images of a batch apart and the CLIP learns little about
    shapes (measured: a linear probe for shapes on its text embeddings reached ~50% mAP).
    """
    objs = []
    for o in record["objects"]:
        words = [w for w in (o["size"], o["color"]) if rng.random() < adjective_prob] + [o["shape"]]
        objs.append(" ".join(words))
    rng.shuffle(objs)
    objs = [("an " if o[0] in "aeiou" else "a ") + o for o in objs]
    body = objs[0] if len(objs) == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]
    return rng.choice(SHAPES_SENTENCE_FRAMES).replace("{objects}", body)


def _write_scene_manifest(data: Path, split: str, adjective_prob: float) -> Path:
    """`<split>_scene.jsonl`: the split's records with `scene_caption` added (deterministic)."""
    src, dst = data / f"{split}.jsonl", data / f"{split}_scene.jsonl"
    lines = []
    for i, line in enumerate(src.read_text(encoding="utf-8").splitlines()):
        r = json.loads(line)
        r["scene_caption"] = scene_caption(r, random.Random(f"{split}:{i}"), adjective_prob)
        lines.append(json.dumps(r, ensure_ascii=False))
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, dst)
    return dst


def _train_clip(args, data: Path, runs: Path) -> tuple[Path, float]:
    from polymodal.train.reuse import train_or_reuse
    from polymodal.train.run import load_recipe
    # The scene captions are not in the recipe, so their setting goes into the run's name.
    out_dir = runs / (f"clip_scene_p{args.adjective_prob:g}" if args.captions == "scene" else "clip_short")
    key = args.captions + "_caption" if args.captions == "scene" else "caption"
    train = data / ("train_scene.jsonl" if args.captions == "scene" else "train.jsonl")
    overrides = [
        f"out_dir={out_dir}", f"model.name={args.clip_config}", f"data.train={train}", f"data.caption_key={key}",
        f"data.batch_size={args.batch_size}", f"tokenizer.vocab_size={args.vocab_size}",
        f"tokenizer.corpus_keys=[{key},long_caption]", f"optim.lr={args.clip_lr}",
        f"optim.warmup_steps={max(1, args.steps // 20)}", f"train.steps={args.steps}", f"train.seed={args.seed}",
        f"train.log_every={max(1, args.steps // 20)}", "train.ckpt_every=0", "train.eval_every=0",
        f"train.progress={'false' if args.quiet else 'true'}",
    ]
    model_dir, seconds, _ = train_or_reuse(load_recipe(None, overrides), fresh=args.fresh)
    return model_dir, seconds                          # as recorded when the run was made


# ----------------------------------------------------------------------------- experiment

def _adapter_recipe(args, model_dir: Path, data: Path, runs: Path, sigma: float, seed: int, num_sentences: int):
    """`recipes/text_as_image.yaml` with this experiment's settings (one adapter run)."""
    from polymodal.train.run import load_recipe
    batches = num_sentences // args.adapter_batch          # full batches per epoch (the loader drops the last)
    if batches < 1:
        raise SystemExit(f"--sentences {args.sentences} gives no full batch of --adapter-batch {args.adapter_batch}")
    overrides = [
        f"out_dir={runs / 'adapters' / f'sigma{sigma:g}_seed{seed}'}", f"model.path={model_dir}",
        f"text_as_image.classes={data / 'classes.json'}", f"text_as_image.seed={args.seed}",
        f"text_as_image.sigma={sigma}", f"text_as_image.sentences.num={args.sentences}",
        f"text_as_image.sentences.max_labels={args.max_labels}", f"text_as_image.adapter.alpha={args.alpha}",
        f"text_as_image.loss={args.loss}", f"text_as_image.cache_dir={runs / 'cache'}",
        f"data.batch_size={args.adapter_batch}", f"optim.lr={args.adapter_lr}",
        f"train.steps={args.epochs * batches}", f"train.seed={seed}", f"train.threads={args.threads}",
        f"train.ckpt_every={args.epochs * batches}", "train.progress=false", "eval.tasks=[]",
    ]
    if args.lm:
        overrides += ["text_as_image.sentences.generator=lm", f"text_as_image.sentences.lm_path={args.lm}"]
    return load_recipe(RECIPE, overrides)


def run(args) -> dict:
    """The whole experiment; returns the results dict (also written to `<out>.json/.md`)."""
    from polymodal.data.manifests import read_manifest
    from polymodal.data.sentences import extract_labels, generate_sentences
    from polymodal.eval.multilabel import (average_precision, cached_text_embeddings, label_embeddings,
                                           modality_gap, multilabel_eval_manifest, multilabel_targets)
    from polymodal.encode import encode_images, encode_texts
    from polymodal.hub import load_model
    from polymodal.models.multilabel import perturb
    from polymodal.train.reuse import train_or_reuse
    set_threads(args.threads)
    t0 = time.perf_counter()
    runs = Path(args.runs)
    data = Path(args.data) if args.data else runs / "data"
    _ensure_data(args, data)
    for split in ("train", "val", "test"):
        _write_scene_manifest(data, split, args.adjective_prob)
    train_s = 0.0
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir, train_s = _train_clip(args, data, runs)
    model = load_model(model_dir).eval()
    progress = not args.quiet

    # Images: embeddings and targets of val (for choices) and test (for the table).
    sets = {}
    names = None
    for split in ("val", "test"):
        recs = read_manifest(data / f"{split}_scene.jsonl", required=("image", "labels")).records
        img = encode_images(model, [r["image"] for r in recs], progress=progress)
        names = names or json.loads((data / "classes.json").read_text())["shapes"]
        sets[split] = (recs, img, multilabel_targets(recs, names, split))

    # The method's sentences (labels read back, those naming none dropped) and their cached embeddings;
    # a second, held-out set measures text-domain mAP.
    base = _adapter_recipe(args, model_dir, data, runs, args.sigmas[0], args.seed, args.sentences)
    method = base.method_impl
    sentences, y_text = method.training_sentences()
    tai = base.text_as_image
    held_out = generate_sentences(tai.sentences, names, method.adjective_groups(), seed=args.seed + 1000,
                                  num=max(200, args.sentences // 5), progress=progress)
    y_held = extract_labels(held_out, names)
    cache = runs / "cache"
    emb_text = cached_text_embeddings(model, sentences, cache, progress=progress)
    emb_held = cached_text_embeddings(model, held_out, cache, progress=progress)
    prompts = list(tai.prompts)
    w = label_embeddings(model, names, prompts)          # (C, E)

    rows = []
    zs = {s: multilabel_eval_manifest(model, data / f"{s}_scene.jsonl", names, templates=prompts,
                                      image_embeds=sets[s][1])["mAP"] for s in ("val", "test")}
    zs_text = average_precision(emb_held @ w.T, y_held)["mAP"]
    rows.append({"method": "zero-shot prompts", "sigma": None, "val_mAP": zs["val"], "val_std": 0.0,
                 "test_mAP": zs["test"], "test_std": 0.0, "seeds": 1, "text_mAP": zs_text, "perturbed_cosine": None})
    E = emb_text.shape[1]
    gen = torch.Generator().manual_seed(args.seed)
    adapter_s = 0.0
    for sigma in args.sigmas:
        val, test, text = [], [], []
        for seed in args.seeds:
            cfg = _adapter_recipe(args, model_dir, data, runs, sigma, seed, len(sentences))
            adapter_dir, seconds, _ = train_or_reuse(cfg, fresh=args.fresh)
            adapter_s += seconds
            adapter = load_model(adapter_dir).adapter.eval()           # the saved frozen encoder + adapter
            with torch.no_grad():
                for split, acc in (("val", val), ("test", test)):
                    acc.append(average_precision(adapter(sets[split][1]), sets[split][2])["mAP"])
                text.append(average_precision(adapter(emb_held), y_held)["mAP"])
        cos = float((perturb(emb_text, sigma, gen) * emb_text).sum(1).mean())
        v, t = seed_summary(val), seed_summary(test)
        rows.append({"method": "adapter", "sigma": sigma, "val_mAP": v["mean"], "val_std": v["std"],
                     "test_mAP": t["mean"], "test_std": t["std"], "seeds": t["n"], "text_mAP": statistics.fmean(text),
                     "perturbed_cosine": cos})
        if progress:
            print(f"sigma={sigma:g}: val mAP {v['mean']:.2f}, test mAP {pm(t['mean'], t['std'], t['n'], 2)}",
                  file=sys.stderr)

    adapters = [r for r in rows if r["method"] == "adapter"]
    chosen = max(adapters, key=lambda r: r["val_mAP"])
    at_zero = next((r for r in adapters if r["sigma"] == 0), None)

    # Modality gap on the test set: each image against its own caption(s).
    recs, img_test, _ = sets["test"]
    gap = {}
    for kind, key in (("scene", "scene_caption"), ("short", "caption")):
        txt = encode_texts(model, [r[key] for r in recs])
        gap[kind] = modality_gap(img_test, txt)
    gap["sentences_centroid_distance"] = float((torch.nn.functional.normalize(img_test, dim=-1).mean(0)
                                                - emb_text.mean(0)).norm())

    results = {
        "settings": {k: v for k, v in vars(args).items()},
        "model": str(model_dir), "embed_dim": E, "num_sentences": len(sentences),
        "labels_per_sentence": float(y_text.sum(1).mean()),
        "labels_per_test_image": float(sets["test"][2].sum(1).mean()),
        "rows": rows, "chosen_sigma_on_val": chosen["sigma"], "chosen_test_mAP": chosen["test_mAP"],
        "gain_chosen_vs_sigma0": (chosen["test_mAP"] - at_zero["test_mAP"]) if at_zero else None,
        "modality_gap": gap, "clip_train_s": train_s, "adapter_train_s": adapter_s,
        "adapter_steps": cfg.train.steps, "total_s": time.perf_counter() - t0,
    }
    write_results(results, Path(args.out))
    return results


def _f(x, nd=2):
    return "–" if x is None else f"{x:.{nd}f}"


def to_markdown(res: dict) -> str:
    s = res["settings"]
    lines = [
        "# Text as Image on ShapesWorld: multi-label adapter trained on text only",
        "",
        f"CLIP `{s['clip_config']}` (E = {res['embed_dim']}) trained on `{s['captions']}` captions"
        + (f" (size, colour each named with p = {s['adjective_prob']:g})" if s["captions"] == "scene" else "") + ", "
        f"{s['steps']} steps x {s['batch_size']} ({res['model']}); {res['num_sentences']} template sentences, "
        f"{res['labels_per_sentence']:.2f} labels each; test images have {res['labels_per_test_image']:.2f} "
        f"shapes each (8 labels). Adapter (`recipes/text_as_image.yaml`, trained by `run_recipe`): alpha "
        f"{s['alpha']}, loss {s['loss']}, {s['epochs']} epochs ({res.get('adapter_steps', '?')} steps x "
        f"{s['adapter_batch']}), seeds {s['seeds']} (mean ± sample std). mAP in %; sigma chosen on val. "
        f"Machine: {machine_line(res['machine'])}.",
        "",
        "| method | sigma | cos(text, perturbed) | val mAP | test mAP | held-out text mAP |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        sig = "–" if r["sigma"] is None else f"{r['sigma']:g}"
        mark = " **(chosen on val)**" if r["method"] == "adapter" and r["sigma"] == res["chosen_sigma_on_val"] else ""
        lines.append(f"| {r['method']}{mark} | {sig} | {_f(r['perturbed_cosine'], 3)} | "
                     f"{pm(r['val_mAP'], r['val_std'], r['seeds'], 2)} | "
                     f"{pm(r['test_mAP'], r['test_std'], r['seeds'], 2)} | "
                     f"{_f(r['text_mAP'])} |")
    g = res["modality_gap"]
    lines += [
        "",
        f"Chosen sigma {res['chosen_sigma_on_val']:g}: test mAP {res['chosen_test_mAP']:.2f}"
        + (f" ({res['gain_chosen_vs_sigma0']:+.2f} vs sigma = 0)." if res["gain_chosen_vs_sigma0"] is not None else "."),
        "",
        "Modality gap on the test images (image vs its own caption):",
        "",
        "| captions | centroid distance | matched cosine | mean pair cosine | matched − mean |",
        "|---|---|---|---|---|",
    ]
    for kind in ("scene", "short"):
        m = g[kind]
        lines.append(f"| {kind} | {m['centroid_distance']:.3f} | {m['matched_cosine']:.3f} | "
                     f"{m['mean_pair_cosine']:.3f} | {m['matched_minus_mean']:.3f} |")
    lines += ["", f"Centroid distance between the test images and the training sentences: "
              f"{g['sentences_centroid_distance']:.3f}.", "",
              f"CLIP training {res['clip_train_s']:.0f} s, adapter training {res.get('adapter_train_s', 0.0):.0f} s, "
              f"total {res['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def write_results(res: dict, out: Path) -> None:
    """`<out>.json` and `<out>.md` (the machine added to `res`)."""
    res.setdefault("command", command_line("text_as_image.py", __name__ == "__main__"))
    res.setdefault("machine", machine_info())
    write_files(out.parent, res, to_markdown(res), name=out.name)


def main(argv=None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = run(parse_args(argv))
    print(to_markdown(res))
    return res


if __name__ == "__main__":
    main()
