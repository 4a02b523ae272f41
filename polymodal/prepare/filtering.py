"""Video-caption filtering and caption refinement (M2-RAAP step 1; our reconstruction, the paper gives none).

Every video-caption pair of a manifest is scored with a frozen image-text model: the cosine similarity of the
video embedding (the mean of its L2-normalised frame embeddings, normalised again, as
`encode.encode_clips` computes it; a video model's own `encode_video` when it has one) and the
caption embedding (`encode.encode_texts`). A record with several captions (`captions`) scores the mean over
them. Pairs are kept by a threshold (score >= t) or as the top fraction (the round(keep * N) best, at least
one; ties keep the earlier record); the kept records keep their manifest order. Kept captions then go through a
rewriting hook: any callable str -> str; by default `normalize_caption` (a template rewriter); optionally a
local causal LM (`CausalLMRewriter`). The original caption is kept as `caption_original` when it changed.

Outputs (all written atomically): the filtered manifest with `filter_score` on every record, the dropped
records beside it (`<out stem>.dropped.jsonl`, also scored) and a summary (`<out stem>.summary.json`) with the
mode, cut-off, counts and score statistics, so a filter is inspectable and reusable.

Command line (to be wired in cli.py): `polymodal data filter MANIFEST --model M --keep 0.5 --out F`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch

from ..data.command_args import REWRITERS
from ..data.manifests import ManifestError, captions_of_record, read_manifest, write_manifest

__all__ = ["score_pairs", "select", "normalize_caption", "CausalLMRewriter", "filter_manifest",
           "main_from_args", "REWRITERS"]



# ---- scoring ------------------------------------------------------------------------------------------
@torch.no_grad()
def score_pairs(model, records: list[dict], caption_key: str = "caption", num_frames: int = 8,
                strategy: str = "uniform", batch_size: int = 16, progress: bool = False,
                on_bad_record: str = "error", where: str = "manifest") -> tuple[torch.Tensor, list[dict]]:
    """Frozen-model similarity of each record's video and caption(s).

    Args:
        model: any image-text model (zero-shot frame mean) or video model (`encode_video`).
        records: manifest records with `video` (absolute paths, as `read_manifest` gives them) and captions.
        caption_key: "caption" (also reads `captions`), "caption_zh" ...
        num_frames, strategy: frame sampling (see `data.video.read_video`).
        batch_size: videos encoded at once.
        progress: progress bars.
        on_bad_record: "error" stops at an unreadable video; "skip" leaves it out (warned and counted).
        where: the manifest's name for messages.
    Returns:
        (scores (N,) float32 of the kept records, the N records whose video could be read).
    """
    from ..encode import encode_texts, encode_videos
    was_training = model.training
    model.eval()
    try:
        videos, kept = encode_videos(model, records, num_frames, strategy, batch_size, progress, on_bad_record,
                                     where)                                       # (N, E)
        texts, owner = [], []
        for i, r in enumerate(kept):
            caps = captions_of_record(r, caption_key)
            if not caps:
                raise ManifestError(f"{where} line {r.get('_line', '?')}: no {caption_key!r} caption to score")
            texts.extend(caps)
            owner.extend([i] * len(caps))
        txt = encode_texts(model, texts, progress=progress)                       # (N_texts, E)
    finally:
        model.train(was_training)
    owner_t = torch.tensor(owner)
    sims = (txt * videos[owner_t]).sum(-1)                                        # (N_texts,)
    scores = torch.zeros(len(kept)).index_add_(0, owner_t, sims)
    counts = torch.zeros(len(kept)).index_add_(0, owner_t, torch.ones(len(owner)))
    return scores / counts, kept


def select(scores: torch.Tensor, keep: float | None = None, threshold: float | None = None
           ) -> tuple[torch.Tensor, float]:
    """Which records pass: exactly one of `keep` (top fraction) or `threshold` (score >= t).

    Args:
        scores: (N,) scores.
        keep: fraction in (0, 1]: the round(keep * N) best (at least 1); ties keep the earlier record.
        threshold: keep every record with score >= threshold.
    Returns:
        (bool mask (N,), the lowest kept score, or the threshold when nothing passes).
    """
    if (keep is None) == (threshold is None):
        raise ValueError("give exactly one of keep (a fraction, e.g. --keep 0.5) or threshold (e.g. --threshold 0.2)")
    if threshold is not None:
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        mask = scores >= threshold
    else:
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
        n = max(1, int(keep * len(scores) + 0.5))
        # Stable descending order: among equal scores the earlier record wins.
        order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:n]
        mask = torch.zeros(len(scores), dtype=torch.bool)
        mask[order] = True
    cut = float(scores[mask].min()) if mask.any() else float(threshold)
    return mask, cut


# ---- caption rewriting ---------------------------------------------------------------------------------
_SPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """The default template rewriter: collapse whitespace, strip quotes and a trailing full stop, lower-case a
    capitalised first word ("A red circle grows." -> "a red circle grows"); other text is unchanged."""
    t = _SPACE.sub(" ", text).strip().strip("\"'").strip()
    t = t.rstrip("。.").rstrip()
    word = t.split(" ")[0]
    if word and word != "I" and word[0].isupper() and (len(word) == 1 or word[1:].islower()):
        t = t[0].lower() + t[1:]
    return t


class CausalLMRewriter:
    """Rewrite captions with a local causal language model (transformers, no hub access).

    Args:
        path: a folder with an `AutoModelForCausalLM` and its tokenizer (loaded with local_files_only=True).
        prompt: template with `{caption}`; the model's greedy continuation (first line) is the new caption.
        max_new_tokens: continuation length.
    A continuation that is empty after `normalize_caption` keeps the original caption.
    """

    def __init__(self, path: str, prompt: str = "Rewrite the video caption clearly.\nCaption: {caption}\nRewritten:",
                 max_new_tokens: int = 32):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"rewrite model {path} is not a folder; give a local transformers causal-LM "
                                    f"folder (config.json, weights, tokenizer)")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    @torch.no_grad()
    def __call__(self, caption: str) -> str:
        enc = self.tokenizer(self.prompt.format(caption=caption), return_tensors="pt")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        text = self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        text = normalize_caption(text.strip().split("\n")[0]) if text.strip() else ""
        return text or caption


def _rewrite(record: dict, rewriter: Callable[[str], str], caption_key: str) -> dict:
    """The record with its caption field(s) of `caption_key` rewritten (originals kept when changed)."""
    out = dict(record)
    plural = "captions" if caption_key == "caption" else None
    for key in (caption_key, plural):
        if not key or key not in record:
            continue
        value = record[key]
        new = rewriter(value) if isinstance(value, str) else [rewriter(v) for v in value]
        if new != value:
            out[f"{key}_original"] = value
            out[key] = new
    return out


def _rewriter(kind: str | Callable | None, model_path: str = "") -> Callable[[str], str] | None:
    if callable(kind):
        return kind
    if kind in (None, "none"):
        return None
    if kind == "template":
        return normalize_caption
    if kind == "lm":
        if not model_path:
            raise ValueError("rewrite 'lm' needs a local causal-LM folder (--rewrite-model PATH)")
        return CausalLMRewriter(model_path)
    raise ValueError(f"rewrite must be one of {', '.join(REWRITERS)} or a callable, got {kind!r}")


# ---- the whole filter ----------------------------------------------------------------------------------
def _side_path(out: Path, suffix: str) -> Path:
    return out.with_name(out.stem + suffix)


def filter_manifest(manifest: str | os.PathLike, model, out: str | os.PathLike, keep: float | None = None,
                    threshold: float | None = None, caption_key: str = "caption", num_frames: int = 8,
                    strategy: str = "uniform", rewrite: str | Callable[[str], str] | None = "template",
                    rewrite_model: str = "", batch_size: int = 16, on_bad_record: str = "error",
                    progress: bool = False, model_name: str = "") -> dict:
    """Score, select and rewrite the pairs of a video manifest; write the filtered manifest and a summary.

    Args:
        manifest: JSONL/CSV manifest of `video` records.
        model: the frozen scoring model (see `score_pairs`).
        out: the filtered manifest to write (JSONL, or CSV/TSV by suffix).
        keep, threshold: the selection (exactly one; see `select`).
        caption_key: which captions are scored and rewritten.
        num_frames, strategy: frame sampling for scoring.
        rewrite: "template" (default, `normalize_caption`), "none", "lm" (with `rewrite_model`) or any callable.
        rewrite_model: local causal-LM folder for rewrite="lm".
        batch_size, on_bad_record, progress: as in `score_pairs`.
        model_name: what to record as the scoring model in the summary.
    Returns:
        the summary dict (also written to `<out stem>.summary.json`).
    """
    start = time.perf_counter()
    rewriter = _rewriter(rewrite, rewrite_model)
    m = read_manifest(manifest, on_bad_record=on_bad_record, required=("video",), media="video")
    scores, kept = score_pairs(model, m.records, caption_key, num_frames, strategy, batch_size, progress,
                               on_bad_record, str(manifest))
    mask, cut = select(scores, keep, threshold)
    passed, dropped = [], []
    for r, s, ok in zip(kept, scores.tolist(), mask.tolist()):
        r = {**r, "filter_score": round(float(s), 6)}
        if ok:
            passed.append(_rewrite(r, rewriter, caption_key) if rewriter is not None else r)
        else:
            dropped.append(r)
    if not passed:
        raise ValueError(f"{manifest}: no pair reaches threshold {threshold} (best score {float(scores.max()):.4f}); "
                         f"lower --threshold or use --keep FRACTION")
    out = Path(out)
    write_manifest(passed, out)
    write_manifest(dropped, _side_path(out, ".dropped.jsonl"))
    s = scores.double()
    summary = {
        "manifest": str(m.path), "out": str(out.resolve()), "model": model_name or type(model).__name__,
        "mode": "threshold" if threshold is not None else "keep", "keep": keep, "threshold": threshold,
        "cutoff_score": cut, "caption_key": caption_key, "num_frames": num_frames, "strategy": strategy,
        "rewrite": rewrite if isinstance(rewrite, str) or rewrite is None else getattr(rewrite, "__name__", "callable"),
        "num_records": len(m.records) + sum(m.skipped.values()), "num_scored": len(kept), "num_kept": len(passed),
        "kept_fraction": len(passed) / len(kept), "skipped": dict(m.skipped),
        "unreadable_videos": len(m.records) - len(kept),
        "scores": {"min": float(s.min()), "mean": float(s.mean()), "max": float(s.max()),
                   "quantiles": {str(q): float(torch.quantile(s, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}},
        "seconds": round(time.perf_counter() - start, 3),
    }
    if all("mismatched" in r for r in kept):          # synthetic worlds label their noise: report what was caught
        summary["mismatched_total"] = sum(bool(r["mismatched"]) for r in kept)
        summary["mismatched_kept"] = sum(bool(r["mismatched"]) for r in passed)
    from ..fileio import atomic_open
    with atomic_open(_side_path(out, ".summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    return summary


# ---- command line: polymodal data filter MANIFEST --model M --keep 0.5 --out F -------------------------
def main_from_args(args: argparse.Namespace) -> dict:
    """Run `polymodal data filter` from parsed arguments and print the JSON summary.

    Args:
        args: namespace produced by a parser set up with `polymodal.data.command_args.filter_arguments`.
    Returns:
        The summary dict.
    """
    from ..hub import load_model
    model = load_model(args.model)
    summary = filter_manifest(args.manifest, model, args.out, keep=args.keep, threshold=args.threshold,
                              caption_key=args.caption_key, num_frames=args.num_frames, strategy=args.strategy,
                              rewrite=args.rewrite, rewrite_model=args.rewrite_model, batch_size=args.batch_size,
                              on_bad_record=args.on_bad_record, progress=not args.no_progress,
                              model_name=str(args.model))
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary
