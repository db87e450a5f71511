"""SAT-6 (DeepSat): 28x28 airborne patches with 4 bands (R, G, B, NIR), 6 land-cover classes.

Two forms are read from one folder:

- the Kaggle CSVs (``X_train_sat6.csv``, ``y_train_sat6.csv``, ``X_test_sat6.csv``,
  ``y_test_sat6.csv``, or any names holding train/test and X/y as separate
  words, such as ``train_X_200.csv``): no header; an X row has 3,136 values,
  28x28 pixels each as R, G, B, NIR (pixel-major); a y row is one-hot over
  :data:`CLASSES`;
- the original ``sat-6-full.mat``: ``train_x``/``test_x`` (28, 28, 4, N) uint8 and
  ``train_y``/``test_y`` (6, N) one-hot. It is used when present.

There is no offline copy of SAT-6: it has to be downloaded by hand (see
:func:`read_sat6`'s error message).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from latentlab.data.csv_pixels import read_checked_csv
from latentlab.data.raw import RawDataset, sha256_file
from latentlab.data.store import SplitArrays
from latentlab.errors import DataError

CLASSES: tuple[str, ...] = ("building", "barren_land", "trees", "grassland", "road", "water")
FULL_COUNTS = {"train": 324_000, "test": 81_000}  # rows of the complete dataset
MAT_NAME = "sat-6-full.mat"
_SIDE, _BANDS = 28, 4
_ROW_WIDTH = _SIDE * _SIDE * _BANDS  # 3,136


def read_sat6(folder: Path | None, max_rows: int | None, *, name: str = "sat6") -> RawDataset:
    """Read SAT-6 from ``folder`` (Kaggle CSVs or ``sat-6-full.mat``).

    Returns parts ``"train"`` and ``"test"`` (``"all"`` when only train files
    exist) with ``x`` ``uint8`` (N, 4, 28, 28) in band order R, G, B, NIR, ``y``
    ``int64`` (N,) indexing :data:`CLASSES`, ``ids`` the 0-based row index.
    ``max_rows`` caps the rows read per split. ``name`` is the dataset key in
    params.yaml, used in messages.
    """
    if folder is None:
        raise DataError(_no_source(f"ingest.datasets.{name}.path is not set", name))
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(_no_source(f"{folder} is not a folder", name))
    mat = folder / MAT_NAME
    if mat.is_file():
        parts, used = _read_mat(mat, max_rows), [mat]
    else:
        pairs = find_sat6_csvs(folder)
        if not pairs:
            raise DataError(_no_source(f"{folder} holds no SAT-6 files", name))
        parts = {part: _read_csv_pair(x_file, y_file, max_rows) for part, (x_file, y_file) in pairs.items()}
        used = [file for pair in pairs.values() for file in pair]
    return RawDataset(parts=parts, class_names=CLASSES, modality="image", source=_source(folder, used, parts, max_rows))


def _no_source(reason: str, name: str) -> str:
    return (
        f'SAT-6: {reason}; SAT-6 has no offline source: download the Kaggle dataset "crawford/deepsat-sat6"'
        " (X_train_sat6.csv, y_train_sat6.csv, X_test_sat6.csv, y_test_sat6.csv) or sat-6-full.mat from the"
        f" DeepSat site https://csc.lsu.edu/~saikat/deepsat/, and set ingest.datasets.{name}.path in"
        " params.yaml to the folder holding the files"
    )


def _source(folder: Path, used: list[Path], parts: dict[str, SplitArrays], max_rows: int | None) -> dict:
    counts = {part: len(arrays) for part, arrays in parts.items()}
    full = {part: FULL_COUNTS["train" if part == "all" else part] for part in parts}
    subset = any(counts[part] < full[part] for part in parts)
    source = {
        "kind": "sat6",
        "location": str(folder),
        "files": {file.name: sha256_file(file) for file in used},
        "subset": subset,
        "synthetic": False,
        "max_rows": max_rows,
    }
    if subset:
        shown = ", ".join(f"{counts[p]:,} of {full[p]:,} {p}" for p in parts)
        source["note"] = f"SAT-6 subset: {shown} rows"
    return source


# ----------------------------------------------------------------------- CSVs
def find_sat6_csvs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{part: (X file, y file)} of the SAT-6 CSVs in ``folder``; empty when there are none.

    A file belongs to a split and a role when its name, split at ``_ . -``,
    holds the words train/test and X/y (case-insensitive).
    """
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or not path.name.lower().endswith((".csv", ".csv.gz")):
            continue
        words = set(re.split(r"[_.\-\s]+", path.name.lower()))
        split = next((s for s in ("train", "test") if s in words), None)
        role = next((r for r in ("x", "y") if r in words), None)
        if split is None or role is None:
            continue
        if (split, role) in found:
            raise DataError(
                f"{folder}: both {found[split, role].name} and {path.name} look like the SAT-6 {split} {role.upper()} file; keep one"
            )
        found[split, role] = path
    if not found:
        return {}
    for split, role in found:
        other = "y" if role == "x" else "x"
        if (split, other) not in found:
            raise DataError(f"{found[split, role]}: no matching SAT-6 {split} {other.upper()} file in {folder}")
    if ("train", "x") not in found:
        raise DataError(f"{folder}: SAT-6 test files but no train files (X_train_sat6.csv, y_train_sat6.csv)")
    splits = {"train": "train", "test": "test"} if ("test", "x") in found else {"all": "train"}
    return {part: (found[split, "x"], found[split, "y"]) for part, split in splits.items()}


def _read_csv_pair(x_file: Path, y_file: Path, max_rows: int | None) -> SplitArrays:
    """One split from an X CSV (N, 3136) and a y CSV (N, 6)."""
    pixels = read_checked_csv(
        x_file, header=False, width=_ROW_WIDTH, checked=range(_ROW_WIDTH), nrows=max_rows, layout="28x28x4"
    ).to_numpy(dtype=np.uint8)
    onehot = read_checked_csv(
        y_file,
        header=False,
        width=len(CLASSES),
        checked=range(len(CLASSES)),
        nrows=max_rows,
        layout="one-hot over 6 classes",
    ).to_numpy(dtype=np.uint8)
    if len(pixels) != len(onehot):
        raise DataError(f"{x_file} has {len(pixels)} rows but {y_file} has {len(onehot)}")
    y = _decode_onehot(onehot, lambda i: f"{y_file}: row {i + 1}")
    # Pixel-major rows: (H, W, band) in C order -> (N, band, H, W).
    x = np.ascontiguousarray(pixels.reshape(len(pixels), _SIDE, _SIDE, _BANDS).transpose(0, 3, 1, 2))
    return SplitArrays(x=x, y=y, ids=np.arange(len(x), dtype=np.int64))


def _decode_onehot(onehot: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """``int64`` labels (N,) from one-hot rows (N, 6); ``where(i)`` names row i in messages."""
    sums = onehot.sum(axis=1, dtype=np.int64)
    bad = np.flatnonzero((sums != 1) | (onehot > 1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{where(i)} is not one-hot (sum {sums[i]})")
    return onehot.argmax(axis=1).astype(np.int64)


# ------------------------------------------------------------------------ MAT
def _read_mat(mat: Path, max_rows: int | None) -> dict[str, SplitArrays]:
    """Parts train/test from ``sat-6-full.mat``, at most ``max_rows`` samples each."""
    import scipy.io  # lazily: only this form needs scipy

    wanted = ["train_x", "train_y", "test_x", "test_y"]
    try:
        variables = scipy.io.loadmat(mat, variable_names=wanted)
    except NotImplementedError:
        raise DataError(f"{mat}: MATLAB v7.3 (HDF5) files are not supported; use the Kaggle CSVs instead") from None
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{mat}: cannot read MATLAB file ({exc})") from None
    return {split: _mat_split(mat, variables, split, max_rows) for split in ("train", "test")}


def _mat_split(mat: Path, variables: dict, split: str, max_rows: int | None) -> SplitArrays:
    for key in (f"{split}_x", f"{split}_y"):
        if key not in variables:
            raise DataError(f"{mat}: no variable {key}")
    xs, ys = variables[f"{split}_x"], variables[f"{split}_y"]
    if xs.ndim != 4 or xs.shape[:3] != (_SIDE, _SIDE, _BANDS):
        raise DataError(f"{mat}: {split}_x has shape {xs.shape}, expected (28, 28, 4, N)")
    if ys.ndim != 2 or ys.shape[0] != len(CLASSES):
        raise DataError(f"{mat}: {split}_y has shape {ys.shape}, expected (6, N)")
    if xs.shape[3] != ys.shape[1]:
        raise DataError(f"{mat}: {split}_x has {xs.shape[3]} samples but {split}_y has {ys.shape[1]}")
    if max_rows is not None:
        xs, ys = xs[..., :max_rows], ys[:, :max_rows]
    pixels = _as_uint8(mat, f"{split}_x", xs)
    y = _decode_onehot(_as_uint8(mat, f"{split}_y", ys).T, lambda i: f"{mat}: {split}_y sample {i + 1}")
    # MATLAB order (H, W, band, N) -> (N, band, H, W).
    x = np.ascontiguousarray(pixels.transpose(3, 2, 0, 1))
    return SplitArrays(x=x, y=y, ids=np.arange(len(x), dtype=np.int64))


def _as_uint8(mat: Path, key: str, values: np.ndarray) -> np.ndarray:
    """``values`` as uint8, refusing NaN, fractions and values outside 0..255."""
    if values.dtype == np.uint8:
        return values
    if not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{mat}: {key} is not numeric ({values.dtype})")
    as_float = values.astype(np.float64)
    if np.isnan(as_float).any():
        raise DataError(f"{mat}: {key} holds NaN values")
    if (as_float < 0).any() or (as_float > 255).any() or (as_float != np.floor(as_float)).any():
        raise DataError(f"{mat}: {key} holds values that are not integers in 0..255")
    return values.astype(np.uint8)
