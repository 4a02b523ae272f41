"""The Trainer: exact resume, divergence handling, checkpoints, schedule, DDP equivalence."""
import json
import math
import os
import socket

import pytest
import torch
from torch import nn

from polymodal.train.checkpoint import list_checkpoints
from polymodal.train.loop import OptimConfig, TrainConfig, Trainer, TrainingDiverged, param_groups
from polymodal.train.schedule import lr_at


class NoisyRegression(nn.Module):
    """A task with dropout, so an exact resume also needs the RNG state."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, batch):
        loss = ((self.net(batch["x"]) - batch["y"]) ** 2).mean()
        return {"loss": loss, "mse": loss.detach()}


def make_loader(epoch, skip):
    g = torch.Generator().manual_seed(100 + epoch)
    x = torch.randn(6 * 8, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    batches = [{"x": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, len(x), 8)]
    return batches[skip:]


def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


def run(tmp, steps=20, stop_after=0, task=None, lr=1e-2, **kw):
    cfg = TrainConfig(steps=steps, log_every=1, ckpt_every=5, keep_last=2, stop_after=stop_after, progress=False, **kw)
    trainer = Trainer(task or NoisyRegression(), make_loader, OptimConfig(lr=lr, warmup_steps=3), cfg, tmp)
    trainer.fit()
    return trainer


def test_resume_equals_uninterrupted_run(tmp_path):
    run(tmp_path / "a", steps=20)
    first = run(tmp_path / "b", steps=20, stop_after=7)     # "killed" after step 7 (checkpoint at 7)
    assert first.state.step == 7
    run(tmp_path / "b", steps=20)                           # resumes from the checkpoint
    a, b = losses(tmp_path / "a" / "metrics.jsonl"), losses(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == len(b) == 20
    assert a == b                                           # bit-identical on CPU


def test_resume_without_checkpoint_of_the_last_steps_repeats_them(tmp_path):
    # Stop at 7 with checkpoints only every 5 steps; delete the step-7 checkpoint: the run redoes 6 and 7.
    run(tmp_path / "b", steps=20, stop_after=7)
    for step, path in list_checkpoints(tmp_path / "b" / "checkpoints"):
        if step == 7:
            path.unlink()
    run(tmp_path / "b", steps=20)
    run(tmp_path / "a", steps=20)
    assert losses(tmp_path / "a" / "metrics.jsonl") == losses(tmp_path / "b" / "metrics.jsonl")


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run(tmp_path, steps=20)
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == [15, 20]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_nan_loss_stops_with_message_and_keeps_good_checkpoint(tmp_path):
    class Explodes(NoisyRegression):
        calls = 0

        def forward(self, batch):
            Explodes.calls += 1
            out = super().forward(batch)
            if Explodes.calls > 12:
                out["loss"] = out["loss"] * float("nan")
            return out

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 13.*step_00000010\.pt"):
        run(tmp_path, steps=20, task=Explodes())
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [5, 10]


def test_cosine_schedule_with_warmup():
    assert lr_at(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, 0, "linear")


def test_no_weight_decay_on_biases_norms_embeddings():
    from polymodal.models.clip import CLIP
    from polymodal.models.factory import build_config
    model = CLIP(build_config("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "text.token_embed.weight" not in decayed and "visual.pos" not in decayed
    assert "logit_scale" not in decayed and not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert "visual.transformer.blocks.0.attn.qkv.weight" in decayed
    assert no_decay["weight_decay"] == 0.0


def test_gradient_accumulation_equals_big_batch(tmp_path):
    """2 micro-batches of 4 with accum_steps=2 give the same update as batches of 8 (no dropout)."""
    class Plain(NoisyRegression):
        def __init__(self):
            super().__init__()
            self.net[1].p = 0.0

    def loader_small(epoch, skip):
        return [{k: v[h * 4:(h + 1) * 4] for k, v in b.items()} for b in make_loader(epoch, 0) for h in (0, 1)][skip:]

    cfg = TrainConfig(steps=5, log_every=1, ckpt_every=0, progress=False)
    big = Trainer(Plain(), make_loader, OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=0), cfg, tmp_path / "a")
    big.fit()
    acc = Trainer(Plain(), loader_small, OptimConfig(lr=1e-2, warmup_steps=0, clip_grad=0, accum_steps=2), cfg,
                  tmp_path / "b")
    acc.fit()
    for p, q in zip(big.task.parameters(), acc.task.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


# --- DDP: two gloo processes with half batches match one process with the full batch -------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clip_task():
    from polymodal.methods.clip import ContrastiveTask, LossConfig
    from polymodal.models.clip import CLIP
    from polymodal.models.factory import build_config
    torch.manual_seed(0)
    model = CLIP(build_config("tiny"))
    return ContrastiveTask(model, LossConfig(gather="global_with_grad", local_loss=True))


def _clip_batches(epoch, world_size=1, rank=0):
    g = torch.Generator().manual_seed(7 + epoch)
    pixels = torch.randn(4 * 8, 3, 32, 32, generator=g)
    ids = torch.randint(1, 900, (4 * 8, 12), generator=g)
    ids[:, -1] = 999
    out = []
    for i in range(0, 32, 8):                 # global batch 8; rank r takes rows r, r+W, ...
        sl = slice(i + rank, i + 8, world_size)
        out.append({"pixels": pixels[sl], "input_ids": ids[sl]})
    return out


def _ddp_worker(rank, world_size, port, out_dir, batches, steps):
    """One DDP rank training `_clip_task` on `batches(epoch, world_size, rank)` (a module-level function)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    trainer = Trainer(_clip_task(), lambda e, s: batches(e, world_size, rank)[s:],
                      OptimConfig(lr=1e-3, warmup_steps=0), TrainConfig(steps=steps, log_every=1, ckpt_every=0,
                                                                          progress=False), out_dir)
    trainer.fit()
    if rank == 0:
        torch.save({k: v.detach() for k, v in trainer.task.state_dict().items()}, os.path.join(out_dir, "final.pt"))
    from ranks import done
    done(out_dir, rank)
    from polymodal.train.distributed import cleanup
    cleanup()                                         # waits for every rank before gloo is torn down


def _assert_ddp_matches_single(tmp_path, batches, reference, steps):
    """2 gloo ranks on `batches` give the losses and weights of one process on `reference(epoch, skip)`."""
    from ranks import run_ranks
    run_ranks(_ddp_worker, (2, _free_port(), str(tmp_path / "ddp"), batches, steps), 2, tmp_path / "ddp")
    single = Trainer(_clip_task(), reference, OptimConfig(lr=1e-3, warmup_steps=0),
                     TrainConfig(steps=steps, log_every=1, ckpt_every=0, progress=False), tmp_path / "single")
    single.fit()
    a, b = losses(tmp_path / "single" / "metrics.jsonl"), losses(tmp_path / "ddp" / "metrics.jsonl")
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5)
    ddp_state = torch.load(tmp_path / "ddp" / "final.pt")
    for k, v in single.task.state_dict().items():
        torch.testing.assert_close(v, ddp_state[k], atol=1e-5, rtol=1e-4)


def test_ddp_two_processes_match_single_process(tmp_path):
    _assert_ddp_matches_single(tmp_path, _clip_batches, lambda e, s: _clip_batches(e)[s:], steps=6)


def _ragged_batches(epoch, world_size, rank):
    """Rank batches as the skip policy leaves them: on rank 1 batch 0 lost 2 of its 4 rows, on rank 0
    batch 2 lost all of them."""
    out = []
    for b, batch in enumerate(_clip_batches(epoch, world_size, rank)):
        keep = 4
        if (b, rank) == (0, 1):
            keep = 2
        if (b, rank) == (2, 0):
            keep = 0
        out.append({"pixels": batch["pixels"][:keep], "input_ids": batch["input_ids"][:keep],
                    "index": torch.arange(keep), "bad_reasons": {"unreadable_image": 4 - keep} if keep < 4 else {}})
    return out


def test_ddp_with_skipped_records_cuts_ranks_to_one_size_and_passes_empty_batches(tmp_path):
    """What DDP trains on equals one process trained on the rows every rank kept: batch 0 cut to 2 rows per
    rank, batch 2 passed by both ranks (empty on rank 0), batches 1 and 3 whole."""
    def reference(epoch, skip):
        r0, r1 = _clip_batches(epoch, 2, 0), _clip_batches(epoch, 2, 1)
        cat = lambda a, b, n: {k: torch.cat([a[k][:n], b[k][:n]]) for k in ("pixels", "input_ids")}
        return [cat(r0[0], r1[0], 2), cat(r0[1], r1[1], 4), cat(r0[3], r1[3], 4)][skip:]

    _assert_ddp_matches_single(tmp_path, _ragged_batches, reference, steps=3)


def test_bf16_autocast_trains(tmp_path):
    trainer = run(tmp_path, steps=6, precision="bf16", precision_force=True)   # forced: this CPU may emulate bf16
    assert trainer.state.step == 6
    assert all(math.isfinite(x) for x in losses(tmp_path / "metrics.jsonl"))
    with pytest.raises(ValueError, match="precision"):
        Trainer(NoisyRegression(), make_loader, OptimConfig(), TrainConfig(precision="fp16"), tmp_path / "x")


def test_threads_option_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        run(tmp_path, steps=2, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_lr_scale_multiplies_the_learning_rate_of_matching_parameters(tmp_path):
    task = NoisyRegression()
    groups = param_groups(task, 0.1, {"net.2.": 10.0})
    names = {id(p): n for n, p in task.named_parameters()}
    scaled = {names[id(p)] for g in groups if g["lr_scale"] == 10.0 for p in g["params"]}
    assert scaled == {"net.2.weight", "net.2.bias"}
    assert sum(len(g["params"]) for g in groups) == len(list(task.parameters()))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", lr_scale={"net.2.": 10.0}, clip_grad=0)
    trainer = Trainer(task, make_loader, optim, TrainConfig(steps=1, ckpt_every=0, progress=False), tmp_path)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    trainer.fit()
    lrs = sorted({g["lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([1e-2, 1e-1])
    # AdamW's first step moves each weight by about lr (its update is m / sqrt(v) = sign(grad)).
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in task.named_parameters()}
    assert moved["net.2.bias"] == pytest.approx(1e-1, rel=0.05) and moved["net.0.bias"] <= 1.05e-2
    with pytest.raises(Exception, match="optim.lr_scale"):
        OptimConfig(lr_scale={"x": 0}).validate()


class _DyingBatches(list):
    """Rank 1's batches: the process is killed (SIGKILL, as the OOM killer does) when it takes the third one."""

    def __getitem__(self, i):
        return _DyingBatches(list.__getitem__(self, i)) if isinstance(i, slice) else list.__getitem__(self, i)

    def __iter__(self):
        for i, batch in enumerate(list.__iter__(self)):
            if i == 2:
                os.kill(os.getpid(), 9)
            yield batch


def _dying_batches(epoch, world_size, rank):
    batches = _clip_batches(epoch, world_size, rank)
    return _DyingBatches(batches) if rank == 1 else batches


def _dying_worker(rank, world_size, port, out_dir):
    try:
        _ddp_worker(rank, world_size, port, out_dir, _dying_batches, steps=50)
    except Exception as e:       # the surviving rank must fail, not hang: write what it saw
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise


def test_a_killed_ddp_rank_ends_the_job_within_a_bound(tmp_path):
    """No launcher cleans up here: the surviving rank itself must fail (gloo sees the closed peer), not hang."""
    import time

    import torch.multiprocessing as mp
    out = tmp_path / "ddp"
    out.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, 2, port, str(out))) for r in range(2)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    elapsed = time.monotonic() - start
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"rank(s) {[procs.index(p) for p in alive]} still running after 120 s"
    assert procs[1].exitcode == -9 and procs[0].exitcode not in (0, None)
    assert (out / "rank0.err").is_file(), "the surviving rank ended without an error"
    assert elapsed < 120


@pytest.mark.slow
def test_compiled_training_matches_eager_within_float_tolerance(tmp_path):
    class Regression(NoisyRegression):          # no dropout: compiled kernels draw random numbers differently
        def __init__(self):
            super().__init__()
            self.net[1].p = 0.0

    eager = run(tmp_path / "eager", steps=6, task=Regression())
    compiled = run(tmp_path / "compiled", steps=6, task=Regression(), compile=True)
    assert compiled.state.step == eager.state.step == 6
    a, b = losses(tmp_path / "eager" / "metrics.jsonl"), losses(tmp_path / "compiled" / "metrics.jsonl")
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
