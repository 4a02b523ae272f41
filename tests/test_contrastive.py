"""Single-process tests of the contrastive losses and the distributed helpers' fallbacks."""

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.losses.contrastive import GATHER_MODES, ContrastiveLoss, SigLipLoss, clip_loss, siglip_loss
from polymodal import distributed as pdist
from polymodal.train import distributed as train_dist


def _features(b=5, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _direct_clip(img, txt, scale):
    """InfoNCE written out row by row with an explicit log-softmax."""
    b = len(img)
    total = 0.0
    for i in range(b):
        row = [scale * float(img[i] @ txt[j]) for j in range(b)]  # image i against every text
        col = [scale * float(txt[i] @ img[j]) for j in range(b)]  # text i against every image
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * b)


def _direct_siglip(img, txt, scale, bias):
    b = len(img)
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = scale * float(img[i] @ txt[j]) + bias
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / b


def test_clip_loss_matches_direct_computation():
    img, txt = _features()
    scale = torch.tensor(10.0)
    loss = clip_loss(img, txt, scale)
    assert loss.item() == pytest.approx(_direct_clip(img, txt, 10.0), rel=1e-5)


def test_clip_loss_is_symmetric_in_image_and_text():
    img, txt = _features(seed=1)
    scale = torch.tensor(7.0)
    torch.testing.assert_close(clip_loss(img, txt, scale), clip_loss(txt, img, scale))


def test_clip_loss_is_low_for_matching_pairs_and_high_for_shuffled():
    img, _ = _features(b=6, seed=2)
    scale = torch.tensor(50.0)
    assert clip_loss(img, img, scale) < 0.01
    assert clip_loss(img, img.roll(1, 0), scale) > 1.0


@pytest.mark.parametrize("gather", GATHER_MODES)
@pytest.mark.parametrize("local_loss", [False, True])
def test_every_gather_mode_is_the_plain_loss_in_one_process(gather, local_loss):
    img, txt = _features(seed=3)
    scale = torch.tensor(5.0)
    expected = _direct_clip(img, txt, 5.0)
    assert clip_loss(img, txt, scale, gather=gather, local_loss=local_loss).item() == pytest.approx(expected, rel=1e-5)
    module = ContrastiveLoss(gather=gather, local_loss=local_loss)
    assert module(img, txt, scale).item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_gradcheck():
    img, txt = _features(b=3, d=4, seed=4, dtype=torch.float64)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, t, s: clip_loss(a, t, s), (img, txt, scale))
    assert torch.autograd.gradcheck(lambda a, t, s: clip_loss(a, t, s, local_loss=True), (img, txt, scale))


def test_siglip_loss_matches_direct_formula():
    img, txt = _features(seed=5)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    expected = _direct_siglip(img, txt, 10.0, -3.0)
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(expected, rel=1e-5)
    assert SigLipLoss()(img, txt, scale, bias).item() == pytest.approx(expected, rel=1e-5)
    for gather in GATHER_MODES:
        assert siglip_loss(img, txt, scale, bias, gather=gather).item() == pytest.approx(expected, rel=1e-5)


def test_siglip_loss_gradcheck():
    img, txt = _features(b=3, d=4, seed=6, dtype=torch.float64)
    args = (
        img.requires_grad_(True),
        txt.requires_grad_(True),
        torch.tensor(2.0, dtype=torch.float64, requires_grad=True),
        torch.tensor(-1.0, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(siglip_loss, args)


def test_shape_mismatch_raises_clear_error():
    img, txt = _features(b=4)
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(img, txt[:3], torch.tensor(1.0))
    with pytest.raises(ValueError, match="2-D"):
        clip_loss(img[0], txt[0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="same shape"):
        siglip_loss(img, txt[:, :4], torch.tensor(1.0), torch.tensor(0.0))


def test_unknown_gather_mode_raises():
    img, txt = _features()
    with pytest.raises(ValueError, match="unknown gather mode 'ring'"):
        clip_loss(img, txt, torch.tensor(1.0), gather="ring")
    with pytest.raises(ValueError, match="unknown gather mode"):
        ContrastiveLoss(gather="all")
    with pytest.raises(ValueError, match="unknown gather mode"):
        SigLipLoss(gather="all")


def test_non_scalar_scale_raises():
    img, txt = _features()
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        clip_loss(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        siglip_loss(img, txt, torch.tensor(1.0), torch.zeros(3))


def test_grouped_with_impossible_group_size_raises_in_one_process():
    img, txt = _features()
    with pytest.raises(ValueError, match="positive divisor of the world size 1"):
        clip_loss(img, txt, torch.tensor(1.0), gather="grouped", group_size=2)


def test_distributed_helpers_fall_back_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not pdist.is_dist()
    assert (pdist.rank(), pdist.world_size(), pdist.local_world_size()) == (0, 1, 4)
    info = train_dist.init_distributed()
    assert not info.distributed and info.rank == 0 and info.backend is None
    x = torch.randn(3, 2)
    assert pdist.all_gather_with_grad(x) is x and pdist.all_gather_no_grad(x) is x
    torch.testing.assert_close(pdist.all_reduce_mean(x), x)
    assert pdist.make_contiguous_groups(-1) == (None, 0, [0])
    assert pdist.group_size_from_nodes(2) == 8
    assert pdist.group_size_from_nodes(-1) == 1
    with pytest.raises(ValueError, match="aggregate_nodes"):
        pdist.group_size_from_nodes(0)
    with pdist.count_collective_bytes() as counted:
        clip_loss(x, x, torch.tensor(1.0), gather="global_with_grad")
    assert counted.bytes_received == 0 and counted.calls == 0


def test_bad_environment_values_are_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        train_dist.init_distributed()
