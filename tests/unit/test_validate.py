"""The validate stage: per-sample table, GX suites, reports and one-line failures.

Great Expectations is slow to import and to set up, so the clean dataset is
validated once per module and each failure mode runs one small validation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from latentlab.config import BalanceBounds, ValidateConfig
from latentlab.data.store import Manifest, SplitArrays, save_manifest, save_split
from latentlab.errors import ValidationFailed
from latentlab.validate import (
    SAMPLE_COLUMNS,
    build_balance_suite,
    build_suite,
    class_share_table,
    sample_table,
    share_bounds,
    validate_dataset,
)

COUNTS = {"train": 30, "val": 6, "test": 6}
CLASSES = ("a", "b", "c")


def make_split(n: int, *, seed: int, dtype: str = "uint8", n_classes: int = 3) -> SplitArrays:
    """``n`` random (1, 8, 8) samples, labels cycling over the classes (balanced)."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        x = rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)
    else:
        x = rng.random((n, 1, 8, 8)).astype(np.float16)
    y = np.arange(n, dtype=np.int64) % n_classes
    return SplitArrays(x=x, y=y, ids=np.arange(n))


def write_dataset(
    folder: Path,
    name: str,
    *,
    dtype: str = "uint8",
    edit: Callable[[str, SplitArrays], SplitArrays] | None = None,
    counts: dict[str, int] | None = None,
) -> Path:
    """A processed dataset of 30/6/6 samples over 3 classes; ``edit`` corrupts a split before saving."""
    target = folder / name
    target.mkdir(parents=True)
    for i, (split, n) in enumerate(COUNTS.items()):
        arrays = make_split(n, seed=i, dtype=dtype)
        save_split(target, split, edit(split, arrays) if edit else arrays)
    modality = "image" if dtype == "uint8" else "spectrogram"
    manifest = Manifest(
        name=name,
        modality=modality,
        shape=(1, 8, 8),
        class_names=CLASSES,
        counts=dict(counts or COUNTS),
        source={"kind": "synthetic"},
    )
    save_manifest(target, manifest)
    return target


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, dict[str, Any]]]:
    """A clean dataset validated once, run from an empty working directory."""
    root = tmp_path_factory.mktemp("clean")
    processed = write_dataset(root / "processed", "tiny")
    out = root / "reports" / "validation" / "tiny"
    cwd = root / "cwd"
    cwd.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        # A GX context must never be scaffolded in the working directory.
        mp.chdir(cwd)
        results = validate_dataset("tiny", processed, out, ValidateConfig())
    yield cwd, out, results


def assert_reports(out: Path) -> dict[str, Any]:
    for name in ("results.json", "summary.html", "data_docs/index.html"):
        assert (out / name).is_file(), name
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def fail(tmp_path: Path, name: str, cfg: ValidateConfig | None = None, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Validate a corrupted dataset; returns the ValidationFailed message and the written results."""
    processed = write_dataset(tmp_path / "processed", name, **kwargs)
    out = tmp_path / "reports" / name
    with pytest.raises(ValidationFailed) as info:
        validate_dataset(name, processed, out, cfg or ValidateConfig())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"validation failed for {name}, split ")
    assert message.endswith(f"see {out / 'summary.html'}")
    results = assert_reports(out)  # the reports explain the failure
    assert results["success"] is False
    return message, results


# ----------------------------------------------------------------------- table
def test_sample_table_matches_hand_computation() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(4, 2, 3, 5), dtype=np.uint8)
    x[0] = 255
    x[1] = 0
    arrays = SplitArrays(x=x, y=np.array([2, 0, 1, 1]), ids=np.arange(4))
    table = sample_table(arrays)

    assert list(table.columns) == list(SAMPLE_COLUMNS)
    assert len(table) == 4
    assert table["label"].tolist() == [2, 0, 1, 1]
    assert table["label"].dtype.kind == "i"
    assert table.loc[0, ["min", "max", "mean", "std"]].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert table.loc[1, ["min", "max", "mean", "std"]].tolist() == [0.0, 0.0, 0.0, 0.0]
    unit = x.reshape(4, -1).astype(np.float64) / 255.0
    np.testing.assert_allclose(table["min"], unit.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(table["max"], unit.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(table["mean"], unit.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(table["std"], unit.std(axis=1), rtol=1e-5)
    assert table["nan_count"].tolist() == [0, 0, 0, 0]
    assert set(table["channels"]) == {2} and set(table["height"]) == {3} and set(table["width"]) == {5}


def test_sample_table_counts_nan_in_float16() -> None:
    x = np.full((3, 1, 2, 2), 0.5, dtype=np.float16)
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 1, 1] = 0.25
    x[2] = np.nan
    table = sample_table(SplitArrays(x=x, y=np.zeros(3, dtype=np.int64), ids=np.arange(3)))

    assert table["nan_count"].tolist() == [1, 0, 4]
    # Statistics describe the values that are not NaN; an all-NaN sample has none.
    assert table.loc[0, "min"] == 0.25 and table.loc[0, "max"] == 0.5
    assert table.loc[1, "mean"] == 0.5 and table.loc[1, "std"] == 0.0
    assert np.isnan(table.loc[2, "mean"])


def test_sample_table_is_fast_on_a_full_split() -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(60_000, 1, 28, 28), dtype=np.uint8)
    arrays = SplitArrays(x=x, y=np.zeros(60_000, dtype=np.int64), ids=np.arange(60_000))
    start = time.perf_counter()
    table = sample_table(arrays)
    elapsed = time.perf_counter() - start
    assert len(table) == 60_000
    assert elapsed < 3.0, f"sample_table took {elapsed:.2f} s on 60,000 samples"


def test_class_share_table_has_every_class() -> None:
    table = class_share_table(np.array([0, 0, 2, 7, 0, 2]), 4)
    assert table["label"].tolist() == [0, 1, 2, 3]
    assert table["count"].tolist() == [3, 0, 2, 0]
    # The out-of-range label 7 counts in the total, in no class.
    np.testing.assert_allclose(table["share"], [0.5, 0.0, 1 / 3, 0.0])


def test_share_bounds_round_out_to_whole_samples() -> None:
    bounds = BalanceBounds(min_ratio=0.5, max_ratio=1.5)
    assert share_bounds(30, 3, bounds) == (5 / 30, 15 / 30)  # exact multiples are kept
    low, high = share_bounds(6000, 10, bounds)
    assert low == pytest.approx(0.05) and high == pytest.approx(0.15)
    # 2 samples over 3 classes: one class must be empty and another holds half.
    assert share_bounds(2, 3, bounds) == (0.0, 0.5)


# ----------------------------------------------------------------------- suites
def manifest_for(counts: dict[str, int] | None = None) -> Manifest:
    return Manifest("tiny", "image", (1, 8, 8), CLASSES, dict(counts or COUNTS), {})


def test_every_expectation_says_what_it_checks() -> None:
    cfg = ValidateConfig(min_std=0.01)
    suite = build_suite("tiny", "train", manifest_for(), cfg)
    balance = build_balance_suite("tiny", "train", manifest_for(), cfg)
    kinds = {e.expectation_type for e in suite.expectations}
    assert {
        "expect_table_row_count_to_equal",
        "expect_table_row_count_to_be_between",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
    } <= kinds
    columns = {getattr(e, "column", None) for e in suite.expectations}
    assert {"min", "max", "mean", "std", "nan_count", "label", "channels", "height", "width"} <= columns
    for expectation in [*suite.expectations, *balance.expectations]:
        assert isinstance(expectation.notes, str) and len(expectation.notes) > 20
    label = next(e for e in suite.expectations if getattr(e, "column", None) == "label")
    assert list(label.value_set) == [0, 1, 2]
    std = next(e for e in suite.expectations if getattr(e, "column", None) == "std")
    assert std.min_value == 0.01


# ----------------------------------------------------------------- clean data
def test_clean_dataset_passes_and_writes_reports(clean: tuple[Path, Path, dict[str, Any]]) -> None:
    cwd, out, results = clean
    written = assert_reports(out)
    assert written == json.loads(json.dumps(results))
    assert list(written["splits"]) == ["train", "val", "test"]
    assert results["success"] is True
    assert list(results["splits"]) == ["train", "val", "test"]
    for split, n in COUNTS.items():
        split_result = results["splits"][split]
        assert split_result["success"] is True and split_result["samples"] == n
        for entry in split_result["expectations"]:
            assert {"type", "column", "kwargs", "success", "observed", "checks", "table"} <= set(entry)
        tables = {e["table"] for e in split_result["expectations"]}
        assert tables == {"samples", "class_shares"}
    # Nothing is left behind: no GX project in the working directory, no staging folders.
    assert not any(cwd.iterdir())
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_validation_keeps_gx_info_chatter_out_of_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The CLI logs at INFO; GX's own INFO bookkeeping (71 lines a stage) must not reach that log."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.NOTSET, logger="great_expectations")  # as in a fresh process
    processed = write_dataset(tmp_path / "processed", "tiny")
    validate_dataset("tiny", processed, tmp_path / "reports" / "tiny", ValidateConfig())
    chatter = [r.getMessage() for r in caplog.records if r.name.startswith("great_expectations")]
    assert chatter == []


def test_reports_link_relative(clean: tuple[Path, Path, dict[str, Any]]) -> None:
    _, out, _ = clean
    summary = (out / "summary.html").read_text(encoding="utf-8")
    assert 'href="data_docs/index.html"' in summary
    assert "expect_column_values_to_be_in_set" in summary
    pages = [out / "summary.html", *(out / "data_docs").rglob("*.html")]
    assert any("validations" in p.parts for p in pages) and any("expectations" in p.parts for p in pages)
    # Every local link of every page (GX's index lists results in script data) resolves in the copied site.
    link = re.compile(r'(?:href|src)="([^"#]+)"|"((?:validations|expectations)/[^"]+\.html)"')
    checked = 0
    for page in pages:
        for groups in link.findall(page.read_text(encoding="utf-8")):
            target = groups[0] or groups[1]
            if target.startswith(("http:", "https:", "mailto:", "data:", "javascript:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(out)} links to missing {target}"
            checked += 1
    assert checked > len(pages)


def test_rerun_replaces_reports(clean: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    processed = write_dataset(tmp_path / "processed", "tiny")
    out = tmp_path / "out"
    (out / "stale").mkdir(parents=True)
    validate_dataset("tiny", processed.parent, out, ValidateConfig())  # the parent folder is accepted too
    assert not (out / "stale").exists()
    assert_reports(out)


# -------------------------------------------------------------- failure modes
def test_nan_in_spectrogram_split_fails(tmp_path: Path) -> None:
    def add_nan(split: str, arrays: SplitArrays) -> SplitArrays:
        if split == "val":
            arrays.x[1, 0, 2, 3] = np.nan
        return arrays

    message, results = fail(tmp_path, "speech", dtype="float16", edit=add_nan)
    assert "split val:" in message and "split train" not in message
    assert "expect_column_values_to_be_between(column=nan_count, 0..0): 1 of 6 rows outside" in message
    assert results["splits"]["train"]["success"] is True
    failed = [e for e in results["splits"]["val"]["expectations"] if not e["success"]]
    assert [e["column"] for e in failed] == ["nan_count"]


def test_label_outside_class_range_fails(tmp_path: Path) -> None:
    def bad_label(split: str, arrays: SplitArrays) -> SplitArrays:
        if split == "train":
            arrays.y[0] = 5
        return arrays

    message, _ = fail(tmp_path, "labels", edit=bad_label)
    assert "split train:" in message
    assert "expect_column_values_to_be_in_set(column=label, in {0..2}): 1 of 30 rows not in {0..2} (e.g. 5)" in message


def test_class_imbalance_fails_and_passes_with_override(tmp_path: Path) -> None:
    def skew(split: str, arrays: SplitArrays) -> SplitArrays:
        if split == "train":
            arrays.y[:20] = 0  # class 0 holds 2/3 of the split, above 1.5 / 3
        return arrays

    message, results = fail(tmp_path, "skewed", edit=skew)
    assert "split train:" in message
    assert "expect_column_values_to_be_between(column=share" in message
    # 23, 3 and 4 of 30 samples: class 0 above 15/30, classes 1 and 2 below 5/30.
    assert (
        "3 of 3 classes outside 0.1667..0.5: class 0 share 0.767, class 1 share 0.100, class 2 share 0.133" in message
    )
    failed = [e for e in results["splits"]["train"]["expectations"] if not e["success"]]
    assert [e["table"] for e in failed] == ["class_shares"]

    loose = ValidateConfig(class_balance_overrides={"skewed": BalanceBounds(min_ratio=0.1, max_ratio=2.5)})
    out = tmp_path / "reports" / "skewed-override"
    assert validate_dataset("skewed", tmp_path / "processed" / "skewed", out, loose)["success"] is True
    # The override is for that dataset only.
    other = ValidateConfig(class_balance_overrides={"other": BalanceBounds(min_ratio=0.1, max_ratio=2.5)})
    with pytest.raises(ValidationFailed, match="column=share"):
        validate_dataset("skewed", tmp_path / "processed" / "skewed", out, other)


def test_count_mismatch_with_manifest_fails(tmp_path: Path) -> None:
    message, _ = fail(tmp_path, "counts", counts={**COUNTS, "test": 7})
    assert "split test: expect_table_row_count_to_equal(7): 6 rows, expected 7" in message


def test_failure_keeps_the_written_reports_readable(tmp_path: Path) -> None:
    def out_of_range(split: str, arrays: SplitArrays) -> SplitArrays:
        if split == "test":
            arrays.x[:2] = np.float16(1.5)
        return arrays

    message, results = fail(tmp_path, "range", dtype="float16", edit=out_of_range)
    assert "expect_column_values_to_be_between(column=max, 0..1): 2 of 6 rows outside 0..1" in message
    summary = (tmp_path / "reports" / "range" / "summary.html").read_text(encoding="utf-8")
    assert "failed" in summary and "2 of 6 rows outside" in summary
    assert os.path.exists(tmp_path / "reports" / "range" / "data_docs" / "index.html")
