"""The ``classifier`` and ``generate`` stages: the domain classifier, VAEs and GANs, and their samples.

Library functions behind the thin adapters of :mod:`latentlab.stages`:

* :func:`train_domain_classifier` fits the small CNN of :mod:`latentlab.quality`
  whose penultimate features define every sample-quality figure, then measures
  its test accuracy and the *real floor*: the same figures for real training
  images scored against real test images (what a generator that draws from the
  data distribution would reach on this number of samples).
* :func:`train_generative` trains one model of ``generate.zoo``: one VAE per
  latent size with the training engine (Kingma & Welling 2014, "Auto-Encoding
  Variational Bayes"), or a GAN pair with :func:`latentlab.adversarial.fit_gan`,
  whose samples the domain classifier labels after every epoch to watch for
  mode collapse.
* :func:`evaluate_generative` draws sample grids, sweeps the truncation ``psi``
  (quality against diversity) and, for VAEs, estimates the test log-likelihood
  with the importance-weighted bound (Burda et al. 2016, eq. 8), decodes linear
  paths between posterior means and, for a 2-D latent space, the learned
  manifold (Kingma & Welling 2014, Fig. 4).
* :func:`generative_report_section` renders what they wrote as an HTML
  fragment of ``reports/index.html``.

Models are dispatched on the type of their spec through :data:`KINDS`
(``VaeSpec`` -> the "vae" kind, ``GanSpec`` -> "gan"); the kind's name is
stored in the model folder's ``meta.json`` so that :func:`load_generative`
rebuilds a model by name alone.

Images are float32 (N, C, H, W) in [0, 1] throughout, as in the rest of the
pipeline. Every output folder is written with :func:`~latentlab.atomic.atomic_dir`
and every file atomically: a failed run leaves the previous outputs intact.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlab.atomic import atomic_dir, atomic_path, save_torch, write_json
from latentlab.config import GanSpec, Params, QualityConfig, VaeSpec
from latentlab.data.store import Manifest, load_manifest, load_split, to_unit_float
from latentlab.errors import DataError
from latentlab.paths import ProjectPaths
from latentlab.train import RunLog, log_epoch_losses, subsample_index

if TYPE_CHECKING:
    import torch

    from latentlab.adversarial import GanEpochReport
    from latentlab.models.gan import GanPair
    from latentlab.models.vae import VariationalAutoencoder
    from latentlab.quality import DomainClassifier

log = logging.getLogger(__name__)

#: File of the domain classifier inside ``paths.classifier(dataset)``.
CLASSIFIER_FILE = "classifier.pt"
#: GAN families whose generator and discriminator take class labels.
CONDITIONAL_FAMILIES = frozenset({"cgan"})
#: Images generated or decoded per forward pass in evaluation.
SAMPLE_BATCH = 1024
#: Side of the decoded manifold grid of a 2-D VAE (Kingma & Welling 2014, Fig. 4, use 20).
MANIFOLD_SIDE = 15
#: Report figures in this order first; any other PNG of the folder follows, sorted.
_FIGURE_ORDER = (
    "samples_psi1.png",
    "quality_vs_diversity.png",
    "samples_by_latent_size.png",
    "interpolation.png",
    "manifold_k2.png",
    "codes_k2.png",
    "training.png",
)
_FID_NOTE = "Fréchet distance in this pipeline's own classifier feature space; not comparable with Inception FID."


# ------------------------------------------------------------------- shared helpers
@dataclass(frozen=True)
class _Context:
    """What every trainer and evaluator of one (dataset, model) needs."""

    params: Params
    dataset: str
    model: str
    spec: VaeSpec | GanSpec
    paths: ProjectPaths
    device: torch.device
    manifest: Manifest

    @property
    def quality(self) -> QualityConfig:
        return self.params.generate.quality

    @property
    def seed(self) -> int:
        return self.params.train.seed

    @property
    def spectrogram(self) -> bool:
        return self.manifest.modality == "spectrogram"

    @property
    def title(self) -> str:
        return f"{self.dataset}: {self.model}"

    @property
    def model_dir(self) -> Path:
        return self.paths.generative_model(self.dataset, self.model)


def _device(params: Params) -> torch.device:
    """The device of ``train.device``, after applying ``train.threads``."""
    import torch

    from latentlab import engine

    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    return engine.pick_device(params.train.device)


def _context(params: Params, dataset: str, model: str, paths: ProjectPaths) -> _Context:
    spec = params.generate.spec(model)
    return _Context(params, dataset, model, spec, paths, _device(params), load_manifest(paths.processed(dataset)))


def _split_images(
    paths: ProjectPaths, dataset: str, split: str, limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 images (N, C, H, W) in [0, 1] and int64 labels (N,) of a split, at most ``limit`` (seeded)."""
    arrays = load_split(paths.processed(dataset), split)
    index = subsample_index(len(arrays), limit, seed)
    return to_unit_float(arrays.x[index]), arrays.y[index].astype(np.int64)


def classifier_file(paths: ProjectPaths, dataset: str) -> Path:
    """The saved domain classifier of ``dataset`` (written by :func:`train_domain_classifier`)."""
    return paths.classifier(dataset) / CLASSIFIER_FILE


def quality_sample_count(quality: QualityConfig, manifest: Manifest) -> int:
    """Samples per quality figure: ``quality.samples``, capped by the test and training split sizes.

    The real floor and every generator are scored on this same number, so
    their figures compare (all of them depend on the sample count).
    """
    counts = [
        quality.samples,
        manifest.counts.get("test", quality.samples),
        manifest.counts.get("train", quality.samples),
    ]
    n = int(min(counts))
    if n < quality.samples:
        log.warning("quality.samples = %d capped to %d, the size of the smallest split", quality.samples, n)
    return n


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """``0, 1, ..., K-1, 0, 1, ...``: (n,) int64 labels asking for every class equally often."""
    return np.arange(n, dtype=np.int64) % num_classes


def draw_samples(
    model: Any,
    n: int,
    *,
    psi: float = 1.0,
    seed: int = 0,
    labels: np.ndarray | None = None,
    batch_size: int = SAMPLE_BATCH,
) -> np.ndarray:
    """``n`` generated images (n, C, H, W) float32 in [0, 1] from a VAE or a GAN pair, reproducibly.

    ``model`` has ``sample(m, psi=..., generator=...)`` (both :class:`VariationalAutoencoder`
    and :class:`GanPair` do); z comes from one CPU generator seeded with ``seed``,
    so torch's global RNG is left alone (a training run that samples after each
    epoch still resumes bit-identically) and the same seed gives the same z at
    every ``psi`` (z is scaled by psi: the truncation trick, Brock et al. 2019,
    section 3.1). ``labels`` (n,) are the classes asked of a conditional GAN;
    None gives a conditional pair :func:`balanced_labels`.
    """
    import torch

    if labels is None and getattr(model, "conditional", False):
        labels = balanced_labels(n, model.num_classes)
    gen = torch.Generator().manual_seed(int(seed))
    out: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        extra = {} if labels is None else {"labels": np.asarray(labels)[start : start + m]}
        out.append(model.sample(m, psi=psi, generator=gen, **extra).float().cpu().numpy())
    if not out:
        return np.zeros((0, *model.sample_shape), np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def _sample_rows(
    model: Any, per_row: int, seed: int, psi: float = 1.0, class_names: Sequence[str] | None = None
) -> tuple[list[np.ndarray], list[str]]:
    """Rows of samples for a grid, with their labels.

    A conditional GAN gets one row per class (``per_row`` samples of it, labelled
    with the class name); any other model ``per_row`` unlabelled rows.
    """
    if getattr(model, "conditional", False):
        k = int(model.num_classes)
        labels = np.repeat(np.arange(k, dtype=np.int64), per_row)  # (K per_row,)
        images = draw_samples(model, len(labels), psi=psi, seed=seed, labels=labels)
        names = list(class_names) if class_names is not None and len(class_names) == k else [str(c) for c in range(k)]
        return [images[c * per_row : (c + 1) * per_row] for c in range(k)], names
    images = draw_samples(model, per_row * per_row, psi=psi, seed=seed)
    return [images[r * per_row : (r + 1) * per_row] for r in range(per_row)], [""] * per_row


def _label_scores(
    classifier: DomainClassifier,
    images: np.ndarray,
    device: torch.device,
    min_fraction: float,
    requested: np.ndarray | None = None,
) -> dict[str, float]:
    """Class coverage and normalised label entropy of images under the classifier (and, given the
    requested classes, the share classified as requested): the mode-collapse watch of a GAN."""
    from latentlab import quality

    k = classifier.num_classes
    predicted = quality.predict_proba(classifier, images, device).argmax(1)  # (N,)
    out = {
        "coverage": quality.class_coverage(predicted, k, min_fraction),
        "entropy_normalised": quality.label_entropy(predicted, k, normalised=True),
    }
    if requested is not None:
        out["label_accuracy"] = float(np.mean(predicted == requested))
    return out


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _set_tags(run: RunLog | None, tags: dict[str, str]) -> None:
    """``run.set_tags`` where the logger has it (the :class:`RunLog` protocol does not require it)."""
    set_tags = getattr(run, "set_tags", None)
    if callable(set_tags):
        set_tags(tags)


# ----------------------------------------------------------------- domain classifier
def train_domain_classifier(
    params: Params, dataset: str, paths: ProjectPaths, run: RunLog | None = None
) -> tuple[dict[str, Any], Path]:
    """Fit the domain classifier of ``dataset``; save it and its metrics. Returns (metrics, metrics file).

    :func:`latentlab.quality.train_classifier` with ``generate.quality.classifier``
    on the processed training split, validated on the validation split (the
    best-validation-accuracy weights are kept), seed ``train.seed``, resumable
    from ``paths.classifier_checkpoint``. Then on the test split: accuracy
    (overall and per class) and the real floor (:func:`latentlab.quality.real_floor`,
    real training against real test images, :func:`quality_sample_count` of each,
    drawn with ``quality.seed``). Writes ``paths.classifier(dataset)/classifier.pt``
    and ``history.json`` (one atomic folder) and the metrics JSON
    ``paths.study_metrics("classifier", dataset)``. Per-epoch training loss,
    validation loss and accuracy and learning rate go to ``run`` as series.
    """
    from latentlab import quality

    q = params.generate.quality
    seed = params.train.seed
    device = _device(params)
    manifest = load_manifest(paths.processed(dataset))
    x, y = _split_images(paths, dataset, "train")
    vx, vy = _split_images(paths, dataset, "val")
    tx, ty = _split_images(paths, dataset, "test")
    k = len(manifest.class_names)
    model, history = quality.train_classifier(
        x,
        y,
        vx,
        vy,
        q.classifier,
        seed=seed,
        device=device,
        checkpoint=paths.classifier_checkpoint(dataset),
        num_classes=k,
    )
    if run is not None:
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            if history.get(key):
                run.log_series(f"classifier.{key}", list(history[key]), start_step=1)

    predicted = quality.predict_proba(model, tx, device).argmax(1)  # (N_test,)
    per_class = {
        name: float(np.mean(predicted[ty == c] == c)) for c, name in enumerate(manifest.class_names) if np.any(ty == c)
    }
    n = quality_sample_count(q, manifest)
    floor = quality.real_floor(model, tx, x, device, n=n, seed=q.seed, k=q.k, min_fraction=q.min_fraction)
    metrics: dict[str, Any] = {
        "dataset": dataset,
        "test_accuracy": float(np.mean(predicted == ty)),
        "val_accuracy": float(history["best_val_accuracy"]),
        "per_class_accuracy": per_class,
        "best_epoch": int(history["best_epoch"]),
        "epochs": len(history.get("epoch", [])),
        "train_samples": int(history["train_samples"]),
        "test_samples": len(tx),
        "num_classes": k,
        "class_names": list(manifest.class_names),
        "resumed_from_epoch": int(history["resumed_from_epoch"]),
        "train_seconds": float(history["wall_seconds"]),
        "floor": floor,
        "floor_samples": n,
    }
    meta = {"dataset": dataset, "class_names": list(manifest.class_names), "test_accuracy": metrics["test_accuracy"]}
    with atomic_dir(paths.classifier(dataset)) as out:
        quality.save_classifier(model, out / CLASSIFIER_FILE, meta)
        write_json(out / "history.json", history)
    metrics_path = paths.study_metrics("classifier", dataset)
    write_json(metrics_path, metrics)
    log.info("domain classifier of %s: test accuracy %.4f", dataset, metrics["test_accuracy"])
    return metrics, metrics_path


def _load_domain_classifier(paths: ProjectPaths, dataset: str, device: torch.device) -> DomainClassifier:
    from latentlab import quality

    model, _ = quality.load_classifier(classifier_file(paths, dataset), device)
    return model


# ------------------------------------------------------------------------------ VAE
def _train_vae(ctx: _Context, run: RunLog | None) -> dict[str, Any]:
    """One VAE per latent size with :func:`latentlab.engine.fit` (negative ELBO, early stopping on it)."""
    import torch

    from latentlab import engine
    from latentlab.models.base import build_model
    from latentlab.models.vae import validation_images
    from latentlab.plots import save_tiles

    spec = ctx.spec
    assert isinstance(spec, VaeSpec)
    cfg, seed = spec.training, ctx.seed
    x, _ = _split_images(ctx.paths, ctx.dataset, "train", cfg.max_train_samples, seed)
    v, _ = _split_images(ctx.paths, ctx.dataset, "val")
    train_data = engine.TrainingData(x)
    shape = tuple(int(s) for s in x.shape[1:])
    per_row = ctx.params.evaluate.grid_size
    metrics: dict[str, float] = {"n_train": float(len(x)), "n_val": float(len(v))}
    with atomic_dir(ctx.model_dir) as out, tempfile.TemporaryDirectory() as figures_dir:
        figures = Path(figures_dir)
        for k in sorted(spec.latent_sizes):
            torch.manual_seed(seed)
            vae = build_model(spec.family, shape, k, **spec.family_options())
            val_data = engine.TrainingData(validation_images(vae, v, seed))  # the same binarisation for every k

            def on_epoch(report: engine.EpochReport, net: Any, k: int = k) -> None:
                if run is None:
                    return
                # Parts: loss, reconstruction, kl, elbo.
                log_epoch_losses(run, report, f"k{k}.", train=report.train, val=report.val)
                if not report.is_shown():
                    return
                rows, _ = _sample_rows(net, per_row, ctx.quality.seed)
                grid = figures / f"k{k}_epoch{report.epoch:03d}.png"
                save_tiles(rows, grid, spectrogram=ctx.spectrogram)
                run.log_artifact(grid, f"samples/k{k}")

            result = engine.fit(
                vae,
                train_data,
                val_data,
                cfg,
                seed=seed,
                device=ctx.device,
                checkpoint=ctx.paths.generative_checkpoint(ctx.dataset, ctx.model, f"k{k}"),
                on_epoch=on_epoch,
            )
            meta = {
                "family": spec.family,
                "sample_shape": list(shape),
                "latent_dim": k,
                "options": spec.family_options(),
            }
            engine.save_model(result.model, out / f"k{k}.pt", meta)
            write_json(out / f"k{k}_history.json", result.history)
            best = next((row for row in result.history if row["epoch"] == result.best_epoch), {})
            metrics.update(
                {
                    f"k{k}.best_val_loss": float(result.best_val_loss),
                    f"k{k}.best_val_elbo": float(best.get("val_elbo", math.nan)),
                    f"k{k}.best_val_kl": float(best.get("val_kl", math.nan)),
                    f"k{k}.best_epoch": float(result.best_epoch),
                    f"k{k}.epochs_run": float(result.epochs_run),
                    f"k{k}.resumed_from_epoch": float(result.resumed_from_epoch),
                    f"k{k}.train_seconds": float(result.wall_seconds),
                }
            )
            if run is not None:
                run.log_torch_model(result.model.cpu(), f"model_k{k}")
        write_json(
            out / "meta.json",
            {
                "kind": "vae",
                "family": spec.family,
                "latent_sizes": sorted(spec.latent_sizes),
                "sample_shape": list(shape),
                "spec": spec.model_dump(mode="json"),
                "device": str(ctx.device),
                **metrics,
            },
        )
    return {
        "metrics": metrics,
        "params": {"spec": spec.model_dump(mode="json"), "seed": seed, "device": str(ctx.device)},
        "model_dir": ctx.model_dir,
    }


def _load_vae(folder: Path, device: torch.device) -> dict[int, VariationalAutoencoder]:
    """Latent size -> VAE (eval mode, on ``device``), smallest first."""
    from latentlab import engine

    meta = _read_json(folder / "meta.json") or {}
    sizes = meta.get("latent_sizes") or sorted(int(p.stem[1:]) for p in folder.glob("k*.pt"))
    out: dict[int, VariationalAutoencoder] = {}
    for k in sorted(int(s) for s in sizes):
        model, _ = engine.load_model(folder / f"k{k}.pt", device)
        out[k] = model  # type: ignore[assignment]
    return out


@dataclass(frozen=True)
class _Evaluated:
    """What a kind's evaluator returns: its own results, and the model the common part samples from."""

    result: dict[str, Any]
    sampler: Any  # a VariationalAutoencoder or a GanPair
    note: str = ""  # a sentence for the report about how quality was measured


def _decode(vae: VariationalAutoencoder, z: np.ndarray, device: torch.device) -> np.ndarray:
    """Decoder mean images (N, C, H, W) float32 of codes z (N, k), in eval mode and batches."""
    import torch

    vae.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(z), SAMPLE_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(z[start : start + SAMPLE_BATCH], np.float32)).to(device)
            out.append(vae.decode(batch).float().cpu().numpy())
    return np.concatenate(out)


def _vae_likelihood(ctx: _Context, vaes: dict[int, VariationalAutoencoder], test_x: np.ndarray) -> dict[str, Any]:
    """Test NLL (importance-weighted, Burda et al. 2016 eq. 8) and negative ELBO (Kingma & Welling 2014
    eq. 3) in nats per image, for every latent size, on the same ``quality.nll_images`` test images."""
    import torch

    from latentlab.models.vae import binarise, importance_sampled_nll, negative_elbo

    q = ctx.quality
    rows = subsample_index(len(test_x), q.nll_images, q.seed)
    grey = test_x[rows]  # (N, C, H, W)
    binary = binarise(grey, q.seed)
    out: dict[str, Any] = {"images": len(rows), "importance_samples": q.nll_importance_samples}
    for k, vae in sorted(vaes.items()):
        x = binary if vae.likelihood == "bernoulli" else grey
        nll = importance_sampled_nll(
            vae, x, k=q.nll_importance_samples, generator=torch.Generator().manual_seed(q.seed)
        )  # (N,)
        nelbo = negative_elbo(vae, x, generator=torch.Generator().manual_seed(q.seed))  # (N,)
        sem = math.sqrt(len(x))
        out[f"k{k}"] = {
            "latent_size": k,
            "likelihood": vae.likelihood,
            "binarised": vae.likelihood == "bernoulli",
            "nll": float(nll.mean()),
            "nll_sem": float(nll.std(ddof=1) / sem) if len(x) > 1 else math.nan,
            "negative_elbo": float(nelbo.mean()),
            "negative_elbo_sem": float(nelbo.std(ddof=1) / sem) if len(x) > 1 else math.nan,
            "gap": float(nelbo.mean() - nll.mean()),
        }
    return out


def _evaluate_vae(
    ctx: _Context, vaes: dict[int, VariationalAutoencoder], figures: Path, test_x: np.ndarray, test_y: np.ndarray
) -> _Evaluated:
    """Likelihood bounds, samples per latent size, interpolations, and the 2-D manifold and code map."""
    from latentlab import engine
    from latentlab.latent_maps import save_latent_map
    from latentlab.plots import save_image_grid, save_image_mosaic

    per_row = ctx.params.evaluate.grid_size
    result: dict[str, Any] = {
        "latent_sizes": sorted(vaes),
        "quality_latent_size": max(vaes),
        "likelihood": _vae_likelihood(ctx, vaes, test_x),
    }
    # One row of psi = 1 samples per latent size, from the same seed.
    save_image_grid(
        [draw_samples(vae, per_row, seed=ctx.quality.seed) for vae in vaes.values()],
        [f"k={k}" for k in vaes],
        figures / "samples_by_latent_size.png",
        title=f"{ctx.title}: samples by latent size",
        spectrogram=ctx.spectrogram,
    )
    # Decoded linear path between the posterior means of two test images of different classes.
    a = 0
    others = np.flatnonzero(test_y != test_y[a])
    b = int(others[0]) if len(others) else min(1, len(test_x) - 1)
    t = np.linspace(0.0, 1.0, max(per_row, 2))  # (T,)
    rows, labels = [], []
    for k, vae in vaes.items():
        mu = engine.encode(vae, test_x[[a, b]], ctx.device)  # (2, k)
        z = (1.0 - t)[:, None] * mu[0] + t[:, None] * mu[1]  # (T, k)
        rows.append(np.concatenate([test_x[[a]], _decode(vae, z, ctx.device), test_x[[b]]]))
        labels.append(f"k={k}")
    save_image_grid(
        rows,
        labels,
        figures / "interpolation.png",
        title=f"{ctx.title}: test image, decoded path between posterior means, test image",
        spectrogram=ctx.spectrogram,
    )
    if 2 in vaes:
        from scipy.stats import norm

        vae = vaes[2]
        # Kingma & Welling 2014, Fig. 4: an evenly spaced grid on the unit square mapped through
        # the inverse Gaussian CDF, so each cell covers equal prior mass; top row = largest z2.
        coords = norm.ppf((np.arange(MANIFOLD_SIDE) + 0.5) / MANIFOLD_SIDE)  # (S,)
        z1, z2 = np.meshgrid(coords, coords[::-1])  # (S, S) each
        z = np.stack([z1.ravel(), z2.ravel()], axis=1)  # (S S, 2)
        images = _decode(vae, z, ctx.device).reshape(MANIFOLD_SIDE, MANIFOLD_SIDE, *vae.sample_shape)
        save_image_mosaic(
            images,
            figures / "manifold_k2.png",
            title=f"{ctx.title} k=2: decoded latent grid (inverse normal CDF)",
            xticks=coords,
            yticks=coords[::-1],
            xlabel="z1",
            ylabel="z2",
            spectrogram=ctx.spectrogram,
        )
        shown = subsample_index(len(test_x), ctx.params.evaluate.latent.max_samples, ctx.seed)
        codes = engine.encode(vae, test_x[shown], ctx.device)  # (N, 2) posterior means
        save_latent_map(
            codes,
            test_y[shown],
            ctx.manifest.class_names,
            figures / "codes_k2.png",
            f"{ctx.title} k=2: posterior means of test images",
        )
    largest = max(vaes)
    return _Evaluated(result, vaes[largest], note=f"Quality is measured on samples of the k={largest} VAE.")


# ------------------------------------------------------------------------------ GAN
def _save_pair(pair: GanPair, path: Path, meta: dict[str, Any]) -> None:
    save_torch({"state_dict": pair.state_dict(), "meta": meta}, path)


def _train_gan(ctx: _Context, run: RunLog | None) -> dict[str, Any]:
    """One GAN pair with :func:`latentlab.adversarial.fit_gan`, watched for mode collapse.

    After every epoch the domain classifier labels ``quality.monitor_samples``
    samples drawn from a fixed seed (the same z every epoch); class coverage and
    normalised label entropy enter the history, and
    :func:`latentlab.quality.mode_collapse_flag` reads them at the end.
    """
    import torch

    from latentlab import quality
    from latentlab.adversarial import fit_gan
    from latentlab.models.gan import build_gan
    from latentlab.plots import save_tiles

    spec = ctx.spec
    assert isinstance(spec, GanSpec)
    cfg, seed, q = spec.training, ctx.seed, ctx.quality
    # The same seeded subset fit_gan would draw (one rule, train.subsample_index): it then keeps all of it.
    x, y = _split_images(ctx.paths, ctx.dataset, "train", cfg.max_train_samples, seed)
    conditional = spec.family in CONDITIONAL_FAMILIES
    num_classes = len(ctx.manifest.class_names) if conditional else None
    shape = tuple(int(s) for s in x.shape[1:])
    classifier = _load_domain_classifier(ctx.paths, ctx.dataset, ctx.device)
    watch_labels = balanced_labels(q.monitor_samples, num_classes) if num_classes else None
    per_row = ctx.params.evaluate.grid_size

    def monitor(pair: GanPair, epoch: int) -> dict[str, float]:
        fake = draw_samples(pair, q.monitor_samples, seed=q.seed, labels=watch_labels)
        return _label_scores(classifier, fake, ctx.device, q.min_fraction, watch_labels)

    torch.manual_seed(seed)
    pair = build_gan(spec.family, shape, spec.latent_dim, num_classes=num_classes, **spec.family_options())
    with atomic_dir(ctx.model_dir) as out, tempfile.TemporaryDirectory() as figures_dir:
        figures = Path(figures_dir)

        def on_epoch(report: GanEpochReport, pair: GanPair) -> None:
            if run is None:
                return
            # Parts: d_loss, g_loss, d_real, d_fake.
            log_epoch_losses(run, report, train=report.train, monitor=report.monitor)
            rows, _ = _sample_rows(pair, per_row, q.seed)
            grid = figures / f"epoch{report.epoch:03d}.png"
            save_tiles(rows, grid, spectrogram=ctx.spectrogram)
            run.log_artifact(grid, "samples")

        result = fit_gan(
            pair,
            x,
            y if conditional else None,
            cfg,
            seed=seed,
            device=ctx.device,
            checkpoint=ctx.paths.generative_checkpoint(ctx.dataset, ctx.model, "gan"),
            on_epoch=on_epoch,
            monitor=monitor,
        )
        flag = quality.mode_collapse_flag(result.history, q.coverage_drop, q.entropy_drop)
        last = result.history[-1] if result.history else {}
        metrics: dict[str, float] = {
            "n_train": float(len(x)),
            "epochs_run": float(result.epochs_run),
            "resumed_from_epoch": float(result.resumed_from_epoch),
            "train_seconds": float(result.wall_seconds),
            "mode_collapse_flag": float(bool(flag)),
            **{f"final.{key}": float(value) for key, value in last.items() if key not in ("epoch", "step", "seconds")},
        }
        meta = {
            "family": spec.family,
            "options": spec.family_options(),
            "latent_dim": spec.latent_dim,
            "num_classes": num_classes,
            "sample_shape": list(shape),
        }
        _save_pair(result.pair, out / "gan.pt", meta)
        write_json(out / "history.json", result.history)
        write_json(
            out / "meta.json",
            {
                "kind": "gan",
                **meta,
                "class_names": list(ctx.manifest.class_names),
                "mode_collapse": flag,
                "spec": spec.model_dump(mode="json"),
                "device": str(ctx.device),
                **metrics,
            },
        )
        if run is not None:
            run.log_torch_model(result.pair.cpu(), "model_gan")
    if flag:
        log.warning("%s: %s", ctx.title, flag)
        _set_tags(run, {"latentlab.mode_collapse": str(flag)})
    return {
        "metrics": metrics,
        "params": {"spec": spec.model_dump(mode="json"), "seed": seed, "device": str(ctx.device)},
        "model_dir": ctx.model_dir,
        "mode_collapse": flag,
    }


def _load_gan(folder: Path, device: torch.device) -> GanPair:
    """The pair saved by :func:`_train_gan`, in eval mode on ``device``."""
    import torch

    from latentlab.models.gan import build_gan

    path = folder / "gan.pt"
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the generate stage first") from None
    meta = payload["meta"]
    pair = build_gan(
        meta["family"],
        tuple(meta["sample_shape"]),
        meta["latent_dim"],
        num_classes=meta["num_classes"],
        **meta["options"],
    )
    pair.load_state_dict(payload["state_dict"])
    pair.to(device).eval()
    return pair


def _evaluate_gan(ctx: _Context, pair: GanPair, figures: Path, test_x: np.ndarray, test_y: np.ndarray) -> _Evaluated:
    """The training record: mode-collapse verdict and the per-epoch watch as a figure."""
    from latentlab.plots import save_line_plot

    meta = _read_json(ctx.model_dir / "meta.json") or {}
    history = _read_json(ctx.model_dir / "history.json") or []
    flag = meta.get("mode_collapse", False)
    result: dict[str, Any] = {
        "latent_dim": pair.latent_dim,
        "conditional": pair.conditional,
        "mode_collapse": flag,
        "mode_collapse_flag": float(bool(flag)),
        "epochs_run": len(history),
    }
    if history:
        result["final_monitor"] = {
            key: float(history[-1][key])
            for key in ("coverage", "entropy_normalised", "label_accuracy")
            if key in history[-1]
        }
        series = {
            "class coverage": "coverage",
            "normalised label entropy": "entropy_normalised",
            "label accuracy": "label_accuracy",
            "mean D(x)": "train_d_real",
            "mean D(G(z))": "train_d_fake",
        }
        save_line_plot(
            [row["epoch"] for row in history],
            {name: [row[key] for row in history] for name, key in series.items() if all(key in r for r in history)},
            figures / "training.png",
            xlabel="epoch",
            ylabel="share / probability",
            title=f"{ctx.title}: training watch ({ctx.quality.monitor_samples} samples per epoch)",
        )
    note = ""
    if pair.conditional:
        note = (
            "Samples ask for every class equally often; label accuracy is the share the classifier "
            "assigns to the class asked for."
        )
    return _Evaluated(result, pair, note=note)


# --------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class GenerativeKind:
    """How one kind of generative model is trained, loaded and evaluated."""

    name: str  # stored as "kind" in the model folder's meta.json
    train: Callable[[_Context, RunLog | None], dict[str, Any]]
    load: Callable[[Path, Any], Any]  # (model folder, device) -> the trained model(s)
    evaluate: Callable[[_Context, Any, Path, np.ndarray, np.ndarray], _Evaluated]


#: Spec type -> kind: the one place a new kind of generative model is plugged in.
KINDS: dict[type, GenerativeKind] = {
    VaeSpec: GenerativeKind("vae", _train_vae, _load_vae, _evaluate_vae),
    GanSpec: GenerativeKind("gan", _train_gan, _load_gan, _evaluate_gan),
}


def kind_of(spec: VaeSpec | GanSpec) -> GenerativeKind:
    """The kind that handles ``spec`` (by its type)."""
    try:
        return KINDS[type(spec)]
    except KeyError:
        raise TypeError(f"no generative kind handles {type(spec).__name__}") from None


def _kind_named(name: str) -> GenerativeKind:
    for kind in KINDS.values():
        if kind.name == name:
            return kind
    raise DataError(f"unknown generative model kind {name!r} (known: {', '.join(k.name for k in KINDS.values())})")


# ------------------------------------------------------------------------ public API
def train_generative(
    params: Params, dataset: str, model: str, paths: ProjectPaths, run: RunLog | None = None
) -> dict[str, Any]:
    """Train ``model`` (a key of generate.zoo) on ``dataset`` into ``paths.generative_model``.

    VAEs: one network per latent size, ``k{k}.pt`` (loadable with
    :func:`latentlab.engine.load_model`), ``k{k}_history.json``; per-step values of
    every loss part (loss, reconstruction, kl, elbo) and per-epoch train and
    validation means go to ``run``. GANs: ``gan.pt`` (state dict and what
    rebuilds the pair: family, options, latent_dim, num_classes, sample_shape),
    ``history.json``; per-step d_loss, g_loss, d_real, d_fake and the per-epoch
    collapse watch go to ``run``, and a detected mode collapse sets the tag
    ``latentlab.mode_collapse``. Both write ``meta.json`` and resume from their
    checkpoints under ``paths.generative_checkpoint``.

    Returns ``{"metrics": flat floats, "params": what was trained with,
    "model_dir": Path}``; a GAN's result also holds ``"mode_collapse"`` (False
    or the message of :func:`latentlab.quality.mode_collapse_flag`).
    """
    ctx = _context(params, dataset, model, paths)
    return kind_of(ctx.spec).train(ctx, run)


def load_generative(
    paths: ProjectPaths, dataset: str, model: str, device: torch.device | None = None
) -> dict[int, VariationalAutoencoder] | GanPair:
    """The trained ``model`` of ``dataset``: a dict latent size -> VAE, or the GAN pair (eval mode)."""
    import torch

    folder = paths.generative_model(dataset, model)
    meta = _read_json(folder / "meta.json")
    if not isinstance(meta, dict) or "kind" not in meta:
        raise DataError(f"{folder / 'meta.json'}: missing or unreadable; run the generate stage for {model} first")
    return _kind_named(meta["kind"]).load(folder, device or torch.device("cpu"))


def evaluate_generative(
    params: Params, dataset: str, model: str, paths: ProjectPaths
) -> tuple[dict[str, Any], Path, Path]:
    """Samples and sample quality of a trained ``model``; returns (metrics, metrics file, figures folder).

    Common to every kind: a sample grid per truncation level (``samples_psi{psi}.png``,
    psi = 1 always included; a conditional GAN gets one row per class), and for
    each psi of ``quality.psi`` the figures of :func:`latentlab.quality.sample_quality`
    on :func:`quality_sample_count` samples drawn with ``quality.seed`` against as
    many real test images, beside the real floor of the classifier stage; the
    sweep is written as ``psi_sweep.csv`` and drawn as ``quality_vs_diversity.png``
    (precision against recall, Fréchet distance against coverage and entropy).
    VAEs add likelihood bounds per latent size (nats per image), interpolations,
    and for a 2-D latent the manifold and code map; their quality figures use the
    largest latent size. GANs add the training watch and mode-collapse verdict.

    The figures folder ``paths.generative_report`` is replaced atomically; the
    metrics JSON ``paths.generative_metrics`` is written atomically.
    """
    from latentlab import quality
    from latentlab.plots import save_image_grid, save_tradeoff_panels

    ctx = _context(params, dataset, model, paths)
    kind = kind_of(ctx.spec)
    q = ctx.quality
    classifier = _load_domain_classifier(paths, dataset, ctx.device)
    classifier_metrics = _read_json(paths.study_metrics("classifier", dataset))
    if not isinstance(classifier_metrics, dict) or "floor" not in classifier_metrics:
        raise DataError(
            f"{paths.study_metrics('classifier', dataset)}: missing or without a real floor; "
            "run the classifier stage first"
        )
    loaded = kind.load(ctx.model_dir, ctx.device)
    test_x, test_y = _split_images(paths, dataset, "test")
    n = quality_sample_count(q, ctx.manifest)
    if classifier_metrics.get("floor_samples") not in (None, n):
        log.warning(
            "the real floor was measured on %s samples, this model on %d", classifier_metrics["floor_samples"], n
        )
    report_dir = paths.generative_report(dataset, model)
    with atomic_dir(report_dir) as figures:
        evaluated = kind.evaluate(ctx, loaded, figures, test_x, test_y)
        gen = evaluated.sampler
        num_classes = int(gen.num_classes) if getattr(gen, "conditional", False) else None
        for psi in sorted(set(q.psi) | {1.0}):
            rows, labels = _sample_rows(gen, params.evaluate.grid_size, q.seed, psi, ctx.manifest.class_names)
            save_image_grid(
                rows,
                labels,
                figures / f"samples_psi{psi:g}.png",
                title=f"{ctx.title}: samples, psi = {psi:g}",
                spectrogram=ctx.spectrogram,
            )
        sweep: list[dict[str, float]] = []
        for psi in sorted(set(q.psi)):
            asked = balanced_labels(n, num_classes) if num_classes else None
            fake = draw_samples(gen, n, psi=psi, seed=q.seed, labels=asked)  # (n, C, H, W)
            scores = quality.sample_quality(
                classifier,
                test_x,
                fake,
                ctx.device,
                k=q.k,
                fake_labels=asked,
                n=n,
                seed=q.seed,
                min_fraction=q.min_fraction,
            )
            sweep.append({"psi": float(psi), **scores})
        _write_csv(figures / "psi_sweep.csv", sweep)
        floor = dict(classifier_metrics["floor"])
        save_tradeoff_panels(
            sweep,
            [f"ψ={row['psi']:g}" for row in sweep],
            [("recall", "precision"), ("coverage", "frechet_distance"), ("entropy_normalised", "frechet_distance")],
            figures / "quality_vs_diversity.png",
            axis_labels={
                "recall": "recall (diversity)",
                "precision": "precision (fidelity)",
                "coverage": "class coverage",
                "entropy_normalised": "normalised label entropy",
                "frechet_distance": "Fréchet distance (classifier features)",
            },
            reference=floor,
            reference_label="real floor",
            title=f"{ctx.title}: quality against diversity over the truncation psi ({n} samples)",
        )
        result: dict[str, Any] = {
            "dataset": dataset,
            "model": model,
            "family": ctx.spec.family,
            "kind": kind.name,
            "samples": n,
            "psi": [row["psi"] for row in sweep],
            "quality": {f"psi{row['psi']:g}": row for row in sweep},
            "floor": floor,
            "floor_samples": classifier_metrics.get("floor_samples"),
            "classifier_test_accuracy": classifier_metrics.get("test_accuracy"),
            "note": evaluated.note,
            **evaluated.result,
        }
        write_json(figures / "summary.json", result)
    metrics_path = paths.generative_metrics(dataset, model)
    write_json(metrics_path, result)
    return result, metrics_path, report_dir


# --------------------------------------------------------------------------- report
_SECTION = """
<h2 id="generative">Generative models</h2>
<p>Samples are scored in the feature space of a small CNN that the pipeline trains on each dataset's labelled
training split (the domain classifier), against real test images. The <i>real floor</i> scores real training
images the same way, on the same number of samples: what a generator drawing from the data distribution would reach.
ψ is the truncation: latent codes are scaled by ψ before decoding (ψ = 1: unbiased sampling, smaller: nearer the mode).
Precision and recall after Kynkäänniemi et al. (2019, k = {{ k }}); coverage is the share of classes that receive at
least {{ min_fraction }} of the uniform share; entropy is that of the predicted labels divided by log K.</p>
{% for d in datasets %}
<h3 id="generative-{{ d.name }}">{{ d.name }}: generative models</h3>
{% if d.classifier %}
<p>Domain classifier: test accuracy <b>{{ d.classifier.test_accuracy }}</b> (best validation {{ d.classifier.val_accuracy }}),
trained on {{ d.classifier.train_samples }} images.</p>
<table><tr><th class="l">real floor ({{ d.classifier.floor_samples }} samples)</th>{% for name, _ in d.classifier.floor %}<th>{{ name }}</th>{% endfor %}</tr>
<tr><td class="l">real training vs real test</td>{% for _, value in d.classifier.floor %}<td>{{ value }}</td>{% endfor %}</tr></table>
{% else %}<p class="muted">Domain classifier: not run.</p>{% endif %}
{% for m in d.models %}
<h4>{{ m.name }} <span class="muted">({{ m.family }})</span></h4>
{% if m.missing %}<p class="muted">{{ m.missing }}</p>{% else %}
<p class="muted">{{ fid_note }} {{ m.note }} {{ m.samples }} samples per row.</p>
<table><tr>{% for h in m.header %}<th{% if loop.first %} class="l"{% endif %}>{{ h }}</th>{% endfor %}</tr>
{% for row in m.rows %}<tr>{% for cell in row %}<td{% if loop.first %} class="l"{% endif %}>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</table>
{% if m.likelihood %}
<p>Test log-likelihood in nats per image on {{ m.likelihood_images }} test images{% if m.binarised %} (binarised once with a fixed seed){% endif %}:
importance-weighted NLL with K = {{ m.importance_samples }} (Burda et al. 2016; an upper bound on −log p(x) that tightens with K)
and the negative ELBO (Kingma &amp; Welling 2014). ± one standard error over images.</p>
<table><tr><th>latent size</th><th>NLL</th><th>negative ELBO</th><th>gap</th></tr>
{% for r in m.likelihood %}<tr><td>{{ r.latent_size }}</td><td>{{ r.nll }}</td><td>{{ r.negative_elbo }}</td><td>{{ r.gap }}</td></tr>{% endfor %}
</table>
{% endif %}
{% if m.collapse is not none %}<p>Mode collapse during training: {% if m.collapse %}<span class="fail">{{ m.collapse }}</span>{% else %}<span class="ok">not detected</span>{% endif %}
<span class="muted">(class coverage and label entropy of samples checked after every epoch)</span></p>{% endif %}
{% for img in m.images %}<img src="{{ img }}" alt="{{ img }}">{% endfor %}
{% endif %}
{% endfor %}
{% endfor %}
"""

_QUALITY_COLUMNS = (
    ("frechet_distance", "Fréchet distance", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("coverage", "coverage", "{:.2f}"),
    ("entropy_normalised", "normalised entropy", "{:.3f}"),
    ("label_accuracy", "label accuracy", "{:.3f}"),
)


def _fmt(value: Any, pattern: str = "{:.4g}") -> str:
    """A number as text, or a dash for anything that is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return pattern.format(value + 0.0)  # + 0.0 turns -0.0 into 0.0


def _rel(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target, start)).as_posix()


def _report_classifier(paths: ProjectPaths, dataset: str) -> dict[str, Any] | None:
    metrics = _read_json(paths.study_metrics("classifier", dataset))
    if not isinstance(metrics, dict):
        return None
    floor = metrics.get("floor") if isinstance(metrics.get("floor"), dict) else {}
    return {
        "test_accuracy": _fmt(metrics.get("test_accuracy"), "{:.2%}"),
        "val_accuracy": _fmt(metrics.get("val_accuracy"), "{:.2%}"),
        "train_samples": metrics.get("train_samples", "–"),
        "floor_samples": metrics.get("floor_samples", "–"),
        "floor": [(label, _fmt(floor.get(key), pattern)) for key, label, pattern in _QUALITY_COLUMNS if key in floor],
    }


def _figures(folder: Path, reports: Path) -> list[str]:
    if not folder.is_dir():
        return []
    pngs = {p.name: p for p in folder.glob("*.png")}
    ordered = [pngs.pop(name) for name in _FIGURE_ORDER if name in pngs]
    return [_rel(p, reports) for p in ordered + [pngs[name] for name in sorted(pngs)]]


def _report_model(params: Params, paths: ProjectPaths, dataset: str, model: str) -> dict[str, Any]:
    spec = params.generate.zoo.get(model)
    section: dict[str, Any] = {
        "name": model,
        "family": spec.family if spec is not None else "?",
        "missing": "",
        "note": "",
        "samples": "–",
        "header": [],
        "rows": [],
        "likelihood": [],
        "likelihood_images": "–",
        "importance_samples": "–",
        "binarised": False,
        "collapse": None,
        "images": [],
    }
    metrics = _read_json(paths.generative_metrics(dataset, model))
    if not isinstance(metrics, dict):
        section["missing"] = "Not run."
        return section
    try:
        sweep = sorted(metrics["quality"].values(), key=lambda row: row["psi"])
        floor = metrics.get("floor") or {}
        columns = [c for c in _QUALITY_COLUMNS if any(c[0] in row for row in sweep)]
        section["header"] = ["ψ", *(label for _, label, _ in columns)]
        section["rows"] = [[f"{row['psi']:g}", *(_fmt(row.get(key), p) for key, _, p in columns)] for row in sweep]
        if floor:
            section["rows"].append(["real floor", *(_fmt(floor.get(key), p) for key, _, p in columns)])
        section["note"] = str(metrics.get("note", ""))
        section["samples"] = metrics.get("samples", "–")
        likelihood = metrics.get("likelihood")
        if isinstance(likelihood, dict):
            section["likelihood_images"] = likelihood.get("images", "–")
            section["importance_samples"] = likelihood.get("importance_samples", "–")
            rows = [v for v in likelihood.values() if isinstance(v, dict)]
            section["binarised"] = any(r.get("binarised") for r in rows)
            section["likelihood"] = [
                {
                    "latent_size": r.get("latent_size", "–"),
                    "nll": f"{_fmt(r.get('nll'), '{:.2f}')} ± {_fmt(r.get('nll_sem'), '{:.2f}')}",
                    "negative_elbo": f"{_fmt(r.get('negative_elbo'), '{:.2f}')} ± {_fmt(r.get('negative_elbo_sem'), '{:.2f}')}",
                    "gap": _fmt(r.get("gap"), "{:.2f}"),
                }
                for r in sorted(rows, key=lambda r: r.get("latent_size", 0))
            ]
        if metrics.get("kind") == "gan":
            section["collapse"] = metrics.get("mode_collapse") or ""
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        section["missing"] = f"Metrics could not be read ({exc!r})."
        return section
    section["images"] = _figures(paths.generative_report(dataset, model), paths.reports)
    return section


def generative_report_section(params: Params, paths: ProjectPaths) -> str:
    """The HTML fragment of reports/index.html for ``generate.datasets`` (empty when there are none).

    Per dataset: the domain classifier's accuracy and real floor; per model of
    ``generate.models``: the truncation sweep of the quality figures beside the
    floor, a VAE's likelihood bounds, a GAN's mode-collapse verdict, and the
    figures (paths relative to ``reports/``). Anything not yet run, or
    unreadable, shows as a short line instead of raising.
    """
    import jinja2

    if not params.generate.datasets:
        return ""
    datasets = [
        {
            "name": dataset,
            "classifier": _report_classifier(paths, dataset),
            "models": [_report_model(params, paths, dataset, model) for model in params.generate.models],
        }
        for dataset in params.generate.datasets
    ]
    q = params.generate.quality
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_SECTION).render(datasets=datasets, k=q.k, min_fraction=q.min_fraction, fid_note=_FID_NOTE)
