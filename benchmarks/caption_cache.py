"""Captioning speed: KV-cached vs uncached CoCa decoding, and transformers' GPT-2 `generate` for scale.

A random `coca-small` (text tower 4 layers + decoder 3 layers, width 128, 4 heads, vocabulary 4096)
captions a batch of random images with exactly `--tokens` new tokens per caption (the EOS id is set
to -1 so no caption stops early), greedy and beam search, with `use_cache=True` (per-layer KV cache,
image cross-attention keys/values computed once) and `use_cache=False` (text tower and decoder
re-run on the whole prefix every step). Both must give identical tokens; the script checks it.

Reference: a random transformers `GPT2LMHeadModel` of the same width, heads, vocabulary and depth
(7 layers = text layers + decoder layers; it has no cross-attention and no image encoder, so it does
less work per token than ours) generating the same number of tokens greedily, with and without
`use_cache`: the peer's own cached/uncached ratio on the same machine in the same run.
Ours is reported in total (image encoder included) and decode-only (total minus the image encoder and
context pooler, timed separately). CPU timings are process CPU time (see `_timed`), CUDA timings wall time.

Bound: the ratio cached/uncached cannot exceed the ratio of the work the two paths do. `decode_macs`
counts the multiply-accumulates of each path (linear layers, attention, logits; the uncached path
re-runs every prefix and re-projects the image keys/values every step); the script prints the
speed-up the cached path would reach if it ran at the uncached path's measured MAC rate (small
one-token steps run at a lower rate, so this is an upper bound), with the image encoder counted.

    python benchmarks/caption_cache.py [--batch 16] [--tokens 20] [--beams 3] [--repeats 3]
        [--threads 1] [--device cpu|cuda] [--quick] [--out PATH]
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import base_parser, machine_info, set_threads  # noqa: E402
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


def decode_macs(model, tokens: int, cached: bool) -> int:
    """Multiply-accumulates of decoding `tokens` new tokens for one caption (greedy), after the image context.

    Counts every linear layer, the attention products (QK^T and AV) and the logits. Cached: one new
    position per step against the cached keys, image cross-attention keys/values projected once.
    Uncached: step t re-runs the t-position prefix through the text tower and the decoder, logits
    included, with the full t x t self-attention products (the fused kernel computes whole blocks at
    these lengths), and re-projects the keys/values of the S context tokens in every decoder layer.
    Agrees with torch's FLOP counter on the model (tests/test_benchmark_common.py).

    Args:
        model: a CoCa (its text config gives width, MLP ratio and depth).
        tokens: new tokens per caption.
        cached: which path to count.
    Returns:
        The MAC count (int).
    """
    t = model.config.text
    D, Dff, V = t.width, int(t.width * t.mlp_ratio), t.vocab_size
    n_text, n_dec = t.layers, model.config.decoder_layers
    S = model.config.num_image_queries or (model.config.vision.image_size // model.config.vision.patch_size) ** 2
    per_pos = n_text * (4 * D * D + 2 * D * Dff) + n_dec * (6 * D * D + 2 * D * Dff + 2 * S * D) + D * V
    kv_once = n_dec * 2 * D * D * S
    self_attn = (n_text + n_dec) * 2 * D                # QK^T + AV per (query, key) pair, all layers
    if cached:                                          # step t: one query, t keys
        return kv_once + sum(per_pos + self_attn * t_ for t_ in range(1, tokens + 1))
    return sum(t_ * per_pos + self_attn * t_ * t_ + kv_once for t_ in range(1, tokens + 1))


def gpt2_like(model, device: str):
    import transformers
    t = model.config.text
    cfg = transformers.GPT2Config(vocab_size=t.vocab_size, n_positions=t.context_length, n_embd=t.width,
                                  n_layer=t.layers + model.config.decoder_layers, n_head=t.heads,
                                  bos_token_id=model.bos_id, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval().to(device)


def main(argv=None) -> list[dict]:
    ap = base_parser(__doc__, str(Path(__file__).parent / "results" / "caption_cache.json"), threads=1,
                     out_help="JSON results file")
    ap.add_argument("--model", default="coca-small")
    ap.add_argument("--batch", type=int, default=16, help="images captioned at once")
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="batch 4, 1 repeat, no beam")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("caption_cache.py: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.quick:
        args.batch, args.repeats, args.beams = 4, 1, 0
    set_threads(args.threads)
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
        gpt2_s = {}
        for cached in (True, False):
            s, out = _timed(lambda: gpt2.generate(start, attention_mask=mask, max_new_tokens=args.tokens,
                                                  min_new_tokens=args.tokens, do_sample=False, use_cache=cached,
                                                  pad_token_id=0), args.repeats, args.device)
            assert out.shape[1] == max_len, out.shape
            gpt2_s[cached] = (s, out)
        if not torch.equal(gpt2_s[True][1], gpt2_s[False][1]):
            sys.exit("caption_cache.py: GPT-2 cached and uncached tokens differ")
        gpt2_rate = args.batch / gpt2_s[True][0]
        gpt2_speedup = gpt2_s[False][0] / gpt2_s[True][0]
    greedy = rows[0]
    mac_ratio = decode_macs(model, args.tokens, False) / decode_macs(model, args.tokens, True)
    uncached_decode_s = max(greedy["uncached_s"] - vision_s, 1e-9)
    bound = greedy["uncached_s"] / (vision_s + uncached_decode_s / mac_ratio)
    print(f"{args.model}, batch {args.batch}, {args.tokens} new tokens per caption, {args.threads} thread(s), "
          f"{args.device} ({'CPU' if args.device == 'cpu' else 'wall'} time); image encoder + context: "
          f"{vision_s * 1000:.0f} ms per batch")
    print("\n| decoding | cached captions/s | uncached captions/s | cached/uncached | cached decode-only captions/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['cached_caps_per_s']:.1f} | {r['uncached_caps_per_s']:.1f} | "
              f"{r['speedup']:.1f}x | {r['decode_only_caps_per_s']:.1f} |")
    print(f"| GPT-2 generate (greedy, {gpt2.config.n_layer} layers, no image) | {gpt2_rate:.1f} | "
          f"{args.batch / gpt2_s[False][0]:.1f} | {gpt2_speedup:.1f}x | {gpt2_rate:.1f} |")
    print(f"\nours greedy decode-only / GPT-2: {greedy['decode_only_caps_per_s'] / gpt2_rate:.2f}x captions/s; "
          f"incl. image encoder: {greedy['cached_caps_per_s'] / gpt2_rate:.2f}x")
    print(f"work ratio uncached/cached (MACs, decode only): {mac_ratio:.1f}x; greedy speed-up bound with the image "
          f"encoder at the uncached path's MAC rate: {bound:.1f}x (measured {greedy['speedup']:.1f}x, "
          f"decode only {uncached_decode_s / max(greedy['cached_s'] - vision_s, 1e-9):.1f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(),
                               "model": args.model, "batch": args.batch, "tokens": args.tokens,
                               "threads": args.threads, "device": args.device, "vision_s": vision_s,
                               "rows": rows, "gpt2_caps_per_s": gpt2_rate,
                               "gpt2_uncached_caps_per_s": args.batch / gpt2_s[False][0],
                               "gpt2_speedup": gpt2_speedup, "mac_ratio": mac_ratio,
                               "speedup_bound": bound}, indent=2))
    return rows


if __name__ == "__main__":
    main()
