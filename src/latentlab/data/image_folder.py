"""A folder of PNG images with one sub-folder per class.

Two layouts are read::

    folder/<class>/*.png                    -> one part "all"
    folder/train/<class>/*.png and
    folder/test/<class>/*.png               -> parts "train" and "test"

Class names are the sorted sub-folder names (of ``train/`` in the second
layout); hidden folders and non-PNG files are ignored.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from latentlab.data.raw import RawDataset
from latentlab.data.store import SplitArrays
from latentlab.errors import DataError

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def read_image_folder(folder: Path, channels: int, size: tuple[int, int] | None) -> RawDataset:
    """Read every PNG under ``folder`` into ``uint8`` x (N, channels, H, W).

    ``channels`` 1, 3 or 4 converts to PIL mode L, RGB or RGBA. ``size`` is
    (H, W) to resize to (bilinear); None requires every image to share one size.
    ``y`` is ``int64`` (N,) indexing the class names, ``ids`` the paths relative
    to ``folder`` (``str``).
    """
    folder = Path(folder)
    if channels not in _MODES:
        raise DataError(f"{folder}: channels must be 1, 3 or 4, got {channels}")
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; expected one sub-folder of PNG images per class")
    roots = _part_roots(folder)
    class_names = _class_folders(roots.get("train", roots.get("all", folder)))
    listed = {part: _list_pngs(root, class_names, required=part != "test") for part, root in roots.items()}
    reader = _ImageReader(folder, _MODES[channels], size)
    parts = {part: reader.read(files) for part, files in listed.items()}
    source = {
        "kind": "image_folder",
        "location": str(folder),
        "files": reader.checksums,
        "subset": False,
        "synthetic": False,
    }
    return RawDataset(parts=parts, class_names=class_names, modality="image", source=source)


def _part_roots(folder: Path) -> dict[str, Path]:
    """{part: folder of class sub-folders}."""
    train, test = folder / "train", folder / "test"
    if _sub_folders(train) and _sub_folders(test):
        return {"train": train, "test": test}
    return {"all": folder}


def _sub_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_folders(root: Path) -> tuple[str, ...]:
    names = tuple(p.name for p in _sub_folders(root))
    if not names:
        raise DataError(f"{root}: no class sub-folders; expected one sub-folder of PNG images per class")
    return names


def _list_pngs(root: Path, class_names: tuple[str, ...], *, required: bool) -> list[tuple[Path, int]]:
    """(file, label) for every PNG of the class folders under ``root``, in sorted order.

    A test split may lack a class; a training (or only) split may not.
    """
    extra = sorted(set(p.name for p in _sub_folders(root)) - set(class_names))
    if extra:
        raise DataError(f"{root / extra[0]}: class folder not present in the training folder")
    files = []
    for label, name in enumerate(class_names):
        pngs = sorted(p for p in (root / name).glob("*") if p.suffix.lower() == ".png" and p.is_file())
        if required and not pngs:
            raise DataError(f"{root / name}: class folder holds no .png files")
        files.extend((p, label) for p in pngs)
    if not files:
        raise DataError(f"{root}: no .png files in the class folders")
    return files


class _ImageReader:
    """Decodes PNGs to one mode and size, remembering checksums and the first size seen."""

    def __init__(self, folder: Path, mode: str, size: tuple[int, int] | None) -> None:
        self.folder = folder
        self.mode = mode
        self.size = size  # (H, W) to resize to, or None
        self.first: tuple[Path, tuple[int, int]] | None = None  # first file and its (H, W)
        self.checksums: dict[str, str] = {}

    def read(self, files: list[tuple[Path, int]]) -> SplitArrays:
        """x (N, C, H, W) uint8, y (N,) int64, ids (N,) relative paths."""
        x = np.stack([self._load(path) for path, _ in files])
        y = np.array([label for _, label in files], dtype=np.int64)
        ids = np.array([path.relative_to(self.folder).as_posix() for path, _ in files])
        return SplitArrays(x=x, y=y, ids=ids)

    def _load(self, path: Path) -> np.ndarray:
        """One image as (C, H, W) uint8."""
        try:
            data = path.read_bytes()  # read once: hashed here, decoded below
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        self.checksums[path.relative_to(self.folder).as_posix()] = hashlib.sha256(data).hexdigest()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert(self.mode)
                if self.size is not None:
                    height, width = self.size
                    image = image.resize((width, height), Image.Resampling.BILINEAR)  # PIL sizes are (W, H)
                pixels = np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
        self._check_size(path, pixels.shape[:2])
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def _check_size(self, path: Path, shape: tuple[int, ...]) -> None:
        hw = (int(shape[0]), int(shape[1]))
        if self.first is None:
            self.first = (path, hw)
            return
        first_path, first_hw = self.first
        if hw != first_hw:
            raise DataError(
                f"{path}: image is {hw[0]}x{hw[1]} (HxW) but {first_path} is {first_hw[0]}x{first_hw[1]};"
                " set size (H, W) for this dataset in params.yaml to resize every image"
            )
