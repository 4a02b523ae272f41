"""polymodal search: embedding throughput, query latency (in process and over HTTP) and IVF recall@10.

1. Embed throughput: `polymodal.search.embed.embed_collection` (chunk files, metadata, resume keys) on a
   ShapesWorld folder against a plain batched `encode_image` loop over the same files (the evaluation
   code's `encode_images`), same model, batch size and threads: images/s for both and their ratio.
2. Query latency at 10k and 100k vectors (clustered unit vectors of the model's dimension standing in for a
   photo collection), for the exact (flat) and the IVF index: p50/p99 of the vector search alone, of a full
   text query in process (`Searcher.text`: tokenise, encode, search, hit metadata), and of `GET /search` over
   HTTP against the FastAPI app under uvicorn in its own process on localhost (with a keep-alive client).
3. IVF recall@10 against exact search (what `polymodal index build --kind ivf` prints), with its nlist/nprobe.

The model is the bundled `small` CLIP with random weights (speed does not depend on the weights). The CPU is
recorded from lscpu. `--quick` runs small sizes (a smoke run, ~1 min); numbers for comparison come from a
full run on an idle machine.

    python benchmarks/search.py [--quick] [--out benchmarks/results/search] [--threads 1]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.common import base_parser, machine_info, machine_line, set_threads, write_results  # noqa: E402


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": len(ms)}


def make_model(work: Path):
    """The `small` CLIP (random weights) with a BPE tokenizer trained on ShapesWorld captions, saved in
    `work/model` and loaded back (the server process loads the same folder)."""
    from polymodal import create_model, load_model
    from polymodal.data.synthetic.shapes import ShapesConfig, generate_shapes
    from polymodal.data.text import train_tokenizer
    generate_shapes(work / "shapes", n_train=0, n_test=200, n_val=0, n_hard=0, cfg=ShapesConfig(image_size=64),
                    progress=False, workers=1)
    captions = [json.loads(line)["caption"] for line in open(work / "shapes" / "test.jsonl")]
    torch.manual_seed(0)
    create_model("small", tokenizer=train_tokenizer(captions * 3, kind="bpe", vocab_size=400)).save_pretrained(
        work / "model")
    return load_model(work / "model"), captions


def embed_throughput(model, work: Path, n_images: int, batch_size: int, repeats: int) -> dict:
    """images/s of embed_collection vs a plain encode_image loop over the same ShapesWorld files."""
    from polymodal.data.synthetic.shapes import ShapesConfig, generate_shapes
    from polymodal.encode import encode_images
    from polymodal.search.embed import EmbedSettings, embed_collection
    folder = work / "photos"
    generate_shapes(folder, n_train=n_images, n_test=0, n_val=0, n_hard=0, cfg=ShapesConfig(image_size=64),
                    progress=False, workers=1)
    paths = sorted(str(p) for p in (folder / "images").iterdir())
    settings = EmbedSettings(batch_size=batch_size, chunk_size=256)
    ours, plain = [], []
    for r in range(repeats):                      # alternate, so drifting machine load hits both
        t = time.perf_counter()
        encode_images(model, paths, batch_size=batch_size)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        embed_collection(model, folder / "images", work / f"emb{r}", settings, progress=False)
        ours.append(time.perf_counter() - t)
    t = time.perf_counter()
    embed_collection(model, folder / "images", work / "emb0", settings, progress=False)
    resumed = time.perf_counter() - t
    ours_ips, plain_ips = n_images / min(ours), n_images / min(plain)
    return {"images": n_images, "batch_size": batch_size, "image_size": 64, "ours_images_per_s": round(ours_ips, 1),
            "plain_loop_images_per_s": round(plain_ips, 1), "ratio_ours_over_plain": round(ours_ips / plain_ips, 3),
            "rerun_all_chunks_finished_s": round(resumed, 3)}


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(16, n // 200), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


SERVER = """
import sys, torch, uvicorn
torch.set_num_threads(int(sys.argv[3]))
from polymodal.search.server import create_app
uvicorn.run(create_app(sys.argv[1], model=sys.argv[2]), host="127.0.0.1", port=int(sys.argv[4]), log_level="warning")
"""


class Served:
    """`create_app` under uvicorn in its own process (as `polymodal serve` runs it), on a free localhost port."""

    def __init__(self, index_dir: Path, model_dir: Path, threads: int):
        import socket

        import httpx
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(index_dir), str(model_dir), str(threads),
                                      str(port)], env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}")
            time.sleep(0.2)
        self.close()
        raise RuntimeError("the server did not start within 120 s")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def query_latency(model, model_dir: Path, captions: list[str], work: Path, sizes: list[int], queries: int,
                  threads: int) -> list[dict]:
    """p50/p99 latencies for flat and IVF indexes of each size, in process and over HTTP, plus IVF recall."""
    import httpx

    from polymodal.search.embed import Embeddings, embedding_dim, model_id
    from polymodal.search.index import build_index_from_embeddings
    from polymodal.search.query import Searcher
    dim, identity = embedding_dim(model), model_id(model)
    rows = []
    texts = [captions[i % len(captions)] for i in range(queries)]
    for n in sizes:
        x = clustered(n, dim, seed=n)
        items = [{"kind": "image", "path": f"/collection/{i:07d}.jpg", "caption": None, "size": 1, "mtime_ns": 0}
                 for i in range(n)]
        emb = Embeddings(x, items, np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros(0), [], identity)
        qv = clustered(queries, dim, seed=n)             # queries from the same clusters as the data
        for kind in ("flat", "ivf"):
            out = work / f"index_{n}_{kind}"
            t = time.perf_counter()
            info = build_index_from_embeddings(emb, out, kind)
            build_s = time.perf_counter() - t
            searcher = Searcher(out, model)
            sweep = {}
            if info["index"]["kind"] == "ivf":      # recall@10 at other nprobe values, same lists
                from polymodal.search.index import recall_at_k
                for nprobe in sorted({1, 4, 16, info["index"]["nprobe"]}):
                    searcher.index.faiss_index.nprobe = nprobe
                    sweep[nprobe] = round(recall_at_k(searcher.index.faiss_index, x), 4)
                searcher.index.faiss_index.nprobe = info["index"]["nprobe"]
            searcher.search_vector(qv[0], 10)             # warm up
            vec = []
            for q in qv:
                t = time.perf_counter()
                searcher.index.search(q[None], 10)
                vec.append(time.perf_counter() - t)
            text = []
            for q in texts:
                t = time.perf_counter()
                searcher.text(q, 10)
                text.append(time.perf_counter() - t)
            served = Served(out, model_dir, threads)
            http = []
            try:
                with httpx.Client(base_url=served.url, timeout=30) as client:
                    client.get("/search", params={"q": texts[0], "k": 10}).raise_for_status()
                    for q in texts:
                        t = time.perf_counter()
                        client.get("/search", params={"q": q, "k": 10}).raise_for_status()
                        http.append(time.perf_counter() - t)
            finally:
                served.close()
            rows.append({"vectors": n, "dim": dim, "index": info["index"], "build_s": round(build_s, 2),
                         "recall_at_10": round(info["recall_at_10"], 4), "recall_at_10_by_nprobe": sweep, "vector_search": percentiles(vec),
                         "text_query_in_process": percentiles(text), "text_query_http": percentiles(http)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(results: dict) -> str:
    e = results["embed"]
    lines = [f"# polymodal search benchmark{' (--quick)' if results['quick'] else ''}", "",
             f"Machine: {machine_line(results['machine'])}; torch threads "
             f"{results['threads']}, faiss {results['faiss']}; model `small` CLIP (dim {results['dim']}, random weights).",
             "", "## Embedding throughput", "",
             "| | images/s |", "|---|---|",
             f"| plain batched `encode_image` loop | {e['plain_loop_images_per_s']} |",
             f"| `polymodal embed` (chunks, metadata, resume keys) | {e['ours_images_per_s']} |",
             f"| ratio ours / plain | {e['ratio_ours_over_plain']} |", "",
             f"{e['images']} ShapesWorld PNGs at 64 px, batch {e['batch_size']}, best of the repeats. A second run "
             f"over finished chunks took {e['rerun_all_chunks_finished_s']} s (nothing recomputed).", "",
             "## Query latency (k = 10) and IVF recall@10", "",
             "| vectors | index | build s | recall@10 | vector search p50 / p99 ms | text query in process p50 / p99 ms "
             "| text query over HTTP p50 / p99 ms |", "|---|---|---|---|---|---|---|"]
    for r in results["latency"]:
        idx = r["index"]
        name = idx["kind"] + (f" (nlist {idx['nlist']}, nprobe {idx['nprobe']})" if idx["kind"] == "ivf" else "")
        cell = lambda p: f"{p['p50_ms']} / {p['p99_ms']}"   # noqa: E731
        lines.append(f"| {r['vectors']:,} | {name} | {r['build_s']} | {r['recall_at_10']} | {cell(r['vector_search'])} "
                     f"| {cell(r['text_query_in_process'])} | {cell(r['text_query_http'])} |")
    for r in results["latency"]:
        if r["recall_at_10_by_nprobe"]:
            sweep = ", ".join(f"nprobe {k}: {v}" for k, v in r["recall_at_10_by_nprobe"].items())
            lines.append(f"\nIVF recall@10 at {r['vectors']:,} vectors by nprobe (nlist {r['index']['nlist']}): {sweep}.")
    lines += ["", "Vectors: clustered random unit vectors of the model's dimension; recall@10 is measured at build "
              "time against brute-force inner product with 1000 stored vectors as queries. Text queries include "
              "tokenising and the text tower; HTTP adds FastAPI, JSON and a localhost round trip to a uvicorn server in another process (same thread "
              "count), with one keep-alive client.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = base_parser(__doc__, str(ROOT / "benchmarks" / "results" / "search"), threads=1,
                    out_help="where results.json / results.md go")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    p.add_argument("--queries", type=int, default=0, help="queries per setting (default 200, quick 30)")
    args = p.parse_args(argv)
    import faiss
    set_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = [2_000, 10_000] if args.quick else [10_000, 100_000]
    queries = args.queries or (30 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="search-bench-") as tmp:
        work = Path(tmp)
        model, captions = make_model(work)
        embed = embed_throughput(model, work, 64 if args.quick else 512, 32, 2 if args.quick else 3)
        print(json.dumps(embed), flush=True)
        latency = query_latency(model, work / "model", captions, work, sizes, queries, args.threads)
    from polymodal.search.embed import embedding_dim
    results = {"quick": args.quick, "machine": machine_info(), "threads": args.threads, "faiss": faiss.__version__,
               "dim": embedding_dim(model), "embed": embed, "latency": latency}
    write_results(Path(args.out), results, markdown(results))
    print((Path(args.out) / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
