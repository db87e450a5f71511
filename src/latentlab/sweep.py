"""Hyperparameter sweeps: one network per point of a grid (latent size x noise x family options x seed).

The ``sweep`` section of params.yaml names a dataset, a model of ``train.zoo``
and a grid; :func:`sweep_points` turns it into points, :func:`run_point` trains
and scores one point, :func:`summarise` writes the table and figure, and
:func:`log_sweep` records one MLflow parent run with a child run per point.
The Prefect flow ``sweep`` (:mod:`latentlab.orchestration`) runs the points as
task runs, on a Dask cluster or one at a time; this module knows nothing of
Prefect or Dask.

Why a point gives the same result wherever it runs: its model is initialised
under ``torch.manual_seed(point.seed)``, the engine draws each epoch's batch
order from (seed, epoch), and the point trains with one torch thread (the
order of floating-point additions depends on the thread count). A process runs
one point at a time (a lock): torch's RNG and thread count are per process, so
two points in threads of one Dask worker would otherwise disturb each other.

Every finished point leaves ``result.json`` in its folder under
``checkpoints/DATASET/sweep/MODEL/POINT/``; a rerun with the same settings and
data reuses it, and an interrupted point resumes from the engine's checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from latentlab.atomic import atomic_path, write_json
from latentlab.config import FAMILY_AXES, NO_NOISE, AnyModelSpec, Params
from latentlab.data.store import load_manifest
from latentlab.errors import ConfigError, DataError
from latentlab.paths import ProjectPaths
from latentlab.provenance import code_digest

logger = logging.getLogger(__name__)

RESULT_NAME = "result.json"
CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
FIGURE_NAME = "test_mse.png"

#: Columns of the summary table, in order; family axes (rho, beta, lam) follow ``seed`` when the family has them.
_AXIS_COLUMNS = ("latent_size", "noise", "seed")
_METRIC_COLUMNS = (
    "test_mse",
    "test_psnr",
    "best_val_loss",
    "best_epoch",
    "epochs_run",
    "n_train",
    "n_val",
    "n_test",
    "train_seconds",
)

# One point at a time per process: see the module docstring.
_TORCH_LOCK = threading.Lock()


class SweepPoint(BaseModel):
    """One point of the grid, self-contained: a worker needs only this and the project folder."""

    model_config = ConfigDict(frozen=True)

    id: str  # e.g. k4-gaussian_sigma0.3-seed0; names its folder, task run and MLflow child run
    dataset: str
    model: str  # key of train.zoo it starts from
    spec: AnyModelSpec  # that model's spec with this point's latent size, noise, family options and training
    noise: str  # corruption of the inputs (a corrupt-stage name), or "none"
    seed: int  # initialisation and batch order
    data_seed: int  # subsampling of the training and test sets (train.seed: the same rows for every point)
    max_test_samples: int | None
    device: str  # train.device: auto | cpu | cuda

    @property
    def latent_size(self) -> int:
        return self.spec.latent_sizes[0]

    def hyperparameters(self) -> dict[str, float]:
        """The family's own swept-able hyperparameters (rho, beta for sparse; lam for contractive)."""
        options = self.spec.family_options()
        return {axis: float(options[axis]) for axis in FAMILY_AXES if axis in options}


def point_id(latent_size: int, noise: str, seed: int, family_values: Mapping[str, float]) -> str:
    """``k{k}-{noise}[-rho{rho}-beta{beta}|-lam{lam}]-seed{seed}``; family values only for swept axes."""
    family = "".join(f"-{axis}{value:g}" for axis, value in family_values.items())
    return f"k{latent_size}-{noise}{family}-seed{seed}"


def modality_of(params: Params, dataset: str) -> str:
    """``spectrogram`` for speech sources, ``image`` for every other (what the ingest stage records)."""
    return "spectrogram" if params.dataset(dataset).kind == "speech" else "image"


def sweep_points(params: Params) -> list[SweepPoint]:
    """Every point of ``params.sweep``'s grid, in grid order (latent size, noise, family axes, seed).

    An axis left out of the grid takes the model's own value. Raises
    :class:`ConfigError` (one line naming ``sweep.grid.noise``) for a noise the
    corrupt stage does not write.
    """
    cfg = params.sweep
    dataset = params.sweep_dataset()
    spec = params.train.spec(cfg.model)
    modality = modality_of(params, dataset)
    grid = cfg.grid
    latent_sizes = grid.latent_size or spec.latent_sizes
    # A model that learns several corruptions gives one point per corruption on this axis.
    noises = grid.noise or (spec.corruptions_for(modality) or (NO_NOISE,))
    seeds = grid.seed or (params.train.seed,)
    _check_noises(params, dataset, modality, noises)
    family_axes = {axis: values for axis, values in grid.axes().items() if axis in FAMILY_AXES}
    training = cfg.training or spec.training_for(modality)

    points = []
    for k, noise, *family, seed in itertools.product(latent_sizes, noises, *family_axes.values(), seeds):
        family_values = dict(zip(family_axes, (float(v) for v in family), strict=True))
        point_spec = spec.model_copy(
            update={
                "latent_sizes": (k,),
                "denoise_from": None if noise == NO_NOISE else {modality: (noise,)},
                "training": training,
                "training_by_modality": {},  # resolved into `training` above
                **family_values,
            }
        )
        points.append(
            SweepPoint(
                id=point_id(k, noise, seed, family_values),
                dataset=dataset,
                model=cfg.model,
                spec=point_spec,
                noise=noise,
                seed=seed,
                data_seed=params.train.seed,
                max_test_samples=cfg.max_test_samples,
                device=params.train.device,
            )
        )
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"params.yaml: sweep.grid: values too close to tell apart give the point ids {twice}")
    return points


def _check_noises(params: Params, dataset: str, modality: str, noises: Sequence[str]) -> None:
    from latentlab.config import plan_corruptions

    known = [c.name for c in plan_corruptions(modality, params.corrupt)]
    for noise in noises:
        if noise != NO_NOISE and noise not in known:
            raise ConfigError(
                f"params.yaml: sweep.grid.noise: no corruption {noise!r} for {dataset} ({modality} data) "
                f"(the corrupt stage writes: {', '.join(known) or 'none'}; {NO_NOISE!r} = clean inputs)"
            )
    if any(noise != NO_NOISE for noise in noises):
        missing = [split for split in ("train", "val", "test") if split not in params.corrupt.splits]
        if missing:
            raise ConfigError(
                f"params.yaml: corrupt.splits: the sweep's noisy points need every split corrupted "
                f"(missing: {', '.join(missing)})"
            )


def check_inputs(root: Path, points: Sequence[SweepPoint]) -> None:
    """Fail early, in one line, when the processed or corrupted data the points read are missing."""
    paths = ProjectPaths(Path(root))
    for point in points:
        processed = paths.processed(point.dataset)
        if not all((processed / f"{split}.npz").exists() for split in ("train", "val", "test")):
            raise DataError(f"{processed}: missing; run `dvc repro corrupt@{point.dataset}` first")
        if point.noise != NO_NOISE and not (paths.corrupted(point.dataset) / f"{point.noise}.npz").exists():
            raise DataError(
                f"{paths.corrupted(point.dataset) / point.noise}.npz: missing; "
                f"run `dvc repro corrupt@{point.dataset}` first"
            )


@dataclass(frozen=True)
class PointData:
    """What one point trains and is scored on, float32 (N, C, H, W) in [0, 1]."""

    train_in: np.ndarray
    train_target: np.ndarray | None  # None: the target is the input (no noise)
    val_in: np.ndarray
    val_target: np.ndarray | None
    test_in: np.ndarray  # the point's (corrupted) test inputs
    test_clean: np.ndarray  # what the reconstructions are scored against

    def digest(self) -> str:
        h = hashlib.sha256()
        for arr in (self.train_in, self.train_target, self.val_in, self.val_target, self.test_in, self.test_clean):
            if arr is None:
                h.update(b"none")
            else:
                h.update(str(arr.shape).encode())
                h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()


def load_point_data(paths: ProjectPaths, point: SweepPoint) -> PointData:
    """The point's splits: inputs corrupted by ``point.noise`` (rows align with the processed ones), clean targets.

    Training and test rows are subsampled with ``point.data_seed``, so every point sees the same rows.
    """
    from latentlab.data.store import load_split, to_unit_float
    from latentlab.train import subsample_index

    folder = paths.processed(point.dataset)
    limits = {"train": point.spec.training.max_train_samples, "val": None, "test": point.max_test_samples}
    clean: dict[str, np.ndarray] = {}
    noisy: dict[str, np.ndarray | None] = {}
    for split, limit in limits.items():
        full = load_split(folder, split)
        rows = subsample_index(len(full), limit, point.data_seed)
        clean[split] = to_unit_float(full.x[rows])
        noisy[split] = None
        if point.noise != NO_NOISE:
            from latentlab.corrupt import load_corruption

            # Every noise draw of the rows (corrupt.audio_train_draws), as the train stage learns from.
            corrupted = load_corruption(paths.corrupted(point.dataset), point.noise, split)
            noisy[split] = to_unit_float(corrupted.draws(rows))

    def pair(split: str) -> tuple[np.ndarray, np.ndarray | None]:
        corrupted = noisy[split]
        if corrupted is None:
            return clean[split], None
        return corrupted, np.tile(clean[split], (len(corrupted) // len(clean[split]), 1, 1, 1))

    (train_in, train_target), (val_in, val_target) = pair("train"), pair("val")
    test_noisy = noisy["test"]
    return PointData(
        train_in,
        train_target,
        val_in,
        val_target,
        clean["test"] if test_noisy is None else test_noisy,
        clean["test"],
    )


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """This process's only running point, with one torch thread; the caller's thread count and RNG come back."""
    import torch

    with _TORCH_LOCK, torch.random.fork_rng(devices=[]):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def run_point(root: Path, point: SweepPoint) -> dict[str, Any]:
    """Train and score one point; returns its result (also written to its ``result.json``).

    A finished point with the same settings and data is not retrained: its
    result file is read back. Keys: ``id, dataset, model, family, latent_size,
    noise, seed`` (+ ``rho, beta`` or ``lam``), ``test_mse`` (against the clean
    test images, from the point's test inputs), ``test_psnr`` (dB),
    ``best_val_loss, best_epoch, epochs_run, n_train, n_val, n_test,
    train_seconds, device, fingerprint``.
    """
    import torch

    from latentlab import engine
    from latentlab import metrics as m
    from latentlab.models.base import build_model

    paths = ProjectPaths(Path(root))
    folder = paths.sweep_point(point.dataset, point.model, point.id)
    with _one_thread():
        data = load_point_data(paths, point)
        fingerprint = hashlib.sha256(
            json.dumps(
                {"point": point.model_dump(mode="json"), "data": data.digest(), "code": code_digest()}, sort_keys=True
            ).encode()
        ).hexdigest()
        done = _read_result(folder / RESULT_NAME)
        if done is not None and done.get("fingerprint") == fingerprint:
            logger.info("%s: finished earlier, reusing %s", point.id, folder / RESULT_NAME)
            return done

        start = time.perf_counter()
        device = engine.pick_device(point.device)
        spec = point.spec
        shape = tuple(int(s) for s in data.train_in.shape[1:])
        torch.manual_seed(point.seed)
        level_weight = spec.level_weight_for(load_manifest(paths.processed(point.dataset)).modality)
        model = build_model(spec.family, shape, point.latent_size, level_weight=level_weight, **spec.family_options())
        fitted = engine.fit(
            model,
            engine.TrainingData(data.train_in, data.train_target),
            engine.TrainingData(data.val_in, data.val_target),
            spec.training,
            seed=point.seed,
            device=device,
            checkpoint=folder / CHECKPOINT_NAME,
            progress=False,
        )
        # Clipped to the pixel range, as the evaluate stage scores reconstructions.
        recon = np.clip(engine.reconstruct(fitted.model, data.test_in, device), 0.0, 1.0)
        result: dict[str, Any] = {
            "id": point.id,
            "dataset": point.dataset,
            "model": point.model,
            "family": spec.family,
            "latent_size": point.latent_size,
            "noise": point.noise,
            "seed": point.seed,
            **point.hyperparameters(),
            "test_mse": m.mse(data.test_clean, recon),
            "test_psnr": m.psnr(data.test_clean, recon),
            "best_val_loss": float(fitted.best_val_loss),
            "best_epoch": int(fitted.best_epoch),
            "epochs_run": int(fitted.epochs_run),
            "n_train": len(data.train_in),
            "n_val": len(data.val_in),
            "n_test": len(data.test_in),
            "train_seconds": time.perf_counter() - start,
            "device": str(device),
            "fingerprint": fingerprint,
        }
        meta = {
            "family": spec.family,
            "sample_shape": list(shape),
            "latent_dim": point.latent_size,
            "options": spec.family_options(),
            "denoise_from": None if point.noise == NO_NOISE else [point.noise],
        }
        engine.save_model(fitted.model, folder / MODEL_NAME, meta)
        # Written last: its presence means the point is finished.
        write_json(folder / RESULT_NAME, result)
    logger.info(
        "%s: test MSE %.5f, best val loss %.5f after %d epochs (%.1f s)",
        point.id,
        result["test_mse"],
        result["best_val_loss"],
        result["epochs_run"],
        result["train_seconds"],
    )
    return result


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class SweepOutputs:
    metrics: Path  # reports/sweep/DATASET-MODEL/results.json
    table: Path  # reports/sweep/DATASET-MODEL/results.csv
    figures: Path  # reports/sweep/DATASET-MODEL/ (test_mse.png beside the two)


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    family = [axis for axis in FAMILY_AXES if axis in rows[0]]
    return ["id", *_AXIS_COLUMNS, *family, *_METRIC_COLUMNS]


def _sort_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    # Numeric axes sort as numbers (k2 before k16), clean inputs before noisy ones, whatever order the points
    # finished in.
    noise = (row["noise"] != NO_NOISE, row["noise"])
    return (row["latent_size"], noise, *(row.get(axis, 0.0) for axis in FAMILY_AXES), row["seed"])


def summarise(root: Path, results: Sequence[Mapping[str, Any]]) -> SweepOutputs:
    """Write the sweep's JSON and CSV (one row per point, sorted by latent size, noise (none first), family axes,
    seed)
    and a figure of test MSE against latent size, one line per noise (mean over seeds).

    Every result must come from one sweep (one dataset and model).
    """
    from latentlab.plots import save_line_plot

    if not results:
        raise ValueError("no sweep results to summarise")
    pairs = {(r["dataset"], r["model"]) for r in results}
    if len(pairs) != 1:
        raise ValueError(f"results of several sweeps cannot share one summary: {sorted(pairs)}")
    (dataset, model), family = pairs.pop(), results[0]["family"]
    paths = ProjectPaths(Path(root))
    rows = sorted(results, key=_sort_key)
    columns = _columns(rows)
    table = [{c: row[c] for c in columns} for row in rows]
    best = min(table, key=lambda r: r["test_mse"])
    outputs = SweepOutputs(
        paths.sweep_metrics(dataset, model), paths.sweep_table(dataset, model), paths.sweep_report(dataset, model)
    )
    write_json(
        outputs.metrics,
        {
            "dataset": dataset,
            "model": model,
            "family": family,
            "points": len(table),
            "best": {"id": best["id"], "test_mse": best["test_mse"]},
            "columns": columns,
            "rows": table,
        },
    )
    with atomic_path(outputs.table) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)

    # One line per noise (and family setting); several seeds are averaged.
    sizes = sorted({r["latent_size"] for r in table})
    family_axes = [axis for axis in FAMILY_AXES if axis in columns]
    lines: dict[str, dict[int, list[float]]] = {}
    for r in table:
        label = ", ".join([r["noise"], *(f"{axis}={r[axis]:g}" for axis in family_axes)])
        lines.setdefault(label, {}).setdefault(r["latent_size"], []).append(r["test_mse"])
    seeds = len({r["seed"] for r in table})
    series = {label: [float(np.mean(by_size.get(k, [np.nan]))) for k in sizes] for label, by_size in lines.items()}
    save_line_plot(
        sizes,
        series,
        outputs.figures / FIGURE_NAME,
        xlabel="latent size k",
        ylabel="test MSE against clean images" + (f", mean of {seeds} seeds" if seeds > 1 else ""),
        title=f"{dataset}: {model} sweep",
        logy=True,
    )
    return outputs


def log_sweep(
    root: Path,
    params: Params,
    results: Sequence[Mapping[str, Any]],
    outputs: SweepOutputs,
    tags: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """One MLflow parent run ``sweep:DATASET`` with one finished child run per point; returns the parent's id.

    ``tags`` maps a point id to extra tags of its child run (e.g. the worker that ran it).
    """
    from latentlab.tracking import stage_run

    rows = sorted(results, key=_sort_key)
    dataset, model = rows[0]["dataset"], rows[0]["model"]
    columns = _columns(rows)
    axes = [c for c in columns if c not in _METRIC_COLUMNS and c != "id"]
    best = min(rows, key=lambda r: r["test_mse"])
    with stage_run(
        "sweep",
        dataset,
        root=Path(root),
        experiment=params.pipeline.experiment,
        params={"sweep": params.sweep.model_dump(mode="json")},
        tags={"latentlab.model": model, "latentlab.family": rows[0]["family"]},
    ) as run:
        for row in rows:
            run.log_child_run(
                f"sweep:{dataset}:{model}:{row['id']}",
                params={axis: row[axis] for axis in axes},
                metrics={metric: row[metric] for metric in _METRIC_COLUMNS},
                tags={
                    "latentlab.stage": "sweep-point",
                    "latentlab.dataset": dataset,
                    "latentlab.point": row["id"],
                    **(tags or {}).get(row["id"], {}),
                },
            )
        run.log_metrics({"points": len(rows), "best_test_mse": best["test_mse"]})
        run.set_tags({"latentlab.best_point": best["id"]})
        run.log_artifact(outputs.figures, "sweep")
        return run.run_id
