"""Run reports: curves from metrics.jsonl, a retrieval gallery, and report.md + report.html."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import torch


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (empty list when absent)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], out_png: Path) -> list[str]:
    """Plot training loss and every eval/*R@1 or */top1 metric against the step. Returns the plotted keys."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    keys = sorted({k for r in evals for k in r if k.startswith("eval/") and (k.endswith("R@1") or k.endswith("top1"))})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    axes[0].set(xlabel="step", ylabel="training loss", title="Loss")
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k[5:])
    axes[1].set(xlabel="step", ylabel="%", title="Evaluation")
    if keys:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return keys


@torch.no_grad()
def retrieval_gallery(model, manifest, out_png: Path, caption_key: str = "caption", n_queries: int = 4,
                      pool: int = 200, seed: int = 0) -> list[dict]:
    """Text-to-image gallery: for a few query captions, the top-5 images of a pool, the right one framed green.

    Returns:
        One dict per query: text, the ranked image paths and the rank of the right image (1-based).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from ..data.manifests import read_manifest
    from .suite import encode_images, encode_texts
    records = read_manifest(manifest).records[:pool]
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(records), generator=g)[:n_queries].tolist()
    img = encode_images(model, [r["image"] for r in records])
    txt = encode_texts(model, [records[i][caption_key] for i in picks])
    sims = txt @ img.T                                                     # (Q, N)
    rows = []
    fig, axes = plt.subplots(len(picks), 6, figsize=(12, 2.3 * len(picks)), squeeze=False)
    for q, i in enumerate(picks):
        order = sims[q].argsort(descending=True).tolist()
        rank = order.index(i) + 1
        rows.append({"text": records[i][caption_key], "top5": [records[j]["image"] for j in order[:5]], "rank": rank})
        ax = axes[q][0]
        ax.axis("off")
        ax.text(0, 0.5, _wrap(records[i][caption_key], 28) + f"\n(right image: rank {rank})", fontsize=7,
                va="center", wrap=True)
        for c, j in enumerate(order[:5]):
            ax = axes[q][c + 1]
            ax.imshow(Image.open(records[j]["image"]).convert("RGB"))
            ax.set_xticks([])
            ax.set_yticks([])
            hit = j == i
            for side in ax.spines.values():
                side.set_edgecolor("limegreen" if hit else "lightgray")
                side.set_linewidth(5 if hit else 1)
            ax.set_title(f"#{c + 1}" + (" (right)" if hit else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return rows


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:8])


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def write_report(run_dir: Path, title: str, metrics: dict, chance: dict, images: dict[str, Path],
                 notes: list[str]) -> tuple[Path, Path]:
    """Write report.md and a self-contained report.html (images inlined) into `run_dir`.

    Args:
        metrics: flat name -> value.
        chance: name -> chance level for the same metric (shown beside it when known).
        images: caption -> PNG path.
        notes: free-text lines shown under the table.
    """
    run_dir = Path(run_dir)
    lines = [f"# {title}", "", "| metric | value | chance |", "|---|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {_fmt(v)} | {_fmt(chance.get(k, ''))} |")
    lines += [""] + [f"- {n}" for n in notes] + [""]
    for caption, path in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({Path(path).name})", ""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{_fmt(chance.get(k, ''))}</td></tr>"
                   for k, v in metrics.items())
    figs = "".join(
        f"<h2>{html.escape(c)}</h2><img style='max-width:100%' src='data:image/png;base64,"
        f"{base64.b64encode(Path(p).read_bytes()).decode()}'/>" for c, p in images.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 10px;"
            "border-bottom:1px solid #ddd}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table><tr><th>metric</th><th>value</th><th>chance</th></tr>{rows}</table>"
            f"<ul>{notes_html}</ul>{figs}</body></html>")
    out_html = run_dir / "report.html"
    out_html.write_text(page, encoding="utf-8")
    return md, out_html
