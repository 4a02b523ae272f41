// polymodal search page: plain JavaScript, no build step, no external resources.
"use strict";

(function () {
  const form = document.getElementById("search-form");
  const q = document.getElementById("q");
  const kInput = document.getElementById("k");
  const fileInput = document.getElementById("image");
  const fileButton = document.querySelector(".file-button");
  const statusLine = document.getElementById("status");
  const results = document.getElementById("results");

  // A bearer token (for servers started with --token) comes once in the address as #token=..., then
  // lives in this tab's sessionStorage and is sent as a header, never in a URL.
  const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
  if (hashToken) {
    sessionStorage.setItem("polymodal-token", hashToken);
    history.replaceState(null, "", location.pathname + location.search);
  }
  const token = sessionStorage.getItem("polymodal-token");
  const authHeaders = token ? { Authorization: "Bearer " + token } : {};

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  function k() {
    const value = parseInt(kInput.value, 10);
    return Number.isFinite(value) && value > 0 ? value : 20;
  }

  async function call(url, options) {
    const response = await fetch(url, { ...options, headers: { ...authHeaders, ...((options || {}).headers || {}) } });
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const message = body && (body.error || JSON.stringify(body.detail)) || response.statusText;
      throw new Error(response.status + ": " + message);
    }
    return body;
  }

  // Ids are rows of one version of the index; `g` (the answer's generation) makes the server refuse
  // them with 409 once the index has been rewritten, instead of showing another item.
  function mediaUrl(hit, generation) {
    let url = "/media/" + hit.id + "?g=" + generation;
    if (hit.time !== undefined && hit.time !== null) url += "&t=" + hit.time.toFixed(3);
    return url;
  }

  // A file deleted or changed since indexing is marked on its card (the server answers 404 / 410 for it),
  // never shown as a broken picture.
  function markMissing(img) {
    const note = document.createElement("div");
    note.className = "text-only missing";
    note.textContent = "file gone since indexing (polymodal index add --prune removes it)";
    img.replaceWith(note);
  }

  async function setImage(img, url) {
    if (!token) { img.addEventListener("error", () => markMissing(img), { once: true }); img.src = url; return; }
    try {
      const response = await fetch(url, { headers: authHeaders });
      if (response.ok) img.src = URL.createObjectURL(await response.blob());
      else if (response.status === 404 || response.status === 410) markMissing(img);
    } catch (e) { /* the card keeps its caption */ }
  }

  function card(hit, rank, generation) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "hit";
    button.dataset.id = hit.id;
    button.dataset.path = hit.path;
    if (hit.name) button.dataset.name = hit.name;
    const label = hit.name || hit.caption || ("item " + hit.id);
    const when = hit.kind === "video" && hit.time !== null && hit.time !== undefined ? " at " + hit.time.toFixed(1) + " s" : "";
    button.setAttribute("aria-label", "Result " + rank + ": " + label + when + ", score " + hit.score.toFixed(3) +
      ". Press Enter for similar items.");
    if (hit.kind === "text") {
      const text = document.createElement("div");
      text.className = "text-only";
      text.textContent = hit.caption || "";
      button.appendChild(text);
    } else {
      const img = document.createElement("img");
      img.alt = hit.caption || hit.name || "";
      img.loading = "lazy";
      setImage(img, mediaUrl(hit, generation));
      button.appendChild(img);
    }
    const meta = document.createElement("div");
    meta.className = "meta";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    name.title = hit.path || "";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(name, score);
    button.appendChild(meta);
    if (hit.kind === "video") {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "video" + when;
      button.appendChild(badge);
    }
    button.addEventListener("click", () => similar(hit.id, label, generation));
    li.appendChild(button);
    return li;
  }

  function show(body, what) {
    results.replaceChildren(...body.results.map((hit, i) => card(hit, i + 1, body.generation)));
    setStatus(body.count ? body.count + " results for " + what + " (" + body.took_ms + " ms)" : "No results for " + what);
  }

  let searched = false;     // a search's status is never overwritten by the index description arriving late

  async function run(what, promise) {
    searched = true;
    setStatus("Searching " + what + "\u2026");
    try { show(await promise, what); } catch (e) { results.replaceChildren(); setStatus(e.message, true); }
  }

  function searchText(text) {
    const url = "/search?q=" + encodeURIComponent(text) + "&k=" + k();
    history.replaceState(null, "", "?q=" + encodeURIComponent(text));
    return run("\u201c" + text + "\u201d", call(url));
  }

  function searchImage(file) {
    return run("the image " + file.name, call("/search?k=" + k(), {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    }));
  }

  function similar(id, label, generation) {
    return run("items like " + label, call("/similar/" + id + "?k=" + k() + "&g=" + generation));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = q.value.trim();
    if (text) searchText(text); else setStatus("Type a description or choose an image.", true);
  });
  fileInput.addEventListener("change", () => { if (fileInput.files[0]) searchImage(fileInput.files[0]); });
  fileButton.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); fileInput.click(); }
  });

  // Drop an image anywhere on the page.
  document.addEventListener("dragover", (event) => { event.preventDefault(); q.classList.add("drop"); });
  document.addEventListener("dragleave", () => q.classList.remove("drop"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    q.classList.remove("drop");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) searchImage(file);
  });

  // Keyboard: "/" jumps to the search box; arrow keys move between results in the grid.
  document.addEventListener("keydown", (event) => {
    const inField = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !inField) { event.preventDefault(); q.focus(); q.select(); return; }
    const buttons = Array.from(results.querySelectorAll("button.hit"));
    const at = buttons.indexOf(document.activeElement);
    if (event.key === "ArrowDown" && document.activeElement === q && buttons.length) {
      event.preventDefault(); buttons[0].focus(); return;
    }
    if (at < 0) return;
    const top = buttons[0].getBoundingClientRect().top;
    const columns = Math.max(1, buttons.filter((b) => b.getBoundingClientRect().top === top).length);
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    const next = at + step;
    if (next < 0) q.focus(); else if (next < buttons.length) buttons[next].focus();
  });

  // What is indexed, before any query: the count, the model and the index kind.
  async function describeIndex() {
    try {
      const info = await call("/healthz");
      if (searched) return;
      if (info.token_required && !token) {
        setStatus("This server needs a token: open it with #token=... in the address.", true);
      } else if (info.count !== undefined) {
        setStatus(info.count + " items indexed with " + (info.model_name || "the recorded model") +
          " (" + (!info.index || info.index === "flat" ? "exact" : info.index) + " search). Type a description or " +
          "choose an image.");
      }
    } catch (e) { if (!searched) setStatus(e.message, true); }
  }

  const initial = new URLSearchParams(location.search).get("q");
  if (initial) { q.value = initial; searchText(initial); } else describeIndex();
})();
