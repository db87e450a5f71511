"""Spoken digits as log-mel spectrograms.

Sources, in the order :func:`locate_speech` tries them:

1. ``cfg.path``: a folder of WAVs named like the Free Spoken Digit Dataset
   (FSDD), ``{digit}_{speaker}_{index}.wav``;
2. an FSDD download already unpacked under ``raw_dir/fsdd/recordings``;
3. a fresh download of FSDD v1.0.10 from GitHub;
4. offline: the ten digit words spoken by espeak-ng with several voices, speeds
   and pitches (``raw_dir/espeak``), clearly marked as synthetic.

Every clip becomes ``float32`` audio of ``n_samples = round(sample_rate *
duration)`` samples in [-1, 1] and a power log-mel spectrogram in dB of shape
(1, n_mels, frames) with ``frames = 1 + n_samples // hop_length`` (centred
frames). :class:`SpectrogramScale` maps dB to [0, 1] for storage and back, and
:func:`spectrogram_to_audio` inverts a stored spectrogram with Griffin-Lim.

librosa is imported inside the functions that need it: importing it costs
noticeable time, and most commands never touch audio.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from latentlab.atomic import atomic_dir, atomic_path, write_json
from latentlab.config import SpeechSource, SpeechSynthesis
from latentlab.data.raw import RawDataset, sha256_file
from latentlab.data.store import SplitArrays
from latentlab.errors import ConfigError, DataError

logger = logging.getLogger("latentlab.data.speech")

FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.zip"
FSDD_PATTERN = "{digit}_{speaker}_{index}.wav"
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))

# FSDD convention: indices 0-4 of every (speaker, digit) are the test set.
FSDD_TEST_INDICES = range(5)
FSDD_MIN_INDICES = 10

# The fixed parts of the spectrogram definition (stored in the manifest so that
# inversion uses exactly what produced the data).
_MEL_FIXED: dict[str, Any] = {"power": 2.0, "center": True, "htk": False, "norm": "slaney"}
_AMIN = 1e-10  # power floor before log10: -100 dB
_MEL_BATCH = 512  # clips per melspectrogram call; bounds the STFT's memory (~35 MB at the defaults)
_WAV_FORMATS = frozenset({"WAV", "WAVEX"})
_SYNTH_TRIM_DB = 40.0  # espeak-ng pads words with silence; FSDD clips are trimmed, so trim too
_SYNTH_WORKERS = 4
_NAME_RE = re.compile(r"^(\d)_([^_\s]+)_(\d+)\.wav$")


# ------------------------------------------------------------------ file level
def parse_fsdd_name(path: str | Path) -> tuple[int, str, int]:
    """``{digit}_{speaker}_{index}.wav`` -> (digit, speaker, index), e.g. ``3_theo_12.wav`` -> (3, "theo", 12)."""
    name = Path(path).name
    match = _NAME_RE.match(name)
    if match is None:
        raise DataError(f"{path}: file name does not follow {FSDD_PATTERN} (digit 0-9, speaker without '_', index)")
    return int(match.group(1)), match.group(2), int(match.group(3))


def read_wav(path: str | Path, sample_rate: int, n_samples: int) -> np.ndarray:
    """Read a mono WAV as ``float32`` of shape (n_samples,) in [-1, 1].

    The clip is resampled to ``sample_rate`` (soxr_hq, deterministic), then
    trimmed or zero-padded at the end to ``n_samples``. Anything that is not a
    readable, non-empty, mono, finite WAV raises a one-line DataError.
    """
    import soundfile as sf

    path = Path(path)
    try:
        info = sf.info(str(path))
        if info.format not in _WAV_FORMATS:
            raise DataError(f"{path}: not a WAV file (soundfile reads it as {info.format})")
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except DataError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: cannot read as a WAV file ({exc})") from None
    if data.shape[0] == 0:
        raise DataError(f"{path}: empty WAV (0 frames)")
    if data.shape[1] != 1:
        # Mixing channels down would silently change the data; FSDD is mono.
        raise DataError(f"{path}: has {data.shape[1]} channels, expected mono (1 channel)")
    audio = data[:, 0]
    if not np.isfinite(audio).all():
        raise DataError(f"{path}: contains NaN or infinite samples")
    if file_rate != sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=file_rate, target_sr=sample_rate, res_type="soxr_hq")
    return _fit_length(np.clip(audio, -1.0, 1.0).astype(np.float32), n_samples)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write ``audio`` (T,) in [-1, 1] as 16-bit PCM mono, atomically; returns the path."""
    import soundfile as sf

    path = Path(path)
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), samples, int(sample_rate), subtype="PCM_16", format="WAV")
    return path


def _fit_length(audio: np.ndarray, n_samples: int) -> np.ndarray:
    """Trim or zero-pad (at the end) a (T,) array to (n_samples,)."""
    if len(audio) >= n_samples:
        return audio[:n_samples]
    return np.pad(audio, (0, n_samples - len(audio)))


# ---------------------------------------------------------------- spectrograms
def spectrogram_params(cfg: SpeechSource) -> dict[str, Any]:
    """The spectrogram definition of ``cfg`` as a JSON-able dict (the manifest's ``extra``).

    Keys: sample_rate, n_samples, frames, n_fft, hop_length, n_mels, fmin,
    fmax (resolved: None becomes sample_rate / 2), power, center, htk, norm.
    """
    n_samples = n_samples_of(cfg)
    return {
        "sample_rate": cfg.sample_rate,
        "n_samples": n_samples,
        "frames": 1 + n_samples // cfg.hop_length,
        "n_fft": cfg.n_fft,
        "hop_length": cfg.hop_length,
        "n_mels": cfg.n_mels,
        "fmin": float(cfg.fmin),
        "fmax": float(cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2),
        **_MEL_FIXED,
    }


def n_samples_of(cfg: SpeechSource) -> int:
    """Clip length in samples: ``round(sample_rate * duration)``."""
    return int(round(cfg.sample_rate * cfg.duration))


def _as_params(params: Mapping[str, Any] | SpeechSource) -> dict[str, Any]:
    if isinstance(params, SpeechSource):
        return spectrogram_params(params)
    out = dict(params)
    if out.get("fmax") is None:
        out["fmax"] = out["sample_rate"] / 2
    out.setdefault("fmin", 0.0)
    return out


def log_mel_db(audio: np.ndarray, params: Mapping[str, Any] | SpeechSource) -> np.ndarray:
    """Power log-mel spectrograms in dB: (N, T) audio -> (N, 1, n_mels, 1 + T // hop_length) ``float32``.

    ``librosa.feature.melspectrogram`` (power 2, centred frames, Slaney mel
    scale and normalisation), then ``10 * log10(max(S, 1e-10))``; so silence is
    -100 dB. ``params`` is a :class:`SpeechSource` or a dict as returned by
    :func:`spectrogram_params`.
    """
    import librosa

    p = _as_params(params)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (N, T), got shape {audio.shape}")
    frames = 1 + audio.shape[1] // int(p["hop_length"])
    out = np.empty((audio.shape[0], 1, int(p["n_mels"]), frames), dtype=np.float32)
    # librosa vectorises over leading axes; batches keep the complex STFT small.
    for start in range(0, audio.shape[0], _MEL_BATCH):
        power = librosa.feature.melspectrogram(
            y=audio[start : start + _MEL_BATCH],
            sr=p["sample_rate"],
            n_fft=int(p["n_fft"]),
            hop_length=int(p["hop_length"]),
            n_mels=int(p["n_mels"]),
            fmin=float(p["fmin"]),
            fmax=float(p["fmax"]),
            power=2.0,
            center=True,
            htk=False,
            norm="slaney",
        )
        out[start : start + _MEL_BATCH, 0] = 10.0 * np.log10(np.maximum(power, _AMIN))
    return out


@dataclass(frozen=True)
class SpectrogramScale:
    """Maps dB spectrograms to [0, 1] and back: ``top_db`` dB below the training peak ``ref_db`` become 0."""

    ref_db: float
    top_db: float

    @classmethod
    def fit(cls, db_train: np.ndarray, top_db: float) -> SpectrogramScale:
        """Scale whose 1.0 is the training split's loudest bin; ``db_train`` has any shape."""
        if db_train.size == 0:
            raise ValueError("cannot fit a spectrogram scale on an empty training split")
        return cls(ref_db=float(np.max(db_train)), top_db=float(top_db))

    @property
    def floor_db(self) -> float:
        return self.ref_db - self.top_db

    def to_unit(self, db: np.ndarray) -> np.ndarray:
        """dB (any shape) -> ``float32`` in [0, 1], same shape; below ``ref_db - top_db`` clips to 0."""
        unit = (np.asarray(db, dtype=np.float32) - np.float32(self.floor_db)) / np.float32(self.top_db)
        return np.clip(unit, 0.0, 1.0).astype(np.float32, copy=False)

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] (any shape) -> dB ``float32``, same shape (the inverse of :meth:`to_unit` above the floor)."""
        return (np.asarray(unit, dtype=np.float32) * np.float32(self.top_db) + np.float32(self.floor_db)).astype(
            np.float32, copy=False
        )

    def to_json(self) -> dict[str, float]:
        return {"ref_db": self.ref_db, "top_db": self.top_db}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SpectrogramScale:
        return cls(ref_db=float(obj["ref_db"]), top_db=float(obj["top_db"]))


def spectrogram_to_audio(
    unit: np.ndarray,
    extra: Mapping[str, Any],
    n_iter: int = 32,
    scale: SpectrogramScale | None = None,
) -> np.ndarray:
    """Invert one stored spectrogram, (1, n_mels, frames) or (n_mels, frames) in [0, 1], to audio (n_samples,).

    ``extra`` is the manifest's ``extra`` (spectrogram parameters and
    ``"scale"``; ``scale`` overrides the latter). The phase is estimated with
    Griffin-Lim from a fixed random state, so the result is deterministic.
    """
    import librosa

    if scale is None:
        if "scale" not in extra:
            raise DataError("spectrogram parameters have no 'scale'; the dataset was not ingested by latentlab")
        scale = SpectrogramScale.from_json(extra["scale"])
    p = _as_params(extra)
    mel = np.asarray(unit, dtype=np.float32)
    if mel.ndim == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.ndim != 2:
        raise ValueError(f"spectrogram must be (1, n_mels, frames) or (n_mels, frames), got shape {unit.shape}")
    power = np.power(10.0, scale.from_unit(mel).astype(np.float64) / 10.0)
    # mel_to_audio does not take a random state, so do its two steps here.
    stft_mag = librosa.feature.inverse.mel_to_stft(
        power,
        sr=p["sample_rate"],
        n_fft=int(p["n_fft"]),
        power=2.0,
        fmin=float(p["fmin"]),
        fmax=float(p["fmax"]),
        htk=False,
        norm="slaney",
    )
    audio = librosa.griffinlim(
        stft_mag,
        n_iter=n_iter,
        hop_length=int(p["hop_length"]),
        n_fft=int(p["n_fft"]),
        center=True,
        length=int(p["n_samples"]),
        random_state=0,
    )
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


# -------------------------------------------------------------------- folders
def read_speech_folder(folder: str | Path, cfg: SpeechSource) -> RawDataset:
    """Read every ``*.wav`` in ``folder`` (FSDD naming) into a :class:`RawDataset`.

    ``x``: dB log-mel ``float32`` (N, 1, n_mels, frames); ``y``: digits (N,);
    ``ids``: file names (N,); ``audio``: ``float32`` (N, n_samples). Parts are
    FSDD's ``"train"``/``"test"`` (indices 0-4 are test) when every (speaker,
    digit) has indices 0-4 and at least 10 indices, else one part ``"all"``.
    """
    return _read_folder(Path(folder), cfg, fsdd_split=True)


def _read_folder(folder: Path, cfg: SpeechSource, fsdd_split: bool) -> RawDataset:
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected a folder of {FSDD_PATTERN} files")
    files = sorted(folder.glob("*.wav"), key=lambda f: f.name)
    if not files:
        raise DataError(f"{folder}: no *.wav files; expected files named {FSDD_PATTERN}")
    names = [parse_fsdd_name(f) for f in files]
    n_samples = n_samples_of(cfg)
    audio = np.stack([read_wav(f, cfg.sample_rate, n_samples) for f in files])
    x = log_mel_db(audio, cfg)
    y = np.array([digit for digit, _, _ in names], dtype=np.int64)
    ids = np.array([f.name for f in files])
    # One checksum over (name, sha256) pairs: a manifest with 3,000 entries is unreadable.
    listing = "".join(f"{f.name}\t{sha256_file(f)}\n" for f in files)
    speakers = sorted({speaker for _, speaker, _ in names})
    source: dict[str, Any] = {
        "kind": "speech",
        "location": str(folder),
        "files_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
        "n_files": len(files),
        "speakers": speakers,
        "synthetic": False,
        "subset": False,
    }
    arrays = SplitArrays(x=x, y=y, ids=ids, audio=audio)
    if fsdd_split and _has_fsdd_split(names):
        test = np.array([index in FSDD_TEST_INDICES for _, _, index in names])
        parts = {"train": arrays.subset(np.flatnonzero(~test)), "test": arrays.subset(np.flatnonzero(test))}
    else:
        parts = {"all": arrays}
    return RawDataset(
        parts=parts,
        class_names=CLASS_NAMES,
        modality="spectrogram",
        source=source,
        extra=spectrogram_params(cfg),
    )


def _has_fsdd_split(names: list[tuple[int, str, int]]) -> bool:
    """True when every (speaker, digit) of the folder has indices 0-4 and at least 10 indices.

    Pairs are taken over all speakers x all digits seen, so a speaker missing a
    digit also disables the split (its test set would lack that class).
    """
    indices: dict[tuple[str, int], set[int]] = {}
    for digit, speaker, index in names:
        indices.setdefault((speaker, digit), set()).add(index)
    speakers = {s for s, _ in indices}
    digits = {d for _, d in indices}
    for pair in product(speakers, digits):
        got = indices.get(pair, set())
        if len(got) < FSDD_MIN_INDICES or not set(FSDD_TEST_INDICES) <= got:
            return False
    return True


# ---------------------------------------------------------------- espeak-ng
def voice_slug(voice: str) -> str:
    """File-name form of an espeak-ng voice: non-alphanumerics dropped (``en-us+f3`` -> ``enusf3``)."""
    return re.sub(r"[^A-Za-z0-9]", "", voice)


def espeak_version() -> str:
    """``espeak-ng --version`` without the data path, e.g. ``eSpeak NG text-to-speech: 1.51``.

    DataError when espeak-ng is not installed.
    """
    exe = _espeak_exe()
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    line = (done.stdout.strip().splitlines() or ["unknown"])[0]
    # "eSpeak NG text-to-speech: 1.51  Data at: /usr/lib/...": the data path is machine-specific.
    return line.split("  Data at")[0].strip()


def _espeak_exe() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError(
            "espeak-ng is not installed, so no offline spoken-digit substitute can be made: "
            "install Debian's espeak-ng (apt-get install espeak-ng) or set ingest.datasets.<name>.path "
            "to a folder of FSDD WAVs ({digit}_{speaker}_{index}.wav)"
        )
    return exe


def synthesis_settings(synthesis: SpeechSynthesis, sample_rate: int) -> dict[str, Any]:
    """What determines a synthesis (compared with ``SYNTHETIC.json`` to reuse one)."""
    return {
        "generator": "espeak-ng",
        "words": list(DIGIT_WORDS),
        "voices": list(synthesis.voices),
        "speeds": list(synthesis.speeds),
        "pitches": list(synthesis.pitches),
        "sample_rate": int(sample_rate),
        "trim_top_db": _SYNTH_TRIM_DB,
    }


def _synthesis_plan(synthesis: SpeechSynthesis) -> list[tuple[str, int, int, int, str]]:
    """(voice, speed, pitch, digit, file name) for every clip, in a fixed order."""
    slugs: dict[str, str] = {}
    for voice in synthesis.voices:
        slug = voice_slug(voice)
        if not slug:
            raise ConfigError(f"speech synthesis voice {voice!r} has no letters or digits to name its files")
        if slug in slugs and slugs[slug] != voice:
            raise ConfigError(f"speech synthesis voices {slugs[slug]!r} and {voice!r} both map to file prefix {slug!r}")
        slugs[slug] = voice
    plan = []
    for voice in dict.fromkeys(synthesis.voices):  # repeated voices would only overwrite files
        for index, (speed, pitch) in enumerate(product(synthesis.speeds, synthesis.pitches)):
            for digit in range(10):
                plan.append((voice, speed, pitch, digit, f"{digit}_{voice_slug(voice)}_{index}.wav"))
    return plan


def synthesize_digits(out_dir: Path, synthesis: SpeechSynthesis, sample_rate: int) -> list[Path]:
    """Speak "zero".."nine" with every voice x speed x pitch of ``synthesis`` into ``out_dir``.

    Files are ``{digit}_{voiceslug}_{index}.wav`` (16-bit mono at
    ``sample_rate``, leading and trailing silence trimmed) where ``index``
    numbers the (speed, pitch) combinations; ``out_dir/SYNTHETIC.json`` records
    the espeak-ng version and the settings. ``out_dir`` is replaced atomically.
    Returns the WAV paths, sorted.
    """
    exe = _espeak_exe()
    version = espeak_version()
    plan = _synthesis_plan(synthesis)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix="espeak-") as scratch:

        def speak(item: tuple[str, int, int, int, str]) -> None:
            voice, speed, pitch, digit, name = item
            raw = Path(scratch) / name
            cmd = [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), DIGIT_WORDS[digit]]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0 or not raw.exists():
                why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
                raise DataError(f"espeak-ng failed for voice {voice!r} speed {speed} pitch {pitch}: {why}")
            write_wav(tmp / name, _trimmed(raw, sample_rate), sample_rate)

        # One subprocess per clip; a few at a time overlap process start-up and I/O.
        with ThreadPoolExecutor(_SYNTH_WORKERS) as pool:
            list(pool.map(speak, plan))
        write_json(tmp / "SYNTHETIC.json", {"espeak_ng_version": version, **synthesis_settings(synthesis, sample_rate)})
    return sorted(out_dir / name for *_, name in plan)


def _trimmed(path: Path, sample_rate: int) -> np.ndarray:
    """An espeak-ng WAV resampled to ``sample_rate`` with silence trimmed at both ends, (T,) float32."""
    import librosa
    import soundfile as sf

    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if rate != sample_rate:
        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    trimmed, _ = librosa.effects.trim(audio, top_db=_SYNTH_TRIM_DB)
    return trimmed if len(trimmed) else audio


def _synthesis_matches(folder: Path, synthesis: SpeechSynthesis, sample_rate: int) -> bool:
    """True when ``folder`` holds a complete synthesis made with these settings."""
    try:
        recorded = json.loads((folder / "SYNTHETIC.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    recorded.pop("espeak_ng_version", None)
    if recorded != synthesis_settings(synthesis, sample_rate):
        return False
    expected = {name for *_, name in _synthesis_plan(synthesis)}
    return expected == {f.name for f in folder.glob("*.wav")}


# ------------------------------------------------------------------- download
def download_fsdd(dest: Path, timeout: float = 20) -> Path:
    """Download FSDD v1.0.10 and unpack its ``recordings/`` into ``dest/recordings`` (atomically).

    Returns ``dest/recordings``. Any network or archive problem raises a one-line DataError.
    """
    dest = Path(dest)
    target = dest / "recordings"
    try:
        with urllib.request.urlopen(FSDD_URL, timeout=timeout) as response:
            payload = response.read()
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except (urllib.error.URLError, OSError, TimeoutError, zipfile.BadZipFile) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{FSDD_URL}: cannot download the Free Spoken Digit Dataset ({reason})") from None
    with archive, atomic_dir(target) as tmp:
        count = 0
        for member in archive.infolist():
            parts = Path(member.filename).parts
            # Only the flat recordings/*.wav; the base name also guards against ../ paths.
            if len(parts) >= 3 and parts[-2] == "recordings" and parts[-1].endswith(".wav") and not member.is_dir():
                (tmp / parts[-1]).write_bytes(archive.read(member))
                count += 1
        if count == 0:
            raise DataError(f"{FSDD_URL}: the archive has no recordings/*.wav files")
    logger.info("downloaded %d FSDD recordings into %s", count, target)
    return target


# ------------------------------------------------------------------ resolution
def locate_speech(cfg: SpeechSource, raw_dir: Path) -> RawDataset:
    """Resolve the spoken-digit source and read it (see the module docstring for the order).

    ``raw_dir`` is the dataset's raw folder (``data/raw/{dataset}``); FSDD goes
    to ``raw_dir/fsdd/recordings`` and the espeak-ng substitute to
    ``raw_dir/espeak``. Synthetic data comes back as one part ``"all"``.
    """
    raw_dir = Path(raw_dir)
    if cfg.path is not None:
        logger.info("speech: reading %s (ingest path is set)", cfg.path)
        return read_speech_folder(cfg.path, cfg)

    fsdd = raw_dir / "fsdd" / "recordings"
    if fsdd.is_dir() and any(fsdd.glob("*.wav")):
        logger.info("speech: reading FSDD recordings already downloaded to %s", fsdd)
        return _with_url(read_speech_folder(fsdd, cfg))
    try:
        fsdd = download_fsdd(raw_dir / "fsdd")
    except DataError as exc:
        logger.warning("speech: %s; using the espeak-ng offline substitute instead", exc)
    else:
        logger.info("speech: reading FSDD recordings downloaded to %s", fsdd)
        return _with_url(read_speech_folder(fsdd, cfg))

    synth = cfg.synthesis
    espeak_dir = raw_dir / "espeak"
    if _synthesis_matches(espeak_dir, synth, cfg.sample_rate):
        logger.info("speech: reusing the espeak-ng synthesis in %s (same settings)", espeak_dir)
    else:
        logger.info("speech: synthesizing spoken digits with espeak-ng into %s", espeak_dir)
        synthesize_digits(espeak_dir, synth, cfg.sample_rate)
    data = _read_folder(espeak_dir, cfg, fsdd_split=False)
    recorded = json.loads((espeak_dir / "SYNTHETIC.json").read_text(encoding="utf-8"))
    note = (
        "offline substitute: digits spoken by espeak-ng "
        f"(voices {', '.join(synth.voices)}; speeds {', '.join(map(str, synth.speeds))} wpm; "
        f"pitches {', '.join(map(str, synth.pitches))}), not the FSDD recordings"
    )
    source = {
        **data.source,
        "synthetic": True,
        "note": note,
        "espeak_ng_version": recorded.get("espeak_ng_version", "unknown"),
    }
    return RawDataset(
        parts=data.parts, class_names=data.class_names, modality=data.modality, source=source, extra=data.extra
    )


def _with_url(data: RawDataset) -> RawDataset:
    return RawDataset(
        parts=data.parts,
        class_names=data.class_names,
        modality=data.modality,
        source={**data.source, "url": FSDD_URL},
        extra=data.extra,
    )
