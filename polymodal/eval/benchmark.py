"""`polymodal benchmark MODEL --dataset NAME --root DIR [--out FILE]`: the papers' evaluation protocols by name.

A protocol is a public dataset read by its `polymodal data import` reader (split, captions per item) and one eval
task with fixed options (frames, paragraph mode, language, templates). Several `--dataset` values give one table,
one row per dataset, written as markdown, CSV and JSON (like clip_benchmark's). Each dataset's imported manifest
and its numbers are cached (`--cache`), so a benchmark stopped half-way continues with the datasets not done yet
when run again (`--fresh` recomputes). Within a dataset, features are kept chunk by chunk while it runs
(`polymodal.feature_cache`: 1,024 images, 256 videos, 4,096 texts a chunk), so a dataset stopped half-way
continues from its last finished chunk; they are deleted once the dataset's numbers are written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Protocol:
    """One named evaluation protocol.

    Attributes:
        format: the `polymodal data import` reader of the dataset's layout.
        split: the split read (None = the reader's whole file).
        task: the eval task (a row of `eval.tasks.TASKS`).
        options: the task's options (frames, paragraph mode, language ...).
        reader: the reader's options.
        folder: the dataset's usual folder name (looked for under a shared `--root`).
        headline: the keys shown in the table.
        doc: what the protocol is, for `--list` and the docs.
    """
    format: str
    split: str | None
    task: str
    options: dict = field(default_factory=dict)
    reader: dict = field(default_factory=dict)
    folder: str = ""
    headline: tuple = ()
    doc: str = ""


IMAGE_RETRIEVAL = ("text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10", "image_to_text_R@1",
                   "image_to_text_R@5", "image_to_text_R@10", "mean_recall")
VIDEO_RETRIEVAL = ("text_to_video_R@1", "text_to_video_R@5", "text_to_video_R@10", "text_to_video_median_rank",
                   "video_to_text_R@1", "video_to_text_R@5", "mean_recall")
ZEROSHOT = ("top1", "top5")
PREFERENCE = ("accuracy",)
VQA = ("vqa_accuracy", "majority_vqa_accuracy", "exact_match", "majority_exact_match", "answer_coverage")
MCQ = ("circular_accuracy", "vanilla_accuracy", "chance_circular_accuracy", "chance_vanilla_accuracy")

PROTOCOLS: dict[str, Protocol] = {
    "coco-5k": Protocol("karpathy", "test", "retrieval", folder="coco", headline=IMAGE_RETRIEVAL,
                        doc="COCO Karpathy test split: 5,000 images, 25,010 captions (about 5 per image)"),
    "flickr30k-1k": Protocol("karpathy", "test", "retrieval", folder="flickr30k", headline=IMAGE_RETRIEVAL,
                             doc="Flickr30k Karpathy test split: 1,000 images, 5,000 captions"),
    "imagenet-1k": Protocol("imagenet", "val", "zeroshot", folder="imagenet", headline=ZEROSHOT,
                            doc="ImageNet-1k validation, 50,000 images; the 1,000 class names and 80 OpenAI templates"),
    "imagenet-cn": Protocol("imagenet", "val", "zeroshot", {"lang": "zh"}, folder="imagenet", headline=ZEROSHOT,
                            doc="ImageNet-1k validation with the Chinese class names and templates (ImageNet-CN)"),
    "urban1k": Protocol("urban1k", None, "longtext", folder="Urban1k", headline=IMAGE_RETRIEVAL,
                        doc="Urban-1k: 1,000 images with long captions; long-text retrieval"),
    "dci": Protocol("dci", None, "longtext", folder="dci", headline=IMAGE_RETRIEVAL,
                    doc="DCI: densely captioned images; retrieval with the long captions"),
    "iiw": Protocol("iiw", None, "longtext", folder="iiw", headline=IMAGE_RETRIEVAL,
                    doc="ImageInWords: hand-written long descriptions; long-text retrieval"),
    "sharegpt4v-1k": Protocol("sharegpt4v", "test", "longtext", reader={"first_n": 1000}, folder="sharegpt4v",
                              headline=IMAGE_RETRIEVAL, doc="ShareGPT4V: the first 1,000 entries, long-text retrieval"),
    "sharegpt4v-10k": Protocol("sharegpt4v", "test", "longtext", reader={"first_n": 10000}, folder="sharegpt4v",
                               headline=IMAGE_RETRIEVAL, doc="ShareGPT4V: the first 10,000 entries, long-text retrieval"),
    "flickr30k-cn": Protocol("chinese-clip", "test", "retrieval", {"lang": "zh"}, folder="Flickr30k-CN",
                             headline=IMAGE_RETRIEVAL, doc="Flickr30k-CN test (Chinese-CLIP layout), Chinese captions"),
    "coco-cn": Protocol("coco-cn", "test", "retrieval", {"lang": "zh"}, folder="coco-cn", headline=IMAGE_RETRIEVAL,
                        doc="COCO-CN test: COCO images with Chinese captions"),
    "muge": Protocol("chinese-clip", "valid", "retrieval", {"lang": "zh"}, folder="MUGE", headline=IMAGE_RETRIEVAL,
                     doc="MUGE validation (Chinese-CLIP layout): a text may have several correct images"),
    "msrvtt-1ka": Protocol("msrvtt", "test", "video_retrieval", {"num_frames": 12}, folder="msrvtt",
                           headline=VIDEO_RETRIEVAL, doc="MSR-VTT 1k-A test (CLIP4Clip's JSFusion split): 1,000 "
                                                         "videos, one caption each; 12 uniform frames"),
    "msvd": Protocol("msvd", "test", "video_retrieval", {"num_frames": 12}, folder="msvd", headline=VIDEO_RETRIEVAL,
                     doc="MSVD test: 670 videos, about 40 captions each; 12 uniform frames"),
    "didemo": Protocol("didemo", "test", "video_retrieval", {"num_frames": 12, "paragraph": True}, folder="didemo",
                       headline=VIDEO_RETRIEVAL, doc="DiDeMo test, paragraph-to-video (a video's sentences joined)"),
    "activitynet": Protocol("activitynet", "val_1", "video_retrieval", {"num_frames": 12, "paragraph": True},
                            folder="activitynet", headline=VIDEO_RETRIEVAL,
                            doc="ActivityNet Captions val_1, paragraph-to-video"),
    "vqav2-val": Protocol("vqav2", "val2014", "vqa", folder="vqa", headline=VQA,
                          doc="VQAv2 val2014: 214,354 questions, ten answers each; VQA accuracy (10-choose-9 average, "
                              "official normalisation) beside the model's majority-answer baseline"),
    "textvqa-val": Protocol("textvqa", "val", "vqa", folder="textvqa", headline=VQA,
                            doc="TextVQA 0.5.1 val: 5,000 questions, ten answers each; VQA accuracy as for VQAv2"),
    "msrvtt-qa": Protocol("msrvtt-qa", "test", "vqa", folder="msrvtt-qa", headline=VQA,
                          doc="MSRVTT-QA test (Xu et al. 2017): 72,821 questions on 2,990 videos, one answer each, so "
                              "accuracy = exact match after the VQA normalisation; a video VQA model's own number of "
                              "uniform frames; per question type (what, who, how, when, where)"),
    "msvd-qa": Protocol("msvd-qa", "test", "vqa", folder="msvd-qa", headline=VQA,
                        doc="MSVD-QA test (Xu et al. 2017): 13,157 questions on 520 videos, one answer each; scored "
                            "as MSRVTT-QA"),
    "mmbench-dev": Protocol("mmbench", "dev", "mcq", folder="mmbench", headline=MCQ,
                            doc="MMBench dev (VLMEvalKit's MMBench_DEV_EN.tsv; -o tsv=NAME where the folder holds "
                                "several): CircularEval accuracy (every circular pass right) beside plain accuracy "
                                "and a uniform guess's"),
    "hh-rlhf": Protocol("hh-rlhf", "test", "preference", folder="hh-rlhf", headline=PREFERENCE,
                        doc="Anthropic HH-RLHF test pairs: reward accuracy (chosen scored above rejected)"),
    "ultrafeedback": Protocol("ultrafeedback", None, "preference", folder="ultrafeedback", headline=PREFERENCE,
                              doc="UltraFeedback binarised (the best mean rating against a strictly worse "
                                  "completion, seeded): reward accuracy"),
}


def protocol(name: str) -> Protocol:
    """The protocol `name` (ValueError listing the names when unknown)."""
    if name not in PROTOCOLS:
        from ..config import did_you_mean
        raise ValueError(f"--dataset: unknown protocol {name!r}{did_you_mean(name, PROTOCOLS)}; known: "
                         f"{', '.join(PROTOCOLS)} (polymodal benchmark --list)")
    return PROTOCOLS[name]


def resolve_roots(names: list[str], roots: list[str]) -> dict[str, Path]:
    """Every dataset's root folder, checked to exist before anything runs: the i-th `--root` for the i-th dataset
    (or the one `--root` for all), or below it the protocol's usual folder (`coco/`, `msrvtt/` ...) or a folder
    named after the protocol when one is there."""
    if len(roots) not in (1, len(names)):
        raise ValueError(f"--root: give one root per --dataset ({len(names)}) or one folder holding them all, "
                         f"got {len(roots)}")
    out = {}
    for i, n in enumerate(names):
        base = Path(roots[i] if len(roots) == len(names) else roots[0])
        if not base.exists():
            raise FileNotFoundError(f"--root: {base} (for {n}) does not exist")
        p = protocol(n)
        below = [base / f for f in (p.folder, n) if f and (base / f).is_dir()]
        out[n] = below[0] if below else base
    return out


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_benchmark(model: str, names: list[str], roots: list[str], cache: str, device: str = "cpu",
                  batch_size: int = 0, fresh: bool = False, limit: int = 0, decode_workers: int = 0,
                  import_options: dict | None = None) -> list[dict]:
    """Run the protocols `names` on `model`; returns one row per dataset ({dataset, task, metrics, ...}).

    Every dataset's imported manifest and numbers are cached under `cache`, keyed by the dataset root and the
    model folder, so a rerun continues with the datasets not finished before; the features of a dataset stopped
    half-way are kept chunk by chunk (`features-<model>/`), so it continues from its last finished chunk.
    """
    from ..data.importers import import_dataset
    from ..hub import load_model
    from .. import feature_cache
    from .tasks import EvalSpec, check_model, evaluate, task_options
    folders = resolve_roots(names, roots)
    cache_dir = Path(cache)
    model_key = feature_cache.model_key(model)
    loaded = None
    rows = []
    for n in names:
        p = protocol(n)
        root = folders[n]
        reader = {**p.reader, **(import_options or {})}
        data_dir = cache_dir / n / _key(str(root.resolve()), p.format, p.split, reader)
        manifest = data_dir / "manifest.jsonl"
        result = data_dir / f"result-{model_key}-{_key(limit)}.json"       # decode workers change no number
        if result.is_file() and not fresh:
            row = json.loads(result.read_text(encoding="utf-8"))
            print(f"[benchmark] {n}: cached ({result})", flush=True)
            rows.append(row)
            continue
        start = time.time()
        if not manifest.is_file() or fresh:
            print(f"[benchmark] {n}: importing {root} ({p.format}, split {p.split or 'all'})", flush=True)
            summary = import_dataset(p.format, root, manifest, p.split, **reader)
            (data_dir / "import.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
        if loaded is None:
            from ..cli import resolve_device
            loaded = load_model(model).to(resolve_device(device)).eval()
        options = dict(p.options)
        if (data_dir / "classes.json").is_file() and "classes" in task_options(p.task):
            options["classes"] = str(data_dir / "classes.json")
        if limit:
            options["limit"] = limit
        if batch_size and "batch_size" in task_options(p.task):
            options["batch_size"] = batch_size
        if decode_workers and "decode_workers" in task_options(p.task):
            options["decode_workers"] = decode_workers
        check_model(p.task, loaded)
        print(f"[benchmark] {n}: {p.task} on {manifest}", flush=True)
        spec = EvalSpec(p.task, str(manifest), options)
        prefix = spec.prefix + "/"
        features = data_dir / f"features-{model_key}"         # finished chunks: a stopped run continues there
        if fresh and features.exists():
            shutil.rmtree(features)
        with feature_cache.caching(features) as kept:
            metrics = {k[len(prefix):]: v for k, v in evaluate(loaded, [spec], progress=True).items()}
        row = {"dataset": n, "task": p.task, "protocol": p.doc, "root": str(root), "manifest": str(manifest),
               "options": options, "seconds": round(time.time() - start, 1), "metrics": metrics,
               "headline": list(p.headline)}
        from .report import write_json
        write_json(result, row)
        if features.exists():
            shutil.rmtree(features)                              # the numbers are kept: the features are not needed
        print(f"[benchmark] {n}: done in {row['seconds']} s"
              f"{f' ({kept.loaded} feature chunk(s) from the stopped run)' if kept.loaded else ''}", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> tuple[str, list[list]]:
    """(markdown table, CSV rows): one row per dataset with its headline numbers."""
    keys = list(dict.fromkeys(k for r in rows for k in r["headline"]))
    head = ["dataset", "task", *keys]
    body = [[r["dataset"], r["task"], *[r["metrics"].get(k, "") for k in keys]] for r in rows]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(md) + "\n", [head, *body]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `benchmark` command's arguments."""
    parser.add_argument("model", nargs="?", help="a saved model folder, checkpoint, or bundled config name")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME",
                        help=f"a protocol (repeat for a table): {', '.join(PROTOCOLS)}")
    parser.add_argument("--root", action="append", default=[], metavar="DIR",
                        help="the dataset's root folder as shipped: one per --dataset, in order, or one folder "
                             "holding each dataset in its usual folder (coco/, flickr30k/, msrvtt/ ...)")
    parser.add_argument("--out", help="write the table here: FILE.md, with FILE.csv and FILE.json beside it")
    parser.add_argument("--cache", default=".polymodal-benchmark",
                        help="imported manifests and finished numbers (default .polymodal-benchmark/)")
    parser.add_argument("--fresh", action="store_true", help="import and evaluate again, ignoring the cache")
    parser.add_argument("--limit", type=int, default=0, help="first N records of each dataset (0 = all)")
    parser.add_argument("--list", action="store_true", help="list the protocols and exit")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--batch-size", type=int, default=0, help="items per forward call (default: the task's)")
    parser.add_argument("--import-option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="a reader option for the datasets' import (e.g. -o image_root=DIR where a layout's images "
                             "live elsewhere: ImageInWords' DOCCI images, COCO-CN's COCO images)")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="video protocols: processes decoding videos while the model encodes (default 0)")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run `polymodal benchmark`: print the table and write it (markdown, CSV, JSON) to `--out`."""
    if args.list:
        for name, p in PROTOCOLS.items():
            print(f"{name:16s} {p.task:16s} {p.format:14s} {p.doc}")
        return {}
    if not args.model or not args.dataset:
        raise ValueError("benchmark: give a MODEL and at least one --dataset (polymodal benchmark --list)")
    if not args.root:
        raise ValueError("--root: give the dataset's root folder (or one folder holding every dataset)")
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit} must be >= 0")
    for name in args.dataset:
        protocol(name)
    if args.decode_workers < 0:
        raise ValueError(f"--decode-workers {args.decode_workers} must be >= 0")
    from ..config import ConfigError, apply_overrides
    try:
        import_options = apply_overrides({}, args.import_option)
    except ConfigError as e:
        raise ValueError(f"--import-option: {e}") from None
    rows = run_benchmark(args.model, args.dataset, args.root, args.cache, args.device, args.batch_size, args.fresh,
                         args.limit, args.decode_workers, import_options)
    md, csv_rows = table(rows)
    print(md)
    if args.out:
        import csv
        import io

        from ..fileio import atomic_open
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        base = out.with_suffix("")
        with atomic_open(base.with_suffix(".md"), "w", encoding="utf-8") as f:
            f.write(f"# polymodal benchmark of {args.model}\n\n{md}")
        buf = io.StringIO()
        csv.writer(buf).writerows(csv_rows)
        with atomic_open(base.with_suffix(".csv"), "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
        from .report import write_json
        write_json(base.with_suffix(".json"), {"model": args.model, "rows": rows})
    return {"rows": rows}


__all__ = ["PROTOCOLS", "Protocol", "protocol", "run_benchmark", "table", "resolve_roots"]
