"""Convolutional autoencoders.

Both families map an image to a ``latent_dim`` code through a Linear
bottleneck, so they can be compared with PCA and the MLPs at every latent size,
and both reconstruct at *exactly* the input size for any H, W >= 8: the encoder's
spatial sizes are recorded at construction (each halving rounds up) and the
decoder upsamples to those sizes in reverse, e.g. 28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28
and 32 -> 16 -> 8 -> 4 -> 8 -> 16 -> 32. Loss: the base class's per-pixel MSE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from latentlab.models.base import Autoencoder, register


def _halvings(size: tuple[int, int], times: int) -> list[tuple[int, int]]:
    """``[size, ceil(size/2), ...]`` (``times + 1`` entries): the spatial size after each
    ceil-mode 2x2 max-pool, which is also that of a 3x3 stride-2 convolution with padding 1."""
    sizes = [size]
    for _ in range(times):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


@register("conv")
class ConvAutoencoder(Autoencoder):
    """The convolutional autoencoder of Chollet's Keras blog post "Building
    Autoencoders in Keras" (2016), with a Linear bottleneck added.

    Encoder: 3 x [Conv 3x3 (C->16->8->8) + ReLU + MaxPool 2 (ceil mode)], giving
    (N, 8, H/8, W/8) rounded up, then Linear -> (N, latent_dim).
    Decoder: Linear -> (N, 8, H/8, W/8), then Conv(8,8)+ReLU+Upsample,
    Conv(8,8)+ReLU+Upsample, Conv(8,16)+ReLU+Upsample (nearest, to the recorded
    sizes), Conv(16,C)+sigmoid -> (N, C, H, W) in (0, 1). In the blog the
    third decoder convolution is unpadded to get 16 -> 14; exact-size upsampling
    replaces that trick so any H, W works.
    """

    def __init__(self, sample_shape: tuple[int, int, int], latent_dim: int) -> None:
        super().__init__(sample_shape, latent_dim)
        c, h, w = self.sample_shape
        #: Spatial size at each encoder level, input first, bottleneck last.
        self.spatial_sizes = _halvings((h, w), 3)
        enc_channels = (c, 16, 8, 8)
        layers: list[nn.Module] = []
        for n_in, n_out in zip(enc_channels[:-1], enc_channels[1:], strict=True):
            layers += [nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        bh, bw = self.spatial_sizes[-1]
        self._bottleneck_shape = (8, bh, bw)
        self.to_code = nn.Linear(8 * bh * bw, self.latent_dim)

        self.from_code = nn.Linear(self.latent_dim, 8 * bh * bw)
        dec_channels = (8, 8, 8, 16)
        layers = []
        for (n_in, n_out), size in zip(
            zip(dec_channels[:-1], dec_channels[1:], strict=True), self.spatial_sizes[-2::-1], strict=True
        ):
            layers += [nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU(), nn.Upsample(size=size, mode="nearest")]
        self.generator = nn.Sequential(*layers, nn.Conv2d(16, c, 3, padding=1), nn.Sigmoid())
        self._init_weights()

    def _init_weights(self) -> None:
        """He initialisation (He et al. 2015) for convolutions followed by ReLU, Glorot
        (Keras's default, as in the blog) for the rest, zero biases.

        PyTorch's default (uniform with variance 1/(3 fan_in)) shrinks the signal at
        every layer of this thin 8-channel network; some seeds then start with every
        ReLU dead and the output stuck at a constant image for good (seen on MNIST).
        """
        relu_convs = {
            id(m)
            for seq in (self.features, self.generator)
            for m, nxt in zip(seq[:-1], seq[1:], strict=True)
            if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.ReLU)
        }
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                if id(module) in relu_convs:
                    nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, latent_dim)."""
        return self.to_code(self.features(x))

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> (N, C, H, W) in (0, 1)."""
        return self.generator(self.from_code(z).view(-1, *self._bottleneck_shape))


@register("conv_plus")
class ConvPlusAutoencoder(Autoencoder):
    """A stronger convolutional autoencoder (DCGAN-style blocks, Radford et al. 2016).

    Encoder: one block per entry of ``channels`` (default 32, 64, 128), each
    Conv 3x3 stride 2 + BatchNorm + SiLU: learned downsampling instead of
    max-pooling, BatchNorm (Ioffe & Szegedy 2015) for fast, stable training;
    28 -> 14 -> 7 -> 4 giving (N, 128, 4, 4) = 2,048 features (16x the 128 of
    ``conv``), then Linear -> (N, latent_dim).
    Decoder: Linear -> (N, 128, 4, 4) + BatchNorm + SiLU, then per level
    nearest Upsample to the recorded size + Conv 3x3 + BatchNorm + SiLU
    (resize-convolution rather than ConvTranspose, which avoids checkerboard
    artefacts: Odena et al. 2016, "Deconvolution and Checkerboard Artifacts"),
    and a final Conv 3x3 to C channels + sigmoid -> (N, C, H, W) in (0, 1).
    About 0.20M parameters plus 4,097 per latent dimension at 28x28 (205,315 at k = 2).

    In eval mode BatchNorm uses its running statistics, so a sample's output
    does not depend on the rest of the batch. Training needs batches of 2 or more.
    """

    def __init__(
        self, sample_shape: tuple[int, int, int], latent_dim: int, channels: Sequence[int] = (32, 64, 128)
    ) -> None:
        super().__init__(sample_shape, latent_dim)
        channels = tuple(int(ch) for ch in channels)  # YAML gives lists; keep a tuple
        if not channels or min(channels) < 1:
            raise ValueError(f"conv_plus: channels must be a non-empty list of positive sizes, got {channels}")
        self.channels = channels
        c, h, w = self.sample_shape
        #: Spatial size at each encoder level, input first, bottleneck last.
        self.spatial_sizes = _halvings((h, w), len(channels))

        def block(n_in: int, n_out: int, stride: int) -> list[nn.Module]:
            # No conv bias: BatchNorm's shift makes it redundant.
            return [nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.SiLU()]

        layers: list[nn.Module] = []
        for n_in, n_out in zip((c, *channels[:-1]), channels, strict=True):
            layers += block(n_in, n_out, stride=2)
        self.features = nn.Sequential(*layers, nn.Flatten())
        bh, bw = self.spatial_sizes[-1]
        self._bottleneck_shape = (channels[-1], bh, bw)
        n_features = channels[-1] * bh * bw
        self.to_code = nn.Linear(n_features, self.latent_dim)

        self.from_code = nn.Linear(self.latent_dim, n_features)
        layers = [nn.Unflatten(1, self._bottleneck_shape), nn.BatchNorm2d(channels[-1]), nn.SiLU()]
        # Level i (1..L) has channels[i-1]; going up from level i to i-1 gives channels[i-2]
        # (channels[0] at full resolution).
        up_channels = (*channels[::-1], channels[0])
        for (n_in, n_out), size in zip(
            zip(up_channels[:-1], up_channels[1:], strict=True), self.spatial_sizes[-2::-1], strict=True
        ):
            layers += [nn.Upsample(size=size, mode="nearest"), *block(n_in, n_out, stride=1)]
        self.generator = nn.Sequential(*layers, nn.Conv2d(channels[0], c, 3, padding=1), nn.Sigmoid())

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, latent_dim)."""
        return self.to_code(self.features(x))

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> (N, C, H, W) in (0, 1)."""
        return self.generator(self.from_code(z))
