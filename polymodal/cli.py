"""The `polymodal` command. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

USER_ERRORS_DOC = """Errors the user can fix (bad recipe, manifest, image, video, checkpoint, path, full disk) print one
line, `polymodal: error: ...`, and exit with status 2; `--debug` (or POLYMODAL_DEBUG=1) shows the traceback."""


def _data_arguments(data: argparse.ArgumentParser, only: str | None = None) -> None:
    """The `data` subcommands; with `only`, just that one gets its arguments (its module is imported), so
    `polymodal data --help` lists them without importing the generators."""
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    for name, (add_arguments, _run, help_text, description) in _data_commands().items():
        p = dsub.add_parser(name, help=help_text, description=description)
        if only is None or only == name:
            _resolve(add_arguments)(p)


def _data_commands() -> dict:
    """`polymodal data NAME`: (argument adder, runner, help, description); functions as "module:name" strings."""
    return {
        "shapes": ("polymodal.data.synthetic.shapes:add_cli_arguments", "polymodal.data.synthetic.shapes:main_from_args",
                   "generate a ShapesWorld synthetic data set with manifests",
                   "Deterministic synthetic images of coloured shapes with short, long and Chinese captions, labels, "
                   "and a hard long-text test set."),
        "shapes-qa": ("polymodal.data.synthetic.shapes_qa:add_cli_arguments",
                      "polymodal.data.synthetic.shapes_qa:main_from_args",
                      "generate ShapesWorld visual questions (a VQA manifest with ten answers each)",
                      "ShapesWorld images with questions about colour, shape, size, count, existence and place "
                      "(what is where), ten annotator answers per question like VQAv2, and the question type."),
        "moving-qa": ("polymodal.data.synthetic.moving_qa:add_cli_arguments",
                      "polymodal.data.synthetic.moving_qa:main_from_args",
                      "write video questions (what moves, which way, what happens first) on a MovingShapes world",
                      "Questions whose answers are the truth of each MovingShapes video (what moves or changes, "
                      "whether anything moves, which direction, what it does, what happens first and last in "
                      "compound actions), ten annotator answers each, as video QA manifests."),
        "moving-shapes": ("polymodal.data.synthetic.moving_shapes:add_cli_arguments",
                          "polymodal.data.synthetic.moving_shapes:main_from_args",
                          "generate a MovingShapes synthetic video-text data set",
                          "Deterministic H.264 videos of moving, growing, recolouring shapes with English and Chinese "
                          "captions, order-sensitive pairs and hierarchical scene labels."),
        "moving-frames": ("polymodal.data.synthetic.moving_frames:add_cli_arguments",
                          "polymodal.data.synthetic.moving_frames:main_from_args",
                          "generate still MovingShapes frames as an image-text set (a video model's pretraining)",
                          "Single frames of MovingShapes videos (same objects, sizes, places and renderer) captioned "
                          "with what the frame shows of the actor (--positions: and where it is), for the CLIP a video "
                          "method adapts (recipes/clip_moving_standin.yaml)."),
        "frames": ("polymodal.data.command_args:frames_arguments", "polymodal.data.frame_shards:main_from_args",
                   "decode a video manifest once into webdataset shards of frames",
                   "Decodes each record's `video` (file, GIF or frame folder) into N frames and writes tar shards, so "
                   "training never decodes the same video twice."),
        "filter": ("polymodal.data.command_args:filter_arguments", "polymodal.prepare.filtering:main_from_args",
                   "score video-caption pairs with a frozen model and keep the best",
                   "M2-RAAP step 1 (our reconstruction): every pair of a video manifest is scored by a frozen image-text "
                   "model (mean frame embedding vs caption); pairs above --threshold or the top --keep fraction are "
                   "written with their scores, the dropped ones beside them, and a summary."),
        "preferences": ("polymodal.data.synthetic.preferences:add_cli_arguments",
                        "polymodal.data.synthetic.preferences:main_from_args",
                        "generate a synthetic preference world (Hummer's six dimensions)",
                        "Prompts and responses whose quality on accuracy, conciseness, depth, empathy, specificity "
                        "and tone is controlled: a clean base set, a conflicting and a low-conflict training set (also "
                        "one folder per dimension) and clean held-out pairs, as TRL-style prompt/chosen/rejected JSONL."),
        "counterfactual": ("polymodal.data.synthetic.counterfactual:add_cli_arguments",
                           "polymodal.data.synthetic.counterfactual:main_from_args",
                           "generate counterfactual social-concept questions on ShapesWorld (a neutral proxy)",
                           "Scenes where one attribute proxy of a figure (shape/size/colour standing in for "
                           "gender/age/race; no real people or groups) changes while all else is fixed, with concept "
                           "questions (roles, traits), a training set biased towards some attribute values "
                           "(--bias) and a balanced evaluation set, plus non-social task questions."),
        "aux-captions": ("polymodal.prepare.aux_captions:add_aux_arguments", "polymodal.prepare.aux_captions:aux_main",
                         "caption each video of a manifest with a CoCa (M2-RAAP's auxiliary captions)",
                         "Writes a copy of the manifest whose records carry the captions a captioner gives to N uniformly "
                         "spread frames of each video, in the field M2-RAAP's ACG reads (m2raap.aux_field)."),
        "import": ("polymodal.data.importers.cli:add_arguments", "polymodal.data.importers.cli:main",
                   "read a public dataset layout (COCO/Flickr Karpathy JSON, MSR-VTT, ...) into a manifest",
                   "Reads the dataset's root folder as shipped (or its annotation file) and writes our manifest: "
                   "media paths resolved, captions grouped per image or video, splits kept."),
        "shard": ("polymodal.data.command_args:shard_arguments", "polymodal.data.shards:shard_main",
                  "write a manifest as webdataset tar shards", None),
    }


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides (`polymodal recipe show RECIPE` lists the keys)")


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    rsub = p.add_subparsers(dest="recipe_cmd", required=True)
    show = rsub.add_parser("show", help="print every key of a recipe with its value, type and meaning",
                           description="Reads RECIPE (and the overrides), validates it like `polymodal train` would, "
                                       "and prints every key: value, type and a one-line description.")
    show.add_argument("recipe", help="recipe YAML")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory/checkpoint or bundled config name")
    from .eval.tasks import TASKS
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="manifest (JSONL/CSV), or an image folder (one subfolder per class)")
    p.add_argument("--classes", help='classes.json, a text file of class names, or the names inline: '
                                     'cat,dog,"red car" (zeroshot, multilabel); default: classes.json beside the '
                                     "manifest (inside an image folder, else the folder's subfolders)")
    p.add_argument("--lang", default="en", help="caption / prompt language (en, zh)")
    p.add_argument("--short-data", help="longtext: manifest for short-caption retrieval and zero-shot "
                                        "(default: test.jsonl beside --data)")
    p.add_argument("--val", help="linear_probe: the manifest that chooses the penalty (default: 20%% of --data); "
                                 "scene: the manifest that sets the thresholds")
    p.add_argument("--test", help="linear_probe: the scored manifest (default: test.jsonl beside --data)")
    p.add_argument("--limit", type=_non_negative, default=0, help="first N records only (0 = all)")
    p.add_argument("--num-frames", type=int, default=8, help="video_retrieval: frames per video")
    p.add_argument("--strategy", choices=("uniform", "keyframes", "scene"), default="uniform",
                   help="video_retrieval: how frames are chosen")
    p.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                   help="error: stop at the first bad record; skip: leave bad records out (counted)")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the task, as in a recipe's eval.tasks entry (repeatable), e.g. "
                        "-o val=data/val.jsonl (scene), -o rerank_top_k=10 (snps3_retrieval)")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="keep the encoded features in DIR (chunk by chunk, per model) and read them back on a later "
                        "run of the same model on the same inputs: a stopped eval continues, a probe sweep encodes once")
    add_device_arguments(p)
    p.add_argument("--out", help="write the metrics here (JSON); default: print only")


def add_device_arguments(p: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """`--device` and `--batch-size`, shared by every command that runs a model."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available, else cpu)")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="items per forward pass (default: each task's own)")


def _caption_arguments(p: argparse.ArgumentParser) -> None:
    from .caption import add_caption_arguments
    add_caption_arguments(p)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="extra recipe overrides key=value")


def int_at_least(low: int, note: str = ""):
    """An argparse `type` for integers >= `low` (`note` explains the bound in the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}{note}")
        return value
    return parse


_non_negative = int_at_least(0, " (0 = all records)")
positive_int = int_at_least(1)


# The command table: name -> (help, description, argument adder, runner). Adders and runners are imported
# only for the command being run, so `polymodal --help` never imports torch.
COMMANDS: dict[str, tuple[str, str | None, object, object]] = {
    "data": ("generate or convert data sets", None, _data_arguments, "polymodal.cli:_run_data"),
    "train": ("train a recipe (single process, or under torchrun for DDP)",
              "Train the run described by RECIPE (YAML). Overrides take the form key.sub=value, e.g. optim.lr=1e-3 "
              "train.steps=200. Runs resume from their last checkpoint in out_dir (train.resume=never to start "
              "over). For several processes: torchrun --nproc_per_node=N -m polymodal.cli train ...",
              _train_arguments, "polymodal.cli:_run_train"),
    "recipe": ("list a recipe's keys with values, types and descriptions", None, _recipe_arguments,
               "polymodal.cli:_run_recipe"),
    "eval": ("evaluate a model on a manifest and write JSON",
             "Evaluate MODEL (a saved directory, an HF CLIP dir, an OpenCLIP checkpoint, or a config name) on a "
             "manifest.", _eval_arguments, "polymodal.cli:_run_eval"),
    "benchmark": ("run the papers' evaluation protocols (coco-5k, msrvtt-1ka, imagenet-1k ...) and write a table",
                  "Run MODEL on named public benchmarks, each read from its root folder as shipped (split, captions per "
                  "item, frames and templates fixed by the protocol; polymodal benchmark --list): one row per "
                  "--dataset, as markdown, CSV and JSON. Imported manifests and finished numbers are cached, so a "
                  "stopped run continues where it stopped.",
                  "polymodal.eval.benchmark:add_arguments", "polymodal.eval.benchmark:main"),
    "caption": ("generate captions with a captioning model (CoCa / SyCoCa)", None, _caption_arguments,
                "polymodal.caption:caption_main"),
    "embed": ("embed a folder or manifest of images, videos and texts (resumable)",
              "Embed every image and video under FOLDER (recursive), or the records of a manifest, or the lines of a "
              ".txt file, with MODEL. Writes vectors.npy, items.jsonl, per-frame video embeddings with times and "
              "skipped.jsonl into --out, in chunks: a killed run continues where it stopped.",
              "polymodal.search.cli:add_embed_arguments", "polymodal.search.cli:main_embed"),
    "index": ("build a search index (FAISS) or add new files to one",
              "`index build MODEL --data FOLDER|MANIFEST --out INDEX` embeds and indexes (exact by default; "
              "--kind ivf|hnsw print their recall@10 against exact search); `index add INDEX --data ...` embeds "
              "only new or changed files.",
              "polymodal.search.cli:add_index_arguments", "polymodal.search.cli:main_index"),
    "search": ("search an index by text or image",
               "Print the best matches in INDEX for a text (or --image FILE); video hits show the best frame time. "
               "The model recorded in the index is used unless --model is given.",
               "polymodal.search.cli:add_search_arguments", "polymodal.search.cli:main_search"),
    "serve": ("serve an index over HTTP with a search page (localhost by default)",
              "Run the search API and web page for INDEX with uvicorn: GET /search?q=&k=, POST /search (image), "
              "GET /similar/{id}, GET /media/{id}, GET /healthz. Binds to 127.0.0.1 unless --host is given; "
              "--token (or $POLYMODAL_SEARCH_TOKEN) requires a bearer token.",
              "polymodal.search.cli:add_serve_arguments", "polymodal.search.cli:main_serve"),
    "export": ("write a CLIP model in HF transformers or OpenCLIP layout",
               "Export MODEL (a saved directory, an HF CLIP dir, an OpenCLIP checkpoint, or a config name) as a "
               "transformers CLIPModel directory (--format hf: CLIPModel/CLIPProcessor.from_pretrained load it) "
               "or an OpenCLIP checkpoint (--format openclip: open_clip_model.safetensors + open_clip_config.json).",
               "polymodal.convert.export:add_cli_arguments", "polymodal.cli:_run_export"),
    "report": ("write the report of a training run: metrics, curves, galleries (report.html + report.md)",
               "Reads RUN_DIR (a training run's out_dir: config.json, metrics.jsonl, final_metrics.json, model/) and "
               "writes report.html, report.md and curves.png there: the headline and the metrics grouped by task "
               "with chance levels, smoothed training-loss and validation-loss curves, text-to-image galleries on "
               "the recipe's retrieval manifests (the right image always shown, with its rank), and the recipe.",
               "polymodal.run_report:add_cli_arguments", "polymodal.run_report:main_from_args"),
    "demo": ("the main job: data, training, evaluation and a report in a few minutes",
             "Generates a small ShapesWorld, trains the small CLIP on it, evaluates short- and long-caption "
             "retrieval and zero-shot classification, and writes report.html + report.md in the run folder.",
             _demo_arguments, "polymodal.demo:run_demo"),
}


def _resolve(ref):
    """A function from a "module:name" string (imported now), or the function itself."""
    if not isinstance(ref, str):
        return ref
    import importlib
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: str | None = None, data_only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `only`, just that command gets its arguments (the others are listed by name),
    and with `data_only` just that `data` subcommand."""
    parser = argparse.ArgumentParser(prog="polymodal", description="Train, adapt and evaluate vision-language models.",
                                     epilog=USER_ERRORS_DOC)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (help_text, description, add_arguments, _run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=description or help_text)
        if name == "data" and only == name:
            _data_arguments(p, data_only)
        elif only is None or only == name:
            _resolve(add_arguments)(p)
    return parser


def _command_of(argv: list[str], names=None) -> str:
    """The first word of argv if it is one of `names` (default: the commands), else "": whose arguments to build."""
    for item in argv:
        if not item.startswith("-"):
            return item if item in (COMMANDS if names is None else names) else ""
    return ""


def resolve_device(name: str):
    """`auto` -> cuda when available, else cpu; an unavailable CUDA device is a clear error."""
    import torch
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def dumps_strict(obj, **kwargs) -> str:
    """JSON that other tools can read: NaN and infinities become null (json.dumps would write NaN)."""
    import math

    from .eval.report import tidy_float

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, float):
            return tidy_float(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def run_eval(args) -> dict:
    """`polymodal eval`: the eval table's task on a manifest (every path is checked before the model loads).

    The model is loaded as saved (`polymodal.load_model`: one loader for every family), so a training run's
    numbers come back from its `out_dir/model` with the same task options.
    """
    from .config import ConfigError, apply_overrides
    from .data.labels import classes_argument
    from .eval.tasks import EvalSpec, check_model, check_task, default_classes, evaluate, task_options
    from .hub import load_model
    data = Path(args.data)
    if not (data.is_file() or data.is_dir()):
        raise FileNotFoundError(f"--data: manifest or image folder {data} does not exist")
    classes = classes_argument(args.classes) if args.classes else default_classes(data)
    common = {"lang": args.lang, "limit": args.limit, "on_bad_record": args.on_bad_record}
    specs = [EvalSpec(args.task, str(data), dict(common))]
    if args.task in ("zeroshot", "multilabel") or (args.task == "linear_probe" and args.classes):
        specs[0].options["classes"] = classes
    for key in ("val", "test"):
        if getattr(args, key):
            specs[0].options[key] = getattr(args, key)
    if "num_frames" in task_options(args.task):
        if args.num_frames < 1:
            raise ValueError(f"--num-frames {args.num_frames} must be >= 1")
        specs[0].options.update(num_frames=args.num_frames, strategy=args.strategy)
    try:
        extra = apply_overrides({}, args.option)
    except ConfigError as e:
        raise ValueError(f"--option: {e}") from None
    nested = [k for k, v in extra.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"--option {nested[0]}.…: task options are flat KEY=VALUE pairs; allowed keys for "
                         f"{args.task!r}: {', '.join(task_options(args.task))}")
    specs[0].options.update(extra)
    check_task(args.task, specs[0].options, where="--option")
    if args.task == "longtext":     # long-text retrieval beside short-caption retrieval and zero-shot
        short = args.short_data or str(data.parent / "test.jsonl")
        specs = ([EvalSpec("retrieval", short, dict(common))] if Path(short).is_file() else []) + specs
        if (not isinstance(classes, str) or Path(classes).is_file()) and Path(short).is_file():
            specs.append(EvalSpec("zeroshot", short, {**common, "classes": classes}))
    if args.batch_size:             # every task that batches takes the size; the others ignore it
        for spec in specs:
            if "batch_size" in task_options(spec.task):
                spec.options["batch_size"] = args.batch_size
    device = resolve_device(args.device)
    model = load_model(args.model)
    for spec in specs:
        check_model(spec.task, model)
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"{args.model}: the model has no tokenizer files; save it with its tokenizer")
    from .data.languages import warn_if_unseen
    warn_if_unseen(model.tokenizer, args.lang, where=args.model)
    if args.feature_cache:
        from .feature_cache import caching, model_key
        with caching(Path(args.feature_cache) / f"features-{model_key(args.model)}"):
            metrics = evaluate(model.to(device), specs, progress=True)
    else:
        metrics = evaluate(model.to(device), specs, progress=True)
    if args.task != "longtext":     # one task: its numbers without the prefix, as before
        prefix = specs[0].prefix + "/"
        metrics = {k[len(prefix):]: v for k, v in metrics.items()}
    if args.task == "zeroshot":     # what the numbers were measured with, in the JSON beside them
        metrics.update(_zeroshot_prompts(specs[0], data))
    return metrics


def _zeroshot_prompts(spec, data: Path) -> dict:
    """The class names and prompt templates a zero-shot evaluation used."""
    from .eval.suite import load_classes
    from .eval.zeroshot import load_templates
    classes = spec.options["classes"]
    lang = spec.options.get("lang", "en")
    if data.is_dir() and not isinstance(classes, (list, tuple)) and not Path(classes).is_file():
        from .data.folders import read_image_folder
        classes = read_image_folder(data)[1]
    names = load_classes(classes)
    return {"class_names": names["classes"] if lang == "en" else names.get(f"classes_{lang}"),
            "templates": names.get("templates" if lang == "en" else f"templates_{lang}") or load_templates(lang)}


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


# Hints written with a recipe's keys, as the commands without a recipe spell them.
FLAG_HINTS = {
    "data.on_bad_record=skip": "--on-bad-record skip",
    "point data.train at another one": "give another --data",
}
FLAG_COMMANDS = ("eval", "benchmark", "embed", "index", "caption")


def _one_line(err: BaseException, command: str = "") -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename and \
            str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    text = " ".join(str(text).split())
    if command in FLAG_COMMANDS:                     # the hint names the flag of the command that is running
        for key, flag in FLAG_HINTS.items():
            text = text.replace(key, flag)
    return text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("POLYMODAL_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = _command_of(argv)
    data_only = _command_of(argv[argv.index(command) + 1:], _data_commands()) if command == "data" else None
    args = build_parser(only=command, data_only=data_only).parse_args(argv)
    try:
        return _dispatch(args)
    except Exception as err:     # one line for what the user can fix; tracebacks for the rest
        if debug or not _is_user_error(err):
            raise
        print(f"polymodal: error: {_one_line(err, command)}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    result = _resolve(COMMANDS[args.cmd][3])(args)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def recipe_defaults() -> dict:
    """Defaults of `polymodal train` under the recipe file. Torch's threads follow the idle cores unless the
    recipe says otherwise: all cores of an idle machine, fewer beside other work (benchmarks/threads.py)."""
    return {"train": {"threads": "auto"}}


def _run_data(args) -> None:
    _resolve(_data_commands()[args.data_cmd][1])(args)


def _run_train(args) -> None:
    from .train.run import load_recipe, run_recipe
    final = run_recipe(load_recipe(args.recipe, args.overrides, base=recipe_defaults()))
    if os.environ.get("RANK", "0") == "0":            # under torchrun: one result, from rank 0
        print(dumps_strict(final, indent=2))


def _run_recipe(args) -> None:
    from .train.describe import describe_recipe, format_keys
    from .train.run import load_recipe
    rows = describe_recipe(load_recipe(args.recipe, args.overrides, base=recipe_defaults()))
    print(dumps_strict(rows, indent=2, ensure_ascii=False) if args.json else format_keys(rows))


def _run_export(args) -> None:
    from .convert.export import main_from_args
    print(dumps_strict(main_from_args(args), indent=2, ensure_ascii=False))


def _run_eval(args) -> None:
    metrics = run_eval(args)
    if args.out:
        from .eval.report import write_json
        write_json(args.out, metrics)
    print(dumps_strict(metrics, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    sys.exit(main())
