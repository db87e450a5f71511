"""GANs: the generator/discriminator contract for every family in GAN_REGISTRY,
sampling and truncation, and the adversarial training loop (determinism,
monitor, checkpoints, resume after SIGKILL)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentlab.adversarial import GanTrainingConfig, fit_gan
from latentlab.models.gan import GAN_REGISTRY, GanPair, build_gan

torch.set_num_threads(1)

K = 3  # classes of the conditional family
# (family, options): every registered family, small enough to be fast.
FAMILIES = [
    ("gan", {"g_hidden": (32, 64), "d_hidden": (64, 32)}),
    ("dcgan", {"channels": (8, 16)}),
    ("cgan", {"channels": (8, 16)}),
    ("cgan", {"arch": "mlp", "g_hidden": (32, 64), "d_hidden": (64, 32), "embed_dim": 4}),
]
SHAPES = [(1, 28, 28), (4, 28, 28)]
BATCH = 6
CASES = [
    pytest.param(family, options, shape, id=f"{family}-{options.get('arch', '')}-{'x'.join(map(str, shape))}")
    for family, options in FAMILIES
    for shape in SHAPES
]


def _pair(family: str, options: dict, shape=(1, 28, 28), latent: int = 5, seed: int = 0) -> GanPair:
    torch.manual_seed(seed)
    return build_gan(family, shape, latent, num_classes=K if family == "cgan" else None, **options)


def _labels(pair: GanPair, n: int = BATCH) -> torch.Tensor | None:
    return torch.arange(n) % K if pair.conditional else None


def _images(n: int, shape=(1, 28, 28), seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def test_every_family_is_registered_and_covered():
    assert {"gan", "dcgan", "cgan"} <= set(GAN_REGISTRY)
    assert {f for f, _ in FAMILIES} == set(GAN_REGISTRY)
    for name, cls in GAN_REGISTRY.items():
        assert cls.family == name


@pytest.mark.parametrize(("family", "options", "shape"), CASES)
def test_shapes_ranges_and_finite_losses(family, options, shape):
    pair = _pair(family, options, shape)
    assert pair.conditional == (family == "cgan") and pair.latent_dim == 5
    y = _labels(pair)
    z = pair.sample_latent(BATCH)
    assert z.shape == (BATCH, 5)
    fake = pair.generator(z, y)
    assert fake.shape == (BATCH, *shape)
    assert float(fake.detach().min()) >= 0 and float(fake.detach().max()) <= 1
    logits = pair.discriminator(fake, y)
    assert logits.shape == (BATCH,)
    d_loss = F.binary_cross_entropy_with_logits(logits, torch.zeros(BATCH))
    g_loss = F.binary_cross_entropy_with_logits(logits, torch.ones(BATCH))
    assert torch.isfinite(d_loss) and torch.isfinite(g_loss) and g_loss.requires_grad


@pytest.mark.parametrize(("family", "options", "shape"), CASES)
def test_one_optimiser_step_changes_both_networks(family, options, shape):
    pair = _pair(family, options, shape).train()
    y = _labels(pair)
    before = {name: p.detach().clone() for name, p in pair.named_parameters()}
    opt = torch.optim.Adam(pair.parameters(), lr=1e-3)
    real = pair.discriminator(_images(BATCH, shape), y)
    fake = pair.discriminator(pair.generator(pair.sample_latent(BATCH), y), y)
    loss = F.binary_cross_entropy_with_logits(real, torch.ones(BATCH)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros(BATCH)
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {name for name, p in pair.named_parameters() if not torch.equal(before[name], p)}
    # Every parameter gets a gradient: G through D on the fakes, D on both.
    assert changed == set(before)


@pytest.mark.parametrize(("family", "options", "shape"), CASES)
def test_eval_mode_is_deterministic_and_per_sample(family, options, shape):
    pair = _pair(family, options, shape)
    y = _labels(pair)
    z = pair.sample_latent(BATCH)
    x = _images(BATCH, shape)
    with torch.no_grad():
        pair.discriminator(x, y)  # train-mode passes move batch-norm running statistics
        pair.generator(z, y)
        pair.eval()
        assert torch.equal(pair.generator(z, y), pair.generator(z, y))
        assert torch.equal(pair.discriminator(x, y), pair.discriminator(x, y))  # no dropout in eval
        one_y = None if y is None else y[:1]
        torch.testing.assert_close(pair.generator(z[:1], one_y), pair.generator(z, y)[:1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pair.discriminator(x[:1], one_y), pair.discriminator(x, y)[:1])


@pytest.mark.parametrize(("family", "options", "shape"), CASES)
def test_state_dict_round_trip(family, options, shape, tmp_path):
    pair = _pair(family, options, shape)
    y = _labels(pair)
    with torch.no_grad():
        pair.generator(pair.sample_latent(BATCH), y)  # non-trivial batch-norm buffers
    pair.eval()
    torch.save(pair.state_dict(), tmp_path / "pair.pt")
    fresh = _pair(family, options, shape, seed=123)
    fresh.load_state_dict(torch.load(tmp_path / "pair.pt", weights_only=True))
    fresh.eval()
    x = _images(BATCH, shape)
    with torch.no_grad():
        assert torch.equal(pair.discriminator(x, y), fresh.discriminator(x, y))
    a = pair.sample(BATCH, generator=torch.Generator().manual_seed(4))
    b = fresh.sample(BATCH, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize(("family", "options", "shape"), CASES)
def test_sample_shapes_range_and_truncation(family, options, shape):
    pair = _pair(family, options, shape).train()
    samples = pair.sample(7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (7, *shape) and samples.dtype == torch.float32 and not samples.requires_grad
    assert float(samples.min()) >= 0 and float(samples.max()) <= 1
    assert pair.training and pair.generator.training  # sample() restores the mode
    assert torch.equal(samples, pair.sample(7, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(samples, pair.sample(7, generator=torch.Generator().manual_seed(1)))
    # psi = 0: z = 0, so samples with the same label are identical.
    labels = [0, 1, 0, 1] if pair.conditional else None
    flat = pair.sample(4, psi=0.0, labels=labels)
    assert torch.equal(flat[0], flat[2]) and torch.equal(flat[1], flat[3])
    if pair.conditional:
        assert not torch.equal(flat[0], flat[1])  # the label alone changes the image
    else:
        assert torch.equal(flat[0], flat[1])
    z = pair.sample_latent(5, generator=torch.Generator().manual_seed(2), psi=0.5)
    torch.testing.assert_close(z, 0.5 * pair.sample_latent(5, generator=torch.Generator().manual_seed(2)))


def test_labels_are_checked():
    cond = _pair("cgan", {"channels": (8, 16)})
    assert cond.labels_tensor(None, 5).tolist() == [0, 1, 2, 0, 1]  # every class equally often
    assert cond.labels_tensor(np.array([2, 1]), 2).dtype == torch.long
    with pytest.raises(ValueError, match="labels"):
        cond.sample(2, labels=[0, 3])
    with pytest.raises(ValueError, match="labels"):
        cond.sample(3, labels=[0, 1])
    with pytest.raises(ValueError, match="no labels"):
        _pair("dcgan", {"channels": (8, 16)}).sample(2, labels=[0, 1])


def test_build_options_are_checked():
    assert build_gan("dcgan", (1, 28, 28), 8).channels == (64, 128)
    assert build_gan("gan", (1, 28, 28), 8).g_hidden == (256, 512, 1024)
    assert build_gan("cgan", (1, 28, 28), 8, num_classes=10).embed_dim == 10
    assert build_gan("dcgan", (3, 32, 32), 8, channels=[8, 16, 32]).sample(2).shape == (2, 3, 32, 32)
    with pytest.raises(KeyError, match="unknown GAN family"):
        build_gan("wgan", (1, 28, 28), 8)
    with pytest.raises(ValueError, match="num_classes"):
        build_gan("cgan", (1, 28, 28), 8)
    with pytest.raises(ValueError, match="cgan"):
        build_gan("dcgan", (1, 28, 28), 8, num_classes=10)
    with pytest.raises(ValueError, match="multiples"):
        build_gan("dcgan", (1, 30, 30), 8)
    with pytest.raises(ValueError, match="arch"):
        build_gan("cgan", (1, 28, 28), 8, num_classes=3, arch="resnet")
    with pytest.raises(ValueError, match="dropout"):
        build_gan("gan", (1, 28, 28), 8, dropout=1.0)
    with pytest.raises(TypeError):
        build_gan("gan", (1, 28, 28), 8, bogus=1)


def test_dcgan_initialisation():
    pair = build_gan("dcgan", (1, 28, 28), 16)
    for name, p in pair.named_parameters():
        if name.endswith("weight") and p.dim() > 1:
            assert abs(p.std().item() - 0.02) < 0.004, name  # N(0, 0.02), Radford et al. 2016
        elif name.endswith("weight"):
            assert abs(p.mean().item() - 1.0) < 0.01, name  # batch-norm scales ~ N(1, 0.02)


# --- the training loop ------------------------------------------------------------


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 1, 8, 8) in [0, 1]: one bright row per class, plus noise; labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    x = 0.1 * rng.random((n, 1, 8, 8))
    x[np.arange(n), 0, 2 * labels + 1, 1:-1] = 0.9
    return x.astype(np.float32), labels.astype(np.int64)


X, Y = _data(48, 0)
CFG = GanTrainingConfig(epochs=3, batch_size=16, lr_g=2e-3, lr_d=2e-3)
SMALL = {
    "cgan": {"channels": (4, 8), "embed_dim": 2},
    "dcgan": {"channels": (4, 8)},
    "gan": {"g_hidden": (16,), "d_hidden": (16,)},
}


def _fit(family: str = "cgan", cfg=CFG, seed: int = 0, checkpoint: Path | None = None, **kwargs):
    torch.manual_seed(seed)
    pair = build_gan(family, (1, 8, 8), 4, num_classes=K if family == "cgan" else None, **SMALL[family])
    labels = Y if family == "cgan" else None
    return fit_gan(
        pair, X, labels, cfg, seed=seed, device=torch.device("cpu"), checkpoint=checkpoint, progress=False, **kwargs
    )


@pytest.mark.parametrize("family", ["gan", "dcgan", "cgan"])
def test_fit_gan_trains_and_reports(family):
    torch.manual_seed(0)
    initial = build_gan(family, (1, 8, 8), 4, num_classes=K if family == "cgan" else None, **SMALL[family])
    reports, monitored = [], []

    def monitor(pair: GanPair, epoch: int) -> dict[str, float]:
        monitored.append(epoch)
        assert pair.training  # called straight after the epoch's steps
        return {"mean_pixel": float(pair.sample(8, generator=torch.Generator().manual_seed(0)).mean())}

    result = _fit(family, on_epoch=lambda report, pair: reports.append(report), monitor=monitor)
    assert result.epochs_run == 3 and result.resumed_from_epoch == 0
    assert result.train_steps == 3 * (48 // 16)
    assert 0 < result.compute_seconds <= result.wall_seconds
    assert not result.pair.training
    changed = [
        n
        for (n, a), b in zip(initial.state_dict().items(), result.pair.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    ]
    assert any(n.startswith("generator.") for n in changed) and any(n.startswith("discriminator.") for n in changed)
    assert monitored == [1, 2, 3]
    assert [r.epoch for r in reports] == [1, 2, 3] and reports[-1].step == 9
    for row, report in zip(result.history, reports, strict=True):
        for part in ("d_loss", "g_loss", "d_real", "d_fake"):
            assert np.isfinite(row[f"train_{part}"]) and row[f"train_{part}"] == report.train[part]
            assert len(report.steps[part]) == 3 and all(np.isfinite(report.steps[part]))
        for part in ("d_real", "d_fake"):
            assert all(0.0 <= v <= 1.0 for v in report.steps[part])
        assert row["mean_pixel"] == report.monitor["mean_pixel"]
        assert 0.0 <= row["mean_pixel"] <= 1.0


def test_same_seed_same_history_and_weights():
    a, b = _fit(), _fit()
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in a.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in b.history]
    for (name, pa), pb in zip(a.pair.state_dict().items(), b.pair.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = _fit(seed=1)
    assert c.history[-1]["train_g_loss"] != a.history[-1]["train_g_loss"]


def test_config_from_mapping_and_keyword_overrides():
    result = _fit(cfg={"epochs": 1, "batch_size": 16}, lr_d=1e-3, max_train_samples=20)
    assert result.epochs_run == 1 and result.train_steps == 20 // 16
    with pytest.raises(ValueError, match="bogus"):
        _fit(bogus=1)
    with pytest.raises(ValueError, match="beta1"):
        GanTrainingConfig(beta1=1.0)
    defaults = GanTrainingConfig()
    assert (defaults.lr_g, defaults.lr_d, defaults.beta1) == (2e-4, 2e-4, 0.5)  # the DCGAN recipe


def test_fit_gan_checks_its_data():
    torch.manual_seed(0)
    cond = build_gan("cgan", (1, 8, 8), 4, num_classes=K, **SMALL["cgan"])
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="needs labels"):
        fit_gan(cond, X, None, CFG, seed=0, device=cpu, progress=False)
    with pytest.raises(ValueError, match="labels must lie"):
        fit_gan(cond, X, Y + K, CFG, seed=0, device=cpu, progress=False)
    with pytest.raises(ValueError, match="images must be"):
        fit_gan(cond, X[:, :, :4], Y, CFG, seed=0, device=cpu, progress=False)
    plain = build_gan("dcgan", (1, 8, 8), 4, **SMALL["dcgan"])
    with pytest.raises(ValueError, match="no labels"):
        fit_gan(plain, X, Y, CFG, seed=0, device=cpu, progress=False)


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    ckpt = tmp_path / "gan.pt"
    first = _fit(checkpoint=ckpt)
    assert ckpt.exists()
    again = _fit(checkpoint=ckpt)
    assert again.resumed_from_epoch == CFG.epochs and again.train_steps == 0  # same run: nothing left to do
    assert again.history == first.history
    torch.manual_seed(0)
    pair = build_gan("cgan", (1, 8, 8), 4, num_classes=K, **SMALL["cgan"])
    x_other, y_other = _data(48, 5)
    other = fit_gan(pair, x_other, y_other, CFG, seed=0, device="cpu", checkpoint=ckpt, progress=False)
    assert other.resumed_from_epoch == 0 and other.train_steps == 9


def test_trained_pair_computes_as_the_pair_loaded_from_its_weights(tmp_path):
    # On CPU the DCGAN trains with channels-last convolutions; it is handed back in the usual
    # layout, so samples drawn right after training equal those of the reloaded pair.
    pair = _fit("dcgan").pair
    assert all(p.is_contiguous() for p in pair.parameters())
    torch.save(pair.state_dict(), tmp_path / "pair.pt")
    fresh = build_gan("dcgan", (1, 8, 8), 4, **SMALL["dcgan"])
    fresh.load_state_dict(torch.load(tmp_path / "pair.pt", weights_only=True))
    fresh.eval()
    a = pair.sample(BATCH, generator=torch.Generator().manual_seed(4))
    b = fresh.sample(BATCH, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_checkpoint_of_other_code_is_not_resumed(tmp_path, monkeypatch):
    from latentlab import adversarial

    ckpt = tmp_path / "gan.pt"
    first = _fit(checkpoint=ckpt)
    monkeypatch.setattr(adversarial, "code_digest", lambda: "another version of latentlab")
    again = _fit(checkpoint=ckpt)
    assert again.resumed_from_epoch == 0 and again.train_steps == first.train_steps


def resumable_run(checkpoint: Path, kill_after: int = -1) -> dict:
    """The run of the SIGKILL test: a conditional MLP GAN (dropout, z and labels all draw on
    the RNG state the checkpoint keeps) with a monitor; SIGKILLs itself after epoch ``kill_after``.
    Returns what must match between runs, JSON-ready."""
    import os

    def on_epoch(report, pair):
        if report.epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as hard as a crash gets

    def monitor(pair, epoch):
        return {"mean_pixel": float(pair.sample(6, generator=torch.Generator().manual_seed(epoch)).mean())}

    torch.manual_seed(0)
    pair = build_gan("cgan", (1, 8, 8), 4, num_classes=K, arch="mlp", g_hidden=[16], d_hidden=[16], embed_dim=2)
    cfg = GanTrainingConfig(epochs=4, batch_size=16, lr_g=2e-3, lr_d=2e-3, checkpoint_every=1)
    result = fit_gan(
        pair,
        X,
        Y,
        cfg,
        seed=0,
        device=torch.device("cpu"),
        checkpoint=checkpoint,
        on_epoch=on_epoch,
        monitor=monitor,
        progress=False,
    )
    return {
        "resumed": result.resumed_from_epoch,
        "history": [{k: v for k, v in row.items() if k != "seconds"} for row in result.history],
        "weights": {k: v.tolist() for k, v in result.pair.state_dict().items()},
    }


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_gan import resumable_run
    print(json.dumps(resumable_run(Path(sys.argv[1]), int(sys.argv[2]))))
    """
)


def _run(script: Path, ckpt: Path, kill_after: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), str(ckpt), str(kill_after)], capture_output=True, text=True, timeout=300
    )


def test_sigkilled_run_resumes_to_the_same_result(tmp_path):
    script = tmp_path / "train_gan.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    killed_ckpt = tmp_path / "killed.pt"
    first = _run(script, killed_ckpt, kill_after=3)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert killed_ckpt.exists()  # the epoch-2 checkpoint survived the kill
    # The resumed and the uninterrupted runs, in this process (one thread, as in the script):
    # what is tested is the checkpoint the killed process left, and more interpreter starts
    # would only cost time.
    a = json.loads(json.dumps(resumable_run(killed_ckpt)))
    b = json.loads(json.dumps(resumable_run(tmp_path / "straight.pt")))
    assert a["resumed"] == 2 and b["resumed"] == 0
    assert a["history"] == b["history"]
    assert a["weights"] == b["weights"]
    assert not list(tmp_path.glob(".*.tmp*"))  # no half-written checkpoint left behind
