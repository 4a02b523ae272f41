"""Order-pair accuracy (polymodal.eval.order): hand-counted examples, the tie rule, and what it skips."""
import math

import pytest
import torch

from polymodal.eval.order import order_pair_accuracy, partners

# Videos: pair "a" = 0, 1; pair "b" = 2, 3; video 4 outside any pair; video 5 alone under pair id "c".
PAIR_IDS = ["a", "a", "b", "b", None, "c"]
OWNER = [0, 1, 2, 3, 4, 5, 0]          # text 6 is a second caption of video 0


def hand_scores() -> torch.Tensor:
    s = torch.zeros(7, 6)
    s[0, 0], s[0, 1] = 0.9, 0.5          # own above partner: right
    s[1, 1], s[1, 0] = 0.6, 0.3          # right
    s[2, 2], s[2, 3] = 0.4, 0.4 + 5e-6   # within 1e-5: a tie, half right
    s[3, 3], s[3, 2] = 0.7, 0.2          # right
    s[4, 4] = 1.0                        # no partner: not judged
    s[5, 5] = 1.0                        # pair id held by one video: not judged
    s[6, 0], s[6, 1] = 0.1, 0.1 + 2e-5   # partner higher by more than the tolerance: wrong
    return s


def test_partners_pairs_only_ids_held_by_exactly_two_videos():
    assert partners(PAIR_IDS + ["d", "d", "d"]).tolist() == [1, 0, 3, 2, -1, -1, -1, -1, -1]


def test_hand_counted_example_with_a_tie_counted_half():
    got = order_pair_accuracy(hand_scores(), OWNER, PAIR_IDS)
    # judged texts 0, 1, 2, 3, 6: right 1 + 1 + 0.5 + 1 + 0 = 3.5 of 5
    assert got == {"pair_accuracy": pytest.approx(70.0), "pair_ties": pytest.approx(20.0), "pairs": 2, "texts": 5}


def test_zero_tolerance_turns_the_near_tie_into_a_miss_and_exact_ties_stay_half():
    s = hand_scores()
    assert order_pair_accuracy(s, OWNER, PAIR_IDS, tie_tolerance=0.0)["pair_accuracy"] == pytest.approx(60.0)
    s[3, 3] = s[3, 2] = 0.7                                   # an exact tie: 1 + 1 + 0 + 0.5 + 0 of 5
    got = order_pair_accuracy(s, OWNER, PAIR_IDS, tie_tolerance=0.0)
    assert got["pair_accuracy"] == pytest.approx(50.0) and got["pair_ties"] == pytest.approx(20.0)


def test_mean_pooling_of_reversed_frames_scores_exactly_chance():
    """An order-blind model: each pair's second video is the first one's frames reversed, mean-pooled, so the
    two embeddings differ only by float summation order; every text ties and the accuracy is 50%."""
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(3, 8, 16, generator=g)                              # (pairs, T, D)
    vid = torch.stack([frames.mean(1), frames.flip(1).mean(1)], 1).reshape(6, 16)   # (V, D): 0/1, 2/3, 4/5
    vid = torch.nn.functional.normalize(vid, dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    got = order_pair_accuracy(txt @ vid.T, list(range(6)), [0, 0, 1, 1, 2, 2])
    assert got == {"pair_accuracy": 50.0, "pair_ties": 100.0, "pairs": 3, "texts": 6}


def test_no_text_with_a_partner_gives_nan():
    got = order_pair_accuracy(torch.ones(2, 2), [0, 1], [None, "x"])
    assert math.isnan(got["pair_accuracy"]) and got["texts"] == 0 and got["pairs"] == 0


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="one video index per text"):
        order_pair_accuracy(torch.ones(3, 2), [0, 1], ["a", "a"])
    with pytest.raises(ValueError, match="one per video"):
        order_pair_accuracy(torch.ones(2, 2), [0, 1], ["a"])
