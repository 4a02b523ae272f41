"""Does the attentional-pooler initialisation explain the ITC plateau of tiny CoCa? One command:

    python benchmarks/pooler_init.py --out docs/results/pooler_init --model coca-tiny --seeds 0 1 2

1. Generates ShapesWorld once (`--data`, default <runs>/data; reused when the settings match).
2. For each seed and each `--inits` arm, trains recipes/sycoca_coca.yaml (CoCa: ITC + captioning, no TG-MIM):
   * `default`: the model `CoCa.__init__` builds with `pooler_init: torch`, CoCa's default before issue #23
     (queries N(0, 1/D), the attention and context projections at torch's Linear default, uniform with
     bound 1/sqrt(fan_in)); the library default is now `scaled`, which this benchmark led to;
   * `scaled`: the same model (same seed, so every other weight is identical), then every attentional
     pooler re-initialised by `reinit_poolers_`: queries N(0, 1), each Linear inside the pooler
     N(0, 1/fan_in) with zero bias. The model is saved and training starts from it through `model.path`,
     so the run differs from `default` only in the pooler weights (same data order, same other weights).
3. Measures, per run: the step where ITC leaves its plateau (first logged step with ITC loss
   < ln(B) - 0.5, from the run's metrics.jsonl; B = batch size, ln(B) is the loss of uniform logits), the
   final ITC loss, and on the test split text->image R@5 / R@1, image->text R@5 and zero-shot top-1.
4. Writes `<out>/results.json` and `<out>/results.md`: mean ± std over seeds and the paired difference
   scaled - default per seed.

`reinit_poolers_` is also what `sycoca_ablation.py --pooler-init scaled` applies.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (cached_metrics, command_line, experiment_parser, finish,  # noqa: E402
                               leave_plateau_step, over_seeds, paired_over_seeds, pm, pm_diff, prepare,
                               seed_summary, variant_config)

INITS = ("default", "scaled")   # "default": torch's init, CoCa's default before issue #23 (`pooler_init: torch`)
TORCH_INIT = "torch"
PLATEAU_MARGIN = 0.5        # ITC has left the plateau once it is this far below ln(B)
METRICS = {  # column -> run_suite key
    "t2i_R5": "retrieval/text_to_image_R@5",
    "t2i_R1": "retrieval/text_to_image_R@1",
    "i2t_R5": "retrieval/image_to_text_R@5",
    "zeroshot_top1": "zeroshot/top1",
}


# ----------------------------------------------------------------------------- the initialisation

def find_poolers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attentional poolers of a model: modules with a learned 2-D `query` and an `attn` holding `qkv`/`out`.

    Duck-typed (not an isinstance check) so that it keeps working while `polymodal/models/coca.py` changes.

    Returns:
        [(qualified name, module)], in `named_modules` order.
    """
    found = []
    for name, m in model.named_modules():
        q, attn = getattr(m, "query", None), getattr(m, "attn", None)
        if isinstance(q, nn.Parameter) and q.ndim == 2 and hasattr(attn, "qkv") and hasattr(attn, "out"):
            found.append((name, m))
    return found


def reinit_poolers_(model: nn.Module, generator: torch.Generator | None = None) -> list[str]:
    """Re-initialise every attentional pooler in place with `polymodal.models.coca.scale_pooler_init_`
    (queries N(0, 1), each Linear inside the pooler N(0, 1/fan_in), zero bias; LayerNorms untouched).

    Returns:
        Names of the poolers re-initialised (empty when the model has none, e.g. `contrastive_pool: cls`
        and `num_image_queries: 0`).
    """
    from polymodal.models.coca import scale_pooler_init_
    names = []
    for name, pooler in find_poolers(model):
        scale_pooler_init_(pooler, generator)
        names.append(name)
    return names


def prepare_init_model(cfg, init_dir: Path, init: str, fresh: bool = False) -> Path:
    """Build the model `run_recipe(cfg)` would start from (same seed, same tokenizer), apply `init` and save it.

    Reused when `init_dir` holds a model made from the same config and init.

    Args:
        cfg: the run's RunConfig (without `model.path`).
        init_dir: folder for the saved starting model.
        init: one of INITS other than "default".
        fresh: rebuild even when a matching saved model exists.
    Returns:
        The saved model directory, for `model.path`.
    """
    from polymodal.eval.report import write_json

    if init not in INITS[1:]:
        raise ValueError(f"pooler init {init!r}: choose one of {INITS}")
    init_dir = Path(init_dir)
    sig_file, model_dir = init_dir / "init.json", init_dir / "model"
    want = json.loads(json.dumps({"config": cfg.to_dict(), "init": init}))
    if not fresh and sig_file.is_file() and (model_dir / "config.json").is_file():
        if json.loads(sig_file.read_text()) == want:
            return model_dir
    torch.manual_seed(cfg.train.seed)                  # as run_recipe does before building
    method = cfg.method_impl
    tokenizer = method.build_tokenizer(init_dir)
    model = method.build_model(tokenizer)
    names = reinit_poolers_(model)
    if not names:
        raise ValueError(f"{cfg.model.name}: no attentional pooler to re-initialise (contrastive_pool: cls and "
                         "num_image_queries: 0?); use --pooler-init default")
    model.save_pretrained(model_dir)
    write_json(sig_file, want)
    return model_dir


def train_with_init(recipe: Path, run_dir: Path, data: Path, args, seed: int, extra: list[str], init: str,
                    init_dir: Path):
    """`common.train_variant` with the pooler initialisation `init` ("default" trains the recipe as it is;
    otherwise the starting model is built from the same config, re-initialised, saved under `init_dir` and
    the same config is trained from it through `model.path`).

    Returns:
        (model directory, training seconds, RunConfig, reused?).
    """
    from polymodal.train.reuse import train_or_reuse

    # Both arms start from torch's init (CoCa's default before issue #23); "scaled" re-initialises on top, so
    # the arms differ only in the pooler weights whatever the library default is.
    extra = list(extra) + [f"model.overrides={{pooler_init: {TORCH_INIT}}}"]
    if init != "default":
        start = prepare_init_model(variant_config(recipe, run_dir, data, args, seed, extra), init_dir, init,
                                   fresh=args.fresh)
        extra = list(extra) + [f"model.path={start}"]
    cfg = variant_config(recipe, run_dir, data, args, seed, extra)
    model_dir, secs, reused = train_or_reuse(cfg, fresh=args.fresh)
    return model_dir, secs, cfg, reused


def plateau_threshold(batch_size: int) -> float:
    """ITC loss below which a run has left the plateau: ln(B) - PLATEAU_MARGIN."""
    return math.log(batch_size) - PLATEAU_MARGIN


def itc_stats(run_dir: Path, batch_size: int) -> dict:
    """Plateau exit step and final ITC loss of a run from its metrics.jsonl.

    Returns:
        {"plateau_step": first logged step with ITC < ln(B) - 0.5, or the run's steps + log interval when it
        never leaves (reported as "never" in the tables), "left_plateau": 1.0 / 0.0, "itc_final": last ITC}.
    """
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    itc = [r for r in rows if "itc" in r and r.get("itc") is not None]
    step = leave_plateau_step(path, "itc", plateau_threshold(batch_size))
    last = itc[-1]["step"] if itc else 0
    return {"plateau_step": float(step if step is not None else last + 10), "left_plateau": float(step is not None),
            "itc_final": float(itc[-1]["itc"]) if itc else float("nan")}


# ----------------------------------------------------------------------------- benchmark

def parse_args(argv=None):
    p = experiment_parser(__doc__, "docs/results/pooler_init", "runs/pooler_init",
                          "CoCa config name (default: the recipe's coca-small)", steps=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS, help="pooler initialisations compared")
    p.add_argument("--recipe", default="sycoca_coca.yaml", help="recipe (in --recipes) trained for each arm")
    return p.parse_args(argv)


def _evaluate(model, data: Path) -> dict:
    from polymodal.eval.tasks import run_suite
    m = run_suite(model, retrieval=str(data / "test.jsonl"), classes=str(data / "classes.json"))
    return {col: float(m[key]) for col, key in METRICS.items()}


def run_arm(args, data: Path, runs: Path, init: str, seed: int, extra: list[str], name: str = "coca") -> dict:
    """Train (or reuse) one arm for one seed and measure it.

    Returns:
        {"plateau_step", "left_plateau", "itc_final", METRICS columns..., "train_s"}.
    """
    from polymodal.hub import load_model

    tag = name if init == "default" else f"{name}_{init}"
    run_dir = runs / f"{tag}_s{seed}"
    print(f"[pooler_init] {tag} seed {seed}: training", flush=True)
    model_dir, secs, cfg, reused = train_with_init(Path(args.recipes) / args.recipe, run_dir, data, args, seed,
                                                   extra, init, runs / f"init_{tag}_s{seed}")
    key = {"eval": "pooler_init", "test": str(data / "test.jsonl"), "metrics": sorted(METRICS)}
    metrics = cached_metrics(run_dir, key, lambda: _evaluate(load_model(model_dir).eval(), data), reused)
    out = {**itc_stats(run_dir, args.batch_size), **metrics, "train_s": secs}
    print(f"[pooler_init] {tag} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


def render_markdown(result: dict) -> str:
    st, arms = result["settings"], result["arms"]
    n = len(st["seeds"])
    lines = [
        "# CoCa attentional-pooler initialisation and the ITC plateau",
        "",
        f"Command: `{st['command']}`  ",
        f"Data: ShapesWorld seed {st['data_seed']}, {st['n_train']} training images, test {st['n_test']} images x 4 "
        f"captions. Recipe `{st['recipe']}` (ITC + captioning), model `{st['model']}`"
        f"{''.join(f' ({s})' for s in st['sets'])}, {st['steps']} steps of batch {st['batch_size']}, seeds "
        f"{st['seeds']}. Torch threads {st['threads']}. Total wall time {result['seconds']['total']:.0f} s.",
        "",
        f"Plateau exit: first logged step (every {st['log_every']}) with ITC loss < ln({st['batch_size']}) - "
        f"{PLATEAU_MARGIN} = {st['plateau_threshold']:.2f}; a run that never gets there counts as steps + 10.",
        "",
        "| pooler init | plateau exit step | runs that leave it | final ITC | T2I R@5 | T2I R@1 | I2T R@5 | "
        "zero-shot top-1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for init, a in arms.items():
        m, s = a["mean"], a["std"]
        left = int(round(m["left_plateau"] * n))
        lines.append(f"| {init} | {pm(m['plateau_step'], s['plateau_step'], n, 0)} | {left}/{n} | "
                     f"{pm(m['itc_final'], s['itc_final'], n, 2)} | {pm(m['t2i_R5'], s['t2i_R5'], n)} | "
                     f"{pm(m['t2i_R1'], s['t2i_R1'], n)} | {pm(m['i2t_R5'], s['i2t_R5'], n)} | "
                     f"{pm(m['zeroshot_top1'], s['zeroshot_top1'], n)} |")
    lines += ["", "Per seed (plateau exit step / T2I R@5):", ""]
    for init, a in arms.items():
        lines.append(f"- {init}: " + ", ".join(f"seed {sd}: {r['plateau_step']:.0f} / {r['t2i_R5']:.1f}"
                                               for sd, r in zip(a["seeds"], a["per_seed"])))
    if result.get("paired"):
        lines += ["", "## Paired difference, scaled - default (same seed), mean ± std (min..max, seeds > 0)", "",
                  "| number | difference |", "|---|---|"]
        for k, d in result["paired"].items():
            lines.append(f"| {k} | {pm_diff(d, 0 if k == 'plateau_step' else 1)} |")
    lines += ["", f"Chance: T2I R@5 {result['chance']['t2i_R5']:.1f}, zero-shot top-1 "
              f"{result['chance']['zeroshot_top1']:.2f}."]
    if result.get("claims"):
        from benchmarks.common import claim_lines
        lines += ["", "## Verdict", ""] + claim_lines(result["claims"])
    return "\n".join(lines) + "\n"


def claims(paired: dict) -> list[dict]:
    """Does the scaled init leave the plateau earlier, and does it retrieve better? (sign over every seed)."""
    from benchmarks.common import verdict
    out = []
    if "plateau_step" in paired:
        d = paired["plateau_step"]
        v = verdict(d, direction=-1)
        out.append({"claim": "the scaled pooler init leaves the ITC plateau earlier than the default init",
                    "numbers": f"plateau exit step scaled - default {pm_diff(d, 0)}", "verdict": v,
                    "shown": v == "shown"})
    if "t2i_R5" in paired:
        d = paired["t2i_R5"]
        v = verdict(d)
        out.append({"claim": "the scaled pooler init gives a higher final text->image R@5",
                    "numbers": f"T2I R@5 scaled - default {pm_diff(d)}", "verdict": v, "shown": v == "shown"})
    return out


def run(args) -> dict:
    out, runs, data, start = prepare(args)
    arms = {init: over_seeds(args.seeds, lambda seed, init=init: run_arm(args, data, runs, init, seed, args.sets))
            for init in args.inits}
    paired = {}
    if "default" in arms and "scaled" in arms:
        paired = paired_over_seeds(arms["scaled"], arms["default"],
                                   ["plateau_step", "itc_final", *METRICS])
    from polymodal.train.run import load_recipe
    recipe_cfg = load_recipe(Path(args.recipes) / args.recipe)
    n_classes = len(json.loads((data / "classes.json").read_text())["classes"])
    result = {
        "settings": {"command": command_line("pooler_init.py", __name__ == "__main__"), "data_seed": args.data_seed,
                     "n_train": args.n_train, "n_test": args.n_test, "steps": args.steps,
                     "batch_size": args.batch_size, "seeds": list(args.seeds), "recipe": args.recipe,
                     "model": args.model or f"{recipe_cfg.model.name} (recipe)", "sets": args.sets,
                     "log_every": recipe_cfg.train.log_every, "plateau_threshold": plateau_threshold(args.batch_size),
                     "threads": torch.get_num_threads()},
        "chance": {"t2i_R5": 500.0 / args.n_test, "zeroshot_top1": 100.0 / n_classes},
        "arms": arms,
        "paired": paired,
        "summary": {init: {k: seed_summary([r[k] for r in a["per_seed"]]) for k in ("plateau_step", "t2i_R5")}
                    for init, a in arms.items()},
    }
    result["claims"] = claims(paired)
    return finish(out, result, start, render_markdown, "pooler_init")


if __name__ == "__main__":
    run(parse_args())
