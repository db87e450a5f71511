"""The contractive autoencoder (Rifai, Vincent, Muller, Glorot & Bengio 2011,
"Contractive Auto-Encoders: Explicit Invariance During Feature Extraction", ICML).

The objective adds to the reconstruction error the squared Frobenius norm of the
encoder's Jacobian, J_CAE = sum_x [ L(x, g(f(x))) + lambda ||J_f(x)||_F^2 ]:
the code is pushed to be locally insensitive to the input, except along the
directions the reconstruction needs (the data manifold). For a sigmoid encoder
h = sigmoid(W x + b) the Jacobian is dh_j/dx_i = h_j (1 - h_j) W_ji, so the
paper's closed form is exact and costs O(k D) instead of an autograd Jacobian:

    ||J_f(x)||_F^2 = sum_j (h_j (1 - h_j))^2 sum_i W_ji^2.

L is the per-pixel mean squared error and the penalty is averaged over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentlab.models.base import ModelOutput, SigmoidAutoencoder, register


def contractive_penalty(h: Tensor, weight: Tensor) -> Tensor:
    """Per-sample squared Frobenius norm of the Jacobian of ``h = sigmoid(weight @ x + b)``.

    ``h``: (N, k) sigmoid activations; ``weight``: (k, D). Returns (N,).
    """
    # At least float32, and elementwise products rather than a matmul (which bf16
    # autocast would run in bf16), so a mixed-precision forward gets an accurate penalty.
    dtype = torch.promote_types(torch.promote_types(h.dtype, weight.dtype), torch.float32)
    h, weight = h.to(dtype), weight.to(dtype)
    return torch.sum((h * (1.0 - h)) ** 2 * (weight**2).sum(dim=1), dim=1)


@register("contractive")
class ContractiveAutoencoder(SigmoidAutoencoder):
    """``x -> h = sigmoid(W x + b)`` (k units) ``-> sigmoid(W' h + b')``.

    Loss: MSE + lam * mean_n ||J_f(x_n)||_F^2. Parts: ``reconstruction`` (MSE),
    ``contractive`` (the scaled penalty), ``jacobian_frobenius2`` (the unscaled
    batch mean of the squared Frobenius norms).
    """

    def __init__(self, sample_shape: tuple[int, int, int], latent_dim: int, lam: float = 1e-4) -> None:
        super().__init__(sample_shape, latent_dim)
        if lam < 0.0:
            raise ValueError(f"contractive: lam must be >= 0, got {lam}")
        self.lam = float(lam)

    def forward(self, x: Tensor, target: Tensor | None = None) -> ModelOutput:
        target = x if target is None else target
        h = self.encode(x)  # (N, k)
        recon = self.decode(h)
        mse = self.reconstruction_error(recon, target)
        frob2 = contractive_penalty(h, self.encoder.weight).mean()
        penalty = self.lam * frob2
        return ModelOutput(
            loss=mse + penalty,
            parts={
                "reconstruction": mse.detach(),
                "contractive": penalty.detach(),
                "jacobian_frobenius2": frob2.detach(),
            },
            reconstruction=recon,
        )
