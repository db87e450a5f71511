"""The engine's GPU paths: CUDA-graph replay with a cosine schedule and input noise, bf16 autocast.

These run only where CUDA is present (CI has none; they are run on a lent GPU).
Each compares a CUDA-graph run with the eager run of the same seed, or checks
what a graph could silently get wrong: a learning rate or a noise draw baked in
at capture time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentlab import engine
from latentlab.config import TrainingConfig
from latentlab.models.base import Autoencoder, ModelOutput, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_fp32(monkeypatch):
    # cuDNN convolutions run in TF32 by default, and a graphed run (channels-last) picks other
    # kernels than an eager one: their 10-bit-mantissa rounding would differ by far more than
    # a float32 comparison can tell from a real fault. True float32 on both sides.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    # The matmul switch through its public setter: newer torch no longer exposes
    # torch.backends.cuda.matmul.allow_tf32 as a plain attribute.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def _data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((4, 1, 8, 8)).astype(np.float32)
    return np.clip(base[rng.integers(0, 4, n)] + 0.05 * rng.normal(size=(n, 1, 8, 8)), 0, 1).astype(np.float32)


# 128 samples in steps of 32: every step is a full batch, so a graphed run replays every step.
TRAIN, VAL = engine.TrainingData(_data(128, 0)), engine.TrainingData(_data(32, 1))


def _fit(
    cfg: TrainingConfig,
    family: str = "conv",
    seed: int = 0,
    *,
    train: engine.TrainingData = TRAIN,
    device: torch.device = CUDA,
    **fit_options,
) -> engine.FitResult:
    torch.manual_seed(seed)
    model = build_model(family, (1, 8, 8), 3)
    return engine.fit(model, train, VAL, cfg, seed=seed, device=device, progress=False, **fit_options)


def _cfg(**kw) -> TrainingConfig:
    # lr 0.003: at 0.01 the deep model's sigmoid saturates within two epochs on this data and
    # stops learning, and a run that learns nothing cannot tell one schedule from another.
    return TrainingConfig(**{"epochs": 6, "batch_size": 32, "lr": 0.003, "patience": 10, "amp": False, **kw})


@pytest.mark.parametrize("family", ["conv", "conv_plus", "deep"])
@pytest.mark.parametrize("amp", [False, True])
def test_graphed_run_follows_the_eager_run(family, amp):
    # Same seed, same batches: the graph's warm-up must leave no trace (optimiser state,
    # BatchNorm statistics), so the two runs differ only by kernel-level rounding.
    eager = _fit(_cfg(amp=amp), family)
    graphed = _fit(_cfg(amp=amp, cuda_graph=True), family)
    tol = 0.05 if amp else 1e-3  # bf16 rounding compounds over 24 steps
    for a, b in zip(eager.history, graphed.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=tol)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=tol)
    assert graphed.train_steps == eager.train_steps == 6 * 4


def test_graphed_cosine_schedule_is_applied_at_every_epoch():
    # A learning rate baked into the graph at capture would train every epoch at the first
    # epoch's rate; the graphed run would then follow the constant-rate run, not the cosine one.
    cosine = _cfg(lr_schedule="cosine", epochs=8)
    eager, graphed = _fit(cosine, "deep"), _fit(cosine.model_copy(update={"cuda_graph": True}), "deep")
    constant = _fit(_cfg(epochs=8, cuda_graph=True), "deep")
    assert [h["lr"] for h in graphed.history] == [engine.learning_rate(cosine, e, 8) for e in range(8)]
    for a, b in zip(eager.history, graphed.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert constant.history[-1]["train_loss"] != pytest.approx(graphed.history[-1]["train_loss"], rel=1e-2)


class _Probe(Autoencoder):
    """Loss = mean squared difference between input and target: with clean targets, the noise power."""

    def __init__(self) -> None:
        super().__init__((1, 8, 8), 1)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, target=None):
        target = x if target is None else target
        loss = ((x - target) ** 2).mean() + 0.0 * self.w.sum()
        return ModelOutput(loss=loss, parts={"noise_power": loss.detach()}, reconstruction=x)


def test_graphed_input_noise_is_drawn_afresh_at_every_replay():
    sigma = 0.2
    model = _Probe()
    cfg = _cfg(epochs=3, cuda_graph=True, input_noise=sigma)
    steps: list[list[float]] = []
    keep = lambda report, model: steps.append(report.steps["loss"])  # noqa: E731
    result = engine.fit(model, TRAIN, VAL, cfg, seed=0, device=CUDA, progress=False, on_epoch=keep)
    powers = np.concatenate(steps)
    assert len(powers) == 3 * 4
    # Each step's loss is the mean of 32 x 64 squared N(0, 0.2^2) draws: near 0.04, never twice the same.
    assert np.allclose(powers, sigma**2, rtol=0.15)
    assert len(np.unique(powers)) == len(powers)
    assert result.history[-1]["val_loss"] == 0.0  # validation sees no noise


def test_partial_last_batch_runs_eagerly_beside_the_graph():
    # 100 samples in steps of 32: three replays and one eager step of 4 per epoch. Were the
    # short batch dropped, padded or pushed through the graph's full-size buffers, the graphed
    # run would leave the eager run of the same seed (a comparison, not "the loss falls",
    # which three epochs of this tiny set do not show reliably).
    train = engine.TrainingData(_data(100, 0))
    cfg = _cfg(epochs=3, lr_schedule="cosine")
    eager = _fit(cfg, "deep", train=train)
    graphed = _fit(cfg.model_copy(update={"cuda_graph": True}), "deep", train=train)
    assert graphed.train_steps == eager.train_steps == 3 * 4
    for a, b in zip(eager.history, graphed.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    # Input noise on the short batch too: drawn eagerly beside the graph's own draws.
    noisy = _fit(cfg.model_copy(update={"cuda_graph": True, "input_noise": 0.1}), "deep", train=train)
    assert noisy.train_steps == 3 * 4
    assert np.isfinite([h["train_loss"] for h in noisy.history]).all()
    assert noisy.history[-1]["train_loss"] != pytest.approx(graphed.history[-1]["train_loss"], rel=1e-3)


@pytest.mark.parametrize("first_device", ["cpu", "cuda"])
def test_checkpoint_resumes_under_a_graph_in_channels_last(tmp_path, monkeypatch, first_device):
    # A run stopped after its first epoch, resumed on the GPU under a CUDA graph (channels-last
    # weights). From the CPU (unfused AdamW): the optimiser's kernel flags must be this run's.
    # From a GPU run kept in NCHW: the optimiser moments must follow their parameters' new
    # layout, or the fused AdamW would pair the wrong elements.
    cfg = _cfg(epochs=3, cuda_graph=True)
    checkpoint = tmp_path / "ckpt.pt"

    def stop_after_first(report: engine.EpochReport, model: Autoencoder) -> None:
        if report.epoch == 2:
            raise KeyboardInterrupt

    first = torch.device(first_device)
    with monkeypatch.context() as patch:
        if first_device == "cuda":
            patch.setattr(engine, "prefers_channels_last", lambda *args: False)
        with pytest.raises(KeyboardInterrupt):
            _fit(cfg, device=first, checkpoint=checkpoint, on_epoch=stop_after_first)
    resumed = _fit(cfg, checkpoint=checkpoint)
    whole = _fit(cfg, device=first)
    assert resumed.resumed_from_epoch == 1
    # Devices and layouts round differently; a mis-paired moment would be off by far more.
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
