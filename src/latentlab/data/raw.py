"""What every reader returns: the samples of a source, before splitting."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentlab.data.store import Modality, SplitArrays


@dataclass(frozen=True)
class RawDataset:
    """A dataset as read from its source.

    ``parts`` holds ``"train"`` and ``"test"`` when the source defines a test
    split (IDX files, SAT-6, FSDD), else one part ``"all"``; the ingest stage
    carves validation (and, for ``"all"``, test) out of it with a fixed seed.

    For images ``x`` is ``uint8`` (N, C, H, W). For speech ``x`` is the log-mel
    spectrogram in dB as ``float32`` (N, 1, n_mels, frames) and ``audio`` the
    waveforms; ingest scales ``x`` to [0, 1] with the training split's peak.
    """

    parts: dict[str, SplitArrays]
    class_names: tuple[str, ...]
    modality: Modality
    # kind, location, files {name: sha256}, and flags such as subset / synthetic with a note.
    source: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
