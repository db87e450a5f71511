"""The ``validate`` stage: Great Expectations checks on every processed split.

Great Expectations validates tables, not image tensors, so each split is first
summarised into a table with one row per sample (:func:`sample_table`: label,
min/max/mean/std of the values in [0, 1], NaN count, shape) and a table with one
row per class (:func:`class_share_table`: label, count, share). Two suites per
split check them (:func:`build_suite`, :func:`build_balance_suite`):

- values in [0, 1], per-sample std >= ``min_std``, no NaN;
- labels in 0..K-1, shape as in ``manifest.json``;
- row count equal to the manifest's and at least ``min_samples[split]``;
- every class's share between ``min_ratio / K`` and ``max_ratio / K``.

:func:`validate_dataset` runs them in a throw-away GX file context in a temporary
folder (nothing is left in the project) and writes, atomically, into the report
folder: ``results.json``, ``summary.html`` and GX's own HTML ``data_docs/``. If an
expectation fails, the reports are still written, then
:class:`~latentlab.errors.ValidationFailed` is raised with one line naming the
split and the failed expectation.

Great Expectations takes seconds to import, so it is imported inside functions.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from latentlab.atomic import atomic_dir
from latentlab.config import BalanceBounds, ValidateConfig
from latentlab.data.store import SPLITS, Manifest, SplitArrays, load_manifest, load_split, to_unit_float
from latentlab.errors import DataError, ValidationFailed

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations import ExpectationSuite
    from great_expectations.data_context import AbstractDataContext

SAMPLE_COLUMNS: tuple[str, ...] = ("label", "min", "max", "mean", "std", "nan_count", "channels", "height", "width")
SHARE_COLUMNS: tuple[str, ...] = ("label", "count", "share")
SAMPLES_TABLE = "samples"
SHARES_TABLE = "class_shares"

# Rows converted to float at a time: bounds the temporary memory of a 60,000-sample
# split to a few MB and keeps the working set in cache.
_CHUNK_ROWS = 4096
_DATASOURCE = "latentlab"
_BATCH = "whole"


# ---------------------------------------------------------------------- tables
def sample_table(arrays: SplitArrays) -> pd.DataFrame:
    """One row per sample: label, min, max, mean, std (of values in [0, 1]), nan_count, channels, height, width.

    Statistics ignore NaN values (so that ``min``/``max`` still describe the rest of
    the sample); ``nan_count`` counts them on the stored array, before any
    conversion, and a sample that is all NaN gets NaN statistics.
    """
    import pandas as pd  # lazily: keeps `latentlab --help` quick

    x = arrays.x
    n, c, h, w = x.shape
    flat = x.reshape(n, c * h * w)
    stats = np.empty((4, n), dtype=np.float64)
    nan_count = np.zeros(n, dtype=np.int64)
    floating = np.issubdtype(flat.dtype, np.floating)
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        raw = flat[start:stop]
        if floating:
            nan_count[start:stop] = np.count_nonzero(np.isnan(raw), axis=1)
        # The conversion behind SplitArrays.unit_float, one chunk at a time.
        unit = to_unit_float(raw)
        if floating and nan_count[start:stop].any():
            with warnings.catch_warnings(), np.errstate(invalid="ignore"):
                # All-NaN rows warn "All-NaN slice" and give NaN, which is what we want.
                warnings.simplefilter("ignore", RuntimeWarning)
                stats[0, start:stop] = np.nanmin(unit, axis=1)
                stats[1, start:stop] = np.nanmax(unit, axis=1)
                stats[2, start:stop] = np.nanmean(unit, axis=1, dtype=np.float64)
                stats[3, start:stop] = np.nanstd(unit, axis=1, dtype=np.float64)
        else:
            with np.errstate(invalid="ignore", over="ignore"):  # inf in a float split is reported, not raised
                stats[0, start:stop] = unit.min(axis=1)
                stats[1, start:stop] = unit.max(axis=1)
                stats[2, start:stop] = unit.mean(axis=1, dtype=np.float64)
                stats[3, start:stop] = unit.std(axis=1, dtype=np.float64)
    return pd.DataFrame(
        {
            "label": np.asarray(arrays.y, dtype=np.int64),
            "min": stats[0],
            "max": stats[1],
            "mean": stats[2],
            "std": stats[3],
            "nan_count": nan_count,
            "channels": np.full(n, c, dtype=np.int64),
            "height": np.full(n, h, dtype=np.int64),
            "width": np.full(n, w, dtype=np.int64),
        },
        columns=list(SAMPLE_COLUMNS),
    )


def class_share_table(labels: np.ndarray, n_classes: int) -> pd.DataFrame:
    """One row per class 0..K-1 (row index = label): label, count, share of all samples.

    Classes without samples get a row with share 0, so that a missing class fails
    the balance check; labels outside 0..K-1 count in the total but in no class
    (the label check reports them).
    """
    import pandas as pd

    labels = np.asarray(labels, dtype=np.int64)
    valid = labels[(labels >= 0) & (labels < n_classes)]
    counts = np.bincount(valid, minlength=n_classes)[:n_classes]
    total = max(len(labels), 1)
    return pd.DataFrame(
        {"label": np.arange(n_classes, dtype=np.int64), "count": counts.astype(np.int64), "share": counts / total},
        columns=list(SHARE_COLUMNS),
    )


# ---------------------------------------------------------------------- suites
def balance_bounds(dataset: str, cfg: ValidateConfig) -> BalanceBounds:
    """The class-balance bounds for ``dataset``: its override if any, else the default."""
    return cfg.class_balance_overrides.get(dataset, cfg.class_balance)


def share_bounds(n_samples: int, n_classes: int, bounds: BalanceBounds) -> tuple[float, float]:
    """Allowed class share (lowest, highest) for a split of ``n_samples`` over ``n_classes``.

    The nominal bounds are ``min_ratio / K`` and ``max_ratio / K``. A share can
    only be a multiple of ``1 / n_samples``, so the bounds are widened to the
    nearest whole sample (count ``floor(min_ratio * N / K)`` to
    ``ceil(max_ratio * N / K)``); otherwise a 6-sample validation split of a
    4-class dataset could never pass. For large splits this changes nothing.
    """
    if n_samples <= 0:
        return bounds.min_ratio / n_classes, bounds.max_ratio / n_classes
    # The small epsilon keeps 0.5 * 30 / 3 = 4.999999... from rounding down to 4.
    low = math.floor(bounds.min_ratio * n_samples / n_classes + 1e-9)
    high = math.ceil(bounds.max_ratio * n_samples / n_classes - 1e-9)
    return low / n_samples, min(high, n_samples) / n_samples


def build_suite(dataset: str, split: str, manifest: Manifest, cfg: ValidateConfig) -> ExpectationSuite:
    """The suite over :func:`sample_table` of one split: counts, value ranges, NaN, labels and shape."""
    _gx_environment()
    import great_expectations as gx
    import great_expectations.expectations as gxe

    n_classes = len(manifest.class_names)
    expected_rows = int(manifest.counts[split])
    min_rows = int(cfg.min_samples.get(split, 1))
    channels, height, width = manifest.shape
    expectations: list[Any] = [
        gxe.ExpectTableRowCountToEqual(
            value=expected_rows,
            notes=f"The {split} split holds as many samples as manifest.json says ({expected_rows}).",
        ),
        gxe.ExpectTableRowCountToBeBetween(
            min_value=min_rows,
            max_value=None,
            notes=f"The {split} split holds at least validate.min_samples.{split} = {min_rows} samples.",
        ),
    ]
    for column in ("min", "max", "mean"):
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=column,
                min_value=0.0,
                max_value=1.0,
                notes=f"Each sample's {column} value, scaled to [0, 1], lies in [0, 1] (no out-of-range pixels).",
            )
        )
    expectations += [
        gxe.ExpectColumnValuesToBeBetween(
            column="std",
            min_value=float(cfg.min_std),
            max_value=None,
            notes=f"Each sample's standard deviation is at least validate.min_std = {cfg.min_std} (no blank samples).",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="nan_count",
            min_value=0,
            max_value=0,
            notes="No sample holds a NaN value.",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="label",
            value_set=list(range(n_classes)),
            notes=f"Every label is a class index 0..{n_classes - 1} of manifest.json's {n_classes} class_names.",
        ),
    ]
    for column, size in (("channels", channels), ("height", height), ("width", width)):
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column=column,
                value_set=[int(size)],
                notes=f"Every sample has {column} = {size}, the shape (C, H, W) in manifest.json.",
            )
        )
    return gx.ExpectationSuite(
        name=_suite_name(dataset, split, SAMPLES_TABLE),
        expectations=expectations,
        notes=f"Per-sample checks of {dataset}/{split}: one row per sample (latentlab.validate.sample_table).",
    )


def build_balance_suite(
    dataset: str, split: str, manifest: Manifest, cfg: ValidateConfig, n_samples: int | None = None
) -> ExpectationSuite:
    """The suite over :func:`class_share_table` of one split: every class's share within the balance bounds.

    ``n_samples`` is the split's actual size (the shares' denominator, see
    :func:`share_bounds`); by default the manifest's count.
    """
    _gx_environment()
    import great_expectations as gx
    import great_expectations.expectations as gxe

    n_classes = len(manifest.class_names)
    n = int(manifest.counts[split]) if n_samples is None else int(n_samples)
    bounds = balance_bounds(dataset, cfg)
    low, high = share_bounds(n, n_classes, bounds)
    source = (
        f"validate.class_balance_overrides.{dataset}"
        if dataset in cfg.class_balance_overrides
        else "validate.class_balance"
    )
    expectation = gxe.ExpectColumnValuesToBeBetween(
        column="share",
        min_value=low,
        max_value=high,
        notes=(
            f"Each of the {n_classes} classes makes up between min_ratio/K = {bounds.min_ratio}/{n_classes} and "
            f"max_ratio/K = {bounds.max_ratio}/{n_classes} of the split ({source}), "
            f"rounded out to whole samples of {n}: {low:.4g}..{high:.4g}."
        ),
    )
    return gx.ExpectationSuite(
        name=_suite_name(dataset, split, SHARES_TABLE),
        expectations=[expectation],
        notes=f"Class balance of {dataset}/{split}: one row per class (latentlab.validate.class_share_table).",
    )


def _suite_name(dataset: str, split: str, table: str) -> str:
    # GX stores names with dots as nested folders: the data docs group by dataset, then split.
    return f"{dataset}.{split}.{table}"


# ------------------------------------------------------------------ validation
def validate_dataset(dataset: str, processed_dir: Path, out_dir: Path, cfg: ValidateConfig) -> dict[str, Any]:
    """Validate every split of a processed dataset and write the reports into ``out_dir``.

    ``processed_dir`` is the dataset's folder (``data/processed/{dataset}``, with
    ``manifest.json``); its parent ``data/processed`` is accepted too. ``out_dir``
    is replaced atomically by ``results.json``, ``summary.html`` and
    ``data_docs/`` (GX's HTML data docs, ``data_docs/index.html``). Returns the
    content of ``results.json``.

    Raises :class:`~latentlab.errors.ValidationFailed` after writing the reports
    when any expectation fails, and :class:`~latentlab.errors.DataError` when the
    processed data cannot be read.
    """
    processed_dir = Path(processed_dir)
    out_dir = Path(out_dir)
    if not (processed_dir / "manifest.json").exists() and (processed_dir / dataset / "manifest.json").exists():
        processed_dir = processed_dir / dataset
    manifest = load_manifest(processed_dir)
    if not manifest.class_names:
        raise DataError(f"{processed_dir / 'manifest.json'}: class_names is empty; cannot check labels")

    # manifest.json's keys are sorted; report the splits in pipeline order.
    splits = [s for s in SPLITS if s in manifest.counts] + [s for s in manifest.counts if s not in SPLITS]
    tables: dict[str, dict[str, pd.DataFrame]] = {}
    for split in splits:
        arrays = load_split(processed_dir, split)
        tables[split] = {
            SAMPLES_TABLE: sample_table(arrays),
            SHARES_TABLE: class_share_table(arrays.y, len(manifest.class_names)),
        }

    with tempfile.TemporaryDirectory(prefix="latentlab-gx-") as gx_root, _gx_context(Path(gx_root)) as context:
        results = _run_suites(context, dataset, manifest, cfg, tables)
        context.build_data_docs()
        site = _local_site(context, Path(gx_root))
        with atomic_dir(out_dir) as staging:
            shutil.copytree(site, staging / "data_docs")
            _fix_static_links(staging / "data_docs")
            if not (staging / "data_docs" / "index.html").exists():
                raise RuntimeError(f"Great Expectations built no data docs index in {site}")
            # Not key-sorted: the file lists the splits in pipeline order, like the summary.
            (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            (staging / "summary.html").write_text(_summary_html(results), encoding="utf-8")

    if not results["success"]:
        raise ValidationFailed(_failure_message(results, out_dir / "summary.html"))
    return results


@contextmanager
def _gx_context(root: Path) -> Iterator[AbstractDataContext]:
    """A GX file context under ``root``, with analytics, progress bars and INFO chatter off.

    ``gx.get_context`` makes its context the process-wide current one; the previous
    one is restored afterwards so nothing keeps pointing into the deleted folder.
    """
    _gx_environment()
    # GX logs its own bookkeeping at INFO (loading and saving its config, "missing
    # config_provider"): 71 lines a validate stage under the CLI's INFO root logger,
    # around the one line that matters. Its warnings and errors still show.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.data_context.context_factory import project_manager, set_context
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.exceptions import DataContextRequiredError

    try:
        previous: AbstractDataContext | None = project_manager.get_current_project()
    except DataContextRequiredError:
        previous = None
    try:
        # mode="file" with an explicit root: never looks at (or scaffolds in) the working directory.
        context = gx.get_context(mode="file", project_root_dir=root)
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        context.variables.analytics_enabled = False
        context.variables.save()
        yield context
    finally:
        set_context(previous)


def _gx_environment() -> None:
    """Set before GX is first imported: never send usage statistics."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"


def _local_site(context: AbstractDataContext, root: Path) -> Path:
    """The folder of the context's local data docs site (where index.html was written)."""
    # The default site of a new file context; GX's site URL does not escape the
    # base folder, so it is only the fallback.
    default = root / "gx" / "uncommitted" / "data_docs" / "local_site"
    if (default / "index.html").exists():
        return default
    for site in context.get_docs_sites_urls():
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            return Path(url.removeprefix("file://")).parent
    return default


_STATIC_LINK = re.compile(r'(href|src)="((?:\.\./|\./)*)static/([^"]*)"')


def _fix_static_links(site: Path) -> None:
    """Point every page's links to ``static/`` at the site's real ``static/`` folder.

    GX 1.24 writes the favicon link of validation-result pages one ``../`` short;
    recomputing every such link from the page's depth keeps the copied site's
    relative links working wherever it is moved.
    """
    static = site / "static"
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        prefix = Path(os.path.relpath(static, page.parent)).as_posix()
        fixed = _STATIC_LINK.sub(rf'\1="{prefix}/\3"', text)
        if fixed != text:
            page.write_text(fixed, encoding="utf-8")


def _run_suites(
    context: AbstractDataContext,
    dataset: str,
    manifest: Manifest,
    cfg: ValidateConfig,
    tables: dict[str, dict[str, pd.DataFrame]],
) -> dict[str, Any]:
    """Run both suites on every split; returns the results.json content."""
    import great_expectations as gx

    source = context.data_sources.add_pandas(_DATASOURCE)
    # One run id for the whole dataset, so the data docs list the splits as one run.
    run_id = gx.RunIdentifier(run_name=dataset, run_time=datetime.datetime.now(datetime.UTC))
    splits: dict[str, Any] = {}
    for split, split_tables in tables.items():
        n_samples = len(split_tables[SAMPLES_TABLE])
        suites = {
            SAMPLES_TABLE: build_suite(dataset, split, manifest, cfg),
            SHARES_TABLE: build_balance_suite(dataset, split, manifest, cfg, n_samples=n_samples),
        }
        entries: list[dict[str, Any]] = []
        for table, suite in suites.items():
            name = _suite_name(dataset, split, table)
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(_BATCH)
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch, suite=context.suites.add(suite))
            )
            result = definition.run(
                batch_parameters={"dataframe": split_tables[table]},
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
                run_id=run_id,
            )
            entries += [_entry(table, r, split_tables[table]) for r in result.results]
        splits[split] = {
            "success": all(e["success"] for e in entries),
            "samples": n_samples,
            "expectations": entries,
        }
    return {
        "dataset": dataset,
        "success": all(s["success"] for s in splits.values()),
        "splits": splits,
        "class_names": list(manifest.class_names),
        "data_docs": "data_docs/index.html",
    }


def _entry(table: str, result: Any, frame: pd.DataFrame) -> dict[str, Any]:
    """One expectation result as plain JSON: type, column, kwargs, success, observed (short words)."""
    config = result.expectation_config
    kwargs = {k: _plain(v) for k, v in config.kwargs.items() if k != "batch_id"}
    return {
        "table": table,
        "type": config.type,
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "success": bool(result.success),
        "observed": _observed(table, config.type, kwargs, result, frame),
        "checks": config.notes if isinstance(config.notes, str) else " ".join(config.notes or []),
    }


def _observed(table: str, kind: str, kwargs: dict[str, Any], result: Any, frame: pd.DataFrame) -> str:
    """What GX saw, in a few words (the why of a failure)."""
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return f"error: {info.get('exception_message', 'exception in GX')}"
    res: dict[str, Any] = result.result or {}
    if "observed_value" in res:
        observed = _plain(res["observed_value"])
        if result.success or "value" not in kwargs:
            return f"{observed} rows" if kind.startswith("expect_table_row_count") else str(observed)
        return f"{observed} rows, expected {kwargs['value']}"
    total = int(res.get("element_count", len(frame)))
    bad = int(res.get("unexpected_count") or 0)
    missing = int(res.get("missing_count") or 0)
    missing_words = f", {missing} missing (NaN)" if missing else ""
    if table == SHARES_TABLE and bad:
        # The share table's index is the label, so GX's unexpected index list names the classes.
        labels = res.get("partial_unexpected_index_list") or []
        shown = ", ".join(f"class {int(i)} share {frame['share'].iloc[int(i)]:.3f}" for i in labels)
        more = f" and {bad - len(labels)} more" if bad > len(labels) else ""
        return f"{bad} of {total} classes outside {_range_words(kwargs)}: {shown}{more}"
    if bad:
        where = f"not in {_set_words(kwargs['value_set'])}" if "value_set" in kwargs else _outside_words(kwargs)
        examples = ", ".join(str(_plain(v)) for v in (res.get("partial_unexpected_list") or [])[:3])
        return f"{bad} of {total} rows {where}{missing_words}" + (f" (e.g. {examples})" if examples else "")
    return f"all {total - missing} rows pass{missing_words}"


def _outside_words(kwargs: dict[str, Any]) -> str:
    """Where failing values lie: "outside 0..1", "below 0.01" or "above 3"."""
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is not None and high is not None:
        return f"outside {_range_words(kwargs)}"
    return f"below {_num(low)}" if low is not None else f"above {_num(high)}"


def _range_words(kwargs: dict[str, Any]) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if low is not None and high is not None:
        return f"{_num(low)}..{_num(high)}"
    return f">= {_num(low)}" if low is not None else f"<= {_num(high)}"


def _set_words(values: Sequence[Any]) -> str:
    ints = sorted(int(v) for v in values)
    if len(ints) > 2 and ints == list(range(ints[0], ints[-1] + 1)):
        return f"{{{ints[0]}..{ints[-1]}}}"
    return "{" + ", ".join(str(v) for v in ints) + "}"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _args_words(entry: dict[str, Any]) -> str:
    """The arguments of an expectation as in ``expect_x(column=max, 0..1)``."""
    kwargs = entry["kwargs"]
    parts = [f"column={entry['column']}"] if entry["column"] else []
    if "value_set" in kwargs:
        parts.append(f"in {_set_words(kwargs['value_set'])}")
    elif "value" in kwargs:
        parts.append(str(kwargs["value"]))
    elif "min_value" in kwargs or "max_value" in kwargs:
        parts.append(_range_words(kwargs))
    return ", ".join(parts)


def _failure_message(results: dict[str, Any], summary: Path) -> str:
    """One line: every failed expectation, grouped by split, and where to read more."""
    parts = []
    for split, split_result in results["splits"].items():
        failed = [e for e in split_result["expectations"] if not e["success"]]
        if failed:
            words = "; ".join(f"{e['type']}({_args_words(e)}): {e['observed']}" for e in failed)
            parts.append(f"split {split}: {words}")
    return f"validation failed for {results['dataset']}, {'; '.join(parts)}; see {summary}"


def _plain(value: Any) -> Any:
    """numpy scalars and containers as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or inf
    return value


# --------------------------------------------------------------------- summary
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.pass { color: #1a7f37; font-weight: bold; }
.fail { color: #cf222e; font-weight: bold; }
tr.failed { background: #fff0f0; }
.checks { color: #666; font-size: 0.85em; }
"""


def _summary_html(results: dict[str, Any]) -> str:
    """A small self-contained page: one table row per expectation, a link to the GX data docs."""
    esc = html.escape
    dataset = esc(results["dataset"])
    verdict = '<span class="pass">passed</span>' if results["success"] else '<span class="fail">failed</span>'
    rows = []
    for split, split_result in results["splits"].items():
        for e in split_result["expectations"]:
            ok = e["success"]
            rows.append(
                f'<tr class="{"passed" if ok else "failed"}"><td>{esc(split)}</td><td>{esc(e["table"])}</td>'
                f"<td><code>{esc(e['type'])}</code><div class='checks'>{esc(e['checks'])}</div></td>"
                f"<td>{esc(e['column'] or '')}</td>"
                f'<td class="{"pass" if ok else "fail"}">{"yes" if ok else "NO"}</td>'
                f"<td>{esc(str(e['observed']))}</td></tr>"
            )
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Validation of {dataset}</title><style>{_STYLE}</style></head>
<body>
<h1>Validation of {dataset}: {verdict}</h1>
<p>Great Expectations checks of every processed split. Full results:
<a href="{esc(results["data_docs"])}">Great Expectations data docs</a>; machine-readable:
<a href="results.json">results.json</a>.</p>
<table>
<thead><tr><th>split</th><th>table</th><th>expectation</th><th>column</th><th>success</th><th>observed</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
"""
