"""SAT-6 (DeepSat): Kaggle CSVs and the original .mat file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

from latentlab.data.sat6 import CLASSES, read_sat6
from latentlab.errors import DataError


def patches(n: int, seed: int) -> np.ndarray:
    """(N, 28, 28, 4) uint8: pixel-major patches as SAT-6 stores them."""
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 4), dtype=np.uint8)


def onehot(labels: list[int]) -> np.ndarray:
    return np.eye(6, dtype=np.uint8)[labels]


def write_rows(path: Path, rows: np.ndarray) -> Path:
    np.savetxt(path, rows.reshape(len(rows), -1), fmt="%d", delimiter=",")
    return path


def csv_folder(folder: Path, labels: dict[str, list[int]], names: str = "kaggle") -> Path:
    """SAT-6 CSVs for each split in ``labels``, named as Kaggle does or as the 200-row sample does."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, ys) in enumerate(labels.items()):
        x_name, y_name = (
            (f"X_{split}_sat6.csv", f"y_{split}_sat6.csv")
            if names == "kaggle"
            else (f"{split}_X_200.csv", f"{split}_y_200.csv")
        )
        write_rows(folder / x_name, patches(len(ys), seed))
        write_rows(folder / y_name, onehot(ys))
    return folder


def test_csv_channel_layout(tmp_path: Path) -> None:
    x = np.zeros((1, 28, 28, 4), dtype=np.uint8)
    x[0, 0, 1] = [1, 2, 3, 4]  # pixel (row 0, col 1): R, G, B, NIR
    write_rows(tmp_path / "X_train_sat6.csv", x)
    write_rows(tmp_path / "y_train_sat6.csv", onehot([3]))
    data = read_sat6(tmp_path, None)
    part = data.parts["all"]
    assert part.x.shape == (1, 4, 28, 28) and part.x.dtype == np.uint8
    assert part.x[0, :, 0, 1].tolist() == [1, 2, 3, 4]
    assert part.x.sum() == 10  # nothing else moved in
    assert part.y.tolist() == [3]


def test_csv_round_trip_kaggle_names(tmp_path: Path) -> None:
    folder = csv_folder(tmp_path, {"train": [0, 5, 2], "test": [4, 1]})
    data = read_sat6(folder, None)
    assert set(data.parts) == {"train", "test"}
    assert data.class_names == CLASSES == ("building", "barren_land", "trees", "grassland", "road", "water")
    train = data.parts["train"]
    np.testing.assert_array_equal(train.x, patches(3, 0).transpose(0, 3, 1, 2))
    assert train.y.tolist() == [0, 5, 2] and train.y.dtype == np.int64
    assert train.ids.tolist() == [0, 1, 2]
    assert data.parts["test"].y.tolist() == [4, 1]
    assert sorted(data.source["files"]) == [
        "X_test_sat6.csv",
        "X_train_sat6.csv",
        "y_test_sat6.csv",
        "y_train_sat6.csv",
    ]
    assert data.source["kind"] == "sat6" and data.source["subset"] is True  # far fewer rows than SAT-6 has
    assert "3 of 324,000 train" in data.source["note"]


def test_csv_sample_names_and_max_rows(tmp_path: Path) -> None:
    folder = csv_folder(tmp_path, {"train": [0, 1, 2, 3], "test": [5, 5, 5]}, names="sample")
    (folder / "sat6annotations.csv").write_text("building,1,0,0,0,0,0\n")  # not an X or y file
    data = read_sat6(folder, 2)
    assert len(data.parts["train"]) == 2 and len(data.parts["test"]) == 2
    assert data.parts["train"].y.tolist() == [0, 1]
    assert "train_X_200.csv" in data.source["files"]
    assert data.source["max_rows"] == 2


def test_mat_file(tmp_path: Path) -> None:
    train, test = patches(3, 0), patches(2, 1)
    scipy.io.savemat(
        tmp_path / "sat-6-full.mat",
        {
            "train_x": train.transpose(1, 2, 3, 0),  # (28, 28, 4, N) as in the original
            "train_y": onehot([1, 2, 3]).T,  # (6, N)
            "test_x": test.transpose(1, 2, 3, 0),
            "test_y": onehot([0, 5]).T,
            "annotations": np.array(CLASSES, dtype=object),
        },
    )
    data = read_sat6(tmp_path, None)
    np.testing.assert_array_equal(data.parts["train"].x, train.transpose(0, 3, 1, 2))
    assert data.parts["train"].y.tolist() == [1, 2, 3]
    assert data.parts["test"].y.tolist() == [0, 5]
    assert list(data.source["files"]) == ["sat-6-full.mat"]
    limited = read_sat6(tmp_path, 1)
    assert len(limited.parts["train"]) == 1 and len(limited.parts["test"]) == 1
    np.testing.assert_array_equal(limited.parts["test"].x[0], test[0].transpose(2, 0, 1))


def test_mat_not_one_hot(tmp_path: Path) -> None:
    y = onehot([1, 2]).T.copy()
    y[0, 1] = 1
    scipy.io.savemat(
        tmp_path / "sat-6-full.mat",
        {"train_x": np.zeros((28, 28, 4, 2), np.uint8), "train_y": y, "test_x": np.zeros((28, 28, 4, 1), np.uint8)}
        | {"test_y": onehot([0]).T},
    )
    with pytest.raises(DataError, match=r"sat-6-full.mat: train_y sample 2 is not one-hot \(sum 2\)"):
        read_sat6(tmp_path, None)


def test_mat_bad_shape(tmp_path: Path) -> None:
    mat = tmp_path / "sat-6-full.mat"
    scipy.io.savemat(mat, {"train_x": np.zeros((28, 28, 3, 2), np.uint8), "train_y": onehot([0, 1]).T})
    with pytest.raises(DataError) as exc:
        read_sat6(tmp_path, None)
    assert str(exc.value) == f"{mat}: train_x has shape (28, 28, 3, 2), expected (28, 28, 4, N)"
    scipy.io.savemat(mat, {"train_x": np.zeros((28, 28, 4, 2), np.uint8), "train_y": onehot([0, 1]).T})
    with pytest.raises(DataError, match="sat-6-full.mat: no variable test_x"):
        read_sat6(tmp_path, None)


def test_wrong_width(tmp_path: Path) -> None:
    folder = csv_folder(tmp_path, {"train": list(range(6)) * 2})
    x_file = folder / "X_train_sat6.csv"
    lines = x_file.read_text().splitlines()
    lines[11] = lines[11].rsplit(",", 1)[0]  # drop the last value of row 12
    x_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        read_sat6(folder, None)
    assert str(exc.value) == f"{x_file}: row 12 has 3135 values, expected 3136 (28x28x4)"


def test_wrong_width_in_every_row(tmp_path: Path) -> None:
    write_rows(tmp_path / "X_train_sat6.csv", np.zeros((2, 3000), np.uint8))
    write_rows(tmp_path / "y_train_sat6.csv", onehot([0, 1]))
    with pytest.raises(DataError, match="row 1 has 3000 values, expected 3136"):
        read_sat6(tmp_path, None)


def test_not_one_hot(tmp_path: Path) -> None:
    folder = csv_folder(tmp_path, {"train": [0, 1, 2, 3]})
    y = onehot([0, 1, 2, 3])
    y[2, 4] = 1
    y_file = write_rows(folder / "y_train_sat6.csv", y)
    with pytest.raises(DataError) as exc:
        read_sat6(folder, None)
    assert str(exc.value) == f"{y_file}: row 3 is not one-hot (sum 2)"


def test_nan_and_count_mismatch(tmp_path: Path) -> None:
    folder = csv_folder(tmp_path, {"train": [0, 1, 2]})
    x_file = folder / "X_train_sat6.csv"
    lines = x_file.read_text().splitlines()
    lines[1] = "," + lines[1].split(",", 1)[1]
    x_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"^{x_file}: row 2: NaN pixel value$"):
        read_sat6(folder, None)
    folder = csv_folder(tmp_path / "b", {"train": [0, 1, 2]})
    write_rows(folder / "y_train_sat6.csv", onehot([0, 1]))
    with pytest.raises(DataError, match="X_train_sat6.csv has 3 rows but .*y_train_sat6.csv has 2"):
        read_sat6(folder, None)


def test_half_pair(tmp_path: Path) -> None:
    folder = csv_folder(tmp_path, {"train": [0], "test": [1]})
    (folder / "y_test_sat6.csv").unlink()
    with pytest.raises(DataError, match="X_test_sat6.csv: no matching SAT-6 test Y file"):
        read_sat6(folder, None)


@pytest.mark.parametrize("where", ["none", "absent", "empty"])
def test_no_source_message(tmp_path: Path, where: str) -> None:
    folder = {"none": None, "absent": tmp_path / "absent", "empty": tmp_path}[where]
    (tmp_path / "unrelated.csv").write_text("1,2\n")
    with pytest.raises(DataError) as exc:
        read_sat6(folder, None)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "no offline source" in msg
    assert "crawford/deepsat-sat6" in msg and "https://csc.lsu.edu/~saikat/deepsat/" in msg
    assert "ingest.datasets.sat6.path" in msg
    if folder is not None:
        assert str(folder) in msg
