"""Shared fixtures: tiny datasets written by the tests, and a params.yaml shrunk
from the real one (as lightning-hydra-template's fixtures shrink its config)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Any

# Under pytest-xdist (pyproject's addopts run 2 workers), each worker and every process it
# starts uses one CPU thread: two torch processes that each take every core slow each other
# several-fold. Set before numpy or torch is imported, since OpenMP reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The dvc.yaml of each stage group. The root one holds the data stages and the report; the others
# are split out because DVC rewrites a dvc.yaml's whole dvc.lock after every stage.
DVC_FILES = {
    "ingest": "dvc.yaml",
    "validate": "dvc.yaml",
    "corrupt": "dvc.yaml",
    "report": "dvc.yaml",
    "train": "pipelines/train/dvc.yaml",
    "evaluate": "pipelines/evaluate/dvc.yaml",
    "compare": "pipelines/studies/dvc.yaml",
    "anomaly": "pipelines/studies/dvc.yaml",
    "sparsity": "pipelines/studies/dvc.yaml",
    "classifier": "pipelines/generative/dvc.yaml",
    "generate": "pipelines/generative/dvc.yaml",
    "collapse": "pipelines/generative/dvc.yaml",
}
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# Keep tests from touching the project's own MLflow store or Prefect home.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Stage commands start cold in tests, unless a test turns the warm server on
# (tests/unit/test_warm.py, the DVC pipeline test) with a folder of its own and stops it.
os.environ.setdefault("LATENTLAB_WARM", "0")


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x0000 08 ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_digit_images(n_per_class: int, n_classes: int, size: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class shows as a bright bar at a class-specific row, plus noise.

    Structured enough that PCA finds it, random enough that nothing is degenerate.
    Returns x uint8 (N, size, size) and y int64 (N,).
    """
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label in range(n_classes):
        imgs = rng.integers(0, 60, size=(n_per_class, size, size))
        row = (label * 2 + 1) % size
        imgs[:, row, 1:-1] = rng.integers(180, 256, size=(n_per_class, size - 2))
        xs.append(imgs)
        ys.append(np.full(n_per_class, label))
    return np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int64)


@pytest.fixture
def tiny_idx_folder(tmp_path: Path) -> Path:
    """A tiny MNIST-like IDX folder: 3 classes, 60 train and 15 test images of 12x12."""
    folder = tmp_path / "tiny_idx"
    x, y = make_digit_images(20, 3, seed=1)
    xt, yt = make_digit_images(5, 3, seed=2)
    write_idx(folder / "train-images-idx3-ubyte.gz", x, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte.gz", y.astype(np.uint8), gz=True)
    write_idx(folder / "t10k-images-idx3-ubyte", xt)
    write_idx(folder / "t10k-labels-idx1-ubyte", yt.astype(np.uint8))
    return folder


def tiny_params(data_root: Path, datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The real params.yaml, shrunk: only ``datasets``, few latent sizes, small corruptions."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pipeline"]["datasets"] = list(datasets)
    params["ingest"]["datasets"] = datasets
    params["validate"]["min_samples"] = {"train": 5, "val": 1, "test": 1}
    params["train"]["models"] = ["pca"]
    params["train"]["zoo"]["pca"]["latent_sizes"] = [2, 4]
    params["evaluate"]["latent"]["models"] = ["pca"]
    params["evaluate"]["latent"]["max_samples"] = 100
    params["evaluate"]["anomaly"]["datasets"] = []
    params["evaluate"]["sparsity"]["datasets"] = []
    params["generate"]["datasets"] = []
    params["collapse"]["datasets"] = []
    params["corrupt"]["block_size"] = [4]
    params["corrupt"]["audio_train_draws"] = 2  # the extra-draw path still runs, at an eighth of the copies
    # Models that learn from the 12-pixel block learn from the 4-pixel one.
    for spec in params["train"]["zoo"].values():
        for modality, names in (spec.get("denoise_from") or {}).items():
            listed = [names] if isinstance(names, str) else names
            spec["denoise_from"][modality] = ["block4" if n == "block12" else n for n in listed]
    params["evaluate"]["grid_size"] = 4
    return params


def write_tone_wavs(folder: Path, per_digit: int, sample_rate: int = 8000, seconds: float = 0.25) -> Path:
    """FSDD-named WAVs ``{digit}_{speaker}_{index}.wav``: a tone per digit (300 + 150*digit Hz)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    rng = np.random.default_rng(0)
    for digit in range(10):
        for index in range(per_digit):
            tone = 0.4 * np.sin(2 * np.pi * (300 + 150 * digit) * t) + 0.01 * rng.normal(size=t.size)
            sf.write(folder / f"{digit}_tester_{index}.wav", tone.astype(np.float32), sample_rate, subtype="PCM_16")
    return folder


def write_project(root: Path, params: dict[str, Any]) -> Path:
    """A temporary copy of the repository's pipeline (every dvc.yaml, sources) with ``params``.

    The stages live in the root dvc.yaml and pipelines/*/dvc.yaml; their dvc.lock files stay behind.
    """
    import shutil

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for dvc_yaml in (REPO / "pipelines").glob("*/dvc.yaml"):
        target = root / dvc_yaml.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dvc_yaml, target)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


BAR_CLASSES = ("row", "column", "diagonal")


def bar_images(n: int, label: int, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """(n, 1, size, size) uint8: faint noise plus a bright class-specific bar (a row, a column, the diagonal)."""
    x = rng.integers(0, 40, size=(n, 1, size, size))
    bright = rng.integers(200, 256, size=(n, size))
    idx = np.arange(size)
    if label == 0:
        x[:, 0, 2, :] = bright  # a row
    elif label == 1:
        x[:, 0, :, 5] = bright  # a column
    else:
        x[:, 0, idx, idx] = bright  # the diagonal
    return x.astype(np.uint8)


def write_bar_dataset(folder: Path, name: str, per_class: dict[str, int], size: int = 8) -> None:
    """A processed three-class dataset of :func:`bar_images` (seed 0), classes interleaved in every split."""
    from latentlab.data.store import Manifest, SplitArrays, save_manifest, save_split

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        x = np.concatenate([bar_images(n, c, rng, size) for c in range(3)])
        y = np.repeat(np.arange(3), n).astype(np.int64)
        order = rng.permutation(len(y))  # no split sorted by label
        save_split(folder, split, SplitArrays(x=x[order], y=y[order], ids=np.arange(len(y))[order]))
    save_manifest(
        folder,
        Manifest(
            name=name,
            modality="image",
            shape=(1, size, size),
            class_names=BAR_CLASSES,
            counts={s: 3 * n for s, n in per_class.items()},
            source={"kind": "synthetic"},
        ),
    )


def tone_clips(n: int, t: int = 4000, sr: int = 8000) -> np.ndarray:
    """n sine tones of distinct frequencies and amplitudes, (n, t) float32."""
    time = np.arange(t) / sr
    freqs = 200.0 + 50.0 * np.arange(n)[:, None]
    amps = np.linspace(0.05, 0.8, n)[:, None]
    return (amps * np.sin(2 * np.pi * freqs * time)).astype(np.float32)


def write_tone_spectrograms(folder: Path, silent_row: int | None = None, name: str = "digits") -> Path:
    """Tiny processed speech-like dataset (12/6/6 clips): tones with faint noise, processed as ingest does it.

    ``silent_row``: that test clip is all zeros.
    """
    from latentlab.config import SpeechSource
    from latentlab.data import speech
    from latentlab.data.store import Manifest, SplitArrays, save_manifest, save_split

    source = SpeechSource(kind="speech", sample_rate=8000, duration=0.25, n_fft=256, hop_length=128, n_mels=16)
    extra = speech.spectrogram_params(source)
    counts = {"train": 12, "val": 6, "test": 6}
    rng = np.random.default_rng(1)
    audio = {}
    for split, n in counts.items():
        clips = tone_clips(n, t=extra["n_samples"])
        audio[split] = clips + 0.01 * rng.standard_normal((n, extra["n_samples"])).astype(np.float32)
    if silent_row is not None:
        audio["test"][silent_row] = 0.0
    scale = speech.SpectrogramScale.fit(speech.log_mel_db(audio["train"], extra), source.top_db)
    extra["scale"] = scale.to_json()
    for split, a in audio.items():
        x = scale.to_unit(speech.log_mel_db(a, extra)).astype(np.float16)
        save_split(folder, split, SplitArrays(x=x, y=np.arange(len(a)) % 3, ids=np.arange(len(a)), audio=a))
    shape = (1, extra["n_mels"], extra["frames"])
    save_manifest(folder, Manifest(name, "spectrogram", shape, ("0", "1", "2"), counts, {"kind": "test"}, extra))
    return folder
