"""Data-parallel training maths and context, without starting processes.

What the torchrun launch does end to end (2 gloo processes against one) is in
tests/integration/test_ddp.py; here: reading torchrun's environment, the split
of a global batch into rank chunks, and the loss weights that make DDP's
gradient average equal the one-process gradient.
"""

from __future__ import annotations

import os

import pytest
import torch

from latentlab.distributed import (
    DistributedContext,
    cpu_threads_per_process,
    data_parallel,
    process_group,
    shard,
    sync_batchnorm,
)
from latentlab.errors import ConfigError
from latentlab.models.base import build_model

torch.set_num_threads(1)

TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# --- the context -------------------------------------------------------------------------


def test_without_torchrun_variables_it_is_one_process():
    for env in ({}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}):
        ctx = DistributedContext.from_env("auto", env)
        assert ctx == DistributedContext.single()
        assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
        assert ctx.is_main and not ctx.distributed
        assert ctx.device == torch.device("cpu")


def test_torchrun_on_cpu_uses_gloo(monkeypatch):
    _no_cuda(monkeypatch)
    ctx = DistributedContext.from_env("auto", TORCHRUN)
    assert ctx == DistributedContext(rank=1, world_size=2, local_rank=1, backend="gloo")
    assert ctx.distributed and not ctx.is_main
    assert ctx.device == torch.device("cpu")


def test_torchrun_with_gpus_uses_nccl_and_one_gpu_per_rank(monkeypatch):
    _gpus(monkeypatch, 2)
    ctx = DistributedContext.from_env("auto", TORCHRUN)
    assert ctx.backend == "nccl" and ctx.device == torch.device("cuda", 1)
    # train.device: cpu keeps the run on the CPU even with GPUs present.
    assert DistributedContext.from_env("cpu", TORCHRUN).backend == "gloo"


def test_more_processes_than_gpus_is_a_config_error(monkeypatch):
    _gpus(monkeypatch, 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK 1 but this machine has 1 GPU"):
        DistributedContext.from_env("auto", TORCHRUN)


def test_cuda_asked_for_without_cuda_is_a_config_error(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(ConfigError, match="train.device: 'cuda'"):
        DistributedContext.from_env("cuda", TORCHRUN)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK must lie in 0..1"),
        ({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"}, "RANK must be an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be at least 1"),
    ],
)
def test_bad_torchrun_variables_are_named(monkeypatch, env, message):
    _no_cuda(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        DistributedContext.from_env("auto", env)


def test_one_process_collectives_do_nothing():
    ctx = DistributedContext.single()
    values = torch.arange(6.0).view(3, 2)
    assert ctx.all_reduce_sum(values) is values and torch.equal(values, torch.arange(6.0).view(3, 2))
    assert ctx.broadcast_from_main({"loss": 1.5, "kl": 2.0}) == {"loss": 1.5, "kl": 2.0}
    ctx.barrier()
    ctx.check_same(3, "anything")
    with process_group(ctx):
        assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    model = torch.nn.Linear(2, 2)
    with data_parallel(model, ctx, torch.device("cpu")) as trained:
        assert trained is model


def test_cpu_threads_are_shared_among_the_local_processes():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cpu_threads_per_process({}) == cores
    assert cpu_threads_per_process({"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
    assert cpu_threads_per_process({"LOCAL_WORLD_SIZE": str(4 * cores)}) == 1


# --- the split of a global batch -----------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 7, 8, 15])
def test_chunks_are_contiguous_cover_the_batch_and_weights_average_to_one(world, batch):
    index = torch.randperm(100)[:batch]  # a global batch: arbitrary sample indices, (B,)
    chunks = [shard(index, r, world) for r in range(world)]
    real = [(c, w) for c, w in chunks if w > 0]
    # In rank order the real chunks are the batch itself, split into pieces differing by at most one.
    assert torch.equal(torch.cat([c for c, _ in real]), index)
    sizes = [len(c) for c, _ in real]
    assert max(sizes) - min(sizes) <= 1
    for c, w in real:
        assert w == pytest.approx(len(c) * world / batch)
    # DDP averages over W ranks: the weights must average to 1 (each sample counted once).
    assert sum(w for _, w in chunks) / world == pytest.approx(1.0)
    # Ranks without a sample (B < W) get one real index with weight 0, never an empty batch.
    for rank, (c, w) in enumerate(chunks):
        if w == 0:
            assert batch < world and rank >= batch
            assert torch.equal(c, index[:1])


def test_uneven_last_batch_weights():
    # 46 samples in batches of 15 on 2 ranks: chunks 8 + 7, and a last batch of 1 sample.
    order = torch.arange(46)
    assert [(len(c), w) for c, w in (shard(order[0:15], r, 2) for r in range(2))] == [(8, 16 / 15), (7, 14 / 15)]
    assert [(len(c), w) for c, w in (shard(order[45:46], r, 2) for r in range(2))] == [(1, 2.0), (1, 0.0)]


def test_shard_rejects_a_bad_rank_or_an_empty_batch():
    with pytest.raises(ValueError, match="rank 2"):
        shard(torch.arange(4), 2, 2)
    with pytest.raises(ValueError, match="empty"):
        shard(torch.arange(0), 0, 2)


# --- the gradient DDP averages equals the one-process gradient ----------------------------


def _grads(model: torch.nn.Module, x: torch.Tensor, weight: float = 1.0) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (model(x).loss * weight).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["deep", "contractive", "linear"])
@pytest.mark.parametrize(("batch", "world"), [(7, 2), (15, 2), (10, 3), (1, 2), (3, 4)])
def test_weighted_chunk_gradients_average_to_the_batch_gradient(family, batch, world):
    torch.manual_seed(0)
    model = build_model(family, (1, 6, 6), 3).double()
    x = torch.rand(batch, 1, 6, 6, dtype=torch.float64)
    full = _grads(model, x)
    full_loss = model(x).loss.item()
    # What DDP does: every rank backpropagates its weighted chunk loss; the all-reduce sums
    # the ranks' gradients and divides by W.
    averaged = [torch.zeros_like(g) for g in full]
    logged = 0.0
    for rank in range(world):
        chunk, weight = shard(torch.arange(batch), rank, world)
        for total, g in zip(averaged, _grads(model, x[chunk], weight), strict=True):
            total += g / world
        # The engine logs the chunk's loss times its share w_r / W; the sum over ranks is the batch mean.
        logged += model(x[chunk]).loss.item() * weight / world
    for a, f in zip(averaged, full, strict=True):
        torch.testing.assert_close(a, f, rtol=1e-10, atol=1e-12)
    assert logged == pytest.approx(full_loss, rel=1e-12)


# --- BatchNorm -----------------------------------------------------------------------------


def test_sync_batchnorm_is_undone_with_the_same_tensors():
    torch.manual_seed(0)
    model = build_model("conv_plus", (1, 8, 8), 2, channels=[4, 8])
    before = repr(model)
    params = list(model.parameters())
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    restore = sync_batchnorm(model)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in model.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()) == len(bn)
    # An optimiser built before the swap still holds the model's parameters.
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.SyncBatchNorm):
                m.running_mean.add_(1.0)  # "training" changed the statistics
    restore()
    assert repr(model) == before  # the engine's checkpoint fingerprint sees the same architecture
    assert [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == bn
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(torch.all(m.running_mean == 1.0) for m in bn)  # nothing the sync layers learnt is lost
    model.eval()
    assert model(torch.rand(3, 1, 8, 8)).reconstruction.shape == (3, 1, 8, 8)
