"""The one contract every neural model family follows, and the registry that
builds them by name (after pythae's ``BaseAE``: one forward, one output type).

A model's ``forward(x, target)`` returns :class:`ModelOutput`: the scalar loss
to minimise, its named parts (each a detached scalar worth logging, e.g.
``reconstruction``, ``sparsity``, ``contractive``), and the reconstruction.
``target`` is the clean image when ``x`` is a corrupted one (denoising); it
defaults to ``x``. Shapes: ``x`` and ``target`` (N, C, H, W) in [0, 1]; codes
(N, latent_dim); reconstructions (N, C, H, W).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn


@dataclass
class ModelOutput:
    loss: Tensor  # scalar, what the optimiser minimises
    parts: dict[str, Tensor] = field(default_factory=dict)  # named scalar parts of the loss and diagnostics
    reconstruction: Tensor | None = None  # (N, C, H, W)


class Autoencoder(nn.Module):
    """Base of the autoencoder family: an encoder to ``latent_dim`` codes and a decoder back."""

    def __init__(self, sample_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.latent_dim = int(latent_dim)

    @property
    def input_dim(self) -> int:
        c, h, w = self.sample_shape
        return c * h * w

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, latent_dim)."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> (N, C, H, W)."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    #: w of the level-weighted reconstruction error (0: plain MSE), set by :func:`build_model`
    #: (from ``ModelSpec.level_weight_for``). See :meth:`reconstruction_error`.
    level_weight: float = 0.0

    def reconstruction_error(self, recon: Tensor, target: Tensor) -> Tensor:
        """Mean squared error per value, or with ``level_weight`` w > 0 the weighted mean
        sum_i a_i (recon_i - target_i)^2 / sum_i a_i with a_i = exp(w * target_i).

        On [0, 1]-scaled log-mels (80 dB per unit) a_i = 10^(w * dB_i / (80 ln 10)): w = 8 weighs
        each bin about as its clean magnitude (10^(dB/20)), which is what the spectral SNR counts;
        plain MSE on the dB scale gives silence the weight of speech.
        """
        if self.level_weight == 0.0:
            # The same value and gradient as torch.mean((recon - target) ** 2), bit for bit on CPU,
            # in fewer CUDA kernels (one fused forward, one backward).
            return F.mse_loss(recon, target)
        weight = torch.exp(self.level_weight * target)
        return (weight * (recon - target) ** 2).sum() / weight.sum()

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        """Reconstruction error per pixel (MSE: a Gaussian likelihood up to constants)."""
        target = x if target is None else target
        recon = self.reconstruct(x)
        mse = self.reconstruction_error(recon, target)
        return ModelOutput(loss=mse, parts={"reconstruction": mse.detach()}, reconstruction=recon)


class SigmoidAutoencoder(Autoencoder):
    """One sigmoid hidden layer as the code: ``x -> h = sigmoid(W x + b) -> sigmoid(W' h + b')``.

    The shallow architecture the sparse (Ng 2011) and contractive (Rifai et al.
    2011) autoencoders share; they differ only in the penalty their forward adds.
    """

    def __init__(self, sample_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__(sample_shape, latent_dim)
        self.encoder = nn.Linear(self.input_dim, self.latent_dim)
        self.decoder = nn.Linear(self.latent_dim, self.input_dim)

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, latent_dim) activations in (0, 1)."""
        return torch.sigmoid(self.encoder(x.flatten(1)))

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> (N, C, H, W) in (0, 1)."""
        return torch.sigmoid(self.decoder(z)).view(-1, *self.sample_shape)


ModelFactory = Callable[..., Autoencoder]

#: Family name (``family:`` in a model's params) -> class.
MODEL_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[type[Autoencoder]], type[Autoencoder]]:
    """Class decorator: make a model family buildable by ``name``."""

    def decorate(cls: type[Autoencoder]) -> type[Autoencoder]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model family {name!r} registered twice")
        MODEL_REGISTRY[name] = cls
        cls.family = name  # type: ignore[attr-defined]
        return cls

    return decorate


def build_model(
    family: str, sample_shape: tuple[int, int, int], latent_dim: int, *, level_weight: float = 0.0, **options: Any
) -> Autoencoder:
    """Build a registered family; ``options`` are the family's own hyperparameters.

    ``level_weight``: w of :meth:`Autoencoder.reconstruction_error` (0: plain MSE).
    """
    # Importing the family modules fills the registry; done here, not at package import.
    from latentlab.models import contractive, conv, deep, linear, sparse, vae  # noqa: F401

    try:
        factory = MODEL_REGISTRY[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r} (known: {', '.join(sorted(MODEL_REGISTRY))})") from None
    model = factory(sample_shape=sample_shape, latent_dim=latent_dim, **options)
    if level_weight:
        model.level_weight = float(level_weight)
    return model
