"""Evaluation building blocks: metrics, classical baselines, latent maps, audio examples, plots.

Hand-computed cases on tiny synthetic data.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from latentlab import metrics
from latentlab.audio_report import audio_table_html, write_audio_examples
from latentlab.baselines import gaussian_blur, median_filter, spectral_subtraction, wiener_filter
from latentlab.latent_maps import embed_2d, save_latent_map, save_pca3d_html
from latentlab.plots import save_code_activations, save_roc_curves, save_score_histograms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _smooth_images(n: int = 3, c: int = 1, size: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.4 * np.sin(2 * np.pi * xx) * np.cos(2 * np.pi * yy)
    return np.broadcast_to(base, (n, c, size, size)).astype(np.float32).copy()


# ----------------------------------------------------------------------- SSIM
@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 16), (1, 5), (4, 6)])
def test_ssim_identical_is_one_and_falls_with_noise(channels: int, size: int) -> None:
    x = _smooth_images(3, channels, size)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    values = [metrics.ssim(x, np.clip(x + sigma * rng.standard_normal(x.shape), 0, 1)) for sigma in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_per_image() -> None:
    x = _smooth_images(2)
    y = x.copy()
    y[1] = 1.0 - y[1]
    per = metrics.per_image_ssim(x, y)
    assert per[0] == pytest.approx(1.0) and per[1] < 0.5
    assert metrics.ssim(x, y) == pytest.approx(per.mean())


# ------------------------------------------------------------------ masked MSE
def test_masked_mse_counts_only_inside_the_mask() -> None:
    ref = np.zeros((2, 3, 4, 4))
    est = np.ones((2, 3, 4, 4))  # error 1 everywhere outside ...
    mask = np.zeros((2, 1, 4, 4), dtype=bool)
    mask[0, 0, :2, :2] = True
    mask[1, 0, 3, 3] = True
    est[0, :, :2, :2] = 0.1  # ... error 0.1 inside for image 0
    est[1, :, 3, 3] = 0.3  # ... error 0.3 inside for image 1
    assert metrics.per_image_masked_mse(ref, est, mask) == pytest.approx([0.01, 0.09])
    assert metrics.masked_mse(ref, est, mask) == pytest.approx(0.05)
    expected_psnr = np.mean([10 * np.log10(1 / 0.01), 10 * np.log10(1 / 0.09)])
    assert metrics.masked_psnr(ref, est, mask) == pytest.approx(expected_psnr)
    assert metrics.mse(ref, est) > 0.5  # the outside error is huge


def test_masked_mse_rejects_empty_or_misshapen_masks() -> None:
    x = np.zeros((2, 1, 3, 3))
    with pytest.raises(ValueError, match="no pixel"):
        metrics.masked_mse(x, x, np.zeros((2, 1, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="mask must be"):
        metrics.masked_mse(x, x, np.ones((2, 3, 3), dtype=bool))


# ------------------------------------------------------------------ anomalies
def test_auroc_known_rankings() -> None:
    labels = np.array([0, 0, 1, 1])
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    # Pairs (anomaly > normal): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.75)
    assert metrics.auroc([0.5, 0.5, 0.5, 0.5], labels) == pytest.approx(0.5)  # ties count one half


def test_auprc() -> None:
    labels = np.array([0, 0, 1, 1])
    assert metrics.auprc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    # Ranked 0.8(+), 0.4(-), 0.35(+), 0.1(-): AP = 0.5 * 1 + 0.5 * 2/3.
    assert metrics.auprc([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.5 + 1 / 3)
    with pytest.raises(ValueError, match="both"):
        metrics.auprc([0.1, 0.2], [0, 0])


def test_roc_curve_points() -> None:
    fpr, tpr, thresholds = metrics.roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert len(fpr) == len(tpr) == len(thresholds)


def test_threshold_at_percentile() -> None:
    scores = np.arange(101, dtype=float)  # 0..100
    assert metrics.threshold_at_percentile(scores, 95) == pytest.approx(95.0)
    assert metrics.threshold_at_percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        metrics.threshold_at_percentile([], 95)


def test_precision_recall_f1_hand_case() -> None:
    scores = np.array([0.1, 0.6, 0.3, 0.7, 0.9, 0.2])
    labels = np.array([0, 1, 0, 1, 0, 1], dtype=bool)
    out = metrics.precision_recall_f1(scores, labels, threshold=0.5)
    # Flagged: 0.6(+), 0.7(+), 0.9(-) -> tp 2, fp 1; missed 0.2(+) -> fn 1; tn 2.
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 2)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    # A score equal to the threshold is not flagged; nothing flagged -> 0, not NaN.
    none = metrics.precision_recall_f1(scores, labels, threshold=0.9)
    assert none["tp"] == none["fp"] == 0 and none["precision"] == none["f1"] == 0.0


# ------------------------------------------------------------------- clusters
def test_cluster_agreement_separated_blobs() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]])
    labels = np.repeat([2, 0, 1], 20)  # cluster ids are arbitrary: label names need not match
    codes = centres[labels] + 0.1 * rng.standard_normal((60, 3))
    out = metrics.cluster_agreement(codes, labels, n_clusters=3, seed=0)
    assert out["nmi"] == pytest.approx(1.0)
    assert out["ari"] == pytest.approx(1.0)
    assert metrics.cluster_agreement(codes, labels, n_clusters=3, seed=0) == out


# --------------------------------------------------------------------- SNR
def test_snr_db_known_error() -> None:
    clean = np.ones((2, 100))
    assert metrics.snr_db(clean, clean + 0.1) == pytest.approx([20.0, 20.0])
    spectrograms = np.ones((1, 1, 4, 5))
    assert metrics.snr_db(spectrograms, spectrograms * 0.9) == pytest.approx([20.0])
    assert metrics.snr_db(clean, clean) == pytest.approx([100.0, 100.0])  # capped, finite
    assert np.isnan(metrics.snr_db(np.zeros((1, 10)), np.ones((1, 10)))[0])


# ------------------------------------------------------------------ baselines
def test_median_filter_removes_isolated_salt_exactly() -> None:
    flat = np.full((2, 3, 9, 9), 0.4, dtype=np.float32)
    salty = flat.copy()
    salty[0, :, 2, 3] = 1.0
    salty[0, 1, 6, 6] = 1.0
    salty[1, 2, 0, 0] = 0.0  # a corner pepper pixel: reflect mode handles borders
    out = median_filter(salty, size=3)
    assert out.dtype == np.float32 and out.shape == salty.shape
    np.testing.assert_array_equal(out, flat)


def test_gaussian_blur_preserves_constant_and_smooths() -> None:
    const = np.full((2, 1, 7, 7), 0.3, dtype=np.float32)
    np.testing.assert_allclose(gaussian_blur(const, sigma=1.0), const, atol=1e-6)
    spike = np.zeros((1, 2, 9, 9), dtype=np.float32)
    spike[0, 0, 4, 4] = 1.0
    blurred = gaussian_blur(spike, sigma=1.0)
    assert blurred[0, 0, 4, 4] < 0.5 and blurred[0, 0].sum() == pytest.approx(1.0, abs=1e-5)
    assert np.all(blurred[0, 1] == 0)  # channels do not mix


def _sine_in_noise(gate: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 one-second 440 Hz sines at 8 kHz (optionally silent for 0.2 s), white noise at 0 dB SNR."""
    rate = 8000
    t = np.arange(rate) / rate
    clean = np.tile(0.5 * np.sin(2 * np.pi * 440 * t), (3, 1)).astype(np.float32)
    if gate:
        clean[:, : rate // 5] = 0.0
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    noise *= np.sqrt((clean**2).mean(axis=1, keepdims=True) / (noise**2).mean(axis=1, keepdims=True))
    reference = (rng.standard_normal(rate) * noise.std()).astype(np.float32)  # another noise-only recording
    return clean, clean + noise, reference


@pytest.mark.parametrize("method", [spectral_subtraction, wiener_filter])
def test_speech_baselines_improve_snr_by_3_db(method) -> None:
    clean, noisy, reference = _sine_in_noise(gate=False)
    before = metrics.snr_db(clean, noisy)
    np.testing.assert_allclose(before, 0.0, atol=1e-3)
    # Noise estimated from a separate noise-only signal.
    out = method(noisy, n_fft=256, hop_length=64, noise=reference)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert np.all(metrics.snr_db(clean, out) - before >= 3.0)
    # Noise estimated from the clip itself: leading silence, or its quietest frames.
    clean, noisy, _ = _sine_in_noise(gate=True)
    before = metrics.snr_db(clean, noisy)
    for noise_from in ("leading", "quietest"):
        out = method(noisy, noise_frames=8, n_fft=256, hop_length=64, noise_from=noise_from)
        assert np.all(metrics.snr_db(clean, out) - before >= 3.0), noise_from
    one = method(noisy[0], noise_frames=8, n_fft=256, hop_length=64)
    assert one.shape == noisy[0].shape


# --------------------------------------------------------------- latent maps
def _blobs(n_per: int = 20, dims: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n_per)
    centres = 6.0 * np.eye(3, dims)
    return centres[labels] + rng.standard_normal((len(labels), dims)), labels


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_embed_2d_shapes(method: str) -> None:
    codes, _ = _blobs()
    out = embed_2d(codes, method, seed=0)
    assert out.shape == (60, 2) and np.isfinite(out).all()


def test_embed_2d_pca_of_2d_codes_is_a_rotation() -> None:
    codes, _ = _blobs(dims=2)
    out = embed_2d(codes, "pca", seed=0)
    centred = codes - codes.mean(axis=0)
    # A rotation (or reflection) keeps all pairwise distances.
    np.testing.assert_allclose(out @ out.T, centred @ centred.T, atol=1e-8)
    assert embed_2d(codes[:, :1], "pca", seed=0).shape == (60, 2)
    with pytest.raises(ValueError, match="method"):
        embed_2d(codes, "lle", seed=0)  # type: ignore[arg-type]


def test_save_latent_map_png(tmp_path: Path) -> None:
    codes, labels = _blobs()
    path = save_latent_map(embed_2d(codes, "pca", seed=0), labels, ["a", "b", "c"], tmp_path / "m" / "map.png", "t")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind


def test_save_pca3d_html_is_self_contained(tmp_path: Path) -> None:
    codes, labels = _blobs(dims=2)  # fewer than 3 dimensions: padded
    path = save_pca3d_html(codes, labels, ["zero", "one", "two"], tmp_path / "pca3d.html", "PCA 3-D")
    text = path.read_text(encoding="utf-8")
    assert "plotly" in text.lower() and "zero" in text
    script_srcs = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']([^\"']*)", text, flags=re.IGNORECASE)
    assert not [src for src in script_srcs if "cdn" in src.lower()]
    assert len(text) > 1_000_000  # plotly.js itself is inlined
    assert list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------------- audio
def test_audio_examples_write_playable_wavs(tmp_path: Path) -> None:
    import soundfile as sf

    rate = 8000
    t = np.arange(rate // 4) / rate
    clean = 0.5 * np.sin(2 * np.pi * 300 * t)
    items = [
        {"name": f"digit 3 #{i}", "clean": clean, "noisy": clean + 0.1, "cleaned": 1.5 * clean, "snr_noisy_db": 5.0}
        for i in range(2)
    ]
    rows = write_audio_examples(tmp_path / "audio", items, rate)
    assert [row["name"] for row in rows] == ["digit 3 #0", "digit 3 #1"]
    for row in rows:
        for kind in ("noisy", "cleaned", "clean"):
            assert "/" not in row[kind]
            data, got_rate = sf.read(tmp_path / "audio" / row[kind])
            assert got_rate == rate and data.shape == clean.shape
            assert np.abs(data).max() <= 1.0
    data, _ = sf.read(tmp_path / "audio" / rows[0]["clean"])
    np.testing.assert_allclose(data, clean, atol=1e-4)  # 16-bit PCM round trip

    html = audio_table_html(rows, base="audio/")
    assert html.count("<audio controls") == 6
    for row_html in re.findall(r"<tr>(.*?)</tr>", html, flags=re.DOTALL)[1:]:
        assert row_html.count("<audio") == 3
    assert f'src="audio/{rows[0]["noisy"]}"' in html
    assert "SNR 5.0 dB" in html and "digit 3 #0" in html


# ---------------------------------------------------------------------- plots
def test_plot_helpers_write_pngs(tmp_path: Path) -> None:
    fpr, tpr, _ = metrics.roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    roc = save_roc_curves({"ae": (fpr, tpr, 0.75), "vae": ([0, 1], [0, 1], 0.5)}, tmp_path / "roc.png", "ROC")
    rng = np.random.default_rng(0)
    hist = save_score_histograms(
        rng.gamma(2.0, 1.0, 200), rng.gamma(5.0, 1.0, 50), 4.0, tmp_path / "hist.png", "scores", logx=True
    )
    acts = {f"rho={rho}, beta={beta}": rng.random((80, 16)) * rho for rho in (0.05, 0.2) for beta in (1, 3)}
    acts["one setting"] = rng.random((10, 4))
    codes = save_code_activations(acts, tmp_path / "acts.png", "activations")
    for path in (roc, hist, codes):
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.png", "hist.png", "roc.png"]
