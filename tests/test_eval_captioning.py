"""BLEU and CIDEr-D against values worked out by hand."""

import math

import pytest

from polymodal.eval.captioning import bleu, caption_metrics, cider_d, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A man's T-shirt, isn't it?") == ["a", "man", "s", "t", "shirt", "isn", "t", "it"]
    assert tokenize("  Two\tdogs.\n") == ["two", "dogs"]


def test_identical_caption_gives_bleu_one():
    got = caption_metrics({1: "A dog runs on the grass."}, {1: ["a dog runs on the grass"]})
    for n in range(1, 5):
        assert got[f"BLEU-{n}"] == pytest.approx(1.0)
    # One image: log(#images) = 0, so every CIDEr-D weight is 0.
    assert got["CIDEr-D"] == 0.0


def test_clipping_the_the_the():
    # "the" appears 3 times but at most once in the reference: p1 = 1/3.
    # No bigram matches ("the the" x2 vs "the cat"): BLEU-2.. = 0. C = 3 > R = 2: no penalty.
    assert bleu([["the", "the", "the"]], [[["the", "cat"]]]) == pytest.approx([1 / 3, 0.0, 0.0, 0.0])


def test_brevity_penalty_uses_closest_reference_length():
    cand = "a cat sat".split()
    # Reference lengths 6 and 4; closest to C = 3 is 4, so BP = exp(1 - 4/3).
    # All candidate 1-, 2-, 3-grams match; there is no 4-gram in the candidate -> BLEU-4 = 0.
    got = bleu([cand], [["a cat sat on the mat".split(), "a cat sat down".split()]])
    bp = math.exp(1 - 4 / 3)
    assert got == pytest.approx([bp, bp, bp, 0.0])
    # Lengths 2 and 4 are equally close to 3: the shorter (2) is taken, so no penalty.
    assert bleu([cand], [["a cat".split(), "a cat sat down".split()]])[0] == pytest.approx(1.0)


def test_bleu_is_pooled_over_the_corpus():
    # Unigrams: (2 + 1) / (2 + 2) = 3/4; bigrams: (1 + 0) / (1 + 1) = 1/2; lengths equal.
    # Corpus BLEU-2 = sqrt(3/8), not the mean of sentence scores (1 + 0) / 2.
    got = caption_metrics({"x": "a b", "y": "c d"}, {"x": ["a b"], "y": ["c e"]})
    assert got["BLEU-1"] == pytest.approx(0.75)
    assert got["BLEU-2"] == pytest.approx(math.sqrt(3 / 8))


def test_cider_d_two_images_by_hand():
    # Image A refs ["a cat", "a dog"], candidate "a cat"; image B ref ["a bird"], candidate "a small bird".
    # #images = 2, L = log 2. df: "a" = 2 -> weight L - log 2 = 0; every other n-gram df <= 1 -> weight L.
    # A vs "a cat": unigrams {a:0, cat:L} both, cos 1; bigram {a cat:L} both, cos 1; no 3/4-grams -> 0.
    #   A vs "a dog": nothing in common with weight > 0 -> 0. Same bigram count, no penalty.
    #   score_A = 10 * (1 + 1 + 0 + 0) / 4 / 2 refs = 2.5
    # B: candidate unigrams {a:0, small:L, bird:L} (norm L*sqrt2), reference {a:0, bird:L} (norm L):
    #   cos_1 = L*L / (L*sqrt2 * L) = 1/sqrt2; bigrams share nothing; 3-gram norm of the ref is 0.
    #   Bigram counts 2 vs 1 -> penalty exp(-1/72). score_B = 10 * exp(-1/72) / sqrt2 / 4
    score, per_image = cider_d([["a", "cat"], ["a", "small", "bird"]],
                               [[["a", "cat"], ["a", "dog"]], [["a", "bird"]]])
    score_b = 10 * math.exp(-1 / 72) / math.sqrt(2) / 4
    assert per_image == pytest.approx([2.5, score_b])
    assert score == pytest.approx((2.5 + score_b) / 2)


def test_cider_d_clips_candidate_counts():
    # A: candidate "cat cat" vs ref "a cat". Unigram vectors: cand {cat: 2L}, ref {a: 0, cat: L}.
    #   Clipped dot = min(2L, L) * L = L^2; norms 2L and L -> 1/2 (unclipped it would be 1).
    #   Bigrams share nothing; bigram counts 1 and 1 -> no penalty. score_A = 10 * 0.5 / 4 = 1.25
    # B: "a dog" vs "a dog": 10 * (1 + 1) / 4 = 5.
    got = caption_metrics({"A": "cat cat", "B": "a dog"}, {"A": ["a cat"], "B": ["a dog"]})
    assert got["CIDEr-D"] == pytest.approx((1.25 + 5.0) / 2)


def test_mismatched_ids_and_bad_entries_raise():
    with pytest.raises(ValueError, match=r"1 id\(s\) without a candidate \(e\.g\. \['2'\]\)"):
        caption_metrics({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match="non-empty list of strings"):
        caption_metrics({1: "a"}, {1: "a"})
    with pytest.raises(ValueError, match="must be one string"):
        caption_metrics({1: ["a"]}, {1: ["a"]})
