"""Captioning speed: KV-cached vs uncached CoCa decoding, and transformers' GPT-2 `generate` for scale.

A random `coca-small` (text tower 4 layers + decoder 3 layers, width 128, 4 heads, vocabulary 4096)
captions a batch of random images with exactly `--tokens` new tokens per caption (the EOS id is set
to -1 so no caption stops early), greedy and beam search, with `use_cache=True` (per-layer KV cache,
image cross-attention keys/values computed once) and `use_cache=False` (text tower and decoder
re-run on the whole prefix every step). Both must give identical tokens; the script checks it.

Reference: a random transformers `GPT2LMHeadModel` of the same width, heads, vocabulary and depth
(7 layers = text layers + decoder layers; it has no cross-attention and no image encoder, so it does
less work per token than ours) generating the same number of tokens greedily with `use_cache=True`.
Ours is reported in total (image encoder included) and decode-only (total minus the image encoder and
context pooler, timed separately). CPU timings are process CPU time (see `_timed`), CUDA timings wall time.

    python benchmarks/caption_cache.py [--batch 16] [--tokens 20] [--beams 3] [--repeats 3]
        [--threads 1] [--device cpu|cuda] [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polymodal.models.factory import create_model  # noqa: E402


def _timed(fn, repeats: int, device: str) -> tuple[float, object]:
    """Median seconds of `repeats` calls (after one warm-up) and the last result.

    On CPU the seconds are this process's CPU time (`time.process_time`): on a machine shared with
    other jobs, wall time mostly measures how long the scheduler keeps us waiting, and it does so
    per operation, which hides the difference between few large and many small operations. With
    one thread, CPU time equals wall time on an idle machine. On CUDA: wall time after a synchronize.
    """
    clock = time.perf_counter if device == "cuda" else time.process_time
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = clock()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - t)
    return statistics.median(times), out


def gpt2_like(model, device: str):
    import transformers
    t = model.config.text
    cfg = transformers.GPT2Config(vocab_size=t.vocab_size, n_positions=t.context_length, n_embd=t.width,
                                  n_layer=t.layers + model.config.decoder_layers, n_head=t.heads,
                                  bos_token_id=model.bos_id, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval().to(device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="coca-small")
    ap.add_argument("--batch", type=int, default=16, help="images captioned at once")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 repeat, no beam")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "caption_cache.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("caption_cache.py: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.quick:
        args.batch, args.repeats, args.beams = 4, 1, 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.model).eval().to(args.device)
    model.config.text.eot_token_id = -1                     # never stop early: exactly --tokens per caption
    size = model.config.vision.image_size
    px = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(args.device)
    max_len = args.tokens + 1                               # BOS + new tokens
    rows = []
    with torch.no_grad():
        vision_s, _ = _timed(lambda: model.image_context(model.visual(px).tokens), args.repeats, args.device)
        methods = [("greedy", {})] + ([("beam", {"num_beams": args.beams})] if args.beams else [])
        for method, kw in methods:
            res = {}
            for cached in (True, False):
                s, ids = _timed(lambda: model.generate(px, method=method, max_len=max_len, use_cache=cached, **kw),
                                args.repeats, args.device)
                res[cached] = (s, ids)
            if not torch.equal(res[True][1], res[False][1]):
                sys.exit(f"caption_cache.py: cached and uncached {method} captions differ")
            rows.append({"what": f"ours {method}{'' if not kw else ' x' + str(args.beams)}",
                         "cached_s": res[True][0], "uncached_s": res[False][0],
                         "cached_caps_per_s": args.batch / res[True][0],
                         "uncached_caps_per_s": args.batch / res[False][0],
                         "decode_only_caps_per_s": args.batch / max(res[True][0] - vision_s, 1e-9),
                         "speedup": res[False][0] / res[True][0]})
        gpt2 = gpt2_like(model, args.device)
        start = torch.full((args.batch, 1), model.bos_id, dtype=torch.long, device=args.device)
        mask = torch.ones_like(start)
        s, out = _timed(lambda: gpt2.generate(start, attention_mask=mask, max_new_tokens=args.tokens,
                                              min_new_tokens=args.tokens, do_sample=False, use_cache=True,
                                              pad_token_id=0), args.repeats, args.device)
        assert out.shape[1] == max_len, out.shape
        gpt2_rate = args.batch / s
    greedy = rows[0]
    print(f"{args.model}, batch {args.batch}, {args.tokens} new tokens per caption, {args.threads} thread(s), "
          f"{args.device} ({'CPU' if args.device == 'cpu' else 'wall'} time); image encoder + context: "
          f"{vision_s * 1000:.0f} ms per batch")
    print("\n| decoding | cached captions/s | uncached captions/s | cached/uncached | cached decode-only captions/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['cached_caps_per_s']:.1f} | {r['uncached_caps_per_s']:.1f} | "
              f"{r['speedup']:.1f}x | {r['decode_only_caps_per_s']:.1f} |")
    print(f"| GPT-2 generate (greedy, use_cache, {gpt2.config.n_layer} layers, no image) | {gpt2_rate:.1f} | - | - | "
          f"{gpt2_rate:.1f} |")
    print(f"\nours greedy decode-only / GPT-2: {greedy['decode_only_caps_per_s'] / gpt2_rate:.2f}x captions/s; "
          f"incl. image encoder: {greedy['cached_caps_per_s'] / gpt2_rate:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "batch": args.batch, "tokens": args.tokens,
                               "threads": args.threads, "device": args.device, "vision_s": vision_s,
                               "rows": rows, "gpt2_caps_per_s": gpt2_rate}, indent=2))
    return rows


if __name__ == "__main__":
    main()
