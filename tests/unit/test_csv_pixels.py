"""Images as CSV pixel rows with a label column."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from latentlab.data.csv_pixels import read_pixel_csv
from latentlab.errors import DataError

SHAPE = (1, 2, 3)  # (C, H, W): 6 pixels a row


def write_csv(path: Path, rows: list[list[object]], header: list[str] | None = None, label_at: int = 0) -> Path:
    """A CSV with columns label + p0..p{n-1} (label at position ``label_at``)."""
    n_pixels = len(rows[0]) - 1 if rows else 6
    if header is None:
        header = [f"p{i}" for i in range(n_pixels)]
        header.insert(label_at, "label")
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_with(labels: list[object], n_pixels: int = 6) -> list[list[object]]:
    return [[label, *range(i, i + n_pixels)] for i, label in enumerate(labels)]


def test_one_file_integer_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows_with([1, 0, 2]))
    data = read_pixel_csv(path, "label", SHAPE, None)
    assert list(data.parts) == ["all"]
    part = data.parts["all"]
    assert part.x.shape == (3, 1, 2, 3) and part.x.dtype == np.uint8
    np.testing.assert_array_equal(part.x[1, 0], [[1, 2, 3], [4, 5, 6]])  # row order
    assert part.y.tolist() == [1, 0, 2] and part.y.dtype == np.int64
    assert part.ids.tolist() == [0, 1, 2]
    assert data.class_names == ("0", "1", "2")
    assert data.source["kind"] == "csv" and list(data.source["files"]) == ["d.csv"]


def test_channel_last_layout(tmp_path: Path) -> None:
    # shape (3, 1, 2): pixel (0,0) = R,G,B = 10,11,12 then pixel (0,1) = 20,21,22.
    path = write_csv(tmp_path / "rgb.csv", [[10, 11, 12, 20, 21, 22, 0]], label_at=6)
    x = read_pixel_csv(path, "label", (3, 1, 2), None).parts["all"].x
    assert x[0, :, 0, 0].tolist() == [10, 11, 12]
    assert x[0, :, 0, 1].tolist() == [20, 21, 22]


def test_folder_train_test_string_labels(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", rows_with(["dog", "cat", "dog"]))
    write_csv(tmp_path / "test.csv", rows_with(["emu"]))
    data = read_pixel_csv(tmp_path, "label", SHAPE, None)
    assert set(data.parts) == {"train", "test"}
    assert data.class_names == ("cat", "dog", "emu")  # sorted over both files
    assert data.parts["train"].y.tolist() == [1, 0, 1]
    assert data.parts["test"].y.tolist() == [2]
    # class_names from the config set the order.
    data = read_pixel_csv(tmp_path, "label", SHAPE, ("emu", "dog", "cat"))
    assert data.parts["train"].y.tolist() == [1, 2, 1]


def test_folder_without_test_is_all(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", rows_with([0, 1]))
    assert list(read_pixel_csv(tmp_path, "label", SHAPE, None).parts) == ["all"]


def test_gzipped_csv(tmp_path: Path) -> None:
    plain = write_csv(tmp_path / "d.csv", rows_with([0, 1]))
    packed = tmp_path / "d.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert len(read_pixel_csv(packed, "label", SHAPE, None).parts["all"]) == 2


def one_line_error(path: Path, shape: tuple[int, int, int] = SHAPE, class_names: tuple[str, ...] | None = None) -> str:
    with pytest.raises(DataError) as exc:
        read_pixel_csv(path, "label", shape, class_names)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


def test_missing_label_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows_with([0]), header=["y", *[f"p{i}" for i in range(6)]])
    assert one_line_error(path) == f"{path}: no label column 'label' (columns: y, p0, p1, p2, p3, ...)"


def test_wrong_pixel_count(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows_with([0], n_pixels=783))
    assert one_line_error(path, (1, 28, 28)) == f"{path}: expected 784 pixel columns for shape (1, 28, 28), found 783"


def test_row_of_wrong_width(tmp_path: Path) -> None:
    rows = rows_with([0, 1, 2])
    rows[1] = rows[1][:-1]
    path = write_csv(tmp_path / "d.csv", rows)
    assert one_line_error(path) == f"{path}: row 2 has 6 values, expected 7 (6 pixels + label)"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("abc", "row 3: non-numeric pixel value 'abc' in column 'p2'"),
        ("", "row 3: NaN pixel value"),
        ("nan", "row 3: NaN pixel value"),
        ("256", "row 3: pixel value 256 in column 'p2' is outside 0..255"),
        ("-1", "row 3: pixel value -1 in column 'p2' is outside 0..255"),
        ("1.5", "row 3: pixel value 1.5 in column 'p2' is not an integer"),
    ],
)
def test_bad_pixel(tmp_path: Path, bad: str, message: str) -> None:
    rows = rows_with([0, 1, 0, 1])
    rows[2][3] = bad
    path = write_csv(tmp_path / "d.csv", rows)
    assert one_line_error(path) == f"{path}: {message}"


def test_nan_pixel_row_17(tmp_path: Path) -> None:
    rows = rows_with([0] * 20)
    rows[16][1] = ""
    path = write_csv(tmp_path / "d.csv", rows)
    assert one_line_error(path) == f"{path}: row 17: NaN pixel value"


def test_float_pixels_that_are_integers_pass(tmp_path: Path) -> None:
    rows = rows_with([0, 1])
    rows[0][1] = "3.0"
    path = write_csv(tmp_path / "d.csv", rows)
    assert read_pixel_csv(path, "label", SHAPE, None).parts["all"].x[0, 0, 0, 0] == 3


@pytest.mark.parametrize(
    ("labels", "class_names", "message"),
    [
        ([0, 1, 3], ("a", "b", "c"), "row 3: label 3 is outside 0..2 (class_names has 3 names)"),
        ([0, -1, 1], None, "row 2: label -1 is outside 0..1"),
        ([0, "", 1], None, "row 2: missing label"),
        ([0, 1.5, 1], None, "row 2: label 1.5 is not an integer"),
        (["cat", "dog", "emu"], ("cat", "dog"), "row 3: label 'emu' is not one of class_names (cat, dog)"),
    ],
)
def test_bad_labels(tmp_path: Path, labels: list[object], class_names: tuple[str, ...] | None, message: str) -> None:
    path = write_csv(tmp_path / "d.csv", rows_with(labels))
    assert one_line_error(path, class_names=class_names) == f"{path}: {message}"


def test_integer_labels_with_enough_class_names(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows_with([0, 2]))
    data = read_pixel_csv(path, "label", SHAPE, ("a", "b", "c", "d"))
    assert data.class_names == ("a", "b", "c", "d")
    assert data.parts["all"].y.tolist() == [0, 2]


def test_mixed_label_kinds_across_files(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", rows_with([0, 1]))
    write_csv(tmp_path / "test.csv", rows_with(["cat"]))
    with pytest.raises(DataError, match="test.csv: labels are strings but .*train.csv has integer labels"):
        read_pixel_csv(tmp_path, "label", SHAPE, None)


def test_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        read_pixel_csv(tmp_path / "absent.csv", "label", SHAPE, None)
    with pytest.raises(DataError, match="no train.csv"):
        read_pixel_csv(tmp_path, "label", SHAPE, None)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="e.csv: empty file"):
        read_pixel_csv(empty, "label", SHAPE, None)
    header_only = write_csv(tmp_path / "h.csv", [])
    with pytest.raises(DataError, match="h.csv: no data rows"):
        read_pixel_csv(header_only, "label", SHAPE, None)
