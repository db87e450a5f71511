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


@task(name="train", task_run_name="train-{model}-{dataset}", cache_policy=NONE)
def train_task(dataset: str, model: str, root: str) -> str:
    out = stages.train(dataset, model, Path(root))
    get_run_logger().info("trained %s on %s into %s", model, dataset, out)
    return str(out)


@task(name="evaluate", task_run_name="evaluate-{model}-{dataset}", cache_policy=NONE)
def evaluate_task(dataset: str, model: str, root: str) -> str:
    out = stages.evaluate(dataset, model, Path(root))
    get_run_logger().info("evaluated %s on %s: %s", model, dataset, out)
    return str(out)


@task(name="compare", task_run_name="compare-{dataset}", cache_policy=NONE)
def compare_task(dataset: str, root: str) -> str:
    out = stages.compare(dataset, Path(root))
    get_run_logger().info("compared the models of %s: %s", dataset, out)
    return str(out)


@task(name="anomaly", task_run_name="anomaly-{dataset}", cache_policy=NONE)
def anomaly_task(dataset: str, root: str) -> str:
    out = stages.anomaly(dataset, Path(root))
    get_run_logger().info("anomaly detection on %s: %s", dataset, out)
    return str(out)


@task(name="sparsity", task_run_name="sparsity-{dataset}", cache_policy=NONE)
def sparsity_task(dataset: str, root: str) -> str:
    out = stages.sparsity(dataset, Path(root))
    get_run_logger().info("sparsity sweep on %s: %s", dataset, out)
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
        for model in params.train.models:
            train_task(dataset, model, root)
            evaluate_task(dataset, model, root)
        compare_task(dataset, root)
        if dataset in params.evaluate.anomaly.datasets:
            anomaly_task(dataset, root)
        if dataset in params.evaluate.sparsity.datasets:
            sparsity_task(dataset, root)
    return report_task(root)
