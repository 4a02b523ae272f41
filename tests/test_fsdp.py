"""train.strategy=fsdp: FSDP2 over 2 gloo ranks trains like DDP; sharded checkpoints resume exactly, at another world
size, and survive a kill; the final model is a plain folder; block discovery; the memory plan."""
import functools
import json
import math
import os
import socket

import pytest
import torch
from torch import nn

from polymodal.config import ConfigError
from polymodal.train.loop import OptimConfig, TrainConfig, Trainer
from ranks import done, run_ranks
from polymodal.train import sharding


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


def _clip_task(gather="global_with_grad"):
    from polymodal.methods.clip import ContrastiveTask, LossConfig
    from polymodal.models.clip import CLIP
    from polymodal.models.factory import build_config
    torch.manual_seed(0)
    return ContrastiveTask(CLIP(build_config("tiny")), LossConfig(gather=gather, local_loss=True))


def _clip_batches(epoch, world_size=1, rank=0, n=4):
    """`n` global batches of 8 (rank r takes rows r, r+W, ...): the same 8 rows per step at any world size."""
    g = torch.Generator().manual_seed(7 + epoch)
    pixels = torch.randn(n * 8, 3, 32, 32, generator=g)
    ids = torch.randint(1, 900, (n * 8, 12), generator=g)
    ids[:, -1] = 999
    return [{"pixels": pixels[i + rank:i + 8:world_size], "input_ids": ids[i + rank:i + 8:world_size]}
            for i in range(0, n * 8, 8)]


def _worker(rank, world_size, port, out_dir, kw, task_fn=_clip_task):
    """One rank training `task_fn()` on its share of `_clip_batches`; rank 0 saves the full final weights."""
    import faulthandler
    faulthandler.enable()                            # a native abort prints where each thread was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    kw = dict(kw)
    optim = OptimConfig(**{"lr": 1e-3, "warmup_steps": 0, **kw.pop("optim", {})})
    batches = kw.pop("batches", _clip_batches)
    if kw.pop("deferred", False) and rank > 0:          # built on the meta device: rank 0's weights arrive later
        with torch.device("meta"):
            task = task_fn()
    else:
        task = task_fn()
    trainer = Trainer(task, lambda e, s: batches(e, world_size, rank)[s:], optim,
                      TrainConfig(log_every=1, progress=False, **kw), out_dir)
    trainer.fit()
    full = trainer.full_task()                       # every rank: a collective under FSDP
    if rank == 0 and full is not None:
        torch.save({k: v.detach().clone() for k, v in full.state_dict().items()},
                   os.path.join(out_dir, f"final_{trainer.state.step}.pt"))
    del trainer, full, task
    done(out_dir, rank)
    _collect_then_cleanup()


def _collect_then_cleanup():
    """End the process group after the caller dropped its trainer (DDP reducer, FSDP state): freed after
    `destroy_process_group`, as when a worker's locals go at its return, a rank once hung for 10 min in that teardown
    with no Python frame left (and twice aborted with "terminate called without an active exception")."""
    import gc
    gc.collect()
    from polymodal.train.distributed import cleanup
    cleanup()


def _spawn(out_dir, world_size=2, task_fn=_clip_task, **kw):
    if world_size == 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)
        torch.manual_seed(0)
        kw = dict(kw)
        optim = OptimConfig(**{"lr": 1e-3, "warmup_steps": 0, **kw.pop("optim", {})})
        batches = kw.pop("batches", _clip_batches)
        trainer = Trainer(task_fn(), lambda e, s: batches(e)[s:], optim,
                          TrainConfig(log_every=1, progress=False, **kw), out_dir)
        trainer.fit()
        torch.save({k: v.detach().clone() for k, v in trainer.task.state_dict().items()},
                   os.path.join(out_dir, f"final_{trainer.state.step}.pt"))
        return
    run_ranks(_worker, (world_size, _free_port(), str(out_dir), kw, task_fn), world_size, out_dir)


def _assert_close_states(a, b, atol=1e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# --- config --------------------------------------------------------------------------------------------------------

def test_strategy_is_validated_with_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.strategy must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(strategy="zero3").validate()
    with pytest.raises(ConfigError, match=r"train\.fsdp_offload=true needs train\.strategy=fsdp"):
        TrainConfig(fsdp_offload=True).validate()
    with pytest.raises(ConfigError, match=r"train\.activation_checkpointing must be true or false"):
        TrainConfig(activation_checkpointing="yes").validate()


def test_recipe_override_of_strategy_is_refused_in_one_line():
    from polymodal.train.run import load_recipe
    with pytest.raises(ConfigError) as err:
        load_recipe("recipes/clip_shapes.yaml", ["train.strategy=fdsp"])
    assert "train.strategy" in str(err.value) and "\n" not in str(err.value)


# --- block discovery -----------------------------------------------------------------------------------------------

def _families():
    """One tiny model of each family with its expected block count."""
    from polymodal.models.factory import build_config
    from polymodal.models.clip import CLIP
    from polymodal.models.coca import CoCa
    out = {"clip": CLIP(build_config("tiny"))}
    out["coca"] = CoCa(build_config("coca-tiny"))
    return out


def test_shard_units_finds_every_block_of_towers_and_decoders():
    from polymodal.models.layers import Block
    for name, model in _families().items():
        units = sharding.shard_units(model)
        blocks = [m for m in model.modules() if isinstance(m, Block)]
        assert len(units) == len(blocks) > 0, name
        assert {id(u) for u in units} == {id(b) for b in blocks}


def test_shard_units_finds_multiway_and_hf_decoder_layers():
    from polymodal.models.multiway import M2Encoder, MultiwayBlock
    from polymodal.models.factory import build_config
    m2 = M2Encoder(build_config("m2-tiny"))
    units = sharding.shard_units(m2)
    assert len(units) == sum(isinstance(m, MultiwayBlock) for m in m2.modules()) > 0
    lm = _tiny_llama()
    units = sharding.shard_units(lm)
    assert [type(u).__name__ for u in units] == ["LlamaDecoderLayer"] * 2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def test_meta_copy_keeps_ties_and_costs_no_memory():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
    m = Tied()
    c = sharding.meta_copy(m)
    assert c.a.weight.is_meta and c.b.weight is c.a.weight
    sharding.materialize_(c)
    assert not c.a.weight.is_meta and c.b.weight is c.a.weight


# --- memory plan ---------------------------------------------------------------------------------------------------

def test_memory_plan_shards_by_world_size_and_refuses_what_cannot_fit():
    task = _clip_task()
    ddp = sharding.memory_plan(task, "ddp", 4)
    fsdp = sharding.memory_plan(task, "fsdp", 4)
    nbytes = sum(p.numel() * 4 for p in task.parameters())
    assert ddp.params == nbytes and ddp.optimizer == 2 * nbytes
    assert fsdp.optimizer == math.ceil(2 * nbytes / 4) and fsdp.grads == math.ceil(nbytes / 4)
    assert nbytes / 4 < fsdp.params < nbytes / 2            # 1/W plus one gathered block
    with pytest.raises(MemoryError, match=r"set train\.strategy=fsdp"):
        sharding.check_memory_plan(ddp, ddp.total - 1, torch.device("cpu"))
    with pytest.raises(MemoryError, match="more ranks"):
        sharding.check_memory_plan(fsdp, 10, torch.device("cpu"))
    sharding.check_memory_plan(fsdp, fsdp.total, torch.device("cpu"))
    sharding.check_memory_plan(ddp, ddp.total - nbytes, torch.device("cpu"), resident=nbytes)   # already built


def test_trainer_prints_the_plan_and_refuses_a_model_that_cannot_fit(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sharding, "available_memory", lambda device: 1 << 20)      # 1 MiB free besides the model
    with pytest.raises(MemoryError) as err:
        Trainer(_clip_task(), lambda e, s: [], OptimConfig(), TrainConfig(progress=False), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "set train.strategy=fsdp" in message and "per rank" in message
    assert "memory plan per rank (ddp, 1 rank(s))" in capsys.readouterr().out
    monkeypatch.setattr(sharding, "available_memory", lambda device: 1 << 30)
    Trainer(_clip_task(), lambda e, s: [], OptimConfig(), TrainConfig(progress=False), tmp_path)


# --- FSDP equals DDP -----------------------------------------------------------------------------------------------

def test_fsdp_losses_and_weights_equal_ddp_over_steps(tmp_path):
    """2 gloo ranks, CLIP tiny with the exact global gather: FSDP's losses and final weights are DDP's."""
    kw = dict(steps=4, ckpt_every=0, optim={"clip_grad": 1.0})
    _spawn(tmp_path / "ddp", strategy="ddp", **kw)
    _spawn(tmp_path / "fsdp", strategy="fsdp", **kw)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert len(a) == len(b) == 4 and a[0] != a[-1]
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), (a, b)
    _assert_close_states(torch.load(tmp_path / "ddp" / "final_4.pt"), torch.load(tmp_path / "fsdp" / "final_4.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("gather", ["local", "global", "grouped"])
def test_fsdp_leaves_every_gather_mode_unchanged(tmp_path, gather):
    task_fn = functools.partial(_clip_task, gather)
    _spawn(tmp_path / "ddp", task_fn=task_fn, steps=3, ckpt_every=0)
    _spawn(tmp_path / "fsdp", task_fn=task_fn, steps=3, ckpt_every=0, strategy="fsdp")
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


# --- sharded checkpoints -------------------------------------------------------------------------------------------

def _ckpts(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_at_the_same_world_size(tmp_path):
    kw = dict(steps=6, ckpt_every=2, strategy="fsdp", batches=functools.partial(_clip_batches, n=6))
    _spawn(tmp_path / "a", **kw)
    _spawn(tmp_path / "b", stop_after=3, **kw)                 # "killed" after step 3 (checkpoints 2 and 3)
    assert _ckpts(tmp_path / "b") == ["step_00000002.dcp", "step_00000003.dcp"]
    assert not (tmp_path / "b" / "final_6.pt").exists()
    _spawn(tmp_path / "b", **kw)
    a, b = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == len(b) == 6
    assert a == b                                              # bit-identical on CPU
    _assert_close_states(torch.load(tmp_path / "a" / "final_6.pt"), torch.load(tmp_path / "b" / "final_6.pt"),
                         atol=0, rtol=0)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_sharded_checkpoint_resumes_on_another_world_size(tmp_path, before, after):
    """Same global batch at every world size: a run moved between 1 and 2 processes after step 3 continues like
    the run that was not moved (to float tolerance: the reductions add in another order)."""
    kw = dict(steps=5, ckpt_every=3, strategy="fsdp", batches=functools.partial(_clip_batches, n=5))
    _spawn(tmp_path / "a", world_size=before, **kw)
    _spawn(tmp_path / "b", world_size=before, stop_after=3, **kw)
    _spawn(tmp_path / "b", world_size=after, **kw)
    a, b = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(tmp_path / "b" / "metrics.jsonl")
    assert len(a) == len(b) == 5 and a[:3] == b[:3]
    assert b[3:] == pytest.approx(a[3:], rel=1e-5, abs=1e-6)
    _assert_close_states(torch.load(tmp_path / "a" / "final_5.pt"), torch.load(tmp_path / "b" / "final_5.pt"))


@pytest.mark.slow
def test_cut_short_sharded_writes_are_passed_over_and_removed(tmp_path):
    """What a kill -9 (or a lying disk) can leave: the temporary folder of a save that never got its rename, and a
    folder whose .metadata is missing. The resume uses the newest complete checkpoint and ends like the whole run."""
    import shutil
    import warnings
    kw = dict(steps=5, ckpt_every=2, strategy="fsdp", batches=functools.partial(_clip_batches, n=5))
    _spawn(tmp_path / "a", **kw)
    _spawn(tmp_path / "b", stop_after=4, **kw)                 # checkpoints 2 and 4
    ck = tmp_path / "b" / "checkpoints"
    shutil.copytree(ck / "step_00000004.dcp", ck / ".step_00000005.dcp.tmp")   # killed before its rename
    (ck / ".step_00000005.dcp.tmp" / ".metadata").unlink()
    (ck / "step_00000004.dcp" / ".metadata").unlink()                           # torn: resume must use step 2
    with warnings.catch_warnings(record=True):
        _spawn(tmp_path / "b", **kw)
    assert not (ck / ".step_00000005.dcp.tmp").exists()
    a, b = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(tmp_path / "b" / "metrics.jsonl")
    assert a == b
    resumed = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl") if "resumed" in x]
    assert resumed[-1]["step"] == 2


def _final_model_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    trainer = Trainer(_clip_task(), lambda e, s: _clip_batches(e, world_size, rank)[s:],
                      OptimConfig(lr=1e-3, warmup_steps=0),
                      TrainConfig(steps=2, ckpt_every=0, log_every=1, progress=False, strategy="fsdp"), out_dir)
    trainer.fit()
    full = trainer.full_task()
    if rank == 0:
        full.model.save_pretrained(os.path.join(out_dir, "model"))
        g = torch.Generator().manual_seed(3)
        pixels = torch.randn(2, 3, 32, 32, generator=g)
        torch.save({"pixels": pixels, "features": full.model.encode_image(pixels).detach()},
                   os.path.join(out_dir, "probe.pt"))
    del trainer, full
    done(out_dir, rank)
    _collect_then_cleanup()


def test_final_model_of_a_sharded_run_is_a_plain_folder_load_model_reads(tmp_path):
    import polymodal as pm
    run_ranks(_final_model_worker, (2, _free_port(), str(tmp_path)), 2, tmp_path)
    model = pm.load_model(tmp_path / "model")
    probe = torch.load(tmp_path / "probe.pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(probe["pixels"]), probe["features"])
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    untrained = _clip_task().model
    assert not torch.allclose(untrained.encode_image(probe["pixels"]), probe["features"])


# --- an MLLM over a transformers causal LM -------------------------------------------------------------------------

class _MLLMTask(nn.Module):
    """Answer NLL of an MLLM whose LM is a tiny random GPT-2 (tied input/output embeddings) from transformers."""

    def __init__(self):
        super().__init__()
        from polymodal.models.mllm import MLLM, MLLMConfig
        torch.manual_seed(0)
        self.model = MLLM(MLLMConfig(hf_lm={"model_type": "gpt2", "vocab_size": 64, "n_positions": 64, "n_embd": 32,
                                            "n_layer": 2, "n_head": 2, "bos_token_id": 1,
                                            "eos_token_id": 2}))

    def forward(self, batch):
        nll = self.model(batch["pixels"], batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                         batch["answer_mask"]).nll                                          # (B,)
        return {"loss": nll.mean()}


def _mllm_batches(epoch, world_size=1, rank=0, n=4):
    g = torch.Generator().manual_seed(11 + epoch)
    B = n * 8
    pixels = torch.randn(B, 3, 32, 32, generator=g)
    prompt = torch.randint(3, 64, (B, 5), generator=g)
    answer = torch.randint(3, 64, (B, 4), generator=g)
    answer[:, 0], answer[:, -1] = 1, 2                                    # SEP ... EOS
    ones = torch.ones(B, 5, dtype=torch.bool)
    cols = {"pixels": pixels, "prompt_ids": prompt, "prompt_mask": ones, "answer_ids": answer,
            "answer_mask": torch.ones(B, 4, dtype=torch.bool)}
    return [{k: v[i + rank:i + 8:world_size] for k, v in cols.items()} for i in range(0, B, 8)]


@pytest.mark.slow
def test_mllm_over_a_transformers_lm_trains_under_fsdp_like_ddp(tmp_path):
    from polymodal.models.mllm import MLLM
    task = _MLLMTask()
    assert [type(u).__name__ for u in sharding.shard_units(task)].count("GPT2Block") == 2
    kw = dict(steps=4, ckpt_every=0, batches=_mllm_batches, optim={"lr": 3e-3})
    _spawn(tmp_path / "ddp", task_fn=_MLLMTask, **kw)
    _spawn(tmp_path / "fsdp", task_fn=_MLLMTask, strategy="fsdp", **kw)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert b[-1] < b[0]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    final = torch.load(tmp_path / "fsdp" / "final_4.pt")
    _assert_close_states(torch.load(tmp_path / "ddp" / "final_4.pt"), final)
    assert isinstance(task.model, MLLM)


# --- feature-cache accumulation (optim.accum_steps) ----------------------------------------------------------------

def _grads(task):
    return {n: p.grad.detach().clone() for n, p in task.named_parameters() if p.grad is not None}


def test_feature_cache_accumulation_gradient_equals_the_full_batch(tmp_path):
    """4 micro-batches of 2 with accum_steps=4 give the gradient of the contrastive loss over all 8 rows; plain
    accumulation (the mean of 4 small-batch losses) does not."""
    batch = _clip_batches(0)[0]                                              # 8 rows
    full = _clip_task()
    full(batch)["loss"].backward()
    want = _grads(full)
    trainer = Trainer(_clip_task(), lambda e, s: [], OptimConfig(accum_steps=4), TrainConfig(progress=False), tmp_path)
    micro = [{k: v[i:i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    losses = trainer._feature_cache_step(micro)
    got = _grads(trainer.task)
    assert got.keys() == want.keys() and "model.logit_scale" in got
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")   # float sums
    with torch.no_grad():
        assert losses["loss"] == pytest.approx(float(full(batch)["loss"]), rel=1e-6)
    plain = _clip_task()
    for m in micro:
        (plain(m)["loss"] / 4).backward()
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(want)])
    off, exact = (flat(_grads(plain)) - flat(want)).norm(), (flat(got) - flat(want)).norm()
    assert off > 100 * exact, (off, exact)


def test_feature_cache_accumulation_replays_dropout_draws(tmp_path):
    """With patch dropout the recomputed features must be the cached ones: the same RNG draws."""
    from polymodal.methods.clip import ContrastiveTask, LossConfig
    from polymodal.models.clip import CLIP
    from polymodal.models.factory import build_config
    def task():
        torch.manual_seed(0)
        return ContrastiveTask(CLIP(build_config("tiny", {"vision.patch_dropout": 0.5})), LossConfig())
    batch = _clip_batches(0)[0]
    torch.manual_seed(5)
    reference = task()
    torch.manual_seed(5)
    reference(batch)["loss"].backward()           # one draw over the 8 rows differs from 4 draws over 2: compare
    trainer = Trainer(task(), lambda e, s: [], OptimConfig(accum_steps=2), TrainConfig(progress=False), tmp_path)
    micro = [{k: v[i:i + 4] for k, v in batch.items()} for i in (0, 4)]
    torch.manual_seed(5)
    first = trainer._feature_cache_step(micro)["loss"]
    g1 = _grads(trainer.task)
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    second = trainer._feature_cache_step(micro)["loss"]
    assert first == second                        # the step is a pure function of the RNG state it starts from
    for k, v in _grads(trainer.task).items():
        torch.testing.assert_close(v, g1[k], atol=0, rtol=0)


def _accum_batches(epoch, world_size=1, rank=0):
    """The rows of `_clip_batches` per rank, each cut in two micro-batches (same rows, same order per rank)."""
    out = []
    for b in _clip_batches(epoch, world_size, rank):
        half = len(b["pixels"]) // 2
        out += [{k: v[:half] for k, v in b.items()}, {k: v[half:] for k, v in b.items()}]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_feature_cache_accumulation_over_two_ranks_equals_the_full_batch(tmp_path, strategy):
    _spawn(tmp_path / "full", steps=3, ckpt_every=0, strategy=strategy)
    _spawn(tmp_path / "acc", steps=3, ckpt_every=0, strategy=strategy, batches=_accum_batches,
           optim={"accum_steps": 2})
    a, b = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "acc" / "metrics.jsonl")
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    _assert_close_states(torch.load(tmp_path / "full" / "final_3.pt"), torch.load(tmp_path / "acc" / "final_3.pt"))


# --- activation checkpointing --------------------------------------------------------------------------------------

def _m2_task():
    from polymodal.methods.clip import ContrastiveTask, LossConfig
    from polymodal.models.factory import build_config
    from polymodal.models.multiway import M2Encoder
    torch.manual_seed(0)
    return ContrastiveTask(M2Encoder(build_config("m2-tiny")), LossConfig())


def _m2_batch():
    b = _clip_batches(0)[0]
    from polymodal.models.factory import build_config
    cfg = build_config("m2-tiny")
    size = cfg.vision.image_size if hasattr(cfg.vision, "image_size") else 32
    g = torch.Generator().manual_seed(2)
    return {"pixels": torch.randn(4, 3, size, size, generator=g),
            "input_ids": b["input_ids"][:4] % cfg.text.vocab_size}


@pytest.mark.parametrize("family", ["clip", "m2", "mllm_hf"])
def test_activation_checkpointing_gives_the_plain_gradients(tmp_path, family, monkeypatch):
    import torch.utils.checkpoint as ckpt
    make, batch = {"clip": (_clip_task, _clip_batches(0)[0]), "m2": (_m2_task, None),
                   "mllm_hf": (_MLLMTask, _mllm_batches(0)[0])}[family]
    batch = _m2_batch() if family == "m2" else batch
    plain = make().train()
    plain(batch)["loss"].backward()
    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(k.get("use_reentrant")) or real(*a, **k))
    trainer = Trainer(make().train(), lambda e, s: [], OptimConfig(), TrainConfig(progress=False,
                      activation_checkpointing=True), tmp_path)
    trainer.task(batch)["loss"].backward()
    assert calls and set(calls) == {False}                    # every block recomputed, non-reentrant
    want, got = _grads(plain), _grads(trainer.task)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_activation_checkpointing_under_fsdp_equals_ddp(tmp_path):
    _spawn(tmp_path / "ddp", steps=3, ckpt_every=0)
    _spawn(tmp_path / "fsdp", steps=3, ckpt_every=0, strategy="fsdp", activation_checkpointing=True)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    _assert_close_states(torch.load(tmp_path / "ddp" / "final_3.pt"), torch.load(tmp_path / "fsdp" / "final_3.pt"))


# --- other families: CoCa's decoder (SyCoCa), M2's multiway stacks -------------------------------------------------

def _sycoca_task():
    from polymodal.methods.sycoca import SyCoCaConfig, SyCoCaTask
    from polymodal.models.factory import create_model
    torch.manual_seed(0)
    return SyCoCaTask(create_model("coca-tiny"), SyCoCaConfig(decoder_width=32, decoder_heads=2, decoder_layers=1))


def _sycoca_batches(epoch, world_size=1, rank=0, n=3):
    g = torch.Generator().manual_seed(21 + epoch)
    B = n * 8
    ids = torch.randint(1, 990, (B, 8), generator=g)
    ids[:, 0], ids[:, -1] = 998, 999                                     # BOS ... EOS
    pixels = torch.randn(B, 3, 32, 32, generator=g)
    return [{"pixels": pixels[i + rank:i + 8:world_size], "input_ids": ids[i + rank:i + 8:world_size]}
            for i in range(0, B, 8)]


def _m2_task_global():
    from polymodal.methods.clip import ContrastiveTask, LossConfig
    from polymodal.models.factory import build_config
    from polymodal.models.multiway import M2Encoder
    torch.manual_seed(0)
    return ContrastiveTask(M2Encoder(build_config("m2-tiny")), LossConfig(gather="global_with_grad", local_loss=True))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sycoca", "m2"])
def test_other_families_train_under_fsdp_like_ddp(tmp_path, family):
    task_fn, batches = {"sycoca": (_sycoca_task, _sycoca_batches), "m2": (_m2_task_global, _clip_batches)}[family]
    if family == "m2":
        from polymodal.models.factory import build_config
        assert build_config("m2-tiny").vision.image_size == 32
    kw = dict(steps=3, ckpt_every=0, batches=batches, task_fn=task_fn)
    _spawn(tmp_path / "ddp", **kw)
    _spawn(tmp_path / "fsdp", strategy="fsdp", **kw)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5, abs=1e-6)
    _assert_close_states(torch.load(tmp_path / "ddp" / "final_3.pt"), torch.load(tmp_path / "fsdp" / "final_3.pt"))


def _killed_in_save_worker(rank, world_size, port, out_dir, kw):
    """`_worker`, but rank 0 kills itself (SIGKILL) in the save of step 4: every rank's shards are written, the
    rename is not done."""
    import signal
    from polymodal.train import checkpoint
    real = checkpoint._fsync_dir

    def dying(path):
        if rank == 0 and path.name == ".step_00000004.dcp.tmp":
            os.kill(os.getpid(), signal.SIGKILL)
        real(path)
    checkpoint._fsync_dir = dying
    _worker(rank, world_size, port, out_dir, kw)


@pytest.mark.slow
def test_a_kill_9_inside_a_sharded_save_keeps_the_previous_checkpoint(tmp_path):
    import torch.multiprocessing as mp
    kw = dict(steps=6, ckpt_every=2, strategy="fsdp", batches=functools.partial(_clip_batches, n=6))
    _spawn(tmp_path / "a", **kw)
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_killed_in_save_worker, args=(2, _free_port(), str(tmp_path / "b"), kw), nprocs=2, join=True)
    ck = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [".step_00000004.dcp.tmp", "step_00000002.dcp"]
    _spawn(tmp_path / "b", **kw)
    assert not (ck / ".step_00000004.dcp.tmp").exists()
    a, b = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(tmp_path / "b" / "metrics.jsonl")
    assert a == b
    _assert_close_states(torch.load(tmp_path / "a" / "final_6.pt"), torch.load(tmp_path / "b" / "final_6.pt"),
                         atol=0, rtol=0)


@pytest.mark.slow
def test_cpu_offload_trains_like_plain_fsdp(tmp_path):
    _spawn(tmp_path / "plain", steps=3, ckpt_every=0, strategy="fsdp")
    _spawn(tmp_path / "off", steps=3, ckpt_every=0, strategy="fsdp", fsdp_offload=True)
    a, b = _losses(tmp_path / "plain" / "metrics.jsonl"), _losses(tmp_path / "off" / "metrics.jsonl")
    assert b == pytest.approx(a, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_a_run_switches_strategy_at_a_checkpoint(tmp_path, first, then):
    """A DDP `step_N.pt` resumes under FSDP (weights and AdamW state by name) and an FSDP `step_N.dcp/` under DDP;
    the run ends like the one that never switched."""
    kw = dict(steps=5, ckpt_every=3, batches=functools.partial(_clip_batches, n=5))
    _spawn(tmp_path / "a", strategy=first, **kw)
    _spawn(tmp_path / "b", strategy=first, stop_after=3, **kw)
    _spawn(tmp_path / "b", strategy=then, **kw)
    a, b = _losses(tmp_path / "a" / "metrics.jsonl"), _losses(tmp_path / "b" / "metrics.jsonl")
    assert len(b) == 5 and b == pytest.approx(a, rel=1e-5, abs=1e-6)
    resumed = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl") if "resumed" in x]
    assert resumed and resumed[-1]["step"] == 3
    _assert_close_states(torch.load(tmp_path / "a" / "final_5.pt"), torch.load(tmp_path / "b" / "final_5.pt"))


# --- a whole recipe under FSDP -------------------------------------------------------------------------------------

def _recipe_worker(rank, world_size, port, overrides):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from polymodal.train.distributed import cleanup
    from polymodal.train.run import load_recipe, run_recipe
    cfg = load_recipe(None, overrides)
    run_recipe(cfg)
    done(cfg.out_dir, rank)
    cleanup()


@pytest.mark.slow
def test_a_clip_recipe_under_fsdp_evaluates_and_saves_the_model_polymodal_eval_reads(tmp_path):
    """2 ranks, `train.strategy=fsdp`: the in-training evaluation runs on the gathered model, the final model is a
    plain folder, and `polymodal eval` on it prints the numbers training logged."""
    from polymodal.cli import main
    from polymodal.data.synthetic.shapes import generate_shapes
    data = tmp_path / "shapes"
    generate_shapes(data, n_train=160, n_test=40, n_val=32, n_hard=8, seed=3, progress=False)
    run = tmp_path / "run"
    overrides = [f"out_dir={run}", "model.name=tiny", f"data.train={data}/train.jsonl", "data.batch_size=8",
                 "tokenizer.vocab_size=300", "optim.lr=2e-3", "optim.warmup_steps=2", "train.steps=12",
                 "train.log_every=4", "train.ckpt_every=6", "train.eval_every=6", "train.progress=false",
                 "train.threads=1", "train.report=false", "train.strategy=fsdp", f"eval.retrieval={data}/test.jsonl",
                 f"train.val_data={data}/val.jsonl", "train.val_loss_every=6"]
    run_ranks(_recipe_worker, (2, _free_port(), overrides), 2, run)
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["step"] == 12
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000006.dcp", "step_00000012.dcp"]
    logged = [json.loads(x) for x in open(run / "metrics.jsonl") if "eval/" in x]
    assert [r["step"] for r in logged] == [6, 12]
    val = [json.loads(x) for x in open(run / "metrics.jsonl") if "val/loss" in x]
    assert [r["step"] for r in val] == [6, 12] and all(math.isfinite(r["val/loss"]) for r in val)
    out = tmp_path / "m.json"
    main(["eval", str(run / "model"), "--task", "retrieval", "--data", f"{data}/test.jsonl", "--out", str(out)])
    again = json.loads(out.read_text())
    assert again["text_to_image_R@5"] == pytest.approx(final["eval/retrieval/text_to_image_R@5"])


# --- SNP-S3: the fusion network, MoCo momentum encoders and queues -------------------------------------------------

@pytest.fixture(scope="module")
def snps3_data(moving_world, tmp_path_factory):
    """A tokenizer folder and the collated batches of a small MovingShapes world (made once)."""
    from polymodal.data.datasets import ManifestDataset, SampleBuilder
    from polymodal.data.masking import SignificantWords, masking_rule
    from polymodal.data.text import train_tokenizer
    from polymodal.methods.snps3 import SNPS3Collate
    world = moving_world(n_train=48, n_test=8, seed=1, num_frames=4)
    texts = [json.loads(line)["caption"] for line in (world / "train.jsonl").read_text().splitlines()]
    tok = train_tokenizer(texts, kind="wordpiece", vocab_size=300)
    out = tmp_path_factory.mktemp("snps3")
    tok.save(out / "tokenizer")
    vocab = tok.backend.get_vocab()
    rule = masking_rule(tok, SignificantWords([w for w in ("circle", "square", "red", "blue") if w in vocab], [1] * 4))
    from polymodal.data.images import ImageTransform
    ds = ManifestDataset(world / "train.jsonl", SampleBuilder(ImageTransform(32), media="video"))
    collate = SNPS3Collate(tok, tok.context_length, rule, seed=0)
    batches = [collate([ds[i] for i in range(s, s + 8)]) for s in range(0, 24, 8)]
    torch.save(batches, out / "batches.pt")
    return str(out)


def _snps3_task(folder, **cfg):
    from polymodal.data.text import Tokenizer
    from polymodal.methods.snps3 import SNPS3Config, SNPS3Task
    from polymodal.models.fusion import create_snps3_model
    tok = Tokenizer.from_dir(os.path.join(folder, "tokenizer"))
    config = SNPS3Config(queue_size=16, momentum=0.5, **cfg)
    torch.manual_seed(0)
    return SNPS3Task(create_snps3_model(config.model_config(), tok), config, moco=True)


def _snps3_batches(folder, epoch, world_size=1, rank=0):
    batches = torch.load(os.path.join(folder, "batches.pt"), weights_only=False)
    def part(b):
        n = len(b["index"])
        return {k: (v[rank::world_size] if (torch.is_tensor(v) and v.ndim > 0 or isinstance(v, list)) and len(v) == n
                    else v) for k, v in b.items()}
    return [part(b) for b in batches]


@pytest.mark.slow
@pytest.mark.parametrize("deferred", [False, True])
def test_snps3_with_moco_trains_under_fsdp_like_ddp(tmp_path, snps3_data, deferred):
    """The momentum encoders' EMA runs inside the forward: their blocks are sharded like the online ones, their other
    (frozen) weights stay whole on every rank, so the update is kept and the keys match DDP's. Also with rank 1
    built on the meta device (its momentum copies and queues come from rank 0)."""
    task_fn = functools.partial(_snps3_task, snps3_data)
    kw = dict(steps=3, ckpt_every=0, batches=functools.partial(_snps3_batches, snps3_data), task_fn=task_fn)
    _spawn(tmp_path / "ddp", **kw)
    _spawn(tmp_path / "fsdp", strategy="fsdp", deferred=deferred, **kw)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5, abs=1e-6)
    ddp, fsdp = torch.load(tmp_path / "ddp" / "final_3.pt"), torch.load(tmp_path / "fsdp" / "final_3.pt")
    assert any(k.startswith("momentum.") for k in fsdp)
    _assert_close_states(ddp, fsdp)


def test_a_task_that_reads_sharded_weights_outside_forward_is_refused_in_one_line(snps3_data):
    task = _snps3_task(snps3_data, attention_remask=0.5)
    with pytest.raises(ConfigError) as err:
        sharding.check_fsdp_support(task)
    assert "snps3.attention_remask=0" in str(err.value) and "train.strategy=ddp" in str(err.value)
    assert "\n" not in str(err.value)
    sharding.check_fsdp_support(_snps3_task(snps3_data))          # MoCo alone shards


@pytest.mark.parametrize("temporal", ["transformer", "stan"])
def test_feature_cache_accumulation_of_the_video_task_equals_the_full_batch(tmp_path, temporal):
    from polymodal.losses.contrastive import LossConfig
    from polymodal.methods.video_clip import VideoContrastiveTask
    from polymodal.models.clip import CLIP
    from polymodal.models.factory import build_config
    from polymodal.models.video import VideoCLIP

    def task():
        torch.manual_seed(0)
        model = VideoCLIP.from_image_model(CLIP(build_config("tiny")), {"kind": temporal, "layers": 1, "stan_layers": 1})
        return VideoContrastiveTask(model, LossConfig())
    g = torch.Generator().manual_seed(4)
    batch = {"frames": torch.randn(8, 3, 3, 32, 32, generator=g), "frame_valid": torch.ones(8, 3, dtype=torch.bool),
             "input_ids": _clip_batches(0)[0]["input_ids"]}
    full = task()
    full(batch)["loss"].backward()
    want = _grads(full)
    trainer = Trainer(task(), lambda e, s: [], OptimConfig(accum_steps=2), TrainConfig(progress=False), tmp_path)
    assert trainer.task.supports_feature_cache
    trainer._feature_cache_step([{k: v[i:i + 4] for k, v in batch.items()} for i in (0, 4)])
    got = _grads(trainer.task)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert not VideoContrastiveTask(task().model, LossConfig(), order_weight=0.5).supports_feature_cache



@pytest.mark.parametrize("family", ["clip", pytest.param("mllm_hf", marks=pytest.mark.slow)])
def test_ranks_built_on_the_meta_device_get_rank_0s_weights(tmp_path, family):
    """Deferred initialisation: ranks other than 0 build the task on the meta device (no memory); after sharding
    they train exactly like DDP, whose ranks all built it (GPT-2's tied embeddings stay tied)."""
    task_fn, batches = {"clip": (_clip_task, _clip_batches), "mllm_hf": (_MLLMTask, _mllm_batches)}[family]
    kw = dict(steps=3, ckpt_every=0, task_fn=task_fn, batches=batches)
    _spawn(tmp_path / "ddp", **kw)
    _spawn(tmp_path / "fsdp", strategy="fsdp", deferred=True, **kw)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-5, abs=1e-6)
    _assert_close_states(torch.load(tmp_path / "ddp" / "final_3.pt"), torch.load(tmp_path / "fsdp" / "final_3.pt"))


def test_a_meta_task_is_refused_outside_a_sharded_run(tmp_path):
    with torch.device("meta"):
        task = _clip_task()
    with pytest.raises(ValueError, match="meta-device"):
        Trainer(task, lambda e, s: [], OptimConfig(), TrainConfig(progress=False, strategy="fsdp"), tmp_path)


@pytest.mark.slow
def test_compiled_training_under_fsdp_equals_ddp(tmp_path):
    """`train.compile` wraps the sharded task's forward (about a minute of compilation per rank on the CPU)."""
    _spawn(tmp_path / "ddp", steps=3, ckpt_every=0)
    _spawn(tmp_path / "fsdp", steps=3, ckpt_every=0, strategy="fsdp", compile=True)
    a, b = _losses(tmp_path / "ddp" / "metrics.jsonl"), _losses(tmp_path / "fsdp" / "metrics.jsonl")
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_feature_cache_accumulation_of_lotlip_equals_the_full_batch(tmp_path):
    """Short captions, corner read-outs of the sub-captions and the image: all cached, the full batch's gradient."""
    from polymodal.losses.contrastive import LossConfig
    from polymodal.methods.lotlip import LoTLIPConfig, LoTLIPTask
    from test_lotlip import make_batch, tiny_clip

    def task():
        return LoTLIPTask(tiny_clip(K=2), LoTLIPConfig(num_corners=2), LossConfig(gather="local"))
    batch = make_batch(B=8)
    full = task()
    full(batch)["loss"].backward()
    want = _grads(full)
    trainer = Trainer(task(), lambda e, s: [], OptimConfig(accum_steps=2), TrainConfig(progress=False), tmp_path)
    trainer._feature_cache_step([{k: v[i:i + 4] for k, v in batch.items()} for i in (0, 4)])
    got = _grads(trainer.task)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    uneven = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items() if k != "long_input_ids"}]
    with pytest.raises(ValueError, match="optim.accum_steps=2: the micro-batches' features differ"):
        trainer._feature_cache_step(uneven)
