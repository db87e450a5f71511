"""The ``evaluate`` stage: score a trained model on the test split.

For every family: reconstruction error of clean test samples (MSE, PSNR) at
each latent size, and how well the model restores each corruption of the
``corrupt`` stage (PSNR of the noisy input against the restoration). Writes a
DVC metrics file, DVC plot tables, and figures for the report.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentlab import metrics as m
from latentlab.atomic import atomic_dir, atomic_path, write_json
from latentlab.config import Params
from latentlab.data.store import load_manifest, load_split, to_unit_float
from latentlab.models.pca import PCA
from latentlab.paths import ProjectPaths
from latentlab.plots import save_image_grid, save_line_plot


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, Any]  # what goes to metrics/{dataset}/{family}.json
    metrics_path: Path
    report_dir: Path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _corruptions(corrupted_dir: Path) -> list[dict[str, Any]]:
    """The corruption entries of the ``corrupt`` stage's manifest (empty when absent)."""
    path = corrupted_dir / "manifest.json"
    if not path.exists():
        return []
    return list(json.loads(path.read_text(encoding="utf-8"))["corruptions"])


def evaluate_pca(params: Params, dataset: str, paths: ProjectPaths) -> EvalResult:
    from latentlab.corrupt import load_corruption

    cfg = params.evaluate
    manifest = load_manifest(paths.processed(dataset))
    pca = PCA.load(paths.model(dataset, "pca") / "pca.npz")
    sizes = sorted(params.train.pca.latent_sizes)
    test_full = load_split(paths.processed(dataset), "test")
    limit = cfg.max_test_samples
    # The same seeded subset of test rows for clean and corrupted inputs (rows align).
    keep = np.arange(len(test_full))
    if limit is not None and len(test_full) > limit:
        keep = np.sort(np.random.default_rng(params.train.seed).permutation(len(test_full))[:limit])
    test = test_full.subset(keep)
    clean = test.unit_float()

    reconstruction: dict[str, dict[str, float]] = {}
    recon_rows: list[dict[str, Any]] = []
    recon_images = []
    # Test rows are grouped by class: evenly spaced rows show every class.
    show = np.unique(np.linspace(0, len(clean) - 1, cfg.grid_size).round().astype(int))
    shown = clean[show]
    for k in sizes:
        restored = pca.reconstruct(clean, k)
        entry = {
            "mse": m.mse(clean, restored),
            "psnr": m.psnr(clean, np.clip(restored, 0, 1)),
            "explained_variance_ratio": pca.explained_variance_ratio(k),
        }
        reconstruction[str(k)] = entry
        recon_rows.append({"latent_size": k, **entry})
        recon_images.append(np.clip(restored[show], 0, 1))

    denoising: dict[str, dict[str, float]] = {}
    grid_rows, grid_labels = [shown], ["clean"]
    best_k = sizes[-1]
    for entry in _corruptions(paths.corrupted(dataset)):
        name = entry["name"]
        noisy = to_unit_float(load_corruption(paths.corrupted(dataset), name, "test").x[keep])
        scores = {"noisy_psnr": m.psnr(clean, noisy)}
        for k in sizes:
            scores[f"pca{k}_psnr"] = m.psnr(clean, np.clip(pca.reconstruct(noisy, k), 0, 1))
        denoising[name] = scores
        best_k = max(sizes, key=lambda k, s=scores: s[f"pca{k}_psnr"])
        grid_rows += [noisy[show], np.clip(pca.reconstruct(noisy[show], best_k), 0, 1)]
        grid_labels += [name, f"PCA k={best_k}"]

    result = {
        "n_test": len(test),
        "reconstruction": reconstruction,
        "denoising": denoising,
    }
    metrics_path = paths.metrics(dataset, "pca")
    write_json(metrics_path, result)
    _write_csv(paths.reconstruction_curve(dataset, "pca"), recon_rows)
    report_dir = paths.evaluation_report(dataset, "pca")
    title = f"{dataset}: PCA"
    spectrogram = manifest.modality == "spectrogram"
    with atomic_dir(report_dir) as tmp:
        save_image_grid(
            [shown, *recon_images],
            ["test", *[f"k={k}" for k in sizes]],
            tmp / "reconstruction.png",
            title=f"{title} reconstructions",
            spectrogram=spectrogram,
        )
        save_line_plot(
            sizes,
            {"test MSE": [reconstruction[str(k)]["mse"] for k in sizes]},
            tmp / "mse_vs_latent.png",
            xlabel="latent size (principal components)",
            ylabel="test MSE (pixels in [0, 1])",
            title=f"{title}: reconstruction error",
            logy=True,
        )
        if denoising:
            save_image_grid(
                grid_rows,
                grid_labels,
                tmp / "denoising.png",
                title=f"{title}: corruptions and PCA restorations",
                spectrogram=spectrogram,
            )
        write_json(tmp / "summary.json", {"dataset": dataset, "family": "pca", "modality": manifest.modality, **result})
    return EvalResult(result, metrics_path, report_dir)


Evaluator = Callable[[Params, str, ProjectPaths], EvalResult]

#: Model family name -> evaluator.
EVALUATORS: dict[str, Evaluator] = {"pca": evaluate_pca}
