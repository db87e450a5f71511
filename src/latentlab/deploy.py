"""Prefect deployments: the pipeline and the collapse study on cron schedules.

``latentlab serve`` serves both deployments from one long-running process
(``prefect.serve``); each scheduled or triggered run is a ``dvc exp run``, so
its results are versioned by DVC as an experiment that ``dvc exp show``
compares with the others. Settings live in the ``schedule`` section of
params.yaml. Without ``PREFECT_API_URL`` nothing can be served: start a server
first (``latentlab server``) or point at a remote one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
from pathlib import Path
from typing import Any

from latentlab.config import DeploymentConfig, Params, ScheduleConfig

#: Deployment names, as the Prefect UI shows them (flow name / deployment name).
PIPELINE_DEPLOYMENT = "scheduled-pipeline"
COLLAPSE_DEPLOYMENT = "scheduled-collapse"
#: The tag of task runs that train networks; a tag concurrency limit keeps them off a shared GPU.
GPU_TAG = "gpu"


def next_runs(cron: str, timezone: str, n: int = 3, start: dt.datetime | None = None) -> list[dt.datetime]:
    """The next ``n`` times a cron schedule fires at or after ``start``, with the scheduler's own code.

    Raises ValueError for an expression or time zone Prefect does not accept.
    """
    from prefect.server.schemas.schedules import CronSchedule

    schedule = CronSchedule(cron=cron, timezone=timezone)
    start = start or dt.datetime.now(dt.UTC)
    dates = schedule.get_dates(n=n, start=start)
    if inspect.isawaitable(dates):  # Prefect's sync/async-compatible method, called outside an event loop
        dates = asyncio.run(dates)
    return [dt.datetime.fromtimestamp(d.timestamp(), tz=d.tzinfo) for d in dates]


def _deployment(flow: Any, name: str, cfg: DeploymentConfig, schedule: ScheduleConfig, root: Path) -> Any:
    from prefect.schedules import Cron

    return flow.to_deployment(
        name=name,
        schedules=[Cron(cfg.cron, timezone=schedule.timezone)] if cfg.cron else [],
        parameters={"root": str(root), "targets": list(cfg.targets), "set_params": list(cfg.set_params)},
        tags=["latentlab"],
        description=f"dvc exp run {' '.join(cfg.targets) or '(whole pipeline)'} in {root}",
    )


def deployments(params: Params, root: Path) -> list[Any]:
    """The pipeline and collapse deployments of ``root`` (a DVC repository inside a git repository)."""
    from latentlab.orchestration import dvc_experiment_flow

    schedule = params.schedule
    return [
        _deployment(dvc_experiment_flow, PIPELINE_DEPLOYMENT, schedule.pipeline, schedule, root),
        _deployment(dvc_experiment_flow, COLLAPSE_DEPLOYMENT, schedule.collapse, schedule, root),
    ]


def ensure_gpu_limit(limit: int) -> None:
    """Create (or update) the tag concurrency limit on ``gpu``-tagged task runs."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=limit)


def gpu_tags() -> tuple[str, ...]:
    """``("gpu",)`` when the Prefect server limits ``gpu``-tagged task runs, else ``()``.

    The flows put these tags on the task runs that train networks. Without a
    limit the tag would buy nothing and cost time: Prefect 3.8 asks the server
    for a concurrency slot before every tagged task run (a 5 s client cache
    aside). On the SQLite-backed server that request reads and then updates in
    one deferred transaction; when another write reaches the database in
    between, it fails with "database is locked" (HTTP 503) and the client
    retries after 2 s. Measured on the default pipeline before this check: 25
    such pauses, 51.7 s of a 749 s flow run (README, orchestration overhead).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            return ()
    return (GPU_TAG,)


def serve(root: Path) -> None:
    """Serve the deployments until interrupted (Ctrl-C); runs start in subprocesses of this one."""
    import prefect

    from latentlab.config import load_params
    from latentlab.paths import ProjectPaths

    root = root.resolve()
    params = load_params(ProjectPaths(root).params)
    ensure_gpu_limit(params.schedule.gpu_concurrency)
    prefect.serve(*deployments(params, root))
