"""``params.yaml`` parsed once into frozen, validated models.

Each stage reads its own section. Unknown keys, wrong types and out-of-range
values are rejected with a one-line :class:`~latentlab.errors.ConfigError`
naming the dotted key, e.g.::

    params.yaml: ingest.val_fraction: Input should be less than 1 (got 1.5)
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from latentlab.errors import ConfigError

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    """Base of every config model: immutable, and unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------- ingest
class IdxSource(Section):
    """MNIST-style IDX files (``*images-idx3-ubyte[.gz]``, ``*labels-idx1-ubyte[.gz]``)."""

    kind: Literal["mnist", "fashion_mnist", "idx"]
    path: Path | None = None  # folder with the IDX files; None = known local places, then download
    class_names: tuple[str, ...] | None = None  # names of labels 0..K-1; None = built-in or "0".."K-1"


class ImageFolderSource(Section):
    """A folder of PNG images with one sub-folder per class (the folder name is the class)."""

    kind: Literal["image_folder"]
    path: Path
    channels: Literal[1, 3, 4] = 1  # 1 = grayscale, 3 = RGB, 4 = RGBA
    size: tuple[Annotated[int, Field(ge=4)], Annotated[int, Field(ge=4)]] | None = (
        None  # (H, W) to resize to; None = all images must share one size
    )


class CsvSource(Section):
    """A CSV of pixel rows (values 0..255) with a label column."""

    kind: Literal["csv"]
    path: Path  # one CSV file, or a folder with train.csv and test.csv
    label_column: str = "label"
    shape: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = (
        1,
        28,
        28,
    )  # (C, H, W); pixels are channel-last in a row
    class_names: tuple[str, ...] | None = None


class Sat6Source(Section):
    """SAT-6 (DeepSat) 28x28x4 patches: Kaggle CSV form or the original sat-6-full.mat."""

    kind: Literal["sat6"]
    path: Path | None = None  # folder with X_*/y_* CSVs or sat-6-full.mat; no offline default exists
    max_rows: Annotated[int, Field(ge=1)] | None = (
        None  # read at most this many rows per split (the full CSV is 1.6 GB)
    )


class SpeechSynthesis(Section):
    """espeak-ng settings for the offline spoken-digit substitute."""

    voices: tuple[str, ...] = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+m7", "en-gb+f2")
    speeds: tuple[Annotated[int, Field(ge=80, le=450)], ...] = (120, 150, 180)  # words per minute
    pitches: tuple[Annotated[int, Field(ge=0, le=99)], ...] = (30, 50, 70)  # espeak-ng pitch, 0..99


class SpeechSource(Section):
    """Spoken digits as log-mel spectrograms (Free Spoken Digit Dataset naming)."""

    kind: Literal["speech"]
    path: Path | None = None  # folder of {digit}_{speaker}_{index}.wav; None = download FSDD, offline espeak-ng
    sample_rate: Annotated[int, Field(ge=4000, le=48000)] = 8000  # Hz, every clip is resampled to it
    duration: Annotated[float, Field(gt=0.1, le=10.0)] = 1.0  # s, clips are trimmed or zero-padded to it
    n_fft: Annotated[int, Field(ge=64, le=8192)] = 512  # FFT window, samples
    hop_length: Annotated[int, Field(ge=16, le=4096)] = 256  # frame step, samples
    n_mels: Annotated[int, Field(ge=8, le=256)] = 32  # mel bands (spectrogram height)
    fmin: Annotated[float, Field(ge=0.0)] = 0.0  # Hz, lowest mel band edge
    fmax: Annotated[float, Field(gt=0.0)] | None = None  # Hz, highest edge; None = sample_rate / 2
    top_db: Annotated[float, Field(gt=10.0, le=200.0)] = 80.0  # dB of dynamic range kept below the train-set peak
    synthesis: SpeechSynthesis = SpeechSynthesis()

    @model_validator(mode="after")
    def _check_bands(self) -> SpeechSource:
        nyquist = self.sample_rate / 2
        if self.fmax is not None and self.fmax > nyquist:
            raise ValueError(f"fmax {self.fmax} Hz is above the Nyquist frequency {nyquist} Hz")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length {self.hop_length} is larger than n_fft {self.n_fft}")
        return self


DatasetSource = Annotated[
    IdxSource | ImageFolderSource | CsvSource | Sat6Source | SpeechSource,
    Field(discriminator="kind"),
]


class IngestConfig(Section):
    seed: Annotated[int, Field(ge=0)] = 0  # seed of the train/validation/test split
    val_fraction: Fraction = 0.1  # share of the training data held out for validation
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = (
        0.2  # share held out for test when a source has no test split
    )
    datasets: dict[str, DatasetSource]


# ------------------------------------------------------------------- validate
class BalanceBounds(Section):
    min_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # smallest allowed class share / uniform share
    max_ratio: Annotated[float, Field(ge=1.0)] = 1.5  # largest allowed class share / uniform share


class ValidateConfig(Section):
    class_balance: BalanceBounds = BalanceBounds()
    class_balance_overrides: dict[str, BalanceBounds] = {}  # per-dataset bounds (e.g. SAT-6 is unbalanced)
    min_samples: dict[Literal["train", "val", "test"], Annotated[int, Field(ge=1)]] = {"train": 10, "val": 2, "test": 2}
    min_std: Annotated[float, Field(ge=0.0)] = 0.0  # smallest allowed per-sample std (0 allows blank samples)


# -------------------------------------------------------------------- corrupt
class CorruptConfig(Section):
    seed: Annotated[int, Field(ge=0)] = 0  # seed of every corruption
    splits: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")  # splits to corrupt
    gaussian_sigma: tuple[Annotated[float, Field(gt=0.0, le=2.0)], ...] = (
        0.3,
    )  # std of additive noise, pixel units in [0, 1]
    salt_pepper_amount: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = (0.2,)  # share of pixels set to 0 or 1
    mask_fraction: tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] = (0.5,)  # share of pixels dropped to 0
    block_size: tuple[Annotated[int, Field(ge=1)], ...] = (12,)  # side of the square occluding block, pixels
    snr_db: tuple[Annotated[float, Field(ge=-30.0, le=60.0)], ...] = (5.0,)  # target SNR of noisy speech, dB
    audio_noise: tuple[Literal["white", "babble"], ...] = ("white", "babble")  # additive noise kinds for speech
    babble_speakers: Annotated[int, Field(ge=1, le=32)] = 4  # utterances summed into one babble noise
    # Independent noise draws of every training clip (speech): a denoiser trained on one fixed
    # noise per clip learns that noise; val and test keep one draw, so scores stay comparable.
    audio_train_draws: Annotated[int, Field(ge=1, le=64)] = 1


# The corruptions a section asks for, named as the corrupt stage names its files: defined
# here so that params.yaml can be checked against them (train.zoo.*.denoise_from) on parsing.
@dataclass(frozen=True)
class Corruption:
    """One corruption kind at one level, i.e. one output file."""

    kind: str  # gaussian, salt_pepper, mask, block, white, babble
    parameter: str  # name of the level: sigma, amount, fraction, size, snr_db
    config_key: str  # the params.yaml key the level comes from
    level: float | int

    @property
    def name(self) -> str:
        prefix = {
            "gaussian": "gaussian_sigma",
            "salt_pepper": "salt_pepper",
            "mask": "mask",
            "block": "block",
            "white": "white_snr",
            "babble": "babble_snr",
        }[self.kind]
        suffix = "db" if self.kind in ("white", "babble") else ""
        return f"{prefix}{format_level(self.level)}{suffix}"

    @property
    def file(self) -> str:
        return f"{self.name}.npz"


def format_level(value: float | int) -> str:
    """A level written compactly for a file name: 0.3 -> '0.3', 5.0 -> '5', 12 -> '12'."""
    if isinstance(value, numbers.Integral):  # numpy's integers too
        return str(int(value))
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def plan_corruptions(modality: str, cfg: CorruptConfig) -> list[Corruption]:
    """The corruptions ``cfg`` asks for on a dataset of ``modality``, in output order.

    Raises:
        ConfigError: a level is listed twice (two levels would share a file name).
    """
    if modality == "image":
        plan = [
            *(Corruption("gaussian", "sigma", "corrupt.gaussian_sigma", s) for s in cfg.gaussian_sigma),
            *(Corruption("salt_pepper", "amount", "corrupt.salt_pepper_amount", a) for a in cfg.salt_pepper_amount),
            *(Corruption("mask", "fraction", "corrupt.mask_fraction", f) for f in cfg.mask_fraction),
            *(Corruption("block", "size", "corrupt.block_size", b) for b in cfg.block_size),
        ]
    else:
        plan = [
            Corruption(noise, "snr_db", "corrupt.snr_db", snr)
            for noise in dict.fromkeys(cfg.audio_noise)
            for snr in cfg.snr_db
        ]
    seen: dict[str, Corruption] = {}
    for c in plan:
        if c.name in seen:
            raise ConfigError(f"params.yaml: {c.config_key}: level {format_level(c.level)} is listed twice")
        seen[c.name] = c
    return plan


# ---------------------------------------------------------------------- train
LatentSizes = tuple[Annotated[int, Field(ge=1)], ...]


def _corruption_names(value: Any) -> Any:
    """One corruption name or a list of them -> a tuple of distinct names."""
    names = (value,) if isinstance(value, str) else value
    if isinstance(names, list | tuple):
        if not names:
            raise ValueError("needs at least one corruption name")
        if len(set(names)) != len(names):
            raise ValueError(f"lists a corruption twice: {list(names)}")
    return names


# A corruption name (as the corrupt stage writes it, e.g. white_snr5db) or several.
CorruptionNames = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_corruption_names)]


class TrainingConfig(Section):
    """How the training engine fits one network (src/latentlab/engine.py)."""

    epochs: Annotated[int, Field(ge=1)] = 20  # most epochs; early stopping may end sooner
    # The most epochs are raised to cover at least this many optimiser steps (small datasets get
    # more epochs); early stopping may still end the run sooner.
    min_steps: Annotated[int, Field(ge=0)] = 0
    batch_size: Annotated[int, Field(ge=1)] = 128  # samples per optimiser step
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3  # Adam learning rate (the first epoch's, under a schedule)
    # constant | cosine: the learning rate of epoch e of E is lr * (1 + cos(pi * e / E)) / 2
    # (Loshchilov & Hutter 2017, SGDR, eq. 5 without restarts), E the most epochs.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0  # L2 penalty (AdamW decoupled decay)
    # Standard deviation (pixel units) of Gaussian noise added to the inputs at every training
    # step, drawn afresh each time, while the target stays the clean image: the denoising
    # criterion (Vincent et al. 2008) used as a regulariser; 0 = none. Validation is noise-free.
    input_noise: Annotated[float, Field(ge=0.0)] = 0.0
    # Epochs without validation improvement before stopping; None = never stop early (the best
    # validation epoch's weights are still the ones kept).
    patience: Annotated[int, Field(ge=1)] | None = 5
    min_delta: Annotated[float, Field(ge=0.0)] = 0.0  # smallest validation-loss decrease that counts
    checkpoint_every: Annotated[int, Field(ge=1)] = 1  # epochs between resumable checkpoints
    max_train_samples: Annotated[int, Field(ge=2)] | None = None  # cap on training samples; None = all
    amp: bool = True  # bf16 mixed precision on GPU; ignored on CPU
    cuda_graph: bool = False  # replay each full-batch step as one CUDA graph (fast for small models); GPU only


class ModelSpec(Section):
    """What every entry of ``train.zoo`` has; each family adds its own hyperparameters."""

    latent_sizes: LatentSizes = (2, 4, 6)  # one network (or projection) per latent size
    # Corruptions of the corrupt stage to learn from (corrupted -> clean), per modality: one name
    # or a list, e.g. {image: gaussian_sigma0.3, spectrogram: [white_snr5db, babble_snr5db]}. With
    # a list the model trains on every listed corruption of each clean sample (one cleaner for
    # all of them); None = a plain autoencoder.
    denoise_from: dict[Literal["image", "spectrogram"], CorruptionNames] | None = None
    # On spectrogram data, w of the level-weighted reconstruction error: each log-mel bin's squared
    # error weighted by exp(w * its clean [0, 1] level), so loud bins, which set the spectral SNR,
    # count about as their magnitude at w = 8 (models.base.Autoencoder.reconstruction_error).
    # 0 = plain MSE. Image data always get plain MSE.
    spectrogram_loss_weight: Annotated[float, Field(ge=0.0, le=20.0)] = 0.0
    training: TrainingConfig = TrainingConfig()
    # Keys of `training` that differ on data of one modality, e.g. {spectrogram: {min_steps: 4000}}:
    # the default speech set has 380 clips, the image sets thousands of images. Stored merged over
    # `training` (declared above it, so already validated), each a full TrainingConfig.
    training_by_modality: dict[Literal["image", "spectrogram"], TrainingConfig] = {}

    @field_validator("training_by_modality", mode="before")
    @classmethod
    def _merge_over_training(cls, value: Any, info: ValidationInfo) -> Any:
        base = info.data.get("training")
        if not isinstance(value, dict) or base is None:
            return value  # pydantic reports the wrong type, or `training`'s own error comes first
        return {
            modality: base.model_dump() | update if isinstance(update, dict) else update
            for modality, update in value.items()
        }

    def training_for(self, modality: str) -> TrainingConfig:
        """The engine settings on data of ``modality``: ``training`` with that modality's keys replaced."""
        return self.training_by_modality.get(modality, self.training)  # type: ignore[call-overload]

    def corruptions_for(self, modality: str) -> tuple[str, ...]:
        """The corruptions this model learns to undo on data of ``modality`` (empty: none)."""
        if self.denoise_from is None:
            return ()
        try:
            return self.denoise_from[modality]  # type: ignore[index]
        except KeyError:
            raise ConfigError(
                f"params.yaml: train.zoo.*.denoise_from: no corruption given for {modality} data"
            ) from None

    @model_validator(mode="after")
    def _unique_sizes(self) -> ModelSpec:
        if not self.latent_sizes or len(set(self.latent_sizes)) != len(self.latent_sizes):
            raise ValueError("latent_sizes must be a non-empty list without repeats")
        return self

    def level_weight_for(self, modality: str) -> float:
        """The reconstruction error's level weight on data of ``modality``; images always get plain MSE."""
        return self.spectrogram_loss_weight if modality == "spectrogram" else 0.0

    def family_options(self) -> dict[str, Any]:
        """The family's own hyperparameters, as keyword arguments of its model class."""
        return self.model_dump(
            exclude={
                "family",
                "latent_sizes",
                "denoise_from",
                "spectrogram_loss_weight",
                "training",
                "training_by_modality",
            }
        )


class PcaSpec(ModelSpec):
    family: Literal["pca"]
    latent_sizes: LatentSizes = (2, 4, 6, 16, 32)  # principal components kept

    @model_validator(mode="after")
    def _not_denoising(self) -> PcaSpec:
        if self.denoise_from is not None:
            raise ValueError("PCA is fitted on clean data; denoise_from does not apply")
        return self


class LinearSpec(ModelSpec):
    family: Literal["linear"]


class DeepSpec(ModelSpec):
    family: Literal["deep"]
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (300, 150)  # hidden layer widths of the encoder
    activation: Literal["selu", "relu"] = "selu"


class ConvSpec(ModelSpec):
    family: Literal["conv"]


class ConvPlusSpec(ModelSpec):
    family: Literal["conv_plus"]
    channels: tuple[Annotated[int, Field(ge=1)], ...] = (32, 64, 128)  # channels of the strided conv blocks


class SparseSpec(ModelSpec):
    family: Literal["sparse"]
    rho: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05  # target mean activation of each code unit
    beta: Annotated[float, Field(ge=0.0)] = 0.1  # weight of the KL sparsity penalty


class ContractiveSpec(ModelSpec):
    family: Literal["contractive"]
    lam: Annotated[float, Field(ge=0.0)] = 1e-4  # weight of the squared Frobenius norm of the encoder Jacobian


AnyModelSpec = Annotated[
    PcaSpec | LinearSpec | DeepSpec | ConvSpec | ConvPlusSpec | SparseSpec | ContractiveSpec,
    Field(discriminator="family"),
]


class TrainConfig(Section):
    seed: Annotated[int, Field(ge=0)] = 0  # seed of subsampling, initialisation and batch order
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when present, else CPU
    threads: Annotated[int, Field(ge=1)] | None = None  # torch CPU threads; None = torch's default
    models: tuple[str, ...] = ("pca",)  # models (keys of zoo) the pipeline trains on every dataset
    zoo: dict[str, AnyModelSpec] = {"pca": PcaSpec(family="pca")}  # every model, by name

    @model_validator(mode="after")
    def _models_defined(self) -> TrainConfig:
        for name in self.models:
            if name not in self.zoo:
                raise ValueError(f"model {name!r} is listed in train.models but not defined under train.zoo")
        return self

    def spec(self, name: str) -> AnyModelSpec:
        try:
            return self.zoo[name]
        except KeyError:
            raise ConfigError(
                f"params.yaml: train.zoo: no model named {name!r} (defined: {', '.join(sorted(self.zoo))})"
            ) from None


# ------------------------------------------------------------------- evaluate
class LatentConfig(Section):
    methods: tuple[Literal["pca", "tsne", "umap"], ...] = ("pca", "tsne", "umap")  # 2-D maps of the test codes
    models: tuple[str, ...] = ("conv_plus",)  # models whose codes are mapped (k-means scores are computed for all)
    max_samples: Annotated[int, Field(ge=10)] = 2000  # test codes embedded (t-SNE is quadratic in this)


class AnomalyConfig(Section):
    """One-class anomaly detection: per class, train on that class only, score the test set."""

    datasets: tuple[str, ...] = ("mnist", "fashion_mnist")  # datasets the anomaly stage runs on
    model: str = "conv_plus"  # a key of train.zoo whose family and options are used
    latent_size: Annotated[int, Field(ge=1)] = 16
    threshold_percentile: Annotated[float, Field(gt=0.0, lt=100.0)] = 95.0  # of normal validation scores
    # The per-image reconstruction term of an autoencoder's score: "mse", or "ssim" for the
    # structural dissimilarity 1 - SSIM (Bergmann et al. 2019). A VAE scores by its negative ELBO.
    reconstruction_error: Literal["mse", "ssim"] = "mse"
    # Add the squared Mahalanobis distance of the image's code under a Gaussian fitted to the
    # class's training codes; each term is then standardised on the normal validation images
    # and the two are summed (Abati et al. 2019). Autoencoders and PCA only.
    latent_density: bool = False
    training: TrainingConfig = TrainingConfig()  # for each one-class model
    max_test_samples: Annotated[int, Field(ge=10)] | None = None  # cap on scored test samples; None = all


class SparsityConfig(Section):
    """The sparse autoencoder sweep whose code activations the report shows."""

    datasets: tuple[str, ...] = ("mnist",)
    latent_size: Annotated[int, Field(ge=1)] = 64  # code units
    rho: tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] = (0.05, 0.1, 0.5)  # target mean activations
    beta: tuple[Annotated[float, Field(ge=0.0)], ...] = (0.0, 0.1, 1.0)  # penalty weights
    training: TrainingConfig = TrainingConfig()


class EvaluateConfig(Section):
    max_test_samples: Annotated[int, Field(ge=1)] | None = None  # cap on test samples; None = all
    grid_size: Annotated[int, Field(ge=1, le=64)] = 8  # images per row of example grids
    median_size: Annotated[int, Field(ge=2)] = 3  # window of the median-filter baseline, pixels
    blur_sigma: Annotated[float, Field(gt=0.0)] = 1.0  # std of the Gaussian-blur baseline, pixels
    latent: LatentConfig = LatentConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    sparsity: SparsityConfig = SparsityConfig()
    audio_examples: Annotated[int, Field(ge=0, le=20)] = 3  # noisy/cleaned/clean WAV triples in the speech report


# ------------------------------------------------------------------ generate
class ClassifierConfig(Section):
    """How :func:`train_classifier` fits the domain classifier."""

    epochs: Annotated[int, Field(ge=1)] = 10  # passes over the training data
    batch_size: Annotated[int, Field(ge=2)] = 128  # samples per optimiser step
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3  # Adam learning rate (start of the schedule)
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0  # decoupled weight decay (AdamW); 0 = plain Adam
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: lr decays to 0 over the epochs, set per epoch
    # Random translation of each image, up to this many pixels per axis (0 = none). Measured at 10 epochs on
    # 55k images: 1 px gives MNIST 99.57 % / Fashion-MNIST 92.45 % test accuracy, 2 px 99.54 / 91.80, 0 px 99.49 / 93.08.
    augment_shift: Annotated[int, Field(ge=0, le=8)] = 1
    max_train_samples: Annotated[int, Field(ge=2)] | None = None  # cap on training samples (seeded draw); None = all
    amp: bool = True  # bf16 mixed precision on GPU while training; ignored on CPU


class GanTrainingConfig(Section):
    """How :func:`fit_gan` trains one generator/discriminator pair.

    The defaults are the DCGAN recipe (Radford et al. 2016, section 4): Adam with
    learning rate 2e-4 for both networks and beta1 = 0.5 (0.9 made training
    oscillate and unstable in their experiments); their batch size is 128.
    """

    epochs: Annotated[int, Field(ge=1)] = 25  # passes over the training images
    batch_size: Annotated[int, Field(ge=2)] = 128  # real images per step (and as many fakes)
    lr_g: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-4  # Adam learning rate of the generator
    lr_d: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-4  # Adam learning rate of the discriminator
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5  # Adam first-moment decay, both optimisers
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999  # Adam second-moment decay, both optimisers
    checkpoint_every: Annotated[int, Field(ge=1)] = 1  # epochs between resumable checkpoints
    max_train_samples: Annotated[int, Field(ge=2)] | None = None  # cap on training images; None = all
    amp: bool = True  # bf16 mixed precision on GPU; ignored on CPU


class VaeSpec(Section):
    """A variational autoencoder of generate.zoo (src/latentlab/models/vae.py)."""

    family: Literal["vae_mlp", "vae_conv"]
    latent_sizes: LatentSizes = (2, 16)  # one VAE per latent size; a 2-D one also gets the manifold grid
    hidden: tuple[Annotated[int, Field(ge=1)], ...] | None = None  # vae_mlp: hidden widths; None = (512, 256)
    channels: tuple[Annotated[int, Field(ge=1)], ...] | None = None  # vae_conv: conv channels; None = (32, 64)
    likelihood: Literal["bernoulli", "gaussian"] = "bernoulli"  # decoder p(x|z)
    beta: Annotated[float, Field(ge=0.0)] = 1.0  # weight of the KL term (beta-VAE; 1 = the ELBO)
    binarize: bool = True  # dynamic binarisation of training images (Bernoulli decoder)
    # K of the training bound: 1 = the ELBO; K > 1 = the importance-weighted bound (Burda et al. 2016)
    importance_samples: Annotated[int, Field(ge=1)] = 1
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _iwae_has_no_beta(self) -> VaeSpec:
        if self.importance_samples > 1 and self.beta != 1.0:
            raise ValueError(
                f"importance_samples = {self.importance_samples} trains on the importance-weighted bound, "
                f"which has no KL weight: beta must be 1, got {self.beta}"
            )
        return self

    def family_options(self) -> dict[str, Any]:
        """The family's own hyperparameters, as keyword arguments of its model class."""
        return self.model_dump(exclude={"family", "latent_sizes", "training"}, exclude_none=True)


class GanSpec(Section):
    """A GAN of generate.zoo (src/latentlab/models/gan.py); unset options take the family's defaults."""

    family: Literal["gan", "dcgan", "cgan"]
    latent_dim: Annotated[int, Field(ge=1)] = 64  # size of the generator's input noise z
    g_hidden: tuple[Annotated[int, Field(ge=1)], ...] | None = None  # gan / cgan-mlp: generator widths
    d_hidden: tuple[Annotated[int, Field(ge=1)], ...] | None = None  # gan / cgan-mlp: discriminator widths
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = None  # gan / cgan-mlp: discriminator dropout
    channels: tuple[Annotated[int, Field(ge=1)], ...] | None = None  # dcgan / cgan-dcgan: conv channels
    arch: Literal["dcgan", "mlp"] | None = None  # cgan: the backbone
    embed_dim: Annotated[int, Field(ge=1)] | None = None  # cgan: size of the label embedding
    training: GanTrainingConfig = GanTrainingConfig()

    def family_options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"family", "latent_dim", "training"}, exclude_none=True)


AnyGenerativeSpec = Annotated[VaeSpec | GanSpec, Field(discriminator="family")]


class QualityConfig(Section):
    """Sample-quality metrics in the domain classifier's feature space (src/latentlab/quality.py)."""

    samples: Annotated[int, Field(ge=10)] = 2000  # generated (and real) images per figure, drawn with the seed
    seed: Annotated[int, Field(ge=0)] = 0  # seed of those draws
    k: Annotated[int, Field(ge=1)] = 3  # neighbours defining the precision/recall manifolds
    psi: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = (0.25, 0.5, 0.75, 1.0)  # truncation levels swept
    min_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # a class is covered at this share of uniform
    nll_images: Annotated[int, Field(ge=1)] | None = 1000  # test images of the VAE NLL estimate; None = all
    nll_importance_samples: Annotated[int, Field(ge=1)] = 200  # K of the importance-sampled NLL (IWAE bound)
    monitor_samples: Annotated[int, Field(ge=10)] = 500  # GAN samples classified after each epoch (collapse watch)
    coverage_drop: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2  # coverage fall below its best that flags collapse
    entropy_drop: Annotated[float, Field(gt=0.0, le=1.0)] = 0.15  # normalised-entropy fall that flags collapse
    classifier: ClassifierConfig = ClassifierConfig()


class GenerateConfig(Section):
    datasets: tuple[str, ...] = ()  # datasets the generative models run on (each in pipeline.datasets)
    models: tuple[str, ...] = ()  # keys of zoo trained on every dataset of datasets
    zoo: dict[str, AnyGenerativeSpec] = {}  # every generative model, by name
    quality: QualityConfig = QualityConfig()

    @model_validator(mode="after")
    def _models_defined(self) -> GenerateConfig:
        for name in self.models:
            if name not in self.zoo:
                raise ValueError(f"model {name!r} is listed in generate.models but not defined under generate.zoo")
        return self

    def spec(self, name: str) -> VaeSpec | GanSpec:
        try:
            return self.zoo[name]
        except KeyError:
            raise ConfigError(
                f"params.yaml: generate.zoo: no model named {name!r} (defined: {', '.join(sorted(self.zoo))})"
            ) from None


# ------------------------------------------------------------------ collapse
LoopName = Literal["replace", "accumulate", "augment", "fresh"]
LOOPS: tuple[str, ...] = ("replace", "accumulate", "augment", "fresh")
HealingStart = Literal["finetune", "fresh"]


class CollapseConfig(Section):
    """One model-collapse study: every loop type x every seed, generations 0..N, then healing
    (src/latentlab/collapse.py)."""

    datasets: tuple[str, ...] = ()  # datasets the collapse stage runs on (each in pipeline.datasets)
    model: str = "vae_mlp"  # key of generate.zoo retrained every generation
    latent_size: Annotated[int, Field(ge=1)] | None = None  # VAE latent size; None = the model's largest
    epochs: Annotated[int, Field(ge=1)] | None = None  # epochs of each generation's model; None = the model's own

    loops: tuple[LoopName, ...] = LOOPS  # loop types run, each for every seed
    generations: Annotated[int, Field(ge=1)] = 5  # N: generations after generation 0 (which trains on real data)
    seeds: tuple[Annotated[int, Field(ge=0)], ...] = (0, 1, 2)  # one independent run per seed and loop
    samples_per_generation: Annotated[int, Field(ge=1)] = 10000  # synthetic samples drawn from each generation's model
    real_size: Annotated[int, Field(ge=1)] = 10000  # real samples of generation 0, and the real part of augment/fresh
    synthetic_fraction: Annotated[float, Field(ge=0.0)] = (
        0.5  # f of augment/fresh: synthetic samples per generation as a fraction of real_size
    )
    psi: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # truncation of sampling: 1 = unbiased, < 1 = nearer the mode
    healing_generations: Annotated[int, Field(ge=0)] = 0  # H: generations on real data only after N; 0 = none
    # How a healing generation starts: "finetune" continues training the previous generation's model on the
    # real data (Bohacek and Farid 2023); "fresh" trains a new model (a control: it forgets the loop).
    healing_start: HealingStart = "finetune"
    eval_samples: Annotated[int, Field(ge=2)] = 2000  # samples drawn from each generation's model for its metrics

    @property
    def synthetic_count(self) -> int:
        """Synthetic samples in an augment/fresh training set: ``round(f * real_size)``."""
        return round(self.synthetic_fraction * self.real_size)

    @model_validator(mode="after")
    def _check(self) -> CollapseConfig:
        if not self.loops or len(set(self.loops)) != len(self.loops):
            raise ValueError("loops must be a non-empty list without repeats")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be a non-empty list without repeats")
        if {"augment", "fresh"} & set(self.loops) and self.synthetic_count > self.samples_per_generation:
            raise ValueError(
                f"synthetic_fraction x real_size = {self.synthetic_count} synthetic samples per training set, "
                f"more than the {self.samples_per_generation} drawn per generation (samples_per_generation)"
            )
        return self


# ------------------------------------------------------------------ schedule
Cron = Annotated[str, Field(pattern=r"^\S+( \S+){4}$")]  # five fields: minute hour day-of-month month day-of-week


class DeploymentConfig(Section):
    """One Prefect deployment served by ``latentlab serve``: a scheduled ``dvc exp run``."""

    cron: Cron | None = None  # when it runs (cron, in schedule.timezone); None = only when triggered
    targets: tuple[str, ...] = ()  # dvc stages to reproduce (pipelines/generative/dvc.yaml:collapse); () = all
    set_params: tuple[str, ...] = ()  # `dvc exp run -S` overrides, e.g. "train.device=cuda"


class ScheduleConfig(Section):
    """Prefect deployments (src/latentlab/deploy.py); not read by any DVC stage."""

    timezone: str = "UTC"  # time zone of the cron expressions
    pipeline: DeploymentConfig = DeploymentConfig(cron="0 2 * * 0")  # the whole pipeline, weekly
    collapse: DeploymentConfig = DeploymentConfig(cron="0 4 * * 0", targets=("pipelines/generative/dvc.yaml:collapse",))
    retries: Annotated[int, Field(ge=0)] = 2  # retries of a failed dvc run (transient failures: downloads, disk)
    retry_delay_seconds: tuple[Annotated[float, Field(ge=0.0)], ...] = (30.0, 300.0)  # backoff between retries
    gpu_concurrency: Annotated[int, Field(ge=1)] = 1  # training task runs sharing one GPU at once


# --------------------------------------------------------------------- sweep
#: Grid axes that set a family's own hyperparameter, and the family each applies to.
FAMILY_AXES: dict[str, str] = {"rho": "sparse", "beta": "sparse", "lam": "contractive"}
#: The noise value of a point trained on clean inputs (a plain autoencoder).
NO_NOISE = "none"


def _no_repeats(values: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    if values is not None and (not values or len(set(values)) != len(values)):
        raise ValueError("must be a non-empty list without repeats")
    return values


class SweepGrid(Section):
    """Axis -> values; every combination is one point. An axis left out takes the model's own value."""

    latent_size: tuple[Annotated[int, Field(ge=1)], ...] | None = None  # code sizes k; None = the model's latent_sizes
    # Corruption of the inputs, a name the corrupt stage wrote (e.g. gaussian_sigma0.3), or "none" for clean
    # inputs; None = the model's own denoise_from, one point per listed corruption (or none).
    noise: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    seed: tuple[Annotated[int, Field(ge=0)], ...] | None = None  # init and batch-order seeds; None = train.seed
    rho: tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] | None = None  # sparse: target mean activation
    beta: tuple[Annotated[float, Field(ge=0.0)], ...] | None = None  # sparse: weight of the KL penalty
    lam: tuple[Annotated[float, Field(ge=0.0)], ...] | None = None  # contractive: weight of the Jacobian penalty

    @model_validator(mode="after")
    def _check(self) -> SweepGrid:
        for axis in type(self).model_fields:
            try:
                _no_repeats(getattr(self, axis))
            except ValueError as exc:
                raise ValueError(f"sweep.grid.{axis}: {exc}") from None
        return self

    def axes(self) -> dict[str, tuple[Any, ...]]:
        """The axes given in params.yaml, in declaration order."""
        return {axis: getattr(self, axis) for axis in type(self).model_fields if getattr(self, axis) is not None}


class DaskConfig(Section):
    """Where the Dask task runner sends task runs (prefect-dask)."""

    # Scheduler of a running Dask cluster, e.g. tcp://10.0.0.5:8786; None = start a local cluster.
    # The environment variable LATENTLAB_DASK_ADDRESS overrides it.
    address: Annotated[str, Field(min_length=1, pattern=r"^\S+$")] | None = None
    n_workers: Annotated[int, Field(ge=1, le=256)] = 2  # local cluster: worker processes, one thread each


class SweepConfig(Section):
    """A hyperparameter sweep run as Prefect task runs, one per grid point (src/latentlab/sweep.py).

    Not a DVC stage: the Prefect flow ``sweep`` reads the processed (and
    corrupted) data the pipeline wrote.
    """

    dataset: str | None = None  # dataset every point trains on (in pipeline.datasets); None = the first of them
    model: str = "deep"  # key of train.zoo: the family and options each point starts from (not PCA)
    grid: SweepGrid = SweepGrid()
    training: TrainingConfig | None = None  # the engine's settings for every point; None = the model's own
    max_test_samples: Annotated[int, Field(ge=1)] | None = 2000  # test images each point is scored on; None = all
    # dask = Prefect's DaskTaskRunner (a local cluster, or the cluster at dask.address);
    # serial = one task run at a time in the flow's process. The collapse flow's (loop, seed) pairs use it too.
    runner: Literal["dask", "serial"] = "dask"
    dask: DaskConfig = DaskConfig()


# --------------------------------------------------------------------- report
class ReportConfig(Section):
    title: str = "latentlab report"


class PipelineConfig(Section):
    datasets: tuple[str, ...]  # datasets the pipeline runs on, each defined under ingest.datasets
    experiment: str = "latentlab"  # MLflow experiment name


class Params(Section):
    """The whole of params.yaml."""

    pipeline: PipelineConfig
    ingest: IngestConfig
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    corrupt: CorruptConfig = CorruptConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    generate: GenerateConfig = GenerateConfig()
    collapse: CollapseConfig = CollapseConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    sweep: SweepConfig = SweepConfig()
    report: ReportConfig = ReportConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _datasets_defined(self) -> Params:
        for name in self.pipeline.datasets:
            if name not in self.ingest.datasets:
                raise ValueError(
                    f"dataset {name!r} is listed in pipeline.datasets but not defined under ingest.datasets"
                )
        for section, names in (("generate", self.generate.datasets), ("collapse", self.collapse.datasets)):
            for name in names:
                if name not in self.pipeline.datasets:
                    raise ValueError(f"dataset {name!r} is listed in {section}.datasets but not in pipeline.datasets")
        if self.collapse.datasets and self.collapse.model not in self.generate.zoo:
            raise ValueError(f"collapse.model {self.collapse.model!r} is not defined under generate.zoo")
        self._check_denoise_from()
        self._check_sweep()
        return self

    def _check_denoise_from(self) -> None:
        """Every corruption a model of train.models learns from is one the corrupt section makes.

        Caught here, not when the train stage finds no such file after ingest and corrupt have
        run: ``dvc exp run -S corrupt.gaussian_sigma='[0.5]'`` drops ``gaussian_sigma0.3``.
        Models defined in train.zoo but not listed are not trained, so not checked.
        """
        for name in self.train.models:  # each defined under train.zoo (TrainConfig checks)
            for modality, corruptions in (self.train.zoo[name].denoise_from or {}).items():
                made = [c.name for c in plan_corruptions(modality, self.corrupt)]
                for corruption in corruptions:
                    if corruption not in made:
                        raise ValueError(
                            f"train.zoo.{name}.denoise_from.{modality}: no corruption {corruption!r} "
                            f"(the corrupt section makes: {', '.join(made) or 'none'})"
                        )

    def _check_sweep(self) -> None:
        # Messages start with the key they are about: _first_error shows them as "params.yaml: KEY: ...".
        sweep = self.sweep
        if sweep.dataset is not None and sweep.dataset not in self.pipeline.datasets:
            raise ValueError(f"sweep.dataset: {sweep.dataset!r} is not in pipeline.datasets")
        if sweep.model not in self.train.zoo:
            raise ValueError(
                f"sweep.model: no model {sweep.model!r} under train.zoo (defined: {', '.join(sorted(self.train.zoo))})"
            )
        family = self.train.zoo[sweep.model].family
        if family == "pca":
            raise ValueError(f"sweep.model: {sweep.model!r} is PCA, fitted in closed form; the sweep trains networks")
        for axis in sweep.grid.axes():
            if axis in FAMILY_AXES and FAMILY_AXES[axis] != family:
                raise ValueError(
                    f"sweep.grid.{axis}: applies to the {FAMILY_AXES[axis]} family only, "
                    f"but sweep.model {sweep.model!r} is {family}"
                )

    def sweep_dataset(self) -> str:
        """The dataset of the sweep: ``sweep.dataset``, else the first of ``pipeline.datasets``."""
        return self.sweep.dataset or self.pipeline.datasets[0]

    def dataset(self, name: str) -> DatasetSource:
        try:
            return self.ingest.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.ingest.datasets))
            raise ConfigError(f"params.yaml: ingest.datasets: no dataset named {name!r} (defined: {known})") from None


_SOURCE_KINDS = frozenset({"mnist", "fashion_mnist", "idx", "image_folder", "csv", "sat6", "speech"})
_MODEL_FAMILIES = frozenset(
    {
        "pca",
        "linear",
        "deep",
        "conv",
        "conv_plus",
        "sparse",
        "contractive",
        "vae_mlp",
        "vae_conv",
        "gan",
        "dcgan",
        "cgan",
    }
)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a mapping (as loaded from YAML) into :class:`Params`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_error(exc)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        # libyaml's loader when PyYAML has it: every stage reads params.yaml, 18 ms in pure Python, 2 ms so.
        raw = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_params(raw, str(path))


_NAMED_KEY = re.compile(r"^([a-z_]+(?:\.[A-Za-z0-9_]+)+): ")


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    # pydantic puts the discriminator tag into the location
    # (ingest.datasets.NAME.speech.n_mels): drop it so the key reads as in the file.
    loc: list[str] = []
    for part in err["loc"]:
        if part == "[key]":  # pydantic's mark of a bad mapping key, which the previous part names
            continue
        if len(loc) >= 2 and loc[-2] == "datasets" and part in _SOURCE_KINDS:
            continue
        if len(loc) >= 2 and loc[-2] == "zoo" and part in _MODEL_FAMILIES:
            continue
        loc.append(str(part))
    key = ".".join(loc) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    # A check across sections (a model validator) may name the key itself, "sweep.grid.rho: ...".
    named = _NAMED_KEY.match(msg)
    if named and (not loc or named.group(1).startswith(f"{key}.")):
        key, msg = named.group(1), msg[named.end() :]
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    value = err.get("input")
    shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
    more = f" and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
    return f"{key}: {msg}{shown}{more}"
