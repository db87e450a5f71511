"""The processed dataset format under ``data/processed/{dataset}/``.

One uncompressed ``{split}.npz`` per split (train, val, test) plus ``manifest.json``:

- ``x``: images as ``uint8`` of shape (N, C, H, W), 0..255; spectrograms as
  ``float16`` of shape (N, 1, n_mels, frames), already scaled to [0, 1].
- ``y``: ``int64`` labels of shape (N,), in 0..K-1.
- ``audio`` (speech only): ``float32`` waveforms of shape (N, samples), in [-1, 1],
  kept so that corruptions can add noise at a target SNR in the time domain.
- ``ids``: the sample identifiers of shape (N,) (file names or source row numbers).

Uncompressed npz is read at disk speed: a full MNIST training split loads in
well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from latentlab.atomic import atomic_path
from latentlab.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
Modality = Literal["image", "spectrogram"]


@dataclass(frozen=True)
class SplitArrays:
    """The arrays of one split (see the module docstring for dtypes and shapes)."""

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    audio: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {self.x.shape}")
        for name, arr in (("y", self.y), ("ids", self.ids), ("audio", self.audio)):
            if arr is not None and len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} rows but x has {n}")

    def __len__(self) -> int:
        return len(self.x)

    def unit_float(self) -> np.ndarray:
        """``x`` as float32 in [0, 1], shape (N, C, H, W)."""
        return to_unit_float(self.x)

    def subset(self, index: np.ndarray) -> SplitArrays:
        return SplitArrays(
            x=self.x[index],
            y=self.y[index],
            ids=self.ids[index],
            audio=None if self.audio is None else self.audio[index],
        )


def to_unit_float(x: np.ndarray) -> np.ndarray:
    """Map stored pixels (uint8 0..255 or float in [0, 1]) to float32 in [0, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32, copy=False)


def from_unit_float(x: np.ndarray, like: np.dtype) -> np.ndarray:
    """Inverse of :func:`to_unit_float`: back to the stored dtype (rounding for uint8)."""
    x = np.clip(x, 0.0, 1.0)
    if np.dtype(like) == np.uint8:
        return np.rint(x * 255.0).astype(np.uint8)
    return x.astype(like)


@dataclass(frozen=True)
class Manifest:
    """What a processed dataset is and where it came from (``manifest.json``)."""

    name: str
    modality: Modality
    shape: tuple[int, int, int]  # (C, H, W) of one sample
    class_names: tuple[str, ...]
    counts: dict[str, int]  # samples per split
    source: dict[str, Any]  # kind, location, subset/synthetic flags, file checksums
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. spectrogram parameters for inversion

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "shape": list(self.shape),
            "class_names": list(self.class_names),
            "counts": dict(self.counts),
            "source": self.source,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        return cls(
            name=obj["name"],
            modality=obj["modality"],
            shape=tuple(obj["shape"]),
            class_names=tuple(obj["class_names"]),
            counts=dict(obj["counts"]),
            source=obj["source"],
            extra=obj.get("extra", {}),
        )


def save_split(folder: Path, split: str, arrays: SplitArrays) -> Path:
    """Write one split atomically; returns its path."""
    target = Path(folder) / f"{split}.npz"
    payload: dict[str, np.ndarray] = {"x": arrays.x, "y": arrays.y.astype(np.int64), "ids": arrays.ids}
    if arrays.audio is not None:
        payload["audio"] = arrays.audio.astype(np.float32)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **payload)
    return target


def load_split(folder: str | Path, split: str) -> SplitArrays:
    """Read ``{folder}/{split}.npz``."""
    path = Path(folder) / f"{split}.npz"
    if not path.exists():
        raise DataError(f"{path}: missing; run the ingest stage for this dataset first")
    with np.load(path, allow_pickle=False) as data:
        return SplitArrays(
            x=data["x"],
            y=data["y"],
            ids=data["ids"],
            audio=data["audio"] if "audio" in data.files else None,
        )


def save_manifest(folder: Path, manifest: Manifest) -> Path:
    from latentlab.atomic import write_json

    target = Path(folder) / "manifest.json"
    write_json(target, manifest.to_json())
    return target


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / "manifest.json"
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; run the ingest stage for this dataset first") from None
    except (json.JSONDecodeError, KeyError) as exc:
        raise DataError(f"{path}: not a latentlab manifest ({exc})") from None
