"""Generative adversarial networks: a generator ``G(z[, y])`` and a discriminator
``D(x[, y])`` held together as a :class:`GanPair`, with their own registry
(GANs do not fit the autoencoder contract: there is no encoder and no single
loss; :func:`latentlab.adversarial.fit_gan` trains them).

Every family speaks images in [0, 1], (N, C, H, W), at both ends, like the
autoencoders: the generator ends in ``tanh`` (Radford et al. 2016, section 3)
mapped to [0, 1] by ``(t + 1) / 2``, and the discriminator first maps its input
back to [-1, 1] by ``2 x - 1``, so the networks work in the centred range the
recipes were tuned for while callers never see it. The discriminator returns
logits (N,) (the probability "real" is their sigmoid). Latent codes are
``z ~ N(0, I)`` of ``latent_dim`` dimensions; ``psi`` scales them toward 0
(the truncation trick, Brock et al. 2019, "Large Scale GAN Training for High
Fidelity Natural Image Synthesis", section 3.1, in its scaled-normal form;
Karras et al. 2019 section 2 truncate toward the mean the same way).

Families (``build_gan(family, ...)``):

* ``gan``: fully connected G and D (Goodfellow et al. 2014, NeurIPS,
  "Generative Adversarial Nets", section 5: MLPs, dropout in D). LeakyReLU(0.2)
  replaces their ReLU/maxout units, the common modern choice that keeps
  gradients flowing through D.
* ``dcgan``: the all-convolutional recipe of Radford et al. (2016, ICLR,
  "Unsupervised Representation Learning with Deep Convolutional GANs",
  section 3 "Architecture guidelines") at MNIST size: a projected and reshaped
  z, then strided transposed convolutions in G and strided convolutions in D
  (no pooling), batch norm in both except G's output and D's input layer, ReLU
  in G with tanh output, LeakyReLU(0.2) in D, weights ~ N(0, 0.02) and Adam
  with lr 2e-4 and beta1 0.5 (section 4; the defaults of
  :class:`latentlab.adversarial.GanTrainingConfig`).
* ``cgan``: the conditional GAN of Mirza & Osindero (2014, arXiv:1411.1784,
  section 3.2): the class label y is given to both G and D. Here y enters G as
  a learned embedding concatenated to z (a linear map of the one-hot vector,
  as in the paper) and D as an embedding concatenated to the flattened image
  (``arch="mlp"``, the paper's setting) or as one extra input channel, a
  learned (H, W) map per class (``arch="dcgan"``, the default: the DCGAN recipe
  above trains more reliably than the paper's maxout MLPs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def _to_unit(t: Tensor) -> Tensor:
    """tanh range [-1, 1] -> pixel range [0, 1]."""
    return (t + 1.0) * 0.5


def _from_unit(x: Tensor) -> Tensor:
    """Pixel range [0, 1] -> [-1, 1], the range G's tanh produces."""
    return x * 2.0 - 1.0


def _sizes(values: Sequence[int], what: str, family: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)  # YAML gives lists; keep a tuple
    if not out or min(out) < 1:
        raise ValueError(f"{family}: {what} must be a non-empty list of positive sizes, got {out}")
    return out


# ------------------------------------------------------------------------- networks
class MlpGenerator(nn.Module):
    """``[z, embed(y)] -> *hidden -> C*H*W``: Linear + LeakyReLU(0.2) per hidden layer,
    tanh output mapped to [0, 1]. z (N, latent_dim), y (N,) int -> (N, C, H, W)."""

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        hidden: Sequence[int],
        num_classes: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.sample_shape = sample_shape
        self.embed = None if num_classes is None else nn.Embedding(num_classes, embed_dim or num_classes)
        n_in = latent_dim + (0 if self.embed is None else self.embed.embedding_dim)
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.LeakyReLU(0.2)]
            n_in = width
        c, h, w = sample_shape
        self.net = nn.Sequential(*layers, nn.Linear(n_in, c * h * w), nn.Tanh(), nn.Unflatten(1, sample_shape))

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        return _to_unit(self.net(z))


class MlpDiscriminator(nn.Module):
    """``[2x - 1 flattened, embed(y)] -> *hidden -> 1`` logit: Linear + LeakyReLU(0.2)
    + Dropout per hidden layer (Goodfellow et al. 2014 train D with dropout).
    x (N, C, H, W) in [0, 1], y (N,) int -> (N,) logits."""

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        hidden: Sequence[int],
        dropout: float,
        num_classes: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        c, h, w = sample_shape
        self.embed = None if num_classes is None else nn.Embedding(num_classes, embed_dim or num_classes)
        n_in = c * h * w + (0 if self.embed is None else self.embed.embedding_dim)
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(n_in, width), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
            n_in = width
        self.net = nn.Sequential(*layers, nn.Linear(n_in, 1))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = _from_unit(x).flatten(1)
        if self.embed is not None:
            h = torch.cat([h, self.embed(labels).to(h.dtype)], dim=1)
        return self.net(h).squeeze(1)


class DcganGenerator(nn.Module):
    """DCGAN generator (Radford et al. 2016, Fig. 1, scaled to 28x28).

    ``[z, embed(y)]`` -> Linear (no bias) -> BatchNorm1d -> ReLU -> reshape to
    (channels[-1], H / 2^L, W / 2^L) (L = len(channels)); then per level a 4x4
    stride-2 ConvTranspose (doubling the size) + BatchNorm + ReLU down the
    ``channels`` list, and a last 4x4 stride-2 ConvTranspose to C channels with
    tanh (no batch norm on the output layer), mapped to [0, 1].
    Default channels (64, 128) at 28x28: 128 x 7 x 7 -> 64 x 14 x 14 -> C x 28 x 28.
    """

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        channels: Sequence[int],
        num_classes: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        c, h, w = sample_shape
        levels = len(channels)
        base = (h >> levels, w >> levels)
        self.embed = None if num_classes is None else nn.Embedding(num_classes, embed_dim or num_classes)
        n_in = latent_dim + (0 if self.embed is None else self.embed.embedding_dim)
        n_features = channels[-1] * base[0] * base[1]
        # No bias before batch norm: its shift makes the bias redundant.
        layers: list[nn.Module] = [
            nn.Linear(n_in, n_features, bias=False),
            nn.BatchNorm1d(n_features),
            nn.ReLU(),
            nn.Unflatten(1, (channels[-1], *base)),
        ]
        for n_from, n_to in zip(channels[:0:-1], channels[-2::-1], strict=True):
            layers += [nn.ConvTranspose2d(n_from, n_to, 4, 2, 1, bias=False), nn.BatchNorm2d(n_to), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(channels[0], c, 4, 2, 1), nn.Tanh())

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        return _to_unit(self.net(z))


class DcganDiscriminator(nn.Module):
    """DCGAN discriminator: per entry of ``channels`` a 4x4 stride-2 Conv + (BatchNorm
    except on the first, input layer) + LeakyReLU(0.2), then Linear -> 1 logit.
    Conditional: a learned (H, W) map per class is stacked as an extra input channel.
    x (N, C, H, W) in [0, 1], y (N,) int -> (N,) logits."""

    def __init__(
        self, sample_shape: tuple[int, int, int], channels: Sequence[int], num_classes: int | None = None
    ) -> None:
        super().__init__()
        c, h, w = sample_shape
        self.spatial = (h, w)
        self.embed = None if num_classes is None else nn.Embedding(num_classes, h * w)
        n_in = c + (0 if self.embed is None else 1)
        layers: list[nn.Module] = []
        for i, n_out in enumerate(channels):
            first = i == 0
            layers.append(nn.Conv2d(n_in, n_out, 4, 2, 1, bias=first))
            if not first:
                layers.append(nn.BatchNorm2d(n_out))
            layers.append(nn.LeakyReLU(0.2))
            n_in = n_out
        levels = len(channels)
        n_features = channels[-1] * (h >> levels) * (w >> levels)
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(n_features, 1))

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = _from_unit(x)
        if self.embed is not None:
            label_map = self.embed(labels).to(h.dtype).view(-1, 1, *self.spatial)
            h = torch.cat([h, label_map], dim=1)
        return self.net(h).squeeze(1)


def _dcgan_init_(module: nn.Module) -> None:
    """Radford et al. 2016, section 4: all weights ~ N(0, 0.02); batch-norm scales ~ N(1, 0.02)
    (the reference implementation's choice), biases 0. Label embeddings keep PyTorch's N(0, 1)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_dcgan_shape(sample_shape: tuple[int, int, int], levels: int, family: str) -> None:
    _, h, w = sample_shape
    step = 2**levels
    if h % step or w % step or h < step or w < step:
        raise ValueError(
            f"{family}: H and W must be positive multiples of 2^len(channels) = {step} "
            f"(each level halves them exactly), got {h}x{w}"
        )


# ------------------------------------------------------------------------- the pair
class GanPair(nn.Module):
    """A generator and a discriminator trained together.

    ``generator(z, labels)``: z (N, latent_dim) -> images (N, C, H, W) in [0, 1];
    ``discriminator(x, labels)``: images -> logits (N,). ``labels`` (N,) int64 in
    ``0..num_classes-1`` for a conditional pair, None otherwise.
    """

    family: str

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.latent_dim = int(latent_dim)
        self.num_classes = None if num_classes is None else int(num_classes)

    @property
    def conditional(self) -> bool:
        """Whether G and D take class labels."""
        return self.num_classes is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def labels_tensor(self, labels: Tensor | np.ndarray | Sequence[int] | None, n: int) -> Tensor | None:
        """Check ``labels`` against the pair and return them as (n,) int64 on its device.

        A conditional pair given None gets ``0, 1, ..., K-1, 0, 1, ...`` (every class
        equally often); an unconditional pair must get None.
        """
        if not self.conditional:
            if labels is not None:
                raise ValueError(f"{self.family}: an unconditional GAN takes no labels")
            return None
        assert self.num_classes is not None
        if labels is None:
            return torch.arange(n, device=self.device) % self.num_classes
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, Tensor) else labels)
        y = y.to(device=self.device, dtype=torch.long).reshape(-1)
        if len(y) != n:
            raise ValueError(f"{self.family}: got {len(y)} labels for {n} samples")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{self.family}: labels must lie in 0..{self.num_classes - 1}")
        return y

    def sample_latent(self, n: int, generator: torch.Generator | None = None, psi: float = 1.0) -> Tensor:
        """``psi * z`` with ``z ~ N(0, I)``, (n, latent_dim) on the pair's device.

        ``generator`` (on any device) makes the draw reproducible without touching
        torch's global RNG; psi < 1 is the truncation trick, psi = 0 gives z = 0.
        """
        gen_device = generator.device if generator is not None else self.device
        z = torch.randn(n, self.latent_dim, generator=generator, device=gen_device)
        return psi * z.to(self.device)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        """``G(z, labels)``: (N, latent_dim) -> (N, C, H, W) in [0, 1]."""
        return self.generator(z, labels)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        psi: float = 1.0,
        labels: Tensor | np.ndarray | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` generated images (n, C, H, W) in [0, 1].

        G runs in eval mode (batch norm with its running statistics, so a sample does
        not depend on the others in the batch; the mode is restored afterwards).
        ``labels``: see :meth:`labels_tensor`.
        """
        y = self.labels_tensor(labels, n)
        z = self.sample_latent(n, generator=generator, psi=psi)
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(z, y).float()
        finally:
            self.generator.train(was_training)


GanFactory = Callable[..., GanPair]

#: Family name -> GanPair subclass.
GAN_REGISTRY: dict[str, GanFactory] = {}


def register_gan(name: str) -> Callable[[type[GanPair]], type[GanPair]]:
    """Class decorator: make a GAN family buildable by ``name``."""

    def decorate(cls: type[GanPair]) -> type[GanPair]:
        if name in GAN_REGISTRY:
            raise ValueError(f"GAN family {name!r} registered twice")
        GAN_REGISTRY[name] = cls
        cls.family = name
        return cls

    return decorate


def build_gan(
    family: str,
    sample_shape: tuple[int, int, int],
    latent_dim: int,
    num_classes: int | None = None,
    **options: Any,
) -> GanPair:
    """Build a registered GAN family; ``options`` are the family's own hyperparameters.

    ``num_classes`` is required by conditional families (``cgan``) and refused by
    the others.
    """
    try:
        factory = GAN_REGISTRY[family]
    except KeyError:
        raise KeyError(f"unknown GAN family {family!r} (known: {', '.join(sorted(GAN_REGISTRY))})") from None
    return factory(sample_shape=tuple(sample_shape), latent_dim=latent_dim, num_classes=num_classes, **options)


def _unconditional(family: str, num_classes: int | None) -> None:
    if num_classes is not None:
        raise ValueError(f"{family}: unconditional; use the 'cgan' family to condition on {num_classes} classes")


# ------------------------------------------------------------------------- families
@register_gan("gan")
class MlpGAN(GanPair):
    """Goodfellow et al. (2014) MLPs. Options: ``g_hidden`` (default 256, 512, 1024),
    ``d_hidden`` (default 1024, 512, 256), ``dropout`` in D (default 0.3)."""

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        num_classes: int | None = None,
        g_hidden: Sequence[int] = (256, 512, 1024),
        d_hidden: Sequence[int] = (1024, 512, 256),
        dropout: float = 0.3,
    ) -> None:
        _unconditional("gan", num_classes)
        g_hidden, d_hidden = _sizes(g_hidden, "g_hidden", "gan"), _sizes(d_hidden, "d_hidden", "gan")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"gan: dropout must be in [0, 1), got {dropout}")
        super().__init__(
            MlpGenerator(sample_shape, latent_dim, g_hidden),
            MlpDiscriminator(sample_shape, d_hidden, dropout),
            sample_shape,
            latent_dim,
        )
        self.g_hidden, self.d_hidden, self.dropout = g_hidden, d_hidden, float(dropout)


@register_gan("dcgan")
class DCGAN(GanPair):
    """Radford et al. (2016) at MNIST size. Option ``channels`` (default 64, 128): D's
    conv widths from the input; G mirrors them (128 -> 64 -> C). H and W must be
    multiples of 2^len(channels) (28 and 32 with two levels)."""

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        num_classes: int | None = None,
        channels: Sequence[int] = (64, 128),
    ) -> None:
        _unconditional("dcgan", num_classes)
        channels = _sizes(channels, "channels", "dcgan")
        _check_dcgan_shape(tuple(sample_shape), len(channels), "dcgan")  # type: ignore[arg-type]
        super().__init__(
            DcganGenerator(sample_shape, latent_dim, channels),
            DcganDiscriminator(sample_shape, channels),
            sample_shape,
            latent_dim,
        )
        self.channels = channels
        _dcgan_init_(self)


@register_gan("cgan")
class ConditionalGAN(GanPair):
    """Mirza & Osindero (2014): G and D both see the class label.

    Options: ``arch`` ("dcgan", default, or "mlp"), ``embed_dim`` (width of the label
    embedding given to G, and to the MLP D; default ``num_classes``, the one-hot
    width), and the chosen architecture's options (``channels``; or ``g_hidden``,
    ``d_hidden``, ``dropout``) with the defaults of ``dcgan`` and ``gan``.
    """

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        num_classes: int | None = None,
        arch: str = "dcgan",
        embed_dim: int | None = None,
        channels: Sequence[int] = (64, 128),
        g_hidden: Sequence[int] = (256, 512, 1024),
        d_hidden: Sequence[int] = (1024, 512, 256),
        dropout: float = 0.3,
    ) -> None:
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(f"cgan: num_classes (>= 2) is required, got {num_classes}")
        num_classes = int(num_classes)
        if embed_dim is not None and int(embed_dim) < 1:
            raise ValueError(f"cgan: embed_dim must be >= 1, got {embed_dim}")
        embed = num_classes if embed_dim is None else int(embed_dim)
        generator: nn.Module
        discriminator: nn.Module
        if arch == "dcgan":
            channels = _sizes(channels, "channels", "cgan")
            _check_dcgan_shape(tuple(sample_shape), len(channels), "cgan")  # type: ignore[arg-type]
            generator = DcganGenerator(sample_shape, latent_dim, channels, num_classes, embed)
            discriminator = DcganDiscriminator(sample_shape, channels, num_classes)
        elif arch == "mlp":
            g_hidden, d_hidden = _sizes(g_hidden, "g_hidden", "cgan"), _sizes(d_hidden, "d_hidden", "cgan")
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"cgan: dropout must be in [0, 1), got {dropout}")
            generator = MlpGenerator(sample_shape, latent_dim, g_hidden, num_classes, embed)
            discriminator = MlpDiscriminator(sample_shape, d_hidden, dropout, num_classes, embed)
        else:
            raise ValueError(f"cgan: arch must be 'dcgan' or 'mlp', got {arch!r}")
        super().__init__(generator, discriminator, sample_shape, latent_dim, num_classes)
        self.arch, self.embed_dim = arch, embed
        if arch == "dcgan":
            self.channels = channels
            _dcgan_init_(self)
        else:
            self.g_hidden, self.d_hidden, self.dropout = g_hidden, d_hidden, float(dropout)
