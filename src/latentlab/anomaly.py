"""One-class anomaly detection by reconstruction error (the ``anomaly`` stage's work).

The protocol of the one-class benchmarks on MNIST and CIFAR-10 (Ruff et al.
2018, "Deep One-Class Classification", section 4.1, after Erfani et al. 2016):
each class c in turn is the *normal* class; a fresh autoencoder is trained on
the training images of class c only, and every test image is scored, the
images of the other classes being the anomalies. The anomaly score is the
per-image reconstruction error, MSE(x, decode(encode(x))), as in the
autoencoder baseline of that paper (an image unlike the training class is
reconstructed badly).

Per class: AUROC and AUPRC of the scores (threshold-free), and, for a detector
that must decide, precision / recall / F1 at a threshold fixed in advance on
normal data only: the ``threshold_percentile`` percentile of the scores of the
class-c *validation* images (so about ``100 - percentile`` % of normal data is
flagged). Reported over classes: the mean AUROC and mean AUPRC.

Writes (each atomically): the metrics JSON (a DVC metrics file), a per-class CSV
(a DVC plot), and a figures folder with ``roc.png``, ``scores.png`` and
``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentlab import metrics as m
from latentlab.atomic import atomic_dir, atomic_path, write_json
from latentlab.config import Params
from latentlab.data.store import load_manifest, load_split, to_unit_float
from latentlab.errors import DataError
from latentlab.paths import ProjectPaths

logger = logging.getLogger(__name__)

Array = np.ndarray
MetricsLog = Callable[[dict[str, float], int], None]

ROC_FIGURE = "roc.png"
SCORES_FIGURE = "scores.png"


@dataclass(frozen=True)
class ClassResult:
    """One normal class: its metrics and the scores behind the figures."""

    name: str
    label: int
    metrics: dict[str, float]  # auroc, auprc, threshold, precision, recall, f1, counts, training summary
    test_scores: Array  # (N_test,) reconstruction MSE of every scored test image
    is_anomaly: Array  # (N_test,) bool, label != c
    roc: tuple[Array, Array]  # (fpr (M,), tpr (M,))
    train_seconds: float  # wall time of training (not a metric: it differs between runs)


def _fit_and_score(
    params: Params,
    dataset: str,
    paths: ProjectPaths,
    label: int,
    x_train: Array,
    x_val: Array,
    x_test: Array,
) -> tuple[Array, Array, dict[str, float]]:
    """Train the one-class model of class ``label``; return (val scores, test scores, training summary).

    ``x_train`` (n, C, H, W) and ``x_val`` (m, C, H, W) are images of the class only;
    ``x_test`` (N, C, H, W) is the whole scored test set. Scores are per-image MSE,
    float64 (m,) and (N,).
    """
    cfg = params.evaluate.anomaly
    spec = anomaly_spec(params)
    seed = params.train.seed
    if spec.family == "pca":
        # Closed form: the rank-k subspace of the class (no training loop, no checkpoint).
        from latentlab.models.pca import PCA

        k = min(cfg.latent_size, int(np.prod(x_train.shape[1:])))
        pca = PCA.fit(x_train, k)
        val = m.per_image_mse(x_val, pca.reconstruct(x_val, k))
        test = m.per_image_mse(x_test, pca.reconstruct(x_test, k))
        return val, test, {"best_val_loss": float(val.mean()), "best_epoch": 0.0, "epochs_run": 0.0}

    import torch

    from latentlab import engine
    from latentlab.models.base import build_model

    device = engine.pick_device(params.train.device)
    shape = tuple(int(s) for s in x_train.shape[1:])
    # Weights drawn under the seed, as in the train stage: reruns start from the same network.
    torch.manual_seed(seed)
    # The family's own options, at the anomaly latent size; denoise_from does not apply
    # (the one-class model learns to reconstruct clean normal images).
    model = build_model(spec.family, shape, cfg.latent_size, **spec.family_options())  # type: ignore[arg-type]
    result = engine.fit(
        model,
        engine.TrainingData(x_train),
        engine.TrainingData(x_val),
        cfg.training,
        seed=seed,
        device=device,
        checkpoint=paths.anomaly_checkpoint(dataset, label),
    )
    val, test = (_scores(result.model, x, device, seed) for x in (x_val, x_test))
    summary = {
        "best_val_loss": float(result.best_val_loss),
        "best_epoch": float(result.best_epoch),
        "epochs_run": float(result.epochs_run),
    }
    return val, test, summary


def anomaly_spec(params: Params) -> Any:
    """The spec of ``evaluate.anomaly.model``: a key of train.zoo, or a VAE of generate.zoo."""
    from latentlab.config import VaeSpec
    from latentlab.errors import ConfigError

    name = params.evaluate.anomaly.model
    if name in params.train.zoo:
        return params.train.zoo[name]
    if isinstance(params.generate.zoo.get(name), VaeSpec):
        return params.generate.zoo[name]
    raise ConfigError(
        f"params.yaml: evaluate.anomaly.model: {name!r} is neither a model of train.zoo nor a VAE of generate.zoo"
    )


def score_name(params: Params) -> str:
    """What the anomaly score is, in words (the report says it)."""
    return "negative ELBO (nats)" if anomaly_spec(params).family.startswith("vae") else "reconstruction MSE"


def _scores(model: Any, x: Array, device: Any, seed: int) -> Array:
    """Anomaly scores (N,) float64 of images ``x`` (N, C, H, W): the higher, the more anomalous.

    An autoencoder scores by its per-image reconstruction MSE; a VAE by its
    negative ELBO in nats, an upper bound on -log p(x) (An & Cho 2015 use the
    reconstruction probability, the same idea), on images binarised once with
    ``seed`` for the Bernoulli decoder, with a seeded draw of z.
    """
    import torch

    from latentlab import engine
    from latentlab.models.vae import VariationalAutoencoder, binarise, negative_elbo

    if isinstance(model, VariationalAutoencoder):
        data = binarise(x, seed) if model.likelihood == "bernoulli" else x
        return negative_elbo(model, data, generator=torch.Generator().manual_seed(seed))
    return m.per_image_mse(x, engine.reconstruct(model, x, device))


def one_class(
    params: Params,
    dataset: str,
    paths: ProjectPaths,
    label: int,
    name: str,
    train_x: Array,
    train_y: Array,
    val_x: Array,
    val_y: Array,
    test_x: Array,
    test_y: Array,
) -> ClassResult:
    """Train on class ``label`` and score the test set; images (N, C, H, W) as stored, labels (N,)."""
    from latentlab.train import subsample_index

    cfg = params.evaluate.anomaly
    seed = params.train.seed
    train_rows = np.flatnonzero(train_y == label)
    val_rows = np.flatnonzero(val_y == label)
    if len(train_rows) < 2 or len(val_rows) < 1:
        raise DataError(
            f"{paths.processed(dataset)}: class {name!r} has {len(train_rows)} training and {len(val_rows)} "
            "validation samples; one-class training needs at least 2 and 1"
        )
    # The same seeded subsampling as the train stage, within the class.
    train_rows = train_rows[subsample_index(len(train_rows), cfg.training.max_train_samples, seed)]
    x_train = to_unit_float(train_x[train_rows])
    x_val = to_unit_float(val_x[val_rows])
    x_test = to_unit_float(test_x)
    is_anomaly = test_y != label
    if is_anomaly.all() or not is_anomaly.any():
        raise DataError(
            f"{paths.processed(dataset)}: the scored test set has {int((~is_anomaly).sum())} images of class "
            f"{name!r} and {int(is_anomaly.sum())} of other classes; both are needed (raise "
            "evaluate.anomaly.max_test_samples)"
        )

    start = time.perf_counter()
    val_scores, test_scores, training = _fit_and_score(params, dataset, paths, label, x_train, x_val, x_test)
    seconds = time.perf_counter() - start

    # Threshold from normal validation data only: the test labels never choose it.
    threshold = m.threshold_at_percentile(val_scores, cfg.threshold_percentile)
    detection = m.precision_recall_f1(test_scores, is_anomaly, threshold)
    fpr, tpr, _ = m.roc_curve_points(test_scores, is_anomaly)
    n_normal = int((~is_anomaly).sum())
    metrics = {
        "label": float(label),
        "auroc": m.auroc(test_scores, is_anomaly),
        "auprc": m.auprc(test_scores, is_anomaly),
        "auprc_chance": float(is_anomaly.mean()),  # AUPRC of random scores: the share of anomalies
        "threshold": threshold,
        "precision": detection["precision"],
        "recall": detection["recall"],
        "f1": detection["f1"],
        "false_positive_rate": detection["fp"] / n_normal,  # on normal test images, at the threshold
        "n_train": float(len(x_train)),
        "n_val": float(len(x_val)),
        "n_test_normal": float(n_normal),
        "n_test_anomalous": float(is_anomaly.sum()),
        "mean_score_normal": float(test_scores[~is_anomaly].mean()),
        "mean_score_anomalous": float(test_scores[is_anomaly].mean()),
        **training,
    }
    return ClassResult(name, label, metrics, test_scores, is_anomaly, (fpr, tpr), seconds)


def save_score_histogram_grid(results: list[ClassResult], path: Path, title: str = "") -> Path:
    """One small panel per class: densities of normal and anomalous test scores, and the threshold.

    Bins are log-spaced (reconstruction errors are positive and heavy-tailed) and
    shared by the two histograms of a panel.
    """
    from latentlab.plots import _pyplot

    plt = _pyplot()
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    n_cols = min(5, len(results))
    n_rows = -(-len(results) // n_cols)
    legend_cols = 3 if n_cols >= 3 else 1  # a narrow grid stacks the legend entries
    legend_inches, height = (0.6 if legend_cols == 3 else 0.95), 2.1 * n_rows + 0.5
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, height + legend_inches), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, res in zip(axes.flat, results, strict=False):
        scores = res.test_scores
        positive = scores[scores > 0]
        lo = float(positive.min()) if positive.size else 1e-6
        hi = max(float(scores.max()), lo * 1.01)
        bins = np.geomspace(lo, hi, 31)
        ax.hist(np.maximum(scores[~res.is_anomaly], lo), bins=bins, density=True, alpha=0.55, color="tab:blue")
        ax.hist(np.maximum(scores[res.is_anomaly], lo), bins=bins, density=True, alpha=0.45, color="tab:red")
        ax.axvline(res.metrics["threshold"], color="k", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        # Three labelled ticks across the data: a log range narrower than a decade has no major tick.
        ticks = np.geomspace(lo, hi, 3)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([f"{t:.2g}" for t in ticks]))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
        ax.set_title(f"normal = {res.name}  (AUROC {res.metrics['auroc']:.3f})", fontsize=7)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="tab:blue", alpha=0.55),
        plt.Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.45),
        plt.Line2D([0], [0], color="k", linestyle="--", linewidth=1),
    ]
    fig.legend(
        handles,
        ["normal class (test)", "other classes (test)", "threshold (normal validation percentile)"],
        loc="lower center",
        ncol=legend_cols,
        fontsize=7,
        frameon=False,
        title="reconstruction MSE per image (log scale)",
        title_fontsize=7,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_inches / (height + legend_inches), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def run_anomaly(
    params: Params, dataset: str, paths: ProjectPaths, log: MetricsLog | None = None
) -> tuple[dict[str, Any], Path, Path]:
    """One-class anomaly detection on every class of ``dataset``.

    Returns (metrics, metrics file, figures folder). ``metrics`` is
    ``{"mean_auroc", "mean_auprc", "model", "family", "latent_size",
    "threshold_percentile", "n_test", "per_class": {class name: {...}}}``.
    ``log(metrics, step)`` is called after each class with that class's
    metrics (flat floats, plus ``train_seconds``) and step = the class index.
    Killed and rerun, training resumes from the per-class checkpoints
    (``paths.anomaly_checkpoint``) and gives identical metrics.
    """
    from latentlab.evaluate import write_csv
    from latentlab.plots import save_roc_curves
    from latentlab.train import subsample_index

    cfg = params.evaluate.anomaly
    spec = anomaly_spec(params)
    if params.train.threads:
        import torch

        torch.set_num_threads(params.train.threads)
    folder = paths.processed(dataset)
    manifest = load_manifest(folder)
    train, val, full_test = load_split(folder, "train"), load_split(folder, "val"), load_split(folder, "test")
    # The scored test rows: seeded, the same for every class.
    test = full_test.subset(subsample_index(len(full_test), cfg.max_test_samples, params.train.seed))

    results: list[ClassResult] = []
    for label, name in enumerate(manifest.class_names):
        res = one_class(params, dataset, paths, label, name, train.x, train.y, val.x, val.y, test.x, test.y)
        results.append(res)
        log_line = ", ".join(f"{k} {res.metrics[k]:.4f}" for k in ("auroc", "auprc", "f1"))
        logger.info("%s: normal class %s: %s (%.1f s)", dataset, name, log_line, res.train_seconds)
        if log is not None:
            log({**res.metrics, "train_seconds": res.train_seconds}, label)

    per_class = {res.name: res.metrics for res in results}
    result: dict[str, Any] = {
        "mean_auroc": float(np.mean([res.metrics["auroc"] for res in results])),
        "mean_auprc": float(np.mean([res.metrics["auprc"] for res in results])),
        "model": cfg.model,
        "family": spec.family,
        "score": score_name(params),
        "latent_size": cfg.latent_size,
        "threshold_percentile": cfg.threshold_percentile,
        "n_test": len(test),
        "per_class": per_class,
    }
    table = [
        {
            "class": res.name,
            "auroc": res.metrics["auroc"],
            "auprc": res.metrics["auprc"],
            "f1": res.metrics["f1"],
        }
        for res in results
    ]
    title = f"{dataset}: one-class {cfg.model} (k={cfg.latent_size})"
    with atomic_dir(paths.study_report("anomaly", dataset)) as figures:
        save_roc_curves(
            {res.name: (res.roc[0], res.roc[1], res.metrics["auroc"]) for res in results},
            figures / ROC_FIGURE,
            title=f"{title}: ROC per normal class",
        )
        save_score_histogram_grid(results, figures / SCORES_FIGURE, title=f"{title}: test scores")
        write_json(
            figures / "summary.json",
            {
                "dataset": dataset,
                "modality": manifest.modality,
                **{k: v for k, v in result.items() if k != "per_class"},
                "columns": ["class", "auroc", "auprc", "threshold", "precision", "recall", "f1", "n_train"],
                "rows": [
                    {
                        "class": res.name,
                        **{
                            k: res.metrics[k]
                            for k in ("auroc", "auprc", "threshold", "precision", "recall", "f1", "n_train")
                        },
                    }
                    for res in results
                ],
                "figures": {"roc": ROC_FIGURE, "scores": SCORES_FIGURE},
            },
        )
    metrics_path = paths.study_metrics("anomaly", dataset)
    write_json(metrics_path, result)
    write_csv(paths.study_table("anomaly", dataset), table)
    return result, metrics_path, paths.study_report("anomaly", dataset)
