"""The search page in headless Chromium: type a query, see the expected image first, use the keyboard.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by
NUL on file descriptors 3 and 4), so no browser-automation package is needed. The test skips only where no
chromium / chromium-browser is on PATH.

The model is a tiny random one, so "expected" cannot mean "semantically right". It means: the image an
independent brute-force computation (the evaluation code's own `encode_texts` / `encode_images` and a numpy
dot product) ranks first for the typed text. The query is the ShapesWorld caption whose best image wins by
the widest margin, so float rounding cannot flip it. Any fault between the index, the server, the page's
request and its rendering order shows up as a different first card.
"""
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium or chromium-browser on PATH")


class Chromium:
    """A headless Chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, user_dir):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def wire():           # in the child: the protocol lives on fds 3 (commands in) and 4 (replies out)
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--remote-debugging-pipe",
             f"--user-data-dir={user_dir}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._next, self._replies, self._cv = 0, {}, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self):
        buf = b""
        while True:
            data = os.read(self._from_r, 65536)
            if not data:
                return
            buf += data
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cv:
                        self._replies[msg["id"]] = msg
                        self._cv.notify_all()

    def call(self, method, session=None, timeout=20, **params):
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cv:
            while msg["id"] not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"chromium did not answer {method}")
                self._cv.wait(left)
            reply = self._replies.pop(msg["id"])
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def page(self, method, **params):
        return self.call(method, session=self.session, **params)

    def js(self, expression):
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied: {expression}")

    def key(self, key, code=None, vk=0, text=None):
        base = {"key": key, "code": code or key, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}
        self.page("Input.dispatchKeyEvent", type="keyDown", **base, **({"text": text} if text else {}))
        self.page("Input.dispatchKeyEvent", type="keyUp", **base)

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_w)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A tiny ShapesWorld index served by uvicorn on a free port; yields (url, model, folder, captions)."""
    from polymodal import create_model, load_model
    from polymodal.data.synthetic.shapes import ShapesConfig, generate_shapes
    from polymodal.data.text import train_tokenizer
    from polymodal.search.index import build_index
    from polymodal.search.server import create_app
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("site")
    generate_shapes(root / "shapes", n_train=0, n_test=12, n_val=0, n_hard=0, cfg=ShapesConfig(image_size=32),
                    progress=False, workers=1)
    records = [json.loads(line) for line in open(root / "shapes" / "test.jsonl")]
    captions = [r["caption"] for r in records]
    torch.manual_seed(0)
    create_model("tiny", tokenizer=train_tokenizer(captions * 5, kind="bpe", vocab_size=120)).save_pretrained(root / "m")
    model = load_model(root / "m")
    build_index(model, root / "shapes" / "images", root / "index", progress=False, model_source=str(root / "m"))
    app = create_app(root / "index", model=model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", model, root / "shapes" / "images", captions
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def expected_first(model, folder, captions):
    """(query, file name ranked first) by brute force, for the caption with the clearest winner."""
    from polymodal.encode import encode_images, encode_texts
    paths = sorted(str(p) for p in folder.iterdir())
    images = encode_images(model, paths, batch_size=4).numpy()
    texts = encode_texts(model, captions).numpy()
    scores = texts @ images.T                                        # (captions, images)
    top2 = np.sort(scores, axis=1)[:, -2:]
    best = int(np.argmax(top2[:, 1] - top2[:, 0]))
    assert top2[best, 1] - top2[best, 0] > 1e-3
    return captions[best], os.path.basename(paths[int(np.argmax(scores[best]))])


FIRST_CARD = "(() => { const b = document.querySelector('#results button.hit'); return b && b.dataset.name; })()"


def test_typed_query_shows_the_expected_image_first(site, browser):
    url, model, folder, captions = site
    query, expected = expected_first(model, folder, captions)
    browser.page("Page.navigate", url=url)
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('q')")
    browser.js("document.getElementById('q').focus()")
    browser.page("Input.insertText", text=query)
    browser.key("Enter", vk=13, text="\r")
    assert browser.wait_for(FIRST_CARD) == expected
    assert browser.js("document.querySelectorAll('#results button.hit').length") == 12
    scores = browser.js("Array.from(document.querySelectorAll('#results .score')).map(s => parseFloat(s.textContent))")
    assert scores == sorted(scores, reverse=True)
    # The thumbnail of the first card was fetched through /media/{id} and decoded.
    assert browser.wait_for("(() => { const i = document.querySelector('#results img'); "
                            "return i && i.complete && i.naturalWidth; })()") == 32
    assert query in browser.js("document.getElementById('status').textContent")


def test_keyboard_reaches_a_result_and_enter_finds_similar_items(site, browser):
    url, model, folder, captions = site
    browser.page("Page.navigate", url=url + "?q=" + "a%20red%20star")
    browser.wait_for(FIRST_CARD)
    first = browser.js(FIRST_CARD)
    browser.js("document.getElementById('q').focus()")
    browser.key("ArrowDown", vk=40)
    assert browser.js("document.activeElement.dataset.name") == first
    browser.key("ArrowRight", vk=39)
    second = browser.js("document.activeElement.dataset.name")
    assert second and second != first
    browser.key("Enter", vk=13, text="\r")
    browser.wait_for("document.getElementById('status').textContent.startsWith('11 results for items like')")
    names = browser.js("Array.from(document.querySelectorAll('#results button.hit')).map(b => b.dataset.name)")
    assert second not in names and len(names) == 11
    browser.key("/", code="Slash", vk=191, text="/")
    assert browser.js("document.activeElement.id") == "q"


def test_the_page_says_what_is_indexed_and_marks_a_deleted_file(site, browser):
    url, model, folder, captions = site
    browser.page("Page.navigate", url=url)
    status = browser.wait_for("(() => { const e = document.getElementById('status'); "
                              "return e && e.textContent.includes('items indexed') && e.textContent; })()")
    assert status.startswith("12 items indexed with m (exact search)")          # before any query
    gone = sorted(folder.iterdir())[0]
    data = gone.read_bytes()
    gone.unlink()
    try:
        browser.page("Page.navigate", url=url + "?q=" + "a%20shape")
        browser.wait_for(FIRST_CARD)
        assert browser.wait_for("document.querySelectorAll('#results .missing').length") == 1
        assert browser.js("document.querySelectorAll('#results img').length") == 11      # no broken picture
    finally:
        gone.write_bytes(data)
