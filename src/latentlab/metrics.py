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
