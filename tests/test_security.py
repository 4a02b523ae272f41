"""The search server and inputs under attack (issue #30): what the server serves, which hosts and tokens it
accepts, what a build follows or skips, and one-line errors for damaged or unwritable index folders."""
import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from polymodal import cli, create_model, load_model  # noqa: E402
from polymodal.search.embed import SearchError  # noqa: E402
from polymodal.search.index import SearchIndex, add_to_index, build_index  # noqa: E402

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (250, 200, 0)]


def write_png(path, colour):
    Image.new("RGB", (32, 32), colour).save(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from polymodal.data.text import train_tokenizer
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m"
    tok = train_tokenizer(["a red square", "a green circle", "a blue star"] * 10, kind="bpe", vocab_size=60)
    create_model("tiny", tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    torch.set_num_threads(1)
    return load_model(model_dir)


@pytest.fixture
def photos(tmp_path):
    """tmp_path/photos with a0.png a1.png and sub/b.png; tmp_path/outside holds a secret and a private image."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    write_png(folder / "a0.png", COLOURS[0])
    write_png(folder / "a1.png", COLOURS[1])
    write_png(folder / "sub" / "b.png", COLOURS[2])
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(SECRET)
    write_png(outside / "private.png", COLOURS[3])
    return folder


def build(model, model_dir, data, out):
    build_index(model, data, out, model_source=str(model_dir), progress=False)
    return SearchIndex.open(out)


def local_client(app, host="127.0.0.1:8000"):
    from fastapi.testclient import TestClient
    return TestClient(app, base_url=f"http://{host}")


def app_for(index_dir, model, **kw):
    from polymodal.search.server import create_app
    return create_app(index_dir, model=model, **kw)


def row_of(index, path):
    return next(i for i, it in enumerate(index.items) if it["path"] == str(path))


# ------------------------------------------------------------------------------------- serving only what was indexed
def test_a_file_swapped_for_a_symlink_after_indexing_is_not_served(model, model_dir, photos, tmp_path):
    index = build(model, model_dir, photos, tmp_path / "idx")
    c = local_client(app_for(tmp_path / "idx", model))
    row = row_of(index, photos / "a1.png")
    (photos / "a1.png").unlink()
    (photos / "a1.png").symlink_to(tmp_path / "outside" / "passwd")
    r = c.get(f"/media/{row}?full=1")
    assert r.status_code == 410 and SECRET not in r.content and "symbolic link" in r.json()["error"]
    (photos / "a1.png").unlink()
    (photos / "a1.png").symlink_to(tmp_path / "outside" / "private.png")      # an image: a thumbnail would decode
    for url in (f"/media/{row}?full=1", f"/media/{row}"):
        r = c.get(url)
        assert r.status_code == 410, url
        assert r.headers["content-type"].startswith("application/json")


def test_a_folder_swapped_for_a_symlink_with_an_identical_copy_is_not_served(model, model_dir, photos, tmp_path):
    index = build(model, model_dir, photos, tmp_path / "idx")
    row = row_of(index, photos / "sub" / "b.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(photos / "sub" / "b.png", elsewhere / "b.png")   # same bytes, size and mtime; another inode
    (photos / "sub").rename(tmp_path / "sub-old")
    (photos / "sub").symlink_to(elsewhere)
    c = local_client(app_for(tmp_path / "idx", model))
    r = c.get(f"/media/{row}?full=1")
    assert r.status_code == 410 and "another file" in r.json()["error"]


def test_a_file_edited_after_indexing_answers_410_and_an_unchanged_one_is_served(model, model_dir, photos, tmp_path):
    index = build(model, model_dir, photos, tmp_path / "idx")
    c = local_client(app_for(tmp_path / "idx", model))
    unchanged, edited = row_of(index, photos / "a0.png"), row_of(index, photos / "a1.png")
    with open(photos / "a1.png", "ab") as f:
        f.write(b"appended")
    r = c.get(f"/media/{unchanged}?full=1")
    assert r.status_code == 200 and r.content == (photos / "a0.png").read_bytes()
    assert r.headers["content-type"] == "image/png" and 'filename="a0.png"' in r.headers["content-disposition"]
    assert c.get(f"/media/{edited}?full=1").status_code == 410


def test_symlinks_in_the_folder_are_skipped_at_build_files_and_folders_alike(model, model_dir, photos, tmp_path):
    (photos / "link.png").symlink_to(tmp_path / "outside" / "private.png")
    (photos / "linkdir").symlink_to(tmp_path / "outside")
    index = build(model, model_dir, photos, tmp_path / "idx")
    paths = sorted(os.path.relpath(it["path"], photos) for it in index.items)
    assert paths == ["a0.png", "a1.png", os.path.join("sub", "b.png")]
    skipped = {os.path.basename(s["path"]): s["reason"] for s in index.emb.skipped}
    assert skipped == {"link.png": "symlink", "linkdir": "symlink"}


def test_a_dangling_symlink_is_skipped_and_the_build_goes_on(model, model_dir, photos, tmp_path):
    (photos / "gone.jpg").symlink_to(tmp_path / "no-such-file.jpg")
    index = build(model, model_dir, photos, tmp_path / "idx")
    assert len(index.items) == 3
    assert [(os.path.basename(s["path"]), s["reason"]) for s in index.emb.skipped] == [("gone.jpg", "symlink")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_skipped_as_a_fifo_not_as_a_missing_file(model, model_dir, photos, tmp_path):
    os.mkfifo(photos / "pipe.jpg")
    index = build(model, model_dir, photos, tmp_path / "idx")
    assert len(index.items) == 3
    (entry,) = index.emb.skipped
    assert entry["reason"] == "not_a_file" and "FIFO" in entry["detail"] and "not found" not in entry["detail"]


# ----------------------------------------------------------------------------------------------- hosts (DNS rebinding)
@pytest.fixture
def served(model, model_dir, photos, tmp_path):
    build(model, model_dir, photos, tmp_path / "idx")
    return tmp_path / "idx"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil",
                                  "10.0.0.7:8000"])
def test_a_foreign_host_header_is_refused_on_every_endpoint(served, model, model_dir, host):
    c = local_client(app_for(served, model), host=host)     # a DNS-rebinding page sends its own name as the Host
    for url in ("/search?q=red", "/media/0?full=1", "/media/0", "/items/0", "/similar/0", "/healthz", "/"):
        r = c.get(url)
        assert r.status_code == 421, (url, r.status_code)
        assert str(served.parent) not in r.text and b"PNG" not in r.content
    assert c.post("/search", content=b"x").status_code == 421


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:1234", "[::1]:8000", "LOCALHOST"])
def test_local_host_names_are_trusted(served, model, host):
    assert local_client(app_for(served, model), host=host).get("/items/0").status_code == 200


def test_the_bind_address_and_allowed_names_are_trusted(served, model):
    from polymodal.search.server import trusted_hosts
    app = app_for(served, model, hosts=trusted_hosts("192.168.1.5", ["photos.lan"]))
    for host in ("192.168.1.5:8000", "photos.lan", "127.0.0.1"):
        assert local_client(app, host=host).get("/items/0").status_code == 200, host
    assert local_client(app, host="192.168.1.6").get("/items/0").status_code == 421
    every = app_for(served, model, hosts=trusted_hosts("0.0.0.0"), any_ip=True)     # reached by any address
    assert local_client(every, host="10.1.2.3:8000").get("/items/0").status_code == 200
    assert local_client(every, host="rebind.evil.example").get("/items/0").status_code == 421


# ----------------------------------------------------------------------------------------------- tokens and /healthz
@pytest.mark.parametrize("token", ["", "   ", " s3cret"])
def test_an_empty_or_blank_token_is_an_error_not_an_open_server(served, model, token):
    with pytest.raises(ValueError, match="token"):
        app_for(served, model, token=token)


def test_serve_token_from_the_option_or_the_environment():
    from polymodal.search.cli import TOKEN_ENV, serve_token
    assert serve_token(None, {}) is None
    assert serve_token(None, {TOKEN_ENV: "abc"}) == "abc"
    assert serve_token("opt", {TOKEN_ENV: "abc"}) == "opt"
    for given, env in (("", {}), (None, {TOKEN_ENV: ""}), ("", {TOKEN_ENV: "abc"})):
        with pytest.raises(ValueError, match="empty"):
            serve_token(given, env)


@pytest.mark.parametrize("argv_token, env", [(["--token", ""], None), ([], "")])
def test_cli_serve_with_an_empty_token_exits_2_and_starts_nothing(served, capsys, monkeypatch, argv_token, env):
    import uvicorn
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append(1))
    monkeypatch.delenv("POLYMODAL_SEARCH_TOKEN", raising=False)
    if env is not None:
        monkeypatch.setenv("POLYMODAL_SEARCH_TOKEN", env)
    code = cli.main(["serve", str(served), *argv_token])
    err = capsys.readouterr().err.strip().splitlines()
    assert (code, started) == (2, [])
    assert len(err) == 1 and err[0].startswith("polymodal: error: ") and "empty" in err[0]


def test_healthz_without_the_token_says_only_that_one_is_needed(served, model, model_dir):
    c = local_client(app_for(served, model, token="s3cret"))
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "token_required": True}
    full = c.get("/healthz", headers={"Authorization": "Bearer s3cret"}).json()
    assert full["count"] == 3 and full["token_required"] is True
    open_server = local_client(app_for(served, model)).get("/healthz")
    assert str(model_dir) not in open_server.text and str(served) not in open_server.text


@pytest.mark.parametrize("item_id", ["%C2%B2", "%D9%A1", "%EF%BC%91", "%E2%91%A0"])   # ², Arabic 1, fullwidth 1, ①
def test_unicode_digits_as_ids_are_404_not_500(served, model, item_id):
    c = local_client(app_for(served, model))
    for url in (f"/items/{item_id}", f"/similar/{item_id}", f"/media/{item_id}", f"/media/{item_id}?full=1"):
        r = c.get(url)
        assert r.status_code == 404 and "ids are integers" in r.json()["error"], url


# ----------------------------------------------------------------------------------- damaged and unwritable folders
def test_index_json_that_is_not_json_is_one_line_naming_the_file(served, capsys):
    (served / "index.json").write_text('{"model": "m", "count": 3,')
    with pytest.raises(SearchError, match=r"index\.json: not valid JSON .*index build"):
        SearchIndex.open(served)
    code = cli.main(["search", str(served), "red"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "index.json" in err[0] and "Traceback" not in err[0]


def test_a_killed_builds_temp_folder_is_removed_by_the_next_build(model, model_dir, photos, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    leftovers = [tmp_path / ".idx.k3x9_q2z", tmp_path / f".idx.tmp-{dead}-abcd1234"]   # today's and our naming
    for d in leftovers:
        d.mkdir()
        (d / "vectors.npy").write_bytes(b"\0" * 4096)
    mine = tmp_path / f".idx.tmp-{os.getpid()}-running1"                                # a live build's: kept
    mine.mkdir()
    build(model, model_dir, photos, tmp_path / "idx")
    assert not any(d.exists() for d in leftovers) and mine.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")) == [mine.name]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["polymodal.search.index.write_embeddings", "polymodal.search.embed._write_chunk"])
def test_disk_full_during_index_add_is_one_line_and_keeps_the_old_index(model, model_dir, photos, tmp_path,
                                                                       monkeypatch, capsys, where):
    build(model, model_dir, photos, tmp_path / "idx")
    before = (tmp_path / "idx" / "vectors.npy").read_bytes()
    write_png(photos / "new.png", (9, 9, 9))
    monkeypatch.setattr(where, _no_space)
    with pytest.raises(SearchError, match="disk is full.*old index is kept"):
        add_to_index(model, tmp_path / "idx", photos, progress=False)
    assert (tmp_path / "idx" / "vectors.npy").read_bytes() == before and len(SearchIndex.open(tmp_path / "idx")) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx.tmp")]
    code = cli.main(["index", "add", str(tmp_path / "idx"), "--data", str(photos), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "disk is full" in err[0] and str(tmp_path / "idx") in err[0]


def test_an_out_folder_that_is_a_file_is_refused_before_embedding_and_the_file_kept(model, model_dir, photos,
                                                                                     tmp_path, monkeypatch):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    import polymodal.search.index as index_mod
    monkeypatch.setattr(index_mod, "embed_items", lambda *a, **k: pytest.fail("embedded before checking --out"))
    with pytest.raises(SearchError, match="notes.txt is a file"):
        build_index(model, photos, out, progress=False)
    assert out.read_text() == "my notes"


def test_an_out_folder_on_a_read_only_place_is_refused_before_embedding(model, photos, tmp_path, monkeypatch):
    import polymodal.search.index as index_mod
    monkeypatch.setattr(index_mod, "embed_items", lambda *a, **k: pytest.fail("embedded before checking --out"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, mode, **k))
    (tmp_path / "ro").mkdir()
    with pytest.raises(SearchError, match="read-only"):
        build_index(model, photos, tmp_path / "ro" / "idx", progress=False)


def test_vectors_are_unchanged_by_the_security_checks(model, model_dir, photos, tmp_path):
    """The stat and inode recording adds fields, not different embeddings."""
    index = build(model, model_dir, photos, tmp_path / "idx")
    from polymodal.encode import encode_images
    expected = encode_images(model, [it["path"] for it in index.items], batch_size=2).numpy()
    np.testing.assert_allclose(index.emb.vectors, expected, atol=1e-5)
    assert all(it["ino"] == os.stat(it["path"]).st_ino for it in index.items)
