"""The training engine: one readable loop for every neural model (after nanoGPT's train.py).

Why it is fast: the whole dataset sits in device memory as one tensor and each
batch is an index into a permutation, so there is no DataLoader, no per-sample
Python transform and no host-to-device copy in the hot loop.

Why it is reproducible: the weights are initialised under ``torch.manual_seed``,
epoch ``e`` draws its batch order from a generator seeded by (seed, e), and the
checkpoint holds the model, optimiser, early-stopping state and RNG state. A
run killed at any point resumes from its last checkpoint and, on CPU, ends
with bit-identical weights and metrics to an uninterrupted run.

The engine knows nothing of MLflow or files other than its checkpoint: it
reports through the ``on_epoch`` callback.

Several processes (torchrun, :mod:`latentlab.distributed`): the same loop,
with the model wrapped in DistributedDataParallel. Every rank draws the same
global batch order and trains on its chunk of each global batch, weighted so
that the averaged gradient is the one-process batch gradient; the per-step
losses are summed over the ranks once per epoch, and rank 0 alone writes the
checkpoint and calls ``on_epoch``. The result (weights, history, checkpoint)
is that of one process up to floating-point summation order for every model
whose loss is a mean of per-sample terms (linear, deep, conv, contractive).
Not quite for three kinds of model: a loss with a batch statistic inside a
non-linearity (the sparse penalty's mean activation rho_hat) is computed per
chunk; BatchNorm normalises per chunk on CPU (torch's SyncBatchNorm, used on
GPUs, needs CUDA); and a model that draws noise in its forward (VAE) draws it
per chunk, the same in distribution but not sample by sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentlab.atomic import save_torch
from latentlab.config import ClassifierConfig, TrainingConfig
from latentlab.distributed import DistributedContext, data_parallel
from latentlab.models.base import Autoencoder
from latentlab.provenance import code_digest

log = logging.getLogger(__name__)

# Validation and inference batch: large, since no gradients are kept.
EVAL_BATCH = 1024


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from latentlab.errors import ConfigError

            raise ConfigError("params.yaml: train.device: 'cuda' asked for but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class TrainingData:
    """Inputs and, for denoising, clean targets: float32 (N, C, H, W) in [0, 1]."""

    inputs: np.ndarray
    targets: np.ndarray | None = None  # None: the target is the input

    def __len__(self) -> int:
        return len(self.inputs)

    def digest(self) -> str:
        """A fingerprint of the data, so a checkpoint is never resumed on other data."""
        h = hashlib.sha256()
        for arr in (self.inputs, self.targets):
            if arr is not None:
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()


@dataclass
class EpochReport:
    """What the engine tells ``on_epoch`` after each epoch."""

    epoch: int  # 1-based
    step: int  # optimiser steps so far
    train: dict[str, float]  # mean of each loss part over the epoch's steps
    val: dict[str, float]  # each loss part on the validation data
    steps: dict[str, list[float]]  # per-step values of each part in this epoch
    improved: bool
    seconds: float
    max_epochs: int  # the run's most epochs: ``epochs``, raised to cover ``min_steps``

    def is_shown(self, most: int = 100) -> bool:
        """Whether this epoch is one that a run showing at most about ``most`` epochs shows.

        Every epoch of a run of up to ``most`` epochs, else every
        ceil(max_epochs / most)-th and the last. For the log line and the
        figure of an epoch: the linear autoencoder on the 380 speech clips runs
        1,334 epochs of 6 steps, and a grid every epoch made 4,000 images
        (69 MB) in one MLflow run, a log line every epoch 4,000 lines.
        """
        return self.epoch % math.ceil(self.max_epochs / most) == 0 or self.epoch == self.max_epochs


@dataclass
class FitResult:
    model: Autoencoder  # with the best validation weights loaded
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int  # 0 when the run started fresh
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    wall_seconds: float = 0.0  # whole fit, this process
    compute_seconds: float = 0.0  # inside forward, backward and optimiser step, this process
    train_steps: int = 0  # optimiser steps, this process


def _to_device(arr: np.ndarray | None, device: torch.device) -> Tensor | None:
    return None if arr is None else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device)


def prefers_channels_last(model: torch.nn.Module, device: torch.device, graphed: bool) -> bool:
    """Whether a run keeps ``model``'s convolution weights channels-last (NHWC).

    Only models with convolutions (4-D weights) are concerned. Yes on CPU, where
    oneDNN's NHWC kernels made a training step of the ``conv`` autoencoder 1.9x
    (4 bands) to 2.3x (1 band) faster than NCHW, ``conv_plus`` 1.4x to 1.5x and
    ``vae_conv`` 1.3x (one thread, batch 128, bench/channels_last_cpu.py; the
    end-to-end figure is in bench/engine_vs_dataloader.py). Yes under a CUDA
    graph, where NHWC skips cuDNN's layout transposes: step time -23 % (fp32) to
    -35 % (bf16) on an H100 (bench/engine_step_profile.py). No for eager GPU
    steps, which are bound by their launches and got slower with it.
    """
    if not any(p.dim() == 4 for p in model.parameters()):
        return False
    return graphed or device.type == "cpu"


def _autocast(device: torch.device, amp: bool):
    # bf16 needs no loss scaling; on CPU it does not help (measured), so it is GPU-only.
    enabled = amp and device.type == "cuda"
    # No weight-cast cache: a CUDA graph capture must not keep casts from outside it.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


@torch.no_grad()
def evaluate_loss(model: Autoencoder, data: TrainingData, device: torch.device, amp: bool = True) -> dict[str, float]:
    """Mean of every loss part over ``data`` (weighted by batch size), in eval mode."""
    was_training = model.training
    model.eval()
    inputs, targets = _to_device(data.inputs, device), _to_device(data.targets, device)
    totals: dict[str, float] = {}
    for start in range(0, len(data), EVAL_BATCH):
        x = inputs[start : start + EVAL_BATCH]
        t = None if targets is None else targets[start : start + EVAL_BATCH]
        with _autocast(device, amp):
            out = model(x, t)
        for name, value in {"loss": out.loss, **out.parts}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * len(x)
    model.train(was_training)
    return {name: total / len(data) for name, total in totals.items()}


def learning_rate(cfg: TrainingConfig | ClassifierConfig, epoch: int, max_epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) of a run of at most ``max_epochs``.

    ``constant``: ``cfg.lr``. ``cosine``: cosine annealing from ``cfg.lr`` toward 0
    over the most epochs, eta_e = lr * (1 + cos(pi * e / E)) / 2 (Loshchilov &
    Hutter 2017, eq. 5, one cycle), held for the whole epoch. A function of the
    epoch alone, so a resumed run continues the schedule exactly; early stopping
    may end the run before the rate gets low. The domain classifier of
    :mod:`latentlab.quality` follows the same schedule.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epochs))


def _set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            # In place: a captured CUDA graph reads this very tensor on every replay.
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _fingerprint(model: Autoencoder, cfg: TrainingConfig, seed: int, train: TrainingData, val: TrainingData) -> str:
    # Hyperparameters that live as plain attributes (rho, beta, lam), the
    # architecture (repr) and the code (latentlab.provenance) all belong to the
    # fingerprint: a checkpoint of other settings or code must not be resumed.
    hyper = {
        k: v
        for k, v in vars(model).items()
        if not k.startswith("_") and isinstance(v, int | float | str | bool | tuple)
    }
    spec = {
        "model": type(model).__name__,
        "hyper": hyper,
        "architecture": repr(model),
        "shape": model.sample_shape,
        "latent": model.latent_dim,
        "params": sum(p.numel() for p in model.parameters()),
        "cfg": cfg.model_dump(mode="json"),
        "seed": seed,
        "train": train.digest(),
        "val": val.digest(),
        "code": code_digest(),  # a finished checkpoint of other code must not stand in for this code's run
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a checkpoint's optimiser state into an optimiser built for this run's device.

    A checkpoint written by a run on another device (a CPU run resumed on a GPU)
    carries that run's kernel flags (``fused``, ``capturable``) in its parameter
    groups, and ``load_state_dict`` would bring them back: a CUDA graph then
    refuses to capture a step that is not capturable. This run's flags win; they
    are set before loading, since they decide where the step counts are put.

    The moments are then given their parameters' memory layout: a run under a
    CUDA graph keeps convolution weights channels-last, and the fused AdamW
    kernel walks parameter and moments as flat memory, so their element orders
    must agree (``copy_`` moves values by index, not by memory position).
    """
    flags = ("fused", "capturable", "foreach")
    groups = [
        {**g, **{k: mine[k] for k in flags if k in mine}}
        for g, mine in zip(saved["param_groups"], optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({**saved, "param_groups": groups})
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    save_torch(state, path)


def fit(
    model: Autoencoder,
    train: TrainingData,
    val: TrainingData,
    cfg: TrainingConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None = None,
    on_epoch: Callable[[EpochReport, Autoencoder], None] | None = None,
    progress: bool = True,
    timing: bool = False,
    dist: DistributedContext | None = None,
) -> FitResult:
    """Train ``model`` with Adam(W), early stopping on validation loss and resumable checkpoints.

    ``checkpoint`` is the file of the resumable state (written every
    ``cfg.checkpoint_every`` epochs and at the end); if it exists and was made
    by the same model, config, seed and data, training resumes from it.

    ``timing`` measures the time inside forward, backward and optimiser step
    (``FitResult.compute_seconds``). On CPU that is free; on CUDA it needs a
    synchronisation around every step, which stalls the launch queue, so it is
    off unless asked for and ``compute_seconds`` is then NaN.

    ``dist`` is this process's place among several started by torchrun (None:
    one process). Every rank must call ``fit`` with the same arguments (other
    than ``device``, ``on_epoch`` and ``progress``); rank 0 writes the
    checkpoint and calls ``on_epoch``, and every rank returns the same result.
    """
    start_wall = time.perf_counter()
    dist = dist or DistributedContext.single()
    model.to(device)
    cuda = device.type == "cuda"
    if cuda:
        # Shapes are fixed within a run: let cuDNN pick its fastest kernels once.
        torch.backends.cudnn.benchmark = True
    # The fused kernel updates every parameter in one launch instead of several per tensor;
    # capturable keeps the step count on the device, which a CUDA graph needs.
    # Not under DDP: its gradient all-reduce runs from autograd hooks into buckets that
    # are rebuilt after the first step, and every rank's chunk may differ in size from
    # the captured one, so a captured step would not replay what DDP needs.
    graphed = cuda and cfg.cuda_graph and not dist.distributed
    if cuda and cfg.cuda_graph and dist.distributed:
        log.info("cuda_graph is off under DistributedDataParallel; steps run eagerly")
    channels_last = prefers_channels_last(model, device, graphed)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        **({"fused": True, "capturable": graphed} if cuda else {}),
    )
    # Hashing the data costs ~0.45 s per GB (SHA-256, measured); only a checkpoint needs it.
    fingerprint = _fingerprint(model, cfg, seed, train, val) if checkpoint is not None else ""

    epoch, step, best_val, best_epoch, bad_epochs = 0, 0, math.inf, 0, 0
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history: list[dict[str, Any]] = []
    resumed_from = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            _load_optimizer_state(optimizer, state["optimizer"])
            epoch, step = state["epoch"], state["step"]
            best_val, best_epoch, bad_epochs = state["best_val"], state["best_epoch"], state["bad_epochs"]
            best_state = state["best_model"]
            history = state["history"]
            # map_location moved the RNG state to the device; set_rng_state wants a CPU ByteTensor.
            torch.set_rng_state(state["torch_rng"].cpu())
            resumed_from = epoch
            log.info("resuming from %s at epoch %d", checkpoint, epoch)
        else:
            log.info("ignoring %s: made by another model, config or data", checkpoint)
    # Every rank read the checkpoint itself (so all must see the same file: one machine, or a
    # shared filesystem). Ranks resuming from different epochs would run different numbers of
    # steps and hang in an all-reduce; stop with an error instead.
    dist.check_same(resumed_from, f"the epoch resumed from {checkpoint}")
    if graphed and cfg.lr_schedule != "constant":
        # A captured step bakes a float learning rate into its kernels; a schedule under a
        # graph needs the rate as a device tensor that the graph reads and the loop updates
        # in place (after any checkpoint load, which would put a saved rate in its place).
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)

    inputs, targets = _to_device(train.inputs, device), _to_device(train.targets, device)
    # The graph's data in NHWC too, so that no step transposes its batch. On CPU the
    # convolution converts each batch itself, as fast (measured), and the data is not copied.
    if channels_last and graphed and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = None if targets is None else targets.contiguous(memory_format=torch.channels_last)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    # A small dataset gets as many epochs as it takes to reach min_steps.
    max_epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    compute_seconds, steps_here = 0.0, 0
    timed = timing or not cuda
    sync = torch.cuda.synchronize if (cuda and timing) else (lambda: None)
    stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
    # One progress bar on the terminal, not one per rank.
    progress = progress and dist.is_main
    with data_parallel(model, dist, device) as trained:
        # ``trained`` is the DDP wrapper under torchrun, else ``model`` itself; evaluation,
        # checkpoints and on_epoch use ``model`` (the same weights, without the wrapper).
        step_fn = _eager_step(trained, optimizer, inputs, targets, device, cfg.amp, dist, cfg.input_noise)
        if graphed and n >= cfg.batch_size and epoch < max_epochs and not stopped_early:
            step_fn = _graphed_step(model, optimizer, inputs, targets, device, cfg, step_fn)

        while epoch < max_epochs and not stopped_early:
            epoch_start = time.perf_counter()
            lr = learning_rate(cfg, epoch, max_epochs)
            _set_learning_rate(optimizer, lr)
            model.train()
            # The batch order of epoch e depends only on (seed, e): resuming replays it exactly,
            # and every rank of a distributed run draws the same global batches.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
            bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{max_epochs}", progress)
            # Per-step values stay on the device, (steps, 1 + parts); one transfer per epoch,
            # so the host never waits on the GPU inside the loop.
            step_values: list[Tensor] = []
            for first in range(0, n, cfg.batch_size):
                index = order[first : first + cfg.batch_size]  # the global batch, (B,)
                sync()
                t0 = time.perf_counter()
                step_values.append(step_fn(index))
                sync()
                compute_seconds += time.perf_counter() - t0
                step += 1
                steps_here += 1
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            names = ["loss", *step_fn.part_names]
            # Under DDP each rank's values are its chunk's means times its share n_r / B of the
            # global batch, so their sum over ranks is the global batch mean: one all-reduce
            # per epoch gives every rank the one-process per-step values.
            columns = dist.all_reduce_sum(torch.stack(step_values)).T.tolist()
            steps: dict[str, list[float]] = dict(zip(names, columns, strict=True))
            epoch += 1
            # Every rank evaluates the whole validation set with the same weights; rank 0's
            # numbers are then sent to all, so early stopping decides alike on every rank even
            # where they could differ in the last bits (cuDNN picks kernels per process) or
            # more (per-rank BatchNorm running statistics on CPU). Ranks that disagreed
            # would stop at different epochs and hang in the next all-reduce.
            val_parts = dist.broadcast_from_main(evaluate_loss(model, val, device, cfg.amp))
            improved = val_parts["loss"] < best_val - cfg.min_delta
            if improved:
                best_val, best_epoch, bad_epochs = val_parts["loss"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
            stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
            train_means = {name: float(np.mean(values)) for name, values in steps.items()}
            seconds = time.perf_counter() - epoch_start
            history.append(
                {
                    "epoch": epoch,
                    "step": step,
                    "seconds": seconds,
                    "lr": lr,
                    **{f"train_{k}": v for k, v in train_means.items()},
                    **{f"val_{k}": v for k, v in val_parts.items()},
                }
            )
            report = EpochReport(epoch, step, train_means, val_parts, steps, improved, seconds, max_epochs)
            if dist.is_main and (report.is_shown() or stopped_early):
                log.info(
                    "epoch %d: train loss %.5f, val loss %.5f%s",
                    epoch,
                    train_means["loss"],
                    val_parts["loss"],
                    " *" if improved else "",
                )
            if on_epoch is not None and dist.is_main:
                on_epoch(report, model)
            if checkpoint is not None and (epoch % cfg.checkpoint_every == 0 or epoch == max_epochs or stopped_early):
                if dist.is_main:
                    _save_checkpoint(
                        checkpoint,
                        {
                            "fingerprint": fingerprint,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "epoch": epoch,
                            "step": step,
                            "best_val": best_val,
                            "best_epoch": best_epoch,
                            "bad_epochs": bad_epochs,
                            "best_model": best_state,
                            "history": history,
                            "torch_rng": torch.get_rng_state(),
                        },
                    )
                # No rank runs ahead of the file rank 0 is writing (e.g. into a next fit that
                # reads its checkpoint, or out of the process while the file is half-renamed).
                dist.barrier()

    model.load_state_dict(best_state)
    # Back to the usual layout: the returned model then computes exactly as one rebuilt from
    # its saved weights (other kernels, other last bits), wherever it is used next.
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return FitResult(
        model=model,
        best_val_loss=best_val,
        best_epoch=best_epoch,
        epochs_run=epoch,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
        history=history,
        wall_seconds=time.perf_counter() - start_wall,
        compute_seconds=compute_seconds if timed else math.nan,
        train_steps=steps_here,
    )


class _Step:
    """One optimiser step on the batch ``index``; returns (1 + parts,) detached losses on the device."""

    part_names: list[str]

    def __call__(self, index: Tensor) -> Tensor:
        raise NotImplementedError


class _eager_step(_Step):  # noqa: N801 - used like a function
    """One step on the global batch ``index`` (B,); under DDP on this rank's chunk of it.

    ``model`` is the DistributedDataParallel wrapper when ``dist`` has several
    ranks: its backward all-reduces the gradients before the optimiser step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: Tensor,
        targets: Tensor | None,
        device: torch.device,
        amp: bool,
        dist: DistributedContext | None = None,
        input_noise: float = 0.0,
    ) -> None:
        self.model, self.optimizer, self.inputs, self.targets = model, optimizer, inputs, targets
        self.device, self.amp, self.input_noise = device, amp, input_noise
        self.dist = dist or DistributedContext.single()
        self.part_names = []

    def __call__(self, index: Tensor) -> Tensor:
        weight = None
        if self.dist.distributed:
            # This rank's contiguous chunk (n_r,) of the global batch and its weight
            # w_r = n_r * W / B: DDP averages the W ranks' gradients, so the gradient
            # of w_r * (chunk mean) averages to that of the one-process batch mean
            # (the derivation is in latentlab.distributed.shard).
            index, weight = self.dist.shard(index)
        x = self.inputs[index]
        t = None if self.targets is None else self.targets[index]
        if self.input_noise > 0:
            # Fresh noise every step from torch's global RNG (saved in the checkpoint, so a
            # resumed CPU run draws the same noise); the target stays the uncorrupted batch.
            t = x if t is None else t
            x = x + self.input_noise * torch.randn_like(x)
        with _autocast(self.device, self.amp):
            out = self.model(x, t)
        self.optimizer.zero_grad(set_to_none=True)
        (out.loss if weight is None else out.loss * weight).backward()
        self.optimizer.step()
        self.part_names = list(out.parts)
        values = torch.stack([out.loss.detach().float(), *(v.float() for v in out.parts.values())])
        # Under DDP: the chunk means times the chunk's share n_r / B = w_r / W of the batch,
        # which the epoch's all-reduce (SUM) turns into the global batch means.
        return values if weight is None else values * (weight / self.dist.world_size)


class _graphed_step(_Step):  # noqa: N801 - used like a function
    """The whole step (gather, forward, backward, AdamW) captured once as a CUDA graph and replayed.

    A small model's step is a few hundred tiny kernels, so on a GPU its time is
    the CPU launching them; replaying a graph launches them all at once
    (PyTorch's "whole-network capture", torch.cuda.graphs). Only full batches
    replay; an epoch's last, smaller batch runs eagerly. The warm-up steps that
    capture needs run with lr 0 and their optimiser state and batch-norm
    statistics are reset afterwards, so they leave no trace in training.
    """

    def __init__(
        self,
        model: Autoencoder,
        optimizer: torch.optim.Optimizer,
        inputs: Tensor,
        targets: Tensor | None,
        device: torch.device,
        cfg: TrainingConfig,
        eager: _eager_step,
    ) -> None:
        self.eager, self.batch_size = eager, cfg.batch_size
        self.static_index = torch.arange(cfg.batch_size, device=device)
        buffers = [b.detach().clone() for b in model.buffers()]
        had_state = bool(optimizer.state)
        saved_state = {k: {n: v.detach().clone() for n, v in st.items()} for k, st in optimizer.state.items()}
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                eager(self.static_index)
        torch.cuda.current_stream().wait_stream(side)
        # Undo the warm-up in place (capture records these very tensors' addresses).
        for buf, saved in zip(model.buffers(), buffers, strict=True):
            buf.copy_(saved)
        for param, st in optimizer.state.items():
            for name, value in st.items():
                if had_state and param in saved_state:
                    value.copy_(saved_state[param][name])
                else:
                    value.zero_()
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.part_names = eager.part_names
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_values = eager(self.static_index)

    def __call__(self, index: Tensor) -> Tensor:
        if len(index) != self.batch_size:
            return self.eager(index)
        self.static_index.copy_(index)
        self.graph.replay()
        return self.static_values.clone()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, DVC captured output).
    return tqdm(total=total, desc=desc, leave=False, disable=None, mininterval=0.5)


@torch.no_grad()
def encode(model: Autoencoder, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Codes (N, latent_dim) of float images (N, C, H, W), in eval mode and batches."""
    model.eval()
    out = [model.encode(_to_device(x[i : i + EVAL_BATCH], device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)]
    return torch.cat(out).numpy()


@torch.no_grad()
def reconstruct(model: Autoencoder, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Reconstructions (N, C, H, W) of float images, in eval mode and batches."""
    model.eval()
    out = [
        model.reconstruct(_to_device(x[i : i + EVAL_BATCH], device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)
    ]
    return torch.cat(out).numpy()


def save_model(model: Autoencoder, path: Path, meta: dict[str, Any]) -> None:
    """The final weights with what is needed to rebuild the model (family, shape, options)."""
    save_torch({"state_dict": model.state_dict(), "meta": meta}, path)


def load_model(path: Path, device: torch.device | None = None) -> tuple[Autoencoder, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_model`."""
    from latentlab.errors import DataError
    from latentlab.models.base import build_model

    try:
        payload = torch.load(path, map_location=device or "cpu", weights_only=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the train stage first") from None
    meta = payload["meta"]
    model = build_model(meta["family"], tuple(meta["sample_shape"]), meta["latent_dim"], **meta.get("options", {}))
    model.load_state_dict(payload["state_dict"])
    model.to(device or "cpu").eval()
    return model, meta
