"""The ``compare`` stage: every model of a dataset side by side, and against classical methods.

- Reconstruction: one table of test MSE, PSNR and SSIM for every model and latent
  size (PCA included), and how close the linear autoencoder comes to PCA:
  its MSE ratio and the principal angles between its decoder's column space and
  the leading principal components (Baldi & Hornik 1989: the optimum spans them).
- Denoising (images): for each corruption, PSNR and SSIM of the noisy input, a
  median filter, a Gaussian blur, the PCA projection and every denoising model,
  with image grids.
- Inpainting (images): block-occluded and masked test images, error measured
  inside the hidden region only.
- Speech cleaning (spectrograms): spectral SNR of the noisy input, of a classical
  Wiener filter (decision-directed, Ephraim & Malah 1984) and of every denoising
  model, with audio examples rebuilt by Griffin-Lim.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from latentlab import metrics as m
from latentlab.atomic import atomic_dir, write_json
from latentlab.config import Params
from latentlab.data.store import Manifest, load_manifest
from latentlab.evaluate import Reconstructor, TestSet, corrupted_test, load_reconstructors, load_test_set, quality
from latentlab.paths import ProjectPaths

Array = np.ndarray


def _model_metrics(params: Params, dataset: str, paths: ProjectPaths) -> dict[str, dict[str, Any]]:
    out = {}
    for model in params.train.models:
        path = paths.metrics(dataset, model)
        if path.exists():
            out[model] = json.loads(path.read_text(encoding="utf-8"))
    return out


def reconstruction_table(per_model: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for model, result in per_model.items():
        for k, scores in sorted(result["reconstruction"].items(), key=lambda kv: int(kv[0])):
            rows.append(
                {
                    "model": model,
                    "family": result.get("family"),
                    "latent_size": int(k),
                    **{s: scores[s] for s in ("mse", "psnr", "ssim")},
                }
            )
    return sorted(rows, key=lambda r: (r["latent_size"], r["mse"]))


def linear_vs_pca(
    params: Params, dataset: str, paths: ProjectPaths, per_model: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """MSE ratio and principal angles (degrees) of each linear autoencoder against PCA."""
    from scipy.linalg import subspace_angles

    from latentlab import engine
    from latentlab.models.pca import PCA

    pca_models = [name for name in per_model if params.train.spec(name).family == "pca"]
    linear_models = [name for name in per_model if params.train.spec(name).family == "linear"]
    if not pca_models or not linear_models:
        return []
    pca_name = pca_models[0]
    pca = PCA.load(paths.model(dataset, pca_name) / "pca.npz")
    rows = []
    for name in linear_models:
        for k, scores in per_model[name]["reconstruction"].items():
            pca_scores = per_model[pca_name]["reconstruction"].get(k)
            if pca_scores is None:
                continue
            net, _ = engine.load_model(paths.model(dataset, name) / f"k{k}.pt")
            decoder = net.decoder.weight.detach().cpu().numpy().astype(np.float64)  # (D, k): spans the code's image
            angles = np.degrees(subspace_angles(decoder, pca.components[: int(k)].T))
            rows.append(
                {
                    "model": name,
                    "latent_size": int(k),
                    "mse": scores["mse"],
                    "pca_mse": pca_scores["mse"],
                    "mse_ratio": scores["mse"] / pca_scores["mse"],
                    "max_principal_angle_deg": float(angles.max()),
                    "principal_angles_deg": [float(a) for a in np.sort(angles)],
                }
            )
    return rows


def _denoisers(params: Params, dataset: str, paths: ProjectPaths) -> tuple[list[Reconstructor], Reconstructor | None]:
    """The largest latent size of every denoising model, and PCA at its largest size."""
    denoisers, pca = [], None
    for model in params.train.models:
        if not paths.model(dataset, model).exists():
            continue
        recs = load_reconstructors(params, dataset, model, paths)
        if recs[-1].denoise_from:
            denoisers.append(recs[-1])
        elif recs[-1].family == "pca" and pca is None:
            pca = recs[-1]
    return denoisers, pca


def _corruptions(paths: ProjectPaths, dataset: str) -> list[dict[str, Any]]:
    path = paths.corrupted(dataset) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8"))["corruptions"] if path.exists() else []


def image_restoration(
    params: Params, dataset: str, paths: ProjectPaths, test: TestSet, figures: Path, spectrogram: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Denoising and inpainting tables: {corruption: {method: scores}}."""
    from latentlab.baselines import gaussian_blur, median_filter
    from latentlab.corrupt import load_corruption
    from latentlab.plots import save_image_grid

    cfg = params.evaluate
    denoisers, pca = _denoisers(params, dataset, paths)
    denoising: dict[str, Any] = {}
    inpainting: dict[str, Any] = {}
    for entry in _corruptions(paths, dataset):
        name = entry["name"]
        noisy = corrupted_test(paths, dataset, name, test)
        methods: dict[str, Array] = {
            "noisy input": noisy,
            f"median {cfg.median_size}x{cfg.median_size}": median_filter(noisy, cfg.median_size),
            f"Gaussian blur sigma={cfg.blur_sigma:g}": gaussian_blur(noisy, cfg.blur_sigma),
        }
        if pca is not None:
            methods[f"PCA k={pca.latent_size}"] = pca.reconstruct(noisy)
        for rec in denoisers:
            methods[f"{rec.label} (trained on {rec.trained_on})"] = rec.reconstruct(noisy)
        denoising[name] = {method: quality(test.clean, out) for method, out in methods.items()}
        region = load_corruption(paths.corrupted(dataset), name, "test").corrupted_region()
        if region is not None:
            region = region[test.rows]
            inpainting[name] = {
                method: {
                    "mse_in_region": m.masked_mse(test.clean, out, region),
                    "psnr_in_region": m.masked_psnr(test.clean, out, region),
                }
                for method, out in methods.items()
            }
        rows = [test.clean[test.show], *[out[test.show] for out in methods.values()]]
        save_image_grid(
            rows,
            # Wrapped: on one line, "denoising k=32 (trained on ...)" with four corruptions took
            # half the figure's width from the images.
            [textwrap.fill(label, 32) for label in ["clean", *methods]],
            figures / f"restore_{name}.png",
            title=f"{dataset}: {name}",
            spectrogram=spectrogram,
        )
    return denoising, inpainting


def _spectral_snr(clean_unit: Array, estimate_unit: Array, manifest: Manifest) -> Array:
    """Per-clip SNR in dB between mel magnitude spectrograms (N,), from [0, 1]-scaled log-mels.

    Undoes the dB scaling, then compares magnitudes sqrt(power): the usual spectral SNR.
    """
    from latentlab.data.speech import SpectrogramScale

    scale = SpectrogramScale.from_json(manifest.extra["scale"])

    def magnitude(u: Array) -> Array:
        return np.sqrt(10.0 ** (scale.from_unit(u.astype(np.float64)) / 10.0))

    return m.snr_db(magnitude(clean_unit), magnitude(estimate_unit))


def speech_cleaning(
    params: Params, dataset: str, paths: ProjectPaths, manifest: Manifest, test: TestSet, figures: Path
) -> dict[str, Any]:
    """Spectral SNR of noisy, Wiener-filtered and autoencoder-cleaned test clips, with WAV examples."""
    from latentlab.audio_report import audio_table_html, write_audio_examples
    from latentlab.baselines import wiener_filter
    from latentlab.corrupt import load_corruption
    from latentlab.data.speech import SpectrogramScale, log_mel_db, spectrogram_to_audio

    extra = manifest.extra
    scale = SpectrogramScale.from_json(extra["scale"])
    denoisers, _ = _denoisers(params, dataset, paths)
    results: dict[str, Any] = {}
    html_parts = []
    for entry in _corruptions(paths, dataset):
        name = entry["name"]
        corrupted = load_corruption(paths.corrupted(dataset), name, "test")
        noisy_unit = corrupted.x[test.rows].astype(np.float32)
        noisy_audio = corrupted.audio[test.rows]
        # The Wiener filter needs a noise estimate. White noise fills every frame, and clips
        # end in silence (FSDD and espeak-ng alike), so each clip's quietest frames give it.
        # Babble is other utterances, zero-padded like the clip, so it is silent exactly where
        # the clip is: no frame is noise-only and that estimate would be ~0 (the filter would
        # pass the input unchanged). Babble gets the time-averaged spectrum of a noise-only
        # reference instead, here the clip's own added noise: the best any stationary filter
        # can do, which makes this baseline optimistic rather than a straw man.
        noise_reference = noisy_audio - test.arrays.audio if entry.get("kind") == "babble" else None
        wiener_audio = wiener_filter(
            noisy_audio,
            n_fft=int(extra["n_fft"]),
            hop_length=int(extra["hop_length"]),
            noise=noise_reference,
            noise_from="quietest",
        )
        wiener_unit = scale.to_unit(log_mel_db(wiener_audio, extra))
        snr = {
            "noisy input": _spectral_snr(test.clean, noisy_unit, manifest),
            "Wiener filter": _spectral_snr(test.clean, wiener_unit, manifest),
        }
        cleaned_by: dict[str, Array] = {}
        for rec in denoisers:
            cleaned = rec.reconstruct(noisy_unit)
            cleaned_by[rec.label] = cleaned
            snr[f"{rec.label} (trained on {rec.trained_on})"] = _spectral_snr(test.clean, cleaned, manifest)
        means = {method: float(np.nanmean(values)) for method, values in snr.items()}
        results[name] = {
            "snr_db": means,
            "improvement_over_noisy_db": {
                method: v - means["noisy input"] for method, v in means.items() if method != "noisy input"
            },
            "improvement_over_wiener_db": {
                method: v - means["Wiener filter"]
                for method, v in means.items()
                if method not in ("noisy input", "Wiener filter")
            },
        }
        n = params.evaluate.audio_examples
        if n and cleaned_by:
            label, cleaned = next(iter(cleaned_by.items()))
            picks = test.show[:n]
            items = [
                {
                    "name": f"{name}_{manifest.class_names[int(test.arrays.y[i])]}_{i}",
                    "noisy": noisy_audio[i],
                    "cleaned": spectrogram_to_audio(cleaned[i], extra),
                    "clean": test.arrays.audio[i],
                    "snr_noisy_db": float(snr["noisy input"][i]),
                    "snr_cleaned_db": float(snr[next(k for k in snr if k.startswith(label))][i]),
                }
                for i in picks
            ]
            rows = write_audio_examples(figures / "audio", items, int(extra["sample_rate"]))
            results[name]["audio_examples"] = {"cleaned_by": label, "rows": rows}
            html_parts.append(f"<h5>{name}: cleaned by {label}</h5>" + audio_table_html(rows, base="audio/"))
    if html_parts:
        # A page of its own beside the WAVs, besides the examples in reports/index.html.
        (figures / "audio_examples.html").write_text("\n".join(html_parts), encoding="utf-8")
    return results


def compare_dataset(params: Params, dataset: str, paths: ProjectPaths) -> tuple[dict[str, Any], Path, Path]:
    """Run every comparison for ``dataset``; returns (metrics, metrics file, figures folder)."""
    manifest = load_manifest(paths.processed(dataset))
    per_model = _model_metrics(params, dataset, paths)
    test = load_test_set(params, dataset, paths)
    result: dict[str, Any] = {
        "reconstruction": reconstruction_table(per_model),
        "linear_vs_pca": linear_vs_pca(params, dataset, paths, per_model),
    }
    with atomic_dir(paths.study_report("compare", dataset)) as figures:
        if manifest.modality == "spectrogram" and manifest.extra.get("scale") is not None:
            result["speech_cleaning"] = speech_cleaning(params, dataset, paths, manifest, test, figures)
            result["denoising"], result["inpainting"] = image_restoration(
                params, dataset, paths, test, figures, spectrogram=True
            )
        else:
            result["denoising"], result["inpainting"] = image_restoration(params, dataset, paths, test, figures)
        write_json(figures / "summary.json", {"dataset": dataset, "modality": manifest.modality, **result})
    metrics_path = paths.study_metrics("compare", dataset)
    write_json(metrics_path, result)
    return result, metrics_path, paths.study_report("compare", dataset)
