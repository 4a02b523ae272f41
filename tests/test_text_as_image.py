"""Text as Image: sentences, label extraction, cached embeddings, the adapter trained by the one Trainer
from a recipe (checkpoints, resume), evaluation, the experiment."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from polymodal.data.sentences import (LMSentenceGenerator, SentenceConfig, TemplateSentenceGenerator, extract_labels,
                                      generate_sentences, plural, sample_label_sets)
from polymodal.eval.multilabel import (cached_text_embeddings, label_embeddings, load_label_names, modality_gap,
                                       multilabel_eval_manifest)
from polymodal.methods.text_as_image import TextAsImageMethod
from polymodal.hub import load_model
from polymodal.models.multilabel import AdapterConfig, load_adapter, save_adapter

SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "heart"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from polymodal.data.synthetic.shapes import generate_shapes
    out = tmp_path_factory.mktemp("tai_shapes")
    generate_shapes(out, n_train=60, n_test=40, n_val=10, n_hard=0, seed=5, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def tiny_clip(shapes):
    from polymodal.data.manifests import read_manifest
    from polymodal.data.text import train_tokenizer
    from polymodal.models.factory import create_model
    recs = read_manifest(shapes / "train.jsonl").records
    tok = train_tokenizer([r["long_caption"] for r in recs] + [r["caption"] for r in recs], vocab_size=300,
                          context_length=32)
    torch.manual_seed(0)
    return create_model("tiny", tokenizer=tok).eval()


# ------------------------------------------------------------------------------------------ sentences

def test_plural_rules_and_irregulars():
    assert [plural(w) for w in ("star", "cross", "box", "dish", "berry", "toy", "traffic light")] == \
        ["stars", "crosses", "boxes", "dishes", "berries", "toys", "traffic lights"]
    assert plural("person", {"person": "people"}) == "people"
    assert plural("五角星") == "五角星"


def test_label_sets_are_deterministic_and_within_bounds():
    a = sample_label_sets(SHAPES, 200, max_labels=3, seed=4)
    assert a == sample_label_sets(SHAPES, 200, max_labels=3, seed=4)
    assert a != sample_label_sets(SHAPES, 200, max_labels=3, seed=5)
    sizes = [len(s) for s in a]
    assert min(sizes) == 1 and max(sizes) == 3 and all(len(set(s)) == len(s) for s in a)
    with pytest.raises(ValueError, match="min_labels"):
        sample_label_sets(SHAPES, 3, max_labels=2, min_labels=3)


def test_template_sentences_name_exactly_their_labels():
    sets = sample_label_sets(SHAPES, 300, max_labels=4, seed=1)
    gen = TemplateSentenceGenerator(adjective_groups=[["small", "large"], ["red", "blue"]], count_prob=0.5, seed=2)
    sentences = gen.generate(sets)
    assert sentences == gen.generate(sets) and len(sentences) == 300
    assert any("crosses" in s for s in sentences) and any(" large " in s for s in sentences)
    y = extract_labels(sentences, SHAPES)
    expected = torch.zeros(300, 8)
    for i, s in enumerate(sets):
        for name in s:
            expected[i, SHAPES.index(name)] = 1
    assert torch.equal(y, expected)


def test_label_extraction_plurals_synonyms_and_word_boundaries():
    names = ["star", "dog", "hot dog", "person"]
    sentences = ["Two Stars above a starfish.", "a superstar and a dogma", "a hot dog", "hot dogs and a dog",
                 "three people and a man", "人和五角星", "a star-shaped cookie"]
    y = extract_labels(sentences, names, synonyms={"person": ["man", "woman"]}, plurals={"person": "people"})
    assert y.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1],
                          [0, 0, 0, 0], [1, 0, 0, 0]]
    assert extract_labels(["a star"], names, use_plurals=False).tolist() == [[1, 0, 0, 0]]
    assert extract_labels(["two stars"], names, use_plurals=False).tolist() == [[0, 0, 0, 0]]
    assert extract_labels(["人和五角星"], ["五角星", "心形"]).tolist() == [[1, 0]]
    with pytest.raises(ValueError, match="unknown label"):
        extract_labels(["x"], names, synonyms={"cat": ["kitty"]})


def _tiny_gpt2(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a red star and a blue circle.", "write one short sentence that describes a photo showing"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=fast.vocab_size, n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_lm_generator_batches_prompts_and_parses_continuations(tmp_path):
    lm = _tiny_gpt2(tmp_path / "gpt2")
    sets = [["star"], ["circle", "heart", "cross"], ["square", "star"]]
    batched = LMSentenceGenerator(lm, batch_size=2, max_new_tokens=6, do_sample=False)
    assert batched.prompt(["star", "hexagon"]).startswith("Write one short sentence") and \
        "a star and a hexagon" in batched.prompt(["star", "hexagon"])
    out = batched.generate(sets)
    assert len(out) == 3 and all(isinstance(s, str) for s in out)
    # Left padding must not change greedy continuations: batched == one prompt at a time.
    single = LMSentenceGenerator(lm, batch_size=1, max_new_tokens=6, do_sample=False)
    assert single.generate(sets) == out
    sampled = LMSentenceGenerator(lm, batch_size=3, max_new_tokens=5, seed=1)
    assert sampled.generate(sets) == sampled.generate(sets)          # seeded sampling repeats
    assert LMSentenceGenerator.parse("\n  \"A red star sits here. And more\"\nnext") == "A red star sits here."
    assert LMSentenceGenerator.parse(" no end mark\nsecond") == "no end mark"
    assert LMSentenceGenerator.parse("\n \n") == ""
    with pytest.raises(FileNotFoundError, match="local"):
        LMSentenceGenerator(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ embeddings and training

def test_embedding_cache_is_reused_and_keyed_by_weights_and_sentences(tiny_clip, tmp_path):
    calls = []
    orig = tiny_clip.encode_text

    def counting(ids, *a, **kw):
        calls.append(len(ids))
        return orig(ids, *a, **kw)

    tiny_clip.encode_text = counting
    try:
        texts = ["a red star.", "a picture of a blue circle and a heart."]
        first = cached_text_embeddings(tiny_clip, texts, tmp_path)
        n_calls = len(calls)
        again = cached_text_embeddings(tiny_clip, texts, tmp_path)
        assert n_calls > 0 and len(calls) == n_calls and torch.equal(first, again)
        assert len(list(tmp_path.glob("text_embeds_*.safetensors"))) == 1
        assert not list(tmp_path.glob(".*tmp"))
        cached_text_embeddings(tiny_clip, texts[::-1], tmp_path)          # other sentences: new entry
        assert len(calls) > n_calls and len(list(tmp_path.glob("*.safetensors"))) == 2
        direct = F.normalize(orig(tiny_clip.tokenizer(texts)), dim=-1)
        assert torch.allclose(first, direct, atol=1e-5)
        p = next(tiny_clip.text.parameters())
        with torch.no_grad():
            p.view(-1)[0] += 1.0                                            # other weights: new entry
        n = len(calls)
        cached_text_embeddings(tiny_clip, texts, tmp_path)
        assert len(calls) > n and len(list(tmp_path.glob("*.safetensors"))) == 3
        with torch.no_grad():
            p.view(-1)[0] -= 1.0
    finally:
        del tiny_clip.encode_text


def _synthetic(n, seed, w):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, w.shape[0], generator=g) < 0.3).float()
    y[y.sum(1) == 0, 0] = 1
    x = F.normalize(y @ w + 0.3 * torch.randn(n, w.shape[1], generator=g), dim=-1)
    return x, y


class _SyntheticTextAsImage(TextAsImageMethod):
    """text_as_image's own dataset, collate, task, checkpoints and saving, over synthetic embeddings."""
    data = None                                   # (embeddings, targets, label embeddings), set by the test

    def build_tokenizer(self, out_dir):
        return None

    def build_model(self, tokenizer):
        return torch.nn.Identity()                # stands in for the frozen encoder; never called

    def training_embeddings(self, model):
        return self.data[0], self.data[1]

    def label_embeds(self, model):
        return self.data[2]

    def final_model(self, task):
        return task.adapter                       # no frozen encoder to save with it: the adapter alone


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _train(tmp_path, name, classes, method="text_as_image", **sections) -> Path:
    """Train a text_as_image recipe through run_recipe; returns its out_dir."""
    from polymodal.train.run import load_recipe, run_recipe
    base = {"method": method, "out_dir": str(tmp_path / name),
            method: {"classes": str(classes), "sigma": 0.05, "cache_dir": str(tmp_path / "cache")},
            "data": {"batch_size": 100},
            "optim": {"lr": 5e-3, "weight_decay": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 0,
                      "schedule": "constant", "clip_grad": 0.0},
            "train": {"steps": 32, "seed": 3, "log_every": 8, "ckpt_every": 0, "progress": False}}
    run_recipe(load_recipe(None, [], base=_merge(base, sections)))
    return tmp_path / name


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A `tai_synthetic` method (table entry made here) on 400 train / 200 test embeddings of 6 labels."""
    from polymodal.methods import METHODS
    torch.manual_seed(0)
    w = F.normalize(torch.randn(6, 24), dim=-1)
    x, y = _synthetic(400, 1, w)
    xt, yt = _synthetic(200, 2, w)
    label_embeds = F.normalize(w + 0.8 * torch.randn(6, 24), dim=-1)       # a poor starting classifier
    monkeypatch.setitem(METHODS, "tai_synthetic", _SyntheticTextAsImage)
    monkeypatch.setattr(_SyntheticTextAsImage, "data", (x, y, label_embeds))
    classes = tmp_path / "labels.txt"
    classes.write_text("\n".join(f"l{i}" for i in range(6)) + "\n")
    return {"classes": classes, "test": (xt, yt), "label_embeds": label_embeds}


def test_trainer_trains_the_adapter_deterministically_and_it_learns(tmp_path, synthetic):
    from polymodal.eval.multilabel import average_precision
    run = lambda name, **kw: load_adapter(_train(tmp_path, name, synthetic["classes"], "tai_synthetic", **kw) / "model")
    torch.manual_seed(123)
    a = run("a")
    torch.manual_seed(456)
    b = run("b")                                                           # the caller's RNG state does not matter
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.embed_dim == 24 and a.label_names == [f"l{i}" for i in range(6)]
    c = run("c", train={"seed": 4})
    assert not torch.equal(a.mlp[0].weight, c.mlp[0].weight)
    xt, yt = synthetic["test"]
    before = average_precision(xt @ synthetic["label_embeds"].T, yt)["mAP"]
    with torch.no_grad():
        after = average_precision(a(xt), yt)["mAP"]
    assert after > before + 10
    rank = run("rank", tai_synthetic={"loss": "ranking"})
    with torch.no_grad():
        assert average_precision(rank(xt), yt)["mAP"] > before + 10


def test_resume_after_stop_gives_the_uninterrupted_adapter_bit_exactly(tmp_path, synthetic):
    xs, ys, w = _SyntheticTextAsImage.data
    _SyntheticTextAsImage.data = (xs[:250], ys[:250], w)                   # 2 batches per epoch: resume mid-epoch
    common = dict(tai_synthetic={"sigma": 0.1}, train={"steps": 9, "ckpt_every": 2})
    full = load_adapter(_train(tmp_path, "full", synthetic["classes"], "tai_synthetic", **common) / "model")
    cut = tmp_path / "cut"
    _train(tmp_path, "cut", synthetic["classes"], "tai_synthetic", **_merge(common, {"train": {"stop_after": 5}}))
    assert not (cut / "model").exists() and (cut / "checkpoints" / "step_00000005.pt").is_file()
    ckpt = torch.load(cut / "checkpoints" / "step_00000005.pt", weights_only=False)
    assert all(k.startswith("adapter.") for k in ckpt["task"])            # only the adapter is checkpointed
    _train(tmp_path, "cut", synthetic["classes"], "tai_synthetic", **common)
    resumed = load_adapter(cut / "model")
    assert any('"resumed"' in line for line in (cut / "metrics.jsonl").read_text().splitlines())
    assert all(torch.equal(p, q) for p, q in zip(full.state_dict().values(), resumed.state_dict().values()))
    # The noise is on (sigma = 0 trains another adapter), so the bit-exact match above covers it.
    assert not torch.equal(full.mlp[0].weight, load_adapter(
        _train(tmp_path, "nonoise", synthetic["classes"], "tai_synthetic",
               **_merge(common, {"tai_synthetic": {"sigma": 0.0}})) / "model").mlp[0].weight)


def test_recipe_trains_from_sentences_through_the_cache_and_evaluates(shapes, tiny_clip, tmp_path):
    tiny_clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "labels.txt").write_text("\n".join(SHAPES) + "\n")
    sections = dict(model={"path": str(tmp_path / "clip")},
                    text_as_image={"sigma": 0.1, "prompts": ["a {}."], "sentences": {"num": 64, "max_labels": 3}},
                    data={"batch_size": 32}, train={"steps": 4, "ckpt_every": 2},
                    eval={"tasks": [{"task": "multilabel", "data": str(shapes / "test.jsonl"),
                                     "classes": str(shapes / "classes.json")}]})
    out = _train(tmp_path, "a", tmp_path / "labels.txt", **sections)
    a = load_model(out / "model").adapter
    assert a.config.embed_dim == 32 and a.label_names == SHAPES and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    # The cached embeddings are those of the sentences the config describes, by the frozen text tower.
    sentences = generate_sentences(SentenceConfig(num=64, max_labels=3), SHAPES, seed=0)
    emb = cached_text_embeddings(load_model(tmp_path / "clip"), sentences, tmp_path / "cache")   # a hit: no new file
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1 and emb.shape == (64, 32)
    # The frozen encoder is neither optimised nor checkpointed; the classifier starts from its prompts.
    ckpt = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=False)
    assert set(ckpt["task"]) == {f"adapter.{k}" for k in a.state_dict()}
    assert sum(len(g["params"]) for g in ckpt["optimizer"]["param_groups"]) == 4          # the MLP's 2 layers
    assert torch.allclose(a.label_embeds, label_embeddings(tiny_clip, SHAPES, ["a {}."]), atol=1e-5)
    final = json.loads((out / "final_metrics.json").read_text())
    # The saved model is the frozen encoder with the adapter: `polymodal eval` on it gives training's numbers.
    saved = load_model(out / "model")
    direct = multilabel_eval_manifest(saved, shapes / "test.jsonl", shapes / "classes.json", adapter=saved.adapter)
    assert final["eval/multilabel/mAP"] == pytest.approx(direct["mAP"], abs=1e-4)
    assert torch.equal(saved.base.visual.patch_embed.weight, tiny_clip.visual.patch_embed.weight)
    b = load_model(_train(tmp_path, "b", tmp_path / "labels.txt", **sections) / "model").adapter
    assert torch.equal(a.mlp[0].weight, b.mlp[0].weight)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_recipe_errors_name_the_key(tmp_path):
    from polymodal.config import ConfigError
    from polymodal.train.run import load_recipe
    base = {"method": "text_as_image", "model": {"path": "x"}}
    with pytest.raises(ConfigError, match="text_as_image.classes"):
        load_recipe(None, [], base=base)
    with pytest.raises(ConfigError, match="sigmaa"):
        load_recipe(None, [], base={**base, "text_as_image": {"classes": "c.json", "sigmaa": 0.1}})
    with pytest.raises(ConfigError, match="text_as_image.loss"):
        load_recipe(None, [], base={**base, "text_as_image": {"classes": "c.json", "loss": "bce"}})
    with pytest.raises(ConfigError, match="sentences.templates"):
        load_recipe(None, [], base={**base, "text_as_image": {"classes": "c.json", "sentences": {"templates": ["x"]}}})
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].adapter"):
        load_recipe(None, [], base={**base, "text_as_image": {"classes": "c.json"},
                                    "eval": {"tasks": [{"task": "multilabel", "data": "t.jsonl", "adapter": "a"}]}})
    cfg = load_recipe(ROOT / "recipes" / "text_as_image.yaml")
    assert cfg.text_as_image.sentences.num == 5000 and cfg.model.path


# ------------------------------------------------------------------------------------------ evaluation

def _sk_map(scores, targets):
    from sklearn.metrics import average_precision_score
    aps = [average_precision_score(targets[:, c], scores[:, c]) for c in range(targets.shape[1]) if targets[:, c].any()]
    return 100 * sum(aps) / len(aps)


def test_multilabel_eval_matches_sklearn_zero_shot_and_with_adapter(shapes, tiny_clip, tmp_path):
    from polymodal.data.images import load_image
    recs = [json.loads(l) for l in (shapes / "test.jsonl").read_text().splitlines()]
    targets = torch.tensor([[float(s in r["labels"]) for s in SHAPES] for r in recs])
    with torch.no_grad():
        pixels = torch.stack([tiny_clip.image_transform(load_image(shapes / r["image"])) for r in recs])
        img = F.normalize(tiny_clip.encode_image(pixels), dim=-1)
        templates = ["a {}.", "a picture of a {}."]
        w = torch.stack([F.normalize(F.normalize(tiny_clip.encode_text(tiny_clip.tokenizer([t.format(s) for t in templates])),
                                                 dim=-1).mean(0), dim=0) for s in SHAPES])
    zs = multilabel_eval_manifest(tiny_clip, shapes / "test.jsonl", shapes / "classes.json", templates=templates)
    assert zs["num_images"] == 40 and zs["num_labels"] == 8
    assert zs["mAP"] == pytest.approx(_sk_map((img @ w.T).numpy(), targets.numpy()), abs=1e-3)
    # Labels given as indices and classes given as a text file give the same result.
    idx = shapes / "test_idx.jsonl"
    idx.write_text("".join(json.dumps({**r, "labels": [SHAPES.index(s) for s in r["labels"]]}) + "\n" for r in recs))
    (tmp_path / "labels.txt").write_text("\n".join(SHAPES) + "\n")
    again = multilabel_eval_manifest(tiny_clip, idx, tmp_path / "labels.txt", templates=templates, limit=30)
    assert again["num_images"] == 30
    assert again["mAP"] == pytest.approx(_sk_map((img @ w.T)[:30].numpy(), targets[:30].numpy()), abs=1e-3)
    # An adapter (saved folder) scores images with its logits.
    torch.manual_seed(1)
    from polymodal.models.multilabel import MultiLabelAdapter
    ad = MultiLabelAdapter(AdapterConfig(embed_dim=32, zero_init=False), w, SHAPES).eval()
    save_adapter(ad, tmp_path / "ad")
    res = multilabel_eval_manifest(tiny_clip, shapes / "test.jsonl", shapes / "classes.json", adapter=tmp_path / "ad")
    with torch.no_grad():
        assert res["mAP"] == pytest.approx(_sk_map(ad(img).numpy(), targets.numpy()), abs=1e-3)
    bad = shapes / "test_bad.jsonl"
    bad.write_text(json.dumps({**recs[0], "labels": ["octagon"]}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: label 'octagon'"):
        multilabel_eval_manifest(tiny_clip, bad, shapes / "classes.json")


def test_label_names_from_classes_json_and_languages(shapes):
    names, prompts = load_label_names(shapes / "classes.json")
    assert names == SHAPES and prompts == SHAPES
    names, prompts = load_label_names(shapes / "classes.json", "zh")
    assert names == SHAPES and prompts[4] == "五角星"
    with pytest.raises(KeyError, match="shapes_fr"):
        load_label_names(shapes / "classes.json", "fr")


def test_modality_gap_against_direct_formulas():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(50, 8) + 2.0, dim=-1)
    txt = F.normalize(torch.randn(50, 8) - 1.0, dim=-1)
    g = modality_gap(img, txt)
    assert g["centroid_distance"] == pytest.approx(float((img.mean(0) - txt.mean(0)).norm()), abs=1e-6)
    assert g["matched_cosine"] == pytest.approx(float(torch.diag(img @ txt.T).mean()), abs=1e-6)
    assert g["mean_pair_cosine"] == pytest.approx(float((img @ txt.T).mean()), abs=1e-6)
    same = modality_gap(img, img)
    assert same["centroid_distance"] == pytest.approx(0.0, abs=1e-9) and same["matched_cosine"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ experiment

def test_tiny_experiment_writes_a_full_table(tmp_path, load_benchmark):
    bench = load_benchmark("text_as_image")
    sigmas = ["0", "0.02", "0.1"]
    res = bench.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "res"), "--n-train", "160",
                      "--n-val", "30", "--n-test", "40", "--clip-config", "tiny", "--steps", "6",
                      "--batch-size", "32", "--vocab-size", "300", "--sentences", "200", "--epochs", "2",
                      "--seeds", "1", "--sigmas", *sigmas, "--quiet"])
    rows = res["rows"]
    assert [r["sigma"] for r in rows] == [None, 0.0, 0.02, 0.1]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("val_mAP", "test_mAP", "text_mAP"))
    assert res["chosen_sigma_on_val"] == max(rows[1:], key=lambda r: r["val_mAP"])["sigma"]
    assert all(math.isfinite(v) for v in res["modality_gap"]["scene"].values())
    md = (tmp_path / "res.md").read_text()
    assert md.count("| adapter") == 3 and "zero-shot prompts" in md
    saved = json.loads((tmp_path / "res.json").read_text())      # numbers at 12 significant digits
    assert [r.keys() for r in saved["rows"]] == [r.keys() for r in rows]
    for got, want in zip(saved["rows"], rows):
        assert got == {k: v if v is None or isinstance(v, str) else pytest.approx(v, rel=1e-11) for k, v in want.items()}


def test_cli_eval_multilabel_task(shapes, tiny_clip, tmp_path):
    from polymodal.cli import main
    tiny_clip.save_pretrained(tmp_path / "m")
    out = tmp_path / "ml.json"
    main(["eval", str(tmp_path / "m"), "--task", "multilabel", "--data", str(shapes / "test.jsonl"), "--out", str(out)])
    got = json.loads(out.read_text())
    direct = multilabel_eval_manifest(tiny_clip, shapes / "test.jsonl", shapes / "classes.json")
    assert got["num_labels"] == 8 and got["mAP"] == pytest.approx(direct["mAP"], abs=1e-4)
