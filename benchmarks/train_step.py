"""Our CLIP vs transformers' CLIPModel: forward and training-step time, and our model FLOPs utilisation.

Both models have the ViT-B/32 architecture and identical weights (a random HF CLIPModel converted
into ours in memory with `polymodal.convert.hf_clip`). Per step: encode images (B, 3, 224, 224) and
texts (B, 77), L2-normalise, symmetric InfoNCE (`polymodal.losses.contrastive.clip_loss`), backward,
AdamW step. Runs alternate ours / HF so that slow drifts of the machine hit both equally; medians are
reported. HF gets no padding attention_mask (its fastest causal path).

Two text scenarios: "captions" (EOT at positions 8-24, zero padding to 77, as a CLIP tokenizer
gives for ordinary captions) and "full" (all 77 positions used). Our encoders skip work that cannot
change the pooled features (text positions after the batch's last EOT; non-pooled rows of the
last block); HF computes everything.

MFU: analytic FLOPs our training step executes (matmuls only: 2 * weight-size FLOPs per token for
every linear layer and the patch embedding, plus 2 * L^2 * W for each of QK^T and AV per layer,
counted over the full L x L even for causal text; backward = 2x forward) divided by the step time
and by the peak fp32 matmul rate measured in the same run (a 2048^3 matmul). The roofline line prints
those FLOPs at that peak over HF's measured step: the lowest ours/HF any implementation of the same
arithmetic could reach on the device.

With `--profile`, one extra step of each model per scenario runs under torch's profiler and the script
prints where the step's CPU time goes: the share in matrix multiplies and the slowest multiply shapes
with the rate each reached inside the step (compare with the 2048^3 peak).

    python benchmarks/train_step.py [--steps 5] [--batch 8] [--threads N] [--device cpu|cuda] [--precision fp32|bf16]
                                    [--compile] [--profile] [--out PATH]
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import HIDDEN, base_parser, machine_info, set_threads  # noqa: E402
from polymodal.convert.hf_clip import config_from_hf, convert_state_dict  # noqa: E402
from polymodal.hub import load_state_strict  # noqa: E402
from polymodal.losses.contrastive import clip_loss  # noqa: E402
from polymodal.models.clip import CLIP  # noqa: E402
from polymodal.models.factory import build_config  # noqa: E402


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


# --arch: "vit-b-32" (transformers' CLIPConfig defaults: ViT-B/32 at 224, 77-token text, quick_gelu) or "toy"
# (the same layout at width 64, 2 layers: for checking the script, e.g. `gpu_check.sh`'s smoke run).
_TOY_TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
ARCHS = {"vit-b-32": {},                                   # CLIPConfig keyword arguments
         "toy": {"text_config": _TOY_TOWER, "vision_config": {**_TOY_TOWER, "image_size": 64, "patch_size": 32},
                 "projection_dim": 64}}


def build_models(seed: int = 0, arch: str = "vit-b-32"):
    """(ours, hf): CLIPs of architecture `arch` (see ARCHS) with identical weights."""
    import transformers
    torch.manual_seed(seed)
    hf = transformers.CLIPModel(transformers.CLIPConfig(**ARCHS[arch]))
    cfg = build_config(config_from_hf(hf.config.to_dict()))
    ours = CLIP(cfg)
    load_state_strict(ours, convert_state_dict(hf.state_dict()), "in-memory HF CLIPModel")
    return ours, hf


def ours_embed(model, pixels, ids):
    img = model.encode_image(pixels)
    txt = model.encode_text(ids)
    return img, txt, model.scale()


def hf_embed(model, pixels, ids):
    img = F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    txt = F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)
    return img, txt, model.logit_scale.exp().clamp(max=100)


class CompiledEmbed:
    """`embed(model, pixels, ids)` through `torch.compile` (what `train.compile=true` does to a task's forward)."""

    def __init__(self, model, embed):
        self.embed = embed
        self.compiled = torch.compile(lambda pixels, ids: embed(model, pixels, ids))

    def __call__(self, model, pixels, ids):
        return self.compiled(pixels, ids)


def _autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_step(model, embed, pixels, ids, optimizer: str = "fused", precision: str = "fp32"):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, **{optimizer: True})

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(precision, pixels.device):
            img, txt, scale = embed(model, pixels, ids)
            loss = clip_loss(img.float(), txt.float(), scale.float())
        loss.backward()
        opt.step()
        return loss.item()
    return step


def make_forward(model, embed, pixels, ids, precision: str = "fp32"):
    def forward():
        with torch.no_grad(), _autocast(precision, pixels.device):
            img, txt, _ = embed(model, pixels, ids)
        return img.float().sum().item() + txt.float().sum().item()
    return forward


def timed(fn) -> float:
    """Seconds one call takes (`.item()` in the step functions waits for a GPU to finish)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak memory while `fn` runs: CUDA's allocator peak, or on CPU how far this process's resident set rises
    above where it stood before (Linux: the peak is reset through /proc/self/clear_refs; NaN elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return torch.cuda.max_memory_allocated(device) / 2**20
    def status(key: str) -> float:      # kB from /proc/self/status
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return float(line.split()[1])
    try:
        Path("/proc/self/clear_refs").write_text("5")      # resets the peak (VmHWM) to the current RSS
    except OSError:
        return float("nan")
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 1024


def alternate(fn_a, fn_b, runs: int, warmup: int = 2) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        fn_a(), fn_b()
    a, b = [], []
    for _ in range(runs):
        a.append(timed(fn_a))
        b.append(timed(fn_b))
    return a, b


def matmul_peak(n: int = 2048, runs: int = 5, device: torch.device = torch.device("cpu")) -> float:
    """Best measured fp32 matmul rate in FLOP/s."""
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(x, y)
    best = min(timed(lambda: torch.mm(x, y).sum().item()) for _ in range(runs))
    return 2 * n ** 3 / best


def clip_forward_flops(cfg, batch: int, text_len: int) -> dict:
    """Matmul FLOPs of one forward pass of our CLIP's encoders over `batch` image-text pairs.

    Counts what our encoders execute: all blocks but the last over every token; in the last block
    keys/values for every token but queries, output projection and MLP for the pooled row only.
    """
    v, t, E = cfg.vision, cfg.text, cfg.embed_dim

    def tower(width, layers, mlp_ratio, tokens):
        hidden = int(width * mlp_ratio)
        block = 2 * (4 * width * width + 2 * width * hidden)             # per token: qkv, out, fc1, fc2
        attention = 2 * (2 * tokens * tokens * width)                    # QK^T and AV over L x L
        full = (layers - 1) * (tokens * block + attention)
        last = tokens * 2 * (2 * width * width) + block - 2 * (2 * width * width) + 2 * (2 * tokens * width)
        return batch * (full + last)

    patches = (v.image_size // v.patch_size) ** 2
    vision = tower(v.width, v.layers, v.mlp_ratio, patches + 1)
    vision += batch * patches * 2 * (3 * v.patch_size ** 2) * v.width  # patch embedding
    text = tower(t.width, t.layers, t.mlp_ratio, text_len)
    heads = batch * 2 * (v.width + t.width) * E + 2 * batch * batch * E  # projections + logits
    return {"vision": vision, "text": text, "heads": heads, "total": vision + text + heads}


def tune_allocator() -> bool:
    """Keep freed memory in the process (glibc) so each step does not page-fault its activations back in.

    A step allocates and frees hundreds of MB; by default glibc returns such blocks to the OS and
    every step pays ~10^5 page faults (0.3-1 s of system time here). The setting is process-wide,
    so ours and HF gain alike. Returns False where glibc's mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))


def text_batch(batch: int, scenario: str, g: torch.Generator) -> torch.Tensor:
    """(B, 77) CLIP-tokenizer-like ids: SOT, tokens, EOT, zero padding to 77.

    "captions": EOT at positions 8..24 (typical captions are ~10-20 BPE tokens; COCO averages ~12);
    "full": every row uses all 77 positions (EOT last), the case where skipping pads cannot help.
    """
    ids = torch.randint(1, 49405, (batch, 77), generator=g)
    ids[:, 0] = 49406
    eot = torch.randint(8, 25, (batch,), generator=g) if scenario == "captions" else torch.full((batch,), 76)
    ids[torch.arange(batch), eot] = 49407
    ids[torch.arange(77)[None, :] > eot[:, None]] = 0
    return ids


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_profile(step, top: int = 5) -> dict:
    """Profile one call of `step` (CPU): share of self time in matrix multiplies, and the `top` slowest shapes.

    Returns:
        {"step_cpu_s", "matmul_share", "shapes": [{"op", "a", "b", "calls", "s", "gflops"}]}, where a and b
        are the operand shapes (M x K, K x N; batched for bmm) and gflops the rate inside the step.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    shapes = []
    for e in events:
        if e.key not in MATMUL_OPS:
            continue
        a, b = e.input_shapes[1:3] if e.key in ("aten::addmm", "aten::baddbmm") else e.input_shapes[:2]
        batch = a[0] if len(a) == 3 else 1
        macs = batch * a[-2] * a[-1] * b[-1]
        secs = e.self_cpu_time_total / 1e6
        shapes.append({"op": e.key, "a": list(a), "b": list(b), "calls": e.count, "s": secs,
                       "gflops": 2 * macs * e.count / max(secs, 1e-12) / 1e9})
    shapes.sort(key=lambda r: -r["s"])
    return {"step_cpu_s": total, "matmul_share": sum(r["s"] for r in shapes) / max(total, 1e-12),
            "shapes": shapes[:top]}


def first_step_memory(which: str, scenario: str, args) -> float:
    """Peak memory (MB) of one training step of `which` in a fresh process (a warm allocator keeps freed memory
    resident, so in this process later steps would show no rise on CPU)."""
    import subprocess
    cmd = [sys.executable, __file__, "--memory-of", which, "--scenarios", scenario, "--batch", str(args.batch),
           "--arch", args.arch, "--threads", str(args.threads), "--device", args.device, "--precision", args.precision,
           "--optimizer", args.optimizer] + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def run_scenario(ours, hf, pixels, ids, args, scenario: str = "") -> dict:
    embed = CompiledEmbed(ours, ours_embed) if args.compile else ours_embed
    with torch.no_grad():  # same weights -> same features (a guard against comparing different work)
        a, b = embed(ours, pixels, ids), hf_embed(hf, pixels, ids)
    max_diff = max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
    fwd_ours, fwd_hf = alternate(make_forward(ours, embed, pixels, ids, args.precision),
                                 make_forward(hf, hf_embed, pixels, ids, args.precision), args.forward_runs)
    ours_step = make_step(ours, embed, pixels, ids, args.optimizer, args.precision)
    hf_step = make_step(hf, hf_embed, pixels, ids, args.optimizer, args.precision)
    step_ours, step_hf = alternate(ours_step, hf_step, args.steps)
    memory = {"ours": first_step_memory("ours", scenario, args), "hf": first_step_memory("hf", scenario, args)}
    profiles = ({"ours": matmul_profile(ours_step), "hf": matmul_profile(hf_step)}
                if args.profile and pixels.device.type == "cpu" else None)
    # FLOPs our model executes: a causal text tower stops at the last EOT of the batch.
    text_len = int((ids == ours.config.text.eot_token_id).int().argmax(dim=1).max()) + 1
    flops = clip_forward_flops(ours.config, len(ids), text_len)
    med = statistics.median
    return {
        "text_positions_run_by_ours": text_len, "max_abs_feature_diff": max_diff,
        "forward_s": {"ours": med(fwd_ours), "hf": med(fwd_hf), "ours_runs": fwd_ours, "hf_runs": fwd_hf},
        "train_step_s": {"ours": med(step_ours), "hf": med(step_hf), "ours_runs": step_ours, "hf_runs": step_hf},
        "forward_ratio_ours_over_hf": med(fwd_ours) / med(fwd_hf),
        "train_step_ratio_ours_over_hf": med(step_ours) / med(step_hf),
        "train_step_speedup": med(step_hf) / med(step_ours),
        "peak_memory_mb": memory, "profile": profiles,
        "forward_flops": flops, "train_step_flops": 3 * flops["total"],
        "achieved_flops": 3 * flops["total"] / med(step_ours),
    }


def main(argv=None) -> dict:
    ap = base_parser(__doc__, str(Path(__file__).parent / "results" / "train_step.json"), threads=os.cpu_count(),
                     out_help="JSON results file")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per model and scenario (median)")
    ap.add_argument("--forward-runs", type=int, default=5, help="timed forward passes per model and scenario")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                    help="AdamW implementation, the same for both models")
    ap.add_argument("--no-allocator-tuning", action="store_true", help="leave glibc malloc at its defaults")
    ap.add_argument("--scenarios", default="captions,full")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype for both models")
    ap.add_argument("--compile", action="store_true", help="our forward through torch.compile (HF stays eager)")
    ap.add_argument("--arch", choices=list(ARCHS), default="vit-b-32",
                    help="vit-b-32, or toy (width 64, 2 layers) to check the script quickly")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more step per model (CPU): matmul share of the step and the slowest shapes")
    ap.add_argument("--memory-of", choices=["ours", "hf"], help=HIDDEN)   # child: one step, print MB
    args = ap.parse_args(argv)
    set_threads(args.threads)
    tuned = False if args.no_allocator_tuning else tune_allocator()

    t_start = time.perf_counter()
    device = torch.device(args.device)
    ours, hf = build_models(arch=args.arch)
    ours.to(device).train(), hf.to(device).train()
    g = torch.Generator().manual_seed(1)
    size = hf.config.vision_config.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    if args.memory_of:
        ids = text_batch(args.batch, args.scenarios.split(",")[0], g).to(device)
        model, fn = (ours, CompiledEmbed(ours, ours_embed) if args.compile else ours_embed) \
            if args.memory_of == "ours" else (hf, hf_embed)
        print(peak_memory_mb(make_step(model, fn, pixels, ids, args.optimizer, args.precision), device))
        return {}
    results = {}
    for scenario in args.scenarios.split(","):
        results[scenario] = run_scenario(ours, hf, pixels, text_batch(args.batch, scenario, g).to(device), args,
                                         scenario)
    peak = matmul_peak(device=device)
    for r in results.values():
        r["mfu"] = r["achieved_flops"] / peak
        r["forward_mfu"] = r["forward_flops"]["total"] / r["forward_s"]["ours"] / peak
        # The roofline: our step's matmul FLOPs at the measured peak rate, against HF's measured step: an
        # implementation of the same arithmetic (same precision, same FLOPs) gets below this ours/HF only by
        # beating the measured matmul peak.
        r["roofline_step_s"] = r["train_step_flops"] / peak
        r["roofline_ratio_over_hf"] = r["roofline_step_s"] / r["train_step_s"]["hf"]
    res = {
        "config": f"{args.arch} (image {size}, text 77)", "batch": args.batch, "precision": args.precision,
        "device": str(device), "compile": args.compile,
        "threads": args.threads, "optimizer": f"AdamW ({args.optimizer})", "allocator_tuned": tuned,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": machine_info(), "matmul_peak_flops": peak,
        "scenarios": results,
    }
    res["wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))

    print(f"{args.arch} CLIP, batch {args.batch}, {args.precision}, {device} x{args.threads} threads, "
          f"compile: {args.compile}, AdamW {args.optimizer}, "
          f"allocator tuned: {tuned} (torch {torch.__version__}, transformers {res['transformers']})")
    print(f"{'scenario':10}{'':12}{'ours (s)':>9}{'HF (s)':>9}{'ours/HF':>9}{'speedup':>9}{'MFU':>7}  text pos")
    for name, r in results.items():
        for what, key, mfu in (("forward", "forward_s", r["forward_mfu"]), ("train step", "train_step_s", r["mfu"])):
            o, h = r[key]["ours"], r[key]["hf"]
            print(f"{name:10}{what:12}{o:9.3f}{h:9.3f}{o / h:9.2f}{h / o:8.2f}x{mfu:7.1%}  "
                  f"{r['text_positions_run_by_ours']}/77 (|diff| {r['max_abs_feature_diff']:.0e})")
    for name, r in results.items():
        print(f"{name:10}roofline: our step's FLOPs at the matmul peak take {r['roofline_step_s']:.3f} s, "
              f"{r['roofline_ratio_over_hf']:.2f} of HF's step (the lowest ours/HF this device allows in "
              f"{args.precision} without fewer FLOPs)")
    for name, r in results.items():
        m = r["peak_memory_mb"]
        print(f"{name:10}peak memory of a first training step (fresh process, incl. AdamW state): ours {m['ours']:.0f} MB, HF {m['hf']:.0f} MB")
    for name, r in results.items():
        for who, prof in (r["profile"] or {}).items():
            slow = "; ".join(f"{x['op'][6:]} {'x'.join(map(str, x['a']))} @ {'x'.join(map(str, x['b']))}: "
                             f"{x['gflops']:.0f} GFLOP/s" for x in prof["shapes"][:3])
            print(f"{name:10}profile {who}: {prof['matmul_share']:.0%} of {prof['step_cpu_s']:.2f} s CPU in "
                  f"matmuls; slowest: {slow}")
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; train-step FLOPs (ours): "
          + ", ".join(f"{n} {r['train_step_flops'] / 1e9:.0f} G" for n, r in results.items())
          + f"; wrote {out} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
