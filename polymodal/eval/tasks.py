"""The one evaluation table: task name -> function `(model, manifest, **options) -> dict of numbers`.

Used by `polymodal eval --task NAME` and by the Trainer's periodic evaluation (a recipe's `eval.tasks`).
A new family adds a row here (video retrieval, preference accuracy, fairness skew ...) and nothing else.

Options every task accepts: `lang` ("en", "zh" ...: which captions / prompts), `limit` (first N records;
0 = all), `progress` (show progress bars), `classes` (a classes file, where the task needs one),
`on_bad_record` ("error" | "skip"), `cache` (a `FeatureCache` shared by the tasks of one evaluation, so a
manifest's images are encoded once). Unknown options are errors naming the task.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Task functions import their modules (and torch) when they run: `polymodal eval --help` reads this table.


def _retrieval(model, manifest, lang: str = "en", limit: int = 0, progress: bool = False, cache=None,
               on_bad_record: str = "error") -> dict:
    from .suite import retrieval_eval
    key = "caption" if lang == "en" else f"caption_{lang}"
    return retrieval_eval(model, manifest, key, limit, progress=progress, cache=cache, on_bad_record=on_bad_record)


def _longtext(model, manifest, lang: str = "en", limit: int = 0, progress: bool = False, cache=None,
              on_bad_record: str = "error") -> dict:
    from .suite import longtext_eval
    return longtext_eval(model, manifest, lang, limit, progress=progress, cache=cache, on_bad_record=on_bad_record)


def default_classes(manifest) -> str:
    """classes.json inside an image folder, else beside the manifest."""
    path = Path(manifest)
    return str(path / "classes.json" if path.is_dir() else path.parent / "classes.json")


def _zeroshot(model, manifest, classes: str = "", lang: str = "en", limit: int = 0, progress: bool = False,
              cache=None, on_bad_record: str = "error") -> dict:
    from .suite import zeroshot_eval_manifest
    classes = classes or default_classes(manifest)
    return zeroshot_eval_manifest(model, manifest, classes, lang, limit, progress=progress, cache=cache,
                                  on_bad_record=on_bad_record)


def _multilabel(model, manifest, classes: str = "", lang: str = "en", limit: int = 0, progress: bool = False,
                cache=None, on_bad_record: str = "error", adapter: str = "") -> dict:
    from .multilabel import multilabel_eval_manifest
    classes = classes or default_classes(manifest)
    return multilabel_eval_manifest(model, manifest, classes, lang=lang, limit=limit,
                                    adapter=adapter or getattr(model, "adapter", None),
                                    progress=progress, on_bad_record=on_bad_record, cache=cache)


def _captioning(model, manifest, limit: int = 0, progress: bool = False, lang: str = "en", cache=None,
                on_bad_record: str = "error", precision: str = "fp32", precision_force: bool = False) -> dict:
    from .captioning import captioning_eval_manifest
    if not hasattr(model, "generate"):
        raise ValueError(f"captioning: the model is a {type(model).__name__}, not a captioner (model_type 'coca'); "
                         f"use the retrieval or zeroshot task for dual encoders")
    if lang != "en":
        raise ValueError("captioning: only lang=en is supported (references come from `captions`/`caption`)")
    return captioning_eval_manifest(model, manifest, limit=limit, progress=progress, on_bad_record=on_bad_record,
                                    precision=precision, precision_force=precision_force)


def _video_retrieval(model, manifest, lang: str = "en", limit: int = 0, progress: bool = False, cache=None,
                     on_bad_record: str = "error", num_frames: int = 8, strategy: str = "uniform",
                     paragraph: bool = False, dsl: float = 0.0, decode_workers: int = 0) -> dict:
    from .video_retrieval import video_retrieval_eval
    key = "caption" if lang == "en" else f"caption_{lang}"
    return video_retrieval_eval(model, manifest, key, limit, num_frames=num_frames, strategy=strategy,
                                progress=progress, on_bad_record=on_bad_record, paragraph=paragraph, dsl=dsl,
                                decode_workers=decode_workers)


def _lazy(module: str, name: str) -> Callable[..., dict]:
    """A row whose function is imported from `polymodal.eval.<module>` only when used (its options too)."""
    def resolve():
        import importlib
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)

    def run(model, manifest, **options) -> dict:
        return resolve()(model, manifest, **options)

    run.resolve = resolve
    return run


TASKS: dict[str, Callable[..., dict]] = {
    "retrieval": _retrieval,
    "longtext": _longtext,
    "zeroshot": _zeroshot,
    "multilabel": _multilabel,
    "captioning": _captioning,
    "video_retrieval": _video_retrieval,
    "shenet_retrieval": _lazy("hierarchy_retrieval", "shenet_retrieval_task"),
    "scene": _lazy("scene", "scene_eval_task"),
    "snps3_retrieval": _lazy("snps3_retrieval", "snps3_retrieval_task"),
    "preference": _lazy("preference", "preference_eval_task"),
    "fairness": _lazy("fairness", "fairness_task"),
    "linear_probe": _lazy("linear_probe", "linear_probe_task"),
    "classification": _lazy("classification", "classification_task"),
    "vqa": _lazy("vqa", "vqa_task"),
    "mcq": _lazy("mcq", "mcq_task"),
}


# What a task calls on the model (each tuple: one of these names must exist), checked before anything runs.
NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "retrieval": (("encode_image",), ("encode_text",)),
    "longtext": (("encode_image",), ("encode_text",)),
    "zeroshot": (("encode_image",), ("encode_text",)),
    "multilabel": (("encode_image",), ("encode_text",)),
    "captioning": (("generate",),),
    "video_retrieval": (("video_features", "encode_video", "encode_image"), ("text_features", "encode_text")),
    "shenet_retrieval": (("node_batch",),),
    "scene": (("label_embeddings",),),
    "snps3_retrieval": (("cross_pass",),),
    "preference": (("score_pairs",),),
    "fairness": (("answer_probabilities",),),
    "linear_probe": (("encode_image", "video_features", "encode_video"),),
    "classification": (("classify",),),
    "vqa": (("answer_logits", "generate_text"),),
    "mcq": (("answer_logits", "option_logprobs", "generate_text"),),
}
# Tasks that can check their data without a model: called on a recipe's eval data before the first training step,
# so a bad record stops the run at start-up rather than at the first evaluation.
DATA_CHECKS: dict[str, Callable[..., int]] = {"vqa": _lazy("vqa", "check_vqa_manifest"),
                                             "mcq": _lazy("mcq", "check_mcq_manifest")}


def check_task_data(spec) -> None:
    """Run the data check of `spec`'s task on its manifest, where the task has one (`DATA_CHECKS`)."""
    if spec.task in DATA_CHECKS:
        DATA_CHECKS[spec.task].resolve()(spec.data, **spec.options)


SUGGEST = {"score_pairs": "preference", "answer_probabilities": "fairness", "label_embeddings": "scene",
           "cross_pass": "snps3_retrieval", "node_batch": "shenet_retrieval", "generate": "captioning",
           "encode_video": "video_retrieval", "classify": "classification", "answer_logits": "vqa",
           "encode_image": "retrieval"}


def check_model(name: str, model) -> None:
    """Raise a one-line ValueError when `model` lacks what task `name` calls (naming the model and a task it fits)."""
    missing = [alts for alts in NEEDS.get(name, ()) if not any(hasattr(model, a) for a in alts)]
    if not missing:
        return
    kind = getattr(getattr(model, "config", None), "model_type", None)
    fits = [task for attr, task in SUGGEST.items() if hasattr(model, attr) and not
            any(not any(hasattr(model, a) for a in alts) for alts in NEEDS[task])]
    raise ValueError(f"eval task {name!r} needs a model with {' and '.join('/'.join(a) for a in missing)}, but the "
                     f"model is a {type(model).__name__}" + (f" (model_type {kind!r})" if kind else "") +
                     (f"; tasks it supports: {', '.join(dict.fromkeys(fits))}" if fits else ""))


def task_options(name: str) -> list[str]:
    """The option names task `name` accepts."""
    fn = TASKS[name]
    fn = fn.resolve() if hasattr(fn, "resolve") else fn
    return [p for p in inspect.signature(fn).parameters if p not in ("model", "manifest")]


def check_task(name: str, options: dict, where: str = "eval") -> None:
    """Raise ValueError for an unknown task or an option the task does not take (before anything runs)."""
    if name not in TASKS:
        raise ValueError(f"{where}: unknown eval task {name!r}; known: {', '.join(TASKS)}")
    allowed = task_options(name)
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: task {name!r} takes no option(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(allowed)}")


def run_task(name: str, model, manifest, **options) -> dict:
    """Run eval task `name` on `manifest`; returns its numbers (unprefixed)."""
    check_task(name, options)
    check_model(name, model)
    return TASKS[name](model, manifest, **options)


@dataclass
class EvalSpec:
    """One evaluation: a task on a manifest with its options; `prefix` names its keys in the results."""
    task: str
    data: str
    options: dict = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        lang = self.options.get("lang", "en")
        return self.task if lang == "en" else f"{self.task}_{lang}"


@dataclass
class EvalConfig:
    """The recipe's `eval` section.

    `tasks` lists evaluations, each `{task: NAME, data: MANIFEST, ...options}` (see `TASKS`). The shorthand
    keys `retrieval`, `longtext`, `zeroshot`, `classes`, `langs` and `limit` expand to retrieval, long-text
    and zero-shot tasks for every language in `langs` (zero-shot on the `retrieval` manifest unless
    `zeroshot` is set, and only with a classes file).
    """
    tasks: list = field(default_factory=list)  # [{task: NAME, data: MANIFEST, ...options}] (see TASKS)
    retrieval: str = ""                  # manifest for short-caption retrieval (and zero-shot)
    longtext: str = ""                   # manifest with long captions (hard set)
    zeroshot: str = ""                   # manifest with labels (default: `retrieval`)
    classes: str = ""                    # classes.json for zero-shot
    langs: list = field(default_factory=lambda: ["en"])  # languages of the shorthand tasks
    limit: int = 0                       # evaluate the first N records (0 = all)

    def specs(self, where: str = "eval") -> list[EvalSpec]:
        """Every evaluation this section describes, checked (task names, options, limit) before any runs."""
        if self.limit < 0:
            raise ValueError(f"{where}.limit: {self.limit} must be >= 0 (0 = all records)")
        out: list[EvalSpec] = []
        for lang in self.langs:
            common = {"lang": lang, "limit": self.limit}
            if self.retrieval:
                out.append(EvalSpec("retrieval", self.retrieval, dict(common)))
            if self.longtext:
                out.append(EvalSpec("longtext", self.longtext, dict(common)))
            zs = self.zeroshot or self.retrieval
            if zs and (self.classes or Path(zs).is_dir()):     # an image folder names its classes itself
                out.append(EvalSpec("zeroshot", zs, {**common, "classes": self.classes or default_classes(zs)}))
        for i, item in enumerate(self.tasks):
            here = f"{where}.tasks[{i}]"
            if not isinstance(item, dict) or "task" not in item or "data" not in item:
                raise ValueError(f"{here}: each entry needs `task` and `data`, e.g. "
                                 f"{{task: retrieval, data: data/test.jsonl}}; got {item!r}")
            options = {k: v for k, v in item.items() if k not in ("task", "data")}
            check_task(item["task"], options, here)
            out.append(EvalSpec(item["task"], str(item["data"]), options))
        return out

    def paths(self) -> list[str]:
        """Every file the evaluation will open (checked to exist before training starts)."""
        files = [p for p in (self.retrieval, self.longtext, self.zeroshot, self.classes) if p]
        for item in self.tasks:
            if isinstance(item, dict):
                files += [str(item[k]) for k in ("data", "classes", "adapter", "val", "test", "majority_from")
                          if item.get(k)]
        return files


# Task options with a flag of their own in `polymodal eval`; every other option goes through `-o KEY=VALUE`.
CLI_FLAGS = {"lang": "--lang", "limit": "--limit", "classes": "--classes", "on_bad_record": "--on-bad-record",
             "num_frames": "--num-frames", "strategy": "--strategy", "batch_size": "--batch-size", "val": "--val",
             "test": "--test"}


def eval_command(spec: EvalSpec, model: str) -> list[str]:
    """The `polymodal eval` arguments that run `spec` on the saved model folder `model` (as argv, after the
    program name), so a number a training run reports can be reproduced from its `out_dir/model`.

    Returns:
        e.g. ["eval", "runs/x/model", "--task", "scene", "--data", "test.jsonl", "--num-frames", "8",
        "-o", "val=val.jsonl"]; its output holds the spec's numbers without the `prefix/`.
    """
    import json
    argv = ["eval", str(model), "--task", spec.task, "--data", str(spec.data)]
    for key, value in spec.options.items():
        if key in ("progress", "cache"):
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        argv += [CLI_FLAGS[key], text] if key in CLI_FLAGS else ["-o", f"{key}={text}"]
    return argv


def evaluate(model, specs: list[EvalSpec], progress: bool = False) -> dict:
    """Run every spec; returns one flat dict `{prefix/metric: value}` (e.g. `retrieval/text_to_image_R@1`,
    `zeroshot_zh/top1`). Images of a manifest are encoded once for all its tasks."""
    from .suite import FeatureCache
    cache = FeatureCache()
    out: dict = {}
    was_training = model.training
    model.eval()
    try:
        for spec in specs:
            m = run_task(spec.task, model, spec.data, progress=progress, cache=cache, **spec.options)
            out.update({f"{spec.prefix}/{k}": v for k, v in m.items()})
    finally:
        model.train(was_training)
    return out


def run_suite(model, retrieval: str | None = None, longtext: str | None = None, zeroshot: str | None = None,
              classes: str | None = None, langs: tuple[str, ...] = ("en",), limit: int = 0,
              progress: bool = False) -> dict:
    """Every evaluation that has data, as one flat dict of numbers (the `eval` shorthand keys of a recipe).

    Args:
        retrieval: manifest for short-caption retrieval (and zero-shot when `zeroshot` is None).
        longtext: manifest with `long_caption` (e.g. ShapesWorld's hard set) for long-text retrieval.
        zeroshot: manifest with `label` for zero-shot classification.
        classes: classes file for zero-shot.
        langs: caption/prompt languages; "zh" uses `caption_zh`, `long_caption_zh`, `classes_zh`.
    Returns:
        Keys like `retrieval/text_to_image_R@1`, `longtext/image_to_text_R@1`, `zeroshot/top1`,
        with a `_zh` suffix on the prefix for Chinese.
    """
    cfg = EvalConfig(retrieval=retrieval or "", longtext=longtext or "", zeroshot=zeroshot or "",
                     classes=classes or "", langs=list(langs), limit=limit)
    return evaluate(model, cfg.specs(), progress=progress)
