"""The ``evaluate`` stage: score one trained model of ``train.zoo`` on a dataset's test split.

For every latent size: reconstruction error of the clean test samples (MSE,
PSNR, SSIM); for a denoising model, the same against the clean images from its
corruption; and for the largest latent size, the latent space: 2-D maps of the
test codes (PCA, t-SNE, UMAP), an interactive 3-D page of the leading principal
components, and k-means on the codes against the labels (NMI, ARI).

Writes a DVC metrics file, a DVC plot table and figures for the report.
Comparisons across models and with classical baselines are the ``compare``
stage's (:mod:`latentlab.compare`).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentlab import metrics as m
from latentlab.atomic import atomic_dir, atomic_path, write_json
from latentlab.config import Params
from latentlab.data.store import Manifest, SplitArrays, load_manifest, load_split, to_unit_float
from latentlab.paths import ProjectPaths

Array = np.ndarray


@dataclass(frozen=True)
class Reconstructor:
    """One trained model at one latent size, as numpy functions on float images (N, C, H, W)."""

    model: str  # name in train.zoo
    family: str
    latent_size: int
    denoise_from: tuple[str, ...]  # corruptions it learned to undo; empty for a plain autoencoder
    encode: Callable[[Array], Array]  # (N, C, H, W) -> (N, k)
    reconstruct: Callable[[Array], Array]  # (N, C, H, W) -> (N, C, H, W), clipped to [0, 1]

    @property
    def label(self) -> str:
        return f"{self.model} k={self.latent_size}"

    @property
    def trained_on(self) -> str:
        """The corruptions it learned to undo, e.g. ``white_snr5db + babble_snr5db``."""
        return " + ".join(self.denoise_from)


def _denoise_from(meta: dict[str, Any]) -> tuple[str, ...]:
    """A saved model's corruptions: a list, or one name (models saved before lists were allowed)."""
    value = meta.get("denoise_from")
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def load_reconstructors(params: Params, dataset: str, model: str, paths: ProjectPaths) -> list[Reconstructor]:
    """Every latent size of a trained model, smallest first."""
    spec = params.train.spec(model)
    folder = paths.model(dataset, model)
    if spec.family == "pca":
        from latentlab.models.pca import PCA

        pca = PCA.load(folder / "pca.npz")
        return [
            Reconstructor(
                model,
                "pca",
                k,
                (),
                encode=lambda x, k=k: pca.encode(x, k).astype(np.float32),
                reconstruct=lambda x, k=k: np.clip(pca.reconstruct(x, k), 0.0, 1.0),
            )
            for k in sorted(spec.latent_sizes)
        ]
    from latentlab import engine

    device = engine.pick_device(params.train.device)
    out = []
    for k in sorted(spec.latent_sizes):
        net, meta = engine.load_model(folder / f"k{k}.pt", device)
        out.append(
            Reconstructor(
                model,
                spec.family,
                k,
                _denoise_from(meta),
                encode=lambda x, net=net: engine.encode(net, x, device),
                reconstruct=lambda x, net=net: np.clip(engine.reconstruct(net, x, device), 0.0, 1.0),
            )
        )
    return out


@dataclass(frozen=True)
class TestSet:
    """The (possibly capped) test split, as float images, and the rows kept."""

    arrays: SplitArrays
    rows: np.ndarray  # indices into the full test split (to align corrupted copies)
    clean: Array  # float32 (N, C, H, W)
    show: np.ndarray  # rows (into ``clean``) drawn in example grids: evenly spaced, so every class shows


def load_test_set(params: Params, dataset: str, paths: ProjectPaths) -> TestSet:
    from latentlab.train import subsample_index

    full = load_split(paths.processed(dataset), "test")
    rows = subsample_index(len(full), params.evaluate.max_test_samples, params.train.seed)
    arrays = full.subset(rows)
    clean = arrays.unit_float()
    show = np.unique(np.linspace(0, len(clean) - 1, params.evaluate.grid_size).round().astype(int))
    return TestSet(arrays, rows, clean, show)


def corrupted_test(paths: ProjectPaths, dataset: str, corruption: str, test: TestSet) -> Array:
    """The test rows of ``test`` under ``corruption``, float32 (N, C, H, W)."""
    from latentlab.corrupt import load_corruption

    return to_unit_float(load_corruption(paths.corrupted(dataset), corruption, "test").x[test.rows])


def quality(reference: Array, estimate: Array) -> dict[str, float]:
    return {"mse": m.mse(reference, estimate), "psnr": m.psnr(reference, estimate), "ssim": m.ssim(reference, estimate)}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def latent_space(
    rec: Reconstructor, test: TestSet, manifest: Manifest, params: Params, figures: Path, title: str
) -> dict[str, float]:
    """Maps of the test codes and k-means agreement with the labels."""
    from latentlab.latent_maps import embed_2d, save_latent_map, save_pca3d_html
    from latentlab.train import subsample_index

    cfg = params.evaluate.latent
    rows = subsample_index(len(test.clean), cfg.max_samples, params.train.seed)
    codes, labels = rec.encode(test.clean[rows]), test.arrays.y[rows]
    agreement = m.cluster_agreement(codes, labels, len(manifest.class_names), params.train.seed)
    if rec.model not in cfg.models:
        return agreement
    for method in cfg.methods:
        embedding = embed_2d(codes, method, params.train.seed)
        save_latent_map(
            embedding,
            labels,
            manifest.class_names,
            figures / f"latent_{method}.png",
            f"{title}: {method.upper()} of test codes",
        )
    save_pca3d_html(
        codes, labels, manifest.class_names, figures / "latent_pca3d.html", f"{title}: 3 leading principal components"
    )
    return m.cluster_agreement(codes, labels, len(manifest.class_names), params.train.seed)


def evaluate_model(params: Params, dataset: str, model: str, paths: ProjectPaths) -> tuple[dict[str, Any], Path, Path]:
    """Evaluate ``model`` on ``dataset``; returns (metrics, metrics file, figures folder)."""
    from latentlab.plots import save_image_grid, save_line_plot

    manifest = load_manifest(paths.processed(dataset))
    spectrogram = manifest.modality == "spectrogram"
    test = load_test_set(params, dataset, paths)
    reconstructors = load_reconstructors(params, dataset, model, paths)
    title = f"{dataset}: {model}"
    result: dict[str, Any] = {"n_test": len(test.clean), "family": reconstructors[0].family, "reconstruction": {}}
    grid_rows, grid_labels, curve = [test.clean[test.show]], ["test"], []
    for rec in reconstructors:
        restored = rec.reconstruct(test.clean)
        scores = quality(test.clean, restored)
        if rec.family == "pca":
            from latentlab.models.pca import PCA

            scores["explained_variance_ratio"] = PCA.load(
                paths.model(dataset, model) / "pca.npz"
            ).explained_variance_ratio(rec.latent_size)
        result["reconstruction"][str(rec.latent_size)] = scores
        curve.append({"latent_size": rec.latent_size, **scores})
        grid_rows.append(restored[test.show])
        grid_labels.append(f"k={rec.latent_size}")

    largest = reconstructors[-1]
    with atomic_dir(paths.evaluation_report(dataset, model)) as figures:
        save_image_grid(
            grid_rows,
            grid_labels,
            figures / "reconstruction.png",
            title=f"{title} reconstructions",
            spectrogram=spectrogram,
        )
        save_line_plot(
            [r["latent_size"] for r in curve],
            {"test MSE": [r["mse"] for r in curve]},
            figures / "mse_vs_latent.png",
            xlabel="latent size",
            ylabel="test MSE (pixels in [0, 1])",
            title=f"{title}: reconstruction error",
            logy=True,
        )
        if largest.denoise_from:
            # Per corruption it learned: the noisy test set and each latent size's restoration.
            # One grid: the clean row, then per corruption its noisy row and the restored rows.
            result["denoising"] = {}
            rows, labels = [test.clean[test.show]], ["clean"]
            for corruption in largest.denoise_from:
                noisy = corrupted_test(paths, dataset, corruption, test)
                scores = result["denoising"][corruption] = {"noisy": quality(test.clean, noisy)}
                rows.append(noisy[test.show])
                labels.append(corruption)
                for rec in reconstructors:
                    restored = rec.reconstruct(noisy)
                    scores[f"k{rec.latent_size}"] = quality(test.clean, restored)
                    rows.append(restored[test.show])
                    labels.append(f"k={rec.latent_size}")
            save_image_grid(
                rows, labels, figures / "denoising.png", title=f"{title}: denoising", spectrogram=spectrogram
            )
        result["latent"] = {
            "latent_size": largest.latent_size,
            **latent_space(largest, test, manifest, params, figures, f"{title} k={largest.latent_size}"),
        }
        write_json(
            figures / "summary.json",
            {
                "dataset": dataset,
                "model": model,
                "modality": manifest.modality,
                "denoise_from": list(largest.denoise_from),  # in training order (the JSON sorts keys)
                **result,
            },
        )
    metrics_path = paths.metrics(dataset, model)
    write_json(metrics_path, result)
    write_csv(paths.reconstruction_curve(dataset, model), curve)
    return result, metrics_path, paths.evaluation_report(dataset, model)
