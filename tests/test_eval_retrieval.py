"""Retrieval metrics against a plain loop/argsort reference."""

import numpy as np
import pytest
import torch

from polymodal.eval.retrieval import embed_and_score, retrieval_metrics

KEYS = {"image_to_text_R@1", "image_to_text_R@5", "image_to_text_R@10",
        "text_to_image_R@1", "text_to_image_R@5", "text_to_image_R@10",
        "text_to_image_median_rank", "text_to_image_mean_rank", "mean_recall"}


def reference(sim: np.ndarray, t2i: list[int], ks=(1, 5, 10)) -> dict:
    """Written independently: full argsort per query (no ties in random float data)."""
    n_img, n_txt = sim.shape
    out = {}
    i2t_rank = []
    for i in range(n_img):
        order = list(np.argsort(-sim[i]))                 # texts, best first
        own = [j for j in range(n_txt) if t2i[j] == i]
        i2t_rank.append(min(order.index(j) for j in own) + 1)
    t2i_rank = []
    for j in range(n_txt):
        order = list(np.argsort(-sim[:, j]))
        t2i_rank.append(order.index(t2i[j]) + 1)
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100 * sum(r <= k for r in i2t_rank) / n_img
    for k in ks:
        out[f"text_to_image_R@{k}"] = 100 * sum(r <= k for r in t2i_rank) / n_txt
    out["mean_recall"] = sum(out.values()) / (2 * len(ks))
    out["text_to_image_median_rank"] = float(np.median(t2i_rank))
    out["text_to_image_mean_rank"] = float(np.mean(t2i_rank))
    return out


def noisy_case(n_img: int, t2i: list[int], seed: int, noise: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, 16, generator=g, dtype=torch.float64)
    txt = img[torch.tensor(t2i)] + noise * torch.randn(len(t2i), 16, generator=g, dtype=torch.float64)
    return img, txt


def assert_close(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_five_texts_per_image_matches_reference():
    t2i = [i for i in range(40) for _ in range(5)]
    img, txt = noisy_case(40, t2i, seed=0)
    sim = img @ txt.T
    got = retrieval_metrics(sim, t2i)
    assert set(got) == KEYS
    assert_close(got, reference(sim.numpy(), t2i))
    # Not a trivial case: the recalls are strictly between 0 and 100.
    assert 0 < got["text_to_image_R@1"] < 100 and 0 < got["image_to_text_R@1"] < 100


def test_uneven_text_counts_match_reference():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 6, size=30)
    t2i = [i for i, c in enumerate(counts) for _ in range(c)]
    t2i = [t2i[p] for p in rng.permutation(len(t2i))]      # texts need not be grouped by image
    img, txt = noisy_case(30, t2i, seed=1)
    sim = img @ txt.T
    assert_close(retrieval_metrics(sim, torch.tensor(t2i)), reference(sim.numpy(), t2i))


def test_even_number_of_texts_median_is_mean_of_middle_two():
    t2i = [0, 1, 2, 3]
    # Column j: the correct image j scores 5 (or 9) and exactly j other images score higher,
    # so the text->image ranks are 1, 2, 3, 4.
    sim = torch.tensor([[9., 9., 9., 9.],
                        [1., 5., 8., 8.],
                        [1., 1., 5., 7.],
                        [1., 1., 1., 5.]])
    got = retrieval_metrics(sim, t2i)
    assert got["text_to_image_median_rank"] == 2.5
    assert got["text_to_image_mean_rank"] == 2.5
    assert got["text_to_image_R@1"] == 25.0


@pytest.mark.parametrize("chunk_size", [1, 7, 100_000])
def test_chunk_size_does_not_change_results(chunk_size):
    t2i = [i for i in range(23) for _ in range(3)] + [5, 9]
    img, txt = noisy_case(23, t2i, seed=2)
    sim = img @ txt.T
    want = reference(sim.numpy(), t2i)
    assert_close(retrieval_metrics(sim, t2i, chunk_size=chunk_size), want)
    assert_close(embed_and_score(img, txt, t2i, chunk_size=chunk_size), want)
    assert_close(retrieval_metrics(None, t2i, chunk_size=chunk_size, image_embeds=img, text_embeds=txt), want)


def test_perfect_diagonal_gives_100():
    sim = torch.eye(12) + 0.01 * torch.rand(12, 12)
    sim.fill_diagonal_(2.0)
    got = retrieval_metrics(sim, list(range(12)))
    for k in KEYS - {"text_to_image_median_rank", "text_to_image_mean_rank"}:
        assert got[k] == 100.0, k
    assert got["text_to_image_median_rank"] == 1.0 and got["text_to_image_mean_rank"] == 1.0


def test_image_hit_when_any_of_its_texts_is_in_top_k():
    # Image 0 owns texts 0 and 1; text 1 is its best, ranked 2nd behind text 2 (image 1's).
    sim = torch.tensor([[0.1, 0.8, 0.9, 0.2],
                        [0.3, 0.1, 0.9, 0.8]])
    got = retrieval_metrics(sim, [0, 0, 1, 1], ks=(1, 2))
    assert got["image_to_text_R@1"] == 50.0    # image 1 hits at 1, image 0 does not
    assert got["image_to_text_R@2"] == 100.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_similarity_matches_float32_of_the_same_values(dtype):
    t2i = [i for i in range(15) for _ in range(2)]
    img, txt = noisy_case(15, t2i, seed=3)
    sim = (img @ txt.T).to(dtype)                 # rounding creates exact ties
    want = retrieval_metrics(sim.float(), t2i)
    assert retrieval_metrics(sim, t2i, chunk_size=4) == want


def test_ties_pessimistic_by_default_and_optimistic_on_request():
    sim = torch.zeros(4, 8)                    # a collapsed model: every score equal
    t2i = [i // 2 for i in range(8)]
    pess = retrieval_metrics(sim, t2i)
    # Pessimistic: all 3 other images rank ahead; for image->text the 6 foreign texts do.
    assert pess["text_to_image_mean_rank"] == 4.0 and pess["text_to_image_R@1"] == 0.0
    assert pess["image_to_text_R@5"] == 0.0 and pess["image_to_text_R@10"] == 100.0
    opt = retrieval_metrics(sim, t2i, ties="optimistic")
    assert opt["text_to_image_mean_rank"] == 1.0 and opt["mean_recall"] == 100.0


def test_bad_inputs_raise_clear_errors():
    sim = torch.rand(3, 4)
    with pytest.raises(ValueError, match=r"text_to_image has 3 entries but there are 4 texts"):
        retrieval_metrics(sim, [0, 1, 2])
    with pytest.raises(ValueError, match=r"similarity must be 2-D"):
        retrieval_metrics(torch.rand(3), [0, 1, 2])
    with pytest.raises(ValueError, match=r"text_to_image\[3\] = 3 is not an image index in \[0, 3\)"):
        retrieval_metrics(sim, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"1 image\(s\) have no text.*\[2\]"):
        retrieval_metrics(sim, [0, 1, 1, 0])
    with pytest.raises(ValueError, match=r"same E"):
        embed_and_score(torch.rand(3, 5), torch.rand(4, 6), [0, 1, 2, 2])
    sim[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"similarity contains NaN or inf \(first in row 1\)"):
        retrieval_metrics(sim, [0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"text_embeds contains NaN"):
        embed_and_score(torch.rand(3, 5), torch.full((4, 5), float("nan")), [0, 1, 2, 2])


def test_manifest_retrieval_uses_every_caption_of_each_language(tmp_path):
    """`captions` / `captions_zh` lists are used when present; the scores match encoding by hand."""
    import json

    import numpy as np
    from PIL import Image

    from polymodal.data.text import train_tokenizer
    from polymodal.encode import encode_images, encode_texts
    from polymodal.eval.suite import retrieval_eval
    from polymodal.models.factory import create_model

    rng = np.random.default_rng(0)
    records = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        records.append({"image": str(path), "caption": f"shape {i}", "captions": [f"shape {i}", f"a thing {i}"],
                        "caption_zh": f"形状 {i}", "captions_zh": [f"形状 {i}", f"东西 {i}", f"图 {i}"][: i + 1]})
    records[0].pop("captions_zh")                      # falls back to the single caption_zh
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    texts = [t for r in records for t in r["captions"] + r.get("captions_zh", [r["caption_zh"]])]
    torch.manual_seed(0)
    model = create_model("tiny", tokenizer=train_tokenizer(texts * 4, kind="bpe", vocab_size=200)).eval()

    en = retrieval_eval(model, manifest)
    zh = retrieval_eval(model, manifest, caption_key="caption_zh")
    assert (en["num_texts"], zh["num_texts"]) == (6, 1 + 2 + 3)
    zh_texts = [t for r in records for t in r.get("captions_zh", [r["caption_zh"]])]
    want = embed_and_score(encode_images(model, [r["image"] for r in records]), encode_texts(model, zh_texts),
                           torch.tensor([0, 1, 1, 2, 2, 2]))
    assert zh["text_to_image_R@1"] == pytest.approx(want["text_to_image_R@1"])
    assert zh["image_to_text_R@1"] == pytest.approx(want["image_to_text_R@1"])


def test_skip_mode_leaves_out_unreadable_images_and_decodes_each_file_once(tmp_path, monkeypatch):
    import json

    import numpy as np
    from PIL import Image

    import polymodal.data.images as images
    from polymodal.data.text import train_tokenizer
    from polymodal.encode import encode_images
    from polymodal.eval.suite import encode_manifest_images
    from polymodal.models.factory import create_model

    rng = np.random.default_rng(1)
    records = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        records.append({"image": str(path), "caption": f"shape {i}"})
    (tmp_path / "2.png").write_bytes(b"not a png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    torch.manual_seed(0)
    model = create_model("tiny", tokenizer=train_tokenizer([r["caption"] for r in records] * 4, kind="bpe",
                                                            vocab_size=100)).eval()
    opened = []
    real = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p, *a, **k: opened.append(p) or real(p, *a, **k))
    with pytest.warns(UserWarning, match="skipped 1 record"):
        img, kept, skipped = encode_manifest_images(model, manifest, on_bad_record="skip", batch_size=2)
    assert [r["caption"] for r in kept] == ["shape 0", "shape 1", "shape 3", "shape 4"] and skipped == 1
    assert sorted(opened) == sorted(r["image"] for r in records)            # every file decoded once
    torch.testing.assert_close(img, encode_images(model, [r["image"] for r in kept]))
    with pytest.warns(UserWarning, match="skipped 1 record"):               # the task's JSON counts it too
        from polymodal.eval.tasks import run_task
        assert run_task("retrieval", model, str(manifest), on_bad_record="skip")["num_skipped"] == 1
    with pytest.raises(Exception, match="2.png"):
        encode_manifest_images(model, manifest, on_bad_record="error")


def _brute_force_multi(sim, positives, k):
    """Recall@k of both directions by sorting, with several correct images per text (pessimistic ties)."""
    n_img, n_txt = sim.shape
    t_hits, i_hits = 0, 0
    for j in range(n_txt):
        best = max(float(sim[i, j]) for i in positives[j])
        ahead = sum(1 for i in range(n_img) if i not in positives[j] and float(sim[i, j]) >= best)
        t_hits += ahead + 1 <= k
    own = [[j for j in range(n_txt) if i in positives[j]] for i in range(n_img)]
    for i in range(n_img):
        best = max(float(sim[i, j]) for j in own[i])
        ahead = sum(1 for j in range(n_txt) if j not in own[i] and float(sim[i, j]) >= best)
        i_hits += ahead + 1 <= k
    return 100.0 * t_hits / n_txt, 100.0 * i_hits / n_img


def test_several_correct_images_per_text_match_a_brute_force_count_with_ties():
    g = torch.Generator().manual_seed(3)
    sim = torch.randint(0, 4, (9, 7), generator=g).float()                    # many ties
    positives = [[0, 3], [1], [2, 4, 5], [6], [7, 0], [8], [3, 6]]
    for rows in (1, 2, 9):
        got = retrieval_metrics(sim, positives, ks=(1, 2, 5), chunk_size=rows)
        for k in (1, 2, 5):
            t, i = _brute_force_multi(sim, positives, k)
            assert got[f"text_to_image_R@{k}"] == pytest.approx(t) and got[f"image_to_text_R@{k}"] == pytest.approx(i)
    # The embedding path agrees, and one image per text given as lists equals the plain index form.
    img, txt = torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)
    assert embed_and_score(img, txt, positives) == pytest.approx(retrieval_metrics(img @ txt.T, positives))
    single = [0, 1, 2, 3, 4, 5, 6]
    assert retrieval_metrics(sim[:7], [[i] for i in single]) == retrieval_metrics(sim[:7], single)
    with pytest.raises(ValueError, match=r"text_to_image\[1\] lists no image"):
        retrieval_metrics(sim, [[0], [], [1], [2], [3], [4], [5, 6, 7, 8]])


def test_rows_naming_the_same_image_are_one_image_with_a_warning(tmp_path):
    """A one-row-per-caption CSV (clip_benchmark's Flickr30k `image,caption` layout) was read as one image per row:
    15 "images" for 3 files. Now its numbers equal the same set written as one record per image."""
    import csv
    import json

    import numpy as np
    from PIL import Image

    from polymodal.data.text import train_tokenizer
    from polymodal.eval.suite import retrieval_eval
    from polymodal.models.factory import create_model
    rng = np.random.default_rng(1)
    grouped, rows = [], []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        caps = [f"shape {i} view {k}" for k in range(5)]
        grouped.append({"image": str(path), "captions": caps})
        rows += [{"image": str(path), "caption": c} for c in caps]
    (tmp_path / "grouped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in grouped))
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    torch.manual_seed(0)
    model = create_model("tiny", tokenizer=train_tokenizer([r["caption"] for r in rows] * 3, kind="bpe",
                                                            vocab_size=120)).eval()
    want = retrieval_eval(model, tmp_path / "grouped.jsonl")
    with pytest.warns(UserWarning, match="15 records name 3 distinct images; their captions were grouped"):
        got = retrieval_eval(model, tmp_path / "rows.csv")
    assert got["num_images"] == 3 and got == pytest.approx(want)
