"""polymodal.search: embedding (resume, skips, float16, videos), FAISS indexes, add, queries, the HTTP API and CLI."""
import argparse
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from polymodal import create_model, load_model  # noqa: E402
from polymodal.search.embed import (EmbedSettings, SearchError, collect_items, embed_collection,  # noqa: E402
                                    load_embeddings, model_id, scan_folder)
from polymodal.search.index import (IndexModelMismatch, SearchIndex, add_to_index, build_index,  # noqa: E402
                                    build_index_from_embeddings, empty_index)
from polymodal.search.embed import Embeddings  # noqa: E402
from polymodal.search.query import Searcher  # noqa: E402

N_IMAGES = 10


def make_video(path, images, fps=4, per_image=4):
    """An H.264 clip showing each image for `per_image` frames."""
    import av
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.options = {"preset": "veryfast", "crf": "10"}
        n = 0
        for img in images:
            for _ in range(per_image):
                frame = av.VideoFrame.from_ndarray(np.asarray(img.convert("RGB").resize((32, 32))), format="rgb24")
                frame.pts = n
                n += 1
                for p in s.encode(frame):
                    c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A ShapesWorld folder: photos/ (10 PNGs, a nested folder, a hidden file, a broken JPEG, a video), manifest."""
    from polymodal.data.synthetic.shapes import ShapesConfig, generate_shapes
    root = tmp_path_factory.mktemp("world")
    generate_shapes(root / "shapes", n_train=0, n_test=N_IMAGES, n_val=0, n_hard=0, cfg=ShapesConfig(image_size=32),
                    progress=False, workers=1)
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    for i in range(N_IMAGES):
        dest = photos / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png"
        shutil.copy(root / "shapes" / "images" / f"test_{i:06d}.png", dest)
    shutil.copy(photos / "img01.png", photos / ".hidden" / "secret.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "notes.txt").write_text("not media")
    a, b = Image.open(photos / "img01.png"), Image.open(photos / "img02.png")
    make_video(photos / "clip.mp4", [a, b])
    return root


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    from polymodal.data.text import train_tokenizer
    caps = [json.loads(line)["caption"] for line in open(world / "shapes" / "test.jsonl")]
    tok = train_tokenizer(caps * 5, kind="bpe", vocab_size=120)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m"
    create_model("tiny", tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    torch.set_num_threads(1)
    return load_model(model_dir)


@pytest.fixture(scope="module")
def index_dir(world, model, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("idx") / "index"
    build_index(model, world / "photos", out, settings=EmbedSettings(batch_size=4, chunk_size=5),
                model_source=str(model_dir), progress=False)
    return out


def photo(world, i):
    """The copy of ShapesWorld image i in photos/ (every third one sits in photos/sub/)."""
    return world / "photos" / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png"


def small_index(world, model, tmp_path, n: int) -> Path:
    """A folder tmp_path/p of n photos (a0.png ...) indexed into tmp_path/idx; returns the folder."""
    folder = tmp_path / "p"
    folder.mkdir()
    for i in range(n):
        shutil.copy(photo(world, i + 1), folder / f"a{i}.png")
    build_index(model, folder, tmp_path / "idx", progress=False)
    return folder


def local_client(app):
    """A test client that addresses the app as http://127.0.0.1:8000 (a trusted Host, as a local browser does)."""
    from fastapi.testclient import TestClient
    return TestClient(app, base_url="http://127.0.0.1:8000")


def independent_image_embeddings(model, paths):
    from polymodal.encode import encode_images
    return encode_images(model, [str(p) for p in paths], batch_size=3).numpy()


# ----------------------------------------------------------------------------------------------- collecting
def test_scan_folder_finds_images_and_videos_recursively_and_skips_hidden(world):
    items = scan_folder(world / "photos")
    names = [os.path.relpath(it["path"], world / "photos") for it in items]
    assert names == sorted(names)
    assert "clip.mp4" in names and os.path.join("sub", "img00.png") in names and "broken.jpg" in names
    assert not any("hidden" in n or n.endswith(".txt") for n in names)
    assert len(names) == N_IMAGES + 2
    assert {it["kind"] for it in items if it["path"].endswith(".mp4")} == {"video"}


def test_manifest_records_become_items_with_captions(world):
    items, skipped = collect_items(world / "shapes" / "test.jsonl")
    assert len(items) == N_IMAGES and not skipped
    first = json.loads(open(world / "shapes" / "test.jsonl").readline())
    assert items[0]["caption"] == first["caption"] and items[0]["kind"] == "image"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_items(world / "nope")


# ----------------------------------------------------------------------------------------------- embedding
def test_embed_skips_unreadable_files_lists_them_and_matches_plain_encode(world, model, tmp_path):
    emb = embed_collection(model, world / "photos", tmp_path / "e", EmbedSettings(batch_size=4, chunk_size=4),
                           progress=False)
    assert [s["path"] for s in emb.skipped] == [str(world / "photos" / "broken.jpg")]
    assert "broken.jpg" in emb.skipped[0]["detail"]
    images = [it for it in emb.items if it["kind"] == "image"]
    assert len(images) == N_IMAGES
    rows = [i for i, it in enumerate(emb.items) if it["kind"] == "image"]
    ref = independent_image_embeddings(model, [it["path"] for it in images])
    np.testing.assert_allclose(emb.vectors[rows], ref, atol=1e-5)
    on_disk, meta = load_embeddings(tmp_path / "e")
    assert np.array_equal(on_disk.vectors, emb.vectors) and meta["skipped"] == 1 and meta["model_id"] == model_id(model)
    skipped_file = [json.loads(line) for line in open(tmp_path / "e" / "skipped.jsonl")]
    assert skipped_file[0]["path"].endswith("broken.jpg")


def test_embed_resumes_after_a_kill_without_recomputing_finished_chunks(world, model, tmp_path, monkeypatch):
    import polymodal.data.images as images
    settings = EmbedSettings(batch_size=2, chunk_size=3)
    reference = embed_collection(model, world / "photos", tmp_path / "full", settings, progress=False)

    class Killed(Exception):
        pass

    def kill_after_second(i, n):
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        embed_collection(model, world / "photos", tmp_path / "run", settings, progress=False, on_chunk=kill_after_second)
    assert len(list((tmp_path / "run" / "chunks").glob("*.npz"))) == 2
    assert not (tmp_path / "run" / "embed.json").exists()

    loaded = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p, *a, **k: loaded.append(str(p)) or real(p, *a, **k))
    computed = []
    resumed = embed_collection(model, world / "photos", tmp_path / "run", settings, progress=False,
                               on_chunk=lambda i, n: computed.append(i))
    items = scan_folder(world / "photos")
    finished = {it["path"] for it in items[:6]}
    assert computed == list(range(2, (len(items) + 2) // 3))
    assert loaded and not finished & set(loaded)
    assert set(loaded) == {it["path"] for it in items[6:] if it["kind"] == "image"}
    assert [it["path"] for it in resumed.items] == [it["path"] for it in reference.items]
    assert np.array_equal(resumed.vectors, reference.vectors)
    assert np.array_equal(resumed.frames, reference.frames)
    assert np.array_equal(resumed.frame_times, reference.frame_times)


def test_a_changed_file_invalidates_only_its_chunk(world, model, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(world / "photos", folder)
    settings = EmbedSettings(batch_size=4, chunk_size=4)
    embed_collection(model, folder, tmp_path / "e", settings, progress=False)
    before = {p.name for p in (tmp_path / "e" / "chunks").glob("*.npz")}
    last = scan_folder(folder)[-1]["path"]
    os.utime(last, ns=(1, 1))
    computed = []
    embed_collection(model, folder, tmp_path / "e", settings, progress=False, on_chunk=lambda i, n: computed.append(i))
    after = {p.name for p in (tmp_path / "e" / "chunks").glob("*.npz")}
    assert computed == [len(before) - 1] and len(before & after) == len(before) - 1 and len(after) == len(before)


def test_float16_storage_is_close_to_float32(world, model, tmp_path):
    f32 = embed_collection(model, world / "photos", tmp_path / "a", EmbedSettings(chunk_size=50), progress=False)
    f16 = embed_collection(model, world / "photos", tmp_path / "b", EmbedSettings(chunk_size=50, float16=True),
                           progress=False)
    assert f16.vectors.dtype == np.float16 and f32.vectors.dtype == np.float32
    assert np.load(tmp_path / "b" / "vectors.npy").dtype == np.float16
    np.testing.assert_allclose(f16.vectors.astype(np.float32), f32.vectors, atol=2e-3)


def test_video_gets_pooled_vector_frame_vectors_and_times(world, model, tmp_path):
    from polymodal.data.video import read_video
    from polymodal.encode import encode_clips
    emb = embed_collection(model, world / "photos", tmp_path / "e", EmbedSettings(num_frames=4), progress=False)
    row = next(i for i, it in enumerate(emb.items) if it["kind"] == "video")
    it = emb.items[row]
    assert it["frame_count"] == 4
    frames = emb.frames[it["frame_start"]:it["frame_start"] + 4]
    assert np.all(emb.frame_owner[it["frame_start"]:it["frame_start"] + 4] == row)
    clip = read_video(it["path"], num_frames=4)
    np.testing.assert_allclose(emb.frame_times[it["frame_start"]:it["frame_start"] + 4], clip.times.numpy())
    pixels = torch.stack([model.image_transform(Image.fromarray(f.numpy())) for f in clip.frames])
    with torch.no_grad():
        ref_frames = model.encode_image(pixels).numpy()
        ref_pooled = encode_clips(model, pixels[None], clip.valid[None])[0].numpy()
    np.testing.assert_allclose(frames, ref_frames, atol=1e-5)
    np.testing.assert_allclose(emb.vectors[row], ref_pooled, atol=1e-5)


# ----------------------------------------------------------------------------------------------- index
def test_flat_index_equals_brute_force(index_dir, model, world):
    searcher = Searcher(index_dir, model)
    index = searcher.index
    assert index.info["index"]["kind"] == "flat" and index.info["recall_at_10"] == 1.0
    q = searcher.encode_text("a large red circle.")
    brute = index.emb.vectors.astype(np.float32) @ q
    hits = searcher.text("a large red circle.", k=5)
    assert [h["id"] for h in hits] == list(np.argsort(-brute, kind="stable")[:5])
    np.testing.assert_allclose([h["score"] for h in hits], np.sort(brute)[::-1][:5], rtol=1e-5, atol=1e-6)


def test_image_query_finds_the_image_itself_and_video_hit_has_best_frame_time(index_dir, model, world):
    searcher = Searcher(index_dir, model)
    hits = searcher.image(world / "photos" / "img05.png", k=3)
    assert hits[0]["path"] == str(world / "photos" / "img05.png") and hits[0]["score"] > 0.999
    # The clip shows img01 for its first second and img02 for its second: the best frame for img02 is late.
    video = next(h for h in searcher.image(world / "photos" / "img02.png", k=50) if h["kind"] == "video")
    late = next(h for h in searcher.image(world / "photos" / "img01.png", k=50) if h["kind"] == "video")
    assert video["time"] >= 1.0 and late["time"] < 1.0


def test_similar_leaves_the_item_out_and_ranks_by_its_vector(index_dir, model):
    searcher = Searcher(index_dir, model)
    v = searcher.index.emb.vectors.astype(np.float32)
    hits = searcher.similar(3, k=4)
    order = [i for i in np.argsort(-(v @ v[3]), kind="stable") if i != 3][:4]
    assert [h["id"] for h in hits] == order
    with pytest.raises(KeyError, match="no item with id"):
        searcher.similar(10_000)


def test_index_refuses_queries_from_another_model(index_dir, model_dir):
    other = load_model(model_dir)
    with torch.no_grad():
        other.logit_scale.add_(0.0)
        other.visual.cls.add_(1e-3)          # a fine-tuned copy: same config, other weights
    with pytest.raises(IndexModelMismatch, match="built with another model"):
        Searcher(index_dir, other)
    assert model_id(load_model(model_dir)) == SearchIndex.open(index_dir).info["model_id"]
    # Loaded from the path the index records (no --model): the message says that model changed since indexing.
    with pytest.raises(IndexModelMismatch, match=r"the model at .* has changed since the index was built"):
        Searcher(index_dir, other, recorded=True)


def clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, d))
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_record_recall_against_exact(kind, tmp_path):
    x = clustered(3000, 32)
    items = [{"kind": "image", "path": f"/x/{i}.png", "caption": None, "size": 1, "mtime_ns": 1} for i in range(len(x))]
    emb = Embeddings(x, items, np.zeros((0, 32), np.float32), np.zeros(0, np.int64), np.zeros(0), [], "sha256:t")
    params = {"nlist": 32, "nprobe": 2} if kind == "ivf" else {"hnsw_m": 8, "ef_search": 16}
    info = build_index_from_embeddings(emb, tmp_path / kind, kind, **params)
    assert info["index"]["kind"] == kind and (tmp_path / kind / "index.faiss").is_file()
    opened = SearchIndex.open(tmp_path / kind)
    q = x[np.random.default_rng(1).choice(len(x), 200, replace=False)]
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    _, got = opened.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, got)])
    assert 0.3 < info["recall_at_10"] <= 1.0 and abs(recall - info["recall_at_10"]) < 0.1
    if kind == "ivf":
        assert info["recall_at_10"] < 0.999          # 2 of 32 lists: approximate, and the number says so


def test_index_add_embeds_only_new_and_changed_files(world, model, tmp_path, monkeypatch):
    import polymodal.data.images as images
    folder = small_index(world, model, tmp_path, 4)
    for i in range(2):
        shutil.copy(photo(world, i + 5), folder / f"b{i}.png")
    shutil.copy(photo(world, 7), folder / "a0.png")      # changed content, size and mtime
    loaded = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p, *a, **k: loaded.append(os.path.basename(p)) or real(p, *a, **k))
    result = add_to_index(model, tmp_path / "idx", folder, progress=False)
    assert sorted(loaded) == ["a0.png", "b0.png", "b1.png"]
    assert (result["added"], result["replaced"], result["unchanged"]) == (2, 1, 3)
    index = SearchIndex.open(tmp_path / "idx")
    assert sorted(os.path.basename(it["path"]) for it in index.items) == ["a0.png", "a1.png", "a2.png", "a3.png",
                                                                          "b0.png", "b1.png"]
    row = next(i for i, it in enumerate(index.items) if it["path"].endswith("a0.png"))
    ref = independent_image_embeddings(model, [folder / "a0.png"])[0]
    np.testing.assert_allclose(index.emb.vectors[row], ref, atol=1e-5)
    loaded.clear()
    again = add_to_index(model, tmp_path / "idx", folder, progress=False)
    assert loaded == [] and again["added"] == again["replaced"] == again["removed"] == 0
    (folder / "a1.png").unlink()                         # a deleted file stays unless pruned
    kept = add_to_index(model, tmp_path / "idx", folder, progress=False)
    assert kept["removed"] == 0 and len(SearchIndex.open(tmp_path / "idx")) == 6
    pruned = add_to_index(model, tmp_path / "idx", folder, progress=False, prune=True)
    assert (pruned["removed"], pruned["unchanged"], pruned["added"]) == (1, 5, 0) and loaded == []
    assert "a1.png" not in {os.path.basename(it["path"]) for it in SearchIndex.open(tmp_path / "idx").items}


def test_failed_rebuild_leaves_the_old_index_intact(world, model, tmp_path):
    build_index(model, world / "photos", tmp_path / "idx", progress=False, settings=EmbedSettings(chunk_size=4))
    before = (tmp_path / "idx" / "vectors.npy").read_bytes()

    def boom(i, n):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_index(model, world / "shapes" / "test.jsonl", tmp_path / "idx", progress=False, on_chunk=boom)
    assert (tmp_path / "idx" / "vectors.npy").read_bytes() == before
    assert len(SearchIndex.open(tmp_path / "idx")) == N_IMAGES + 1


def test_folder_without_media_is_an_error(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SearchError, match="no image"):
        build_index(model, tmp_path / "empty", tmp_path / "idx", progress=False)


# ----------------------------------------------------------------------------------------------- HTTP API
@pytest.fixture(scope="module")
def client(index_dir, model):
    from polymodal.search.server import create_app
    return local_client(create_app(index_dir, model=model, max_upload_bytes=20_000, max_query_chars=100, max_k=30))


def png_bytes(path):
    return open(path, "rb").read()


def test_api_text_search_matches_in_process_search(client, index_dir, model):
    r = client.get("/search", params={"q": "a small blue square.", "k": 5})
    assert r.status_code == 200
    body = r.json()
    expected = Searcher(index_dir, model).text("a small blue square.", 5)
    assert [h["id"] for h in body["results"]] == [h["id"] for h in expected] and body["count"] == 5
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_api_image_upload_raw_and_multipart(client, world):
    data = png_bytes(world / "photos" / "img04.png")
    raw = client.post("/search?k=3", content=data, headers={"content-type": "image/png"})
    form = client.post("/search", params={"k": 3}, files={"image": ("q.png", data, "image/png")})
    for r in (raw, form):
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert top["path"].endswith("img04.png") and top["score"] > 0.999


@pytest.mark.parametrize("params,status,words", [
    ({"q": "x", "k": 0}, 400, "between 1 and 30"), ({"q": "x", "k": 31}, 400, "between 1 and 30"),
    ({"q": "x", "k": "many"}, 400, "integer"), ({"q": "x" * 101}, 413, "limit is 100"), ({}, 400, "give a query"),
    ({"q": "   "}, 400, "give a query")])
def test_api_limits_are_clear_4xx(client, params, status, words):
    r = client.get("/search", params=params)
    assert r.status_code == status and words in r.json()["error"]


def test_api_upload_limits_and_bad_images(client, world):
    big = b"\x89PNG" + b"0" * 30_000
    r = client.post("/search", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]
    r = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413
    r = client.post("/search", content=b"hello, not an image", headers={"content-type": "image/png"})
    assert r.status_code == 415 and "not a readable image" in r.json()["error"]
    assert client.post("/search", content=b"").status_code == 400
    assert client.post("/search", files={"other": ("x.png", b"x", "image/png")}).status_code == 400


def test_api_similar_and_media(client, index_dir, model, world):
    r = client.get("/similar/2", params={"k": 4})
    assert r.status_code == 200
    assert [h["id"] for h in r.json()["results"]] == [h["id"] for h in Searcher(index_dir, model).similar(2, 4)]
    assert client.get("/similar/999").status_code == 404
    thumb = client.get("/media/2")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (32, 32)
    items = SearchIndex.open(index_dir).items
    vid = next(i for i, it in enumerate(items) if it["kind"] == "video")
    early, late = client.get(f"/media/{vid}?t=0"), client.get(f"/media/{vid}?t=1.9")
    assert early.status_code == late.status_code == 200 and early.content != late.content
    full = client.get("/media/2?full=1")
    assert full.status_code == 200 and full.content == open(items[2]["path"], "rb").read()


@pytest.mark.parametrize("url", [
    "/media/../../etc/passwd", "/media/..%2F..%2Fetc%2Fpasswd", "/media/%2e%2e/%2e%2e/etc/passwd",
    "/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/media/1/../../../../etc/passwd", "/media/..\\..\\etc\\passwd",
    "/media/-1", "/media/1e3", "/media/%00", "/media/ 1", "/media//etc/passwd?full=1",
    "/static/../server.py", "/static/..%2Fserver.py", "/static/%2e%2e%2fserver.py", "/static/index.html/../../cli.py"])
def test_api_never_serves_a_path_from_the_request(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert b"root:" not in r.content and b"import" not in r.content


def test_api_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.replace(
        'http-equiv', '')
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and "://" not in r.text           # no CDN, no external resource


def test_api_bearer_token(index_dir, model):
    from polymodal.search.server import create_app
    c = local_client(create_app(index_dir, model=model, token="s3cret"))
    assert c.get("/healthz").status_code == 200 and c.get("/healthz").json()["token_required"] is True
    assert c.get("/").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = c.get("/search?q=red", headers=headers)
        assert r.status_code == 401 and "bearer token" in r.json()["error"]
        assert c.get("/media/1", headers=headers).status_code == 401
    assert c.get("/search?q=red", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_api_wrong_model_is_refused_and_model_comes_from_the_index(index_dir, model_dir):
    from polymodal.search.server import create_app
    torch.manual_seed(1)
    with pytest.raises(IndexModelMismatch):
        create_app(index_dir, model=create_model("tiny"))
    c = local_client(create_app(index_dir))                          # the model path recorded at build time
    assert c.get("/healthz").json()["model_id"] == model_id(load_model(model_dir))


def test_api_empty_index(model, tmp_path):
    from polymodal.search.server import create_app
    empty_index(tmp_path / "empty", model)
    c = local_client(create_app(tmp_path / "empty", model=model))
    assert c.get("/healthz").json()["count"] == 0
    r = c.get("/search?q=anything")
    assert r.status_code == 200 and r.json()["results"] == []
    assert c.get("/similar/0").status_code == 404 and c.get("/media/0").status_code == 404


def test_api_follows_index_add_and_refuses_ids_of_an_older_version(world, model, tmp_path):
    from polymodal.search.server import create_app
    folder = small_index(world, model, tmp_path, 3)
    c = local_client(create_app(tmp_path / "idx", model=model))
    health = c.get("/healthz").json()
    assert (health["count"], health["generation"], health["reload_error"]) == (3, 0, None)
    first = c.get("/search", params={"q": "a shape", "k": 3}).json()
    assert first["generation"] == 0
    assert c.get("/media/0", params={"g": 0}).status_code == 200

    shutil.copy(photo(world, 6), folder / "new.png")
    add_to_index(model, tmp_path / "idx", folder, progress=False)             # while the server runs
    health = c.get("/healthz").json()
    assert (health["count"], health["generation"]) == (4, 1)
    hits = c.post("/search?k=1", content=png_bytes(folder / "new.png"), headers={"content-type": "image/png"}).json()
    assert hits["generation"] == 1 and hits["results"][0]["path"].endswith("new.png")
    for url in ("/media/0", "/similar/0", "/items/0"):
        stale = c.get(url, params={"g": 0})
        assert stale.status_code == 409 and "search again" in stale.json()["error"], url
        assert c.get(url, params={"g": 1}).status_code == 200, url
    assert c.get("/media/0").status_code == 200                               # without g: the current version

    torch.manual_seed(3)                                                      # rebuilt with another model: refused
    build_index(create_model("tiny"), folder, tmp_path / "idx", progress=False)
    health = c.get("/healthz").json()
    assert (health["count"], health["generation"]) == (4, 1) and "another model" in health["reload_error"]
    assert c.get("/search", params={"q": "a shape"}).json()["generation"] == 1   # the old version keeps serving
    build_index(model, folder, tmp_path / "idx", progress=False)             # the right model again: followed
    health = c.get("/healthz").json()
    assert (health["generation"], health["reload_error"]) == (2, None)


def test_open_reads_again_when_the_folder_is_swapped_during_the_read(world, model, tmp_path, monkeypatch):
    import polymodal.search.index as index_module
    folder = small_index(world, model, tmp_path, 2)
    shutil.copy(photo(world, 4), folder / "b.png")
    real, calls = index_module.load_embeddings, []

    def load_then_rewrite(*args, **kwargs):
        out = real(*args, **kwargs)
        if not calls:                                   # a rewrite lands right after the first read
            build_index(model, folder, tmp_path / "idx", progress=False)
        calls.append(1)
        return out

    monkeypatch.setattr(index_module, "load_embeddings", load_then_rewrite)
    opened = SearchIndex.open(tmp_path / "idx")
    assert len(calls) == 2 and len(opened) == 3 and opened.stamp == index_module.folder_stamp(tmp_path / "idx")


# ----------------------------------------------------------------------------------------------- command line
def parser_for(add):
    p = argparse.ArgumentParser()
    add(p)
    return p


def test_cli_embed_index_search_round_trip(world, model_dir, tmp_path, capsys):
    from polymodal.search import cli
    args = parser_for(cli.add_embed_arguments).parse_args(
        [str(model_dir), "--data", str(world / "photos"), "--out", str(tmp_path / "emb"), "--quiet", "--float16"])
    summary = cli.main_embed(args)
    assert summary["count"] == N_IMAGES + 1 and summary["skipped"] == 1 and summary["dtype"] == "float16"
    assert "broken.jpg" in capsys.readouterr().err
    args = parser_for(cli.add_index_arguments).parse_args(
        ["build", str(model_dir), "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")])
    assert cli.main_index(args)["count"] == N_IMAGES + 1
    capsys.readouterr()
    args = parser_for(cli.add_search_arguments).parse_args(
        [str(tmp_path / "idx"), "--image", str(photo(world, 3)), "-k", "2", "--json"])
    hits = cli.main_search(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"] == hits and hits[0]["path"].endswith("img03.png")
    args = parser_for(cli.add_search_arguments).parse_args([str(tmp_path / "idx"), "a red star", "-k", "3"])
    cli.main_search(args)
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_cli_index_build_ivf_prints_recall_and_add(world, model_dir, tmp_path, capsys):
    from polymodal.search import cli
    args = parser_for(cli.add_index_arguments).parse_args(
        ["build", str(model_dir), "--data", str(world / "shapes" / "test.jsonl"), "--out", str(tmp_path / "idx"),
         "--kind", "hnsw", "--quiet"])
    summary = cli.main_index(args)
    assert summary["index"]["kind"] == "hnsw" and "recall@10 against exact search" in capsys.readouterr().out
    args = parser_for(cli.add_index_arguments).parse_args(
        ["add", str(tmp_path / "idx"), "--data", str(world / "photos"), "--quiet"])
    result = cli.main_index(args)
    assert result["added"] == N_IMAGES + 1 and result["count"] == 2 * N_IMAGES + 1
    assert SearchIndex.open(tmp_path / "idx").info["index"]["kind"] == "hnsw"


def test_serve_threads_option_sets_torch_and_faiss_threads():
    import argparse

    import faiss

    from polymodal.search.cli import add_serve_arguments, set_threads
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["idx", "--threads", "1"])
    assert args.threads == 1
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        set_threads(2)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
