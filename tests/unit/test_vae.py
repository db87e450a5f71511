"""Variational autoencoders: the model contract for every VAE family, the ELBO's
parts against their closed forms, the importance-weighted NLL bound, sampling,
and training through the unchanged engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentlab import engine
from latentlab.config import TrainingConfig
from latentlab.models import vae
from latentlab.models.base import MODEL_REGISTRY, ModelOutput, build_model
from latentlab.models.vae import (
    VariationalAutoencoder,
    importance_sampled_nll,
    kl_divergence_std_normal,
    negative_elbo,
)

FAMILIES = ["vae_mlp", "vae_conv"]
SHAPES = [(1, 28, 28), (4, 28, 28), (1, 32, 32)]
LIKELIHOODS = ["bernoulli", "gaussian"]
BATCH = 4
# Small networks: the contract does not depend on width, and tests stay fast.
SMALL = {"vae_mlp": {"hidden": (32, 16)}, "vae_conv": {"channels": (4, 8)}}

CASES = [
    pytest.param(family, shape, lik, id=f"{family}-{'x'.join(map(str, shape))}-{lik}")
    for family in FAMILIES
    for shape in SHAPES
    for lik in LIKELIHOODS
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(
    family: str, shape: tuple[int, int, int], likelihood: str = "bernoulli", k: int = 3, seed: int = 0, **options
) -> VariationalAutoencoder:
    torch.manual_seed(seed)
    model = build_model(family, shape, k, likelihood=likelihood, **{**SMALL[family], **options})
    assert isinstance(model, VariationalAutoencoder)
    return model


def _batch(shape: tuple[int, int, int], n: int = BATCH, seed: int = 1) -> torch.Tensor:
    """Smooth blobs in [0, 1] plus noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    yy = torch.linspace(-1, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(-1, 1, w).view(1, 1, 1, w)
    centres = torch.rand(n, c, 2, 1, 1, generator=g) - 0.5
    blobs = torch.exp(-((yy - centres[:, :, 0]) ** 2 + (xx - centres[:, :, 1]) ** 2) / 0.2)
    return (0.8 * blobs + 0.2 * torch.rand(n, c, h, w, generator=g)).clamp(0, 1)


def _binary(n: int, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> np.ndarray:
    """Binary images: four prototypes with 5% of pixels flipped."""
    rng = np.random.default_rng(seed)
    protos = rng.random((4, *shape)) < 0.4
    x = protos[rng.integers(0, 4, n)] ^ (rng.random((n, *shape)) < 0.05)
    return x.astype(np.float32)


def test_families_registered_through_build_model():
    build_model("vae_mlp", (1, 8, 8), 2)  # importing through build_model fills the registry
    for name in FAMILIES:
        assert MODEL_REGISTRY[name].family == name
        assert issubclass(MODEL_REGISTRY[name], VariationalAutoencoder)


@pytest.mark.parametrize(("family", "shape", "likelihood"), CASES)
def test_shapes_parts_and_finite_loss(family, shape, likelihood):
    model = _model(family, shape, likelihood, beta=2.0)
    x = _batch(shape)
    z = model.encode(x)
    assert z.shape == (BATCH, 3)
    mean = model.decode(z).detach()
    assert mean.shape == x.shape and float(mean.min()) >= 0 and float(mean.max()) <= 1
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.reconstruction is not None and out.reconstruction.shape == x.shape
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    assert set(out.parts) == {"reconstruction", "kl", "elbo"}
    for name, part in out.parts.items():
        assert part.dim() == 0 and torch.isfinite(part) and not part.requires_grad, name
    rec, kl = out.parts["reconstruction"], out.parts["kl"]
    assert float(kl) >= 0
    torch.testing.assert_close(out.parts["elbo"], -(rec + kl))
    torch.testing.assert_close(out.loss.detach(), rec + 2.0 * kl)  # beta weights the KL only
    # The reconstruction is the decoder mean at the posterior mean.
    torch.testing.assert_close(out.reconstruction, model.decode(model.encode(x)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_one_step_changes_weights_and_training_lowers_loss(family, likelihood):
    shape = (1, 28, 28)
    model = _model(family, shape, likelihood).train()
    x = _batch(shape)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(25):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if i == 0:
            changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
            assert set(changed) == set(before)  # every parameter gets a gradient
    model.eval()
    with torch.no_grad():
        assert model(x).loss.item() < losses[0]


@pytest.mark.parametrize(("family", "shape", "likelihood"), CASES)
def test_eval_mode_is_deterministic_and_per_sample(family, shape, likelihood):
    model = _model(family, shape, likelihood, binarize=likelihood == "bernoulli").eval()
    x = _batch(shape)
    with torch.no_grad():
        first, second = model(x), model(x)
        alone = model(x[:1])
    assert torch.equal(first.loss, second.loss)
    assert torch.equal(first.reconstruction, second.reconstruction)
    torch.testing.assert_close(alone.reconstruction, first.reconstruction[:1], rtol=1e-5, atol=1e-6)
    # Training mode draws fresh noise every call.
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).loss, model(x).loss)


@pytest.mark.parametrize(("family", "shape", "likelihood"), CASES)
def test_state_dict_round_trip(family, shape, likelihood, tmp_path):
    model = _model(family, shape, likelihood).eval()
    x = _batch(shape)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = _model(family, shape, likelihood, seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    with torch.no_grad():
        a, b = model(x), fresh(x)
        assert torch.equal(model.encode(x), fresh.encode(x))
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(model.sample(3, generator=g1), fresh.sample(3, generator=g2))
    assert torch.equal(a.reconstruction, b.reconstruction)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 28, 28), (4, 28, 28)])
def test_sample_shapes_range_and_truncation(family, shape):
    model = _model(family, shape).eval()
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, *shape) and not samples.requires_grad
    assert float(samples.min()) >= 0 and float(samples.max()) <= 1
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)
    # psi = 0: every z is the prior mean, so every sample is the same image, decode(0).
    flat = model.sample(4, psi=0.0)
    assert torch.equal(flat, flat[:1].expand_as(flat))
    torch.testing.assert_close(flat[:1], model.decode(torch.zeros(1, 3)))
    # psi shrinks the spread of the samples around decode(0).
    wide = model.sample(64, generator=torch.Generator().manual_seed(1), psi=1.0)
    narrow = model.sample(64, generator=torch.Generator().manual_seed(1), psi=0.3)
    assert (narrow - flat[:1]).abs().mean() < (wide - flat[:1]).abs().mean()


# --- the loss against closed forms ---------------------------------------------------


def test_kl_closed_form_by_hand():
    mu = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, math.log(4.0)]], dtype=torch.float64)
    # Per dimension 1/2 (mu^2 + sigma^2 - 1 - log sigma^2): 1/2 (1 + 1 - 1 - 0) + 1/2 (0 + 4 - 1 - log 4).
    expected = 0.5 * (1.0 + 0.0 + (4.0 - 1.0 - math.log(4.0)))
    value = kl_divergence_std_normal(mu, logvar)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert kl_divergence_std_normal(torch.zeros(3, 5), torch.zeros(3, 5)).tolist() == [0.0, 0.0, 0.0]


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 4, generator=g, dtype=torch.float64),
    )
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_divergence_std_normal(mu, logvar), expected)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_reconstruction_term_is_the_decoder_nll(likelihood):
    model = _model("vae_mlp", (1, 8, 8), likelihood, sigma=0.2).eval()
    logits = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    if likelihood == "bernoulli":
        target = (target > 0.5).float()
        dist = torch.distributions.Bernoulli(logits=logits)
    else:
        dist = torch.distributions.Normal(torch.sigmoid(logits), 0.2)
    expected = -dist.log_prob(target).flatten(1).sum(1)
    torch.testing.assert_close(model.negative_log_likelihood(logits, target), expected)


def test_forward_scores_the_target():
    model = _model("vae_conv", (1, 28, 28), "gaussian").eval()
    clean = _batch((1, 28, 28))
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    with torch.no_grad():
        against_self, against_clean = model(noisy), model(noisy, clean)
        mu, logvar = model.posterior(noisy)
        g = torch.Generator().manual_seed(model.eval_seed)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
        rec = model.negative_log_likelihood(model.decode_logits(z), clean).mean()
    assert torch.equal(against_self.reconstruction, against_clean.reconstruction)
    assert not torch.isclose(against_self.loss, against_clean.loss)
    torch.testing.assert_close(against_clean.parts["reconstruction"], rec)


def test_dynamic_binarisation_in_training_only():
    shape = (1, 8, 8)
    grey = torch.full((4, *shape), 0.5)
    model = _model("vae_mlp", shape, binarize=True)
    plain = _model("vae_mlp", shape, binarize=False)
    seen: list[torch.Tensor] = []
    original = model.negative_log_likelihood

    def spy(logits, target):
        seen.append(target.clone())
        return original(logits, target)

    model.negative_log_likelihood = spy  # type: ignore[method-assign]
    model.train()
    model(grey)
    model(grey)
    assert all(set(t.unique().tolist()) <= {0.0, 1.0} for t in seen)  # binary targets in training
    assert not torch.equal(seen[0], seen[1])  # a fresh draw every step
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(grey).loss, plain(grey).loss)  # eval mode: targets as given
    assert torch.equal(seen[-1], grey)


def test_options_are_checked():
    assert _model("vae_mlp", (1, 28, 28), hidden=[64, 32]).hidden == (64, 32)
    assert _model("vae_conv", (1, 28, 28), channels=[8]).spatial_sizes[-1] == (14, 14)
    m = build_model("vae_mlp", (1, 28, 28), 4)
    assert m.hidden == (512, 256) and m.likelihood == "bernoulli" and m.beta == 1.0
    assert build_model("vae_conv", (1, 28, 28), 4).channels == (32, 64)
    with pytest.raises(ValueError, match="likelihood"):
        build_model("vae_mlp", (1, 28, 28), 4, likelihood="poisson")
    with pytest.raises(ValueError, match="beta"):
        build_model("vae_mlp", (1, 28, 28), 4, beta=-1.0)
    with pytest.raises(ValueError, match="binarize"):
        build_model("vae_conv", (1, 28, 28), 4, likelihood="gaussian", binarize=True)
    with pytest.raises(ValueError, match="sigma"):
        build_model("vae_conv", (1, 28, 28), 4, likelihood="gaussian", sigma=0.0)
    with pytest.raises(ValueError, match="hidden"):
        build_model("vae_mlp", (1, 28, 28), 4, hidden=[])


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_stay_float32_under_bf16_autocast(family):
    model = _model(family, (1, 28, 28))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch((1, 28, 28)))
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    for name, part in out.parts.items():
        assert part.dtype == torch.float32 and torch.isfinite(part), name


# --- likelihood bounds --------------------------------------------------------------


def _trained_vae(seed: int = 0) -> tuple[VariationalAutoencoder, np.ndarray]:
    """A small Bernoulli VAE fitted briefly to binary 8x8 images, and held-out images."""
    train, test = _binary(256, seed=0), _binary(64, seed=1)
    model = _model("vae_mlp", (1, 8, 8), k=2, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.from_numpy(train)
    for _ in range(60):
        loss = model(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), test


def test_iwae_nll_is_below_the_negative_elbo():
    model, x = _trained_vae()
    g = torch.Generator().manual_seed(0)
    elbo = negative_elbo(model, x, generator=g)
    iwae = importance_sampled_nll(model, x, k=200, batch_size=32, generator=g)  # several sample chunks
    assert elbo.shape == iwae.shape == (64,) and elbo.dtype == iwae.dtype == np.float64
    assert np.all(np.isfinite(iwae)) and np.all(iwae > 0)
    assert iwae.mean() < elbo.mean()
    # More samples, tighter bound (Burda et al. 2016, Theorem 1), on average.
    iwae_10 = importance_sampled_nll(model, x, k=10, generator=torch.Generator().manual_seed(1))
    assert iwae.mean() <= iwae_10.mean() <= elbo.mean() + 0.5
    # A fixed generator makes the estimate reproducible; the global RNG is not touched.
    state = torch.get_rng_state()
    a = importance_sampled_nll(model, x, k=50, batch_size=32, generator=torch.Generator().manual_seed(7))
    b = importance_sampled_nll(model, x, k=50, batch_size=32, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training


def test_iwae_with_one_sample_is_the_elbo_in_expectation():
    model, x = _trained_vae()
    reps = np.repeat(x, 40, axis=0)  # 2,560 draws
    k1 = importance_sampled_nll(model, reps, k=1, batch_size=512, generator=torch.Generator().manual_seed(0))
    elbo = negative_elbo(model, reps, generator=torch.Generator().manual_seed(1))
    # Same quantity, one with a sampled KL and one with the exact KL: equal means up to MC error.
    sem = np.sqrt(k1.var() / len(k1) + elbo.var() / len(elbo))
    assert abs(k1.mean() - elbo.mean()) < 4 * sem


# --- training on the importance-weighted bound (IWAE) ------------------------------


def test_iwae_training_loss_against_a_hand_computed_bound():
    """K = 5: the loss is minus the batch mean of log (1/K) sum_i p(x, z_i) / q(z_i | x)
    (Burda et al. 2016, eq. 8), recomputed with torch.distributions on the same eps."""
    n, k, d = 6, 5, 3
    model = _model("vae_mlp", (1, 8, 8), k=d, importance_samples=k).eval()
    x = torch.from_numpy(_binary(n))
    with torch.no_grad():
        out = model(x)
        mu, logvar = model.posterior(x)
        eps = torch.randn((k, n, d), generator=torch.Generator().manual_seed(model.eval_seed))  # eval-mode noise
        sigma = torch.exp(0.5 * logvar)
        z = mu + sigma * eps  # (K, N, d)
        logits = model.decode_logits(z.reshape(k * n, d)).view(k, n, -1)
        log_px_z = torch.distributions.Bernoulli(logits=logits).log_prob(x.view(1, n, -1)).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
        bound = torch.logsumexp(log_px_z + log_pz - log_qz, dim=0) - math.log(k)  # (N,)
    torch.testing.assert_close(out.loss, -bound.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.parts["iwae_bound"], bound.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.parts["reconstruction"], -log_px_z.mean(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.parts["kl"], kl_divergence_std_normal(mu, logvar).mean())
    assert "iwae_bound" not in _model("vae_mlp", (1, 8, 8), k=d).eval()(x).parts  # K = 1: the ELBO's parts only


def test_iwae_bound_is_tighter_than_the_elbo_of_the_same_weights():
    """Burda et al. 2016, Theorem 1: E[L_K] >= E[L_1] = ELBO, on average over images."""
    elbo_model, test = _trained_vae()  # a fitted posterior: far from the prior, so the bounds differ
    x = torch.from_numpy(np.repeat(test, 4, axis=0))  # 256 images
    iwae_model = _model("vae_mlp", (1, 8, 8), k=2, importance_samples=20).eval()
    iwae_model.load_state_dict(elbo_model.state_dict())
    with torch.no_grad():
        elbo_loss, iwae_loss = elbo_model(x).loss, iwae_model(x).loss
        exact_elbo = float(negative_elbo(elbo_model, x.numpy(), generator=torch.Generator().manual_seed(3)).mean())
    assert abs(float(elbo_loss) - exact_elbo) < 1.0  # the K = 1 loss is the negative ELBO
    assert iwae_loss < elbo_loss - 2.0  # minus the bounds, in nats per image (measured: 65.7 against 72.6)


@pytest.mark.parametrize("family", FAMILIES)
def test_iwae_training_step_updates_every_weight_and_lowers_the_loss(family):
    shape = (1, 28, 28)
    model = _model(family, shape, importance_samples=3).train()
    x = (_batch(shape) > 0.5).float()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(25):
        out = model(x)
        assert torch.isfinite(out.loss) and out.loss.dim() == 0
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        if i == 0:
            assert {n for n, p in model.named_parameters() if not torch.equal(before[n], p)} == set(before)
    model.eval()
    with torch.no_grad():
        assert model(x).loss.item() < losses[0]


def test_iwae_options_are_checked():
    from pydantic import ValidationError

    from latentlab.config import VaeSpec

    with pytest.raises(ValueError, match="importance_samples must be >= 1"):
        build_model("vae_mlp", (1, 28, 28), 4, importance_samples=0)
    with pytest.raises(ValueError, match="beta must be 1"):
        build_model("vae_conv", (1, 28, 28), 4, importance_samples=5, beta=2.0)
    spec = VaeSpec(family="vae_mlp", importance_samples=5)
    assert build_model("vae_mlp", (1, 28, 28), 4, **spec.family_options()).importance_samples == 5
    with pytest.raises(ValidationError, match="beta must be 1"):
        VaeSpec(family="vae_mlp", importance_samples=5, beta=0.5)
    with pytest.raises(ValidationError, match="importance_samples"):
        VaeSpec(family="vae_mlp", importance_samples=0)


def test_bernoulli_bounds_need_binary_images():
    model = _model("vae_mlp", (1, 8, 8))
    with pytest.raises(ValueError, match="binar"):
        importance_sampled_nll(model, np.full((2, 1, 8, 8), 0.5, np.float32), k=2)
    with pytest.raises(ValueError, match="binar"):
        negative_elbo(model, np.full((2, 1, 8, 8), 0.5, np.float32))
    gaussian = _model("vae_mlp", (1, 8, 8), "gaussian")
    assert np.all(np.isfinite(importance_sampled_nll(gaussian, np.full((2, 1, 8, 8), 0.5, np.float32), k=3)))


# --- the engine trains a VAE unchanged -----------------------------------------------


def test_engine_fits_a_vae():
    train, val = engine.TrainingData(_binary(96, seed=0)), engine.TrainingData(_binary(32, seed=1))
    torch.manual_seed(0)
    model = build_model("vae_conv", (1, 8, 8), 2, channels=(4, 8), binarize=True)
    cfg = TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10)
    result = engine.fit(model, train, val, cfg, seed=0, device=torch.device("cpu"), progress=False)
    assert {"train_loss", "train_kl", "train_elbo", "val_reconstruction", "val_kl", "val_elbo"} <= set(
        result.history[0]
    )
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    # The validation ELBO is deterministic: re-evaluating the best weights gives the best loss.
    again = engine.evaluate_loss(result.model, val, torch.device("cpu"))["loss"]
    assert again == pytest.approx(result.best_val_loss, rel=1e-6)
    assert vae.MlpVAE.family == "vae_mlp"


def test_engine_fits_an_iwae_and_logs_its_bound():
    images = _binary(128, seed=0)  # one set of prototypes: validation images look like the training ones
    train, val = engine.TrainingData(images[:96]), engine.TrainingData(images[96:])
    torch.manual_seed(0)
    model = build_model("vae_mlp", (1, 8, 8), 2, hidden=(16,), binarize=True, importance_samples=4)
    cfg = TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10)
    result = engine.fit(model, train, val, cfg, seed=0, device=torch.device("cpu"), progress=False)
    assert {"train_iwae_bound", "val_iwae_bound", "val_elbo"} <= set(result.history[0])
    for row in result.history:  # the validation loss is minus the bound, which is at least the ELBO on average
        assert row["val_loss"] == pytest.approx(-row["val_iwae_bound"], rel=1e-6)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


def test_validation_images_follow_the_binarisation_option():
    grey = _batch((1, 8, 8), n=16).numpy()
    binary = vae.validation_images(_model("vae_mlp", (1, 8, 8), binarize=True), grey, seed=3)
    assert np.array_equal(binary, vae.binarise(grey, 3)) and set(np.unique(binary)) == {0.0, 1.0}
    for unbinarised in (_model("vae_mlp", (1, 8, 8)), _model("vae_conv", (1, 8, 8), "gaussian")):
        assert np.array_equal(vae.validation_images(unbinarised, grey, seed=3), grey)
