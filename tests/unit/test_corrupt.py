"""The corrupt stage: noise models measured on synthetic data, determinism, file layout, atomicity."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from latentlab import corrupt
from latentlab.config import CorruptConfig, format_level
from latentlab.corrupt import (
    add_noise_at_snr,
    babble_noise,
    block_occlusion,
    corrupt_dataset,
    corruption_rng,
    gaussian_noise,
    load_corruption,
    load_corruption_manifest,
    measured_snr_db,
    random_mask,
    salt_and_pepper,
    white_noise,
)
from latentlab.data.store import Manifest, SplitArrays, save_manifest, save_split
from latentlab.errors import ConfigError, DataError
from tests.conftest import tone_clips, write_tone_spectrograms


def _grey(n: int = 200, c: int = 1, size: int = 28) -> np.ndarray:
    """Mid-grey images: additive noise of small sigma never clips, and any salt or pepper changes a pixel."""
    return np.full((n, c, size, size), 0.5, dtype=np.float32)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ images
def test_gaussian_residual_std_matches_sigma() -> None:
    x = _grey()
    noisy = gaussian_noise(x, 0.05, _rng())
    assert noisy.shape == x.shape and noisy.dtype == np.float32
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0
    residual = noisy - x
    assert abs(residual.std() - 0.05) < 0.001
    assert abs(residual.mean()) < 0.001


def test_gaussian_clips_to_unit_range() -> None:
    noisy = gaussian_noise(_grey(20), 1.0, _rng())
    assert noisy.min() == 0.0 and noisy.max() == 1.0


def test_salt_and_pepper_fraction_and_values() -> None:
    x = _grey(200, c=3)
    noisy = salt_and_pepper(x, 0.3, _rng())
    changed = np.any(noisy != x, axis=1)  # (N, H, W): positions
    assert abs(changed.mean() - 0.3) < 0.01
    values = noisy.transpose(0, 2, 3, 1)[changed]  # (changed positions, C)
    assert set(np.unique(values)) <= {0.0, 1.0}
    # all channels of a position take the same value, and salt and pepper are equally likely
    assert np.all(values == values[:, :1])
    assert abs(values[:, 0].mean() - 0.5) < 0.02
    assert np.array_equal(
        noisy[~np.broadcast_to(changed[:, None], x.shape)], x[~np.broadcast_to(changed[:, None], x.shape)]
    )


def test_random_mask_fraction_and_mask() -> None:
    x = _grey(200, c=2)
    masked, keep = random_mask(x, 0.4, _rng())
    assert keep.shape == (200, 1, 28, 28) and keep.dtype == bool
    assert abs((1 - keep.mean()) - 0.4) < 0.01
    assert np.all(masked[np.broadcast_to(~keep, x.shape)] == 0.0)
    assert np.all(masked[np.broadcast_to(keep, x.shape)] == 0.5)


def test_block_occlusion_zeros_exactly_the_block() -> None:
    x = _grey(50, c=3, size=20)
    occluded, corners = block_occlusion(x, 7, _rng())
    assert corners.shape == (50, 2) and corners.dtype.kind == "i"
    assert corners.min() >= 0 and corners.max() <= 20 - 7
    for image, (top, left) in zip(occluded, corners, strict=True):
        zero = image == 0.0
        assert zero.sum() == 3 * 7 * 7
        assert np.all(zero[:, top : top + 7, left : left + 7])
    # positions vary (uniform over the 14 x 14 placements)
    assert len({tuple(c) for c in corners}) > 25


def test_block_occlusion_full_image_and_oversize() -> None:
    occluded, corners = block_occlusion(_grey(3, size=8), 8, _rng())
    assert np.all(occluded == 0.0) and np.all(corners == 0)
    with pytest.raises(ConfigError, match=r"corrupt\.block_size"):
        block_occlusion(_grey(3, size=8), 9, _rng())


def test_same_generator_seed_same_result() -> None:
    x = _grey(10)
    assert np.array_equal(gaussian_noise(x, 0.2, _rng(3)), gaussian_noise(x, 0.2, _rng(3)))
    assert not np.array_equal(gaussian_noise(x, 0.2, _rng(3)), gaussian_noise(x, 0.2, _rng(4)))


# ------------------------------------------------------------------- audio
@pytest.mark.parametrize("snr", [-5.0, 0.0, 5.0, 20.0])
def test_white_noise_reaches_target_snr(snr: float) -> None:
    clean = tone_clips(12)
    noisy = add_noise_at_snr(clean, white_noise(clean.shape, _rng()), snr)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    measured = measured_snr_db(clean, noisy)
    assert np.all(np.abs(measured - snr) < 0.5)
    assert np.all(np.abs(measured - snr) < 1e-3)  # exact up to float32 rounding


def test_babble_noise_reaches_target_snr() -> None:
    clean = tone_clips(12)
    noise = babble_noise(clean, len(clean), 4, _rng())
    noisy = add_noise_at_snr(clean, noise, 5.0)
    assert np.all(np.abs(measured_snr_db(clean, noisy) - 5.0) < 0.5)


def test_babble_uses_distinct_other_utterances_at_unit_power() -> None:
    # Utterance j is a marker at sample j only: a noise row's support names the utterances in it.
    n, speakers = 30, 4
    pool = np.zeros((n, 64), dtype=np.float32)
    pool[np.arange(n), np.arange(n)] = np.linspace(0.1, 0.9, n)
    noise = babble_noise(pool, n, speakers, _rng())
    used = noise[:, :n] != 0
    assert np.all(used.sum(axis=1) == speakers)  # distinct utterances
    assert not np.any(used[np.arange(n), np.arange(n)])  # never the utterance itself
    # each utterance scaled to unit power (mean square over 64 samples): value sqrt(64) = 8
    assert np.allclose(noise[:, :n][used], 8.0, rtol=1e-6)
    # over the split, every other utterance gets used
    assert used.any(axis=0).all()


def test_babble_skips_silent_utterances_and_checks_pool_size() -> None:
    pool = tone_clips(6)
    pool[2] = 0.0
    noise = babble_noise(pool, 6, 4, _rng())  # 5 usable; rows in the pool have exactly 4 others
    assert noise.shape == (6, 4000)
    with pytest.raises(ConfigError, match=r"corrupt\.babble_speakers"):
        babble_noise(pool, 6, 5, _rng())


def test_babble_with_speakers_equal_to_pool_minus_one() -> None:
    pool = np.eye(5, 8, dtype=np.float32)
    noise = babble_noise(pool, 5, 4, _rng())
    used = noise[:, :5] != 0
    assert np.array_equal(used, ~np.eye(5, dtype=bool))


def test_silent_clips_are_left_unchanged() -> None:
    clean = tone_clips(4)
    clean[1] = 0.0
    noisy = add_noise_at_snr(clean, white_noise(clean.shape, _rng()), 0.0)
    assert np.array_equal(noisy[1], clean[1])
    snr = measured_snr_db(clean, noisy)
    assert np.isnan(snr[1]) and np.all(np.abs(snr[[0, 2, 3]]) < 1e-3)


# -------------------------------------------------------- corrupt_dataset
def _image_dataset(
    folder: Path, counts: dict[str, int] | None = None, shape: tuple[int, int, int] = (1, 12, 12)
) -> Path:
    counts = counts or {"train": 40, "val": 10, "test": 12}
    rng = np.random.default_rng(7)
    for split, n in counts.items():
        x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        save_split(folder, split, SplitArrays(x=x, y=rng.integers(0, 3, n), ids=np.arange(n)))
    save_manifest(folder, Manifest("tiny", "image", shape, ("a", "b", "c"), counts, {"kind": "test"}))
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


IMAGE_CFG = CorruptConfig(gaussian_sigma=(0.1, 0.3), salt_pepper_amount=(0.2,), mask_fraction=(0.5,), block_size=(4,))


def test_corrupt_images_end_to_end(tmp_path: Path) -> None:
    processed = _image_dataset(tmp_path / "processed")
    out = tmp_path / "corrupted"
    manifest = corrupt_dataset("tiny", processed, out, IMAGE_CFG)
    names = ["gaussian_sigma0.1", "gaussian_sigma0.3", "salt_pepper0.2", "mask0.5", "block4"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.npz" for n in names] + ["manifest.json"])
    assert [c["name"] for c in manifest["corruptions"]] == names
    assert load_corruption_manifest(out) == json.loads(json.dumps(manifest))
    assert manifest["seed"] == 0 and manifest["counts"] == {"train": 40, "val": 10, "test": 12}
    by_name = {c["name"]: c for c in manifest["corruptions"]}
    assert by_name["mask0.5"]["kind"] == "mask" and by_name["mask0.5"]["parameter"] == "fraction"
    assert by_name["mask0.5"]["level"] == 0.5 and by_name["mask0.5"]["file"] == "mask0.5.npz"
    assert set(by_name["gaussian_sigma0.3"]["stats"]["train"]) >= {"noise_std", "effective_std"}
    assert abs(by_name["gaussian_sigma0.3"]["stats"]["train"]["noise_std"] - 0.3) < 0.02
    assert abs(by_name["salt_pepper0.2"]["stats"]["train"]["hit_fraction"] - 0.2) < 0.03
    assert abs(by_name["mask0.5"]["stats"]["test"]["dropped_fraction"] - 0.5) < 0.05

    with np.load(out / "mask0.5.npz") as data:
        assert sorted(data.files) == sorted(f"{s}_{k}" for s in ("train", "val", "test") for k in ("x", "mask"))
        assert data["train_mask"].dtype == np.uint8 and data["train_mask"].shape == (40, 18)  # 144 bits packed
    clean = np.load(processed / "val.npz")["x"]
    masked = load_corruption(out, "mask0.5", "val")
    assert masked.x.dtype == np.uint8 and masked.x.shape == clean.shape
    assert masked.mask is not None and masked.mask.shape == (10, 1, 12, 12)
    assert np.array_equal(masked.x, np.where(masked.mask, clean, 0))
    assert masked.block is None and masked.audio is None
    region = masked.corrupted_region()
    assert region is not None and np.array_equal(region, ~masked.mask)

    block = load_corruption(out, "block4", "test")
    assert block.block is not None and block.block.shape == (12, 2) and block.block_size == 4
    region = block.corrupted_region()
    assert region is not None and np.all(region.sum(axis=(1, 2, 3)) == 16)
    assert np.all(block.x[region] == 0)
    clean_test = np.load(processed / "test.npz")["x"]
    assert np.array_equal(block.x[~region], clean_test[~region])

    noisy = load_corruption(out, "gaussian_sigma0.3", "train")
    assert noisy.mask is None and noisy.block is None and noisy.corrupted_region() is None


def test_only_configured_splits(tmp_path: Path) -> None:
    processed = _image_dataset(tmp_path / "processed")
    manifest = corrupt_dataset("tiny", processed, tmp_path / "out", CorruptConfig(splits=("test",), block_size=(4,)))
    assert manifest["splits"] == ["test"]
    with np.load(tmp_path / "out" / "gaussian_sigma0.3.npz") as data:
        assert data.files == ["test_x"]
    with pytest.raises(DataError, match="no split 'train'"):
        load_corruption(tmp_path / "out", "gaussian_sigma0.3", "train")
    with pytest.raises(DataError, match="missing"):
        load_corruption(tmp_path / "out", "gaussian_sigma9", "test")


def test_same_seed_identical_files_other_seed_differs(tmp_path: Path) -> None:
    processed = _image_dataset(tmp_path / "processed")
    corrupt_dataset("tiny", processed, tmp_path / "a", IMAGE_CFG)
    corrupt_dataset("tiny", processed, tmp_path / "b", IMAGE_CFG)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # byte-identical, manifest included

    corrupt_dataset("tiny", processed, tmp_path / "c", IMAGE_CFG.model_copy(update={"seed": 1}))
    for name in ("gaussian_sigma0.1", "salt_pepper0.2", "mask0.5", "block4"):
        a = load_corruption(tmp_path / "a", name, "train").x
        c = load_corruption(tmp_path / "c", name, "train").x
        assert not np.array_equal(a, c), name


def test_adding_a_level_keeps_the_others(tmp_path: Path) -> None:
    processed = _image_dataset(tmp_path / "processed")
    corrupt_dataset("tiny", processed, tmp_path / "a", IMAGE_CFG)
    more = IMAGE_CFG.model_copy(
        update={"gaussian_sigma": (0.05, 0.1, 0.3), "mask_fraction": (0.25, 0.5), "block_size": (2, 4)}
    )
    corrupt_dataset("tiny", processed, tmp_path / "b", more)
    before, after = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(after) - set(before) == {"gaussian_sigma0.05.npz", "mask0.25.npz", "block2.npz"}
    for name, content in before.items():
        if name != "manifest.json":
            assert after[name] == content, name


def test_failure_midway_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    processed = _image_dataset(tmp_path / "processed")

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(corrupt, "random_mask", boom)  # after the gaussian and salt-and-pepper files
    out = tmp_path / "out" / "tiny"
    with pytest.raises(RuntimeError, match="disk on fire"):
        corrupt_dataset("tiny", processed, out, IMAGE_CFG)
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary folder left behind

    # an existing output stays as it was
    monkeypatch.undo()
    corrupt_dataset("tiny", processed, out, IMAGE_CFG)
    good = _files(out)
    monkeypatch.setattr(corrupt, "random_mask", boom)
    with pytest.raises(RuntimeError):
        corrupt_dataset("tiny", processed, out, IMAGE_CFG.model_copy(update={"seed": 5}))
    assert _files(out) == good


def test_bad_config_fails_before_writing(tmp_path: Path) -> None:
    processed = _image_dataset(tmp_path / "processed")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"corrupt\.block_size: a block of 13 pixels does not fit in 12x12"):
        corrupt_dataset("tiny", processed, out, CorruptConfig(block_size=(4, 13)))
    with pytest.raises(ConfigError, match=r"corrupt\.gaussian_sigma: level 0\.3 is listed twice"):
        corrupt_dataset("tiny", processed, out, CorruptConfig(gaussian_sigma=(0.3, 0.30), block_size=(4,)))
    with pytest.raises(ConfigError, match=r"corrupt\.seed"):
        corruption_rng(-1, "gaussian_sigma0.3", "test")
    with pytest.raises(ValidationError):
        CorruptConfig(seed=-1)
    with pytest.raises(DataError, match="expected 'other'"):
        corrupt_dataset("other", processed, out, CorruptConfig(block_size=(4,)))
    assert not out.exists()


def test_format_level() -> None:
    assert [format_level(v) for v in (0.3, 5.0, 12, -5.0, 2.5, 0.05)] == ["0.3", "5", "12", "-5", "2.5", "0.05"]


# ----------------------------------------------------------------- speech
SPEECH_CFG = CorruptConfig(snr_db=(0.0, 10.0), babble_speakers=3)


def test_corrupt_speech_end_to_end(tmp_path: Path) -> None:
    processed = write_tone_spectrograms(tmp_path / "processed", silent_row=2)
    out = tmp_path / "corrupted"
    manifest = corrupt_dataset("digits", processed, out, SPEECH_CFG)
    names = ["white_snr0db", "white_snr10db", "babble_snr0db", "babble_snr10db"]
    assert [c["name"] for c in manifest["corruptions"]] == names
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.npz" for n in names] + ["manifest.json"])
    by_name = {c["name"]: c for c in manifest["corruptions"]}
    assert by_name["babble_snr10db"]["speakers"] == 3 and by_name["white_snr0db"]["parameter"] == "snr_db"
    for name, target in (("white_snr0db", 0.0), ("babble_snr10db", 10.0)):
        for split in ("train", "val", "test"):
            stats = by_name[name]["stats"][split]
            assert abs(stats["snr_db_min"] - target) < 0.5 and abs(stats["snr_db_max"] - target) < 0.5
        assert by_name[name]["stats"]["test"]["n_silent"] == 1
        assert by_name[name]["stats"]["test"]["silent_rows"] == [2]

    clean = np.load(processed / "test.npz")
    split = load_corruption(out, "babble_snr0db", "test")
    assert split.x.dtype == np.float16 and split.x.shape == clean["x"].shape
    assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
    assert split.audio is not None and split.audio.dtype == np.float32 and split.audio.shape == clean["audio"].shape
    assert split.snr_db is not None and np.isnan(split.snr_db[2])
    assert np.array_equal(split.audio[2], clean["audio"][2])  # the silent clip stays clean
    assert np.array_equal(split.x[2], clean["x"][2])
    achieved = measured_snr_db(clean["audio"], split.audio)
    keep = ~np.isnan(achieved)
    assert np.all(np.abs(achieved[keep]) < 0.5)
    # the noise shows in the spectrogram
    assert np.abs(split.x.astype(np.float32) - clean["x"].astype(np.float32)).mean() > 0.01


def test_speech_determinism_and_levels(tmp_path: Path) -> None:
    processed = write_tone_spectrograms(tmp_path / "processed")
    corrupt_dataset("digits", processed, tmp_path / "a", SPEECH_CFG)
    corrupt_dataset("digits", processed, tmp_path / "b", SPEECH_CFG.model_copy(update={"snr_db": (0.0, 5.0, 10.0)}))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(b) - set(a) == {"white_snr5db.npz", "babble_snr5db.npz"}
    assert all(b[name] == content for name, content in a.items() if name != "manifest.json")


def test_speech_train_draws(tmp_path: Path) -> None:
    """audio_train_draws = 3: the training split gets two more independent noises of each clip, as spectrograms."""
    processed = write_tone_spectrograms(tmp_path / "processed")
    one, three = tmp_path / "one", tmp_path / "three"
    corrupt_dataset("digits", processed, one, SPEECH_CFG)
    manifest = corrupt_dataset("digits", processed, three, SPEECH_CFG.model_copy(update={"audio_train_draws": 3}))
    clean = np.load(processed / "train.npz")
    for name in ("white_snr0db", "babble_snr10db"):
        single, drawn = load_corruption(one, name, "train"), load_corruption(three, name, "train")
        assert single.x_draws is None
        # The first draw does not depend on the number of draws; waveforms are kept for it alone.
        assert np.array_equal(drawn.x, single.x) and np.array_equal(drawn.audio, single.audio)
        assert drawn.x_draws is not None and drawn.x_draws.shape == (2, *clean["x"].shape)
        assert drawn.x_draws.dtype == clean["x"].dtype
        # Independent noises: every draw differs from the others and from the clean spectrogram.
        x = drawn.x.astype(np.float32)
        more = drawn.x_draws.astype(np.float32)
        for a, b in ((x, more[0]), (x, more[1]), (more[0], more[1]), (more[0], clean["x"].astype(np.float32))):
            assert np.abs(a - b).mean() > 0.01
        # The extra draws are as noisy as the first: same mean distance to the clean spectrogram.
        gap = [np.abs(d - clean["x"].astype(np.float32)).mean() for d in (x, *more)]
        assert max(gap) < 1.5 * min(gap)
        # draws(rows): draw after draw, each holding the given rows.
        rows = np.array([1, 4, 7])
        stacked = drawn.draws(rows)
        assert stacked.shape == (9, *clean["x"].shape[1:])
        assert np.array_equal(stacked[:3], drawn.x[rows]) and np.array_equal(stacked[6:], drawn.x_draws[1][rows])
        assert np.array_equal(single.draws(rows), single.x[rows])
        # Validation and test keep one draw, identical to the single-draw run.
        for split in ("val", "test"):
            assert load_corruption(three, name, split).x_draws is None
            assert np.array_equal(load_corruption(three, name, split).x, load_corruption(one, name, split).x)
    entry = {c["name"]: c for c in manifest["corruptions"]}["white_snr0db"]
    assert entry["stats"]["train"]["draws"] == 3 and "draws" not in entry["stats"]["val"]
    assert "x_draws" in entry["arrays"]


def test_speech_babble_needs_enough_utterances(tmp_path: Path) -> None:
    processed = write_tone_spectrograms(tmp_path / "processed")  # val and test have 6 clips
    with pytest.raises(ConfigError, match=r"corrupt\.babble_speakers: 6 speakers .* split 'val'"):
        corrupt_dataset("digits", processed, tmp_path / "out", CorruptConfig(babble_speakers=6))
    assert not (tmp_path / "out").exists()
    corrupt_dataset("digits", processed, tmp_path / "out", CorruptConfig(babble_speakers=6, audio_noise=("white",)))


def test_speech_uses_log_mel_db_and_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The noisy spectrogram is scale.to_unit(log_mel_db(noisy audio, extra)), whatever speech.py computes."""
    processed = write_tone_spectrograms(tmp_path / "processed")
    calls: list[tuple[tuple[int, ...], dict]] = []

    def fake_log_mel_db(audio: np.ndarray, params: dict) -> np.ndarray:
        calls.append((audio.shape, dict(params)))
        frames = 1 + audio.shape[1] // params["hop_length"]
        level = 10 * np.log10(np.mean(audio.astype(np.float64) ** 2, axis=1) + 1e-10)
        return np.broadcast_to(level[:, None, None, None], (len(audio), 1, params["n_mels"], frames)).astype(np.float32)

    class FakeScale:
        @classmethod
        def from_json(cls, obj: dict) -> FakeScale:
            assert set(obj) == {"ref_db", "top_db"}
            return cls()

        def to_unit(self, db: np.ndarray) -> np.ndarray:
            return np.clip((db + 60.0) / 60.0, 0.0, 1.0).astype(np.float32)

    fake = types.SimpleNamespace(log_mel_db=fake_log_mel_db, SpectrogramScale=FakeScale)
    monkeypatch.setitem(sys.modules, "latentlab.data.speech", fake)
    corrupt_dataset("digits", processed, tmp_path / "out", CorruptConfig(snr_db=(0.0,), audio_noise=("white",)))
    assert [shape for shape, _ in calls] == [(12, 2000), (6, 2000), (6, 2000)]
    assert calls[0][1]["n_mels"] == 16 and "scale" in calls[0][1]
    split = load_corruption(tmp_path / "out", "white_snr0db", "val")
    assert split.audio is not None
    power_db = 10 * np.log10(np.mean(split.audio.astype(np.float64) ** 2, axis=1) + 1e-10)
    expected = np.clip((power_db + 60.0) / 60.0, 0, 1).astype(np.float16)
    assert np.array_equal(split.x[:, 0, 0, 0], expected)


def test_spectrogram_without_audio_is_a_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "processed"
    counts = {"train": 4, "val": 4, "test": 4}
    for split, n in counts.items():
        x = np.zeros((n, 1, 8, 5), dtype=np.float16)
        save_split(folder, split, SplitArrays(x=x, y=np.zeros(n, dtype=np.int64), ids=np.arange(n)))
    extra = {
        "sample_rate": 8000,
        "n_fft": 256,
        "hop_length": 128,
        "n_mels": 8,
        "scale": {"ref_db": 0.0, "top_db": 80.0},
    }
    save_manifest(folder, Manifest("s", "spectrogram", (1, 8, 5), ("0",), counts, {}, extra))
    with pytest.raises(DataError, match="no 'audio'"):
        corrupt_dataset("s", folder, tmp_path / "out", CorruptConfig())
