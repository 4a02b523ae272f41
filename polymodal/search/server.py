"""The search server: a FastAPI app over one index, and the web page in `web/`.

Endpoints (JSON unless noted):
- `GET /search?q=TEXT&k=K`: text query.
- `POST /search?k=K`: image query; the body is the image file itself, or a multipart form with an
  `image` (or `file`) field.
- `GET /similar/{id}?k=K`: items most like item `id`.
- `GET /media/{id}?t=SECONDS&full=0|1`: a JPEG thumbnail of item `id` (a video's frame nearest `t`), or with
  `full=1` the file itself. Files are found only through the index's own list, by integer id: no part of a
  request is ever used as a path. A file is read only while it is still the file that was indexed
  (`open_indexed`: no symbolic link followed, a regular file with the recorded inode, size and modification
  time); anything else (a file swapped for a link to `/etc/passwd`, replaced, edited) answers 410.
- `GET /healthz`: status and whether a token is needed; with the token (or on a server without one) also the
  item count, model id, index kind, generation and limits. It never names a path.
- `GET /` and `GET /static/{app.js,style.css}`: the page.

Every request must name a trusted host in its `Host` header (`trusted_hosts`: 127.0.0.1, localhost, [::1], the
`--host` value and any `--allow-host` names; on a server bound to every interface also any IP address), else
it answers 421. This stops DNS rebinding: a web page whose name an attacker re-points at 127.0.0.1 sends its
own name as the Host, so it cannot read answers (paths of the user's files) or media from a local server.

The server follows its index folder: when `polymodal index add` (or a rebuild) rewrites it, the next
request re-opens it (`Searcher.refresh`) and `generation` counts up. Ids are rows of one version, so every
answer carries its `generation`; `/similar`, `/items` and `/media` given `g=GENERATION` of an older
version answer 409 (search again) instead of describing another item. A rewrite that cannot be opened, or
was built with another model, is refused: the old version keeps serving and `/healthz` says why.

Limits (upload bytes, query characters, k) answer 413 / 400 with a message naming the limit. With a
`token`, every endpoint but the page's own files needs `Authorization: Bearer TOKEN` (`/healthz` without it
says only that a token is needed). An empty token is an error, never an open server.
"""

import io
import ipaddress
import mimetypes
import os
import secrets
import stat
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8"}
DEFAULT_LIMITS = {"max_upload_bytes": 10 * 2**20, "max_query_chars": 2000, "max_k": 200, "default_k": 20,
                  "thumb_size": 256}
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")     # always trusted in the Host header
ALL_INTERFACES = ("0.0.0.0", "::", "")               # bind addresses that listen on every interface


class ItemChanged(OSError):
    """An indexed file is not the file that was indexed any more (gone, replaced, a link, another kind)."""


def check_token(token: str | None, where: str = "token") -> str | None:
    """`token` as the server uses it: None (no token) or a non-empty string.

    Raises:
        ValueError: an empty or blank token (`--token "$TOKEN"` with TOKEN unset must not start an open
            server), or one with spaces around it (a header cannot carry them).
    """
    if token is None:
        return None
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"{where} is empty; a server with an empty token would be open to everyone. Give a "
                         f"non-empty token (e.g. --token \"$(openssl rand -hex 16)\"), or leave it out (and "
                         f"unset POLYMODAL_SEARCH_TOKEN) for a server on 127.0.0.1 only")
    if token != token.strip():
        raise ValueError(f"{where} starts or ends with white space, which an Authorization header cannot carry; "
                         f"remove it")
    return token


def trusted_hosts(host: str = "127.0.0.1", allow: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """The names a request's Host header may carry: `LOCAL_HOSTS`, the bind address `host` and `allow`.

    Args:
        host: the address the server binds (`--host`); 0.0.0.0 / :: add nothing by themselves.
        allow: more names or addresses (`--allow-host`), e.g. the machine's name on the network.
    Returns:
        Lower-case names, IPv6 addresses without brackets.
    """
    names = [*LOCAL_HOSTS, *([] if host in ALL_INTERFACES else [host]), *allow]
    return tuple(dict.fromkeys(n.strip().strip("[]").lower() for n in names if n and n.strip()))


def host_name(header: str) -> str | None:
    """The host part of a Host header (`name`, `name:port`, `[v6]:port`), lower case; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 1 else None
        if rest is None or (rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit())):
            return None
        return header[1:end]
    name, _, port = header.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return None
    return name or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def open_indexed(item: dict, folder_ok: bool = False) -> tuple[int, os.stat_result]:
    """Open an indexed file for reading, only while it is the file that was indexed.

    The last path component is opened without following a symbolic link (O_NOFOLLOW), without blocking on a
    FIFO, and must be a regular file whose inode (when the index recorded it), size and modification time
    are the index entry's. So a file swapped for a link (to /etc/passwd, a key file), a folder on the way
    swapped for a link elsewhere, or a file replaced or edited since indexing is refused.

    Args:
        item: an index entry (`path`, `size`, `mtime_ns`, optional `ino`).
        folder_ok: accept a video's folder of frames with the recorded inode (its size and time sum its files).
    Returns:
        (an open read-only file descriptor, its `os.fstat`); the caller closes the descriptor.
    Raises:
        ItemChanged: the file is gone or is not the indexed file any more (the message says which).
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    path = item["path"]
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ItemChanged(f"{os.path.basename(path)} cannot be opened as the indexed file "
                          f"({'a symbolic link is in its place' if _is_link(path) else e.strerror})") from None
    st = os.fstat(fd)
    frames = folder_ok and stat.S_ISDIR(st.st_mode) and "ino" in item
    why = ("it is not a regular file any more" if not (stat.S_ISREG(st.st_mode) or frames) else
           "another file is in its place" if "ino" in item and st.st_ino != int(item["ino"]) else
           "it changed since it was indexed" if not frames and (st.st_size, st.st_mtime_ns) != (
               int(item["size"]), int(item["mtime_ns"])) else "")
    if why:
        os.close(fd)
        raise ItemChanged(f"{os.path.basename(path)}: {why}")
    return fd, st


def _is_link(path: str) -> bool:
    try:
        return os.path.islink(path)
    except OSError:
        return False


def _fd_path(fd: int, path: str) -> str:
    """A path that opens exactly the file behind `fd` (Linux's /proc/self/fd), else `path`."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else path


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
        thumb_size: int = DEFAULT_LIMITS["thumb_size"], hosts: tuple[str, ...] | list[str] | None = None,
        any_ip: bool = False, recorded: bool = False):
    """Build the FastAPI app serving one index.

    Args:
        index_dir: an index folder (`polymodal index build`).
        model: the model object, its path or bundled name, or None for the model recorded in the index.
        token: when set, requests need `Authorization: Bearer <token>` (not the page's files; /healthz without
            it says only that a token is needed). An empty token is a ValueError.
        hosts: the names a request's Host header may carry (default `trusted_hosts()`: 127.0.0.1, localhost,
            ::1); other hosts answer 421.
        any_ip: also trust any IP address as the Host (a server bound to every interface, reached by address).
        recorded: `model` was loaded from the path the index records (a mismatch then says that model changed).
        max_upload_bytes: largest image upload (413 above).
        max_query_chars: longest text query (413 above).
        max_k: largest k (400 above); default_k: k when none is given.
        thumb_size: longest side of thumbnails in pixels.
    Returns:
        A `fastapi.FastAPI` app (run it with uvicorn; `polymodal serve` does).
    Raises:
        IndexModelMismatch: the model is not the index's.
        ValueError: an empty token.
    """
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .index import SearchIndex
    from .query import Searcher

    token = check_token(token)
    allowed = set(trusted_hosts("", hosts or ()))
    opened = SearchIndex.open(index_dir)       # requests read the searcher's current version, never this one
    if model is None:
        model, recorded = opened.info.get("model"), True
        if not model:
            raise FileNotFoundError(f"{index_dir}: the index does not record its model; pass the model explicitly")
    searcher = Searcher(opened, _load(model), recorded=recorded)
    app = FastAPI(title="polymodal search", docs_url=None, redoc_url=None, openapi_url=None)
    limits = {"max_upload_bytes": max_upload_bytes, "max_query_chars": max_query_chars, "max_k": max_k,
              "default_k": default_k}

    def has_token(request: Request) -> bool:
        if token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode())

    def authorize(request: Request) -> None:
        if not has_token(request):
            raise HTTPException(401, "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def _trusted_host_only(request: Request, call_next):
        """Answer only requests addressed to a trusted host (DNS rebinding sends the attacker's name)."""
        given = request.headers.get("host", "")
        name = host_name(given)
        if name is None or not (name in allowed or (any_ip and _is_ip(name))):
            return JSONResponse({"error": f"Host {given[:60]!r} is not a host this server answers to "
                                          f"({', '.join(sorted(allowed))}); open it by one of those names, or "
                                          f"start it with --allow-host NAME"}, status_code=421)
        return await call_next(request)

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
        # ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses
        if not (item_id.isascii() and item_id.isdigit()) or not 0 <= int(item_id) < len(index):
            raise HTTPException(404, f"no item with id {item_id[:40]!r}; ids are integers 0..{len(index) - 1}")
        return int(item_id)

    def answer(hits: list[dict], start: float, generation: int, **extra) -> dict:
        return {**extra, "count": len(hits), "took_ms": round(1000 * (time.perf_counter() - start), 2),
                "generation": generation, "results": hits}

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):      # {"error": message} for every 4xx, the router's own 404s included
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz(request: Request):
        if not has_token(request):             # alive, and a token is needed: nothing about the index
            return {"status": "ok", "token_required": True}
        index, generation = version()
        return {"status": "ok", "token_required": token is not None, "count": len(index),
                "model_name": Path(str(index.info.get("model") or "")).name or None,     # a name, never a path
                "model_id": index.info.get("model_id"), "index": index.info.get("index", {}).get("kind"),
                "dim": index.emb.dim, "generation": generation, "reload_error": searcher.reload_error,
                "limits": limits}

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

        from ..data.images import load_image_bytes
        index, current = searcher.snapshot()
        if current != generation:                        # re-opened since the request looked: its ids are gone
            raise HTTPException(409, "the index changed during the request; search again")
        it = index.items[row]
        fd, st = open_indexed(it, folder_ok=True)        # ItemChanged unless it is still the indexed file
        try:
            if it["kind"] == "video":
                image = Image.fromarray(_video_frame(_fd_path(fd, it["path"]), t,
                                                     int(index.info.get("num_frames", 8))))
            else:
                with os.fdopen(os.dup(fd), "rb") as f:
                    image = load_image_bytes(f.read(), it["path"])
        finally:
            os.close(fd)
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
            try:
                fd, st = open_indexed(it)
            except ItemChanged as e:
                raise HTTPException(410, f"item {row} is not served: {e}; run `polymodal index add` (or rebuild) "
                                         f"to index the folder as it is now") from None
            name = Path(it["path"]).name
            return StreamingResponse(_read_chunks(fd), media_type=mimetypes.guess_type(name)[0] or
                                     "application/octet-stream",
                                     headers={"Content-Length": str(st.st_size), "Content-Disposition":
                                              _attachment(name), "Cache-Control": "private, no-store"})
        from ..data.images import ImageError
        from ..data.video import VideoError
        try:
            fd, _ = open_indexed(it, folder_ok=True)   # a cached thumbnail is served only while the file is the same
            os.close(fd)
            data = thumbnail(generation, row, None if t is None else round(float(t), 3))
        except ItemChanged as e:
            raise HTTPException(410, f"item {row} is not served: {e}; run `polymodal index add` (or rebuild) to "
                                     f"index the folder as it is now") from None
        except (ImageError, VideoError, OSError) as e:
            raise HTTPException(410, f"item {row} cannot be read any more ({e})") from None
        # no-cache: the browser asks again, so a file deleted or changed since indexing is marked, not shown stale
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, no-cache"})

    app.state.searcher = searcher
    return app


def _read_chunks(fd: int, size: int = 2**16):
    """The bytes of an open file in pieces; closes it at the end (or when the client goes away)."""
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _attachment(name: str) -> str:
    """A Content-Disposition header value for a download named `name` (RFC 6266, any characters)."""
    from urllib.parse import quote
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=utf-8''{quote(name)}"


def _video_frame(path: str, t: float | None, num_frames: int):
    """(H, W, 3) uint8: the sampled frame of the video at `path` nearest time `t` (the middle frame without `t`).

    The frames are the same uniform samples the index embedded, so the best-frame time of a hit is exact."""
    import numpy as np

    from ..data.video import read_video
    clip = read_video(path, num_frames=num_frames, strategy="uniform")
    times = clip.times.numpy()
    i = len(times) // 2 if t is None else int(np.argmin(np.abs(times - t)))
    return clip.frames[i].numpy()


def serve(index_dir, host: str = "127.0.0.1", port: int = 8000, model=None, token: str | None = None,
          allow_hosts: tuple[str, ...] | list[str] = (), recorded: bool = False, **limits) -> None:
    """Run the app with uvicorn until interrupted (`polymodal serve`).

    Args:
        index_dir, model, token, **limits: see `create_app`.
        host: interface; 127.0.0.1 (this machine only) by default. It is a trusted Host name too.
        port: TCP port.
        allow_hosts: more names requests may address the server by (`--allow-host`); bound to every interface
            (0.0.0.0, ::), any IP address is trusted as well.
    """
    import uvicorn
    app = create_app(index_dir, model=model, token=token, hosts=trusted_hosts(host, allow_hosts),
                     any_ip=host in ALL_INTERFACES, recorded=recorded, **limits)
    if host not in LOCAL_HOSTS and token is None:
        import warnings
        warnings.warn(f"serving {index_dir} on {host} without a token: anyone who reaches this port can search "
                      f"and read the indexed files; pass --token")
    print(f"polymodal search: http://{'[' + host + ']' if ':' in host else host}:{port}/ "
          f"({len(app.state.searcher.index)} items)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
