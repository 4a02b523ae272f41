"""The `polymodal` command. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USER_ERRORS_DOC = """Errors the user can fix (bad recipe, manifest, image, video, checkpoint, path, full disk) print one
line, `polymodal: error: ...`, and exit with status 2; `--debug` (or POLYMODAL_DEBUG=1) shows the traceback."""


def _data_parser(sub) -> None:
    from .data import video
    from .data.shards import add_shard_arguments
    from .data.synthetic import moving_shapes, shapes
    from .eval import filtering
    data = sub.add_parser("data", help="generate or convert data sets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    commands = [
        ("shapes", shapes.add_cli_arguments, "generate a ShapesWorld synthetic data set with manifests",
         "Deterministic synthetic images of coloured shapes with short, long and Chinese captions, labels, and a "
         "hard long-text test set."),
        ("moving-shapes", moving_shapes.add_cli_arguments, "generate a MovingShapes synthetic video-text data set",
         "Deterministic H.264 videos of moving, growing, recolouring shapes with English and Chinese captions, "
         "order-sensitive pairs and hierarchical scene labels."),
        ("frames", video.add_cli_arguments, "decode a video manifest once into webdataset shards of frames",
         "Decodes each record's `video` (file, GIF or frame folder) into N frames and writes tar shards, so "
         "training never decodes the same video twice."),
        ("filter", filtering.add_cli_arguments, "score video-caption pairs with a frozen model and keep the best",
         "M2-RAAP step 1 (our reconstruction): every pair of a video manifest is scored by a frozen image-text model "
         "(mean frame embedding vs caption); pairs above --threshold or the top --keep fraction are written with "
         "their scores, the dropped ones beside them, and a summary."),
        ("shard", add_shard_arguments, "write a manifest as webdataset tar shards", None),
    ]
    for name, add_arguments, help_text, description in commands:
        add_arguments(dsub.add_parser(name, help=help_text, description=description))


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
    from .eval.tasks import TASKS
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="manifest (JSONL/CSV)")
    p.add_argument("--classes", help="classes.json or a text file of class names (zeroshot, multilabel); "
                                     "default: classes.json beside the manifest")
    p.add_argument("--lang", default="en", help="caption / prompt language (en, zh)")
    p.add_argument("--short-data", help="longtext: manifest for short-caption retrieval and zero-shot "
                                        "(default: test.jsonl beside --data)")
    p.add_argument("--limit", type=_non_negative, default=0, help="first N records only (0 = all)")
    p.add_argument("--num-frames", type=int, default=8, help="video_retrieval: frames per video")
    p.add_argument("--strategy", choices=("uniform", "keyframes", "scene"), default="uniform",
                   help="video_retrieval: how frames are chosen")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="error: stop at the first bad record; skip: leave bad records out (counted)")
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


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0 (0 = all records)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polymodal", description="Train, adapt and evaluate vision-language models.",
                                     epilog=USER_ERRORS_DOC)
    sub = parser.add_subparsers(dest="cmd", required=True)
    _data_parser(sub)
    _train_parser(sub)
    _eval_parser(sub)
    _caption_parser(sub)
    _demo_parser(sub)
    return parser


def run_eval(args) -> dict:
    """`polymodal eval`: the eval table's task on a manifest (every path is checked before the model loads)."""
    from .eval.tasks import EvalSpec, evaluate
    from .hub import load_model
    data = Path(args.data)
    if not data.is_file():
        raise FileNotFoundError(f"--data: manifest {data} does not exist")
    if args.classes and not Path(args.classes).is_file():
        raise FileNotFoundError(f"--classes: {args.classes} does not exist")
    classes = args.classes or str(data.parent / "classes.json")
    common = {"lang": args.lang, "limit": args.limit, "on_bad_record": args.on_bad_record}
    specs = [EvalSpec(args.task, str(data), dict(common))]
    if args.task in ("zeroshot", "multilabel"):
        specs[0].options["classes"] = classes
    if args.task == "scene":           # the scene heads are saved beside the video model
        specs[0].options["heads"] = args.model
    if args.task == "video_retrieval":
        if args.num_frames < 1:
            raise ValueError(f"--num-frames {args.num_frames} must be >= 1")
        specs[0].options.update(num_frames=args.num_frames, strategy=args.strategy)
    if args.task == "longtext":     # long-text retrieval beside short-caption retrieval and zero-shot
        short = args.short_data or str(data.parent / "test.jsonl")
        specs = ([EvalSpec("retrieval", short, dict(common))] if Path(short).is_file() else []) + specs
        if Path(classes).is_file() and Path(short).is_file():
            specs.append(EvalSpec("zeroshot", short, {**common, "classes": classes}))
    model = load_model(args.model)
    if model.tokenizer is None:
        raise ValueError(f"{args.model}: the model has no tokenizer files; save it with its tokenizer")
    metrics = evaluate(model, specs, progress=True)
    if args.task != "longtext":     # one task: its numbers without the prefix, as before
        prefix = specs[0].prefix + "/"
        metrics = {k[len(prefix):]: v for k, v in metrics.items()}
    return metrics


def _is_user_error(err: BaseException) -> bool:
    """Errors a user fixes by changing an input: the project's own error types, a missing file, a full disk,
    and ValueError/KeyError raised by polymodal's own checks (not from inside torch or another library)."""
    import errno
    from .config import ConfigError
    from .data.manifests import ManifestError
    from .data.images import ImageError
    from .hub import CheckpointError
    from .data.video import VideoError
    from .train.checkpoint import CheckpointWriteError
    from .train.loop import DataExhausted, DataLoaderStuck, TrainingDiverged
    own = (ConfigError, ManifestError, ImageError, VideoError, CheckpointError, CheckpointWriteError,
           TrainingDiverged, DataExhausted, DataLoaderStuck, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    if isinstance(err, own) or (isinstance(err, OSError) and err.errno == errno.ENOSPC):
        return True
    if isinstance(err, (ValueError, KeyError)):
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        package = str(Path(__file__).resolve().parent)
        return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(package)
    return False


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename and \
            str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("POLYMODAL_DEBUG", "") not in ("", "0")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return _dispatch(args)
    except Exception as err:     # one line for what the user can fix; tracebacks for the rest
        if debug or not _is_user_error(err):
            raise
        print(f"polymodal: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.cmd == "data":
        if args.data_cmd == "shapes":
            from .data.synthetic.shapes import main_from_args
            main_from_args(args)
        elif args.data_cmd == "moving-shapes":
            from .data.synthetic.moving_shapes import main_from_args as moving_main
            moving_main(args)
        elif args.data_cmd == "frames":
            from .data.video import main_from_args as frames_main
            frames_main(args)
        elif args.data_cmd == "filter":
            from .eval.filtering import main_from_args as filter_main
            filter_main(args)
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
