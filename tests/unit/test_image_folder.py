"""Folders of PNG images, one sub-folder per class."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentlab.data.image_folder import read_image_folder
from latentlab.errors import DataError


def png(path: Path, pixels: np.ndarray) -> Path:
    """Write ``pixels`` (H, W) or (H, W, C) uint8 as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def gray(value: int, h: int = 6, w: int = 8) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def flat_folder(root: Path) -> Path:
    png(root / "cat" / "a.png", gray(10))
    png(root / "cat" / "b.PNG", gray(20))  # the extension is case-insensitive
    png(root / "ant" / "c.png", gray(30))
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()  # not a class
    return root


def test_flat_folder(tmp_path: Path) -> None:
    root = flat_folder(tmp_path / "imgs")
    data = read_image_folder(root, channels=1, size=None)
    assert data.class_names == ("ant", "cat")
    assert list(data.parts) == ["all"]
    part = data.parts["all"]
    assert part.x.shape == (3, 1, 6, 8) and part.x.dtype == np.uint8
    assert part.ids.tolist() == ["ant/c.png", "cat/a.png", "cat/b.PNG"]
    assert part.y.tolist() == [0, 1, 1] and part.y.dtype == np.int64
    assert part.x[:, 0, 0, 0].tolist() == [30, 10, 20]
    assert data.modality == "image"
    assert data.source["kind"] == "image_folder" and data.source["location"] == str(root)
    assert data.source["files"]["cat/a.png"] == hashlib.sha256((root / "cat" / "a.png").read_bytes()).hexdigest()
    assert data.source["subset"] is False and data.source["synthetic"] is False


def test_train_test_layout(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for split, n in (("train", 2), ("test", 1)):
        for label in ("b", "a"):
            for i in range(n):
                png(root / split / label / f"{i}.png", gray(i))
    data = read_image_folder(root, channels=1, size=None)
    assert set(data.parts) == {"train", "test"}
    assert data.class_names == ("a", "b")
    assert len(data.parts["train"]) == 4 and len(data.parts["test"]) == 2
    assert data.parts["test"].ids.tolist() == ["test/a/0.png", "test/b/0.png"]


def test_test_class_unknown_to_train(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    png(root / "train" / "a" / "0.png", gray(0))
    png(root / "test" / "a" / "0.png", gray(0))
    png(root / "test" / "z" / "0.png", gray(0))
    with pytest.raises(DataError, match=r"test/z: class folder not present in the training folder"):
        read_image_folder(root, channels=1, size=None)


@pytest.mark.parametrize(("channels", "expected"), [(1, [76]), (3, [255, 0, 0]), (4, [255, 0, 0, 128])])
def test_channels(tmp_path: Path, channels: int, expected: list[int]) -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red
    png(tmp_path / "k" / "x.png", rgba)
    data = read_image_folder(tmp_path, channels=channels, size=None)
    x = data.parts["all"].x
    assert x.shape == (1, channels, 4, 5)
    assert x[0, :, 2, 3].tolist() == expected  # PIL's L = 0.299 R + ...: 255 * 0.299 = 76


def test_size_mismatch(tmp_path: Path) -> None:
    png(tmp_path / "a" / "1.png", gray(0, 6, 8))
    png(tmp_path / "b" / "2.png", gray(0, 7, 8))
    with pytest.raises(DataError) as exc:
        read_image_folder(tmp_path, channels=1, size=None)
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'b' / '2.png'}: image is 7x8 (HxW)")
    assert f"{tmp_path / 'a' / '1.png'} is 6x8" in msg


def test_resize_is_h_w(tmp_path: Path) -> None:
    png(tmp_path / "a" / "1.png", gray(100, 6, 8))
    png(tmp_path / "b" / "2.png", gray(200, 20, 10))
    data = read_image_folder(tmp_path, channels=3, size=(5, 7))
    x = data.parts["all"].x
    assert x.shape == (2, 3, 5, 7)
    assert np.all(x[0] == 100) and np.all(x[1] == 200)  # bilinear keeps a flat image flat


def test_corrupt_png(tmp_path: Path) -> None:
    png(tmp_path / "a" / "1.png", gray(0))
    good = png(tmp_path / "b" / "2.png", gray(0)).read_bytes()
    bad = tmp_path / "b" / "3.png"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=f"^{bad}: cannot read image"):
        read_image_folder(tmp_path, channels=1, size=None)
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=f"^{bad}: cannot read image"):
        read_image_folder(tmp_path, channels=1, size=None)


def test_empty_or_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        read_image_folder(tmp_path / "absent", channels=1, size=None)
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path / "e", channels=1, size=None)
    (tmp_path / "e" / "cls").mkdir()
    with pytest.raises(DataError, match=r"cls: class folder holds no .png files"):
        read_image_folder(tmp_path / "e", channels=1, size=None)
