"""Variational autoencoders (Kingma & Welling 2014, "Auto-Encoding Variational
Bayes"; Rezende et al. 2014) that follow the :class:`Autoencoder` contract, so
the training engine fits them unchanged.

The generative model is ``p(z) = N(0, I)`` (``latent_dim`` dimensions) and a
decoder ``p(x | z)`` over the ``C x H x W`` pixels; the encoder is a diagonal
Gaussian ``q(z | x) = N(mu(x), diag(exp(logvar(x))))``. Training maximises the
evidence lower bound (ELBO, Kingma & Welling 2014 eq. 3 with the closed-form
KL of their eq. 10 / Appendix B)::

    ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x)

with one reparameterised sample ``z = mu + exp(logvar / 2) * eps``,
``eps ~ N(0, I)`` (their section 2.4), so the loss is differentiable in the
encoder's parameters. The loss is the batch mean of
``reconstruction + beta * kl`` in nats per image, i.e. the negative ELBO when
``beta = 1``; ``beta > 1`` is the beta-VAE of Higgins et al. (2017, ICLR,
"beta-VAE: Learning basic visual concepts with a constrained variational
framework", eq. 4).

Decoder likelihoods (``likelihood`` option), both parameterised by the decoder's
logits ``a`` (N, C, H, W) with mean image ``sigmoid(a)`` in (0, 1):

* ``"bernoulli"``: ``-log p(x | z) = sum_pixels BCE(sigmoid(a), x)``, the usual
  choice for binarised MNIST. On grey-level targets this is the cross-entropy
  rather than a likelihood; ``binarize=True`` then draws a fresh binary image
  ``x ~ Bernoulli(x)`` at every training step (dynamic binarisation,
  Salakhutdinov & Murray 2008, ICML, section 5; Burda et al. 2016, ICLR,
  "Importance Weighted Autoencoders", section 5.1), which makes the objective a
  true bound on the likelihood of binary images and acts as a regulariser.
* ``"gaussian"``: ``p(x | z) = N(sigmoid(a), sigma^2 I)`` with a *fixed*
  ``sigma`` (option, pixel units), so
  ``-log p(x | z) = sum_pixels (x - mean)^2 / (2 sigma^2) + log(sigma) + log(2 pi) / 2``,
  a proper density in nats (it can be negative). ``sigma = 1`` is the plain
  "half the summed squared error" loss plus a constant; for pixels in [0, 1]
  the squared error is then so small next to the KL that the posterior
  collapses to the prior and reconstructions are blurry means (Lucas et al.
  2019, NeurIPS, "Don't blame the ELBO!", section 4: the observation noise
  sets the strength of the KL pressure), hence the default ``sigma = 0.1``.

``importance_samples`` K > 1 trains on the importance-weighted bound of Burda
et al. (2016, ICLR, "Importance Weighted Autoencoders", eq. 8) instead of the
ELBO, with the same generative and inference networks::

    L_K(x) = log (1/K) sum_{i=1..K} p(x, z_i) / q(z_i | x),   z_i ~ q(z | x),

which is at least the ELBO and tightens toward log p(x) as K grows (their
Theorem 1); the loss is the batch mean of ``-L_K``, the decoder runs K times
per image, and ``beta`` must be 1 (the bound has no KL weight). The test NLL
is the same estimator with a much larger K, so training on it narrows the gap
between the ELBO and the likelihood that the test NLL measures.

Parts: ``reconstruction`` (``-log p(x|z)``, nats per image), ``kl`` (nats per
image), ``elbo`` (``-(reconstruction + kl)``, nats per image, not weighted by
beta); with K > 1 also ``iwae_bound`` (``L_K``, nats per image), and the
reconstruction term is the mean over the K samples.
``ModelOutput.reconstruction`` is the decoder mean at the posterior mean,
``sigmoid(decoder(mu(x)))``.

Training mode draws ``eps`` (and the binarisation) from torch's global RNG, so
the engine's checkpoints (which save that RNG) resume bit-identically on CPU.
Eval mode draws ``eps`` from a generator seeded with ``eval_seed`` at every
call: the validation ELBO is then a deterministic, unbiased one-sample estimate
and every epoch is scored on the same noise (common random numbers), so
early stopping compares like with like; it does not binarise.

Shapes: ``x`` (N, C, H, W) in [0, 1]; codes (N, latent_dim); decoder output
(N, C, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentlab.models.base import Autoencoder, ModelOutput, register
from latentlab.models.conv import _halvings

_LIKELIHOODS = ("bernoulli", "gaussian")
_LOG_2PI = math.log(2.0 * math.pi)
# Decoder evaluations per forward pass in the importance-sampled NLL: bounds memory.
_DECODE_BATCH = 4096


def kl_divergence_std_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` per row, in nats.

    The closed form of Kingma & Welling (2014), Appendix B (their eq. 10 gives
    ``-KL``): ``KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)``.
    ``mu``, ``logvar``: (N, k). Returns (N,), computed in at least float32 so
    that bf16 autocast cannot round ``exp(logvar) - 1 - logvar`` to garbage.
    """
    dtype = torch.promote_types(mu.dtype, torch.float32)
    mu, logvar = mu.to(dtype), logvar.to(dtype)
    return 0.5 * torch.sum(mu.pow(2) + torch.exp(logvar) - 1.0 - logvar, dim=-1)


class VariationalAutoencoder(Autoencoder):
    """Base of the VAE families: subclasses set ``self.encoder`` ((N, C, H, W) ->
    (N, 2 latent_dim): mean, then log-variance) and ``self.decoder`` ((N, latent_dim)
    -> logits (N, C, H, W)); this class does the rest.

    Options: ``likelihood`` ("bernoulli" or "gaussian"), ``beta`` (KL weight, >= 0),
    ``binarize`` (dynamic binarisation in training; Bernoulli only), ``sigma``
    (the Gaussian decoder's fixed standard deviation, pixel units), ``eval_seed``
    (seed of the eval-mode reparameterisation noise), ``importance_samples`` (K of
    the training bound: 1 = the ELBO, K > 1 = the IWAE bound; needs beta = 1).
    """

    encoder: nn.Module
    decoder: nn.Module

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        binarize: bool = False,
        sigma: float = 0.1,
        eval_seed: int = 0,
        importance_samples: int = 1,
    ) -> None:
        super().__init__(sample_shape, latent_dim)
        name = getattr(type(self), "family", type(self).__name__)
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"{name}: likelihood must be one of {list(_LIKELIHOODS)}, got {likelihood!r}")
        if not beta >= 0.0:
            raise ValueError(f"{name}: beta must be >= 0, got {beta}")
        if not sigma > 0.0:
            raise ValueError(f"{name}: sigma must be > 0, got {sigma}")
        if binarize and likelihood != "bernoulli":
            raise ValueError(f"{name}: binarize applies to the bernoulli likelihood only")
        if importance_samples < 1:
            raise ValueError(f"{name}: importance_samples must be >= 1, got {importance_samples}")
        if importance_samples > 1 and beta != 1.0:
            raise ValueError(
                f"{name}: importance_samples > 1 trains on the importance-weighted bound, which has no KL "
                f"weight: beta must be 1, got {beta}"
            )
        self.likelihood = likelihood
        self.beta = float(beta)
        self.binarize = bool(binarize)
        self.sigma = float(sigma)
        self.eval_seed = int(eval_seed)
        self.importance_samples = int(importance_samples)

    # -- the two networks ---------------------------------------------------------------
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``q(z | x)``: mean and log-variance, each (N, latent_dim), in at least float32."""
        stats = self.encoder(x)
        stats = stats.to(torch.promote_types(stats.dtype, torch.float32))
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, logvar

    def decode_logits(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> decoder logits (N, C, H, W); the mean image is their sigmoid."""
        return self.decoder(z)

    def encode(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> the posterior mean (N, latent_dim)."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        """(N, latent_dim) -> the decoder's mean image (N, C, H, W) in (0, 1)."""
        return torch.sigmoid(self.decode_logits(z))

    # -- likelihood ---------------------------------------------------------------------
    def negative_log_likelihood(self, logits: Tensor, target: Tensor) -> Tensor:
        """``-log p(target | z)`` in nats per image, (N,), from decoder logits (N, C, H, W).

        Computed in at least float32 (bf16 logits under autocast are promoted).
        """
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        target = target.to(logits.dtype)
        if self.likelihood == "bernoulli":
            # The logits form is exact and stable for saturated outputs (log-sum-exp trick).
            per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            residual = (target - torch.sigmoid(logits)) / self.sigma
            per_pixel = 0.5 * residual.pow(2) + math.log(self.sigma) + 0.5 * _LOG_2PI
        return per_pixel.flatten(1).sum(dim=1)

    def _eps(self, mu: Tensor, k: int | None = None) -> Tensor:
        """Standard normal noise shaped like ``mu`` (N, d), or (k, N, d) for k samples per
        row: global RNG in training, fixed (``eval_seed``) in eval."""
        shape = tuple(mu.shape) if k is None else (k, *mu.shape)
        if self.training:
            return torch.randn(shape, device=mu.device, dtype=mu.dtype)
        g = torch.Generator(device=mu.device).manual_seed(self.eval_seed)
        return torch.randn(shape, generator=g, device=mu.device, dtype=mu.dtype)

    def log_weights(self, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Importance log-weights ``log p(x, z) - log q(z | x)`` at ``z = mu + sigma * eps``,
        (k, N), and the decoder terms ``-log p(x | z)`` (k, N), both in nats.

        ``x``: (N, C, H, W) targets; ``mu``, ``logvar``: (N, d); ``eps``: (k, N, d).
        ``log q`` uses ``eps`` directly: ``(z - mu) / sigma = eps`` (Burda et al. 2016, eq. 8).
        """
        m, n, d = eps.shape
        z = mu + torch.exp(0.5 * logvar) * eps  # (k, N, d)
        logits = self.decode_logits(z.reshape(m * n, d))  # (k N, C, H, W)
        target = x.expand(m, *x.shape).reshape(m * n, *x.shape[1:])
        rec = self.negative_log_likelihood(logits, target).view(m, n)  # -log p(x | z)
        log_pz = -0.5 * torch.sum(z.pow(2) + _LOG_2PI, dim=-1)
        log_qz_x = -0.5 * torch.sum(eps.pow(2) + logvar + _LOG_2PI, dim=-1)
        return -rec + log_pz - log_qz_x, rec

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        """One-sample negative ELBO of ``target`` given ``x``, (N, C, H, W) each (with
        ``importance_samples`` K > 1: minus the K-sample IWAE bound).

        ``target`` (the clean image when ``x`` is corrupted) defaults to ``x``.
        """
        if self.training and self.binarize:
            binary = torch.bernoulli(x)
            target = binary if target is None or target is x else torch.bernoulli(target)
            x = binary
        target = x if target is None else target
        mu, logvar = self.posterior(x)
        kl = kl_divergence_std_normal(mu, logvar)  # (N,)
        parts: dict[str, Tensor] = {}
        if self.importance_samples == 1:
            z = mu + torch.exp(0.5 * logvar) * self._eps(mu)  # reparameterisation, K&W 2014 eq. 4
            rec = self.negative_log_likelihood(self.decode_logits(z), target)  # (N,)
            loss = torch.mean(rec + self.beta * kl)
        else:
            # IWAE bound (Burda et al. 2016, eq. 8): K reparameterised samples per image.
            k = self.importance_samples
            log_w, rec = self.log_weights(target, mu, logvar, self._eps(mu, k))  # (K, N) each
            bound = torch.logsumexp(log_w, dim=0) - math.log(k)  # (N,)
            loss = -torch.mean(bound)
            parts["iwae_bound"] = bound.mean().detach()
        with torch.no_grad():
            recon = self.decode(mu)
        rec_mean, kl_mean = rec.mean().detach(), kl.mean().detach()
        return ModelOutput(
            loss=loss,
            parts={"reconstruction": rec_mean, "kl": kl_mean, "elbo": -(rec_mean + kl_mean), **parts},
            reconstruction=recon,
        )

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, psi: float = 1.0) -> Tensor:
        """``n`` mean images (n, C, H, W) in (0, 1) decoded from ``z ~ N(0, psi^2 I)``.

        ``psi < 1`` is the truncation trick (scaling z toward the prior mean trades
        diversity for typicality; Brock et al. 2019, BigGAN, section 3.1, use a
        truncated normal, a scaled one is the common simplification; psi = 0 gives
        the decoded prior mean). ``generator`` (on any device) makes it reproducible.
        """
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else device
        z = torch.randn(n, self.latent_dim, generator=generator, device=gen_device).to(device)
        return self.decode(psi * z)


@register("vae_mlp")
class MlpVAE(VariationalAutoencoder):
    """Fully connected VAE (the M1 architecture of Kingma & Welling 2014, section 5,
    with more and wider layers): encoder ``D -> *hidden -> 2k``, decoder
    ``k -> *reversed(hidden) -> D`` logits, ReLU between layers. Default hidden
    sizes (512, 256).
    """

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        hidden: Sequence[int] = (512, 256),
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        binarize: bool = False,
        sigma: float = 0.1,
        eval_seed: int = 0,
        importance_samples: int = 1,
    ) -> None:
        super().__init__(sample_shape, latent_dim, likelihood, beta, binarize, sigma, eval_seed, importance_samples)
        hidden = tuple(int(h) for h in hidden)  # YAML gives lists; keep a tuple
        if not hidden or min(hidden) < 1:
            raise ValueError(f"vae_mlp: hidden must be a non-empty list of positive sizes, got {hidden}")
        self.hidden = hidden

        def stack(sizes: Sequence[int]) -> list[nn.Module]:
            """Linear + ReLU between consecutive ``sizes``, no activation after the last."""
            layers: list[nn.Module] = []
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
                layers.append(nn.Linear(n_in, n_out))
                if i < len(sizes) - 2:
                    layers.append(nn.ReLU())
            return layers

        self.encoder = nn.Sequential(nn.Flatten(), *stack((self.input_dim, *hidden, 2 * self.latent_dim)))
        self.decoder = nn.Sequential(
            *stack((self.latent_dim, *hidden[::-1], self.input_dim)), nn.Unflatten(1, self.sample_shape)
        )


@register("vae_conv")
class ConvVAE(VariationalAutoencoder):
    """Convolutional VAE for any (C, H, W) with H, W >= 4 (MNIST (1, 28, 28), SAT-6
    (4, 28, 28), spectrograms (1, n_mels, frames)).

    Encoder: per entry of ``channels`` (default 32, 64) a Conv 3x3 stride 2 + ReLU,
    28 -> 14 -> 7 (each halving rounds up), then Linear -> (N, 2k).
    Decoder: Linear -> (N, channels[-1], 7, 7) + ReLU, then per level a nearest
    Upsample to the encoder's recorded size + Conv 3x3 + ReLU (resize-convolution,
    Odena et al. 2016, no checkerboard artefacts; as ``conv_plus``), and a final
    Conv 3x3 to C logit channels -> (N, C, H, W) at exactly the input size.
    No BatchNorm: the ELBO of an image then never depends on its batch.
    """

    def __init__(
        self,
        sample_shape: tuple[int, int, int],
        latent_dim: int,
        channels: Sequence[int] = (32, 64),
        likelihood: str = "bernoulli",
        beta: float = 1.0,
        binarize: bool = False,
        sigma: float = 0.1,
        eval_seed: int = 0,
        importance_samples: int = 1,
    ) -> None:
        super().__init__(sample_shape, latent_dim, likelihood, beta, binarize, sigma, eval_seed, importance_samples)
        channels = tuple(int(ch) for ch in channels)  # YAML gives lists; keep a tuple
        if not channels or min(channels) < 1:
            raise ValueError(f"vae_conv: channels must be a non-empty list of positive sizes, got {channels}")
        self.channels = channels
        c, h, w = self.sample_shape
        #: Spatial size at each encoder level, input first, bottleneck last.
        self.spatial_sizes = _halvings((h, w), len(channels))
        layers: list[nn.Module] = []
        for n_in, n_out in zip((c, *channels[:-1]), channels, strict=True):
            layers += [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1), nn.ReLU()]
        bh, bw = self.spatial_sizes[-1]
        bottleneck = (channels[-1], bh, bw)
        n_features = channels[-1] * bh * bw
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(n_features, 2 * self.latent_dim))

        layers = [nn.Linear(self.latent_dim, n_features), nn.ReLU(), nn.Unflatten(1, bottleneck)]
        # Going up from level i to i-1 gives channels[i-2] (channels[0] at full resolution).
        up_channels = (*channels[::-1], channels[0])
        for (n_in, n_out), size in zip(
            zip(up_channels[:-1], up_channels[1:], strict=True), self.spatial_sizes[-2::-1], strict=True
        ):
            layers += [nn.Upsample(size=size, mode="nearest"), nn.Conv2d(n_in, n_out, 3, padding=1), nn.ReLU()]
        self.decoder = nn.Sequential(*layers, nn.Conv2d(channels[0], c, 3, padding=1))


# ------------------------------------------------------------------- likelihood bounds
def _as_tensor(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def binarise(images: np.ndarray, seed: int) -> np.ndarray:
    """One draw of ``x ~ Bernoulli(images)`` per pixel with ``seed``: float32 0/1 of the same shape.

    The fixed binarisation of an evaluation set for the Bernoulli decoder (the
    dynamically binarised MNIST protocol of Burda et al. 2016 draws the test set once).
    """
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape) < images).astype(np.float32)


def validation_images(model: VariationalAutoencoder, images: np.ndarray, seed: int) -> np.ndarray:
    """The validation images that ``model`` is early-stopped on, (N, C, H, W) float32.

    With dynamic binarisation the model trains on binary draws, and its test
    NLL and negative ELBO are measured on one fixed binarisation of the test
    images; the validation loss must be that same quantity, so the images are
    binarised once with ``seed``. Scored on the grey images instead, the
    Bernoulli "likelihood" is a cross-entropy against grey targets that rises as
    the decoder sharpens toward binary pixels, while the binary ELBO still
    improves: on the full MNIST it stopped a convolutional VAE early. Without
    binarisation the images are returned unchanged.
    """
    return binarise(images, seed) if model.binarize else np.asarray(images, np.float32)


def _check_binary(model: VariationalAutoencoder, x: Tensor) -> None:
    if model.likelihood == "bernoulli" and not bool(torch.all((x == 0) | (x == 1))):
        raise ValueError(
            "the Bernoulli decoder's likelihood is defined for binary images only: binarise x first "
            "(e.g. x = (rng.random(x.shape) < x).astype(np.float32))"
        )


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal noise drawn on ``generator``'s device (so any generator works), moved to ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


@torch.no_grad()
def importance_sampled_nll(
    model: VariationalAutoencoder,
    x: np.ndarray | Tensor,
    k: int = 5000,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Per-image negative log-likelihood ``-log p(x)`` in nats, (N,) float64, by the
    importance-weighted estimator of Burda et al. (2016, ICLR, eq. 8):

        log p(x) ~ L_k = log (1/k) sum_{i=1..k} p(x, z_i) / q(z_i | x),   z_i ~ q(z | x),

    computed with logsumexp. ``L_1`` is the ELBO and ``E[L_k]`` increases with k
    toward ``log p(x)`` (their Theorem 1); k = 5000 is the paper's evaluation
    setting. ``x``: (N, C, H, W), binary for the Bernoulli decoder (a ValueError
    otherwise). ``batch_size`` images are encoded at a time and their k samples
    decoded in chunks of at most 4096 images. Runs in eval mode (no binarisation).
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be >= 1, got k={k}, batch_size={batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = _as_tensor(x, device)
    _check_binary(model, data)
    out: list[Tensor] = []
    try:
        for start in range(0, len(data), batch_size):
            xb = data[start : start + batch_size]  # (B, C, H, W)
            b = len(xb)
            mu, logvar = model.posterior(xb)  # (B, d) each
            chunk = max(1, _DECODE_BATCH // b)
            log_w: list[Tensor] = []
            for first in range(0, k, chunk):
                m = min(chunk, k - first)
                eps = _randn((m, b, model.latent_dim), generator, device)  # (m, B, d)
                log_w.append(model.log_weights(xb, mu, logvar, eps)[0].double())  # (m, B)
            weights = torch.cat(log_w)  # (k, B)
            out.append(-(torch.logsumexp(weights, dim=0) - math.log(k)))
    finally:
        model.train(was_training)
    return torch.cat(out).cpu().numpy()


@torch.no_grad()
def negative_elbo(
    model: VariationalAutoencoder,
    x: np.ndarray | Tensor,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Per-image negative ELBO in nats, (N,) float64: a one-sample reconstruction term
    (``z = mu + sigma * eps``, eps from ``generator``) plus the closed-form KL.

    An upper bound on ``-log p(x)`` in expectation; ``importance_sampled_nll`` with
    k = 1 estimates the same quantity with a sampled rather than exact KL. ``x``:
    (N, C, H, W), binary for the Bernoulli decoder. Runs in eval mode.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = _as_tensor(x, device)
    _check_binary(model, data)
    out: list[Tensor] = []
    try:
        for start in range(0, len(data), batch_size):
            xb = data[start : start + batch_size]
            mu, logvar = model.posterior(xb)
            z = mu + torch.exp(0.5 * logvar) * _randn(tuple(mu.shape), generator, device)
            rec = model.negative_log_likelihood(model.decode_logits(z), xb)
            out.append((rec + kl_divergence_std_normal(mu, logvar)).double())
    finally:
        model.train(was_training)
    return torch.cat(out).cpu().numpy()
