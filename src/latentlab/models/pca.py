"""Principal component analysis, the linear baseline every autoencoder is compared with.

PCA with k components is the rank-k linear map minimising the squared
reconstruction error (Eckart-Young); its subspaces are nested, so one fit at the
largest k gives every smaller k as a prefix of the components.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentlab.atomic import atomic_path
from latentlab.errors import DataError


@dataclass(frozen=True)
class PCA:
    """A fitted PCA over flattened samples of dimension D."""

    mean: np.ndarray  # (D,) float64
    components: np.ndarray  # (K_max, D) float64, orthonormal rows, by decreasing variance
    explained_variance: np.ndarray  # (K_max,) variance along each component
    total_variance: float  # trace of the covariance, for explained-variance ratios

    @classmethod
    def fit(cls, x: np.ndarray, n_components: int) -> PCA:
        """Fit on ``x`` of shape (N, D) (or (N, C, H, W), flattened).

        Eigen-decomposition of the D x D covariance: D <= 3,136 here (SAT-6), so
        this is faster and more exact than an SVD of the N x D data.
        """
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        n, dim = flat.shape
        if n < 2:
            raise DataError(f"PCA needs at least 2 training samples, got {n}")
        if n_components > dim:
            raise DataError(f"train.pca.latent_sizes: {n_components} components asked, data has only {dim} dimensions")
        mean = flat.mean(axis=0)
        centred = flat - mean
        cov = centred.T @ centred / (n - 1)
        eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
        order = np.argsort(eigvals)[::-1][:n_components]
        components = eigvecs[:, order].T
        # Fix each component's sign (largest-magnitude entry positive) so fits are comparable.
        signs = np.sign(components[np.arange(n_components), np.abs(components).argmax(axis=1)])
        components *= signs[:, None]
        return cls(mean, components, np.clip(eigvals[order], 0.0, None), float(np.trace(cov)))

    @property
    def max_components(self) -> int:
        return len(self.components)

    def _basis(self, k: int) -> np.ndarray:
        if not 1 <= k <= self.max_components:
            raise ValueError(f"k must be in 1..{self.max_components}, got {k}")
        return self.components[:k]

    def encode(self, x: np.ndarray, k: int) -> np.ndarray:
        """(N, ...) -> codes (N, k)."""
        flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        return (flat - self.mean) @ self._basis(k).T

    def decode(self, codes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """codes (N, k) -> samples (N, *shape) as float32."""
        k = codes.shape[1]
        flat = codes @ self._basis(k) + self.mean
        return flat.reshape(len(codes), *shape).astype(np.float32)

    def reconstruct(self, x: np.ndarray, k: int) -> np.ndarray:
        """Project onto the first k components and back; same shape as ``x``."""
        return self.decode(self.encode(x, k), tuple(x.shape[1:]))

    def explained_variance_ratio(self, k: int) -> float:
        return float(self.explained_variance[:k].sum() / self.total_variance) if self.total_variance else 0.0

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                mean=self.mean,
                components=self.components,
                explained_variance=self.explained_variance,
                total_variance=np.array(self.total_variance),
            )

    @classmethod
    def load(cls, path: Path) -> PCA:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["mean"], data["components"], data["explained_variance"], float(data["total_variance"]))
        except FileNotFoundError:
            raise DataError(f"{path}: missing; run the train stage first") from None
