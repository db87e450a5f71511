"""The model contract, checked for every registered family (new families are
picked up from MODEL_REGISTRY), plus the exact losses of the sparse and
contractive autoencoders and the linear autoencoder's PCA equivalence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from latentlab.models import contractive, conv, deep, linear, sparse, vae  # noqa: F401  (fill the registry)
from latentlab.models.base import MODEL_REGISTRY, Autoencoder, ModelOutput, build_model
from latentlab.models.contractive import contractive_penalty
from latentlab.models.pca import PCA
from latentlab.models.sparse import kl_sparsity

FAMILIES = sorted(MODEL_REGISTRY)
# Families whose reconstruction part is the mean squared error per pixel (the VAEs report nats per image).
MSE_FAMILIES = [f for f in FAMILIES if not issubclass(MODEL_REGISTRY[f], vae.VariationalAutoencoder)]
SHAPES = [(1, 28, 28), (4, 28, 28), (1, 32, 32)]
LATENTS = [2, 6]
BATCH = 4


def _cases(families: list[str]) -> list:
    return [
        pytest.param(family, shape, k, id=f"{family}-{'x'.join(map(str, shape))}-k{k}")
        for family in families
        for shape in SHAPES
        for k in LATENTS
    ]


CASES = _cases(FAMILIES)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast and makes timings steady on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _clean_and_noisy(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch and a copy with Gaussian noise (sigma 0.3), clamped to [0, 1]."""
    clean = _batch(shape)
    return clean, (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)


def _model(family: str, shape: tuple[int, int, int], k: int, seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    return build_model(family, sample_shape=shape, latent_dim=k)


def _batch(shape: tuple[int, int, int], n: int = BATCH, seed: int = 1) -> torch.Tensor:
    """Smooth blobs in [0, 1] plus noise: structured enough to be learnable."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    yy = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    centres = torch.rand(n, c, 2, 1, 1, generator=g) - 0.5
    blobs = torch.exp(-((yy - centres[:, :, 0]) ** 2 + (xx - centres[:, :, 1]) ** 2) / 0.2)
    return (0.8 * blobs + 0.2 * torch.rand(n, c, h, w, generator=g)).clamp(0, 1)


def test_all_families_registered():
    assert {"linear", "deep", "conv", "conv_plus", "sparse", "contractive"} <= set(FAMILIES)
    for name, cls in MODEL_REGISTRY.items():
        assert cls.family == name


@pytest.mark.parametrize(("family", "shape", "k"), CASES)
def test_shapes_and_finite_loss(family, shape, k):
    model = _model(family, shape, k)
    x = _batch(shape)
    z = model.encode(x)
    assert z.shape == (BATCH, k)
    assert model.decode(z).shape == x.shape
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.reconstruction is not None and out.reconstruction.shape == x.shape
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.loss.requires_grad
    assert "reconstruction" in out.parts
    for name, part in out.parts.items():
        assert part.dim() == 0 and torch.isfinite(part), name
        assert not part.requires_grad, name


@pytest.mark.parametrize(("family", "shape", "k"), CASES)
def test_training_steps_change_weights_and_lower_loss(family, shape, k):
    model = _model(family, shape, k)
    model.train()
    x = _batch(shape)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if len(losses) == 1:
            assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        final = model(x).loss.item()
    assert final < losses[0]


@pytest.mark.parametrize(("family", "shape", "k"), CASES)
def test_eval_mode_is_deterministic_and_per_sample(family, shape, k):
    model = _model(family, shape, k)
    x = _batch(shape)
    with torch.no_grad():
        model(x)  # a train-mode pass moves any BatchNorm running statistics
        model.eval()
        first, second = model(x), model(x)
        alone = model(x[:1]).reconstruction
    assert torch.equal(first.reconstruction, second.reconstruction)
    assert torch.equal(first.loss, second.loss)
    # Running statistics, not batch statistics: a sample's output ignores its batch.
    torch.testing.assert_close(alone, first.reconstruction[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "shape", "k"), CASES)
def test_state_dict_round_trip(family, shape, k, tmp_path):
    model = _model(family, shape, k, seed=0)
    x = _batch(shape)
    with torch.no_grad():
        model(x)  # non-trivial BatchNorm buffers
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = _model(family, shape, k, seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    with torch.no_grad():
        a, b = model(x), fresh(x)
        assert torch.equal(model.encode(x), fresh.encode(x))
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize(("family", "shape", "k"), _cases(MSE_FAMILIES))
def test_forward_uses_target(family, shape, k):
    model = _model(family, shape, k).eval()
    clean, noisy = _clean_and_noisy(shape)
    with torch.no_grad():
        against_self = model(noisy)
        against_clean = model(noisy, target=clean)
        explicit = torch.mean((against_clean.reconstruction - clean) ** 2)
    assert torch.equal(against_self.reconstruction, against_clean.reconstruction)
    assert not torch.isclose(against_self.loss, against_clean.loss)
    torch.testing.assert_close(against_clean.parts["reconstruction"], explicit)


def test_level_weighted_reconstruction_error_by_hand():
    model = _model("conv", (1, 8, 8), 2)
    target = torch.tensor([0.0, 0.5, 1.0]).reshape(1, 1, 1, 3)
    recon = torch.tensor([0.1, 0.5, 0.8]).reshape(1, 1, 1, 3)
    # w = 0: the plain mean of the squared errors 0.01, 0, 0.04.
    torch.testing.assert_close(model.reconstruction_error(recon, target), torch.tensor(0.05 / 3))
    # w = 2: weights e^0, e^1, e^2 on those errors, divided by their sum.
    model.level_weight = 2.0
    weights = [1.0, math.e, math.e**2]
    expected = (0.01 * weights[0] + 0.04 * weights[2]) / sum(weights)
    torch.testing.assert_close(model.reconstruction_error(recon, target), torch.tensor(expected))


@pytest.mark.parametrize(("family", "shape", "k"), _cases(MSE_FAMILIES))
def test_every_mse_family_uses_the_level_weight(family, shape, k):
    model = _model(family, shape, k).eval()
    clean, noisy = _clean_and_noisy(shape)
    with torch.no_grad():
        plain = model(noisy, target=clean)
        model.level_weight = 8.0
        weighted = model(noisy, target=clean)
        weights = torch.exp(8.0 * clean)
        expected = (weights * (weighted.reconstruction - clean) ** 2).sum() / weights.sum()
    assert torch.equal(plain.reconstruction, weighted.reconstruction)
    torch.testing.assert_close(weighted.parts["reconstruction"], expected)
    assert not torch.isclose(plain.parts["reconstruction"], weighted.parts["reconstruction"])


@pytest.mark.parametrize("family", FAMILIES)
def test_construction_is_deterministic(family):
    a, b = _model(family, (1, 28, 28), 2, seed=7), _model(family, (1, 28, 28), 2, seed=7)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("size", [(8, 8), (9, 13), (28, 28), (32, 32), (33, 20)])
@pytest.mark.parametrize("family", ["conv", "conv_plus"])
def test_conv_reconstructs_exact_size(family, size):
    model = _model(family, (1, *size), 3).eval()
    x = _batch((1, *size), n=2)
    with torch.no_grad():
        assert model.reconstruct(x).shape == x.shape


def test_conv_spatial_sizes():
    assert _model("conv", (1, 28, 28), 2).spatial_sizes == [(28, 28), (14, 14), (7, 7), (4, 4)]
    assert _model("conv", (1, 32, 32), 2).spatial_sizes == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_options_are_used_and_checked():
    m = build_model("deep", (1, 28, 28), 4, hidden=[64, 32], activation="relu")
    assert [layer.out_features for layer in m.encoder if isinstance(layer, torch.nn.Linear)] == [64, 32, 4]
    assert build_model("conv_plus", (1, 28, 28), 4, channels=[8, 16]).spatial_sizes[-1] == (7, 7)
    assert build_model("sparse", (1, 28, 28), 4, rho=0.1, beta=3.0).beta == 3.0
    with pytest.raises(ValueError, match="activation"):
        build_model("deep", (1, 28, 28), 4, activation="tanh")
    with pytest.raises(ValueError, match="rho"):
        build_model("sparse", (1, 28, 28), 4, rho=1.5)
    with pytest.raises(ValueError, match="lam"):
        build_model("contractive", (1, 28, 28), 4, lam=-1.0)
    with pytest.raises(TypeError):
        build_model("linear", (1, 28, 28), 4, bogus=1)


# --- sparse: KL penalty ------------------------------------------------------------


def _kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_kl_sparsity_by_hand():
    value = kl_sparsity(0.1, torch.tensor([0.2, 0.05], dtype=torch.float64))
    assert value.item() == pytest.approx(_kl(0.1, 0.2) + _kl(0.1, 0.05), rel=1e-12)
    assert kl_sparsity(0.1, torch.tensor([0.1, 0.1])).item() == pytest.approx(0.0, abs=1e-7)
    # Clamped: saturated units give a large but finite penalty.
    assert torch.isfinite(kl_sparsity(0.05, torch.tensor([0.0, 1.0])))


def test_sparse_loss_parts_by_hand():
    torch.manual_seed(0)
    model = build_model("sparse", (1, 8, 8), 3, rho=0.1, beta=0.5)
    x = _batch((1, 8, 8), n=5)
    out = model(x)
    h = model.encode(x).detach()
    rho_hat = h.mean(0).tolist()
    kl = sum(_kl(0.1, q) for q in rho_hat)
    mse = torch.mean((out.reconstruction - x) ** 2).item()
    assert out.parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out.parts["sparsity"].item() == pytest.approx(0.5 * kl, rel=1e-5)
    assert out.parts["rho_hat"].item() == pytest.approx(sum(rho_hat) / 3, rel=1e-6)
    assert out.loss.item() == pytest.approx(mse + 0.5 * kl, rel=1e-5)


@pytest.mark.parametrize("family", ["sparse", "contractive"])
def test_penalties_stay_float32_under_bf16_autocast(family):
    model = _model(family, (1, 8, 8), 3)
    with torch.no_grad():
        model.encoder.bias.fill_(30.0)  # saturated units: rho_hat rounds to 1 in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch((1, 8, 8)))
    assert torch.isfinite(out.loss)
    for name, part in out.parts.items():
        if name != "reconstruction":
            assert part.dtype == torch.float32 and torch.isfinite(part), name


# --- contractive: Jacobian penalty -----------------------------------------------------


def test_contractive_penalty_equals_autograd_jacobian():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(5, 3).double()
    xs = torch.randn(4, 5, dtype=torch.float64)
    h = torch.sigmoid(encoder(xs))
    exact = contractive_penalty(h, encoder.weight)
    assert exact.shape == (4,)
    for n in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: torch.sigmoid(encoder(v)), xs[n])  # (3, 5)
        assert exact[n].item() == pytest.approx(jac.pow(2).sum().item(), rel=1e-12)


def test_contractive_penalty_one_by_one_by_hand():
    w, b, x = 2.0, -0.5, 0.75
    h = 1 / (1 + math.exp(-(w * x + b)))
    expected = (h * (1 - h)) ** 2 * w**2
    value = contractive_penalty(torch.tensor([[h]], dtype=torch.float64), torch.tensor([[w]], dtype=torch.float64))
    assert value.item() == pytest.approx(expected, rel=1e-12)


def test_contractive_loss_parts():
    torch.manual_seed(0)
    model = build_model("contractive", (1, 8, 8), 3, lam=0.25)
    x = _batch((1, 8, 8), n=5)
    out = model(x)
    frob2 = contractive_penalty(model.encode(x), model.encoder.weight).mean().item()
    assert out.parts["jacobian_frobenius2"].item() == pytest.approx(frob2, rel=1e-6)
    assert out.parts["contractive"].item() == pytest.approx(0.25 * frob2, rel=1e-6)
    assert out.loss.item() == pytest.approx(out.parts["reconstruction"].item() + 0.25 * frob2, rel=1e-6)


# --- linear: learns the PCA subspace (Baldi & Hornik 1989) -----------------------------


def test_linear_autoencoder_learns_pca_subspace():
    rng = np.random.default_rng(0)
    n, dim, k = 500, 20, 3
    basis = np.linalg.qr(rng.normal(size=(dim, k)))[0]  # (20, 3) orthonormal
    codes = rng.normal(size=(n, k)) * np.array([3.0, 2.0, 1.5])
    # Unit-scale data (the linear model is unbounded): at pixel scale the saddle
    # points of the linear AE's loss slow plain Adam too much for a unit test.
    data = 0.5 + codes @ basis.T + 0.3 * rng.normal(size=(n, dim))
    x = torch.tensor(data, dtype=torch.float32).view(n, 1, 4, 5)

    pca = PCA.fit(data, k)
    pca_mse = float(np.mean((pca.reconstruct(data, k) - data) ** 2))

    torch.manual_seed(0)
    model = build_model("linear", (1, 4, 5), k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1500):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ae_mse = model(x).loss.item()
    assert ae_mse == pytest.approx(pca_mse, rel=0.02)
    decoder_columns = model.decoder.weight.detach().double().numpy()  # (20, 3)
    angles = np.degrees(subspace_angles(decoder_columns, pca.components.T))
    assert angles.max() < 5.0, angles
