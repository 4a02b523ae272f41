"""Zero-shot classifier and accuracy, with a tiny fake model (no polymodal.models import)."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.eval.zeroshot import accuracy, build_classifier, load_templates, zeroshot_eval


class FakeModel(nn.Module):
    """Each distinct prompt string gets its own random (unnormalised) embedding row."""

    def __init__(self, width=8, image_pixels=3 * 4 * 4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Embedding(100, width)
        self.image_proj = nn.Linear(image_pixels, width)
        self.dropout = nn.Dropout(0.5)
        self.vocab: dict[str, int] = {}
        self.tokenizer_calls: list[int] = []

    def tokenizer(self, texts):
        self.tokenizer_calls.append(len(texts))
        return torch.tensor([[self.vocab.setdefault(t, len(self.vocab)), 0] for t in texts])

    def encode_text(self, ids, normalize=True):
        x = self.dropout(self.table(ids[:, 0]))       # dropout must be off in eval
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixels, normalize=True):
        x = self.image_proj(pixels.flatten(1))
        return F.normalize(x, dim=-1) if normalize else x


def test_bundled_templates_load_and_have_one_slot():
    en, zh = load_templates("en"), load_templates("zh")
    assert 10 <= len(en) <= 20 and len(zh) == len(en)
    assert "a photo of a {}." in en and "一张{}的照片。" in zh
    assert all(t.count("{}") == 1 for t in en + zh)


def test_template_file_errors_name_the_file_and_entry(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(["a {} photo", "no slot"]))
    with pytest.raises(ValueError, match=r"t\.json: entry 1 \('no slot'\)"):
        load_templates(path)
    with pytest.raises(FileNotFoundError, match="not a bundled language"):
        load_templates("xx")
    path.write_text(json.dumps(["a {} photo", "{} of a {}"]))
    with pytest.raises(ValueError, match="entry 1"):
        load_templates(str(path))


def test_classifier_is_normalised_mean_of_normalised_prompt_embeddings():
    model = FakeModel()
    model.train()
    classes, templates = ["cat", "dog", "car"], ["a {}.", "the {}!", "one {}"]
    clf = build_classifier(model, classes, templates, batch_size=4)
    assert clf.shape == (3, 8)
    assert model.tokenizer_calls == [4, 4, 1]          # 9 prompts in batches of 4
    assert model.training                               # the caller's mode is restored
    table = model.table.weight.detach()
    for c, name in enumerate(classes):
        rows = torch.stack([table[model.vocab[t.format(name)]] for t in templates])
        rows = rows / rows.norm(dim=1, keepdim=True)
        want = rows.mean(0) / rows.mean(0).norm()
        torch.testing.assert_close(clf[c], want)


def test_accuracy_hand_cases():
    logits = torch.tensor([[0.1, 0.5, 0.4],     # target 2 -> rank 2
                           [0.9, 0.05, 0.05],   # target 0 -> rank 1
                           [0.2, 0.3, 0.5]])    # target 0 -> rank 3
    got = accuracy(logits, [2, 0, 0], ks=(1, 2, 5))
    assert got["top1"] == pytest.approx(100 / 3)
    assert got["top2"] == pytest.approx(200 / 3)
    assert "top5" not in got                    # k >= C = 3 would read 100 by construction: left out
    assert set(accuracy(logits, [2, 0, 0])) == {"top1"}


def test_accuracy_ties():
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    assert accuracy(logits, [1], ks=(1, 2))["top1"] == 0.0     # pessimistic: class 0 ties ahead
    assert accuracy(logits, [1], ks=(1, 2))["top2"] == 100.0
    assert accuracy(logits, [1], ks=(1,), ties="optimistic")["top1"] == 100.0
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        accuracy(logits, [3])


def test_zeroshot_eval_on_embeddings_and_pixels():
    model = FakeModel()
    classes = ["cat", "dog", "car", "bus"]
    clf = build_classifier(model, classes, ["a {}.", "the {}"])
    targets = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    embeds = clf[targets] + 0.05 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    assert zeroshot_eval(model, embeds, targets, classes, ["a {}.", "the {}"]) == {"top1": 100.0}   # 4 classes: no top5
    wrong = (targets + 1) % 4
    assert zeroshot_eval(model, embeds, wrong, classes, ["a {}.", "the {}"], ks=(1,))["top1"] == 0.0
    # Pixels: same answer as scoring the model's image embeddings by hand.
    pixels = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(10) % 4
    img = model.encode_image(pixels).detach()
    want = accuracy(img @ build_classifier(model, classes, "en").T, labels, ks=(1, 2))
    assert zeroshot_eval(model, pixels, labels, classes, "en", batch_size=3, ks=(1, 2)) == want


def test_json_numbers_are_written_without_last_bit_noise(tmp_path):
    import json

    from polymodal.cli import dumps_strict
    from polymodal.eval.report import write_json
    assert json.loads(dumps_strict({"x": 0.1 + 0.2, "y": 7.000000000000001, "z": 1 / 3})) == \
        {"x": 0.3, "y": 7.0, "z": 0.333333333333}
    write_json(tmp_path / "m.json", {"y": 7.000000000000001})
    assert (tmp_path / "m.json").read_text().strip() == '{\n  "y": 7.0\n}'
