"""The real MNIST, Fashion-MNIST and SAT-6 files from the shared dataset folder, when it is there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentlab.data.idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, read_idx_folder
from latentlab.data.sat6 import CLASSES, read_sat6

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"

# sha256 of the .gz files, from each folder's PROVENANCE.md.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}


def shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"../shared/datasets is absent: {folder} not found")
    return folder


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "kind", "classes", "sha256", "train_counts"),
    [
        ("mnist", "mnist", MNIST_CLASSES, MNIST_SHA256, [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]),
        ("fashion-mnist", "fashion_mnist", FASHION_MNIST_CLASSES, FASHION_SHA256, [6000] * 10),
    ],
)
def test_shared_idx(
    name: str, kind: str, classes: tuple[str, ...], sha256: dict[str, str], train_counts: list[int]
) -> None:
    data = read_idx_folder(shared(name), classes, kind=kind)
    train, test = data.parts["train"], data.parts["test"]
    assert set(data.parts) == {"train", "test"}
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert np.bincount(train.y, minlength=10).tolist() == train_counts
    assert data.source["files"] == sha256
    assert data.source["kind"] == kind and data.source["subset"] is False
    assert data.class_names == classes


@pytest.mark.shared_data
def test_shared_sat6() -> None:
    data = read_sat6(shared("sat6"), None)
    train, test = data.parts["train"], data.parts["test"]
    assert train.x.shape == (200, 4, 28, 28) and test.x.shape == (200, 4, 28, 28)
    assert data.class_names == CLASSES
    # Class counts from PROVENANCE.md: the one-hot columns decode in sat6annotations.csv order.
    assert np.bincount(train.y, minlength=6).tolist() == [11, 46, 34, 38, 2, 69]
    assert np.bincount(test.y, minlength=6).tolist() == [8, 50, 46, 27, 4, 65]
    band_means = train.x.astype(np.float64).mean(axis=(0, 2, 3))
    assert np.all((band_means > 100) & (band_means < 125))  # ~110-119 per band, as recorded
    # The first row of the file is pixel-major R, G, B, NIR.
    first = (SHARED / "sat6" / "train_X_200.csv").read_text().split("\n", 1)[0].split(",")[:8]
    assert train.x[0, :, 0, 0].tolist() == [int(v) for v in first[:4]]
    assert train.x[0, :, 0, 1].tolist() == [int(v) for v in first[4:8]]
    assert data.source["subset"] is True
    assert data.source["files"]["train_X_200.csv"] == "2716717998df5d1c74c03a7ad06401b6baf84cdd82b500c4f6b62299e66a4c78"
