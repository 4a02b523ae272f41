"""SNP-S3's MoCo queues under DDP: every rank's clip keys and their video ids are gathered before the enqueue,
padding clips left out after the gather, so all ranks hold the same keys and owners (two gloo ranks)."""
import torch
import torch.distributed as dist

from polymodal.losses.matching import KeyQueue
from polymodal.train import distributed as train_dist

W, B, E = 2, 3, 4


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    try:
        queue = KeyQueue(16, E).double()
        keys = torch.full((B, E), float(rank + 1), dtype=torch.float64) + torch.arange(B)[:, None]
        owners = torch.arange(B) + 10 * rank                    # rank r's videos: 10r, 10r+1, 10r+2
        keep = torch.tensor([True, rank == 0, True])           # rank 1's second clip is padding
        queue.enqueue_from_all_ranks(keys, owners, keep=keep)
        torch.save({"keys": queue.keys.clone(), "owner": queue.owner.clone(), "filled": queue.filled.clone()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        train_dist.cleanup()


def test_moco_queue_gathers_keys_and_owners_of_every_rank_and_drops_padding(tmp_path, spawn_ranks):
    ranks = spawn_ranks(_worker, (tmp_path / "init", str(tmp_path)), W, tmp_path, 90)
    want_owner = [0, 1, 2, 10, 12]
    want_keys = torch.tensor([[1.0] * E, [2.0] * E, [3.0] * E, [2.0] * E, [4.0] * E], dtype=torch.float64)
    for r in ranks:
        assert int(r["filled"]) == 5 and r["owner"][:5].tolist() == want_owner
        torch.testing.assert_close(r["keys"][:5], want_keys)
