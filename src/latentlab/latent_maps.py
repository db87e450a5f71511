"""Pictures of latent spaces: 2-D embeddings of codes and an interactive 3-D PCA view.

:func:`embed_2d` maps codes (N, d) to (N, 2) with PCA, t-SNE or UMAP;
:func:`save_latent_map` draws such an embedding as a PNG scatter coloured by
class; :func:`save_pca3d_html` writes a self-contained Plotly HTML page of the
three leading principal components.

scikit-learn, umap-learn and plotly are imported inside the functions: importing
umap alone takes seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from latentlab.atomic import atomic_path

EmbedMethod = Literal["pca", "tsne", "umap"]
EMBED_METHODS: tuple[str, ...] = ("pca", "tsne", "umap")


def _as_codes(codes: np.ndarray, min_dims: int) -> np.ndarray:
    """(N, ...) -> (N, max(d, min_dims)) float64, flattened per row and zero-padded."""
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim == 1:
        codes = codes[:, None]
    codes = codes.reshape(len(codes), -1)
    if not np.isfinite(codes).all():
        raise ValueError("codes contain NaN or infinite values")
    if codes.shape[1] < min_dims:
        codes = np.pad(codes, ((0, 0), (0, min_dims - codes.shape[1])))
    return codes


def _pca(codes: np.ndarray, k: int) -> np.ndarray:
    """Scores (N, k) of the ``k`` leading principal components (deterministic: full SVD, sklearn's sign flip)."""
    from sklearn.decomposition import PCA

    codes = _as_codes(codes, k)
    if len(codes) < 2:
        return np.zeros((len(codes), k))
    n_comp = min(k, len(codes))
    scores = PCA(n_components=n_comp, svd_solver="full").fit_transform(codes)
    if n_comp < k:
        scores = np.pad(scores, ((0, 0), (0, k - n_comp)))
    return scores


def embed_2d(codes: np.ndarray, method: EmbedMethod, seed: int) -> np.ndarray:
    """Embed codes (N, d) into the plane: (N, 2) float64.

    - ``"pca"``: the two leading principal components (2-D codes come back
      centred and rotated onto their principal axes; 1-D codes get a zero
      second coordinate);
    - ``"tsne"``: ``sklearn.manifold.TSNE(init="pca", learning_rate="auto",
      perplexity=min(30, (N - 1) / 3), random_state=seed)``;
    - ``"umap"``: ``umap.UMAP(n_neighbors=min(15, N - 1), random_state=seed)``
      (seeded UMAP runs single-threaded, hence reproducibly).

    Codes with fewer than two dimensions are zero-padded to two.
    """
    if method not in EMBED_METHODS:
        raise ValueError(f"embedding method must be one of {', '.join(EMBED_METHODS)}, got {method!r}")
    x = _as_codes(codes, 2)
    n = len(x)
    if method == "pca":
        return _pca(x, 2)
    if n < 4:
        raise ValueError(f"{method} needs at least 4 codes, got {n}")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (n - 1) / 3.0)
        tsne = TSNE(n_components=2, init="pca", learning_rate="auto", perplexity=perplexity, random_state=seed)
        return tsne.fit_transform(x).astype(np.float64)
    with warnings.catch_warnings():
        # "n_jobs value 1 overridden ... by setting random_state": intended, for reproducibility.
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*spectral initialisation.*")
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def _class_groups(labels: np.ndarray | None, n: int, class_names: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    """(legend name, boolean row mask) per class present, in label order; one group when unlabelled."""
    if labels is None:
        return [("all", np.ones(n, dtype=bool))]
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{n} points but {len(labels)} labels")
    groups = []
    for value in np.unique(labels):
        name = str(value)
        if class_names is not None and np.issubdtype(labels.dtype, np.integer) and 0 <= value < len(class_names):
            name = str(class_names[int(value)])
        groups.append((name, labels == value))
    return groups


def save_latent_map(
    embedding: np.ndarray,
    labels: np.ndarray | None,
    class_names: Sequence[str] | None,
    path: Path,
    title: str = "",
) -> Path:
    """Scatter of an embedding (N, 2), one colour per class with a legend, as a PNG written atomically.

    ``labels`` (N,) are integer class indices into ``class_names`` (or any values,
    shown as they are); ``None`` draws every point in one colour.
    """
    from latentlab.plots import _pyplot, save_figure

    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"embedding must be (N, 2), got shape {embedding.shape}")
    groups = _class_groups(labels, len(embedding), class_names)
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    size = 12 if len(embedding) <= 2000 else 4
    for i, (name, rows) in enumerate(groups):
        ax.scatter(
            embedding[rows, 0],
            embedding[rows, 1],
            s=size,
            color=cmap(i % cmap.N),
            label=name,
            alpha=0.75,
            linewidths=0,
        )
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    if labels is not None:
        ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return save_figure(fig, path, dpi=100)


def save_pca3d_html(
    codes: np.ndarray,
    labels: np.ndarray | None,
    class_names: Sequence[str] | None,
    path: Path,
    title: str = "",
) -> Path:
    """Interactive 3-D scatter of the three leading principal components of codes (N, d), as HTML.

    Codes with fewer than three dimensions are zero-padded. One Plotly trace
    per class (click the legend to hide or show a class). The page embeds
    plotly.js (``include_plotlyjs=True``), so it opens without a network; its
    div id is fixed so the same codes give the same file. Written atomically.
    """
    import plotly.graph_objects as go

    scores = _pca(codes, 3)
    groups = _class_groups(labels, len(scores), class_names)
    fig = go.Figure()
    for name, rows in groups:
        fig.add_trace(
            go.Scatter3d(
                x=scores[rows, 0].round(5).tolist(),
                y=scores[rows, 1].round(5).tolist(),
                z=scores[rows, 2].round(5).tolist(),
                mode="markers",
                name=name,
                marker={"size": 2.5, "opacity": 0.8},
            )
        )
    fig.update_layout(
        title={"text": title},
        scene={"xaxis_title": "PC 1", "yaxis_title": "PC 2", "zaxis_title": "PC 3"},
        legend={"itemsizing": "constant"},
        margin={"l": 0, "r": 0, "t": 40 if title else 0, "b": 0},
        template="plotly_white",
    )
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True, div_id="latentlab-pca3d")
    return Path(path)
