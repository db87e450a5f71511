"""Spoken digits: WAV reading, log-mel spectrograms, scaling, inversion, espeak-ng and source resolution."""

from __future__ import annotations

import io
import json
import logging
import shutil
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from latentlab.config import SpeechSource, SpeechSynthesis
from latentlab.data import speech
from latentlab.data.speech import (
    SpectrogramScale,
    download_fsdd,
    locate_speech,
    log_mel_db,
    parse_fsdd_name,
    read_speech_folder,
    read_wav,
    spectrogram_params,
    spectrogram_to_audio,
    synthesize_digits,
    voice_slug,
    write_wav,
)
from latentlab.errors import ConfigError, DataError

HAS_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")
TINY_SYNTH = SpeechSynthesis(voices=("en-us+f3",), speeds=(160,), pitches=(40, 60))


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, audio: np.ndarray, rate: int = 8000, subtype: str = "PCM_16") -> Path:
    sf.write(str(path), audio, rate, subtype=subtype, format="WAV")
    return path


def assert_one_line_naming(exc: pytest.ExceptionInfo[DataError], name: str) -> None:
    msg = str(exc.value)
    assert name in msg
    assert "\n" not in msg


def fsdd_folder(folder: Path, speakers: tuple[str, ...], digits: tuple[int, ...], n_index: int) -> Path:
    """A folder of short FSDD-named clips; the tone depends on the digit."""
    folder.mkdir(parents=True, exist_ok=True)
    for speaker in speakers:
        for digit in digits:
            for index in range(n_index):
                write(folder / f"{digit}_{speaker}_{index}.wav", sine(300 + 100 * digit, 0.1, 8000))
    return folder


# ------------------------------------------------------------------ names
def test_parse_fsdd_name() -> None:
    assert parse_fsdd_name("3_theo_12.wav") == (3, "theo", 12)
    assert parse_fsdd_name(Path("/x/y/0_enusf3_0.wav")) == (0, "enusf3", 0)


@pytest.mark.parametrize("name", ["12_theo_1.wav", "three_theo_1.wav", "3-theo-1.wav", "3_theo.wav", "3_theo_1.flac"])
def test_parse_fsdd_name_rejects(name: str) -> None:
    with pytest.raises(DataError, match=r"\{digit\}_\{speaker\}_\{index\}\.wav") as exc:
        parse_fsdd_name(name)
    assert_one_line_naming(exc, name)


def test_voice_slug() -> None:
    assert voice_slug("en-us+f3") == "enusf3"
    assert voice_slug("en-gb") == "engb"


# ------------------------------------------------------------------- WAVs
def test_read_wav_pads_and_trims(tmp_path: Path) -> None:
    audio = sine(440, 0.3, 8000)
    path = write(tmp_path / "a.wav", audio)
    padded = read_wav(path, 8000, 8000)
    assert padded.shape == (8000,) and padded.dtype == np.float32
    np.testing.assert_allclose(padded[:2400], audio, atol=1e-4)  # 16-bit quantisation
    assert not padded[2400:].any()
    trimmed = read_wav(path, 8000, 1000)
    np.testing.assert_array_equal(trimmed, padded[:1000])


def test_read_wav_resamples(tmp_path: Path) -> None:
    path = write(tmp_path / "b.wav", sine(440, 0.3, 16000), rate=16000)
    out = read_wav(path, 8000, 2400)
    assert out.shape == (2400,)
    assert np.abs(out).max() <= 1.0
    # 0.3 s at 8 kHz is 2,400 samples of tone: the end is not padding.
    assert np.abs(out[-200:]).max() > 0.3
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 8000 / len(out) - 440) < 5


def test_read_wav_bad_inputs(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo.wav"
    sf.write(str(stereo), np.zeros((800, 2), np.float32), 8000, subtype="PCM_16")
    empty = write(tmp_path / "empty.wav", np.zeros(0, np.float32))
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not a RIFF file at all" * 10)
    nan = write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2] * 100, np.float32), subtype="FLOAT")
    flac = tmp_path / "flac.wav"
    sf.write(str(flac), np.zeros(800, np.float32), 8000, format="FLAC")
    cases = {stereo: "2 channels", empty: "empty", garbage: "cannot read", nan: "NaN", flac: "not a WAV"}
    for path, what in cases.items():
        with pytest.raises(DataError, match=what) as exc:
            read_wav(path, 8000, 8000)
        assert_one_line_naming(exc, path.name)


def test_write_wav_round_trip(tmp_path: Path) -> None:
    audio = sine(500, 0.2, 8000)
    path = write_wav(tmp_path / "out" / "x.wav", audio * 3, 8000)  # out of range: clipped, not wrapped
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
    back = read_wav(path, 8000, len(audio))
    assert back.max() > 0.99 and back.min() < -0.99
    assert [p.name for p in path.parent.iterdir()] == ["x.wav"]  # no temporary left behind


# ---------------------------------------------------------- spectrograms
def test_log_mel_db_shape_and_frames() -> None:
    cfg = SpeechSource(kind="speech", duration=0.5, hop_length=128, n_mels=16, n_fft=256)
    audio = np.stack([sine(440, 0.5, 8000), np.zeros(4000, np.float32)])
    db = log_mel_db(audio, cfg)
    assert db.shape == (2, 1, 16, 1 + 4000 // 128) and db.dtype == np.float32
    assert np.allclose(db[1], -100.0, atol=1e-3)  # silence sits at the power floor
    # a dict of parameters gives the same result as the config
    np.testing.assert_array_equal(log_mel_db(audio, spectrogram_params(cfg)), db)


def test_default_spectrogram_is_32x32() -> None:
    cfg = SpeechSource(kind="speech")
    params = spectrogram_params(cfg)
    assert (params["n_samples"], params["frames"], params["fmax"]) == (8000, 32, 4000.0)
    assert log_mel_db(np.zeros((1, 8000), np.float32), cfg).shape == (1, 1, 32, 32)


def test_log_mel_db_tone_peaks_in_its_band() -> None:
    import librosa

    cfg = SpeechSource(kind="speech")
    p = spectrogram_params(cfg)
    fb = librosa.filters.mel(sr=p["sample_rate"], n_fft=p["n_fft"], n_mels=p["n_mels"], fmin=0.0, fmax=p["fmax"])
    for freq in (250.0, 1000.0, 2500.0):
        db = log_mel_db(sine(freq, 1.0, 8000)[None], cfg)[0, 0]
        fft_bin = int(round(freq * p["n_fft"] / p["sample_rate"]))
        assert int(np.argmax(db.mean(axis=1))) == int(np.argmax(fb[:, fft_bin])), freq


def test_spectrogram_scale_round_trip() -> None:
    db = np.array([[-100.0, -50.0], [-10.0, 5.0]], np.float32)
    scale = SpectrogramScale.fit(db, top_db=80.0)
    assert scale.ref_db == 5.0 and scale.top_db == 80.0
    unit = scale.to_unit(db)
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    above = db > scale.ref_db - scale.top_db
    np.testing.assert_allclose(scale.from_unit(unit)[above], db[above], atol=1e-4)
    assert scale.from_unit(unit)[0, 0] == pytest.approx(-75.0)  # clipped to the floor
    assert SpectrogramScale.from_json(json.loads(json.dumps(scale.to_json()))) == scale


def test_spectrogram_to_audio_keeps_the_tone() -> None:
    import librosa

    cfg = SpeechSource(kind="speech")
    extra = spectrogram_params(cfg)
    freq = 1000.0
    db = log_mel_db(sine(freq, 1.0, 8000)[None], cfg)
    scale = SpectrogramScale.fit(db, cfg.top_db)
    extra["scale"] = scale.to_json()
    unit = scale.to_unit(db[0]).astype(np.float16)  # as stored
    audio = spectrogram_to_audio(unit, extra)
    assert audio.shape == (8000,) and audio.dtype == np.float32
    assert np.array_equal(audio, spectrogram_to_audio(unit[0], extra))  # deterministic, (M, F) accepted
    peak = np.argmax(np.abs(np.fft.rfft(audio))) * 8000 / len(audio)
    band_mel = (librosa.hz_to_mel(extra["fmax"]) - librosa.hz_to_mel(extra["fmin"])) / (extra["n_mels"] + 1)
    assert abs(librosa.hz_to_mel(peak) - librosa.hz_to_mel(freq)) <= band_mel


def test_spectrogram_to_audio_needs_a_scale() -> None:
    extra = spectrogram_params(SpeechSource(kind="speech"))
    with pytest.raises(DataError, match="scale"):
        spectrogram_to_audio(np.zeros((32, 32), np.float32), extra)


# ---------------------------------------------------------------- folders
def test_read_speech_folder_fsdd_split(tmp_path: Path) -> None:
    folder = fsdd_folder(tmp_path / "rec", ("alice", "bob"), (1, 7), 10)
    data = read_speech_folder(folder, SpeechSource(kind="speech"))
    assert set(data.parts) == {"train", "test"}
    test, train = data.parts["test"], data.parts["train"]
    assert len(test) == len(train) == 20
    assert {parse_fsdd_name(n)[2] for n in test.ids} == {0, 1, 2, 3, 4}
    assert {parse_fsdd_name(n)[2] for n in train.ids} == {5, 6, 7, 8, 9}
    for part in (test, train):
        assert part.x.shape == (20, 1, 32, 32) and part.x.dtype == np.float32
        assert part.audio is not None and part.audio.shape == (20, 8000) and part.audio.dtype == np.float32
        assert [int(d) for d in part.y] == [parse_fsdd_name(n)[0] for n in part.ids]
    assert data.class_names == tuple("0123456789") and data.modality == "spectrogram"
    src = data.source
    assert src["n_files"] == 40 and src["speakers"] == ["alice", "bob"]
    assert (src["kind"], src["synthetic"], src["subset"]) == ("speech", False, False)
    assert len(src["files_sha256"]) == 64
    assert data.extra["frames"] == 32 and data.extra["power"] == 2.0


def test_read_speech_folder_without_enough_indices_is_one_part(tmp_path: Path) -> None:
    folder = fsdd_folder(tmp_path / "rec", ("alice", "bob"), (1, 7), 9)
    data = read_speech_folder(folder, SpeechSource(kind="speech", duration=0.25))
    assert list(data.parts) == ["all"]
    assert data.parts["all"].x.shape == (36, 1, 32, 1 + 2000 // 256)
    # a speaker who lacks a digit also disables the split
    folder = fsdd_folder(tmp_path / "rec2", ("alice",), (1, 7), 10)
    fsdd_folder(folder, ("bob",), (1,), 10)
    assert list(read_speech_folder(folder, SpeechSource(kind="speech")).parts) == ["all"]


def test_files_checksum_follows_content(tmp_path: Path) -> None:
    folder = fsdd_folder(tmp_path / "rec", ("alice",), (2,), 3)
    cfg = SpeechSource(kind="speech", duration=0.2)
    first = read_speech_folder(folder, cfg).source["files_sha256"]
    assert read_speech_folder(folder, cfg).source["files_sha256"] == first
    write(folder / "2_alice_1.wav", sine(900, 0.1, 8000))
    assert read_speech_folder(folder, cfg).source["files_sha256"] != first


def test_read_speech_folder_errors(tmp_path: Path) -> None:
    cfg = SpeechSource(kind="speech")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.wav") as exc:
        read_speech_folder(tmp_path / "empty", cfg)
    assert_one_line_naming(exc, "empty")
    with pytest.raises(DataError, match="not a folder"):
        read_speech_folder(tmp_path / "missing", cfg)
    folder = fsdd_folder(tmp_path / "rec", ("alice",), (1,), 2)
    write(folder / "hello.wav", sine(440, 0.1, 8000))
    with pytest.raises(DataError) as exc:
        read_speech_folder(folder, cfg)
    assert_one_line_naming(exc, "hello.wav")
    (folder / "hello.wav").unlink()
    (folder / "1_alice_5.wav").write_bytes(b"garbage")
    with pytest.raises(DataError) as exc:
        read_speech_folder(folder, cfg)
    assert_one_line_naming(exc, "1_alice_5.wav")


# ------------------------------------------------------------- espeak-ng
@needs_espeak
def test_synthesize_digits_tiny(tmp_path: Path) -> None:
    out = tmp_path / "espeak"
    paths = synthesize_digits(out, TINY_SYNTH, 8000)
    assert len(paths) == 20 and all(p.parent == out and p.exists() for p in paths)
    names = {parse_fsdd_name(p) for p in paths}
    assert names == {(d, "enusf3", i) for d in range(10) for i in (0, 1)}
    for path in paths:
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
        audio, _ = sf.read(str(path), dtype="float32")
        assert np.sqrt(np.mean(audio**2)) > 0.01, path.name
    meta = json.loads((out / "SYNTHETIC.json").read_text())
    assert meta["voices"] == ["en-us+f3"] and meta["speeds"] == [160] and meta["pitches"] == [40, 60]
    assert "1." in meta["espeak_ng_version"]
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in paths] + ["SYNTHETIC.json"])
    # Deterministic: a second synthesis (made in parallel threads too) is byte-identical.
    again = synthesize_digits(tmp_path / "again", TINY_SYNTH, 8000)
    assert [a.read_bytes() for a in again] == [p.read_bytes() for p in paths]


def test_synthesis_voice_slug_collision(tmp_path: Path) -> None:
    clash = SpeechSynthesis(voices=("en-us", "en+us"), speeds=(150,), pitches=(50,))
    with pytest.raises(ConfigError, match="enus"):
        synthesize_digits(tmp_path / "espeak", clash, 8000) if HAS_ESPEAK else speech._synthesis_plan(clash)


def test_synthesize_digits_without_espeak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="espeak-ng") as exc:
        synthesize_digits(tmp_path / "espeak", TINY_SYNTH, 8000)
    assert "ingest.datasets.<name>.path" in str(exc.value)
    assert not (tmp_path / "espeak").exists()


# --------------------------------------------------------- download/resolve
def test_download_fsdd_network_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(speech.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="name resolution") as exc:
        download_fsdd(tmp_path / "fsdd", timeout=0.1)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "fsdd" / "recordings").exists()


def test_download_fsdd_extracts_recordings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wav = io.BytesIO()
    sf.write(wav, sine(440, 0.1, 8000), 8000, subtype="PCM_16", format="WAV")
    blob = io.BytesIO()
    with zipfile.ZipFile(blob, "w") as zf:
        zf.writestr("free-spoken-digit-dataset-1.0.10/recordings/0_theo_0.wav", wav.getvalue())
        zf.writestr("free-spoken-digit-dataset-1.0.10/recordings/../../evil.wav", b"x")
        zf.writestr("free-spoken-digit-dataset-1.0.10/README.md", "readme")
    monkeypatch.setattr(speech.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob.getvalue()))
    folder = download_fsdd(tmp_path / "fsdd")
    assert folder == tmp_path / "fsdd" / "recordings"
    assert sorted(p.name for p in folder.iterdir()) == ["0_theo_0.wav"]


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(dest: Path, timeout: float = 20) -> Path:
        raise DataError(f"{speech.FSDD_URL}: cannot download the Free Spoken Digit Dataset (offline)")

    monkeypatch.setattr(speech, "download_fsdd", fail)


@needs_espeak
def test_locate_speech_offline_uses_espeak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _offline(monkeypatch)
    cfg = SpeechSource(kind="speech", synthesis=TINY_SYNTH)
    with caplog.at_level(logging.INFO, logger="latentlab.data.speech"):
        data = locate_speech(cfg, tmp_path / "raw")
    assert list(data.parts) == ["all"] and len(data.parts["all"]) == 20
    assert data.parts["all"].x.shape == (20, 1, 32, 32)
    src = data.source
    assert src["synthetic"] is True and src["kind"] == "speech"
    assert "espeak-ng" in src["note"] and "en-us+f3" in src["note"] and "not the FSDD" in src["note"]
    assert src["location"] == str(tmp_path / "raw" / "espeak") and src["speakers"] == ["enusf3"]
    assert "offline substitute" in caplog.text and "synthesizing" in caplog.text

    # Same settings: the synthesis is reused, not made again.
    def no_synthesis(*args: object) -> None:
        raise AssertionError("synthesized again")

    monkeypatch.setattr(speech, "synthesize_digits", no_synthesis)
    again = locate_speech(cfg, tmp_path / "raw")
    assert again.source == src
    # Different settings: made again.
    other = SpeechSource(kind="speech", synthesis=SpeechSynthesis(voices=("en-us",), speeds=(160,), pitches=(50,)))
    with pytest.raises(AssertionError, match="synthesized again"):
        locate_speech(other, tmp_path / "raw")


def test_locate_speech_with_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    folder = fsdd_folder(tmp_path / "mine", ("alice", "bob"), (3, 4), 10)
    data = locate_speech(SpeechSource(kind="speech", path=folder), tmp_path / "raw")
    assert set(data.parts) == {"train", "test"}
    assert data.source["location"] == str(folder) and data.source["synthetic"] is False
    assert not (tmp_path / "raw").exists()


def test_locate_speech_reuses_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_download(dest: Path, timeout: float = 20) -> Path:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(speech, "download_fsdd", no_download)
    fsdd_folder(tmp_path / "raw" / "fsdd" / "recordings", ("alice",), (5,), 10)
    data = locate_speech(SpeechSource(kind="speech"), tmp_path / "raw")
    assert set(data.parts) == {"train", "test"}
    assert data.source["synthetic"] is False and data.source["url"] == speech.FSDD_URL
