"""The linear autoencoder: the neural counterpart of PCA.

Baldi & Hornik (1989), "Neural networks and principal component analysis":
a linear encoder ``R^D -> R^k`` and linear decoder ``R^k -> R^D`` trained on
the squared error have no spurious local minima, and every minimum spans the
same subspace as the top-k principal components (the weights themselves need
not be orthonormal or ordered). With biases the network also learns the mean,
so the optimum matches PCA on uncentred data. Hence no non-linearity and no
output sigmoid here: either would break that equivalence.
"""

from __future__ import annotations

from torch import Tensor, nn

from latentlab.models.base import Autoencoder, register


@register("linear")
class LinearAutoencoder(Autoencoder):
    """``x -> W_e x + b_e -> W_d z + b_d``; loss: the base class's per-pixel MSE."""

    def __init__(self, sample_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__(sample_shape, latent_dim)
        self.encoder = nn.Linear(self.input_dim, self.latent_dim)
        self.decoder = nn.Linear(self.latent_dim, self.input_dim)

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, latent_dim)."""
        return self.encoder(x.flatten(1))

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> (N, C, H, W); unbounded (no sigmoid), see the module docstring."""
        return self.decoder(z).view(-1, *self.sample_shape)
