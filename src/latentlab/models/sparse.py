"""The sparse autoencoder of Andrew Ng's CS294A lecture notes, "Sparse autoencoder"
(2011), section "Autoencoders and sparsity".

One hidden layer of ``latent_dim`` sigmoid units is the code. Sparsity asks each
unit j to be active only rarely: its average activation over the data,
``rho_hat_j = mean_n h_j(x_n)``, should be close to a small target ``rho``. The
penalty is the KL divergence between Bernoulli(rho) and Bernoulli(rho_hat_j),

    KL(rho || rho_hat_j) = rho log(rho / rho_hat_j) + (1 - rho) log((1 - rho) / (1 - rho_hat_j)),

which is 0 at rho_hat_j = rho and grows without bound as rho_hat_j -> 0 or 1,
and the objective is J_sparse = J + beta * sum_j KL(rho || rho_hat_j). Here J
is the per-pixel mean squared error (the notes use half the summed squared
error plus weight decay; weight decay belongs to the optimiser here), and
rho_hat_j is estimated on each mini-batch, as is usual with SGD.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentlab.models.base import ModelOutput, SigmoidAutoencoder, register

_EPS = 1e-6  # rho_hat is clamped to [eps, 1 - eps] so the logs stay finite


def _at_least_float32(t: Tensor) -> Tensor:
    """Under bf16 autocast 1 - 1e-6 rounds to 1 and a saturated unit would give log(0)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kl_sparsity(rho: float, rho_hat: Tensor) -> Tensor:
    """Sum over units j of KL(rho || rho_hat_j) between Bernoulli distributions.

    ``rho``: the target mean activation in (0, 1); ``rho_hat``: (k,) mean
    activations. Returns a scalar tensor (differentiable in ``rho_hat``).
    """
    q = _at_least_float32(rho_hat).clamp(_EPS, 1.0 - _EPS)
    return torch.sum(rho * torch.log(rho / q) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - q)))


@register("sparse")
class SparseAutoencoder(SigmoidAutoencoder):
    """``x -> h = sigmoid(W_1 x + b_1)`` (k units) ``-> sigmoid(W_2 h + b_2)``.

    Loss: MSE + beta * sum_j KL(rho || rho_hat_j). Parts: ``reconstruction``
    (MSE), ``sparsity`` (beta * KL sum), ``kl`` (the KL sum), ``rho_hat``
    (the mean over units of rho_hat_j).
    """

    def __init__(
        self, sample_shape: tuple[int, int, int], latent_dim: int, rho: float = 0.05, beta: float = 0.1
    ) -> None:
        super().__init__(sample_shape, latent_dim)
        if not 0.0 < rho < 1.0:
            raise ValueError(f"sparse: rho must be in (0, 1), got {rho}")
        if beta < 0.0:
            raise ValueError(f"sparse: beta must be >= 0, got {beta}")
        self.rho = float(rho)
        self.beta = float(beta)

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        target = x if target is None else target
        h = self.encode(x)  # (N, k)
        recon = self.decode(h)
        mse = self.reconstruction_error(recon, target)
        rho_hat = _at_least_float32(h).mean(dim=0)  # (k,) batch estimate of each unit's mean activation
        kl = kl_sparsity(self.rho, rho_hat)
        sparsity = self.beta * kl
        return ModelOutput(
            loss=mse + sparsity,
            parts={
                "reconstruction": mse.detach(),
                "sparsity": sparsity.detach(),
                "kl": kl.detach(),
                "rho_hat": rho_hat.mean().detach(),
            },
            reconstruction=recon,
        )
