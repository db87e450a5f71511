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


def save_figure(fig, path: Path, *, dpi: int = 90, layout: bool = True, **savefig_options) -> Path:
    """Lay ``fig`` out (``tight_layout`` unless ``layout`` is False), write it to ``path``
    through a temporary file (never a half-written PNG) and free it."""
    if layout:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, **savefig_options)
    _pyplot().close(fig)
    return Path(path)


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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def save_roc_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float], float]], path: Path, title: str = ""
) -> Path:
    """ROC curves, one per name: ``{name: (fpr (M,), tpr (M,), auc)}``, with the chance diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance (0.500)")
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(np.asarray(fpr), np.asarray(tpr), linewidth=1.5, label=f"{name} ({float(auc):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", title="AUROC", title_fontsize=7)
    return save_figure(fig, path)


def save_score_histograms(
    normal_scores: np.ndarray,
    anomaly_scores: np.ndarray,
    threshold: float | None,
    path: Path,
    title: str = "",
    *,
    xlabel: str = "anomaly score",
    logx: bool = False,
) -> Path:
    """Overlaid density histograms of normal (N,) and anomalous (M,) scores on shared bins.

    ``threshold`` (score > threshold flags an anomaly) is drawn as a vertical
    line; ``logx`` uses log-spaced bins (positive scores such as errors only).
    """
    plt = _pyplot()
    normal = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    anomaly = np.asarray(anomaly_scores, dtype=np.float64).reshape(-1)
    both = np.concatenate([normal, anomaly])
    both = both[np.isfinite(both)]
    if both.size == 0:
        raise ValueError("no finite scores to draw")
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        hi = lo + 1.0
    use_log = logx and lo > 0
    bins = np.geomspace(lo, hi, 41) if use_log else np.linspace(lo, hi, 41)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for scores, name, colour in ((normal, "normal", "tab:blue"), (anomaly, "anomalous", "tab:red")):
        scores = scores[np.isfinite(scores)]
        if scores.size:
            ax.hist(scores, bins=bins, density=True, alpha=0.5, color=colour, label=f"{name} (n={scores.size})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(float(threshold), color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.4g}")
    if use_log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_code_activations(
    activations: dict[str, np.ndarray], path: Path, title: str = "", *, n_samples: int = 50, max_cols: int = 4
) -> Path:
    """Code activity per setting (e.g. one per sparsity target rho and weight beta).

    ``activations`` maps a label to codes (N, k). Each setting gets a labelled
    panel pair: on top a heatmap of the codes of its first ``n_samples``
    samples (rows) by unit (columns), below the mean activation of every unit
    over all N samples as bars, with the overall mean in the panel title. At
    most ``max_cols`` settings per row of the grid.
    """
    if not activations:
        raise ValueError("no activations to draw")
    plt = _pyplot()
    items = [(name, np.asarray(codes, dtype=np.float64).reshape(len(codes), -1)) for name, codes in activations.items()]
    n_cols = min(max_cols, len(items))
    n_grid_rows = -(-len(items) // n_cols)
    fig = plt.figure(figsize=(3.3 * n_cols, 3.7 * n_grid_rows + 0.5))
    outer = fig.add_gridspec(n_grid_rows, n_cols, hspace=0.45, wspace=0.35)
    for i, (name, codes) in enumerate(items):
        r, c = divmod(i, n_cols)
        # Per setting: heatmap and its colour bar on top, mean activation per unit below.
        cell = outer[r, c].subgridspec(2, 2, height_ratios=[2, 1], width_ratios=[20, 1], hspace=0.12, wspace=0.05)
        top = fig.add_subplot(cell[0, 0])
        bar_axis = fig.add_subplot(cell[0, 1])
        bottom = fig.add_subplot(cell[1, 0], sharex=top)
        shown = codes[:n_samples]
        finite = codes[np.isfinite(codes)]
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        hi = max(float(finite.max()), lo + 1e-12) if finite.size else 1.0
        image = top.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", vmin=lo, vmax=hi)
        top.set_title(f"{name}\nmean activation {np.nanmean(codes):.3g}", fontsize=8)
        top.set_ylabel(f"sample (first {len(shown)})", fontsize=7)
        top.tick_params(labelsize=6, labelbottom=False)
        fig.colorbar(image, cax=bar_axis).ax.tick_params(labelsize=6)
        means = np.nanmean(codes, axis=0) if len(codes) else np.zeros(codes.shape[1])
        bottom.bar(np.arange(len(means)), means, width=0.9, color="tab:blue")
        bottom.set_xlim(-0.5, len(means) - 0.5)
        bottom.set_xlabel("unit", fontsize=7)
        bottom.set_ylabel("mean", fontsize=7)
        bottom.tick_params(labelsize=6)
        bottom.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, layout=False, bbox_inches="tight")


def save_tiles(rows: Sequence[np.ndarray], path: Path, *, scale: int = 2, spectrogram: bool = False) -> Path:
    """A bare grid of images (one row per array of (n, C, H, W) in [0, 1]) written with PIL.

    No labels or axes: about a hundred times cheaper than :func:`save_image_grid`,
    for figures drawn every epoch.
    """
    from PIL import Image

    shown = [displayable(r) for r in rows]
    if spectrogram:
        shown = [s[:, ::-1] for s in shown]  # low frequencies at the bottom
    n_cols = max(len(s) for s in shown)
    h, w = shown[0].shape[1:3]
    pad = 2
    colour = shown[0].ndim == 4
    canvas = np.ones((len(shown) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), np.float32)
    for r, images in enumerate(shown):
        for c, image in enumerate(images):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[top : top + h, left : left + w] = image if colour else image[..., None]
    pixels = (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def save_image_mosaic(
    images: np.ndarray,
    path: Path,
    *,
    title: str = "",
    xticks: Sequence[float] | None = None,
    yticks: Sequence[float] | None = None,
    xlabel: str = "",
    ylabel: str = "",
    spectrogram: bool = False,
) -> Path:
    """A grid of images (R, K, C, H, W) in [0, 1] drawn as one picture with labelled axes.

    Row 0 is drawn at the top. ``xticks`` (K values) and ``yticks`` (R values,
    top row first) label the columns and rows, e.g. the latent coordinates a
    decoder was evaluated at; one imshow call, so large grids stay cheap.
    """
    grid = np.asarray(images, dtype=np.float32)
    if grid.ndim != 5:
        raise ValueError(f"images must be (rows, cols, C, H, W), got shape {grid.shape}")
    n_rows, n_cols = grid.shape[:2]
    shown = displayable(grid.reshape(-1, *grid.shape[2:]))  # (R K, H, W[, 3])
    if spectrogram:
        shown = shown[:, ::-1]
    h, w = shown.shape[1:3]
    tiles = shown.reshape(n_rows, n_cols, *shown.shape[1:])
    # (R, K, H, W[, 3]) -> (R H, K W[, 3])
    canvas = np.concatenate([np.concatenate(list(row), axis=1) for row in tiles], axis=0)
    plt = _pyplot()
    side = min(9.0, max(3.5, 0.45 * max(n_rows, n_cols)))
    fig, ax = plt.subplots(figsize=(side + 0.8, side * n_rows / max(n_cols, 1) + 0.6))
    ax.imshow(canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if xticks is not None:
        ax.set_xticks((np.arange(n_cols) + 0.5) * w - 0.5, [f"{v:.2g}" for v in xticks], fontsize=6)
    else:
        ax.set_xticks([])
    if yticks is not None:
        ax.set_yticks((np.arange(n_rows) + 0.5) * h - 0.5, [f"{v:.2g}" for v in yticks], fontsize=6)
    else:
        ax.set_yticks([])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=100)


def save_tradeoff_panels(
    points: Sequence[dict[str, float]],
    point_labels: Sequence[str],
    panels: Sequence[tuple[str, str]],
    path: Path,
    *,
    axis_labels: dict[str, str] | None = None,
    reference: dict[str, float] | None = None,
    reference_label: str = "reference",
    title: str = "",
) -> Path:
    """Side-by-side scatter panels of the same labelled points, joined in order.

    ``points``: one mapping of measure -> value per point (e.g. one per
    truncation level); ``panels``: (x measure, y measure) per panel;
    ``point_labels`` annotate the points. ``reference`` (a mapping of the same
    measures, e.g. the real-data floor) is drawn as a star in every panel that
    it has both measures of. ``axis_labels`` renames measures on the axes.
    """
    if len(points) != len(point_labels):
        raise ValueError(f"{len(points)} points but {len(point_labels)} labels")
    if not panels:
        raise ValueError("no panels to draw")
    names = axis_labels or {}
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (x_key, y_key) in zip(axes[0], panels, strict=True):
        xs = [float(p[x_key]) for p in points]
        ys = [float(p[y_key]) for p in points]
        ax.plot(xs, ys, marker="o", color="tab:blue", linewidth=1)
        for x, y, label in zip(xs, ys, point_labels, strict=True):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if reference is not None and x_key in reference and y_key in reference:
            ax.scatter(
                [float(reference[x_key])],
                [float(reference[y_key])],
                marker="*",
                s=120,
                color="tab:red",
                label=reference_label,
                zorder=3,
            )
            ax.legend(fontsize=7)
        ax.set_xlabel(names.get(x_key, x_key))
        ax.set_ylabel(names.get(y_key, y_key))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
