"""Command-line parts of `polymodal embed`, `polymodal index build|add`, `polymodal search` and `polymodal serve`.

Each command has `add_<name>_arguments(parser)` (fills an argparse (sub)parser) and `main_<name>(args)` (runs
it, prints, returns the result); `polymodal/cli.py` wires them in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli import positive_int as _positive

TOKEN_ENV = "POLYMODAL_SEARCH_TOKEN"


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device for the model: cpu (default), cuda, cuda:N or auto")


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive, default=32, help="images per forward pass (default 32)")
    p.add_argument("--chunk-size", type=_positive, default=256,
                   help="items per chunk file; a killed run resumes after the last finished chunk (default 256)")
    p.add_argument("--num-frames", type=_positive, default=8, help="frames sampled per video (default 8)")
    p.add_argument("--float16", action="store_true", help="store vectors as float16 (half the size)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _load_model(source: str, device: str):
    from ..cli import resolve_device
    from ..hub import load_model
    dev = resolve_device(device)
    model = load_model(source).eval()
    return model.to(dev) if dev.type != "cpu" else model


def _check_saved(model: str) -> None:
    """Refuse to index with a bundled config name: its weights are random and drawn anew at every load, so the
    index could never be queried again."""
    if not os.path.exists(model):
        from ..models.factory import list_configs
        if model in list_configs():
            raise ValueError(f"MODEL {model!r} is a bundled config with random weights, drawn anew at every load, so "
                             f"an index built with it could never be queried; give a trained model folder (e.g. "
                             f"runs/demo/run/model after `make demo`), an HF CLIP folder or an OpenCLIP checkpoint")


def _source(model: str) -> str:
    """The model as recorded in an index: an absolute path when it is one, else the name."""
    return os.path.abspath(model) if os.path.exists(model) else model


def _settings(args):
    from .embed import EmbedSettings
    return EmbedSettings(batch_size=args.batch_size, chunk_size=args.chunk_size, num_frames=args.num_frames,
                         float16=args.float16)


def _report_skipped(skipped: list[dict], limit: int = 5) -> None:
    if not skipped:
        return
    from collections import Counter
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(Counter(s.get("reason", "?") for s in skipped).items()))
    print(f"skipped {len(skipped)} file(s) ({reasons}):", file=sys.stderr)
    for s in skipped[:limit]:
        print(f"  {s.get('detail') or s['path']}", file=sys.stderr)
    if len(skipped) > limit:
        print("  ... (all listed in skipped.jsonl)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- embed
def add_embed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `polymodal embed MODEL --data FOLDER|MANIFEST --out DIR`."""
    parser.add_argument("model", help="model directory/checkpoint or bundled config name")
    parser.add_argument("--data", required=True, help="folder of images/videos (recursive), a manifest, or a .txt "
                                                      "file of texts (one per line)")
    parser.add_argument("--out", required=True, help="output folder (vectors.npy, items.jsonl, ...; resumable)")
    _model_arguments(parser)
    _embed_arguments(parser)
    return parser


def main_embed(args) -> dict:
    """Run `polymodal embed`; prints and returns a summary dict."""
    from .embed import embed_collection
    _check_saved(args.model)
    model = _load_model(args.model, args.device)
    emb = embed_collection(model, args.data, args.out, _settings(args), progress=not args.quiet,
                           model_source=_source(args.model))
    _report_skipped(emb.skipped)
    summary = {"out": os.path.abspath(args.out), "count": len(emb.items), "dim": emb.dim,
               "frames": int(len(emb.frames)), "skipped": len(emb.skipped), "dtype": str(emb.vectors.dtype)}
    print(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------------------------- index
def add_index_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Subcommands `polymodal index build MODEL --data X --out INDEX` and `polymodal index add INDEX --data X`."""
    sub = parser.add_subparsers(dest="index_cmd", required=True)
    b = sub.add_parser("build", help="embed a folder or manifest and build a FAISS index",
                       description="Embed FOLDER|MANIFEST with MODEL and write a search index. Exact inner-product "
                                   "search by default; --kind ivf or hnsw for large collections (their recall@10 "
                                   "against exact search is printed). A killed build resumes when run again.")
    b.add_argument("model", help="model directory/checkpoint or bundled config name")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder of images/videos (recursive), a manifest, or a .txt file")
    src.add_argument("--embeddings", help="a folder written by `polymodal embed` (made with the same MODEL)")
    b.add_argument("--out", required=True, help="index folder")
    b.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat", help="index type (default flat = exact)")
    b.add_argument("--nlist", type=_positive, help="ivf: number of lists (default ~2 sqrt(N))")
    b.add_argument("--nprobe", type=_positive, help="ivf: lists searched per query (default nlist/8)")
    b.add_argument("--hnsw-m", type=_positive, default=32, help="hnsw: neighbours per node (default 32)")
    b.add_argument("--ef-search", type=_positive, default=128, help="hnsw: search breadth (default 128)")
    _model_arguments(b)
    _embed_arguments(b)
    a = sub.add_parser("add", help="add the new or changed files of a folder or manifest to an index",
                       description="Embed only files whose path, size or modification time is not in INDEX yet, "
                                   "replace entries of changed files, and rewrite the index. Entries of files "
                                   "that are gone stay unless --prune is given.")
    a.add_argument("index", help="index folder")
    a.add_argument("--data", required=True, help="folder, manifest or .txt file")
    a.add_argument("--model", help="model (default: the one recorded in the index)")
    _model_arguments(a)
    a.add_argument("--batch-size", type=_positive, default=32)
    a.add_argument("--chunk-size", type=_positive, default=256)
    a.add_argument("--prune", action="store_true", help="drop entries of image/video files that no longer exist")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main_index(args) -> dict:
    """Run `polymodal index build|add`; prints and returns the summary."""
    from .index import SearchIndex, add_to_index, build_index, build_index_from_embeddings
    if args.index_cmd == "add":
        model_src = args.model or SearchIndex.open(args.index).info.get("model")
        if not model_src:
            raise FileNotFoundError(f"{args.index}: the index does not record its model; pass --model")
        from .embed import EmbedSettings
        model = _load_model(model_src, args.device)
        result = add_to_index(model, args.index, args.data, progress=not args.quiet,
                              settings=EmbedSettings(batch_size=args.batch_size, chunk_size=args.chunk_size),
                              prune=args.prune)
        summary = {k: result[k] for k in ("added", "replaced", "unchanged", "removed", "skipped")}
        summary.update(count=result["index"]["count"], recall_at_10=result["index"]["recall_at_10"])
        print(json.dumps(summary, indent=1))
        return summary
    _check_saved(args.model)
    model = _load_model(args.model, args.device)
    params = {"nlist": args.nlist, "nprobe": args.nprobe} if args.kind == "ivf" else \
        {"hnsw_m": args.hnsw_m, "ef_search": args.ef_search} if args.kind == "hnsw" else {}
    if args.embeddings:
        from .embed import load_embeddings, model_id
        emb, meta = load_embeddings(args.embeddings)
        if meta.get("model_id") != model_id(model):
            from .index import IndexModelMismatch
            raise IndexModelMismatch(f"{args.embeddings} was embedded with another model ({meta.get('model')}) "
                                     f"than {args.model}; embed again or give that model")
        extra = {"num_frames": meta.get("num_frames", 8), "float16": str(emb.vectors.dtype) == "float16",
                 "sources": [meta.get("data")] if meta.get("data") else []}
        info = build_index_from_embeddings(emb, args.out, args.kind, _source(args.model), extra=extra, **params)
    else:
        info = build_index(model, args.data, args.out, args.kind, _settings(args), _source(args.model),
                           progress=not args.quiet, **params)
    from .embed import read_jsonl
    from pathlib import Path
    _report_skipped(read_jsonl(Path(args.out) / "skipped.jsonl"))
    summary = {"out": os.path.abspath(args.out), "count": info["count"], "dim": info["dim"],
               "index": info["index"], "recall_at_10": info["recall_at_10"], "skipped": info["skipped"]}
    print(json.dumps(summary, indent=1))
    if info["index"]["kind"] != "flat":
        print(f"{info['index']['kind']} recall@10 against exact search: {info['recall_at_10']:.3f}")
    return summary


# ----------------------------------------------------------------------------------------------- search
def add_search_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `polymodal search INDEX "text" [--image F] [-k 20] [--json]`."""
    parser.add_argument("index", help="index folder")
    parser.add_argument("query", nargs="?", help="the text to search for")
    parser.add_argument("--image", help="search with this image instead of a text")
    parser.add_argument("-k", type=_positive, default=20, help="number of results (default 20)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--model", help="model (default: the one recorded in the index)")
    _model_arguments(parser)
    return parser


def main_search(args) -> list[dict]:
    """Run `polymodal search`; prints the hits (a table, or JSON with --json) and returns them."""
    from .index import SearchIndex
    from .query import Searcher
    if (args.query is None) == (args.image is None):
        raise ValueError("give either a text query or --image FILE (one of them)")
    index = SearchIndex.open(args.index)
    model_src = args.model or index.info.get("model")
    if not model_src:
        raise FileNotFoundError(f"{args.index}: the index does not record its model; pass --model")
    searcher = Searcher(index, _load_model(model_src, args.device), recorded=not args.model)
    hits = searcher.image(args.image, args.k) if args.image else searcher.text(args.query, args.k)
    if args.json:
        print(json.dumps({"query": args.query or {"image": args.image}, "results": hits}, indent=1,
                         ensure_ascii=False))
    else:
        for rank, h in enumerate(hits, 1):
            where = f" @ {h['time']:.2f}s" if h.get("time") is not None else ""
            what = h["path"] if h["kind"] != "text" else repr(h["caption"])
            print(f"{rank:3d}  {h['score']:.4f}  [{h['id']}] {what}{where}")
        if not hits:
            print("no results (the index is empty)")
    return hits


# ----------------------------------------------------------------------------------------------- serve
def set_threads(n: int) -> None:
    """Use `n` CPU threads for torch (the query encoder) and FAISS (the search)."""
    import torch
    torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:      # the index module says how to install it when it is needed
        return
    faiss.omp_set_num_threads(n)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `polymodal serve INDEX [--host 127.0.0.1 --port 8000]`."""
    from .server import DEFAULT_LIMITS
    parser.add_argument("index", help="index folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=_positive, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--model", help="model (default: the one recorded in the index)")
    parser.add_argument("--token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} when set); open the page "
                             f"as http://HOST:PORT/#token=TOKEN. An empty token is an error")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests addressed to NAME (the Host header), e.g. this machine's name on "
                             "the network; 127.0.0.1, localhost, [::1] and --host always are (repeatable)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_LIMITS["max_upload_bytes"] / 2**20,
                        help="largest image upload in MiB (default 10)")
    parser.add_argument("--max-query-chars", type=_positive, default=DEFAULT_LIMITS["max_query_chars"])
    parser.add_argument("--max-k", type=_positive, default=DEFAULT_LIMITS["max_k"])
    parser.add_argument("--threads", type=_positive,
                        help="CPU threads for the model and FAISS (default: torch's; 1 beside other work)")
    _model_arguments(parser)
    return parser


def serve_token(given: str | None, environ=os.environ) -> str | None:
    """The token `polymodal serve` uses: `--token` when given, else $POLYMODAL_SEARCH_TOKEN when set, else None.

    Raises:
        ValueError: the one given is empty (`--token "$TOKEN"` with TOKEN unset, an empty variable): an open
            server is never started in place of a protected one.
    """
    from .server import check_token
    if given is not None:
        return check_token(given, "--token")
    if TOKEN_ENV in environ:
        return check_token(environ[TOKEN_ENV], f"${TOKEN_ENV}")
    return None


def main_serve(args) -> None:
    """Run `polymodal serve` until interrupted."""
    from .server import serve
    token = serve_token(args.token)          # before loading anything
    if args.threads:
        set_threads(args.threads)
    model = _load_model(args.model, args.device) if args.model or args.device != "cpu" else None
    if model is None:
        from .index import SearchIndex
        recorded = SearchIndex.open(args.index).info.get("model")
        if not recorded:
            raise FileNotFoundError(f"{args.index}: the index does not record its model; pass --model")
        model = _load_model(recorded, args.device)
    serve(args.index, host=args.host, port=args.port, model=model, token=token, allow_hosts=args.allow_host,
          recorded=not args.model,
          max_upload_bytes=int(args.max_upload_mb * 2**20), max_query_chars=args.max_query_chars, max_k=args.max_k)
