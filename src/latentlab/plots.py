"""Figures for reports: image grids and simple line plots, written as PNG.

matplotlib is imported lazily with the non-interactive Agg backend so that
stages run headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from latentlab.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def displayable(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W) grey or (N, H, W, 3) colour for imshow.

    Four-band SAT-6 patches are shown as RGB (the NIR band is dropped).
    """
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    if images.shape[1] == 1:
        return images[:, 0]
    return np.transpose(images[:, :3], (0, 2, 3, 1))


def save_image_grid(
    rows: Sequence[np.ndarray], row_labels: Sequence[str], path: Path, title: str = "", *, spectrogram: bool = False
) -> Path:
    """One row per array of images (each (n, C, H, W) in [0, 1]); label on the left.

    Spectrograms are drawn with low frequencies at the bottom, as is usual.
    """
    plt = _pyplot()
    n_rows = len(rows)
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols + 1.4, 1.15 * n_rows + 0.4), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        shown = displayable(images)
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(shown):
                ax.imshow(
                    shown[c],
                    cmap="gray" if shown.ndim == 3 else None,
                    vmin=0,
                    vmax=1,
                    origin="lower" if spectrogram else "upper",
                )
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def save_line_plot(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
) -> Path:
    """One line per named series over the same x values."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, values in series.items():
        ax.plot(list(x), list(values), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
