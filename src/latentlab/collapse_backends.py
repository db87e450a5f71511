"""Generative backends of the model-collapse study: the VAEs and GANs of ``generate.zoo``.

Each backend implements :class:`latentlab.collapse.GenerativeBackend`: ``fit``
trains a *fresh* network on the generation's training set (N, C, H, W) float32
in [0, 1], or continues training a copy of a given one (a fine-tuned healing
generation: same training settings, new optimiser state), ``sample`` draws from
it, ``evaluate`` scores the drawn samples, ``save_model`` / ``load_model``
persist its weights.
They are chosen through a small registry keyed by the type of the zoo entry
(:class:`~latentlab.config.VaeSpec`, :class:`~latentlab.config.GanSpec`).

Metrics of every backend (from :func:`latentlab.quality.sample_quality`, in the
feature space of the dataset's domain classifier, against a *fixed* held-out
subset of the real test split, the same for every generation, loop and seed):
``frechet_distance`` (lower is better), ``precision``, ``recall``,
``coverage``, ``entropy`` and ``entropy_normalised`` (higher is better), and
for a conditional GAN ``label_accuracy``. A held-out real-data figure:

* VAE: ``heldout_neg_elbo``, the negative ELBO in nats per image of a fixed
  subset of real test images (binarised once with a fixed seed for the
  Bernoulli decoder, whose likelihood is defined on binary images; the
  reparameterisation noise is fixed too), an upper bound on their negative
  log-likelihood: it rises when the model forgets the real distribution.
* GAN: none. A GAN has no likelihood, and its discriminator's scores are not
  comparable across independently trained generations; how far the samples
  are from held-out real data is already what the Fréchet distance and
  precision / recall against the real test subset measure.

Training settings come from the zoo entry's ``training`` section, except
``max_train_samples``, which is ignored: the composition of each loop's
training set (and so the study's cost) is set by ``collapse.real_size``,
``samples_per_generation`` and ``synthetic_fraction``, and capping it would
silently change what e.g. ``accumulate`` means. The VAE engine's early
stopping validates on a seeded ``VAL_FRACTION`` of the generation's *own*
training set (never on real data in a fully synthetic loop).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentlab.atomic import save_torch
from latentlab.collapse import GenerativeBackend
from latentlab.config import GanSpec, Params, VaeSpec
from latentlab.errors import DataError
from latentlab.models.vae import binarise, validation_images
from latentlab.provenance import code_digest
from latentlab.quality import DomainClassifier, load_classifier, sample_quality, subsample

logger = logging.getLogger(__name__)

Array = np.ndarray

#: Share of each generation's training set the VAE engine validates on (early stopping).
VAL_FRACTION = 0.1
#: Seed of the held-out images' binarisation and of the negative ELBO's noise: the same every generation.
HELDOUT_SEED = 0
#: Images generated per forward pass when sampling.
SAMPLE_BATCH = 4096


# ------------------------------------------------------------------ context
@dataclass(frozen=True)
class QualityJudge:
    """Sample-quality metrics of generated images against a fixed set of held-out real ones."""

    classifier: DomainClassifier
    reference: Array  # (M, C, H, W) float32 in [0, 1]: real test images, fixed for the study
    device: torch.device
    k: int = 3  # neighbours of the precision / recall manifolds
    min_fraction: float = 0.5  # a class is covered at this share of the uniform share

    def __call__(self, samples: Array, labels: Array | None = None) -> dict[str, float]:
        """:func:`latentlab.quality.sample_quality` of ``samples`` (N, C, H, W); ``labels``: classes asked for."""
        return sample_quality(
            self.classifier,
            self.reference,
            np.asarray(samples, np.float32),
            self.device,
            self.k,
            fake_labels=labels,
            min_fraction=self.min_fraction,
        )


@dataclass(frozen=True)
class BackendContext:
    """What every backend needs besides its zoo entry."""

    judge: QualityJudge
    heldout: Array  # (M, C, H, W) float32 in [0, 1]: real test images for the held-out likelihood figure
    sample_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    device: torch.device
    latent_size: int | None = None  # VAE latent size; None = the zoo entry's largest
    checkpoint_dir: Path | None = None  # resumable state of each fit (one folder per loop and seed)
    epochs: int | None = None  # collapse.epochs: epochs of every fit; None = the zoo entry's own


BackendFactory = Callable[[Any, BackendContext], GenerativeBackend]
_REGISTRY: dict[type, BackendFactory] = {}


def register_backend(spec_type: type) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: ``factory(spec, context)`` builds the backend of zoo entries of ``spec_type``."""

    def decorate(factory: BackendFactory) -> BackendFactory:
        if spec_type in _REGISTRY:
            raise ValueError(f"a collapse backend for {spec_type.__name__} is registered twice")
        _REGISTRY[spec_type] = factory
        return factory

    return decorate


def build_backend(spec: Any, context: BackendContext) -> GenerativeBackend:
    """The backend of zoo entry ``spec`` (a :class:`VaeSpec` or :class:`GanSpec`)."""
    for spec_type, factory in _REGISTRY.items():
        if isinstance(spec, spec_type):
            return factory(spec, context)
    known = ", ".join(t.__name__ for t in _REGISTRY)
    raise TypeError(f"no collapse backend for {type(spec).__name__} (known: {known})")


def _weights_digest(module: torch.nn.Module) -> str:
    """A hash of every tensor of ``module``'s state (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checkpoint(folder: Path | None, generation: int, init: torch.nn.Module | None = None) -> Path | None:
    """The resumable state of one fit. A fine-tuning fit's name carries its starting weights: the
    engines' fingerprints cover the architecture, settings, seed and data, not the initial weights."""
    if folder is None:
        return None
    start = "" if init is None else f"-from-{_weights_digest(init)[:16]}"
    return folder / f"fit-step{generation:04d}{start}.pt"


def _drop_checkpoint(folder: Path | None, generation: int) -> None:
    # The generation is finished once evaluated (its result is saved right after):
    # its mid-training state is no longer needed.
    if folder is not None:
        for path in folder.glob(f"fit-step{generation:04d}*.pt"):
            path.unlink()


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class _ModuleFiles:
    """``save_model`` / ``load_model`` of a backend whose model is a torch module built by ``_build``."""

    context: BackendContext

    def _build(self) -> torch.nn.Module:
        raise NotImplementedError

    def save_model(self, model: torch.nn.Module, path: Path) -> None:
        save_torch(model.state_dict(), path)

    def load_model(self, path: Path) -> torch.nn.Module:
        model = self._build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(self.context.device).eval()


# ---------------------------------------------------------------------- VAE
def _training_update(context: BackendContext, training: Any) -> dict[str, Any]:
    """The zoo entry's training settings, changed for the study: never a cap on the training set
    (it would silently change what ``accumulate`` means), and ``collapse.epochs`` when given (with
    no ``min_steps`` floor, so every generation trains for exactly that many epochs)."""
    update: dict[str, Any] = {"max_train_samples": None}
    if context.epochs is not None:
        update["epochs"] = context.epochs
        if hasattr(training, "min_steps"):
            update["min_steps"] = 0
    return update


class VaeBackend(_ModuleFiles):
    """A VAE of generate.zoo trained with :func:`latentlab.engine.fit`.

    Samples are the decoder's mean images of ``z ~ N(0, psi^2 I)`` (what the
    generate stage shows as samples); for the Bernoulli decoder with dynamic
    binarisation the next generation then draws binary images from them at
    every step. Samples are unlabelled.
    """

    def __init__(self, spec: VaeSpec, context: BackendContext) -> None:
        self.spec = spec
        self.context = context
        self.latent_size = int(context.latent_size or max(spec.latent_sizes))
        heldout = np.asarray(context.heldout, np.float32)
        # The Bernoulli likelihood is defined on binary images: binarise once, with a fixed seed.
        self.heldout = binarise(heldout, HELDOUT_SEED) if spec.likelihood == "bernoulli" else heldout
        self.training = spec.training.model_copy(update=_training_update(context, spec.training))

    def _build(self) -> torch.nn.Module:
        from latentlab.models.base import build_model

        return build_model(self.spec.family, self.context.sample_shape, self.latent_size, **self.spec.family_options())

    def fit(self, images: Array, labels: Array | None, *, seed: int, generation: int, init: Any = None) -> Any:
        from latentlab import engine

        images = np.asarray(images, np.float32)
        n = len(images)
        if n < 2:
            raise DataError(f"a VAE needs at least 2 training images, got {n}")
        order = np.random.default_rng(seed).permutation(n)
        n_val = min(n - 1, max(1, round(VAL_FRACTION * n)))
        val, train = images[np.sort(order[:n_val])], images[np.sort(order[n_val:])]
        torch.manual_seed(seed)
        model = self._build() if init is None else copy.deepcopy(init)
        result = engine.fit(
            model,
            engine.TrainingData(train),
            engine.TrainingData(validation_images(model, val, seed)),
            self.training,
            seed=seed,
            device=self.context.device,
            checkpoint=_checkpoint(self.context.checkpoint_dir, generation, init),
            progress=False,
        )
        return result.model

    @torch.no_grad()
    def sample(self, model: Any, n: int, *, psi: float, seed: int) -> tuple[Array, None]:
        generator = _cpu_generator(seed)
        parts = [
            model.sample(min(SAMPLE_BATCH, n - start), generator=generator, psi=psi).float().cpu().numpy()
            for start in range(0, n, SAMPLE_BATCH)
        ]
        return np.concatenate(parts).astype(np.float32), None

    def evaluate(self, model: Any, samples: Array, sample_labels: Array | None, *, generation: int) -> dict[str, float]:
        from latentlab.models.vae import negative_elbo

        metrics = self.context.judge(samples, None)
        nelbo = negative_elbo(model, self.heldout, generator=_cpu_generator(HELDOUT_SEED))
        metrics["heldout_neg_elbo"] = float(np.mean(nelbo))
        _drop_checkpoint(self.context.checkpoint_dir, generation)
        return metrics


# ---------------------------------------------------------------------- GAN
class GanBackend(_ModuleFiles):
    """A GAN of generate.zoo trained with :func:`latentlab.adversarial.fit_gan`.

    An unconditional pair ignores the training labels and draws unlabelled
    samples. A conditional pair (``cgan``) trains on the labels (every part of
    its training sets is labelled: real data, and samples labelled with the class
    they were drawn for) and draws its samples for classes chosen uniformly at
    random with the sample seed; their labels go with them into the next
    generation, and ``evaluate`` reports ``label_accuracy`` too.
    """

    def __init__(self, spec: GanSpec, context: BackendContext) -> None:
        self.spec = spec
        self.context = context
        self.conditional = spec.family == "cgan"
        self.training = spec.training.model_copy(update=_training_update(context, spec.training))

    def _build(self) -> torch.nn.Module:
        from latentlab.models.gan import build_gan

        return build_gan(
            self.spec.family,
            self.context.sample_shape,
            self.spec.latent_dim,
            self.context.num_classes if self.conditional else None,
            **self.spec.family_options(),
        )

    def fit(self, images: Array, labels: Array | None, *, seed: int, generation: int, init: Any = None) -> Any:
        from latentlab.adversarial import fit_gan

        if self.conditional and labels is None:
            raise DataError(f"{self.spec.family}: a conditional GAN needs labelled training images")
        torch.manual_seed(seed)
        # Fine-tuning continues both networks: the discriminator's state is part of what was learnt.
        pair = self._build() if init is None else copy.deepcopy(init)
        result = fit_gan(
            pair,
            np.asarray(images, np.float32),
            np.asarray(labels) if self.conditional else None,
            self.training,
            seed=seed,
            device=self.context.device,
            checkpoint=_checkpoint(self.context.checkpoint_dir, generation, init),
            progress=False,
        )
        return result.pair

    def sample(self, model: Any, n: int, *, psi: float, seed: int) -> tuple[Array, Array | None]:
        labels = None
        if self.conditional:
            labels = np.random.default_rng(seed).integers(0, self.context.num_classes, size=n).astype(np.int64)
        generator = _cpu_generator(seed)
        parts = []
        for start in range(0, n, SAMPLE_BATCH):
            stop = min(n, start + SAMPLE_BATCH)
            batch_labels = None if labels is None else labels[start:stop]
            parts.append(model.sample(stop - start, psi=psi, labels=batch_labels, generator=generator).cpu().numpy())
        return np.concatenate(parts).astype(np.float32), labels

    def evaluate(self, model: Any, samples: Array, sample_labels: Array | None, *, generation: int) -> dict[str, float]:
        # No held-out likelihood figure for a GAN: see the module docstring.
        metrics = self.context.judge(samples, sample_labels if self.conditional else None)
        _drop_checkpoint(self.context.checkpoint_dir, generation)
        return metrics


@register_backend(VaeSpec)
def _vae_backend(spec: VaeSpec, context: BackendContext) -> GenerativeBackend:
    return VaeBackend(spec, context)


@register_backend(GanSpec)
def _gan_backend(spec: GanSpec, context: BackendContext) -> GenerativeBackend:
    return GanBackend(spec, context)


# -------------------------------------------------------------------- study
@dataclass(frozen=True)
class StudyBackends:
    """The backends of one collapse study: one zoo entry, one classifier, one held-out reference."""

    model: str  # key of generate.zoo
    spec: VaeSpec | GanSpec
    context: BackendContext
    state_dir: Path  # where the study's finished generations live (one folder per backend configuration)
    settings: dict[str, Any]  # what the backend configuration is (the state folder's key is its hash)

    def make(self, loop: str, seed: int) -> GenerativeBackend:
        """A backend for one (loop, seed) run: its own folder of fit checkpoints."""
        folder = self.state_dir / "fits" / f"{loop}-seed{seed}"
        return build_backend(self.spec, replace(self.context, checkpoint_dir=folder))

    def real_floor(self, real_train: Array, seed: int) -> dict[str, float]:
        """The quality metrics of real training images (as many as the reference) against the reference.

        What a perfect generator would score at this number of samples: the floor
        of the Fréchet distance, the ceiling of precision and recall.
        """
        n = min(len(self.context.judge.reference), len(real_train))
        return self.context.judge(subsample(np.asarray(real_train), n, seed), None)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_digest(a: Array) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def study_backends(
    params: Params, dataset: str, paths: Any, real_test: Array, num_classes: int, *, device: torch.device | None = None
) -> StudyBackends:
    """The backends of the collapse study of ``dataset`` (``paths``: a :class:`~latentlab.paths.ProjectPaths`).

    ``real_test`` (N, C, H, W) float32 in [0, 1]: the real test split. The
    quality reference is a seeded (``generate.quality.seed``) subset of
    ``collapse.eval_samples`` of its images (all when fewer), the held-out
    likelihood set one of ``generate.quality.nll_images`` (None = all); both
    are fixed for the whole study. The domain classifier is read from
    ``paths.classifier(dataset) / "classifier.pt"``. The state folder is
    ``paths.collapse_state(dataset) / "{model}-{key}"``, ``key`` a hash of the
    zoo entry, latent size, classifier file, reference sets and metric settings:
    changing any of them starts the study afresh instead of reusing
    generations made otherwise.
    """
    from latentlab.engine import pick_device

    cfg, quality = params.collapse, params.generate.quality
    spec = params.generate.spec(cfg.model)
    device = device or pick_device(params.train.device)
    classifier_file = paths.classifier(dataset) / "classifier.pt"
    classifier, _ = load_classifier(classifier_file, device)
    real_test = np.asarray(real_test, np.float32)
    if len(real_test) < 2:
        raise DataError(f"{paths.processed(dataset)}: the test split has {len(real_test)} images; need at least 2")
    reference = subsample(real_test, min(cfg.eval_samples, len(real_test)), quality.seed)
    n_heldout = len(real_test) if quality.nll_images is None else min(quality.nll_images, len(real_test))
    heldout = subsample(real_test, n_heldout, quality.seed + 1)
    sample_shape = tuple(int(s) for s in real_test.shape[1:])
    latent_size = None
    if isinstance(spec, VaeSpec):
        latent_size = int(cfg.latent_size or max(spec.latent_sizes))
    context = BackendContext(
        judge=QualityJudge(classifier, reference, device, quality.k, quality.min_fraction),
        heldout=heldout,
        sample_shape=sample_shape,  # type: ignore[arg-type]
        num_classes=int(num_classes),
        device=device,
        latent_size=latent_size,
        epochs=cfg.epochs,
    )
    settings = {
        "model": cfg.model,
        "family": spec.family,
        "spec": spec.model_dump(mode="json"),
        "latent_size": latent_size,
        "epochs": cfg.epochs,
        "num_classes": int(num_classes),
        "k": quality.k,
        "min_fraction": quality.min_fraction,
        "n_reference": len(reference),
        "n_heldout": len(heldout) if isinstance(spec, VaeSpec) else 0,
        "val_fraction": VAL_FRACTION,
    }
    digests = {
        "classifier": _file_digest(classifier_file),
        "reference": _array_digest(reference),
        "heldout": _array_digest(heldout),
        # Saved generations are reused only by the code that made them (latentlab.provenance).
        "code": code_digest(),
    }
    key = hashlib.sha256(json.dumps({**settings, **digests}, sort_keys=True).encode()).hexdigest()[:12]
    state_dir = paths.collapse_state(dataset) / f"{cfg.model}-{key}"
    return StudyBackends(cfg.model, spec, context, state_dir, settings)
