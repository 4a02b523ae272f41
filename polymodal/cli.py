"""The `polymodal` command. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EVAL_TASKS = ("retrieval", "zeroshot", "longtext", "multilabel", "captioning")


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="generate or convert data sets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    shapes = dsub.add_parser("shapes", help="generate a ShapesWorld synthetic data set with manifests",
                             description="Deterministic synthetic images of coloured shapes with short, long and "
                                         "Chinese captions, labels, and a hard long-text test set.")
    from .data.synthetic.shapes import add_cli_arguments
    add_cli_arguments(shapes)
    shard = dsub.add_parser("shard", help="write a manifest as webdataset tar shards")
    from .data.shards import add_shard_arguments
    add_shard_arguments(shard)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a recipe (single process, or under torchrun for DDP)",
                       description="Train the run described by RECIPE (YAML). Overrides take the form "
                                   "key.sub=value, e.g. optim.lr=1e-3 train.steps=200. Runs resume from "
                                   "their last checkpoint in out_dir (train.resume=never to start over). "
                                   "For several processes: torchrun --nproc_per_node=N -m polymodal.cli train ...")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a manifest and write JSON",
                       description="Evaluate MODEL (a saved directory, an HF CLIP dir, an OpenCLIP checkpoint, "
                                   "or a config name) on a manifest.")
    p.add_argument("model", help="model directory/checkpoint or bundled config name")
    p.add_argument("--task", required=True, choices=EVAL_TASKS)
    p.add_argument("--data", required=True, help="manifest (JSONL/CSV)")
    p.add_argument("--classes", help="classes.json or a text file of class names (zeroshot, multilabel); "
                                     "default: classes.json beside the manifest")
    p.add_argument("--lang", default="en", help="caption / prompt language (en, zh)")
    p.add_argument("--short-data", help="longtext: manifest for short-caption retrieval and zero-shot "
                                        "(default: test.jsonl beside --data)")
    p.add_argument("--limit", type=int, default=0, help="first N records only")
    p.add_argument("--out", help="write the metrics here (JSON); default: print only")


def _caption_parser(sub) -> None:
    try:
        from .caption import add_caption_arguments
    except ModuleNotFoundError:   # the captioning family is optional
        return
    p = sub.add_parser("caption", help="generate captions with a captioning model (CoCa / SyCoCa)")
    add_caption_arguments(p)


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: data, training, evaluation and a report in a few minutes",
                       description="Generates a small ShapesWorld, trains the small CLIP on it, evaluates short- and "
                                   "long-caption retrieval and zero-shot classification, and writes report.html + "
                                   "report.md in the run folder.")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra recipe overrides key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polymodal", description="Train, adapt and evaluate vision-language models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _data_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _caption_parser(sub)
    _demo_parser(sub)
    return parser


def run_eval(args) -> dict:
    from .eval.suite import retrieval_eval, run_suite, zeroshot_eval_manifest
    from .hub import load_model
    model = load_model(args.model)
    if model.tokenizer is None:
        raise SystemExit(f"{args.model}: the model has no tokenizer files; save it with its tokenizer")
    data = Path(args.data)
    classes = args.classes or str(data.parent / "classes.json")
    sfx = "" if args.lang == "en" else f"_{args.lang}"
    if args.task == "retrieval":
        return retrieval_eval(model, data, f"caption{sfx}", args.limit, progress=True)
    if args.task == "zeroshot":
        return zeroshot_eval_manifest(model, data, classes, args.lang, args.limit, progress=True)
    if args.task == "longtext":
        short = args.short_data or str(data.parent / "test.jsonl")
        return run_suite(model, retrieval=short if Path(short).is_file() else None, longtext=str(data),
                         classes=classes if Path(classes).is_file() else None, langs=(args.lang,),
                         limit=args.limit, progress=True)
    if args.task == "multilabel":
        from .methods.text_as_image import multilabel_eval_manifest
        return multilabel_eval_manifest(model, data, classes, lang=args.lang, limit=args.limit)
    if args.task == "captioning":
        from .caption import captioning_eval_manifest
        return captioning_eval_manifest(model, data, limit=args.limit)
    raise SystemExit(f"unknown task {args.task}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    if args.cmd == "data":
        if args.data_cmd == "shapes":
            from .data.synthetic.shapes import main_from_args
            main_from_args(args)
        else:
            from .data.shards import shard_main
            shard_main(args)
    elif args.cmd == "train":
        from .train.run import load_recipe, run_recipe
        final = run_recipe(load_recipe(args.recipe, args.overrides))
        print(json.dumps(final, indent=2))
    elif args.cmd == "eval":
        metrics = run_eval(args)
        if args.out:
            from .eval.report import write_json
            write_json(args.out, metrics)
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
    elif args.cmd == "caption":
        from .caption import caption_main
        caption_main(args)
    elif args.cmd == "demo":
        from .demo import run_demo
        run_demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
