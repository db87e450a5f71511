"""Prefect tasks and flows over :mod:`latentlab.stages`.

Each stage is one task that calls the same function the DVC stage calls; the
flow only sequences them. Tasks pass file paths, never arrays (hashing a large
array for a cache key costs seconds), and caching is off: DVC decides what is
up to date, Prefect runs, retries and records.
"""

from __future__ import annotations

import os
from pathlib import Path

# Library loggers (latentlab.*) appear in the task-run logs of the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "latentlab")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from latentlab import stages  # noqa: E402
from latentlab.config import load_params  # noqa: E402
from latentlab.paths import ProjectPaths  # noqa: E402


# Downloads can fail transiently: retry ingest with backoff. Other stages are
# deterministic, so a retry would fail the same way.
@task(name="ingest", task_run_name="ingest-{dataset}", retries=2, retry_delay_seconds=[10, 60], cache_policy=NONE)
def ingest_task(dataset: str, root: str) -> str:
    out = stages.ingest(dataset, Path(root))
    get_run_logger().info("ingested %s into %s", dataset, out)
    return str(out)


@task(name="validate", task_run_name="validate-{dataset}", cache_policy=NONE)
def validate_task(dataset: str, root: str) -> str:
    out = stages.validate(dataset, Path(root))
    get_run_logger().info("validation of %s passed: %s", dataset, out)
    return str(out)


@task(name="corrupt", task_run_name="corrupt-{dataset}", cache_policy=NONE)
def corrupt_task(dataset: str, root: str) -> str:
    out = stages.corrupt(dataset, Path(root))
    get_run_logger().info("corruptions of %s in %s", dataset, out)
    return str(out)


@task(name="train", task_run_name="train-{family}-{dataset}", cache_policy=NONE)
def train_task(dataset: str, family: str, root: str) -> str:
    out = stages.train(dataset, family, Path(root))
    get_run_logger().info("trained %s on %s into %s", family, dataset, out)
    return str(out)


@task(name="evaluate", task_run_name="evaluate-{family}-{dataset}", cache_policy=NONE)
def evaluate_task(dataset: str, family: str, root: str) -> str:
    out = stages.evaluate(dataset, family, Path(root))
    get_run_logger().info("evaluated %s on %s: %s", family, dataset, out)
    return str(out)


@task(name="report", task_run_name="report", cache_policy=NONE)
def report_task(root: str) -> str:
    out = stages.report(Path(root))
    get_run_logger().info("report written to %s", out)
    return str(out)


@flow(name="latentlab-pipeline", log_prints=True)
def pipeline_flow(root: str = ".", datasets: list[str] | None = None) -> str:
    """ingest -> validate -> corrupt -> train -> evaluate per dataset, then the report.

    ``datasets`` defaults to ``pipeline.datasets`` in params.yaml. Returns the
    path of ``reports/index.html``.
    """
    params = load_params(ProjectPaths(Path(root)).params)
    for dataset in datasets or params.pipeline.datasets:
        ingest_task(dataset, root)
        validate_task(dataset, root)
        corrupt_task(dataset, root)
        for family in params.train.models:
            train_task(dataset, family, root)
            evaluate_task(dataset, family, root)
    return report_task(root)
