"""Multi-process exactness tests: the gathered losses against single-process references.

Each world (W=2, W=4) is started once with torch.multiprocessing + gloo (file:// rendezvous)
and runs every case; workers write their results to files that the tests compare with
references computed here, in one process, on the concatenated batch.

Model: two nn.Linear(8, 4) projections (image, text) plus a learnable log logit scale and
bias, identical on every rank; rank r gets rows [r*B, (r+1)*B). After backward, parameter
gradients are averaged over ranks (all_reduce SUM / W), as DDP does. All in float64 so the
comparisons are tight.
"""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polymodal.losses.contrastive import LossConfig, build_contrastive_loss, clip_loss, siglip_loss
from polymodal import distributed as pdist
from polymodal.train import distributed as train_dist

B, D_IN, D_OUT = 3, 8, 4
TIMEOUT_S = 90


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Linear(D_IN, D_OUT)
        self.txt = nn.Linear(D_IN, D_OUT)
        self.log_scale = nn.Parameter(torch.tensor(1.5))
        self.bias = nn.Parameter(torch.tensor(-1.0))

    def forward(self, x_img, x_txt):
        return F.normalize(self.img(x_img), dim=-1), F.normalize(self.txt(x_txt), dim=-1), self.log_scale.exp()


# (name, loss, kwargs)
CASES_W2 = [
    ("global_with_grad/local", "clip", dict(gather="global_with_grad", local_loss=True)),
    ("global_with_grad/full", "clip", dict(gather="global_with_grad", local_loss=False)),
    ("global/local", "clip", dict(gather="global", local_loss=True)),
    ("global/full", "clip", dict(gather="global", local_loss=False)),
    ("siglip/global_with_grad", "siglip", dict(gather="global_with_grad")),
]
CASES_W4 = [
    ("global_with_grad/local", "clip", dict(gather="global_with_grad", local_loss=True)),
    ("grouped4", "clip", dict(gather="grouped", local_loss=True, group_size=4)),
    ("grouped-1", "clip", dict(gather="grouped", local_loss=True, group_size=-1)),
    ("grouped2", "clip", dict(gather="grouped", local_loss=True, group_size=2)),
    ("grouped2/full", "clip", dict(gather="grouped", local_loss=False, group_size=2)),
    ("grouped1", "clip", dict(gather="grouped", local_loss=True, group_size=1)),
    ("siglip/grouped2", "siglip", dict(gather="grouped", group_size=2)),
    # The same through the recipe wiring every task holds (`loss:` section -> build_contrastive_loss).
    ("objective/siglip/grouped2", "objective", dict(kind="siglip", gather="grouped", group_size=2)),
]


def _setup(world):
    torch.manual_seed(0)
    model = Tiny().double()
    x_img = torch.randn(world * B, D_IN, dtype=torch.float64)
    x_txt = torch.randn(world * B, D_IN, dtype=torch.float64)
    return model.state_dict(), x_img, x_txt


def _worker(rank, world, init_file, out_dir, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state, x_img, x_txt = _setup(world)
        shard = slice(rank * B, (rank + 1) * B)
        model = Tiny().double()
        results = {}
        for name, kind, kwargs in cases:
            model.load_state_dict(state)
            model.zero_grad(set_to_none=True)
            img, txt, scale = model(x_img[shard], x_txt[shard])
            with pdist.count_collective_bytes() as counted:
                if kind == "clip":
                    loss = clip_loss(img, txt, scale, **kwargs)
                elif kind == "objective":
                    objective = build_contrastive_loss(LossConfig(**kwargs))
                    objective.logit_bias = model.bias        # share the bias so its gradient is compared too
                    loss = objective(img, txt, scale)
                else:
                    loss = siglip_loss(img, txt, scale, model.bias, **kwargs)
                loss.backward()
            grads = {}
            for pname, p in model.named_parameters():
                g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                dist.all_reduce(g, op=dist.ReduceOp.SUM)  # DDP: sum then divide by W
                grads[pname] = g / world
            results[name] = {"loss": loss.detach(), "grads": grads, "bytes": counted.bytes_received}
        if world == 4:
            try:
                pdist.make_contiguous_groups(3)
                results["bad_group"] = ""
            except ValueError as err:
                results["bad_group"] = str(err)
            group, rank_in_group, ranks = pdist.make_contiguous_groups(2)
            results["group2"] = [rank_in_group, ranks, pdist.make_contiguous_groups(2)[0] is group]
            results["gathered"] = pdist.all_gather_with_grad(torch.tensor([float(rank)]), group)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        train_dist.cleanup()


@pytest.fixture(scope="module")
def w2(tmp_path_factory, spawn_ranks):
    tmp = tmp_path_factory.mktemp("w2")
    return spawn_ranks(_worker, (2, tmp / "init", str(tmp), CASES_W2), 2, tmp, TIMEOUT_S)


@pytest.fixture(scope="module")
def w4(tmp_path_factory, spawn_ranks):
    tmp = tmp_path_factory.mktemp("w4")
    return spawn_ranks(_worker, (4, tmp / "init", str(tmp), CASES_W4), 4, tmp, TIMEOUT_S)


# ----------------------------------------------------------------- single-process references


def _plain_clip(img, txt, scale):
    """CLIP loss on one batch, written independently of polymodal: full logits, both directions."""
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _plain_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    signs = 2 * torch.eye(len(img), dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(img)


def _reference(world, loss_of_features):
    """Loss and gradients of `loss_of_features(img, txt, scale, bias)` on the whole batch."""
    state, x_img, x_txt = _setup(world)
    model = Tiny().double()
    model.load_state_dict(state)
    img, txt, scale = model(x_img, x_txt)
    loss = loss_of_features(img, txt, scale, model.bias)
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach() for n, p in model.named_parameters()}
    return loss.detach(), grads


def _mean_over_blocks(block, plain):
    """Mean over consecutive row blocks of size `block` of the plain loss on each block."""

    def fn(img, txt, scale, bias):
        n = len(img) // block
        parts = [slice(k * block, (k + 1) * block) for k in range(n)]
        return sum(plain(img[s], txt[s], scale, bias) for s in parts) / n

    return fn


def _own_rows_only(world, local_loss):
    """What "gather without grad" computes: rank r's loss differentiated only through rank r's
    features (other shards detached), averaged over ranks."""

    def fn(img, txt, scale, bias):
        total = 0.0
        for r in range(world):
            own = torch.zeros(len(img), 1, dtype=torch.bool)
            own[r * B : (r + 1) * B] = True
            img_r, txt_r = torch.where(own, img, img.detach()), torch.where(own, txt, txt.detach())
            if not local_loss:
                total = total + _plain_clip(img_r, txt_r, scale)
            else:
                rows = torch.arange(r * B, (r + 1) * B)
                li = F.cross_entropy(scale * img_r[rows] @ txt_r.T, rows)
                lt = F.cross_entropy(scale * txt_r[rows] @ img_r.T, rows)
                total = total + (li + lt) / 2
        return total / world

    return fn


def _mean_loss(results, name):
    return torch.stack([r[name]["loss"] for r in results]).mean()


def _assert_grads(results, name, ref_grads, scale_by=1.0, only=None):
    for r in results:  # every rank holds the same averaged gradient
        for pname, g in ref_grads.items():
            if only is None or pname.startswith(only):
                torch.testing.assert_close(r[name]["grads"][pname] * scale_by, g, msg=f"{name}: {pname}")


def _plain4(img, txt, scale, bias):
    return _plain_clip(img, txt, scale)


# ----------------------------------------------------------------- W = 2


@pytest.mark.parametrize("name", ["global_with_grad/local", "global_with_grad/full"])
def test_gather_with_grad_equals_single_process_loss_and_grads(w2, name):
    # The backward all-reduce SUM gives each rank the gradient of every rank's loss w.r.t. its
    # own features; DDP's mean over ranks then yields exactly the global-batch gradient, with
    # no extra loss scaling, for both local_loss settings.
    ref_loss, ref_grads = _reference(2, _plain4)
    torch.testing.assert_close(_mean_loss(w2, name), ref_loss)
    if name.endswith("full"):
        for r in w2:  # full logits: every rank computes the same global loss
            torch.testing.assert_close(r[name]["loss"], ref_loss)
    _assert_grads(w2, name, ref_grads)


@pytest.mark.parametrize("local_loss", [True, False])
def test_gather_without_grad_matches_own_rows_reference(w2, local_loss):
    # Without gradient through the gather, the cross-rank terms of the gradient are lost: the
    # averaged gradient is the mean over ranks of each rank's loss differentiated through its
    # own features only. It does not equal the global gradient (checked below), but the loss does.
    name = "global/local" if local_loss else "global/full"
    ref_loss, _ = _reference(2, _plain4)
    torch.testing.assert_close(_mean_loss(w2, name), ref_loss)
    _, own_grads = _reference(2, _own_rows_only(2, local_loss))
    _assert_grads(w2, name, own_grads)
    _, full_grads = _reference(2, _plain4)
    assert not torch.allclose(w2[0][name]["grads"]["img.weight"], full_grads["img.weight"])


def test_gather_without_grad_full_logits_gives_global_grad_over_world_size(w2):
    # local_loss=False: each rank's loss is the global loss, so the projection gradients are
    # dL/dtheta / W (the logit scale is not gathered and gets the whole dL/dscale).
    _, ref_grads = _reference(2, _plain4)
    _assert_grads(w2, "global/full", ref_grads, scale_by=2.0, only="img.")
    _assert_grads(w2, "global/full", ref_grads, scale_by=2.0, only="txt.")
    _assert_grads(w2, "global/full", ref_grads, only="log_scale")


def test_siglip_gather_with_grad_equals_single_process(w2):
    ref_loss, ref_grads = _reference(2, _plain_siglip)
    torch.testing.assert_close(_mean_loss(w2, "siglip/global_with_grad"), ref_loss)
    _assert_grads(w2, "siglip/global_with_grad", ref_grads)


def test_gathers_count_received_bytes(w2):
    # local loss, W=2: each rank receives the other rank's B x D_OUT image and text rows (float64).
    assert w2[0]["global_with_grad/local"]["bytes"] == (2 - 1) * B * D_OUT * 8 * 2


# ----------------------------------------------------------------- W = 4, grouped


@pytest.mark.parametrize("name", ["grouped4", "grouped-1"])
def test_grouped_with_whole_world_equals_global_with_grad(w4, name):
    ref = "global_with_grad/local"
    for r in w4:
        torch.testing.assert_close(r[name]["loss"], r[ref]["loss"], rtol=0, atol=1e-12)
        for pname, g in r[ref]["grads"].items():
            torch.testing.assert_close(r[name]["grads"][pname], g, rtol=0, atol=1e-12)
    ref_loss, ref_grads = _reference(4, _plain4)
    torch.testing.assert_close(_mean_loss(w4, name), ref_loss)
    _assert_grads(w4, name, ref_grads)


@pytest.mark.parametrize("name", ["grouped2", "grouped2/full"])
def test_grouped_two_groups_equals_mean_of_group_losses(w4, name):
    ref_loss, ref_grads = _reference(4, _mean_over_blocks(2 * B, _plain4))
    torch.testing.assert_close(_mean_loss(w4, name), ref_loss)
    _assert_grads(w4, name, ref_grads)
    # Sanity: this is a different objective from the global one.
    _, global_grads = _reference(4, _plain4)
    assert not torch.allclose(w4[0][name]["grads"]["img.weight"], global_grads["img.weight"])


def test_grouped_size_one_equals_mean_of_per_rank_losses(w4):
    ref_loss, ref_grads = _reference(4, _mean_over_blocks(B, _plain4))
    torch.testing.assert_close(_mean_loss(w4, "grouped1"), ref_loss)
    _assert_grads(w4, "grouped1", ref_grads)
    assert all(r["grouped1"]["bytes"] == 0 for r in w4)  # no communication at all


def test_siglip_grouped_equals_mean_of_group_losses(w4):
    ref_loss, ref_grads = _reference(4, _mean_over_blocks(2 * B, _plain_siglip))
    torch.testing.assert_close(_mean_loss(w4, "siglip/grouped2"), ref_loss)
    _assert_grads(w4, "siglip/grouped2", ref_grads)


def test_recipe_siglip_grouped_wiring_equals_mean_of_group_losses(w4):
    # Before the loss owned its wiring, the SigLIP branch dropped `group_size` and gathered over all 4 ranks.
    ref_loss, ref_grads = _reference(4, _mean_over_blocks(2 * B, _plain_siglip))
    torch.testing.assert_close(_mean_loss(w4, "objective/siglip/grouped2"), ref_loss)
    _assert_grads(w4, "objective/siglip/grouped2", ref_grads)


def test_grouped_bytes_follow_group_size(w4):
    per_rank = B * D_OUT * 8 * 2  # one rank's image + text rows in float64
    assert w4[0]["grouped2"]["bytes"] == (2 - 1) * per_rank
    assert w4[0]["grouped4"]["bytes"] == (4 - 1) * per_rank


def test_contiguous_groups_layout_cache_and_errors(w4):
    for r, res in enumerate(w4):
        assert "positive divisor of the world size 4" in res["bad_group"]
        rank_in_group, ranks, cached = res["group2"]
        assert rank_in_group == r % 2 and ranks == [r - r % 2, r - r % 2 + 1] and cached
        start = r - r % 2
        assert res["gathered"].tolist() == [float(start), float(start + 1)]
