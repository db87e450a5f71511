"""A deep, fully connected autoencoder (Géron, "Hands-On Machine Learning",
ch. "Autoencoders": the stacked 784-300-150-k network).

Encoder: ``D -> hidden[0] -> ... -> hidden[-1] -> k`` with a non-linearity
after every hidden layer and a *linear* code layer (so codes are not squashed
into a bounded range); the decoder mirrors it and ends in a sigmoid because
pixels lie in [0, 1]. Loss: the base class's per-pixel MSE.

SELU (Klambauer et al. 2017, "Self-normalizing neural networks") keeps
activations near zero mean and unit variance through depth only with LeCun
normal initialisation (weights ~ N(0, 1/fan_in), zero biases), so that is the
initialisation used with it; ReLU keeps PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from latentlab.models.base import Autoencoder, register

_ACTIVATIONS: dict[str, type[nn.Module]] = {"selu": nn.SELU, "relu": nn.ReLU}


def _lecun_normal_(layer: nn.Linear) -> None:
    nn.init.normal_(layer.weight, mean=0.0, std=layer.in_features**-0.5)
    nn.init.zeros_(layer.bias)


@register("deep")
class DeepAutoencoder(Autoencoder):
    """Symmetric MLP ``D -> *hidden -> k -> *reversed(hidden) -> D``."""

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        hidden: Sequence[int] = (300, 150),
        activation: str = "selu",
    ) -> None:
        super().__init__(sample_shape, latent_dim)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"deep: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        hidden = tuple(int(h) for h in hidden)  # YAML gives lists; keep a tuple
        if not hidden or min(hidden) < 1:
            raise ValueError(f"deep: hidden must be a non-empty list of positive sizes, got {hidden}")
        self.hidden = hidden
        self.activation = activation
        act = _ACTIVATIONS[activation]

        def stack(sizes: Sequence[int]) -> list[nn.Module]:
            """Linear + activation between consecutive ``sizes``, except after the last."""
            layers: list[nn.Module] = []
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                layers.append(nn.Linear(n_in, n_out))
                if i < len(sizes) - 2:
                    layers.append(act())
            return layers

        sizes = (self.input_dim, *hidden, self.latent_dim)
        self.encoder = nn.Sequential(*stack(sizes))  # ends in the linear code layer
        self.decoder = nn.Sequential(*stack(sizes[::-1]), nn.Sigmoid())
        if activation == "selu":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    _lecun_normal_(module)

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, latent_dim)."""
        return self.encoder(x.flatten(1))

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> (N, C, H, W) in (0, 1)."""
        return self.decoder(z).view(-1, *self.sample_shape)
