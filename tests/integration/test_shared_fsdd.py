"""The real Free Spoken Digit Dataset from the shared dataset folder, when it is there."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from latentlab.config import SpeechSource
from latentlab.data.speech import parse_fsdd_name, read_speech_folder

SHARED_FSDD = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "fsdd" / "recordings"
SPEAKERS = ("george", "jackson")
DIGITS = (0, 4, 9)


@pytest.mark.shared_data
def test_shared_fsdd_subset(tmp_path: Path) -> None:
    if not SHARED_FSDD.is_dir():
        pytest.skip(f"shared FSDD recordings not found at {SHARED_FSDD}")
    # 2 speakers x 3 digits x 10 indices = 60 real recordings.
    for speaker in SPEAKERS:
        for digit in DIGITS:
            for index in range(10):
                name = f"{digit}_{speaker}_{index}.wav"
                if not (SHARED_FSDD / name).is_file():
                    pytest.skip(f"{SHARED_FSDD / name} is missing from the shared FSDD copy")
                shutil.copy(SHARED_FSDD / name, tmp_path / name)

    data = read_speech_folder(tmp_path, SpeechSource(kind="speech"))

    assert set(data.parts) == {"train", "test"}
    train, test = data.parts["train"], data.parts["test"]
    assert len(train) == len(test) == 30
    assert {parse_fsdd_name(n)[2] for n in test.ids} == set(range(5))
    assert {parse_fsdd_name(n)[2] for n in train.ids} == set(range(5, 10))
    for part in (train, test):
        assert part.x.shape == (30, 1, 32, 32) and part.x.dtype == np.float32
        assert part.audio is not None and part.audio.shape == (30, 8000)
        assert np.abs(part.audio).max() <= 1.0 and np.abs(part.audio).max() > 0.05  # real speech, not silence
        assert sorted(set(part.y.tolist())) == list(DIGITS)
        assert np.isfinite(part.x).all() and part.x.max() > -100.0
    assert data.source["speakers"] == list(SPEAKERS) and data.source["n_files"] == 60
    assert data.extra["sample_rate"] == 8000
