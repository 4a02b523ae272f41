"""The search server: a FastAPI app over one index, and the web page in `web/`.

Endpoints (JSON unless noted):
- `GET /search?q=TEXT&k=K`: text query.
- `POST /search?k=K`: image query; the body is the image file itself, or a multipart form with an
  `image` (or `file`) field.
- `GET /similar/{id}?k=K`: items most like item `id`.
- `GET /media/{id}?t=SECONDS&full=0|1`: a JPEG thumbnail of item `id` (a video's frame nearest `t`), or with
  `full=1` the file itself. Files are found only through the index's own list, by integer id: no part of a
  request is ever used as a path.
- `GET /healthz`: status, item count, model, index generation; never needs the token.
- `GET /` and `GET /static/{app.js,style.css}`: the page.

The server follows its index folder: when `polymodal index add` (or a rebuild) rewrites it, the next
request re-opens it (`Searcher.refresh`) and `generation` counts up. Ids are rows of one version, so every
answer carries its `generation`; `/similar`, `/items` and `/media` given `g=GENERATION` of an older
version answer 409 (search again) instead of describing another item. A rewrite that cannot be opened, or
was built with another model, is refused: the old version keeps serving and `/healthz` says why.

Limits (upload bytes, query characters, k) answer 413 / 400 with a message naming the limit. With a
`token`, every endpoint but `/healthz` and the page's own files needs `Authorization: Bearer TOKEN`.
"""

import io
import secrets
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8"}
DEFAULT_LIMITS = {"max_upload_bytes": 10 * 2**20, "max_query_chars": 2000, "max_k": 200, "default_k": 20,
                  "thumb_size": 256}


def web_file(name: str) -> bytes:
    """The bytes of one of the page's files (`WEB_FILES`)."""
    return (resources.files(__package__) / "web" / name).read_bytes()


def _load(model):
    if model is None or isinstance(model, (str, Path)):
        from ..hub import load_model
        return load_model(str(model))
    return model


def create_app(index_dir, model=None, token: str | None = None, max_upload_bytes: int = DEFAULT_LIMITS[
        "max_upload_bytes"], max_query_chars: int = DEFAULT_LIMITS["max_query_chars"],
        max_k: int = DEFAULT_LIMITS["max_k"], default_k: int = DEFAULT_LIMITS["default_k"],
        thumb_size: int = DEFAULT_LIMITS["thumb_size"]):
    """Build the FastAPI app serving one index.

    Args:
        index_dir: an index folder (`polymodal index build`).
        model: the model object, its path or bundled name, or None for the model recorded in the index.
        token: when set, requests need `Authorization: Bearer <token>` (not /healthz and the page's files).
        max_upload_bytes: largest image upload (413 above).
        max_query_chars: longest text query (413 above).
        max_k: largest k (400 above); default_k: k when none is given.
        thumb_size: longest side of thumbnails in pixels.
    Returns:
        A `fastapi.FastAPI` app (run it with uvicorn; `polymodal serve` does).
    Raises:
        IndexModelMismatch: the model is not the index's.
    """
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .index import SearchIndex
    from .query import Searcher

    opened = SearchIndex.open(index_dir)       # requests read the searcher's current version, never this one
    if model is None:
        model = opened.info.get("model")
        if not model:
            raise FileNotFoundError(f"{index_dir}: the index does not record its model; pass the model explicitly")
    searcher = Searcher(opened, _load(model))
    app = FastAPI(title="polymodal search", docs_url=None, redoc_url=None, openapi_url=None)
    limits = {"max_upload_bytes": max_upload_bytes, "max_query_chars": max_query_chars, "max_k": max_k,
              "default_k": default_k}

    def authorize(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

    def parse_k(k: str | None) -> int:
        if k is None or k == "":
            return min(default_k, max_k)
        try:
            value = int(k)
        except ValueError:
            raise HTTPException(400, f"k must be an integer, got {k[:20]!r}") from None
        if not 1 <= value <= max_k:
            raise HTTPException(400, f"k must be between 1 and {max_k}, got {value}")
        return value

    def version(g: str | None = None):
        """(index, generation) for this request, after following a rewritten index folder; with `g` (the
        generation an earlier answer carried) the ids must still mean the same items."""
        searcher.refresh()
        index, generation = searcher.snapshot()
        if g not in (None, "") and g != str(generation):
            raise HTTPException(409, f"the index changed since that result was listed (generation {g[:20]}, now "
                                     f"{generation}); search again")
        return index, generation

    def parse_id(item_id: str, index) -> int:
        if not item_id.isdigit() or not 0 <= int(item_id) < len(index):
            raise HTTPException(404, f"no item with id {item_id[:40]!r}; ids are integers 0..{len(index) - 1}")
        return int(item_id)

    def answer(hits: list[dict], start: float, generation: int, **extra) -> dict:
        return {**extra, "count": len(hits), "took_ms": round(1000 * (time.perf_counter() - start), 2),
                "generation": generation, "results": hits}

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):      # {"error": message} for every 4xx, the router's own 404s included
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz():
        index, generation = version()
        return {"status": "ok", "count": len(index), "model": index.info.get("model"),
                "model_id": index.info.get("model_id"), "index": index.info.get("index", {}).get("kind"),
                "dim": index.emb.dim, "generation": generation, "reload_error": searcher.reload_error,
                "limits": limits, "token_required": token is not None}

    @app.get("/", include_in_schema=False)
    def page():
        return Response(web_file("index.html"), media_type=WEB_FILES["index.html"],
                        headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name not in WEB_FILES or name == "index.html":
            raise HTTPException(404, f"no static file {name[:40]!r}")
        return Response(web_file(name), media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/search", dependencies=[Depends(authorize)])
    def search_text(q: str | None = None, k: str | None = None):
        start = time.perf_counter()
        index, generation = version()
        if q is None or not q.strip():
            raise HTTPException(400, "give a query: /search?q=a+red+car (or POST an image to /search)")
        if len(q) > max_query_chars:
            raise HTTPException(413, f"query is {len(q)} characters; the limit is {max_query_chars}")
        return answer(searcher.text(q, parse_k(k), index=index), start, generation, query=q)

    @app.post("/search", dependencies=[Depends(authorize)])
    async def search_image(request: Request, k: str | None = None):
        start = time.perf_counter()
        n = parse_k(k)
        index, generation = version()
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes + 4096:
            raise HTTPException(413, f"upload is {int(declared)} bytes; the limit is {max_upload_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image") or form.get("file")
            if upload is None or not hasattr(upload, "read"):
                raise HTTPException(400, "the form has no 'image' file field")
            data = await upload.read(max_upload_bytes + 1)
        else:
            chunks, size = [], 0
            async for part in request.stream():
                size += len(part)
                if size > max_upload_bytes:
                    raise HTTPException(413, f"upload is over the limit of {max_upload_bytes} bytes")
                chunks.append(part)
            data = b"".join(chunks)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is over the limit of {max_upload_bytes} bytes")
        if not data:
            raise HTTPException(400, "empty upload: POST an image file (JPEG, PNG, ...) as the body")
        from ..data.images import ImageError, load_image_bytes
        try:
            image = load_image_bytes(data, "uploaded image")
        except ImageError as e:
            raise HTTPException(415, f"{e}; upload a JPEG, PNG, WebP or other image Pillow reads") from None
        from starlette.concurrency import run_in_threadpool
        hits = await run_in_threadpool(searcher.image, image, n, index)
        return answer(hits, start, generation, query={"image": len(data)})

    @app.get("/similar/{item_id}", dependencies=[Depends(authorize)])
    def similar(item_id: str, k: str | None = None, g: str | None = None):
        start = time.perf_counter()
        index, generation = version(g)
        row = parse_id(item_id, index)
        return answer(searcher.similar(row, parse_k(k), index=index), start, generation, query={"id": row})

    @app.get("/items/{item_id}", dependencies=[Depends(authorize)])
    def item(item_id: str, g: str | None = None):
        index, generation = version(g)
        row = parse_id(item_id, index)
        it = index.items[row]
        return {"id": row, "generation": generation,
                **{key: it.get(key) for key in ("kind", "path", "caption", "size")}}

    @lru_cache(maxsize=512)
    def thumbnail(generation: int, row: int, t: float | None) -> bytes:
        """JPEG bytes of item `row` of the index version `generation` (cached per version)."""
        from PIL import Image

        from ..data.images import load_image
        index, current = searcher.snapshot()
        if current != generation:                        # re-opened since the request looked: its ids are gone
            raise HTTPException(409, "the index changed during the request; search again")
        it = index.items[row]
        if it["kind"] == "video":
            image = Image.fromarray(_video_frame(it, t, int(index.info.get("num_frames", 8))))
        else:
            image = load_image(it["path"])
        image.thumbnail((thumb_size, thumb_size))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    @app.get("/media/{item_id}", dependencies=[Depends(authorize)])
    def media(item_id: str, t: float | None = None, full: int = 0, g: str | None = None):
        index, generation = version(g)
        row = parse_id(item_id, index)
        it = index.items[row]
        if it["kind"] == "text":
            raise HTTPException(404, f"item {row} is a text; it has no media")
        if full:
            if not Path(it["path"]).is_file():
                raise HTTPException(410, f"item {row}'s file is gone from disk; rebuild or `polymodal index add`")
            return FileResponse(it["path"], filename=Path(it["path"]).name)
        from ..data.images import ImageError
        from ..data.video import VideoError
        try:
            data = thumbnail(generation, row, None if t is None else round(float(t), 3))
        except (ImageError, VideoError, OSError) as e:
            raise HTTPException(410, f"item {row} cannot be read any more ({e})") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    app.state.searcher = searcher
    return app


def _video_frame(item: dict, t: float | None, num_frames: int):
    """(H, W, 3) uint8: the sampled frame of a video nearest time `t` (the middle frame without `t`).

    The frames are the same uniform samples the index embedded, so the best-frame time of a hit is exact."""
    import numpy as np

    from ..data.video import read_video
    clip = read_video(item["path"], num_frames=num_frames, strategy="uniform")
    times = clip.times.numpy()
    i = len(times) // 2 if t is None else int(np.argmin(np.abs(times - t)))
    return clip.frames[i].numpy()


def serve(index_dir, host: str = "127.0.0.1", port: int = 8000, model=None, token: str | None = None,
          **limits) -> None:
    """Run the app with uvicorn until interrupted (`polymodal serve`).

    Args:
        index_dir, model, token, **limits: see `create_app`.
        host: interface; 127.0.0.1 (this machine only) by default.
        port: TCP port.
    """
    import uvicorn
    app = create_app(index_dir, model=model, token=token, **limits)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        import warnings
        warnings.warn(f"serving {index_dir} on {host} without a token: anyone who reaches this port can search "
                      f"and read the indexed files; pass --token")
    print(f"polymodal search: http://{'[' + host + ']' if ':' in host else host}:{port}/ "
          f"({len(app.state.searcher.index)} items)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
