"""The ``train`` stage: fit one model of ``train.zoo`` on one dataset's training split.

PCA is fitted in closed form; every neural family goes through the training
engine (:mod:`latentlab.engine`). Trainers are chosen by family through
:data:`TRAINERS`; each writes its model folder atomically and returns the
figures worth logging.

Under torchrun (several processes, :mod:`latentlab.distributed`) every rank
calls the trainer with its ``dist`` context: every rank trains every network
(DistributedDataParallel needs all of them in every step), and rank 0 alone
writes the model folder and logs.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from latentlab.atomic import atomic_dir, write_json
from latentlab.config import ModelSpec, Params, PcaSpec
from latentlab.data.store import SplitArrays, load_manifest, load_split, to_unit_float
from latentlab.distributed import DistributedContext, cpu_threads_per_process
from latentlab.errors import ConfigError
from latentlab.models.pca import PCA
from latentlab.paths import ProjectPaths


class RunLog(Protocol):
    """What a trainer may log (implemented by :class:`latentlab.tracking.RunLogger`)."""

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None: ...
    def log_series(self, key: str, values: list[float], start_step: int = 0) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_torch_model(self, model: Any, name: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...


class EpochLosses(Protocol):
    """The loss figures of one finished epoch (:class:`latentlab.engine.EpochReport`,
    :class:`latentlab.adversarial.GanEpochReport`)."""

    epoch: int  # 1-based
    step: int  # optimiser steps so far, this epoch's included
    steps: dict[str, list[float]]  # each loss part at every step of this epoch


def log_epoch_losses(run: RunLog, report: EpochLosses, prefix: str = "", **per_epoch: dict[str, float]) -> None:
    """Log an epoch's losses: every step of each part, and the epoch's figures.

    ``{prefix}step.{part}`` gets one value per optimiser step (one batched
    series per part: a call per step costs ~7 ms on SQLite, more than the step);
    each ``per_epoch`` group (``train``, ``val``, ``monitor``) goes to
    ``{prefix}{group}.{part}`` at step ``epoch``.
    """
    steps_this_epoch = len(next(iter(report.steps.values()), []))
    first = report.step - steps_this_epoch
    for part, values in report.steps.items():
        run.log_series(f"{prefix}step.{part}", values, start_step=first)
    run.log_metrics({f"{prefix}{group}": figures for group, figures in per_epoch.items()}, step=report.epoch)


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)


def subsample_index(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted row indices: all of ``0..n-1``, or ``limit`` of them from a seeded permutation."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def subsample(arrays: SplitArrays, limit: int | None, seed: int) -> SplitArrays:
    """At most ``limit`` samples, drawn without replacement from a seeded permutation."""
    return arrays.subset(subsample_index(len(arrays), limit, seed))


def train_pca(
    params: Params,
    dataset: str,
    name: str,
    paths: ProjectPaths,
    run: RunLog | None,
    *,
    dist: DistributedContext | None = None,
) -> TrainResult:
    """Fit PCA once at the largest latent size; smaller sizes are its prefixes.

    A closed-form fit has nothing to share between processes: under torchrun
    rank 0 fits and writes it, the other ranks return the same folder at once.
    """
    spec = params.train.spec(name)
    assert isinstance(spec, PcaSpec)
    if dist is not None and not dist.is_main:
        return TrainResult(paths.model(dataset, name), {})
    limit = spec.training_for(load_manifest(paths.processed(dataset)).modality).max_train_samples
    train = subsample(load_split(paths.processed(dataset), "train"), limit, params.train.seed)
    x = train.unit_float()
    pca = PCA.fit(x, max(spec.latent_sizes))
    with atomic_dir(paths.model(dataset, name)) as tmp:
        pca.save(tmp / "pca.npz")
        write_json(
            tmp / "meta.json",
            {
                "family": "pca",
                "latent_sizes": sorted(spec.latent_sizes),
                "n_train": len(train),
                "sample_shape": list(x.shape[1:]),
            },
        )
    metrics = {f"k{k}.explained_variance_ratio": pca.explained_variance_ratio(k) for k in sorted(spec.latent_sizes)}
    metrics["n_train"] = float(len(train))
    return TrainResult(
        paths.model(dataset, name), metrics, {"spec": spec.model_dump(mode="json"), "seed": params.train.seed}
    )


def training_pairs(
    paths: ProjectPaths, dataset: str, spec: ModelSpec, split: str, limit: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(inputs, targets, labels) of a split as float32 (N, C, H, W).

    For a denoising model the inputs are the corrupted rows and the targets the
    clean ones (rows align: the corrupt stage keeps the processed order). With
    m corruptions in ``denoise_from`` the arrays hold m * N rows: every kept
    clean sample once per corruption, the corruptions one after the other; a
    corruption with D noise draws of the split (``corrupt.audio_train_draws``)
    gives D * N rows, draw after draw.
    """
    clean = load_split(paths.processed(dataset), split)
    index = subsample_index(len(clean), limit, seed)
    x = to_unit_float(clean.x[index])
    corruptions = spec.corruptions_for(load_manifest(paths.processed(dataset)).modality)
    if not corruptions:
        return x, None, clean.y[index]
    from latentlab.corrupt import load_corruption

    corrupted_dir = paths.corrupted(dataset)
    for corruption in corruptions:
        if not (corrupted_dir / f"{corruption}.npz").exists():
            raise ConfigError(
                f"params.yaml: train.zoo.*.denoise_from: no corruption {corruption!r} in {corrupted_dir} "
                "(names come from the corrupt section, e.g. gaussian_sigma0.3 or white_snr5db)"
            )
    noisy = [to_unit_float(load_corruption(corrupted_dir, c, split).draws(index)) for c in corruptions]
    copies = sum(len(n) for n in noisy) // len(index)  # corruptions times their draws
    if copies == 1:
        return noisy[0], x, clean.y[index]
    return np.concatenate(noisy), np.tile(x, (copies, 1, 1, 1)), np.tile(clean.y[index], copies)


def train_network(
    params: Params,
    dataset: str,
    name: str,
    paths: ProjectPaths,
    run: RunLog | None,
    *,
    dist: DistributedContext | None = None,
) -> TrainResult:
    """Train one network per latent size with the engine; keep the best-validation weights.

    ``dist``: this process's rank under torchrun (None: one process). Every rank
    runs every fit; only rank 0 writes the model folder (``run`` is None on the
    others). Every rank returns the same metrics.
    """
    import torch

    from latentlab import engine
    from latentlab.models.base import build_model
    from latentlab.plots import save_tiles

    dist = dist or DistributedContext.single()
    spec = params.train.spec(name)
    modality = load_manifest(paths.processed(dataset)).modality
    cfg = spec.training_for(modality)
    seed = params.train.seed
    if dist.distributed:
        # Each rank drives its own GPU (NCCL) or, on CPU (gloo), gets its share of the cores.
        device = dist.device
        threads = params.train.threads or (cpu_threads_per_process() if device.type == "cpu" else None)
    else:
        device = engine.pick_device(params.train.device)
        threads = params.train.threads
    if threads:
        torch.set_num_threads(threads)
    x_in, x_target, _ = training_pairs(paths, dataset, spec, "train", cfg.max_train_samples, seed)
    v_in, v_target, _ = training_pairs(paths, dataset, spec, "val", None, seed)
    train_data, val_data = engine.TrainingData(x_in, x_target), engine.TrainingData(v_in, v_target)
    shape = tuple(int(s) for s in x_in.shape[1:])
    spectrogram = modality == "spectrogram"
    # A few fixed validation images, reconstructed after every epoch.
    show = np.unique(np.linspace(0, len(v_in) - 1, min(8, len(v_in))).round().astype(int))
    metrics: dict[str, float] = {"n_train": float(len(x_in)), "n_val": float(len(v_in))}
    # Only rank 0 writes the model folder; the other ranks get out = None.
    writer = atomic_dir(paths.model(dataset, name)) if dist.is_main else contextlib.nullcontext(None)
    with writer as out, tempfile.TemporaryDirectory() as figures_dir:
        figures = Path(figures_dir)
        for k in sorted(spec.latent_sizes):
            torch.manual_seed(seed)
            model = build_model(
                spec.family, shape, k, level_weight=spec.level_weight_for(modality), **spec.family_options()
            )

            def on_epoch(report: engine.EpochReport, model: Any, k: int = k) -> None:
                if run is None:
                    return
                log_epoch_losses(run, report, f"k{k}.", train=report.train, val=report.val)
                if not report.is_shown():
                    return
                grid = figures / f"k{k}_epoch{report.epoch:03d}.png"
                recon = engine.reconstruct(model, v_in[show], device)
                # Rows: input, output (and the clean target for a denoising model).
                rows = [v_in[show], recon] if v_target is None else [v_in[show], recon, v_target[show]]
                save_tiles(rows, grid, spectrogram=spectrogram)
                run.log_artifact(grid, f"reconstructions/k{k}")

            result = engine.fit(
                model,
                train_data,
                val_data,
                cfg,
                seed=seed,
                device=device,
                checkpoint=paths.checkpoint(dataset, name, k),
                on_epoch=on_epoch,
                dist=dist,
            )
            meta = {
                "family": spec.family,
                "sample_shape": list(shape),
                "latent_dim": k,
                "options": spec.family_options(),
                "denoise_from": list(spec.corruptions_for(modality)) or None,
            }
            if out is not None:
                engine.save_model(result.model, out / f"k{k}.pt", meta)
                write_json(out / f"k{k}_history.json", result.history)
            metrics.update(
                {
                    f"k{k}.best_val_loss": result.best_val_loss,
                    f"k{k}.best_epoch": float(result.best_epoch),
                    f"k{k}.epochs_run": float(result.epochs_run),
                    f"k{k}.train_seconds": result.wall_seconds,
                }
            )
            if run is not None:
                run.log_torch_model(result.model.cpu(), f"model_k{k}")
        if out is not None:
            write_json(
                out / "meta.json",
                {
                    "family": spec.family,
                    "latent_sizes": sorted(spec.latent_sizes),
                    "spec": spec.model_dump(mode="json"),
                    "device": str(device),
                    "world_size": dist.world_size,
                    **metrics,
                },
            )
    return TrainResult(
        paths.model(dataset, name),
        metrics,
        {"spec": spec.model_dump(mode="json"), "seed": seed, "device": str(device), "world_size": dist.world_size},
    )


class Trainer(Protocol):
    """Trains one model of ``train.zoo``; ``dist`` is the process's rank under torchrun (None: one process)."""

    def __call__(
        self,
        params: Params,
        dataset: str,
        name: str,
        paths: ProjectPaths,
        run: RunLog | None,
        *,
        dist: DistributedContext | None = None,
    ) -> TrainResult: ...


#: Model family -> trainer; every family not listed is a network trained by the engine.
TRAINERS: dict[str, Trainer] = {"pca": train_pca}


def trainer_for(family: str) -> Trainer:
    return TRAINERS.get(family, train_network)
