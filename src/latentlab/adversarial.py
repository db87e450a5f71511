"""The GAN training loop, written like :func:`latentlab.engine.fit` (read that first).

Each step is one discriminator update then one generator update (Goodfellow et
al. 2014, Algorithm 1 with k = 1) on a batch of real images and as many fakes
``G(z)``, ``z ~ N(0, I)``:

* D minimises ``-[log D(x) + log(1 - D(G(z)))]`` (batch means; the negated value
  function V(D, G) of their eq. 1), as binary cross-entropy on logits, which is
  exact and stable for saturated outputs;
* G minimises the non-saturating ``-log D(G(z))`` (their section 3: ``log(1 -
  D(G(z)))`` saturates early in training when D rejects every fake, this has the
  same fixed point and strong gradients then), reusing the step's fakes against
  the just-updated D.

A conditional pair gets the real batch's labels for its fakes too, so fakes
follow the class frequencies of the data. Per step the loop records ``d_loss``,
``g_loss``, ``d_real`` (mean D(x), a probability) and ``d_fake`` (mean D(G(z))
before D's update). There is no validation loss and no early stopping: a GAN's
losses do not measure sample quality. Instead ``monitor(pair, epoch)`` (e.g.
class coverage and entropy of samples under a classifier) runs after every
epoch and its values enter the history and the report.

Fast and reproducible for the same reasons as the engine: the data is one
tensor on the device and batches index a permutation that depends only on
(seed, epoch); the checkpoint holds both networks, both optimisers, the
history and torch's RNG state (z and dropout come from it), so a run killed at
any point resumes from its last checkpoint and, on CPU, ends with bit-identical
weights and history to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentlab.config import GanTrainingConfig
from latentlab.engine import _autocast, _progress, _save_checkpoint, pick_device, prefers_channels_last
from latentlab.models.gan import GanPair
from latentlab.provenance import code_digest

log = logging.getLogger(__name__)

STEP_PARTS = ("d_loss", "g_loss", "d_real", "d_fake")


@dataclass
class GanEpochReport:
    """What :func:`fit_gan` tells ``on_epoch`` after each epoch."""

    epoch: int  # 1-based
    step: int  # steps (one D and one G update each) so far
    train: dict[str, float]  # mean of each of STEP_PARTS over the epoch's steps
    monitor: dict[str, float]  # what ``monitor`` returned this epoch (empty without one)
    steps: dict[str, list[float]]  # per-step values of each of STEP_PARTS in this epoch
    seconds: float


@dataclass
class GanFitResult:
    pair: GanPair  # the final weights, in eval mode
    epochs_run: int
    resumed_from_epoch: int  # 0 when the run started fresh
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch
    wall_seconds: float = 0.0  # whole fit, this process
    compute_seconds: float = 0.0  # inside forward, backward and optimiser steps, this process
    train_steps: int = 0  # steps, this process


def _config(cfg: GanTrainingConfig | Mapping[str, Any] | None, options: Mapping[str, Any]) -> GanTrainingConfig:
    """A validated config from a config, a mapping or nothing, with ``options`` overriding."""
    if cfg is None:
        base: dict[str, Any] = {}
    elif isinstance(cfg, GanTrainingConfig):
        base = cfg.model_dump()
    else:
        base = dict(cfg)
    return GanTrainingConfig.model_validate({**base, **options})


def _subsample_index(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted row indices: all of ``0..n-1``, or ``limit`` of them from a seeded permutation
    (the rule of :func:`latentlab.train.subsample_index`, so both pick the same images)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def _digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    """A fingerprint of the data, so a checkpoint is never resumed on other data."""
    h = hashlib.sha256()
    for arr in (images, labels):
        if arr is not None:
            h.update(f"{arr.shape}{arr.dtype}".encode())
            h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _fingerprint(pair: GanPair, cfg: GanTrainingConfig, seed: int, data_digest: str) -> str:
    # As in engine._fingerprint: plain-attribute hyperparameters, the architecture and the
    # code all belong to it; a checkpoint of other settings or code must not be resumed.
    hyper = {
        k: v for k, v in vars(pair).items() if not k.startswith("_") and isinstance(v, int | float | str | bool | tuple)
    }
    spec = {
        "pair": type(pair).__name__,
        "hyper": hyper,
        "architecture": repr(pair),
        "params": sum(p.numel() for p in pair.parameters()),
        "cfg": cfg.model_dump(mode="json"),
        "seed": seed,
        "data": data_digest,
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _check_data(pair: GanPair, images: np.ndarray, labels: np.ndarray | None) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != pair.sample_shape:
        raise ValueError(f"images must be (N, {', '.join(map(str, pair.sample_shape))}), got {images.shape}")
    if len(images) < 2:
        raise ValueError(f"need at least 2 training images (batch norm), got {len(images)}")
    if pair.conditional:
        assert pair.num_classes is not None
        if labels is None:
            raise ValueError(f"{pair.family}: a conditional GAN needs labels")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be ({len(images)},), got {labels.shape}")
        if labels.min() < 0 or labels.max() >= pair.num_classes:
            raise ValueError(f"labels must lie in 0..{pair.num_classes - 1}")
    elif labels is not None:
        raise ValueError(f"{pair.family}: an unconditional GAN takes no labels")


def _bce(logits: Tensor, real: bool) -> Tensor:
    """Mean binary cross-entropy of logits (N,) against all-real or all-fake targets, in float32."""
    logits = logits.float()
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def fit_gan(
    pair: GanPair,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    cfg: GanTrainingConfig | Mapping[str, Any] | None = None,
    *,
    seed: int,
    device: torch.device | str,
    checkpoint: Path | None = None,
    on_epoch: Callable[[GanEpochReport, GanPair], None] | None = None,
    monitor: Callable[[GanPair, int], dict[str, float]] | None = None,
    progress: bool = True,
    **options: Any,
) -> GanFitResult:
    """Train ``pair`` adversarially with two Adam optimisers and resumable checkpoints.

    ``images``: float32 (N, C, H, W) in [0, 1]; ``labels``: int (N,) for a
    conditional pair, else None. ``device``: a torch device, or "auto", "cpu" or
    "cuda" as in ``train.device``. ``cfg``: a :class:`GanTrainingConfig`, a mapping of
    its fields, or None (defaults); keyword ``options`` override single fields
    (``fit_gan(pair, x, epochs=5, seed=0, device=dev)``). ``checkpoint``: the file
    of the resumable state, written every ``cfg.checkpoint_every`` epochs and at the
    end; if it exists and was made by the same pair, config, seed and data,
    training resumes from it. ``monitor(pair, epoch)`` runs after each epoch; its
    values go into the history row (under their own names) and the report.

    Each epoch takes ``N // batch_size`` full batches of a fresh permutation (the
    remainder is dropped: every step, and so every batch-norm statistic, sees a
    full batch, as in the DCGAN recipe); fewer than ``batch_size`` images make one
    batch of all of them.
    """
    cfg = _config(cfg, options)
    device = pick_device(device) if isinstance(device, str) else device
    start_wall = time.perf_counter()
    images = np.asarray(images)
    labels = None if labels is None else np.asarray(labels).astype(np.int64).reshape(-1)
    _check_data(pair, images, labels)
    keep = _subsample_index(len(images), cfg.max_train_samples, seed)
    images = np.ascontiguousarray(images[keep], dtype=np.float32)
    labels = None if labels is None else np.ascontiguousarray(labels[keep])

    pair.to(device)
    if prefers_channels_last(pair, device, graphed=False):
        # The engine's rule; for the DCGAN on CPU it is neutral (1.02x, bench/channels_last_cpu.py).
        pair.to(memory_format=torch.channels_last)
    betas = (cfg.beta1, cfg.beta2)
    opt_g = torch.optim.Adam(pair.generator.parameters(), lr=cfg.lr_g, betas=betas)
    opt_d = torch.optim.Adam(pair.discriminator.parameters(), lr=cfg.lr_d, betas=betas)
    fingerprint = _fingerprint(pair, cfg, seed, _digest(images, labels))

    epoch, step = 0, 0
    history: list[dict[str, Any]] = []
    resumed_from = 0
    if checkpoint is not None and checkpoint.exists():
        # Loaded to the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("fingerprint") == fingerprint:
            pair.load_state_dict(state["pair"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            epoch, step, history = state["epoch"], state["step"], state["history"]
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            resumed_from = epoch
            log.info("resuming from %s at epoch %d", checkpoint, epoch)
        else:
            log.info("ignoring %s: made by another pair, config or data", checkpoint)

    x_all = torch.from_numpy(images).to(device)
    y_all = None if labels is None else torch.from_numpy(labels).to(device)
    n = len(images)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    compute_seconds, steps_here = 0.0, 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    d_params = list(pair.discriminator.parameters())

    while epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        pair.train()
        # The batch order of epoch e depends only on (seed, e): resuming replays it exactly.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(device)
        steps: dict[str, list[float]] = {name: [] for name in STEP_PARTS}
        bar = _progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        for i in range(steps_per_epoch):
            index = order[i * batch : (i + 1) * batch]
            x = x_all[index]
            y = None if y_all is None else y_all[index]
            sync()
            t0 = time.perf_counter()
            z = torch.randn(batch, pair.latent_dim, device=device)

            # Discriminator: real -> 1, fake -> 0. The fakes are detached: this update leaves G alone.
            with _autocast(device, cfg.amp):
                fake = pair.generator(z, y)
                real_logits = pair.discriminator(x, y)
                fake_logits = pair.discriminator(fake.detach(), y)
            d_loss = _bce(real_logits, real=True) + _bce(fake_logits, real=False)
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()

            # Generator: non-saturating loss against the updated D. D's weights need no
            # gradient here, so autograd skips them (it still differentiates through D).
            for p in d_params:
                p.requires_grad_(False)
            with _autocast(device, cfg.amp):
                gen_logits = pair.discriminator(fake, y)
            g_loss = _bce(gen_logits, real=True)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            for p in d_params:
                p.requires_grad_(True)
            sync()
            compute_seconds += time.perf_counter() - t0
            step += 1
            steps_here += 1
            with torch.no_grad():
                d_real = torch.sigmoid(real_logits.float()).mean()
                d_fake = torch.sigmoid(fake_logits.float()).mean()
            # One device->host transfer per step for all values together.
            values = torch.stack([d_loss.detach(), g_loss.detach(), d_real, d_fake]).tolist()
            for name, value in zip(STEP_PARTS, values, strict=True):
                steps[name].append(value)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(d=f"{values[0]:.3g}", g=f"{values[1]:.3g}", refresh=False)
        if bar is not None:
            bar.close()
        epoch += 1
        train_means = {name: float(np.mean(values)) for name, values in steps.items()}
        monitored = {} if monitor is None else {k: float(v) for k, v in monitor(pair, epoch).items()}
        seconds = time.perf_counter() - epoch_start
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "seconds": seconds,
            **{f"train_{k}": v for k, v in train_means.items()},
        }
        clash = set(row) & set(monitored)
        if clash:
            raise ValueError(f"monitor returned reserved history keys: {sorted(clash)}")
        row.update(monitored)
        history.append(row)
        log.info(
            "epoch %d: d_loss %.4f, g_loss %.4f, D(x) %.3f, D(G(z)) %.3f%s",
            epoch,
            train_means["d_loss"],
            train_means["g_loss"],
            train_means["d_real"],
            train_means["d_fake"],
            "".join(f", {k} {v:.4g}" for k, v in monitored.items()),
        )
        if on_epoch is not None:
            on_epoch(GanEpochReport(epoch, step, train_means, monitored, steps, seconds), pair)
        if checkpoint is not None and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs):
            _save_checkpoint(
                checkpoint,
                {
                    "fingerprint": fingerprint,
                    "pair": pair.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "history": history,
                    "torch_rng": torch.get_rng_state(),
                    # z is drawn on the device: keep its generator too (CUDA runs are not
                    # bit-identical anyway, but they then resume on the same noise stream).
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
            )

    pair.to(memory_format=torch.contiguous_format)  # as a loaded pair computes (see engine.fit)
    pair.eval()
    return GanFitResult(
        pair=pair,
        epochs_run=epoch,
        resumed_from_epoch=resumed_from,
        history=history,
        wall_seconds=time.perf_counter() - start_wall,
        compute_seconds=compute_seconds,
        train_steps=steps_here,
    )
