"""Data-parallel training on several processes (torch DistributedDataParallel, launched by torchrun).

The same code runs in one process or in ``torchrun --nproc_per_node N``: torchrun
starts N copies of the command and tells each who it is through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). :meth:`DistributedContext.from_env` reads them; without them
the context is the single process (world size 1), for which every collective
below is a no-op, so callers need no ``if distributed`` branches.

How the engine uses this (see :func:`latentlab.engine.fit`): every rank draws
the same global batch order, takes its contiguous chunk of each global batch
(:func:`shard`), and DistributedDataParallel averages the gradients over the
ranks. The chunk's loss weight makes that average exactly the gradient of the
one-process batch mean, so N processes train the same model as one.

Backends: NCCL between GPUs (one per process, ``cuda:{LOCAL_RANK}``), gloo on
CPU. Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from latentlab.errors import ConfigError, LatentlabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is among the ``world_size`` processes of one training run.

    ``rank`` is global (0 .. world_size - 1), ``local_rank`` the index on this
    machine (the GPU it drives); ``backend`` is ``"nccl"``, ``"gloo"`` or None
    for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def single(cls) -> DistributedContext:
        """One process, no process group."""
        return cls()

    @classmethod
    def from_env(cls, device: str = "auto", env: Mapping[str, str] | None = None) -> DistributedContext:
        """The context torchrun describes in the environment; a single process when it did not launch us.

        ``device`` is ``train.device`` of params.yaml: ``auto`` and ``cuda`` give
        NCCL and ``cuda:{LOCAL_RANK}`` when CUDA is present, ``cpu`` (or no
        CUDA under ``auto``) gives gloo on the CPU.
        """
        env = os.environ if env is None else env
        world_size = _env_int(env, "WORLD_SIZE", default=1)
        if world_size < 1:
            raise ConfigError(f"environment: WORLD_SIZE must be at least 1, got {world_size}")
        if world_size == 1:
            return cls.single()
        rank = _env_int(env, "RANK")
        local_rank = _env_int(env, "LOCAL_RANK")
        if not 0 <= rank < world_size:
            raise ConfigError(f"environment: RANK must lie in 0..{world_size - 1} (WORLD_SIZE), got {rank}")
        if local_rank < 0:
            raise ConfigError(f"environment: LOCAL_RANK must not be negative, got {local_rank}")
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if cuda:
            if not torch.cuda.is_available():
                raise ConfigError("params.yaml: train.device: 'cuda' asked for but no CUDA device is available")
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:
                raise ConfigError(
                    f"environment: LOCAL_RANK {local_rank} but this machine has {gpus} GPU(s): "
                    "start at most one process per GPU (torchrun --nproc_per_node)"
                )
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, backend="nccl" if cuda else "gloo")

    @property
    def distributed(self) -> bool:
        """More than one process: DDP, sharded batches and collectives are in play."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one process that writes files, logs to MLflow and shows progress."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """This rank's device: its own GPU under NCCL, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, index: Tensor) -> tuple[Tensor, float]:
        """This rank's chunk of the global batch ``index`` and its loss weight (see :func:`shard`)."""
        return shard(index, self.rank, self.world_size)

    def barrier(self) -> None:
        """Wait until every rank gets here (no-op for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all ranks, in place; returned for chaining."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same ``value`` (one small all-reduce)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        # MAX of (v, -v) gives the largest and the smallest value in one collective.
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        high, low = int(both[0]), -int(both[1])
        if high != low:
            raise LatentlabError(
                f"{what}: the ranks disagree (from {low} to {high}); every rank must see the same "
                "files (run on one machine or on a shared filesystem)"
            )

    def broadcast_from_main(self, values: Mapping[str, float]) -> dict[str, float]:
        """Rank 0's ``values`` on every rank (the keys must be the same on all ranks)."""
        if not self.distributed:
            return dict(values)
        import torch.distributed as dist

        names = list(values)  # the same order on every rank: the same forward built it
        # float64 so that the numbers arrive exactly as rank 0 computed them.
        tensor = torch.tensor([values[k] for k in names], dtype=torch.float64, device=self.device)
        dist.broadcast(tensor, src=0)
        return dict(zip(names, tensor.tolist(), strict=True))


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ConfigError(f"environment: {name} is not set but WORLD_SIZE > 1 (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment: {name} must be an integer, got {raw!r}") from None


def shard(index: Tensor, rank: int, world_size: int) -> tuple[Tensor, float]:
    """Rank ``rank``'s contiguous chunk of the global batch ``index`` (B,), and the chunk's loss weight.

    ``torch.tensor_split`` gives the first ``B % W`` ranks one sample more, so
    chunk sizes ``n_r`` differ by at most one and sum to ``B``. The weight is
    ``w_r = n_r * W / B``: DistributedDataParallel *averages* gradients over the
    ``W`` ranks (it all-reduces their sum and divides by W), so with per-rank
    losses ``L_r = w_r * mean_{i in chunk r} l_i``

        (1/W) sum_r grad L_r = (1/W) sum_r (n_r W / B) (1/n_r) sum_{i in chunk r} grad l_i
                             = (1/B) sum_{i in batch} grad l_i,

    the gradient of the one-process batch mean, also for an uneven last batch.
    (This needs a loss that is a mean of per-sample terms ``l_i``; the engine's
    module docstring lists the models for which that is only nearly so.)

    A batch smaller than ``W`` leaves some ranks without a sample. Such a rank
    still has to run forward and backward (DDP's all-reduce needs every rank),
    so it gets the batch's first sample with weight 0: it adds nothing to the
    gradient or to the logged losses.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    if len(index) == 0:
        raise ValueError("an empty global batch")
    chunk = torch.tensor_split(index, world_size)[rank]
    if len(chunk) == 0:
        return index[:1], 0.0
    return chunk, len(chunk) * world_size / len(index)


@contextlib.contextmanager
def process_group(ctx: DistributedContext) -> Iterator[DistributedContext]:
    """Join the process group torchrun set up (``env://``) for the block, and leave it after.

    A no-op for one process. Under NCCL each process first binds its own GPU,
    so that collectives and ``torch.cuda`` defaults use ``cuda:{LOCAL_RANK}``.
    """
    if not ctx.distributed:
        yield ctx
        return
    import torch.distributed as dist

    kwargs = {}
    if ctx.backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
        kwargs["device_id"] = ctx.device  # binds the group to this GPU: barriers know their device
    dist.init_process_group(backend=ctx.backend, rank=ctx.rank, world_size=ctx.world_size, **kwargs)
    log.info("rank %d of %d joined the %s process group", ctx.rank, ctx.world_size, ctx.backend)
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def cpu_threads_per_process(env: Mapping[str, str] | None = None) -> int:
    """Torch CPU threads for each of the processes torchrun started on this machine.

    The machine's cores (those this process may run on) split evenly among
    ``LOCAL_WORLD_SIZE`` processes, at least one each: N processes with all
    cores each would oversubscribe the CPU and slow each other badly.
    """
    env = os.environ if env is None else env
    local_world = max(1, _env_int(env, "LOCAL_WORLD_SIZE", default=1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world)


@contextlib.contextmanager
def data_parallel(model: nn.Module, ctx: DistributedContext, device: torch.device) -> Iterator[nn.Module]:
    """``model`` wrapped in DistributedDataParallel for the block (the model itself for one process).

    The wrapper shares ``model``'s parameters and buffers, so the caller keeps
    using ``model`` for evaluation and checkpoints (its state-dict keys then
    carry no ``module.`` prefix and a checkpoint fits any world size). The
    wrapper broadcasts rank 0's weights once at construction, and every
    backward all-reduces the gradients, so all ranks keep identical weights.

    BatchNorm: on CUDA its layers become SyncBatchNorm for the block, so the
    batch statistics are those of the whole global batch, as in one process;
    afterwards the original layers are put back (same parameter and buffer
    tensors), so the returned model is the one that was built. SyncBatchNorm
    needs a GPU (torch raises for CPU tensors), so on CPU each rank
    normalises with its own chunk's statistics; DDP then copies rank 0's
    running statistics to the others at every forward.
    """
    if not ctx.distributed:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    restore = sync_batchnorm(model) if device.type == "cuda" else (lambda: None)
    try:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        yield wrapped
    finally:
        restore()


def sync_batchnorm(model: nn.Module):
    """Replace every BatchNorm layer of ``model`` by a SyncBatchNorm in place; return a function that undoes it.

    The replacements share the original layers' parameters and buffers (as
    ``SyncBatchNorm.convert_sync_batchnorm`` does), so an optimiser built on
    ``model.parameters()`` keeps working and undoing loses no training.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    swapped: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []  # (parent, name, original, sync)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                sync = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                setattr(parent, name, sync)
                swapped.append((parent, name, child, sync))

    def restore() -> None:
        for parent, name, original, sync in reversed(swapped):
            # Take back whatever tensors the sync layer holds now (a .to() may have replaced them).
            original._parameters.update(sync._parameters)
            original._buffers.update(sync._buffers)
            original.train(sync.training)
            setattr(parent, name, original)

    return restore
