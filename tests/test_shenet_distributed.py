"""SHE-Net's loss over the global batch under DDP: two gloo ranks against one process on the whole batch.

Rank r holds rows [r*B, (r+1)*B) of every feature; the ranks' node counts differ (rank 1 has one node fewer
of each kind), so the gather must pad. After backward the parameter gradients are averaged over ranks, as DDP
does. float64 keeps the comparison tight.
"""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from polymodal.methods.shenet import shenet_loss
from polymodal.models.hierarchy import HierarchyConfig, TextFeatures, VideoFeatures, hierarchical_infonce, \
    hierarchical_similarity
from polymodal.train import distributed as train_dist

W, B, E, T, P, K = 2, 3, 4, 3, 2, 3
CFG = HierarchyConfig(verb_weight=0.7, noun_weight=1.1, adj_weight=0.5, tau=0.2, noun_frames="verb")
TIMEOUT_S = 90


class FeatureNet(nn.Module):
    """Features of every field from fixed inputs through learnable maps (so gradients can be compared)."""

    def __init__(self):
        super().__init__()
        self.maps = nn.ModuleDict({k: nn.Linear(E, E) for k in ("sentence", "verb", "noun", "adj", "video",
                                                                 "frames", "patches")})
        self.log_scale = nn.Parameter(torch.tensor(1.2))

    def forward(self, data: dict, rows: slice, keep: int) -> tuple[TextFeatures, VideoFeatures, torch.Tensor]:
        f = lambda k, x: F.normalize(self.maps[k](x), dim=-1)
        nodes = {k: f(k, data[k][rows, :keep]) for k in ("verb", "noun", "adj")}
        valid = {k: data[f"{k}_valid"][rows, :keep] for k in ("verb", "noun", "adj")}
        heads = {k: data[f"{k}_head"][rows, :keep] for k in ("noun", "adj")}
        text = TextFeatures(f("sentence", data["sentence"][rows]), nodes, valid, heads)
        video = VideoFeatures(f("video", data["video"][rows]), f("frames", data["frames"][rows]),
                              f("patches", data["patches"][rows]), data["frame_valid"][rows])
        return text, video, self.log_scale.exp()


def _setup():
    g = torch.Generator().manual_seed(0)
    n = W * B
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    data = {"sentence": r(n, E), "verb": r(n, K, E), "noun": r(n, K, E), "adj": r(n, K, E), "video": r(n, E),
            "frames": r(n, T, E), "patches": r(n, T, P, E)}
    for k in ("verb", "noun", "adj"):
        valid = torch.rand(n, K, generator=g) > 0.3
        valid[:, 0] = True
        valid[B:, K - 1] = False                          # rank 1 drops its last node: invalid in the reference
        data[f"{k}_valid"] = valid
    data["noun_head"] = torch.randint(-1, K - 1, (n, K), generator=g)       # never the node rank 1 drops
    data["adj_head"] = torch.randint(-1, K - 1, (n, K), generator=g)
    fv = torch.ones(n, T, dtype=torch.bool)
    fv[1, -1] = fv[B + 1, -1] = False                     # padded frames on both ranks
    data["frame_valid"] = fv
    torch.manual_seed(0)
    return FeatureNet().double().state_dict(), data


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        state, data = _setup()
        net = FeatureNet().double()
        results = {}
        for gather in ("global_with_grad", "local"):
            net.load_state_dict(state)
            net.zero_grad(set_to_none=True)
            text, video, scale = net(data, slice(rank * B, (rank + 1) * B), K if rank == 0 else K - 1)
            loss, levels = shenet_loss(text, video, CFG, scale, gather)
            loss.backward()
            grads = {}
            for name, p in net.named_parameters():
                g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                grads[name] = g / W
            results[gather] = {"loss": loss.detach(), "grads": grads, "levels": levels}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        train_dist.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shenet_w2")
    ctx = mp.start_processes(_worker, args=(tmp / "init", str(tmp)), nprocs=W, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(W)]


def _reference(loss_fn):
    state, data = _setup()
    net = FeatureNet().double()
    net.load_state_dict(state)
    text, video, scale = net(data, slice(0, W * B), K)
    loss = loss_fn(text, video, scale)
    loss.backward()
    return loss.detach(), {n: p.grad.detach() for n, p in net.named_parameters()}


def test_global_batch_loss_and_grads_equal_one_process_on_the_whole_batch(ranks):
    want_loss, want_grads = _reference(lambda t, v, s: hierarchical_infonce(hierarchical_similarity(t, v, CFG).total, s))
    got = torch.stack([r["global_with_grad"]["loss"] for r in ranks]).mean()
    torch.testing.assert_close(got, want_loss)
    for r in ranks:
        for name, g in want_grads.items():
            torch.testing.assert_close(r["global_with_grad"]["grads"][name], g, msg=name)


def test_local_gather_is_the_mean_of_per_rank_losses(ranks):
    def per_rank(t, v, s):
        parts = [slice(k * B, (k + 1) * B) for k in range(W)]
        return sum(hierarchical_infonce(hierarchical_similarity(t[p], v[p], CFG).total, s) for p in parts) / W
    want_loss, want_grads = _reference(per_rank)
    torch.testing.assert_close(torch.stack([r["local"]["loss"] for r in ranks]).mean(), want_loss)
    for name, g in want_grads.items():
        torch.testing.assert_close(ranks[0]["local"]["grads"][name], g, msg=name)


def test_matched_pair_levels_are_the_same_in_both_modes(ranks):
    for r in ranks:
        for name, v in r["local"]["levels"].items():
            torch.testing.assert_close(r["global_with_grad"]["levels"][name], v, msg=name)
