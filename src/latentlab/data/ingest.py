"""The ``ingest`` stage: read a source, split it, write the processed form.

One source kind, one reader, chosen through :data:`READERS` (no if/elif chain).
Splits are stratified by class and drawn from a fixed seed, so a rerun with the
same parameters writes byte-identical files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from latentlab.atomic import atomic_dir
from latentlab.config import (
    CsvSource,
    DatasetSource,
    IdxSource,
    ImageFolderSource,
    IngestConfig,
    Sat6Source,
    SpeechSource,
)
from latentlab.data.raw import RawDataset
from latentlab.data.store import Manifest, SplitArrays, save_manifest, save_split
from latentlab.errors import DataError

log = logging.getLogger(__name__)

Reader = Callable[[str, Any, Path], RawDataset]  # (dataset name, source config, raw folder)


def _read_idx(name: str, cfg: IdxSource, raw_dir: Path) -> RawDataset:
    from latentlab.data import idx

    if cfg.kind == "idx":
        if cfg.path is None:
            raise DataError(
                f"params.yaml: ingest.datasets.{name}.path: a dataset of kind 'idx' needs the folder of its IDX files"
            )
        return idx.read_idx_folder(cfg.path, cfg.class_names, kind="idx")
    return idx.locate_idx_source(cfg.kind, cfg.path, raw_dir, class_names=cfg.class_names, name=name)


def _read_image_folder(name: str, cfg: ImageFolderSource, raw_dir: Path) -> RawDataset:
    from latentlab.data.image_folder import read_image_folder

    return read_image_folder(cfg.path, cfg.channels, cfg.size)


def _read_csv(name: str, cfg: CsvSource, raw_dir: Path) -> RawDataset:
    from latentlab.data.csv_pixels import read_pixel_csv

    return read_pixel_csv(cfg.path, cfg.label_column, cfg.shape, cfg.class_names)


def _read_sat6(name: str, cfg: Sat6Source, raw_dir: Path) -> RawDataset:
    from latentlab.data.sat6 import read_sat6

    return read_sat6(cfg.path, cfg.max_rows, name=name)


def _read_speech(name: str, cfg: SpeechSource, raw_dir: Path) -> RawDataset:
    from latentlab.data.speech import locate_speech

    return locate_speech(cfg, raw_dir)


#: Source kind (``ingest.datasets.<name>.kind``) -> reader.
READERS: dict[str, Reader] = {
    "mnist": _read_idx,
    "fashion_mnist": _read_idx,
    "idx": _read_idx,
    "image_folder": _read_image_folder,
    "csv": _read_csv,
    "sat6": _read_sat6,
    "speech": _read_speech,
}


def stratified_split(y: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split indices ``0..len(y)-1`` per class into parts of the given fractions.

    ``fractions`` maps part names to shares; the first part takes the remainder.
    Each class is shuffled with its own generator seeded by (seed, label), and
    every class with at least as many samples as parts gives each part one, so
    small classes are not lost from validation or test. Indices come back sorted.
    """
    names = list(fractions)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng = np.random.default_rng([seed, int(label)])
        members = rng.permutation(members)
        n = len(members)
        start = 0
        for name in names[1:]:
            take = int(round(fractions[name] * n))
            if take == 0 and n >= len(names):
                take = 1
            parts[name].append(members[start : start + take])
            start += take
        parts[names[0]].append(members[start:])
    return {name: np.sort(np.concatenate(chunks)) if chunks else np.array([], int) for name, chunks in parts.items()}


def split_dataset(raw: RawDataset, cfg: IngestConfig) -> dict[str, SplitArrays]:
    """train / val / test from the reader's parts, with the configured fractions and seed."""
    if "test" in raw.parts:
        train_part = raw.parts.get("train")
        if train_part is None:
            raise DataError(f"{raw.source.get('location')}: source has a test split but no training split")
        index = stratified_split(train_part.y, {"train": 1.0 - cfg.val_fraction, "val": cfg.val_fraction}, cfg.seed)
        return {
            "train": train_part.subset(index["train"]),
            "val": train_part.subset(index["val"]),
            "test": raw.parts["test"],
        }
    whole = raw.parts["all"]
    train_share = 1.0 - cfg.val_fraction - cfg.test_fraction
    if train_share <= 0:
        raise DataError("params.yaml: ingest.val_fraction + ingest.test_fraction must be below 1")
    index = stratified_split(
        whole.y, {"train": train_share, "val": cfg.val_fraction, "test": cfg.test_fraction}, cfg.seed
    )
    return {name: whole.subset(idx) for name, idx in index.items()}


def _scale_spectrograms(splits: dict[str, SplitArrays], cfg: SpeechSource) -> tuple[dict[str, SplitArrays], dict]:
    """dB spectrograms -> float16 in [0, 1], with the training split's peak as reference."""
    from latentlab.data.speech import SpectrogramScale

    scale = SpectrogramScale.fit(splits["train"].x, cfg.top_db)
    scaled = {
        name: SplitArrays(x=scale.to_unit(s.x).astype(np.float16), y=s.y, ids=s.ids, audio=s.audio)
        for name, s in splits.items()
    }
    return scaled, {"scale": scale.to_json()}


def ingest_dataset(name: str, source: DatasetSource, cfg: IngestConfig, out_dir: Path, raw_dir: Path) -> Manifest:
    """Read dataset ``name`` from its source and write ``out_dir`` (``data/processed/{name}``).

    Nothing is written unless everything succeeds.
    """
    raw = READERS[source.kind](name, source, raw_dir)
    if not raw.parts or any(len(p) == 0 for p in raw.parts.values()):
        raise DataError(f"{raw.source.get('location')}: the source holds no samples")
    splits = split_dataset(raw, cfg)
    extra = dict(raw.extra)
    if raw.modality == "spectrogram":
        assert isinstance(source, SpeechSource)
        splits, scale_extra = _scale_spectrograms(splits, source)
        extra.update(scale_extra)
    x0 = splits["train"].x
    manifest = Manifest(
        name=name,
        modality=raw.modality,
        shape=(int(x0.shape[1]), int(x0.shape[2]), int(x0.shape[3])),
        class_names=raw.class_names,
        counts={split: len(arrays) for split, arrays in splits.items()},
        source=raw.source,
        extra=extra,
    )
    with atomic_dir(out_dir) as tmp:
        for split, arrays in splits.items():
            save_split(tmp, split, arrays)
        save_manifest(tmp, manifest)
    log.info("ingested %s from %s: %s", name, raw.source.get("location"), manifest.counts)
    return manifest
