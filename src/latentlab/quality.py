"""Sample quality of generative models, measured in the feature space of a domain classifier.

No pretrained Inception network can be downloaded here, so the feature space
that FID and precision/recall need is that of a small CNN the pipeline trains
itself on the labelled training split (:class:`DomainClassifier`, as the
"domain-specific" classifiers used for MNIST FID in the GAN literature). The
classifier also labels generated samples, which gives the mode-coverage
measures (class coverage, label entropy) and, for a conditional generator,
whether a sample shows the class that was asked for.

Measures (all computed in float64 on the penultimate-layer features):

* Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale
  update rule converge to a local Nash equilibrium"): the Fréchet (2-Wasserstein)
  distance between Gaussians fitted to real and generated features. 0 for
  identical distributions; lower is better.
* Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and
  recall metric for assessing generative models"): fidelity (share of generated
  samples inside the k-NN manifold of the real ones) and diversity (share of
  real samples inside the manifold of the generated ones). 1 is best.
* Class coverage and label entropy of the predicted labels of generated
  samples: a mode-collapsed generator covers few classes with low entropy.

Every figure depends on the number of samples (FID is biased upwards for small
n, k-NN manifolds change with n), so each is reported beside its *real floor*
(:func:`real_floor`): the same measures for real test against real training
samples, on the same number of samples.

Images are float (N, C, H, W) in [0, 1], as everywhere in the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentlab.atomic import save_torch
from latentlab.config import ClassifierConfig
from latentlab.engine import _autocast, _save_checkpoint, learning_rate, prefers_channels_last
from latentlab.provenance import code_digest

log = logging.getLogger(__name__)

# Inference batch for features and predictions: large, since no gradients are kept.
EVAL_BATCH = 1024
# Pairwise-distance blocks hold at most this many float64 entries (2^24 = 128 MiB).
_CDIST_BLOCK = 1 << 24
# Regulariser added to both covariances when the product's square root is not finite.
_FID_EPS = 1e-6
# Imaginary parts of sqrtm's diagonal up to this size are numerical noise (as in pytorch-fid).
_FID_IMAG_TOL = 1e-3
# Tolerance of the "dropped by at least" comparison of mode_collapse_flag (float noise, e.g. 1.0 - 0.8).
_DROP_TOL = 1e-9


# ----------------------------------------------------------------- classifier
class DomainClassifier(nn.Module):
    """A small CNN for (C, H, W) images in [0, 1] (28 x 28 by default) with ``num_classes`` outputs.

    Two convolution blocks (each two 3x3 conv + batch norm + ReLU, then 2x2 max
    pooling and dropout 0.25) of ``channels`` = (32, 64) filters, a fully
    connected layer of ``feature_dim`` units with ReLU (the features), dropout
    0.5 and a linear head. With the default :class:`ClassifierConfig` (10
    epochs on 55,000 images, seed 0, H100) it reached 99.57 % test accuracy on
    MNIST and 92.45 % on Fashion-MNIST.

    Shapes: ``x`` (N, C, H, W) -> :meth:`features` (N, feature_dim) ->
    :meth:`forward` logits (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: tuple[int, int] = (28, 28),
        feature_dim: int = 128,
        channels: tuple[int, int] = (32, 64),
    ) -> None:
        super().__init__()
        height, width = (int(s) for s in image_size)
        if in_channels < 1 or num_classes < 2 or feature_dim < 1:
            raise ValueError(
                f"need in_channels >= 1, num_classes >= 2 and feature_dim >= 1, "
                f"got {in_channels}, {num_classes}, {feature_dim}"
            )
        if height < 4 or width < 4:
            raise ValueError(f"images must be at least 4 x 4 (two 2x2 poolings), got {height} x {width}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.image_size = (height, width)
        self.feature_dim = int(feature_dim)
        self.channels = (int(channels[0]), int(channels[1]))
        c1, c2 = self.channels
        self.body = nn.Sequential(
            *_conv_block(self.in_channels, c1),
            *_conv_block(c1, c2),
            nn.Flatten(),
            nn.Linear(c2 * (height // 4) * (width // 4), self.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(self.feature_dim, self.num_classes))

    @property
    def architecture(self) -> dict[str, Any]:
        """The constructor arguments: enough to rebuild the network (see :func:`load_classifier`)."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "feature_dim": self.feature_dim,
            "channels": list(self.channels),
        }

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations (N, feature_dim) of images (N, C, H, W)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes) of images (N, C, H, W)."""
        return self.head(self.body(x))


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
    ]


# ------------------------------------------------------------------- training
def _check_images(images: np.ndarray, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must be images (N, C, H, W), got shape {images.shape}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    return images


def _check_labels(labels: np.ndarray, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must be (N,) = ({n},), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} contains negative labels")
    return labels.astype(np.int64)


def _tensor(arr: np.ndarray, device: torch.device, dtype: np.dtype = np.float32) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype)).to(device)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in arrays:
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def shift_batch(x: Tensor, offsets: Tensor, max_shift: int) -> Tensor:
    """Translate each image of a batch by its own offset, zero-filling what comes in from the border.

    ``x`` (N, C, H, W), ``offsets`` (N, 2) integers (row, column) in
    [0, 2 * max_shift] on ``x``'s device: an offset d moves the content by
    ``max_shift - d`` pixels (down / right when positive), so ``max_shift``
    means no move. One gather on the whole batch tensor: no per-sample Python work.
    """
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))  # (N, C, H + 2s, W + 2s)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    cfg: ClassifierConfig,
    *,
    seed: int,
    device: torch.device,
    checkpoint: Path | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> tuple[DomainClassifier, dict[str, Any]]:
    """Fit a :class:`DomainClassifier` with cross-entropy and Adam(W); keep the best validation accuracy.

    ``images`` float32 (N, C, H, W) in [0, 1] with ``labels`` int (N,) in
    0..K-1, and the same for the validation pair. ``num_classes`` None means
    K = largest label + 1 over both splits. As in :func:`latentlab.engine.fit`
    the data sit on ``device`` as one tensor and each batch indexes a
    permutation drawn from a generator seeded by (seed, epoch); the same
    generator draws the random shifts (``cfg.augment_shift``) applied to the
    batch tensor by :func:`shift_batch`. ``torch.manual_seed(seed)`` is called
    first (initialisation and dropout). ``cfg.max_train_samples`` keeps a
    seeded random subset of the training data.

    ``checkpoint``, when given, is written atomically after every epoch; a run
    started again with the same data, config and seed resumes from it (on CPU
    ending with bit-identical weights); one made otherwise is ignored.

    Returns the classifier (best-validation-accuracy weights, eval mode, on
    ``device``) and the history: lists ``epoch``, ``train_loss`` (mean
    cross-entropy of the epoch's steps), ``val_loss``, ``val_accuracy``,
    ``lr`` and ``seconds``, plus ``best_epoch``, ``best_val_accuracy``,
    ``train_samples`` and ``resumed_from_epoch``.
    """
    images = _check_images(images, "images")
    val_images = _check_images(val_images, "val_images")
    labels = _check_labels(labels, len(images), "labels")
    val_labels = _check_labels(val_labels, len(val_images), "val_labels")
    if images.shape[1:] != val_images.shape[1:]:
        raise ValueError(f"train images {images.shape[1:]} and validation images {val_images.shape[1:]} differ")
    largest = int(max(labels.max(), val_labels.max()))
    k = largest + 1 if num_classes is None else int(num_classes)
    if largest >= k:
        raise ValueError(f"label {largest} is out of range for num_classes={k}")

    if cfg.max_train_samples is not None and len(images) > cfg.max_train_samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(images), cfg.max_train_samples, replace=False))
        images, labels = images[keep], labels[keep]

    start_wall = time.perf_counter()
    torch.manual_seed(seed)
    _, c, h, w = images.shape
    model = DomainClassifier(in_channels=c, num_classes=k, image_size=(h, w)).to(device)
    if prefers_channels_last(model, device, graphed=False):
        model.to(memory_format=torch.channels_last)  # 1.26x per step on CPU (bench/channels_last_cpu.py)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    spec = {
        "architecture": model.architecture,
        "cfg": cfg.model_dump(mode="json"),
        "seed": seed,
        "data": _digest(images, labels, val_images, val_labels),
        "code": code_digest(),
    }
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    epoch, best_acc, best_epoch = 0, -1.0, 0
    best_state = {name: v.detach().clone() for name, v in model.state_dict().items()}
    rows: list[dict[str, float]] = []
    resumed_from = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            epoch, best_acc, best_epoch = state["epoch"], state["best_acc"], state["best_epoch"]
            best_state, rows = state["best_model"], state["rows"]
            torch.set_rng_state(state["torch_rng"])
            resumed_from = epoch
            log.info("resuming the domain classifier from %s at epoch %d", checkpoint, epoch)
        else:
            log.info("ignoring %s: made by another config, seed or data", checkpoint)

    x_all, y_all = _tensor(images, device), _tensor(labels, device, np.int64)
    n = len(images)
    s = cfg.augment_shift
    while epoch < cfg.epochs:
        epoch_start = time.perf_counter()
        lr = learning_rate(cfg, epoch, cfg.epochs)  # of the epoch alone: a resumed run sets the same
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        # Batch order and shifts of epoch e depend only on (seed, e): a resumed run replays them.
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).to(device)
        offsets = torch.randint(0, 2 * s + 1, (n, 2), generator=gen).to(device) if s else None
        total = torch.zeros((), device=device)
        steps = range(0, n, cfg.batch_size)
        for first in _progress(steps, f"classifier epoch {epoch + 1}/{cfg.epochs}", progress):
            index = order[first : first + cfg.batch_size]
            x = x_all[index]
            if offsets is not None:
                x = shift_batch(x, offsets[first : first + cfg.batch_size], s)
            with _autocast(device, cfg.amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(index)
        epoch += 1
        val_loss, val_acc = _evaluate(model, val_images, val_labels, device)
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = {name: v.detach().clone() for name, v in model.state_dict().items()}
        rows.append(
            {
                "epoch": epoch,
                "train_loss": float(total) / n,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": lr,
                "seconds": time.perf_counter() - epoch_start,
            }
        )
        log.info(
            "classifier epoch %d: train loss %.4f, val accuracy %.4f%s",
            epoch,
            rows[-1]["train_loss"],
            val_acc,
            " *" if best_epoch == epoch else "",
        )
        if checkpoint is not None:
            _save_checkpoint(
                checkpoint,
                {
                    "fingerprint": fingerprint,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "best_acc": best_acc,
                    "best_epoch": best_epoch,
                    "best_model": best_state,
                    "rows": rows,
                    "torch_rng": torch.get_rng_state(),
                },
            )

    model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)  # as a loaded model computes (see engine.fit)
    model.eval()
    history: dict[str, Any] = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    history.update(
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        train_samples=n,
        resumed_from_epoch=resumed_from,
        wall_seconds=time.perf_counter() - start_wall,
    )
    return model, history


def _progress(steps: range, desc: str, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, leave=False, disable=None, mininterval=0.5)


@torch.no_grad()
def _evaluate(
    model: DomainClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on a labelled set, in eval mode."""
    _, logits = _infer(model, images, device, EVAL_BATCH, want_features=False)
    target = torch.from_numpy(labels)
    loss = float(F.cross_entropy(logits, target, reduction="mean"))
    acc = float((logits.argmax(1) == target).double().mean())
    return loss, acc


# ------------------------------------------------------------------ inference
@torch.no_grad()
def _infer(
    classifier: DomainClassifier,
    images: np.ndarray,
    device: torch.device,
    batch_size: int,
    *,
    want_features: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """Features (N, F) (or None) and logits (N, K), float32 on the CPU, in eval mode and float32."""
    images = _check_images(images, "images")
    was_training = classifier.training
    classifier.eval()
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        x = _tensor(images[start : start + batch_size], device)
        f = classifier.features(x)
        logits.append(classifier.head(f).float().cpu())
        if want_features:
            feats.append(f.float().cpu())
    classifier.train(was_training)
    return (torch.cat(feats) if want_features else None), torch.cat(logits)


def accuracy(classifier: DomainClassifier, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """Share of images (N, C, H, W) whose predicted class equals ``labels`` (N,)."""
    labels = _check_labels(labels, len(images), "labels")
    _, logits = _infer(classifier, images, device, EVAL_BATCH, want_features=False)
    return float((logits.argmax(1).numpy() == labels).mean())


def predict_proba(classifier: DomainClassifier, images: np.ndarray, device: torch.device) -> np.ndarray:
    """Class probabilities (N, K) float64 (softmax of the logits) of images (N, C, H, W)."""
    _, logits = _infer(classifier, images, device, EVAL_BATCH, want_features=False)
    return torch.softmax(logits.double(), dim=1).numpy()


def extract_features(
    classifier: DomainClassifier, images: np.ndarray, device: torch.device, batch_size: int = EVAL_BATCH
) -> np.ndarray:
    """Penultimate-layer features (N, F) float64 of images (N, C, H, W), in eval mode and batches."""
    feats, _ = _infer(classifier, images, device, batch_size)
    assert feats is not None
    return feats.double().numpy()


# ------------------------------------------------------------ Fréchet distance
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means (D,), covariances (D, D).

    Heusel et al. (2017), the FID formula
    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. The square root is
    ``scipy.linalg.sqrtm``; when it is not finite (a singular product), it is
    taken of ``(S1 + eps I)(S2 + eps I)`` with eps = 1e-6 instead, and
    imaginary parts left by numerical error are dropped (an error if one on
    the diagonal exceeds 1e-3), as in the reference implementation
    (pytorch-fid). Rounding can leave a tiny negative result for identical
    inputs; it is clipped to 0.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"means must be (D,) and covariances (D, D) of one D; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled below
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            log.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", _FID_EPS)
            offset = np.eye(d) * _FID_EPS
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > _FID_IMAG_TOL:
            raise ValueError(f"Fréchet distance: square root has an imaginary component of {worst:.3g}")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(value), 0.0)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64; N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """:func:`frechet_distance` between Gaussians fitted (:func:`gaussian_stats`) to features (N1, D) and (N2, D)."""
    mu1, s1 = gaussian_stats(f1)
    mu2, s2 = gaussian_stats(f2)
    return frechet_distance(mu1, s1, mu2, s2)


# -------------------------------------------------------- precision / recall
def _as_tensor64(x: np.ndarray, name: str) -> Tensor:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be (N, D) with N >= 1, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _block_rows(m: int) -> int:
    return max(1, _CDIST_BLOCK // max(m, 1))


def knn_radii(features: np.ndarray | Tensor, k: int) -> np.ndarray:
    """Distance (N,) float64 from each of features (N, D) to its k-th nearest other sample.

    The sample itself (distance 0) is excluded by taking the (k + 1)-th
    smallest distance of its row; duplicates count as neighbours at distance 0.
    """
    f = features if isinstance(features, Tensor) else _as_tensor64(features, "features")
    n = len(f)
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and the number of samples - 1 ({n - 1}), got {k}")
    out = []
    for start in range(0, n, _block_rows(n)):
        dist = torch.cdist(f[start : start + _block_rows(n)], f)
        out.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(out).numpy()


def _inside(query: Tensor, manifold: Tensor, radii: Tensor) -> np.ndarray:
    """(Q,) bool: whether each query lies in some ball ``||query - manifold_j|| <= radii_j``."""
    m = len(manifold)
    out = []
    for start in range(0, len(query), _block_rows(m)):
        dist = torch.cdist(query[start : start + _block_rows(m)], manifold)
        out.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(out).numpy()


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features (N_real, D) and (N_fake, D).

    Each set's manifold is the union of balls around its samples whose radius
    is the distance to the sample's k-th nearest neighbour in the same set
    (:func:`knn_radii`; the paper uses k = 3). Precision is the share of fake
    samples inside the real manifold (fidelity), recall the share of real
    samples inside the fake manifold (diversity). Distances are Euclidean,
    float64, computed with ``torch.cdist`` in blocks of at most 2^24 pairs.
    """
    real = _as_tensor64(real_features, "real_features")
    fake = _as_tensor64(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dimensions but fake ones {fake.shape[1]}")
    real_radii = torch.from_numpy(knn_radii(real, k))
    fake_radii = torch.from_numpy(knn_radii(fake, k))
    precision = float(_inside(fake, real, real_radii).mean())
    recall = float(_inside(real, fake, fake_radii).mean())
    return precision, recall


# ----------------------------------------------------------- mode coverage
def class_histogram(labels_or_probs: np.ndarray, num_classes: int) -> np.ndarray:
    """Share (K,) float64 of each class, summing to 1.

    From predicted labels (N,) int in 0..K-1: the counts over N. From class
    probabilities (N, K): their mean, the classifier's marginal p(y) over the
    samples (as in the Inception score).
    """
    arr = np.asarray(labels_or_probs)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if len(arr) == 0:
        raise ValueError("no predictions to count")
    if arr.ndim == 2:
        if arr.shape[1] != num_classes:
            raise ValueError(f"probabilities have {arr.shape[1]} classes, expected {num_classes}")
        hist = np.asarray(arr, np.float64).mean(axis=0)
        return hist / hist.sum()
    labels = _check_labels(arr, len(arr), "predicted labels")
    if labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} is out of range for num_classes={num_classes}")
    return np.bincount(labels, minlength=num_classes).astype(np.float64) / len(labels)


def class_coverage(labels_or_probs: np.ndarray, num_classes: int, min_fraction: float = 0.5) -> float:
    """Share of the K classes that receive at least ``min_fraction`` of the uniform share 1/K.

    ``labels_or_probs``: predicted labels (N,) or probabilities (N, K) (see
    :func:`class_histogram`). The default 0.5, the lower class-balance bound
    of the validate stage, counts a class as covered when it gets at least half
    of what a balanced generator would give it: a collapsed generator whose
    samples a classifier now and then mislabels as another class does not
    cover that class, while a real test set (class shares 0.9-1.1 x uniform
    on MNIST) covers all of them. 1 = every class, 1/K = one class.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    hist = class_histogram(labels_or_probs, num_classes)
    return float(np.mean(hist >= min_fraction / num_classes - 1e-12))


def label_entropy(labels_or_probs: np.ndarray, num_classes: int, *, normalised: bool = False) -> float:
    """Entropy in nats of the predicted class histogram (:func:`class_histogram`).

    log K for a uniform histogram, 0 when every sample falls in one class.
    ``normalised=True`` divides by log K, giving a value in [0, 1] comparable
    across datasets (needs K >= 2).
    """
    hist = class_histogram(labels_or_probs, num_classes)
    nz = hist[hist > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    entropy = max(entropy, 0.0) + 0.0  # a single class gives -0.0; adding 0.0 makes it +0.0
    if normalised:
        if num_classes < 2:
            raise ValueError("normalised entropy needs num_classes >= 2")
        return entropy / math.log(num_classes)
    return entropy


def mode_collapse_flag(
    history: list[dict[str, Any]], coverage_drop: float = 0.2, entropy_drop: float = 0.15
) -> bool | str:
    """Whether a GAN's samples collapsed during training, from per-epoch quality rows.

    ``history`` rows (in training order) hold ``coverage`` and
    ``entropy_normalised`` of the samples at that point (both in [0, 1]) and
    optionally ``epoch``. Rule: a row is collapsed when its coverage is at
    least ``coverage_drop`` below the largest coverage of the rows up to it,
    or its normalised entropy at least ``entropy_drop`` below the largest
    normalised entropy so far (absolute drops; a running maximum, so a slow
    start does not count, only losing what was reached). Returns False when
    no row is collapsed, else a message naming the first collapsed row (the
    flag is sticky: a later recovery does not clear it). The defaults: two
    of ten classes lost (0.2), or the entropy of a uniform 10-class histogram
    falling to about that of 7 equal classes (0.15).
    """
    best_cov, best_ent = -math.inf, -math.inf
    for i, row in enumerate(history):
        try:
            cov, ent = float(row["coverage"]), float(row["entropy_normalised"])
        except KeyError as exc:
            raise ValueError(f"history row {i} has no {exc.args[0]!r}") from None
        best_cov, best_ent = max(best_cov, cov), max(best_ent, ent)
        where = f"epoch {row['epoch']}" if "epoch" in row else f"row {i}"
        if best_cov - cov >= coverage_drop - _DROP_TOL:
            return (
                f"mode collapse at {where}: class coverage {cov:.3g} is {best_cov - cov:.3g} below "
                f"its running maximum {best_cov:.3g} (allowed drop {coverage_drop:g})"
            )
        if best_ent - ent >= entropy_drop - _DROP_TOL:
            return (
                f"mode collapse at {where}: normalised label entropy {ent:.3g} is {best_ent - ent:.3g} below "
                f"its running maximum {best_ent:.3g} (allowed drop {entropy_drop:g})"
            )
    return False


# ----------------------------------------------------------------- together
def subsample(images: np.ndarray, n: int | None, seed: int, labels: np.ndarray | None = None):
    """``n`` rows drawn without replacement with ``seed`` (kept in their order); None = all rows.

    Returns the images, or (images, labels) when ``labels`` is given.
    Asking for more rows than there are is an error: figures on different
    numbers of samples are not comparable.
    """
    if n is not None:
        if n > len(images):
            raise ValueError(f"asked for {n} samples but only {len(images)} are available")
        keep = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
        images = images[keep]
        labels = None if labels is None else np.asarray(labels)[keep]
    return images if labels is None else (images, labels)


def sample_quality(
    classifier: DomainClassifier,
    real_images: np.ndarray,
    fake_images: np.ndarray,
    device: torch.device,
    k: int = 3,
    num_classes: int | None = None,
    fake_labels: np.ndarray | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    min_fraction: float = 0.5,
) -> dict[str, float]:
    """Every sample-quality figure of generated images (N_fake, C, H, W) against real ones (N_real, C, H, W).

    Returns ``frechet_distance`` (:func:`frechet_distance_features`),
    ``precision`` and ``recall`` (:func:`precision_recall` with ``k``), and of
    the fake images' predicted labels ``coverage`` (:func:`class_coverage`
    with ``min_fraction``), ``entropy`` (nats) and ``entropy_normalised``
    (:func:`label_entropy`); with ``fake_labels`` (N_fake,), the classes a
    conditional generator was asked for, also ``label_accuracy``: the share
    of fakes the classifier assigns to their requested class. ``num_classes``
    None = the classifier's. ``n`` draws that many samples from each set with
    ``seed`` (:func:`subsample`; the real and fake draws use seed and seed + 1).
    """
    k_classes = classifier.num_classes if num_classes is None else int(num_classes)
    if fake_labels is not None:
        fake_labels = _check_labels(fake_labels, len(fake_images), "fake_labels")
        fake_images, fake_labels = subsample(fake_images, n, seed + 1, fake_labels)
    else:
        fake_images = subsample(fake_images, n, seed + 1)
    real_images = subsample(real_images, n, seed)
    real_f, _ = _infer(classifier, real_images, device, EVAL_BATCH)
    fake_f, fake_logits = _infer(classifier, fake_images, device, EVAL_BATCH)
    assert real_f is not None and fake_f is not None
    real64, fake64 = real_f.double().numpy(), fake_f.double().numpy()
    predicted = fake_logits.argmax(1).numpy()
    precision, recall = precision_recall(real64, fake64, k)
    out = {
        "frechet_distance": frechet_distance_features(real64, fake64),
        "precision": precision,
        "recall": recall,
        "coverage": class_coverage(predicted, k_classes, min_fraction),
        "entropy": label_entropy(predicted, k_classes),
        "entropy_normalised": label_entropy(predicted, k_classes, normalised=True),
    }
    if fake_labels is not None:
        out["label_accuracy"] = float((predicted == fake_labels).mean())
    return out


def real_floor(
    classifier: DomainClassifier,
    real_test: np.ndarray,
    real_train: np.ndarray,
    device: torch.device,
    n: int,
    seed: int,
    k: int = 3,
    num_classes: int | None = None,
    *,
    min_fraction: float = 0.5,
) -> dict[str, float]:
    """The :func:`sample_quality` figures of ``n`` real training images scored against ``n`` real test images.

    What a perfect generator (one that draws from the training distribution)
    would score against the same reference set: the floor of the Fréchet
    distance and the ceiling of precision and recall at this ``n``, reported
    beside every generator's figures. ``real_test`` plays the real reference
    set, ``real_train`` the generated one; both are drawn with ``seed`` as in
    :func:`sample_quality`.
    """
    return sample_quality(
        classifier, real_test, real_train, device, k, num_classes, n=n, seed=seed, min_fraction=min_fraction
    )


# ---------------------------------------------------------------- save / load
def save_classifier(model: DomainClassifier, path: Path, meta: dict[str, Any]) -> None:
    """Write the weights, the architecture and ``meta`` (e.g. dataset, accuracy, history) atomically."""
    save_torch({"state_dict": model.state_dict(), "architecture": model.architecture, "meta": meta}, path)


def load_classifier(path: Path, device: torch.device | None = None) -> tuple[DomainClassifier, dict[str, Any]]:
    """Rebuild a classifier saved by :func:`save_classifier`: (model in eval mode on ``device``, meta)."""
    from latentlab.errors import DataError

    try:
        payload = torch.load(path, map_location=device or "cpu", weights_only=False)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; train the domain classifier first") from None
    arch = dict(payload["architecture"])
    model = DomainClassifier(
        in_channels=arch["in_channels"],
        num_classes=arch["num_classes"],
        image_size=tuple(arch["image_size"]),
        feature_dim=arch["feature_dim"],
        channels=tuple(arch["channels"]),
    )
    model.load_state_dict(payload["state_dict"])
    model.to(device or "cpu").eval()
    return model, payload["meta"]
