"""`parquet`: preference pairs of any layout stored as Parquet (read with pyarrow), mapped by `keys`.

Layout: the Hugging Face Hub's Parquet files, `data/<split>-00000-of-0000N.parquet` (the `data_files` of the
dataset cards' `configs`, e.g. HuggingFaceH4/ultrafeedback_binarized's `train_prefs` / `test_prefs`, trl-lib's
preference sets), or any `.parquet` file; a folder is read file by file (any depth, sorted), each file's split
being its name before `-NNNNN-of-NNNNN` (or its stem). Each row is one pair.

`keys` maps our fields (`prompt`, `chosen`, `rejected`, `margin`, `dimension`, `subset`) to the file's columns,
as `polymodal.data.preference.read_preferences` takes them: a dotted path reaches into nested structs and lists
(`chosen.1.content`), and `margin` may be two paths whose difference it is (`[score_chosen, score_rejected]`);
unnamed fields keep their names. Values stay as stored: strings or chat message lists (`[{"role", "content"}]`),
message structs keeping only role and content. Records: `{"prompt", "chosen", "rejected", "margin", "dimension",
"subset", "split"}` (those present). Rows without both sides, and pairs with an empty or identical response, are
left out and counted in the notes.

Options: `keys` (e.g. `-o keys.chosen=answer_a -o keys.margin=[score_a,score_b]`). Needs pyarrow.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..preference import MISSING, get_dotted
from .common import Imported, LayoutError, require_split
from .options import check_options
from .pairs import Dropped, why_unusable

FIELDS = ("prompt", "chosen", "rejected", "margin", "dimension", "subset")
OPTIONS = ("keys",)
_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


def _keys(keys) -> dict:
    mapping = {f: f for f in FIELDS}
    if keys is None:
        return mapping
    if not isinstance(keys, dict):
        raise LayoutError(f"parquet: keys must map fields to columns (-o keys.chosen=COLUMN), got {keys!r}")
    for k, v in keys.items():
        if k not in FIELDS:
            from ...config import did_you_mean
            raise LayoutError(f"parquet: keys: unknown field {k!r}{did_you_mean(k, FIELDS)}; fields: "
                              f"{', '.join(FIELDS)}")
        pair = k == "margin" and isinstance(v, (list, tuple))
        if pair and (len(v) != 2 or not all(isinstance(x, str) and x for x in v)):
            raise LayoutError(f"parquet: keys.margin must be a column or two columns [a, b] (a - b), got {v!r}")
        if not pair and (not isinstance(v, str) or not v):
            raise LayoutError(f"parquet: keys.{k} must name a column, got {v!r}")
        mapping[k] = list(v) if pair else v
    return mapping


def _text(value):
    """A string, a message list (role and content kept), or None when the value is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _split_of(path: Path) -> str:
    stem = path.name[: -len(".parquet")]
    m = _SHARD.match(stem)
    return m.group("split") if m else stem


def read(src, split: str | None = None, **options) -> Imported:
    """Preference records of Parquet files mapped by `keys` (see the module docstring)."""
    check_options("parquet", options, OPTIONS)
    mapping = _keys(options.get("keys"))
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LayoutError("parquet: reading Parquet needs pyarrow (pip install pyarrow)") from None
    src = Path(src)
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = sorted(p for p in src.rglob("*.parquet") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{src}: no .parquet file found (in the folder and below)")
    else:
        raise FileNotFoundError(f"{src} does not exist (give a .parquet file or a folder of them)")
    require_split(split, {_split_of(f) for f in files}, src)
    records, dropped = [], Dropped()
    for f in files:
        if split not in (None, _split_of(f)):
            continue
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:          # pyarrow raises its own error types for a damaged or foreign file
            raise LayoutError(f"{f}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
        columns = pf.schema_arrow.names
        for side in ("chosen", "rejected"):
            if mapping[side] not in columns and mapping[side].split(".")[0] not in columns:
                raise LayoutError(f"{f}: no column {mapping[side]!r} for {side} (columns: {', '.join(columns)}); "
                                  f"map one with -o keys.{side}=COLUMN")
        wanted = sorted({c for v in mapping.values() for p in (v if isinstance(v, list) else [v])
                         for c in (p, p.split(".")[0]) if c in columns})
        n = 0
        for batch in pf.iter_batches(batch_size=1024, columns=wanted):
            for row in batch.to_pylist():
                n += 1
                where = f"{f}:row {n}"
                values = {side: _text(get_dotted(row, mapping[side])) for side in ("chosen", "rejected")}
                if values["chosen"] is None or values["rejected"] is None:
                    dropped.add("chosen / rejected is not a string or a message list", where)
                    continue
                reason = why_unusable(values["chosen"], values["rejected"])
                if reason:
                    dropped.add(reason, where)
                    continue
                record = {}
                prompt = get_dotted(row, mapping["prompt"])
                if prompt is not MISSING and prompt is not None:
                    if _text(prompt) is None:
                        dropped.add("prompt is not a string or a message list", where)
                        continue
                    record["prompt"] = _text(prompt)
                record.update(values)
                m = mapping["margin"]
                margin = (_number(get_dotted(row, m[0])), _number(get_dotted(row, m[1]))) if isinstance(m, list) else \
                    (_number(get_dotted(row, m)), 0.0)
                if margin[0] is not None and margin[1] is not None:
                    record["margin"] = margin[0] - margin[1]
                for field in ("dimension", "subset"):
                    v = get_dotted(row, mapping[field])
                    if isinstance(v, str) and v.strip():
                        record[field] = v.strip()
                record["split"] = _split_of(f)
                records.append(record)
    return Imported(records, "preference", notes=dropped.notes())
