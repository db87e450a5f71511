"""Training: a denoising model's pairs (one corruption or several, rows aligned with the clean
targets), and how an epoch's losses are logged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentlab.config import parse_params
from latentlab.data.store import load_split, to_unit_float
from latentlab.errors import ConfigError
from latentlab.paths import ProjectPaths
from tests.conftest import tiny_params, write_bar_dataset, write_tone_spectrograms


def _project(root: Path, denoise_from: object):
    """Processed bar images and their corruptions; ``denoising`` learns from ``denoise_from``."""
    from latentlab.corrupt import corrupt_dataset

    raw = tiny_params(root, {"bars": {"kind": "idx", "path": str(root / "unused")}})
    raw["train"]["zoo"]["denoising"]["denoise_from"] = denoise_from
    params = parse_params(raw)
    paths = ProjectPaths(root)
    write_bar_dataset(paths.processed("bars"), "bars", {"train": 20, "val": 4, "test": 6})
    corrupt_dataset("bars", paths.processed("bars"), paths.corrupted("bars"), params.corrupt)
    return params, paths


def test_several_corruptions_give_every_sample_once_per_corruption(tmp_path: Path):
    from latentlab.corrupt import load_corruption
    from latentlab.train import subsample_index, training_pairs

    names = ["gaussian_sigma0.3", "salt_pepper0.2"]
    params, paths = _project(tmp_path, {"image": names, "spectrogram": "white_snr5db"})
    spec = params.train.spec("denoising")
    assert spec.corruptions_for("image") == tuple(names)
    assert spec.corruptions_for("spectrogram") == ("white_snr5db",)

    inputs, targets, labels = training_pairs(paths, "bars", spec, "train", limit=25, seed=0)
    clean = load_split(paths.processed("bars"), "train")
    kept = subsample_index(len(clean), 25, seed=0)  # 25 of the 60 training images
    n = len(kept)
    assert inputs.shape == (2 * n, *clean.x.shape[1:]) and targets.shape == inputs.shape
    assert inputs.dtype == np.float32 and targets.dtype == np.float32
    # The kept rows once per corruption: the clean targets and labels repeat, the inputs are
    # each corruption's copy of those rows, in the listed order.
    np.testing.assert_array_equal(targets, np.concatenate([to_unit_float(clean.x[kept])] * 2))
    np.testing.assert_array_equal(labels, np.concatenate([clean.y[kept]] * 2))
    for half, name in enumerate(names):
        noisy = load_corruption(paths.corrupted("bars"), name, "train").x
        np.testing.assert_array_equal(inputs[half * n : (half + 1) * n], to_unit_float(noisy[kept]))
    assert not np.array_equal(inputs[:n], inputs[n:])


def test_noise_draws_give_every_clip_once_per_draw_and_corruption(tmp_path: Path):
    """corrupt.audio_train_draws = 3 with two noises: 6 noisy copies of each kept training clip, one of each val clip."""
    from latentlab.corrupt import corrupt_dataset, load_corruption
    from latentlab.train import subsample_index, training_pairs

    names = ["white_snr5db", "babble_snr5db"]
    raw = tiny_params(tmp_path, {"digits": {"kind": "speech", "path": str(tmp_path / "unused")}})
    raw["corrupt"] |= {"audio_train_draws": 3, "babble_speakers": 2}
    raw["train"]["zoo"]["denoising"]["denoise_from"] = {"image": "gaussian_sigma0.3", "spectrogram": names}
    params = parse_params(raw)
    paths = ProjectPaths(tmp_path)
    write_tone_spectrograms(paths.processed("digits"))
    corrupt_dataset("digits", paths.processed("digits"), paths.corrupted("digits"), params.corrupt)
    spec = params.train.spec("denoising")

    inputs, targets, labels = training_pairs(paths, "digits", spec, "train", limit=10, seed=0)
    clean = load_split(paths.processed("digits"), "train")
    kept = subsample_index(len(clean), 10, seed=0)
    n = len(kept)
    assert inputs.shape == targets.shape == (2 * 3 * n, *clean.x.shape[1:])
    np.testing.assert_array_equal(targets, np.tile(to_unit_float(clean.x[kept]), (6, 1, 1, 1)))
    np.testing.assert_array_equal(labels, np.tile(clean.y[kept], 6))
    for c, name in enumerate(names):
        split = load_corruption(paths.corrupted("digits"), name, "train")
        assert split.x_draws is not None
        for d, draw in enumerate([split.x, *split.x_draws]):
            block = inputs[(3 * c + d) * n : (3 * c + d + 1) * n]
            np.testing.assert_array_equal(block, to_unit_float(draw[kept]))

    v_in, v_target, _ = training_pairs(paths, "digits", spec, "val", limit=None, seed=0)
    assert v_in.shape == v_target.shape == (2 * 6, *clean.x.shape[1:])


def test_one_corruption_name_and_a_missing_one(tmp_path: Path):
    from latentlab.train import training_pairs

    params, paths = _project(tmp_path, {"image": "gaussian_sigma0.3", "spectrogram": "white_snr5db"})
    spec = params.train.spec("denoising")
    inputs, targets, _ = training_pairs(paths, "bars", spec, "val", limit=None, seed=0)
    assert inputs.shape == targets.shape == (12, 1, 8, 8)

    missing = spec.model_copy(update={"denoise_from": {"image": ("gaussian_sigma0.3", "gaussian_sigma0.9")}})
    with pytest.raises(ConfigError, match=r"no corruption 'gaussian_sigma0.9' in .*corrupted/bars"):
        training_pairs(paths, "bars", missing, "val", limit=None, seed=0)


def test_saved_models_name_their_corruptions_as_a_list_or_one_name():
    from latentlab.evaluate import _denoise_from

    assert _denoise_from({}) == () and _denoise_from({"denoise_from": None}) == ()
    assert _denoise_from({"denoise_from": "white_snr5db"}) == ("white_snr5db",)  # saved before lists
    assert _denoise_from({"denoise_from": ["white_snr5db", "babble_snr5db"]}) == ("white_snr5db", "babble_snr5db")


def test_epoch_losses_go_to_one_series_per_part_at_their_step_numbers():
    from types import SimpleNamespace

    from latentlab.train import log_epoch_losses

    class Recorder:
        def __init__(self) -> None:
            self.series: list[tuple[str, list[float], int]] = []
            self.metrics: list[tuple[dict, int]] = []

        def log_series(self, key: str, values: list[float], start_step: int = 0) -> None:
            self.series.append((key, list(values), start_step))

        def log_metrics(self, metrics: dict, step: int = 0) -> None:
            self.metrics.append((metrics, step))

    # Epoch 3 ran steps 7..10 (10 steps so far, 4 this epoch).
    report = SimpleNamespace(epoch=3, step=10, steps={"loss": [4.0, 3.0, 2.0, 1.0], "kl": [0.1, 0.2, 0.3, 0.4]})
    run = Recorder()
    log_epoch_losses(run, report, "k2.", train={"loss": 2.5}, val={"loss": 2.0})  # type: ignore[arg-type]
    assert run.series == [("k2.step.loss", [4.0, 3.0, 2.0, 1.0], 6), ("k2.step.kl", [0.1, 0.2, 0.3, 0.4], 6)]
    assert run.metrics == [({"k2.train": {"loss": 2.5}, "k2.val": {"loss": 2.0}}, 3)]

    gan = Recorder()
    log_epoch_losses(gan, SimpleNamespace(epoch=1, step=2, steps={"d_loss": [0.7, 0.6]}), monitor={"coverage": 1.0})  # type: ignore[arg-type]
    assert gan.series == [("step.d_loss", [0.7, 0.6], 0)]
    assert gan.metrics == [({"monitor": {"coverage": 1.0}}, 1)]
