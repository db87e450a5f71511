"""The training engine: determinism, early stopping, checkpoints, and resume after SIGKILL."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from latentlab import engine
from latentlab.config import TrainingConfig
from latentlab.models.base import Autoencoder, ModelOutput, build_model

torch.set_num_threads(1)


def _data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((4, 1, 8, 8)).astype(np.float32)
    return np.clip(base[rng.integers(0, 4, n)] + 0.05 * rng.normal(size=(n, 1, 8, 8)), 0, 1).astype(np.float32)


TRAIN, VAL = engine.TrainingData(_data(96, 0)), engine.TrainingData(_data(32, 1))
CFG = TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10)


def _fit(cfg: TrainingConfig = CFG, checkpoint: Path | None = None, seed: int = 0, family: str = "deep", **fit_options):
    torch.manual_seed(seed)
    model = build_model(family, (1, 8, 8), 3)
    return engine.fit(
        model,
        TRAIN,
        VAL,
        cfg,
        seed=seed,
        device=torch.device("cpu"),
        checkpoint=checkpoint,
        progress=False,
        **fit_options,
    )


@pytest.mark.parametrize("family", ["deep", "conv_plus"])  # conv_plus: channels-last oneDNN kernels on CPU
def test_same_seed_same_metrics_and_weights(family):
    a, b = _fit(family=family), _fit(family=family)
    assert a.history == [dict(h, seconds=a.history[i]["seconds"]) for i, h in enumerate(b.history)]
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = _fit(seed=1, family=family)
    assert c.history[-1]["val_loss"] != a.history[-1]["val_loss"]


def test_training_lowers_validation_loss_and_reports_every_part():
    result = _fit(TrainingConfig(epochs=6, batch_size=16, lr=0.01, patience=10), family="sparse")
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert {"train_loss", "train_reconstruction", "train_sparsity", "val_sparsity"} <= set(result.history[0])
    assert result.train_steps == 6 * 6  # 96 samples / 16 per step, 6 epochs
    assert 0 < result.compute_seconds <= result.wall_seconds


def test_early_stopping_restores_the_best_weights():
    # A learning rate this large makes validation loss worse after the first epochs.
    result = _fit(TrainingConfig(epochs=30, batch_size=16, lr=0.5, patience=2))
    assert result.stopped_early and result.epochs_run < 30
    assert result.epochs_run - result.best_epoch == 2
    best = min(h["val_loss"] for h in result.history)
    assert result.best_val_loss == best
    assert engine.evaluate_loss(result.model, VAL, torch.device("cpu"))["loss"] == pytest.approx(best, rel=1e-5)


def test_without_patience_every_epoch_runs_and_the_best_weights_are_kept():
    # The same diverging rate as above: with patience None the run does not stop early.
    result = _fit(TrainingConfig(epochs=12, batch_size=16, lr=0.5, patience=None))
    assert not result.stopped_early and result.epochs_run == 12
    assert result.best_epoch < 12  # validation loss rose after its best epoch
    best = min(h["val_loss"] for h in result.history)
    assert engine.evaluate_loss(result.model, VAL, torch.device("cpu"))["loss"] == pytest.approx(best, rel=1e-5)


def test_a_long_run_shows_about_a_hundred_evenly_spaced_epochs(caplog):
    # 96 samples / 16 = 6 steps an epoch: min_steps 1500 makes it 250 epochs, as tiny datasets get.
    caplog.set_level(logging.INFO, logger="latentlab.engine")
    due: list[int] = []
    result = _fit(
        TrainingConfig(epochs=1, min_steps=1500, batch_size=16, lr=0.001, patience=None),
        on_epoch=lambda report, model: due.append(report.epoch) if report.is_shown() else None,
    )
    assert result.epochs_run == 250
    assert due == [*range(3, 250, 3), 250]  # every ceil(250 / 100) = 3rd epoch, and the last
    logged = [int(r.getMessage().split()[1].rstrip(":")) for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert logged == due  # the log's epoch lines are the shown epochs
    short: list[int] = []
    _fit(on_epoch=lambda report, model: short.append(report.epoch) if report.is_shown() else None)
    assert short == [1, 2, 3, 4]  # a run of up to 100 epochs: every epoch


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    ckpt = tmp_path / "k3.pt"
    _fit(checkpoint=ckpt)
    assert ckpt.exists()
    again = _fit(checkpoint=ckpt)
    assert again.resumed_from_epoch == CFG.epochs and again.train_steps == 0  # same run: nothing left to do
    torch.manual_seed(0)
    model = build_model("deep", (1, 8, 8), 3)
    other = engine.fit(
        model,
        engine.TrainingData(_data(96, 5)),
        VAL,
        CFG,
        seed=0,
        device=torch.device("cpu"),
        checkpoint=ckpt,
        progress=False,
    )
    assert other.resumed_from_epoch == 0


def test_checkpoint_of_other_code_is_not_resumed(tmp_path, monkeypatch):
    # DVC reruns a stage when its code changes: a finished checkpoint of the old code must not
    # stand in for the new code's training (it once did, and stale metrics were committed).
    ckpt = tmp_path / "k3.pt"
    first = _fit(checkpoint=ckpt)
    assert _fit(checkpoint=ckpt).train_steps == 0  # same code: the finished run is reused
    monkeypatch.setattr(engine, "code_digest", lambda: "another version of latentlab")
    again = _fit(checkpoint=ckpt)
    assert again.resumed_from_epoch == 0 and again.train_steps == first.train_steps


def test_checkpoint_of_another_loss_weight_is_not_resumed(tmp_path):
    # spectrogram_loss_weight is set on the built model (level_weight), not a constructor
    # argument of the family: a finished run with another weight must not stand in for this one.
    ckpt = tmp_path / "k3.pt"

    def fit(weight: float) -> engine.FitResult:
        torch.manual_seed(0)
        model = build_model("deep", (1, 8, 8), 3, level_weight=weight)
        return engine.fit(model, TRAIN, VAL, CFG, seed=0, device=torch.device("cpu"), checkpoint=ckpt, progress=False)

    first = fit(8.0)
    assert fit(8.0).train_steps == 0  # the same weight: the finished run is reused
    again = fit(4.0)
    assert again.resumed_from_epoch == 0 and again.train_steps == first.train_steps


_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, json
    import numpy as np, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_engine import TRAIN, VAL
    from latentlab import engine
    from latentlab.config import TrainingConfig
    from latentlab.models.base import build_model

    kill_after, schedule, noise = int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    def on_epoch(report, model):
        if report.epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as hard as a crash gets

    torch.manual_seed(0)
    model = build_model("conv_plus", (1, 8, 8), 3)
    cfg = TrainingConfig(epochs=5, batch_size=16, lr=0.005, patience=10, checkpoint_every=1, lr_schedule=schedule,
                         input_noise=noise)
    result = engine.fit(model, TRAIN, VAL, cfg, seed=0, device=torch.device("cpu"),
                        checkpoint=__import__("pathlib").Path(sys.argv[1]), on_epoch=on_epoch, progress=False)
    weights = {{k: v.tolist() for k, v in result.model.state_dict().items()}}
    print(json.dumps({{"resumed": result.resumed_from_epoch, "best": result.best_val_loss,
                      "history": [h["val_loss"] for h in result.history],
                      "lr": [h["lr"] for h in result.history], "weights": weights}}))
    """
)


def _run(script: Path, ckpt: Path, kill_after: int, schedule: str, noise: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), str(ckpt), str(kill_after), schedule, str(noise)],
        capture_output=True,
        text=True,
        timeout=300,
    )


# The noisy case checks that the input noise, drawn from torch's RNG every step, is
# drawn alike after a resume (the checkpoint carries the RNG state).
@pytest.mark.parametrize(("schedule", "noise"), [("constant", 0.0), ("cosine", 0.0), ("cosine", 0.2)])
def test_sigkilled_run_resumes_to_the_same_result(tmp_path, schedule, noise):
    import json

    script = tmp_path / "train.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    killed_ckpt = tmp_path / "killed.pt"
    first = _run(script, killed_ckpt, kill_after=3, schedule=schedule, noise=noise)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert killed_ckpt.exists()  # the epoch-2 checkpoint survived the kill
    resumed = _run(script, killed_ckpt, kill_after=-1, schedule=schedule, noise=noise)
    assert resumed.returncode == 0, resumed.stderr
    straight = _run(script, tmp_path / "straight.pt", kill_after=-1, schedule=schedule, noise=noise)
    assert straight.returncode == 0, straight.stderr
    a, b = json.loads(resumed.stdout), json.loads(straight.stdout)
    assert a["resumed"] == 2 and b["resumed"] == 0
    assert a["history"] == b["history"] and a["best"] == b["best"]
    assert a["weights"] == b["weights"]
    # The resumed run continued the schedule where the killed one left it.
    assert a["lr"] == b["lr"] and len(set(a["lr"])) == (1 if schedule == "constant" else 5)
    assert not list(tmp_path.glob(".*.tmp*"))  # no half-written checkpoint left behind


def test_min_steps_gives_a_small_dataset_more_epochs():
    result = _fit(TrainingConfig(epochs=1, min_steps=12, batch_size=16, lr=0.01, patience=10))
    assert result.epochs_run == 2 and result.train_steps == 12  # 96 samples: 6 steps an epoch


def test_cosine_schedule_anneals_the_learning_rate_per_epoch():
    cfg = TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10, lr_schedule="cosine")
    # eta_e = lr * (1 + cos(pi * e / E)) / 2 for e = 0..3 of E = 4.
    expected = [0.01, 0.01 * (1 + np.cos(np.pi / 4)) / 2, 0.005, 0.01 * (1 + np.cos(3 * np.pi / 4)) / 2]
    assert [engine.learning_rate(cfg, e, 4) for e in range(4)] == pytest.approx(expected)
    assert engine.learning_rate(CFG, 3, 4) == CFG.lr  # constant

    result = _fit(cfg)
    assert [row["lr"] for row in result.history] == pytest.approx(expected)
    # The schedule changed the training: other weights than the constant rate's.
    constant = _fit(TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10))
    assert constant.history[-1]["val_loss"] != result.history[-1]["val_loss"]


def test_cosine_schedule_spans_the_epochs_min_steps_adds():
    # 96 samples, 16 a step: 6 steps an epoch; min_steps 24 makes 4 epochs of a 1-epoch config.
    cfg = TrainingConfig(epochs=1, min_steps=24, batch_size=16, lr=0.01, patience=10, lr_schedule="cosine")
    result = _fit(cfg)
    assert [row["lr"] for row in result.history] == pytest.approx([engine.learning_rate(cfg, e, 4) for e in range(4)])
    assert result.history[-1]["lr"] < 0.002


class _Recorder(Autoencoder):
    """A model that keeps the (input, target) pairs a training step hands its forward."""

    def __init__(self) -> None:
        super().__init__((1, 8, 8), 3)
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, target=None):
        self.seen.append((x.detach().clone(), target))
        loss = ((self.scale * x - (x if target is None else target)) ** 2).mean()
        return ModelOutput(loss=loss, parts={}, reconstruction=self.scale * x)


def test_input_noise_corrupts_the_inputs_afresh_and_keeps_clean_targets():
    inputs, index = torch.from_numpy(TRAIN.inputs), torch.arange(32)
    model = _Recorder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    step = engine._eager_step(model, optimizer, inputs, None, torch.device("cpu"), False, input_noise=0.2)
    step(index)
    step(index)
    (x1, t1), (x2, t2) = model.seen
    assert torch.equal(t1, inputs[index]) and torch.equal(t2, inputs[index])  # the clean batch is the target
    noise = x1 - t1  # 32 x 64 = 2,048 draws of N(0, 0.2^2): std within 10%, mean near 0
    assert float(noise.std()) == pytest.approx(0.2, rel=0.1) and abs(float(noise.mean())) < 0.03
    assert not torch.equal(x1, x2)  # fresh noise each step

    # Denoising data keeps its own targets; without input noise the batch goes through as it is.
    targets = torch.zeros_like(inputs)
    engine._eager_step(model, optimizer, inputs, targets, torch.device("cpu"), False, input_noise=0.2)(index)
    assert torch.equal(model.seen[-1][1], targets[index])
    engine._eager_step(model, optimizer, inputs, None, torch.device("cpu"), False)(index)
    assert torch.equal(model.seen[-1][0], inputs[index]) and model.seen[-1][1] is None


def test_input_noise_changes_training_but_not_validation():
    noisy = _fit(TrainingConfig(epochs=4, batch_size=16, lr=0.01, patience=10, input_noise=0.3))
    clean = _fit()
    assert noisy.history[-1]["train_loss"] != clean.history[-1]["train_loss"]
    # Validation is scored on the uncorrupted images.
    assert noisy.best_val_loss == pytest.approx(engine.evaluate_loss(noisy.model, VAL, torch.device("cpu"))["loss"])


def test_loaded_optimiser_state_keeps_this_runs_flags_and_parameter_layout():
    # A checkpoint from an NCHW run loaded where the weights are channels-last (GPU graphs).
    conv = torch.nn.Conv2d(3, 4, 3)
    source = torch.optim.AdamW(conv.parameters())
    conv(torch.rand(2, 3, 6, 6)).sum().backward()
    source.step()
    saved = source.state_dict()
    conv.to(memory_format=torch.channels_last)
    target = torch.optim.AdamW(conv.parameters(), foreach=False)
    plain = torch.optim.AdamW(conv.parameters())
    plain.load_state_dict(saved)
    assert plain.state[conv.weight]["exp_avg"].stride() != conv.weight.stride()  # what load_state_dict leaves
    engine._load_optimizer_state(target, saved)
    assert target.param_groups[0]["foreach"] is False  # this optimiser's kernel flags, not the checkpoint's
    for name in ("exp_avg", "exp_avg_sq"):
        moved = target.state[conv.weight][name]
        assert moved.stride() == conv.weight.stride()
        assert torch.equal(moved, source.state[source.param_groups[0]["params"][0]][name])  # same values by index


def test_channels_last_only_where_it_was_measured_faster():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    conv, mlp = build_model("conv", (1, 8, 8), 3), build_model("deep", (1, 8, 8), 3)
    assert engine.prefers_channels_last(conv, cpu, graphed=False)
    assert engine.prefers_channels_last(conv, gpu, graphed=True)
    assert not engine.prefers_channels_last(conv, gpu, graphed=False)  # eager GPU steps: slower with it
    assert not engine.prefers_channels_last(mlp, cpu, graphed=False)  # no convolution: nothing to gain


@pytest.mark.parametrize("family", ["conv", "conv_plus"])
def test_channels_last_training_matches_nchw_training(family, monkeypatch):
    # Only the memory layout differs: a weight or moment read in the wrong element order would
    # send the run elsewhere, while kernel rounding stays far below the tolerance.
    def first_conv_weight(model: torch.nn.Module) -> torch.Tensor:
        # One with several input channels: with one, both layouts are the same memory.
        return next(p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1)

    layouts: list[bool] = []  # channels-last during each epoch?

    def record_layout(report: engine.EpochReport, model: torch.nn.Module) -> None:
        layouts.append(first_conv_weight(model).is_contiguous(memory_format=torch.channels_last))

    nhwc = _fit(family=family, on_epoch=record_layout)
    assert layouts == [True] * CFG.epochs
    # Returned in the usual layout, so that it computes exactly as the model loaded from its weights.
    assert first_conv_weight(nhwc.model).is_contiguous()
    assert not first_conv_weight(nhwc.model).is_contiguous(memory_format=torch.channels_last)
    layouts.clear()
    monkeypatch.setattr(engine, "prefers_channels_last", lambda *args: False)
    nchw = _fit(family=family, on_epoch=record_layout)
    assert layouts == [False] * CFG.epochs

    def largest_deviation(run: engine.FitResult, key: str) -> float:
        return max(abs(b[key] / a[key] - 1) for a, b in zip(nchw.history, run.history, strict=True))

    # Measured: below 2e-5 (train) and 6e-4 (validation, where conv_plus's BatchNorm carries the
    # kernels' rounding into its running statistics); another seed's largest is 6e-2 to 1.4e-1.
    assert largest_deviation(nhwc, "train_loss") < 1e-4
    assert largest_deviation(nhwc, "val_loss") < 2e-3
    assert largest_deviation(_fit(family=family, seed=1), "val_loss") > 2e-2


def test_trained_model_computes_as_the_model_loaded_from_its_weights(tmp_path):
    result = _fit(family="conv_plus")
    engine.save_model(
        result.model, tmp_path / "model.pt", {"family": "conv_plus", "sample_shape": [1, 8, 8], "latent_dim": 3}
    )
    loaded, _ = engine.load_model(tmp_path / "model.pt")
    x = VAL.inputs
    assert np.array_equal(
        engine.reconstruct(result.model, x, torch.device("cpu")), engine.reconstruct(loaded, x, torch.device("cpu"))
    )
