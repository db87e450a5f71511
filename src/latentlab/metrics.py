"""Image-quality metrics shared by every evaluation. Images are float in [0, 1]."""

from __future__ import annotations

import numpy as np

# PSNR of a perfect reconstruction is infinite; cap the per-image MSE so means stay finite.
_MIN_MSE = 1e-10


def per_image_mse(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """(N, ...) x (N, ...) -> (N,) mean squared error of each sample."""
    diff = np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)
    return (diff.reshape(len(diff), -1) ** 2).mean(axis=1)


def mse(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean squared error over every pixel of every sample."""
    return float(per_image_mse(reference, estimate).mean())


def psnr(reference: np.ndarray, estimate: np.ndarray, peak: float = 1.0) -> float:
    """Mean over samples of the per-sample PSNR in dB: 10 log10(peak^2 / MSE_i)."""
    errors = np.maximum(per_image_mse(reference, estimate), _MIN_MSE)
    return float(np.mean(10.0 * np.log10(peak**2 / errors)))


# ----------------------------------------------------------------- structure
# Wang et al. (2004): an 11-tap Gaussian window of std 1.5 (skimage truncates at 3.5 sigma).
_SSIM_SIGMA = 1.5
_SSIM_WIN = 11


def per_image_ssim(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """(N, C, H, W) x (N, C, H, W) in [0, 1] -> (N,) structural similarity of each image.

    ``skimage.metrics.structural_similarity`` with the settings of Wang et al.
    (2004): data range 1, Gaussian weights of std 1.5, population covariance
    (K1 = 0.01, K2 = 0.03). Multi-channel images are compared per channel and
    averaged (``channel_axis=0``). The window that crops the border is 11 px,
    shrunk to the largest odd size that fits images smaller than that.
    """
    from skimage.metrics import structural_similarity

    ref = _images(reference, "reference")
    est = _images(estimate, "estimate")
    _same_shape(ref, est)
    n, c, h, w = ref.shape
    win = min(_SSIM_WIN, h, w)
    win -= 1 - win % 2  # odd, as skimage requires
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        a, b = (ref[i], est[i]) if c > 1 else (ref[i, 0], est[i, 0])
        out[i] = structural_similarity(
            a,
            b,
            data_range=1.0,
            channel_axis=0 if c > 1 else None,
            gaussian_weights=True,
            sigma=_SSIM_SIGMA,
            use_sample_covariance=False,
            win_size=win,
        )
    return out


def ssim(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Mean over images of :func:`per_image_ssim`; images (N, C, H, W) in [0, 1]. 1 for identical images."""
    return float(per_image_ssim(reference, estimate).mean())


def per_image_masked_mse(reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, C, H, W) x (N, C, H, W) x (N, 1, H, W) bool -> (N,) MSE over the masked pixels only.

    The mask selects pixel positions in every channel (e.g. the occluded block of
    block inpainting); each image's error is the mean over its selected
    ``C x count`` values. Every image needs at least one selected pixel.
    """
    ref = _images(reference, "reference")
    est = _images(estimate, "estimate")
    _same_shape(ref, est)
    mask = np.asarray(mask, dtype=bool)
    n, c, h, w = ref.shape
    if mask.shape != (n, 1, h, w):
        raise ValueError(f"mask must be (N, 1, H, W) = {(n, 1, h, w)}, got {mask.shape}")
    counts = mask.reshape(n, -1).sum(axis=1)
    if np.any(counts == 0):
        raise ValueError(f"mask selects no pixel in image(s) {np.flatnonzero(counts == 0)[:10].tolist()}")
    squared = np.where(mask, (ref - est) ** 2, 0.0)  # mask broadcasts over channels
    return squared.reshape(n, -1).sum(axis=1) / (counts * c)


def masked_mse(reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray) -> float:
    """Mean over images of :func:`per_image_masked_mse` (error inside ``mask`` (N, 1, H, W) only)."""
    return float(per_image_masked_mse(reference, estimate, mask).mean())


def masked_psnr(reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray, peak: float = 1.0) -> float:
    """Mean over images of the PSNR in dB computed from :func:`per_image_masked_mse`.

    As :func:`psnr`, a perfect region is capped (MSE floored at 1e-10, i.e. 100 dB).
    """
    errors = np.maximum(per_image_masked_mse(reference, estimate, mask), _MIN_MSE)
    return float(np.mean(10.0 * np.log10(peak**2 / errors)))


def _images(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"{name} must be images (N, C, H, W), got shape {x.shape}")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"reference {a.shape} and estimate {b.shape} differ in shape")


# ------------------------------------------------------------------ anomalies
def _scores_labels(scores: np.ndarray, is_anomaly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(is_anomaly).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError("anomaly scores contain NaN or infinite values")
    if labels.all() or not labels.any():
        raise ValueError("anomaly labels need both normal and anomalous samples")
    return scores, labels


def auroc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    """Area under the ROC curve, (N,) scores (higher = more anomalous) x (N,) bool labels.

    The probability that a random anomaly scores above a random normal sample
    (ties count one half): 1 for a perfect ranking, 0.5 for chance, 0 reversed.
    """
    from sklearn.metrics import roc_auc_score

    scores, labels = _scores_labels(scores, is_anomaly)
    return float(roc_auc_score(labels, scores))


def auprc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (sklearn), (N,) x (N,) bool.

    Chance level is the share of anomalies; 1 for a perfect ranking.
    """
    from sklearn.metrics import average_precision_score

    scores, labels = _scores_labels(scores, is_anomaly)
    return float(average_precision_score(labels, scores))


def roc_curve_points(scores: np.ndarray, is_anomaly: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of (N,) scores x (N,) bool labels: (fpr, tpr, thresholds), each (M,).

    ``sklearn.metrics.roc_curve`` with collinear points dropped; starts at (0, 0), ends at (1, 1).
    """
    from sklearn.metrics import roc_curve

    scores, labels = _scores_labels(scores, is_anomaly)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return fpr, tpr, thresholds


def threshold_at_percentile(normal_val_scores: np.ndarray, percentile: float) -> float:
    """The ``percentile`` (0-100, linear interpolation) of scores (N,) of normal validation samples.

    Flagging ``score > threshold`` then marks about ``100 - percentile`` % of
    normal data as anomalous (the false-positive rate chosen in advance).
    """
    scores = np.asarray(normal_val_scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ValueError("no normal validation scores to take a percentile of")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(scores, percentile))


def precision_recall_f1(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> dict[str, float]:
    """Detection quality when ``score > threshold`` flags an anomaly; (N,) scores x (N,) bool labels.

    Returns ``precision``, ``recall``, ``f1`` (0 where undefined, e.g. nothing
    flagged), ``threshold``, and the counts ``tp``, ``fp``, ``fn``, ``tn``.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(is_anomaly).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    flagged = scores > threshold
    tp = int(np.sum(flagged & labels))
    fp = int(np.sum(flagged & ~labels))
    fn = int(np.sum(~flagged & labels))
    tn = int(np.sum(~flagged & ~labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


# ------------------------------------------------------------------ clusters
def cluster_agreement(codes: np.ndarray, labels: np.ndarray, n_clusters: int, seed: int) -> dict[str, float]:
    """k-means on codes (N, ...) (flattened per row) against class labels (N,).

    ``sklearn.cluster.KMeans(n_clusters, n_init=10, random_state=seed)``; returns
    ``nmi`` (normalised mutual information, arithmetic mean) and ``ari``
    (adjusted Rand index) between clusters and labels: 1 for a perfect match,
    about 0 for chance.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    codes = np.asarray(codes, dtype=np.float64)
    codes = codes.reshape(len(codes), -1)
    labels = np.asarray(labels).reshape(-1)
    if len(codes) != len(labels):
        raise ValueError(f"{len(codes)} codes but {len(labels)} labels")
    if not 1 <= n_clusters <= len(codes):
        raise ValueError(f"n_clusters={n_clusters} must be between 1 and the number of codes ({len(codes)})")
    assigned = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(codes)
    return {
        "nmi": float(normalized_mutual_info_score(labels, assigned)),
        "ari": float(adjusted_rand_score(labels, assigned)),
    }


# -------------------------------------------------------------------- signals
# Error energy is floored at this share of the clean energy: a perfect estimate scores 100 dB, not inf.
_MIN_ERROR_RATIO = 1e-10
_SILENT_ENERGY = 1e-10


def snr_db(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Per-row SNR in dB, 10 log10(sum clean^2 / sum (clean - estimate)^2), float64 (N,).

    Rows are waveforms (N, T) or anything (N, ...) such as spectrograms,
    flattened per row. Perfect rows are capped at 100 dB; rows whose clean
    energy is at most 1e-10 have no SNR and give NaN (average with ``np.nanmean``).
    """
    clean64 = np.asarray(clean, dtype=np.float64)
    est64 = np.asarray(estimate, dtype=np.float64)
    if clean64.shape != est64.shape:
        raise ValueError(f"clean {clean64.shape} and estimate {est64.shape} differ in shape")
    clean64 = clean64.reshape(len(clean64), -1)
    error = est64.reshape(len(est64), -1) - clean64
    signal = np.sum(clean64**2, axis=1)
    noise = np.maximum(np.sum(error**2, axis=1), _MIN_ERROR_RATIO * signal)
    out = np.full(len(signal), np.nan)
    ok = signal > _SILENT_ENERGY
    out[ok] = 10.0 * np.log10(signal[ok] / noise[ok])
    return out
