"""SHE-Net's, Mug's and SNP-S3's in-batch MIL-NCE losses over the global batch under DDP, and SNP-S3's MoCo queue
filled from every rank: two gloo ranks against one process on the whole batch.

Rank r holds rows [r*B, (r+1)*B) of every feature; the ranks' node counts and text lengths differ (rank 1 has
one node of each kind and one token fewer), so the gathers must pad. After backward the parameter gradients
are averaged over ranks, as DDP does. float64 keeps the comparison tight.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from polymodal.losses.matching import KeyQueue
from polymodal.methods.m2raap import mug_block_loss
from polymodal.methods.shenet import shenet_loss
from polymodal.methods.snps3 import clip_contrast_losses
from polymodal.models.hierarchy import HierarchyConfig, TextFeatures, VideoFeatures, hierarchical_infonce, \
    hierarchical_similarity
from polymodal.models.video_heads import mug_loss, mug_similarity
from polymodal.train import distributed as train_dist

W, B, E, T, P, K, L = 2, 3, 4, 3, 2, 3, 4
MUG_TAU, MUG_TEMPERATURE = 5.0, 0.1
SNPS3_TEMPERATURE = 0.3
CFG = HierarchyConfig(verb_weight=0.7, noun_weight=1.1, adj_weight=0.5, tau=0.2, noun_frames="verb")
TIMEOUT_S = 90


class FeatureNet(nn.Module):
    """Features of every field from fixed inputs through learnable maps (so gradients can be compared)."""

    def __init__(self):
        super().__init__()
        self.maps = nn.ModuleDict({k: nn.Linear(E, E) for k in ("sentence", "verb", "noun", "adj", "video",
                                                                 "frames", "patches", "tokens")})
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

    def clip_inputs(self, data: dict, rows: slice) -> tuple:
        """(clips, valid, text, words) for SNP-S3's MIL-NCE losses: frames as clips, tokens as words."""
        f = lambda k, x: F.normalize(self.maps[k](x), dim=-1)
        return (f("frames", data["frames"][rows]), data["frame_valid"][rows], f("sentence", data["sentence"][rows]),
                self.maps["tokens"](data["tokens"][rows]))

    def mug_inputs(self, data: dict, rows: slice, length: int) -> tuple:
        """(tokens, mask, frames, valid) for the Mug head."""
        tokens = F.normalize(self.maps["tokens"](data["tokens"][rows, :length]), dim=-1)
        frames = F.normalize(self.maps["frames"](data["frames"][rows]), dim=-1)
        return tokens, data["token_mask"][rows, :length], frames, data["frame_valid"][rows]


def _setup():
    g = torch.Generator().manual_seed(0)
    n = W * B
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    data = {"sentence": r(n, E), "verb": r(n, K, E), "noun": r(n, K, E), "adj": r(n, K, E), "video": r(n, E),
            "frames": r(n, T, E), "patches": r(n, T, P, E), "tokens": r(n, L, E)}
    mask = torch.ones(n, L, dtype=torch.bool)
    mask[0, 2:] = False                                   # a short text on rank 0
    mask[B:, L - 1] = False                               # rank 1's texts are one token shorter
    data["token_mask"] = mask
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


def _rank_mean_grads(named_parameters) -> dict:
    """Each parameter's gradient averaged over the ranks, as DDP does (zeros where a rank has none)."""
    grads = {}
    for name, p in named_parameters:
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        grads[name] = g / W
    return grads


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
            results[gather] = {"loss": loss.detach(), "grads": _rank_mean_grads(net.named_parameters()),
                               "levels": levels}
            net.zero_grad(set_to_none=True)
            inputs = net.mug_inputs(data, slice(rank * B, (rank + 1) * B), L if rank == 0 else L - 1)
            mug = mug_block_loss(*inputs, MUG_TAU, MUG_TEMPERATURE, gather)
            mug.backward()
            results[f"mug/{gather}"] = {"loss": mug.detach(),
                                        "grads": _rank_mean_grads(net.maps["tokens"].named_parameters(prefix="maps.tokens"))}
        for gather in ("global_with_grad", "local"):
            net.zero_grad(set_to_none=True)
            clips, valid, text, words = net.clip_inputs(data, slice(rank * B, (rank + 1) * B))
            losses = clip_contrast_losses(clips, valid, SNPS3_TEMPERATURE, text, words, gather)
            sum(losses.values()).backward()
            results[f"snps3/{gather}"] = {"losses": {k: v.detach() for k, v in losses.items()},
                                          "grads": _rank_mean_grads(net.named_parameters())}
        queue = KeyQueue(8, E).double()
        queue.enqueue_from_all_ranks(torch.full((B, E), float(rank + 1), dtype=torch.float64))
        results["queue"] = {"keys": queue.keys.clone(), "ptr": queue.ptr.clone(), "filled": queue.filled.clone()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        train_dist.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, spawn_ranks):
    tmp = tmp_path_factory.mktemp("shenet_w2")
    return spawn_ranks(_worker, (tmp / "init", str(tmp)), W, tmp, TIMEOUT_S)


def _reference(loss_fn, mug: bool = False):
    state, data = _setup()
    net = FeatureNet().double()
    net.load_state_dict(state)
    loss = loss_fn(*net.mug_inputs(data, slice(0, W * B), L)) if mug else loss_fn(*net(data, slice(0, W * B), K))
    loss.backward()
    return loss.detach(), {n: p.grad.detach() for n, p in net.named_parameters() if p.grad is not None}


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


def test_mug_global_batch_loss_and_grads_equal_one_process_on_the_whole_batch(ranks):
    def whole(tokens, mask, frames, valid):
        return mug_loss(mug_similarity(tokens, mask, frames, valid, tau=MUG_TAU), MUG_TEMPERATURE)
    want_loss, want_grads = _reference(whole, mug=True)
    torch.testing.assert_close(torch.stack([r["mug/global_with_grad"]["loss"] for r in ranks]).mean(), want_loss)
    for r in ranks:
        for name, g in r["mug/global_with_grad"]["grads"].items():
            torch.testing.assert_close(g, want_grads[name], msg=name)


def test_mug_local_gather_is_the_mean_of_per_rank_losses(ranks):
    def per_rank(tokens, mask, frames, valid):
        parts = [slice(k * B, (k + 1) * B) for k in range(W)]
        return sum(mug_loss(mug_similarity(tokens[p], mask[p], frames[p], valid[p], tau=MUG_TAU), MUG_TEMPERATURE)
                   for p in parts) / W
    want_loss, _ = _reference(per_rank, mug=True)
    torch.testing.assert_close(torch.stack([r["mug/local"]["loss"] for r in ranks]).mean(), want_loss)


def test_block_infonce_in_one_process_is_the_symmetric_infonce():
    from polymodal.losses.contrastive import block_infonce
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(5)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(block_infonce(logits, logits, 0), want)


def test_moco_queue_holds_every_ranks_keys_in_rank_order(ranks):
    for r in ranks:
        q = r["queue"]
        assert int(q["filled"]) == W * B and int(q["ptr"]) == W * B
        want = torch.cat([torch.full((B, E), float(k + 1), dtype=torch.float64) for k in range(W)])
        torch.testing.assert_close(q["keys"][:W * B], want)


def _snps3_reference(parts):
    """SNP-S3's level-1 and LVWM MIL-NCE of one process: on the whole batch, or averaged over `parts`."""
    state, data = _setup()
    net = FeatureNet().double()
    net.load_state_dict(state)

    def part_losses(rows: slice) -> dict:
        clips, valid, text, words = net.clip_inputs(data, rows)
        return clip_contrast_losses(clips, valid, SNPS3_TEMPERATURE, text, words, gather="local")

    per_part = [part_losses(p) for p in parts]
    losses = {k: sum(d[k] for d in per_part) / len(parts) for k in per_part[0]}
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()},
            {n: p.grad.detach() for n, p in net.named_parameters() if p.grad is not None})


def test_snps3_mil_nce_global_batch_losses_and_grads_equal_one_process_on_the_whole_batch(ranks):
    want_losses, want_grads = _snps3_reference([slice(0, W * B)])
    assert set(want_losses) == {"level1", "lvwm"}
    for name, want in want_losses.items():
        got = torch.stack([r["snps3/global_with_grad"]["losses"][name] for r in ranks]).mean()
        torch.testing.assert_close(got, want, msg=name)
    for r in ranks:
        for name, g in want_grads.items():
            torch.testing.assert_close(r["snps3/global_with_grad"]["grads"][name], g, msg=name)


def test_snps3_mil_nce_local_gather_is_the_mean_of_per_rank_losses(ranks):
    want_losses, want_grads = _snps3_reference([slice(k * B, (k + 1) * B) for k in range(W)])
    for name, want in want_losses.items():
        torch.testing.assert_close(torch.stack([r["snps3/local"]["losses"][name] for r in ranks]).mean(), want)
    for name, g in want_grads.items():
        torch.testing.assert_close(ranks[0]["snps3/local"]["grads"][name], g, msg=name)


def test_mil_nce_blocks_in_one_process_is_mil_nce():
    from polymodal.losses.matching import mil_nce, mil_nce_blocks
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 4, 3, generator=g)
    valid = torch.rand(4, 3, generator=g) > 0.3
    valid[:, 0] = True
    torch.testing.assert_close(mil_nce_blocks(scores, scores, 0, valid, valid), mil_nce(scores, valid))
    # the blocks of rows 2..3 of the square scores give those pairs' share of the loss
    half = mil_nce_blocks(scores[2:], scores[:, 2:], 2, valid, valid[2:])
    torch.testing.assert_close((mil_nce_blocks(scores[:2], scores[:, :2], 0, valid, valid[:2]) + half) / 2,
                               mil_nce(scores, valid))
