"""Run reports: grouped metrics with chance levels, smoothed curves, retrieval galleries, report.md + report.html.

The pieces are separate so `polymodal report RUN_DIR` (`polymodal/run_report.py`) and the demo build the same
page: `group_metrics` + `chance_levels` for the table, `plot_curves` for the loss / validation-loss and
evaluation curves, `gallery_rows` + `render_gallery` for text-to-image galleries that always show the right
image and its rank, and `write_report` for the two files.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Per task group, the metric that heads it (the first one present wins).
HEADLINE_KEYS = ("mean_recall", "text_to_image_R@1", "top1", "mAP", "CIDEr-D", "accuracy", "max_skew",
                 "task_accuracy", "R@1")
# Bookkeeping numbers: used for chance levels and shown under the table, not as metrics.
COUNT_SUFFIXES = ("num_images", "num_texts", "num_classes", "num_videos", "num_classes_with_positives")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (empty list when absent; torn lines are passed over)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction (the first points are not pulled to 0).

    Args:
        values: the raw series.
        weight: 0 = no smoothing, towards 1 = smoother.
    Returns:
        A list as long as `values`; `s_t = (w s_{t-1} + (1 - w) x_t) / (1 - w^t)` with `s_0 = 0`.
    """
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * v
        out.append(acc / (1.0 - weight ** t) if weight < 1.0 else values[0])
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a run's records: "loss" (training), "val/loss", and every "eval/..." number."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        step = r.get("step")
        if not _is_number(step):
            continue
        for k, v in r.items():
            if (k == "loss" or k == "val/loss" or k.startswith("eval/")) and _is_number(v) \
                    and not k.endswith(COUNT_SUFFIXES):
                out.setdefault(k, []).append((int(step), float(v)))
    return out


def plot_curves(records: list[dict], out_png: Path, smoothing: float = 0.9) -> list[str]:
    """Plot the training loss (raw, faint, and smoothed), the validation loss, and each eval group's headline
    metric against the step.

    Args:
        records: the records of metrics.jsonl.
        out_png: the figure.
        smoothing: EMA weight for the training loss (`smooth`).
    Returns:
        The eval keys plotted in the right panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = curve_series(records)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    train = series.get("loss", [])
    if train:
        steps = [s for s, _ in train]
        raw = [v for _, v in train]
        ax.plot(steps, raw, color="tab:blue", alpha=0.35, linewidth=1, label="training (raw)")
        ax.plot(steps, smooth(raw, smoothing), color="tab:blue", linewidth=2,
                label=f"training (smoothed, EMA {smoothing:g})")
    val = series.get("val/loss", [])
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], color="tab:orange", marker="o", linewidth=2,
                label="validation")
    ax.set(xlabel="step", ylabel="loss", title="Loss" + ("" if val else " (no validation loss logged)"))
    if train or val:
        ax.legend(fontsize=9)
    keys = []
    for group in group_metrics({k[5:]: v[-1][1] for k, v in series.items() if k.startswith("eval/")}, {}):
        if group.headline is not None:
            keys.append(f"eval/{group.name}/{group.headline}" if group.name != "metrics" else f"eval/{group.headline}")
    for k in keys:
        pts = series[k]
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k[5:])
    axes[1].set(xlabel="step", ylabel="%", title="Evaluation (headline of each task)")
    if keys:
        axes[1].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return keys


# ---- metrics: chance levels and groups ----------------------------------------------------------------------
def _recall_chance(k: int, n: int, m: float = 1.0) -> float:
    """Chance (%) that at least one of `m` relevant items of `n` is in a random top `k` (hypergeometric)."""
    if n <= 0:
        return float("nan")
    m = max(1, int(round(m)))
    k = min(k, n)
    miss = 1.0
    for i in range(k):                       # P(first k picks all miss the m relevant ones)
        miss *= max(n - m - i, 0) / (n - i)
    return 100.0 * (1.0 - miss)


def _split(key: str) -> tuple[str, str]:
    """(task group, metric) of a flat key: the group is the first component (`scene/temporal/mAP` -> `scene`,
    `temporal/mAP`); a key without one is a metric of no group."""
    return tuple(key.split("/", 1)) if "/" in key else ("", key)


def chance_levels(metrics: dict) -> dict:
    """The value of each metric for random scores, from the counts of its own task group.

    Retrieval (images or videos): `text_to_X_R@K` -> K / N items (also after re-ranking), `X_to_text_R@K` -> a
    random top K of the texts holding one of the item's captions, ranks -> (N + 1) / 2, `mean_recall` -> the mean
    of those; classification `topK` -> K / num_classes; a task that reports its own chance (`<metric>_chance`:
    scene and multi-label mAP, hit@k; SNP-S3's `word_chance`) -> that; reward accuracy (a group with `pairs`) ->
    50; fairness skews -> 0 (a random answerer treats every group alike). Metrics without a known chance level are
    left out.

    Args:
        metrics: flat `group/metric` (or `metric`) -> value, with the group's `num_*` counts.
    Returns:
        metric name -> chance value, on the metric's own scale.
    """
    out: dict = {}
    for key in metrics:
        group, name = _split(key)
        count = lambda what: metrics.get(f"{group}/{what}" if group else what)
        n_items = count("num_images") or count("num_videos")
        n_txt, n_cls = count("num_texts"), count("num_classes")
        per_item = (n_txt / n_items) if n_items and n_txt else 1.0
        m = re.fullmatch(r"(?:rerank_)?(image_to_text|video_to_text|text_to_image|text_to_video)_R@(\d+)", name)
        if m and n_items:
            k = int(m.group(2))
            out[key] = (_recall_chance(k, n_items) if m.group(1).startswith("text_to")
                        else _recall_chance(k, int(n_txt or n_items), per_item))
        elif re.fullmatch(r"text_to_(image|video)_(median|mean)_rank", name) and n_items:
            out[key] = (n_items + 1) / 2
        elif re.fullmatch(r"top(\d+)", name) and n_cls:
            out[key] = 100.0 * min(int(name[3:]), n_cls) / n_cls
        elif f"{key}_chance" in metrics and _is_number(metrics[f"{key}_chance"]):
            out[key] = metrics[f"{key}_chance"]
        elif name in ("word_P@1", "word_mAP") and _is_number(count("word_chance")):
            out[key] = count("word_chance")
        elif count("pairs") and (name == "accuracy" or name.startswith(("accuracy_", "subset_"))
                                 or name == "worst_dimension_accuracy"):
            out[key] = 50.0
        elif re.fullmatch(r"(worst_)?(min|max)_skew(/.*)?", name):
            out[key] = 0.0
    for key in metrics:
        group, name = _split(key)
        if name == "mean_recall":
            parts = [v for k, v in out.items() if _split(k)[0] == group and "_R@" in k and "rerank" not in k]
            if parts:
                out[key] = sum(parts) / len(parts)
    return out


@dataclass
class MetricGroup:
    """The metrics of one evaluation task (`retrieval`, `longtext`, `zeroshot_zh` ...)."""
    name: str
    metrics: dict = field(default_factory=dict)       # metric -> value (without the group prefix)
    chance: dict = field(default_factory=dict)        # metric -> chance value
    counts: dict = field(default_factory=dict)        # num_images, num_texts, ...
    headline: str | None = None                       # the metric that heads the group


def group_metrics(metrics: dict, chance: dict) -> list[MetricGroup]:
    """Split flat `group/metric` numbers into task groups (in first-seen order), each with its headline.

    Lists (per-class APs), strings and the `num_*` counts are not metrics; the counts are kept apart.
    """
    groups: dict[str, MetricGroup] = {}
    for key, value in metrics.items():
        group, name = _split(key)
        g = groups.setdefault(group or "metrics", MetricGroup(group or "metrics"))
        if name.endswith(COUNT_SUFFIXES) or name.endswith("_chance") or name in ("pairs", "word_queries"):
            if _is_number(value):
                g.counts[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) and value is not None:
            continue
        g.metrics[name] = value
        if key in chance:
            g.chance[name] = chance[key]
    for g in groups.values():
        g.headline = next((k for k in HEADLINE_KEYS if k in g.metrics), next(iter(g.metrics), None))
    return [g for g in groups.values() if g.metrics]


def headline(groups: list[MetricGroup]) -> tuple[str, float, float | None] | None:
    """(label, value, chance) of the run's headline: the first group's headline metric."""
    for g in groups:
        if g.headline is not None and _is_number(g.metrics[g.headline]):
            label = g.headline if g.name == "metrics" else f"{g.name}/{g.headline}"
            return label, float(g.metrics[g.headline]), g.chance.get(g.headline)
    return None


# ---- galleries --------------------------------------------------------------------------------------------
@torch.no_grad()
def gallery_rows(model, manifest, caption_key: str = "caption", n_queries: int = 4, pool: int = 200,
                 seed: int = 0, top_k: int = 5) -> list[dict]:
    """Text-to-image retrieval for a few query captions over the first `pool` images of a manifest.

    Args:
        model: a dual encoder with tokenizer and image_transform.
        manifest: JSONL/CSV with `image` and `caption_key`.
        caption_key: "caption", "long_caption", ...
        n_queries: queries drawn (seeded) from the pool.
        pool: images searched.
        top_k: images listed per query (the right one is added after them when it ranks lower).
    Returns:
        One dict per query: `text`, `target` (its image path), `rank` (1-based, of the right image),
        `ranked` (the top_k `{"image", "score", "caption"}`), `target_score`, and `sentences`: the query's
        sentences as `(text, differs)`, `differs` when the sentence is not in the nearest other caption of
        the pool (the one sharing most sentences with it, e.g. a hard-set sibling; ties go to the better
        ranked image): what tells the right image apart.
    """
    from ..data.manifests import read_manifest
    from ..encode import encode_images, encode_texts
    records = [r for r in read_manifest(manifest).records if r.get(caption_key)][:pool]
    if not records:
        return []
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(records), generator=g)[:n_queries].tolist()
    img = encode_images(model, [r["image"] for r in records])
    txt = encode_texts(model, [records[i][caption_key] for i in picks])
    sims = txt @ img.T                                                     # (Q, N)
    sentence_sets = [{_norm(x) for x in _sentences(r[caption_key])} for r in records]
    rows = []
    for q, i in enumerate(picks):
        order = sims[q].argsort(descending=True).tolist()
        text = records[i][caption_key]
        shared = {j: len(sentence_sets[i] & sentence_sets[j]) for j in order if j != i}
        wrong = max(shared, key=shared.get) if shared else None          # dict order = rank order: ties to the better
        rival = records[wrong][caption_key] if wrong is not None else None
        rows.append({
            "text": text, "target": records[i]["image"], "rank": order.index(i) + 1,
            "target_score": float(sims[q, i]),
            "ranked": [{"image": records[j]["image"], "score": float(sims[q, j]), "caption": records[j][caption_key]}
                       for j in order[:top_k]],
            "sentences": differing_sentences(text, rival),
        })
    return rows


def differing_sentences(text: str, other: str | None) -> list[tuple[str, bool]]:
    """`text` cut into sentences (whitespace kept), each flagged when it does not occur in `other`.

    Nothing is flagged when `other` is None or every sentence differs (short captions of unrelated images)."""
    from ..data.datasets import sentence_spans
    spans = sentence_spans(text)
    if not spans:
        return [(text, False)]
    pieces, last = [], 0
    for a, b in spans:
        if a > last:
            pieces.append((text[last:a], False))
        pieces.append((text[a:b], None))
        last = b
    if last < len(text):
        pieces.append((text[last:], False))
    others = {_norm(s) for s in _sentences(other)} if other else set()
    flags = [_norm(p) not in others for p, f in pieces if f is None]
    highlight = bool(others) and not all(flags)
    out, it = [], iter(flags)
    for p, f in pieces:
        out.append((p, bool(next(it)) and highlight) if f is None else (p, False))
    return out


def _norm(sentence: str) -> str:
    return " ".join(sentence.lower().split()).strip(" .")


def _sentences(text: str) -> list[str]:
    from ..data.datasets import split_sentences
    return split_sentences(text)


def _data_uri(path, thumb: int = 160) -> str:
    """An image file as an inline PNG data URI (scaled so its longer side is at most `thumb` pixels)."""
    from PIL import Image
    im = Image.open(path).convert("RGB")
    im.thumbnail((thumb, thumb))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(path, label: str, classes: str, caption: str | None = None) -> str:
    title = f" title='{html.escape(caption, quote=True)}'" if caption else ""
    return (f"<figure class='{classes}'><img src='{_data_uri(path)}' alt='{html.escape(label, quote=True)}'{title}/>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>")


def render_gallery(rows: list[dict], title: str, note: str = "") -> str:
    """HTML of one gallery: per query its whole text (the differing sentence marked), the top images, and
    the right image framed green with its rank, also when it ranks below the top images."""
    parts = [f"<section class='gallery'><h2>{html.escape(title)}</h2>"]
    if note:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    for row in rows:
        text = "".join(f"<mark class='differs'>{html.escape(s)}</mark>" if d else html.escape(s)
                       for s, d in row["sentences"])
        rank = row["rank"]
        found = rank <= len(row["ranked"])
        status = "in the top" if found else "below the top"
        parts.append(f"<div class='gallery-row'><div class='query'><p class='query-text'>{text}</p>"
                     f"<p class='target-rank {'hit' if rank == 1 else 'miss'}' data-rank='{rank}'>right image: "
                     f"rank {rank} ({status} {len(row['ranked'])})</p></div><div class='images'>")
        for c, item in enumerate(row["ranked"], start=1):
            hit = item["image"] == row["target"]
            parts.append(_figure(item["image"], f"#{c}{' right image' if hit else ''} · {item['score']:.2f}",
                                 "target" if hit else "other", None if hit else item.get("caption")))
        if not found:
            parts.append("<div class='gap'>…</div>")
            parts.append(_figure(row["target"], f"#{rank} right image · {row['target_score']:.2f}", "target"))
        parts.append("</div></div>")
    parts.append("</section>")
    return "".join(parts)


# ---- the page ------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.2f}"
    return str(v)


_CSS = """
body{font-family:system-ui,sans-serif;font-size:16px;line-height:1.45;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.7em}h2{font-size:1.3em;margin-top:1.6em}h3{font-size:1.05em;margin:1em 0 .3em}
.headline{font-size:1.4em;padding:.6em 1em;background:#eef6ee;border-left:6px solid #3a3;margin:1em 0}
.headline .chance{color:#666;font-size:.75em}
table{border-collapse:collapse;margin-bottom:.6em}td,th{padding:3px 12px;border-bottom:1px solid #ddd;text-align:left}
tr.head td{font-weight:bold}.counts{color:#666;font-size:.9em}
.gallery-row{display:flex;gap:1em;align-items:flex-start;border-bottom:1px solid #ddd;padding:.8em 0}
.query{flex:0 0 360px}.query-text{font-size:15px;margin:0 0 .4em;white-space:pre-wrap}
mark.differs{background:#ffe066;padding:0 2px}
.target-rank{font-weight:bold;margin:0}.target-rank.hit{color:#1a7f1a}.target-rank.miss{color:#b35900}
.images{display:flex;flex-wrap:nowrap;gap:8px;align-items:flex-start;overflow-x:auto}
figure{margin:0;text-align:center;font-size:13px}figure img{width:100px;height:100px;image-rendering:pixelated;
border:3px solid #ccc;display:block}figure.target img{border:5px solid #22bb22}.gap{align-self:center;font-size:24px}
pre.recipe{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:13px}
"""


def _metrics_html(groups: list[MetricGroup]) -> str:
    parts = []
    for g in groups:
        parts.append(f"<h3>{html.escape(g.name)}</h3><table class='metrics' data-group='{html.escape(g.name)}'>"
                     "<tr><th>metric</th><th>value</th><th>chance</th></tr>")
        names = ([g.headline] if g.headline else []) + [k for k in g.metrics if k != g.headline]
        for k in names:
            cls = " class='head'" if k == g.headline else ""
            parts.append(f"<tr{cls}><td>{html.escape(k)}</td><td>{_fmt(g.metrics[k])}</td>"
                         f"<td>{_fmt(g.chance.get(k))}</td></tr>")
        parts.append("</table>")
        if g.counts:
            parts.append("<p class='counts'>" + ", ".join(f"{html.escape(k)}={_fmt(v)}" for k, v in g.counts.items())
                         + "</p>")
    return "".join(parts)


def _metrics_md(groups: list[MetricGroup]) -> list[str]:
    lines = []
    for g in groups:
        lines += [f"### {g.name}", "", "| metric | value | chance |", "|---|---|---|"]
        names = ([g.headline] if g.headline else []) + [k for k in g.metrics if k != g.headline]
        for k in names:
            name = f"**{k}**" if k == g.headline else k
            lines.append(f"| {name} | {_fmt(g.metrics[k])} | {_fmt(g.chance.get(k))} |")
        if g.counts:
            lines += ["", ", ".join(f"{k}={_fmt(v)}" for k, v in g.counts.items())]
        lines.append("")
    return lines


def _recipe_text(recipe: dict) -> str:
    """The recipe as YAML (loadable again with `polymodal train`), lists on one line."""
    import yaml
    return yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False, default_flow_style=None,
                          allow_unicode=True, width=100).rstrip()


def write_report(run_dir: Path, title: str, metrics: dict, chance: dict | None, images: dict[str, Path],
                 notes: list[str], recipe: dict | None = None, galleries: list[tuple[str, list[dict], str]] = (),
                 ) -> tuple[Path, Path]:
    """Write report.md and a self-contained report.html (images inlined) into `run_dir`.

    Args:
        metrics: flat `group/metric` -> value (the `num_*` counts of a group give its chance levels).
        chance: metric -> chance level; None = `chance_levels(metrics)`.
        images: caption -> PNG path (curves ...).
        notes: free-text lines shown under the headline.
        recipe: the run's config (shown as YAML at the end).
        galleries: `(title, gallery_rows(...), note)` per gallery (HTML only; the Markdown lists the ranks).
    Returns:
        (report.md, report.html) paths.
    """
    run_dir = Path(run_dir)
    chance = chance_levels(metrics) if chance is None else chance
    groups = group_metrics(metrics, chance)
    head = headline(groups)
    head_text = ""
    if head is not None:
        label, value, ch = head
        head_text = f"{label} = {_fmt(value)}" + (f" (chance {_fmt(ch)})" if ch is not None else "")
    lines = [f"# {title}", ""]
    if head_text:
        lines += [f"**Headline: {head_text}**", ""]
    lines += [f"- {n}" for n in notes] + [""] + _metrics_md(groups)
    for caption, path in images.items():
        lines += [f"## {caption}", "", f"![{caption}]({Path(path).name})", ""]
    for g_title, rows, _ in galleries:
        lines += [f"## {g_title}", ""]
        for row in rows:
            lines.append(f"- rank {row['rank']}: {' '.join(row['text'].split())}")
        lines.append("")
    if recipe is not None:
        lines += ["## Recipe", "", "```yaml", _recipe_text(recipe), "```", ""]
    md = run_dir / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")

    head_html = ""
    if head is not None:
        label, value, ch = head
        head_html = (f"<div class='headline' id='headline'>{html.escape(label)} = <b>{_fmt(value)}</b>"
                     + (f" <span class='chance'>(chance {_fmt(ch)})</span>" if ch is not None else "") + "</div>")
    figs = "".join(
        f"<h2>{html.escape(c)}</h2><img style='max-width:100%' alt='{html.escape(c, quote=True)}' "
        f"src='data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}'/>" for c, p in images.items())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    gallery_html = "".join(render_gallery(rows, g_title, note) for g_title, rows, note in galleries)
    recipe_html = ("<h2>Recipe</h2><pre class='recipe'>" + html.escape(_recipe_text(recipe))
                   + "</pre>") if recipe is not None else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{head_html}<ul>{notes_html}</ul>"
            f"<h2>Metrics</h2>{_metrics_html(groups)}{figs}{gallery_html}{recipe_html}</body></html>")
    out_html = run_dir / "report.html"
    out_html.write_text(page, encoding="utf-8")
    return md, out_html


__all__ = ["MetricGroup", "chance_levels", "curve_series", "differing_sentences", "gallery_rows", "group_metrics",
           "headline", "plot_curves", "read_metrics", "render_gallery", "smooth", "write_report"]
