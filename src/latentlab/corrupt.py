"""The ``corrupt`` stage: noisy, masked and occluded copies of the processed splits.

Images (float32 in [0, 1], shape (N, C, H, W)) get four corruption kinds, each at
the levels listed in ``params.yaml`` under ``corrupt``:

- additive Gaussian noise (sensor/read-out noise),
- salt-and-pepper impulse noise (dead/stuck pixels, bit errors),
- random pixel dropout (missing data; the inpainting benchmark),
- one square occluding block per image (occlusion; the block inpainting benchmark).

Speech is corrupted in the time domain, where noise physically adds, at target
signal-to-noise ratios: white noise, and babble (a crowd of other talkers). The
noisy waveforms are turned into log-mel spectrograms with the processed
dataset's own parameters and scale, so a model sees them exactly like clean input.

Output layout (``data/corrupted/{dataset}/``): one uncompressed ``{name}.npz`` per
corruption and level, e.g. ``gaussian_sigma0.3.npz`` or ``babble_snr5db.npz``,
holding per split ``{split}_x`` in the processed dtype and, where relevant,
``{split}_mask`` (packed keep-mask), ``{split}_block`` (corners),
``{split}_audio`` (noisy waveforms) and ``{split}_snr_db`` (achieved SNR); plus
``manifest.json`` describing every file with measured statistics. Rows are in
the processed order; labels and ids stay in ``data/processed``.

With ``corrupt.audio_train_draws`` = D > 1, the speech training split also holds
``train_x_draws`` (D - 1, N, 1, H, W): the spectrograms of D - 1 further,
independent noise draws of the same clips, so a denoiser is not fitted to one
noise per clip (:meth:`CorruptedSplit.draws`). Their waveforms are not kept
(D times the training audio, and nothing listens to them).

Every random draw comes from a generator seeded by ``corrupt.seed`` and a stable
hash of ``{corruption name}/{split}``, so files are reproducible and adding a
level leaves the files of the other levels byte-identical.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentlab.atomic import atomic_dir, write_json
from latentlab.config import CorruptConfig, Corruption, plan_corruptions
from latentlab.data.store import Manifest, SplitArrays, from_unit_float, load_manifest, load_split, to_unit_float
from latentlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Images are corrupted this many rows at a time, which bounds the float32
#: working memory (about 100 MB for 28x28x4 images). It is a constant, not a
#: function of the machine, because the random stream is consumed chunk by chunk.
CHUNK_ROWS = 8192

#: A clip whose mean square is at or below this (-100 dBFS) counts as silent:
#: it has no signal power to set an SNR against, so it is left unchanged.
SILENCE_POWER = 1e-10

MANIFEST_NAME = "manifest.json"


# ----------------------------------------------------------------- image noise
def gaussian_noise(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add i.i.d. Gaussian noise of std ``sigma`` and clip to [0, 1].

    Models sensor read-out/thermal noise, the additive white Gaussian noise of
    the denoising-autoencoder literature (Vincent et al., 2008/2010).

    Args:
        x: float32 images in [0, 1], shape (N, C, H, W).
        sigma: noise std in pixel units.
        rng: source of randomness.

    Returns:
        float32 (N, C, H, W) in [0, 1].
    """
    noisy, _ = _gaussian(x, sigma, rng)
    return noisy


def _gaussian(x: np.ndarray, sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gaussian_noise` that also returns the noise drawn (before clipping)."""
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    return np.clip(x + noise, 0.0, 1.0), noise


def salt_and_pepper(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Set a share ``amount`` of pixel positions to 0 or 1 with equal probability.

    Models impulse noise: dead (pepper) and stuck/saturated (salt) pixels and
    transmission bit errors (Gonzalez & Woods, *Digital Image Processing*, 5.2).
    A position is hit in all channels together, as a dead pixel would be.

    Args:
        x: float32 images in [0, 1], shape (N, C, H, W).
        amount: probability that a pixel position is hit, in [0, 1].
        rng: source of randomness.

    Returns:
        float32 (N, C, H, W).
    """
    noisy, _ = _salt_pepper(x, amount, rng)
    return noisy


def _salt_pepper(x: np.ndarray, amount: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`salt_and_pepper` that also returns the hit positions (N, 1, H, W)."""
    n, _, h, w = x.shape
    # One uniform per position decides both: u < amount/2 is salt, amount/2 <= u < amount pepper.
    u = rng.random((n, 1, h, w), dtype=np.float32)
    hit = u < amount
    value = (u < amount / 2).astype(x.dtype)
    return np.where(hit, value, x), hit


def random_mask(x: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Drop a share ``fraction`` of pixel positions (all channels) to 0.

    Models missing data, i.e. random-pixel inpainting (Pathak et al., 2016;
    the masking of masked autoencoders, He et al., 2022), with independent
    Bernoulli drops.

    Args:
        x: float32 images in [0, 1], shape (N, C, H, W).
        fraction: probability that a position is dropped, in [0, 1).
        rng: source of randomness.

    Returns:
        The masked float32 images (N, C, H, W) and the boolean keep-mask
        (N, 1, H, W), True where a pixel was kept.
    """
    n, _, h, w = x.shape
    keep = rng.random((n, 1, h, w), dtype=np.float32) >= fraction
    return x * keep, keep


def block_region(corners: np.ndarray, block: int, height: int, width: int) -> np.ndarray:
    """Boolean (N, 1, H, W) map of square blocks of side ``block`` at ``corners`` (N, 2) (top, left)."""
    rows = np.arange(height)
    cols = np.arange(width)
    top = corners[:, 0:1]
    left = corners[:, 1:2]
    in_rows = (rows >= top) & (rows < top + block)  # (N, H)
    in_cols = (cols >= left) & (cols < left + block)  # (N, W)
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def block_occlusion(x: np.ndarray, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Set one ``block`` x ``block`` square per image, at a uniform position, to 0.

    Models occlusion by an opaque object, i.e. block (centre/region) inpainting
    (Pathak et al., *Context Encoders*, 2016), with the position uniform over
    every placement that lies fully inside the image.

    Args:
        x: float32 images in [0, 1], shape (N, C, H, W).
        block: side of the square, pixels.
        rng: source of randomness.

    Returns:
        The occluded float32 images (N, C, H, W) and the blocks' top-left corners
        (N, 2) int64 as (row, column).

    Raises:
        ConfigError: the block does not fit in the image.
    """
    n, _, h, w = x.shape
    _check_block(block, h, w)
    top = rng.integers(0, h - block + 1, size=n)
    left = rng.integers(0, w - block + 1, size=n)
    corners = np.stack([top, left], axis=1).astype(np.int64)
    occluded = block_region(corners, block, h, w)
    return np.where(occluded, x.dtype.type(0), x), corners


def _check_block(block: int, height: int, width: int) -> None:
    if block < 1 or block > height or block > width:
        raise ConfigError(
            f"params.yaml: corrupt.block_size: a block of {block} pixels does not fit in {height}x{width} images"
        )


# ----------------------------------------------------------------- audio noise
def signal_power(audio: np.ndarray) -> np.ndarray:
    """Mean square of each row of ``audio`` (N, T), as float64 (N,)."""
    audio = np.asarray(audio)
    if audio.shape[-1] == 0:
        return np.zeros(audio.shape[:-1])
    return np.mean(np.square(audio, dtype=np.float64), axis=-1)


def silent_clips(audio: np.ndarray) -> np.ndarray:
    """Boolean (N,): rows of ``audio`` (N, T) whose power is at or below :data:`SILENCE_POWER`."""
    return signal_power(audio) <= SILENCE_POWER


def white_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance white Gaussian noise of ``shape`` (N, T), float32.

    Models broadband background noise (microphone/electronic hiss), the
    standard additive white Gaussian noise channel.
    """
    return rng.standard_normal(shape, dtype=np.float32)


def babble_noise(audio_pool: np.ndarray, n: int, speakers: int, rng: np.random.Generator) -> np.ndarray:
    """Babble noise: each row is the sum of ``speakers`` other utterances of the pool.

    Models a crowd of background talkers (the "babble" of NOISEX-92 and of the
    cocktail-party literature). Row ``i`` is meant for pool utterance ``i`` and
    never contains it; its ``speakers`` utterances are distinct, and each is
    scaled to unit power before summing so that no talker dominates. Silent
    utterances are never used.

    Args:
        audio_pool: waveforms (P, T) of the split the noise is for.
        n: number of noise rows, at most P; row ``i`` excludes pool row ``i``.
        speakers: utterances summed into each row.
        rng: source of randomness.

    Returns:
        float32 (n, T).

    Raises:
        ConfigError: the pool has too few non-silent utterances for ``speakers``.
    """
    audio_pool = np.asarray(audio_pool, dtype=np.float32)
    if n > len(audio_pool):
        raise ValueError(f"n={n} noise rows asked from a pool of {len(audio_pool)} utterances")
    power = signal_power(audio_pool)
    usable = power > SILENCE_POWER
    pool_index = np.flatnonzero(usable)
    sources = _babble_sources(usable, n, speakers, rng)  # (n, speakers) indices into the pool
    unit = np.zeros_like(audio_pool)
    unit[pool_index] = audio_pool[pool_index] / np.sqrt(power[pool_index]).astype(np.float32)[:, None]
    noise = np.zeros((n, audio_pool.shape[1]), dtype=np.float32)
    for k in range(speakers):
        noise += unit[sources[:, k]]
    return noise


def _babble_sources(usable: np.ndarray, n: int, speakers: int, rng: np.random.Generator) -> np.ndarray:
    """Pick, for each of ``n`` rows, ``speakers`` distinct usable pool indices other than the row itself.

    Draws without replacement, vectorised over rows: the k-th pick is uniform
    over the still-free choices and is mapped to the pool by stepping over the
    ones already taken (the row itself counts as taken). Exact and loop-free
    over rows, unlike rejection sampling, even when ``speakers`` is close to the
    pool size.

    Returns:
        int64 (n, speakers) indices into the pool.
    """
    if speakers < 1:
        raise ConfigError(f"params.yaml: corrupt.babble_speakers: must be at least 1 (got {speakers})")
    pool_index = np.flatnonzero(usable)
    q = len(pool_index)
    own = usable[:n]
    rank = np.cumsum(usable)[:n] - 1
    # Position of each row inside the usable pool; q (never reached by a pick) when the row is not in it.
    taken = np.where(own, rank, q)[:, None].astype(np.int64)
    free = q - own.astype(np.int64)
    if n and free.min() < speakers:
        raise ConfigError(
            f"params.yaml: corrupt.babble_speakers: {speakers} speakers need at least {speakers + 1} "
            f"non-silent utterances in a split, but this one has {q}"
        )
    for k in range(speakers):
        pick = rng.integers(0, free - k) if n else np.zeros(0, dtype=np.int64)
        # Ascending pass over the taken positions: the pick-th free slot is found by
        # skipping every taken position at or below it.
        for column in np.sort(taken, axis=1).T:
            pick = pick + (pick >= column)
        taken = np.concatenate([taken, pick[:, None]], axis=1)
    return pool_index[taken[:, 1:]] if q else taken[:, 1:]


def add_noise_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """Add ``noise`` scaled per utterance so that the SNR is exactly ``snr_db``.

    SNR = 10 log10(P_clean / P_noise) with P the mean square over the clip, the
    usual definition for additive-noise speech corpora (e.g. Aurora-2, Hirsch &
    Pearce 2000, which however measures only active speech). The sum is not
    clipped, so the achieved SNR is the target up to float32 rounding.
    Silent clips (power <= :data:`SILENCE_POWER`) have no SNR to set: they are
    returned unchanged and logged; :func:`silent_clips` tells which.

    Args:
        clean: float32 waveforms (N, T).
        noise: noise waveforms (N, T), any non-zero power.
        snr_db: target SNR, dB.

    Returns:
        float32 (N, T).
    """
    clean = np.asarray(clean)
    noise = np.asarray(noise)
    if clean.shape != noise.shape:
        raise ValueError(f"clean {clean.shape} and noise {noise.shape} differ in shape")
    p_clean = signal_power(clean)
    p_noise = signal_power(noise)
    silent = p_clean <= SILENCE_POWER
    if np.any(~silent & (p_noise <= 0.0)):
        raise ValueError("a noise row is all zeros: no gain reaches a finite SNR")
    gain = np.zeros(len(clean))
    active = ~silent
    gain[active] = np.sqrt(p_clean[active] / (p_noise[active] * 10.0 ** (snr_db / 10.0)))
    if silent.any():
        log.warning(
            "%d silent clip(s) left without noise (rows %s)", silent.sum(), np.flatnonzero(silent)[:10].tolist()
        )
    noisy = clean.astype(np.float64) + gain[:, None] * noise
    return noisy.astype(np.float32)


def measured_snr_db(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Achieved SNR per row, 10 log10(P_clean / P_(noisy - clean)), float64 (N,).

    NaN for silent clean rows (no SNR is defined), +inf where nothing was added.
    """
    clean64 = np.asarray(clean, dtype=np.float64)
    residual = np.asarray(noisy, dtype=np.float64) - clean64
    p_clean = signal_power(clean64)
    p_residual = signal_power(residual)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = 10.0 * np.log10(p_clean / p_residual)
    snr[p_clean <= SILENCE_POWER] = np.nan
    return snr


# ----------------------------------------------------------------- the stage
def corruption_rng(seed: int, name: str, split: str) -> np.random.Generator:
    """The generator of corruption ``name`` on ``split``: seeded by ``seed`` and a stable hash.

    SHA-256 rather than :func:`hash`, which is salted per process for strings.
    """
    _check_seed(seed)
    digest = hashlib.sha256(f"{name}/{split}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _check_seed(seed: int) -> None:
    # SeedSequence takes non-negative entropy only.
    if seed < 0:
        raise ConfigError(f"params.yaml: corrupt.seed: must be a non-negative integer (got {seed})")


def corrupt_dataset(dataset: str, processed_dir: Path, out_dir: Path, cfg: CorruptConfig) -> dict[str, Any]:
    """Write every corruption of ``cfg`` for the processed dataset in ``processed_dir``.

    Images get Gaussian, salt-and-pepper, mask and block files; a spectrogram
    dataset with waveforms gets white- and babble-noise files at each SNR. All
    files and ``manifest.json`` appear in ``out_dir`` together or not at all.

    Returns:
        The manifest written to ``out_dir/manifest.json``.
    """
    processed_dir = Path(processed_dir)
    out_dir = Path(out_dir)
    manifest = load_manifest(processed_dir)
    if manifest.name != dataset:
        raise DataError(f"{processed_dir / MANIFEST_NAME}: describes dataset {manifest.name!r}, expected {dataset!r}")
    corruptions = plan_corruptions(manifest.modality, cfg)
    _check_seed(cfg.seed)
    if manifest.modality == "image":
        _, h, w = manifest.shape
        for size in cfg.block_size:
            _check_block(size, h, w)
    else:
        _check_speech_extra(processed_dir, manifest)
        if not cfg.audio_noise:
            raise ConfigError("params.yaml: corrupt.audio_noise: lists no noise kind for a speech dataset")

    splits = {split: _load_checked(processed_dir, split, manifest) for split in dict.fromkeys(cfg.splits)}
    if manifest.modality != "image" and "babble" in cfg.audio_noise:
        for split, arrays in splits.items():
            _check_babble_pool(arrays, cfg.babble_speakers, f"split {split!r} of {dataset!r}")
    entries: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        for corruption in corruptions:
            payload: dict[str, np.ndarray] = {}
            stats: dict[str, dict[str, Any]] = {}
            for split, arrays in splits.items():
                rng = corruption_rng(cfg.seed, corruption.name, split)
                if manifest.modality == "image":
                    arrays_out, stats[split] = _corrupt_images(corruption, arrays.x, rng)
                else:
                    draws = cfg.audio_train_draws if split == "train" else 1
                    arrays_out, stats[split] = _corrupt_speech(corruption, arrays, manifest, cfg, rng, draws)
                payload.update({f"{split}_{key}": value for key, value in arrays_out.items()})
            if corruption.kind == "block":
                payload["block_size"] = np.asarray(corruption.level, dtype=np.int64)
            save_npz(tmp / corruption.file, payload)
            entry: dict[str, Any] = {
                "name": corruption.name,
                "file": corruption.file,
                "kind": corruption.kind,
                "parameter": corruption.parameter,
                "config_key": corruption.config_key,
                "level": corruption.level,
                "arrays": sorted({key.split("_", 1)[1] for key in payload if key != "block_size"}),
                "stats": stats,
            }
            if corruption.kind == "babble":
                entry["speakers"] = cfg.babble_speakers
            entries.append(entry)
            log.info("%s: wrote %s", dataset, corruption.file)
        result: dict[str, Any] = {
            "dataset": dataset,
            "modality": manifest.modality,
            "shape": list(manifest.shape),
            "seed": cfg.seed,
            "splits": list(splits),
            "counts": {split: len(arrays) for split, arrays in splits.items()},
            "rng": "numpy.random.default_rng([seed, first 8 bytes of sha256('{name}/{split}') as little-endian int])",
            "corruptions": entries,
        }
        write_json(tmp / MANIFEST_NAME, result)
    return result


def _load_checked(processed_dir: Path, split: str, manifest: Manifest) -> SplitArrays:
    arrays = load_split(processed_dir, split)
    path = processed_dir / f"{split}.npz"
    if tuple(arrays.x.shape[1:]) != tuple(manifest.shape):
        raise DataError(f"{path}: x has sample shape {arrays.x.shape[1:]}, manifest.json says {tuple(manifest.shape)}")
    if manifest.modality != "image" and arrays.audio is None:
        raise DataError(f"{path}: a spectrogram dataset has no 'audio' waveforms to add noise to; rerun ingest")
    return arrays


#: What :func:`latentlab.data.speech.log_mel_db` cannot default (fmin/fmax it can), plus the scale.
_SPEECH_KEYS = ("sample_rate", "n_fft", "hop_length", "n_mels", "scale")


def _check_speech_extra(processed_dir: Path, manifest: Manifest) -> None:
    missing = [key for key in _SPEECH_KEYS if key not in manifest.extra]
    if missing:
        raise DataError(f"{processed_dir / MANIFEST_NAME}: extra lacks spectrogram parameter(s) {', '.join(missing)}")


def _check_babble_pool(arrays: SplitArrays, speakers: int, where: str) -> None:
    assert arrays.audio is not None
    usable = int(np.count_nonzero(~silent_clips(arrays.audio)))
    if len(arrays) and usable < speakers + 1:
        raise ConfigError(
            f"params.yaml: corrupt.babble_speakers: {speakers} speakers need at least {speakers + 1} "
            f"non-silent utterances per split, but {where} has {usable}"
        )


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK_ROWS):
        yield slice(start, min(start + CHUNK_ROWS, n))


class _Moments:
    """Running count, sum and sum of squares, to get a mean and std over chunks in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, values: np.ndarray) -> None:
        self.count += values.size
        self.total += float(np.sum(values, dtype=np.float64))
        self.squares += float(np.sum(np.square(values, dtype=np.float64)))

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> float | None:
        if not self.count:
            return None
        mean = self.total / self.count
        return float(np.sqrt(max(self.squares / self.count - mean * mean, 0.0)))


def _corrupt_images(
    corruption: Corruption, x: np.ndarray, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Corrupt stored images ``x`` (N, C, H, W) chunk by chunk; returns the arrays to store and statistics."""
    n, _, h, w = x.shape
    out = np.empty_like(x)
    level = corruption.level
    moments = _Moments()  # per kind: noise, effective noise, or a 0/1 indicator
    effective = _Moments()
    keep = np.empty((n, 1, h, w), dtype=bool) if corruption.kind == "mask" else None
    corners = np.empty((n, 2), dtype=np.int64) if corruption.kind == "block" else None
    for rows in _chunks(n):
        clean = to_unit_float(x[rows])
        if corruption.kind == "gaussian":
            noisy, noise = _gaussian(clean, float(level), rng)
            moments.add(noise)
        elif corruption.kind == "salt_pepper":
            noisy, hit = _salt_pepper(clean, float(level), rng)
            moments.add(hit)
        elif corruption.kind == "mask":
            assert keep is not None
            noisy, keep[rows] = random_mask(clean, float(level), rng)
            moments.add(~keep[rows])
        else:
            assert corners is not None
            noisy, corners[rows] = block_occlusion(clean, int(level), rng)
        out[rows] = from_unit_float(noisy, x.dtype)
        if corruption.kind == "gaussian":
            effective.add(to_unit_float(out[rows]) - clean)
        elif corruption.kind == "salt_pepper":
            effective.add(np.any(out[rows] != x[rows], axis=1))

    arrays: dict[str, np.ndarray] = {"x": out}
    stats: dict[str, Any] = {"n": n}
    if corruption.kind == "gaussian":
        # std of the noise drawn, before clipping to [0, 1]; and of what was stored (after clipping and rounding).
        stats |= {"noise_std": moments.std, "noise_mean": moments.mean, "effective_std": effective.std}
    elif corruption.kind == "salt_pepper":
        # hit: positions drawn; changed: positions whose stored value differs (a 0 hit by pepper does not change).
        stats |= {"hit_fraction": moments.mean, "changed_fraction": effective.mean}
    elif corruption.kind == "mask":
        assert keep is not None
        arrays["mask"] = pack_mask(keep)
        stats |= {"dropped_fraction": moments.mean}
    else:
        assert corners is not None
        arrays["block"] = corners
        stats |= {"occluded_fraction": (int(level) ** 2) / (h * w) if n else None}
    return arrays, stats


def _corrupt_speech(
    corruption: Corruption,
    arrays: SplitArrays,
    manifest: Manifest,
    cfg: CorruptConfig,
    rng: np.random.Generator,
    draws: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Add noise to the waveforms of one split and recompute their spectrograms.

    With ``draws`` > 1 the clips get ``draws - 1`` further independent noises,
    drawn from ``rng`` after the first (so the first draw does not depend on
    ``draws``), kept as spectrograms only: ``x_draws`` (draws - 1, N, 1, H, W).
    """
    assert arrays.audio is not None
    clean = arrays.audio.astype(np.float32, copy=False)

    def draw() -> np.ndarray:
        if corruption.kind == "white":
            noise = white_noise(clean.shape, rng)
        else:
            noise = babble_noise(clean, len(clean), cfg.babble_speakers, rng)
        return add_noise_at_snr(clean, noise, float(corruption.level))

    def spectrograms(noisy: np.ndarray) -> np.ndarray:
        x = noisy_spectrograms(noisy, manifest.extra, arrays.x.dtype)
        if x.shape != arrays.x.shape:
            raise DataError(
                f"{manifest.name}: noisy spectrograms have shape {x.shape} but the processed ones {arrays.x.shape}; "
                "manifest.json extra does not match the processed data"
            )
        return x

    noisy = draw()
    snr = measured_snr_db(clean, noisy)
    x = spectrograms(noisy)
    silent = np.flatnonzero(np.isnan(snr))
    finite = snr[~np.isnan(snr)]
    stats: dict[str, Any] = {
        "n": len(clean),
        "snr_db_mean": float(finite.mean()) if finite.size else None,
        "snr_db_min": float(finite.min()) if finite.size else None,
        "snr_db_max": float(finite.max()) if finite.size else None,
        "n_silent": int(silent.size),
        "silent_rows": silent.tolist(),
    }
    out = {"x": x, "audio": noisy, "snr_db": snr.astype(np.float32)}
    if draws > 1:
        out["x_draws"] = np.stack([spectrograms(draw()) for _ in range(draws - 1)])
        stats["draws"] = draws
    return out, stats


def noisy_spectrograms(audio: np.ndarray, extra: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Log-mel spectrograms (N, 1, n_mels, frames) of waveforms (N, T), scaled like the processed data.

    Uses :mod:`latentlab.data.speech` (imported here, as it pulls in librosa)
    with the manifest's ``extra`` parameters and the training split's scale.
    """
    speech = importlib.import_module("latentlab.data.speech")
    scale = speech.SpectrogramScale.from_json(extra["scale"])
    return from_unit_float(scale.to_unit(speech.log_mel_db(audio, extra)), dtype)


# ------------------------------------------------------------------ file I/O
def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean (N, 1, H, W) mask into uint8 (N, ceil(H*W/8)), 8x smaller."""
    return np.packbits(mask.reshape(len(mask), -1), axis=1)


def unpack_mask(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`: boolean (N, 1, H, W)."""
    bits = np.unpackbits(packed, axis=1, count=height * width)
    return bits.astype(bool).reshape(len(packed), 1, height, width)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` (read at disk speed, like the processed splits).

    :func:`numpy.savez` stamps members with zipfile's fixed 1980 date, so the
    same arrays give the same bytes and DVC sees no change on a rerun.
    """
    with open(path, "wb") as fh:
        np.savez(fh, allow_pickle=False, **arrays)


@dataclass(frozen=True)
class CorruptedSplit:
    """One split of one corruption file, rows in the processed order.

    ``x`` has the processed dtype and shape. ``mask`` is the keep-mask (True =
    pixel kept) of mask corruptions, (N, 1, H, W); ``block`` the (N, 2) top-left
    corners of block occlusions with side ``block_size``; ``audio`` the noisy
    waveforms (N, T) float32 and ``snr_db`` their achieved SNR (N,) (NaN = silent
    clip left clean) for speech. ``x_draws`` (D - 1, N, C, H, W) holds further
    noise draws of the same rows, where ``corrupt.audio_train_draws`` asked for
    them (the speech training split); ``x`` is always the first draw.
    """

    x: np.ndarray
    mask: np.ndarray | None = None
    block: np.ndarray | None = None
    block_size: int | None = None
    audio: np.ndarray | None = None
    snr_db: np.ndarray | None = None
    x_draws: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def draws(self, rows: np.ndarray) -> np.ndarray:
        """Every draw of ``rows``, one draw after the other: (D * len(rows), C, H, W).

        Row ``d * len(rows) + i`` is draw ``d`` of ``rows[i]``, so the clean
        targets are ``rows`` repeated D times (``np.tile``); D = 1 without ``x_draws``.
        """
        first = self.x[rows]
        if self.x_draws is None:
            return first
        return np.concatenate([first, *(more[rows] for more in self.x_draws)])

    def corrupted_region(self) -> np.ndarray | None:
        """Boolean (N, 1, H, W): pixels hidden by the mask or block; None for noise corruptions."""
        _, _, h, w = self.x.shape
        if self.mask is not None:
            return ~self.mask
        if self.block is not None and self.block_size is not None:
            return block_region(self.block, self.block_size, h, w)
        return None


def load_corruption_manifest(corrupted_dir: str | Path) -> dict[str, Any]:
    """Read ``corrupted_dir/manifest.json`` as written by :func:`corrupt_dataset`."""
    import json

    path = Path(corrupted_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the corrupt stage for this dataset first") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def load_corruption(corrupted_dir: str | Path, name: str, split: str) -> CorruptedSplit:
    """Read split ``split`` of corruption ``name`` (e.g. ``"mask0.5"``) from ``corrupted_dir``."""
    path = Path(corrupted_dir) / f"{name}.npz"
    if not path.exists():
        known = sorted(p.stem for p in Path(corrupted_dir).glob("*.npz"))
        raise DataError(f"{path}: missing; run the corrupt stage (present: {', '.join(known) or 'none'})")
    with np.load(path, allow_pickle=False) as data:
        if f"{split}_x" not in data.files:
            present = sorted({k.split("_", 1)[0] for k in data.files if k.endswith("_x")})
            raise DataError(f"{path}: no split {split!r} (present: {', '.join(present)}); see corrupt.splits")

        def get(key: str, convert: Callable[[np.ndarray], Any] = lambda a: a) -> Any:
            full = f"{split}_{key}"
            return convert(data[full]) if full in data.files else None

        x = data[f"{split}_x"]
        _, _, h, w = x.shape
        return CorruptedSplit(
            x=x,
            mask=get("mask", lambda packed: unpack_mask(packed, h, w)),
            block=get("block"),
            block_size=int(data["block_size"]) if "block_size" in data.files else None,
            audio=get("audio"),
            snr_db=get("snr_db"),
            x_draws=get("x_draws"),
        )
