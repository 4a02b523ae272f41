"""M2-Encoder bilingual vs English-only on ShapesWorld, evaluated in English and in Chinese. One command:

    python benchmarks/m2_bilingual.py --out docs/results/m2_bilingual

1. Generates ShapesWorld once (`--data`, default runs/m2_bilingual/data; reused when the settings match).
   Every image has an English and a Chinese caption, and every class an English and a Chinese name.
2. Trains recipes/m2_shapes.yaml (captions drawn from English and Chinese, one tokenizer trained on both)
   and recipes/m2_shapes_en.yaml (English only, the tokenizer never sees Chinese) with the same data,
   steps and seeds; as a reference, the same bilingual recipe with our CLIP of similar size
   (`--reference small`, `none` to skip). A finished run with the same config is reused.
3. Evaluates each model on the test split with English and with Chinese captions / prompt templates:
   text->image and image->text retrieval R@1 and zero-shot top-1 (64 colour+shape classes). The
   validation split is the one the recipes watch during training; nothing is tuned on the test split.
4. Writes `<out>/results.json` and `<out>/results.md`: one row per model and language, means over
   `--seeds`, the per-seed numbers in the JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (claim, claim_lines, command_line, experiment_parser, finish,  # noqa: E402
                               over_seeds, pm, prepare, seed_summary, train_variant)

VARIANTS = (  # name, recipe, label
    ("bilingual", "m2_shapes.yaml", "M2, bilingual (EN+ZH captions)"),
    ("english", "m2_shapes_en.yaml", "M2, English only"),
)
LANGS = ("en", "zh")
METRICS = {  # column -> run_suite key ({s} = "" for English, "_zh" for Chinese)
    "t2i_R1": "retrieval{s}/text_to_image_R@1",
    "i2t_R1": "retrieval{s}/image_to_text_R@1",
    "t2i_R10": "retrieval{s}/text_to_image_R@10",
    "zeroshot_top1": "zeroshot{s}/top1",
}


def parse_args(argv=None):
    p = experiment_parser(__doc__, "docs/results/m2_bilingual", "runs/m2_bilingual",
                          "M2 config name (default: the recipes' m2-small)")
    p.add_argument("--reference", default="small", help="CLIP config trained on the bilingual recipe ('none' = skip)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; tables show the mean")
    return p.parse_args(argv)


def _evaluate(model, data: Path) -> dict:
    """{lang: {column: value}} on the test split."""
    from polymodal.eval.tasks import run_suite
    m = run_suite(model, retrieval=str(data / "test.jsonl"), classes=str(data / "classes.json"), langs=LANGS)
    return {lang: {col: float(m[key.format(s="" if lang == "en" else f"_{lang}")]) for col, key in METRICS.items()}
            for lang in LANGS}


def _over_langs(per_seed: list[dict], stat: str) -> dict:
    """{lang: {column: `seed_summary(...)[stat]`}} of `_evaluate` results, one per seed."""
    return {lang: {col: seed_summary([r[lang][col] for r in per_seed])[stat] for col in METRICS} for lang in LANGS}


def claims(variants: dict) -> list[dict]:
    """What the table should show if bilingual training works, each with its numbers and whether it shows."""
    bi, en = variants["bilingual"]["mean"], variants["english"]["mean"]
    t2i = lambda v, lang: v[lang]["t2i_R1"]
    return [
        claim("the bilingual model retrieves with Chinese captions far better than the English-only model",
              f"ZH T2I R@1 {t2i(bi, 'zh'):.1f} vs {t2i(en, 'zh'):.1f}", t2i(bi, "zh") > 2 * max(t2i(en, "zh"), 1.0)),
        claim("the bilingual model classifies with Chinese prompts far better than the English-only model",
              f"ZH zero-shot {bi['zh']['zeroshot_top1']:.1f} vs {en['zh']['zeroshot_top1']:.1f}",
              bi["zh"]["zeroshot_top1"] > 2 * max(en["zh"]["zeroshot_top1"], 1.0)),
        claim("in Chinese the bilingual model is within 80% of its English T2I R@1",
              f"ZH {t2i(bi, 'zh'):.1f} vs EN {t2i(bi, 'en'):.1f}", t2i(bi, "zh") >= 0.8 * t2i(bi, "en")),
        claim("sharing the model with Chinese costs English T2I R@1 less than 20% (relative)",
              f"EN {t2i(bi, 'en'):.1f} (bilingual) vs {t2i(en, 'en'):.1f} (English only)",
              t2i(bi, "en") >= 0.8 * t2i(en, "en")),
    ]


def render_markdown(result: dict) -> str:
    st, ch = result["settings"], result["chance"]
    lines = [
        "# M2-Encoder: bilingual vs English-only on ShapesWorld",
        "",
        f"Command: `{st['command']}`  ",
        f"Data: ShapesWorld seed {st['data_seed']}, {st['n_train']} training images (each with an English and a "
        f"Chinese caption), test {st['n_test']} images x 4 captions per language. Model `{st['model']}`"
        f"{''.join(f' ({s})' for s in st['sets'])}, {st['steps']} steps of batch {st['batch_size']}, grouped "
        f"contrastive loss (one process: the group is this machine). Seeds {st['seeds']} (mean ± sample std). "
        f"Torch threads {st['threads']}. Total wall time {result['seconds']['total']:.0f} s.",
        "",
        "| model | eval language | T2I R@1 | I2T R@1 | T2I R@10 | zero-shot top-1 | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    n = len(st["seeds"])
    for v in result["variants"].values():
        for lang in LANGS:
            m, s = v["mean"][lang], v["std"][lang]
            cells = " | ".join(pm(m[c], s[c], n) for c in ("t2i_R1", "i2t_R1", "t2i_R10", "zeroshot_top1"))
            language = "English" if lang == "en" else "Chinese"
            lines.append(f"| {v['label']} | {language} | {cells} | {v['train_s']:.0f} |")
    lines += ["", f"Chance: T2I R@1 {ch['t2i_R1']:.2f}, T2I R@10 {ch['t2i_R10']:.1f}, zero-shot top-1 "
              f"{ch['zeroshot_top1']:.2f}. I2T R@1 is low for every model: many ShapesWorld captions are word for word "
              "the same for several test images, and a tie between the right caption and its twin of another "
              "image counts as a miss (ties are scored pessimistically). "
              "The English-only model's tokenizer has no Chinese pieces, so its Chinese rows show what a model "
              "that never saw the language does.", "", "## Claims at this scale", ""]
    return "\n".join(lines + claim_lines(result["claims"])) + "\n"


def run(args) -> dict:
    from polymodal.hub import load_model

    out, runs, data, start = prepare(args)
    recipes = Path(args.recipes)
    plan = [(name, recipes / recipe, label, list(args.sets)) for name, recipe, label in VARIANTS]
    if args.reference != "none":
        plan.append(("reference", recipes / "m2_shapes.yaml", f"CLIP `{args.reference}`, bilingual (reference)",
                     ["method=clip", f"model.name={args.reference}", "loss.gather=global_with_grad"]))

    def run_one(name, recipe, extra, seed) -> dict:
        print(f"[m2] {name} seed {seed}: training", flush=True)
        model_dir, secs, _ = train_variant(recipe, runs / f"{name}_s{seed}", data, args, seed, extra)
        metrics = _evaluate(load_model(model_dir), data)
        print(f"[m2] {name} seed {seed}: {metrics}", flush=True)
        return {**metrics, "train_s": secs}

    variants: dict = {}
    for name, recipe, label, extra in plan:
        res = over_seeds(args.seeds, lambda seed, n=name, r=recipe, e=extra: run_one(n, r, e, seed))
        per_seed = [{lang: r[lang] for lang in LANGS} for r in res["per_seed"]]
        variants[name] = {"label": label, "mean": _over_langs(per_seed, "mean"), "std": _over_langs(per_seed, "std"),
                          "per_seed": per_seed, "train_s": res["mean"]["train_s"]}

    n_classes = len(json.loads((data / "classes.json").read_text())["classes"])
    result = {
        "settings": {"command": command_line("m2_bilingual.py", __name__ == "__main__"),
                     "data_seed": args.data_seed, "n_train": args.n_train, "n_test": args.n_test, "steps": args.steps,
                     "batch_size": args.batch_size, "model": args.model or "m2-small (recipes)", "sets": args.sets,
                     "seeds": list(args.seeds), "threads": torch.get_num_threads()},
        "chance": {"t2i_R1": 100.0 / args.n_test, "t2i_R10": 1000.0 / args.n_test, "zeroshot_top1": 100.0 / n_classes},
        "variants": variants,
    }
    result["claims"] = claims(variants)
    return finish(out, result, start, render_markdown, "m2")


if __name__ == "__main__":
    run(parse_args())
