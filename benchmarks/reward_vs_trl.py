"""A TRL-trained reward model scored by `polymodal eval --task preference`, against TRL's own evaluation.

TRL's RewardTrainer trains a tiny GPT-2 reward model (built here, random weights, a tokenizer trained on the
data) on the preference world's clean `base/` pairs; the folder it saves carries no polymodal_reward.json. The
held-out `test.jsonl` is then scored four ways, per seed:

- `trl`: `RewardTrainer.evaluate` (its accuracy; over-long pairs are dropped by TRL),
- `polymodal`: `preference_eval_task(folder)`, i.e. `polymodal eval FOLDER --task preference` (TRL's rendering,
  over-long texts cut from the left),
- `polymodal_drop`: the same with `-o overlong=drop` (TRL's handling of over-long pairs),
- `plain`: the folder forced to the earlier rendering (prompt, newline, response, no EOS), what polymodal read
  before the rendering followed TRL.

TRL trains and evaluates in fp32 here (its RewardConfig defaults to bf16 autocast, which alone flips a few
near-tied pairs against an fp32 eval). The claim: `polymodal_drop` equals `trl` on every seed, `polymodal` is within the share of over-long pairs, and
`plain` shows the gap that rendering closes. TRL is not a polymodal dependency: put it on the path first,

    pip install --target /tmp/trl_site --no-deps trl accelerate datasets dill multiprocess xxhash fsspec pandas psutil
    PYTHONPATH=/tmp/trl_site python benchmarks/reward_vs_trl.py --out docs/results/reward_vs_trl --threads 1
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import base_parser, finish, machine_line, pm_values, seed_summary, set_threads  # noqa: E402

WAYS = ("trl", "polymodal", "polymodal_drop", "plain")


def build_world(runs: Path, n_base: int, n_test: int) -> Path:
    """The preference world (seed 0) under `runs/world`, generated once."""
    from polymodal.data.synthetic.preferences import generate_preferences
    world = runs / "world"
    if not (world / "test.jsonl").is_file():
        generate_preferences(world, n_train=16, n_base=n_base, n_val=4, n_test=n_test, seed=0)
    return world


def tiny_gpt2(folder: Path, texts: list[str], seed: int, max_length: int) -> Path:
    """A random 2-layer GPT-2 causal LM and a tokenizer trained on `texts`, saved as an HF folder.

    The tokenizer's model_max_length is `max_length`, so `polymodal eval` of the trained folder cuts where TRL
    filtered."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from polymodal.data.text import train_tokenizer
    tok = train_tokenizer(texts, vocab_size=400, context_length=max_length, min_frequency=1)
    tok.save(folder)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=max_length,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def rows(path: Path) -> list[dict]:
    """prompt / chosen / rejected of a preference file (TRL's explicit-prompt layout)."""
    from polymodal.data.preference import read_preferences
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in read_preferences(path).pairs]


def one_seed(seed: int, world: Path, runs: Path, args) -> dict:
    """Train with TRL, then score the test set the four ways."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from polymodal.eval.preference import preference_eval_task
    from polymodal.models.reward import HFRewardModel
    train = rows(world / "base" / "train.jsonl")
    test = rows(world / "test.jsonl")
    base = tiny_gpt2(runs / f"gpt2_seed{seed}", [r["prompt"] + r["chosen"] for r in train]
                     + [r["rejected"] for r in train], seed, args.max_length)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    cfg = RewardConfig(output_dir=str(runs / f"trl_seed{seed}"), max_steps=args.steps, learning_rate=args.lr,
                       per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=len(test),
                       max_length=args.max_length, seed=seed, report_to=[], save_strategy="no", logging_steps=50,
                       use_cpu=True, dataloader_num_workers=0,
                       bf16=False)   # TRL's default is bf16 autocast; polymodal's eval is fp32, so both are fp32
    trainer = RewardTrainer(model=model, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(train),
                            eval_dataset=Dataset.from_list(test))
    start = time.time()
    trainer.train()
    train_s = time.time() - start
    theirs = trainer.evaluate()
    folder = runs / f"trl_seed{seed}" / "model"
    trainer.save_model(str(folder))
    assert not (folder / "polymodal_reward.json").exists()

    test_file = runs / "test_strings.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in test), encoding="utf-8")
    assert HFRewardModel.from_pretrained(folder).max_length == args.max_length
    ours = preference_eval_task(str(folder), test_file)
    drop = preference_eval_task(str(folder), test_file, overlong="drop")
    plain = preference_eval_task(HFRewardModel.from_pretrained(folder, template="plain"), test_file)
    return {"trl": theirs["eval_accuracy"], "polymodal": ours["accuracy"], "polymodal_drop": drop["accuracy"],
            "plain": plain["accuracy"], "pairs": ours["pairs"], "overlong": ours["num_overlong"],
            "train_seconds": train_s}


def render(result: dict) -> str:
    """results.md: one row per way, mean ± sd over seeds and each seed's value."""
    lines = ["# A TRL-trained reward model scored by polymodal", "",
             f"{machine_line(result['machine'])}", "",
             f"Tiny GPT-2 (2 layers, width 64), {result['settings']['steps']} TRL steps on the preference world's "
             f"`base/` pairs, {result['per_seed'][0]['pairs']} held-out pairs, max_length "
             f"{result['settings']['max_length']}; seeds {result['settings']['seeds']}.", "",
             "| scored by | accuracy (mean ± sd) | per seed | difference to TRL's own |",
             "|---|---|---|---|"]
    for way in WAYS:
        s = result["summary"][way]
        diff = [r[way] - r["trl"] for r in result["per_seed"]]
        lines.append(f"| {way} | {pm_values(s['values'], 3)} | {', '.join(f'{v:.3f}' for v in s['values'])} | "
                     f"{', '.join(f'{d:+.3f}' for d in diff)} |")
    lines += ["", f"Over-long pairs per seed: {[r['overlong'] for r in result['per_seed']]}.", ""]
    return "\n".join(lines)


def main() -> None:
    p = base_parser(__doc__, out="docs/results/reward_vs_trl", runs="runs/reward_vs_trl", seeds=[0, 1, 2], threads=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="TRL's max_length and the eval's (tokens)")
    p.add_argument("--n-base", type=int, default=120, help="training pairs per dimension")
    p.add_argument("--n-test", type=int, default=60, help="held-out pairs per dimension")
    args = p.parse_args()
    import importlib.util
    if importlib.util.find_spec("trl") is None:
        sys.exit("reward_vs_trl: TRL is not importable; see this script's docstring for the install line")
    set_threads(args.threads)
    start = time.time()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    world = build_world(runs, args.n_base, args.n_test)
    per_seed = []
    for seed in args.seeds:
        per_seed.append(one_seed(seed, world, runs, args))
        print(f"[reward_vs_trl] seed {seed}: {per_seed[-1]}", flush=True)
    result = {"settings": {k: getattr(args, k) for k in ("steps", "lr", "batch_size", "max_length", "seeds")},
              "per_seed": per_seed, "summary": {w: seed_summary([r[w] for r in per_seed]) for w in WAYS}}
    finish(Path(args.out), result, start, render, "reward_vs_trl")


if __name__ == "__main__":
    main()
