"""One-class anomaly detection by reconstruction error (the ``anomaly`` stage's work).

The protocol of the one-class benchmarks on MNIST and CIFAR-10 (Ruff et al.
2018, "Deep One-Class Classification", section 4.1, after Erfani et al. 2016):
each class c in turn is the *normal* class; a fresh autoencoder is trained on
the training images of class c only, and every test image is scored, the
images of the other classes being the anomalies. The anomaly score is the
per-image reconstruction error, MSE(x, decode(encode(x))), as in the
autoencoder baseline of that paper (an image unlike the training class is
reconstructed badly). Two options sharpen it (``evaluate.anomaly``):

- ``reconstruction_error: ssim`` measures the error as the structural
  dissimilarity 1 - SSIM(x, x_hat) (Bergmann et al. 2019, "Improving
  unsupervised defect segmentation by applying structural similarity to
  autoencoders"): a blurred but well-placed reconstruction of a normal image
  costs less than a wrong shape.
- ``latent_density: true`` adds how unlikely the image's code is: the squared
  Mahalanobis distance of z = encode(x) under a Gaussian fitted (Ledoit-Wolf
  shrinkage) to the codes of the class's training images. An anomaly the
  decoder happens to reconstruct well still lands off the normal codes. As in
  Abati et al. 2019 ("Latent space autoregression for novelty detection",
  section 3.3), each term is standardised by its mean and standard deviation
  on the class's normal validation images and the standardised terms are
  summed, so neither scale dominates and no anomaly is needed to weigh them.
  The per-class metrics then also give each term's own AUROC.

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
from latentlab.atomic import atomic_dir, write_json
from latentlab.config import AnomalyConfig, Params
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
    test_scores: Array  # (N_test,) anomaly score of every scored test image (see score_name)
    is_anomaly: Array  # (N_test,) bool, label != c
    roc: tuple[Array, Array]  # (fpr (M,), tpr (M,))
    train_seconds: float  # wall time of training (not a metric: it differs between runs)


# Per score term: (scores of the normal validation images (m,), of the test images (N,)), float64.
ScoreTerms = dict[str, tuple[Array, Array]]


def _fit_and_score(
    params: Params,
    dataset: str,
    paths: ProjectPaths,
    label: int,
    x_train: Array,
    x_val: Array,
    x_test: Array,
) -> tuple[ScoreTerms, dict[str, float]]:
    """Train the one-class model of class ``label``; return (its score terms, training summary).

    ``x_train`` (n, C, H, W) and ``x_val`` (m, C, H, W) are images of the class only;
    ``x_test`` (N, C, H, W) is the whole scored test set. The terms are
    ``reconstruction`` (and ``latent`` with ``latent_density``) for an
    autoencoder or PCA, ``negative_elbo`` for a VAE; :func:`combine_terms`
    makes the score of them.
    """
    cfg = params.evaluate.anomaly
    spec = anomaly_spec(params)
    seed = params.train.seed
    if spec.family == "pca":
        # Closed form: the rank-k subspace of the class (no training loop, no checkpoint).
        from latentlab.models.pca import PCA

        k = min(cfg.latent_size, int(np.prod(x_train.shape[1:])))
        pca = PCA.fit(x_train, k)
        terms = _autoencoder_terms(
            lambda x: pca.reconstruct(x, k), lambda x: pca.encode(x, k), x_train, x_val, x_test, cfg
        )
        return terms, {"best_val_loss": float(terms["reconstruction"][0].mean()), "best_epoch": 0.0, "epochs_run": 0.0}

    import torch

    from latentlab import engine
    from latentlab.models.base import build_model
    from latentlab.models.vae import VariationalAutoencoder, binarise, negative_elbo, validation_images

    device = engine.pick_device(params.train.device)
    shape = tuple(int(s) for s in x_train.shape[1:])
    # Weights drawn under the seed, as in the train stage: reruns start from the same network.
    torch.manual_seed(seed)
    # The family's own options, at the anomaly latent size; denoise_from does not apply
    # (the one-class model learns to reconstruct clean normal images).
    model = build_model(spec.family, shape, cfg.latent_size, **spec.family_options())  # type: ignore[arg-type]
    # A VAE is early-stopped on the quantity it is scored by (see validation_images).
    val = validation_images(model, x_val, seed) if isinstance(model, VariationalAutoencoder) else x_val
    result = engine.fit(
        model,
        engine.TrainingData(x_train),
        engine.TrainingData(val),
        cfg.training,
        seed=seed,
        device=device,
        checkpoint=paths.anomaly_checkpoint(dataset, label),
    )
    summary = {
        "best_val_loss": float(result.best_val_loss),
        "best_epoch": float(result.best_epoch),
        "epochs_run": float(result.epochs_run),
    }
    trained = result.model
    if isinstance(trained, VariationalAutoencoder):
        # The negative ELBO in nats, an upper bound on -log p(x) (An & Cho 2015 use the
        # reconstruction probability, the same idea), on images binarised once with
        # ``seed`` for the Bernoulli decoder, with a seeded draw of z.
        def elbo(x: Array) -> Array:
            data = binarise(x, seed) if trained.likelihood == "bernoulli" else x
            return negative_elbo(trained, data, generator=torch.Generator().manual_seed(seed))

        return {"negative_elbo": (elbo(x_val), elbo(x_test))}, summary
    terms = _autoencoder_terms(
        lambda x: engine.reconstruct(trained, x, device),
        lambda x: engine.encode(trained, x, device),
        x_train,
        x_val,
        x_test,
        cfg,
    )
    return terms, summary


def _autoencoder_terms(
    reconstruct: Callable[[Array], Array],
    encode: Callable[[Array], Array],
    x_train: Array,
    x_val: Array,
    x_test: Array,
    cfg: AnomalyConfig,
) -> ScoreTerms:
    """The score terms of a model with ``reconstruct`` (N, C, H, W) -> same and ``encode`` -> (N, k).

    ``reconstruction``: per-image MSE or 1 - SSIM; ``latent`` (with
    ``cfg.latent_density``): the squared Mahalanobis distance of each code
    under the Ledoit-Wolf Gaussian of the training images' codes.
    """

    def error(x: Array) -> Array:
        x_hat = reconstruct(x)
        if cfg.reconstruction_error == "ssim":
            return 1.0 - m.per_image_ssim(x, x_hat)
        return m.per_image_mse(x, x_hat)

    terms: ScoreTerms = {"reconstruction": (error(x_val), error(x_test))}
    if cfg.latent_density:
        from sklearn.covariance import LedoitWolf

        # Shrinkage keeps the inverse covariance well conditioned when codes are few
        # or collinear (a small class, or a latent size near the number of images).
        gaussian = LedoitWolf().fit(np.asarray(encode(x_train), dtype=np.float64))

        def distance(x: Array) -> Array:
            return gaussian.mahalanobis(np.asarray(encode(x), dtype=np.float64))  # squared, (N,)

        terms["latent"] = (distance(x_val), distance(x_test))
    return terms


def combine_terms(terms: ScoreTerms) -> tuple[Array, Array]:
    """The anomaly score (normal validation (m,), test (N,)) of one or several terms.

    One term is the score itself. Several are each standardised by the mean and
    standard deviation of their normal validation scores, then summed (Abati et
    al. 2019, section 3.3); a term constant on validation is only centred.
    """
    if len(terms) == 1:
        return next(iter(terms.values()))
    standardised = []
    for val, test in terms.values():
        centre, spread = float(val.mean()), float(val.std())
        spread = spread if spread > 0.0 else 1.0
        standardised.append(((val - centre) / spread, (test - centre) / spread))
    return sum(v for v, _ in standardised), sum(t for _, t in standardised)  # type: ignore[return-value]


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
    """What the anomaly score is, in words (the report and the figures say it)."""
    cfg = params.evaluate.anomaly
    if anomaly_spec(params).family.startswith("vae"):
        return "negative ELBO (nats)"
    error = "reconstruction MSE" if cfg.reconstruction_error == "mse" else "structural dissimilarity 1 - SSIM"
    if cfg.latent_density:
        return f"standardised {error} + standardised squared Mahalanobis distance of the code"
    return error


def check_score(params: Params) -> None:
    """Refuse score options the model cannot give (before any training)."""
    from latentlab.errors import ConfigError

    cfg = params.evaluate.anomaly
    if anomaly_spec(params).family.startswith("vae") and (cfg.reconstruction_error != "mse" or cfg.latent_density):
        raise ConfigError(
            f"params.yaml: evaluate.anomaly: {cfg.model!r} is a VAE, scored by its negative ELBO; "
            "reconstruction_error: ssim and latent_density: true apply to autoencoders and PCA only"
        )


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
    terms, training = _fit_and_score(params, dataset, paths, label, x_train, x_val, x_test)
    val_scores, test_scores = combine_terms(terms)
    seconds = time.perf_counter() - start
    # With several terms, each one's own AUROC: what each contributes to the sum.
    term_aurocs = (
        {f"auroc_{name}": m.auroc(test, is_anomaly) for name, (_, test) in terms.items()} if len(terms) > 1 else {}
    )

    # Threshold from normal validation data only: the test labels never choose it.
    threshold = m.threshold_at_percentile(val_scores, cfg.threshold_percentile)
    detection = m.precision_recall_f1(test_scores, is_anomaly, threshold)
    fpr, tpr, _ = m.roc_curve_points(test_scores, is_anomaly)
    n_normal = int((~is_anomaly).sum())
    metrics = {
        "label": float(label),
        "auroc": m.auroc(test_scores, is_anomaly),
        "auprc": m.auprc(test_scores, is_anomaly),
        **term_aurocs,
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


def histogram_bins(scores: Array, log_scale: bool, n_bins: int = 30) -> Array:
    """``n_bins + 1`` edges spanning ``scores`` (N,): log-spaced (all scores must be positive) or even."""
    lo = float(scores.min())
    hi = max(float(scores.max()), lo + abs(lo) * 0.01 + 1e-12)  # a constant score still gets a width
    return np.geomspace(lo, hi, n_bins + 1) if log_scale else np.linspace(lo, hi, n_bins + 1)


def save_score_histogram_grid(
    results: list[ClassResult], path: Path, title: str = "", score_label: str = "reconstruction MSE"
) -> Path:
    """One small panel per class: densities of normal and anomalous test scores, and the threshold.

    Bins are shared by the two histograms of a panel: log-spaced where every
    score of the panel is positive (reconstruction errors are positive and
    heavy-tailed), else evenly spaced (a sum of standardised terms can be
    negative). ``score_label`` names the score on the legend.
    """
    from latentlab.plots import _pyplot, save_figure

    plt = _pyplot()
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter

    n_cols = min(5, len(results))
    n_rows = -(-len(results) // n_cols)
    legend_cols = 3 if n_cols >= 3 else 1  # a narrow grid stacks the legend entries
    legend_inches, height = (0.6 if legend_cols == 3 else 0.95), 2.1 * n_rows + 0.5
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, height + legend_inches), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    log_scale = all(bool((res.test_scores > 0).all()) for res in results)
    for ax, res in zip(axes.flat, results, strict=False):
        scores = res.test_scores
        bins = histogram_bins(scores, log_scale)
        ax.hist(scores[~res.is_anomaly], bins=bins, density=True, alpha=0.55, color="tab:blue")
        ax.hist(scores[res.is_anomaly], bins=bins, density=True, alpha=0.45, color="tab:red")
        ax.axvline(res.metrics["threshold"], color="k", linestyle="--", linewidth=1)
        if log_scale:
            ax.set_xscale("log")
        # Three labelled ticks across the data: a log range narrower than a decade has no major tick.
        ticks = histogram_bins(scores, log_scale, n_bins=2)
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
        title=f"{score_label} per image{' (log scale)' if log_scale else ''}",
        title_fontsize=7,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_inches / (height + legend_inches), 1, 1))
    return save_figure(fig, path, layout=False)


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
    check_score(params)
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
        "reconstruction_error": cfg.reconstruction_error,
        "latent_density": cfg.latent_density,
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
        save_score_histogram_grid(
            results, figures / SCORES_FIGURE, title=f"{title}: test scores", score_label=score_name(params)
        )
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
