"""Prefect tasks and flows over :mod:`latentlab.stages`.

Each stage is one task that calls the same function the DVC stage calls; the
flow only sequences them. Tasks pass file paths, never arrays (hashing a large
array for a cache key costs seconds), and caching is off: DVC decides what is
up to date, Prefect runs, retries and records.

Fan-outs (the sweep's points, the collapse study's loop x seed pairs) run on
the task runner that :func:`task_runner_for` picks from ``sweep.runner`` and
``sweep.dask`` at run time: a local Dask cluster, the Dask cluster at an
address, or one task run at a time. Only configuration changes between them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

# Library loggers (latentlab.*) appear in the task-run logs of the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "latentlab")

from prefect import flow, get_run_logger, tags, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.futures import wait  # noqa: E402
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from latentlab import stages, sweep  # noqa: E402
from latentlab.config import SweepConfig, load_params  # noqa: E402
from latentlab.deploy import gpu_tags  # noqa: E402
from latentlab.errors import ConfigError  # noqa: E402
from latentlab.paths import ProjectPaths  # noqa: E402

log = logging.getLogger(__name__)

#: Environment variable with the address of a Dask scheduler; overrides sweep.dask.address.
DASK_ADDRESS_ENV = "LATENTLAB_DASK_ADDRESS"


def task_runner_for(cfg: SweepConfig, environ: Mapping[str, str] | None = None) -> TaskRunner:
    """The task runner of ``cfg.runner``: where a flow's submitted task runs go.

    ``serial``: one at a time, in the flow's process. ``dask``: a
    ``prefect_dask.DaskTaskRunner`` connected to the scheduler at
    ``$LATENTLAB_DASK_ADDRESS`` or ``cfg.dask.address`` (a running cluster,
    one node or many), else to a local cluster it starts and stops itself:
    ``cfg.dask.n_workers`` worker processes of one thread each (torch
    processes that share cores slow each other down, and a point's result
    must not depend on how many threads it had).
    """
    environ = os.environ if environ is None else environ
    if cfg.runner == "serial":
        return ThreadPoolTaskRunner(max_workers=1)
    # Imported here: distributed takes a second to import and only Dask runs need it.
    from prefect_dask import DaskTaskRunner

    address = environ.get(DASK_ADDRESS_ENV, "").strip() or cfg.dask.address
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.dask.n_workers, "threads_per_worker": 1, "processes": True})


@contextlib.contextmanager
def prefect_api_for_workers(cfg: SweepConfig, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """Make sure Dask workers report their task runs to this flow's Prefect API.

    Without ``PREFECT_API_URL`` Prefect runs on a temporary server of the
    process that needs it, and every Dask worker (another process) would start
    one of its own. Start this process's temporary server first and hand its
    address to the workers (prefect-dask sends the settings along with each
    task run). It listens on 127.0.0.1: workers on other machines need
    ``PREFECT_API_URL`` set to a server they can reach.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    environ = os.environ if environ is None else environ
    if cfg.runner == "serial" or get_current_settings().api.url:
        yield
        return
    if environ.get(DASK_ADDRESS_ENV, "").strip() or cfg.dask.address:
        log.warning(
            "PREFECT_API_URL is not set: Dask workers on other machines cannot reach the temporary Prefect "
            "server on 127.0.0.1; set PREFECT_API_URL to a Prefect server they can reach",
            extra={"send_to_api": False},  # no flow run yet: Prefect's API handler would warn about that
        )
    from prefect.server.api.server import SubprocessASGIServer

    # The instance Prefect's own temporary-server mode uses in this process (stopped at exit).
    server = SubprocessASGIServer()
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def with_overrides(
    cfg: SweepConfig,
    *,
    runner: Literal["dask", "serial"] | None = None,
    address: str | None = None,
    workers: int | None = None,
) -> SweepConfig:
    """``cfg`` with command-line choices on top (validated like params.yaml); an address alone implies Dask."""
    dask = cfg.dask.model_dump()
    dask.update({k: v for k, v in {"address": address, "n_workers": workers}.items() if v is not None})
    if runner is None and address is not None:
        runner = "dask"
    try:
        return SweepConfig.model_validate(
            {**cfg.model_dump(exclude={"dask", "runner"}), "runner": runner or cfg.runner, "dask": dask}
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        option = {"address": "--address", "n_workers": "--workers", "runner": "--runner"}.get(
            str(err["loc"][-1]), ".".join(map(str, err["loc"]))
        )
        raise ConfigError(f"{option}: {err['msg']} (got {err.get('input')!r})") from None


def describe_runner(cfg: SweepConfig, environ: Mapping[str, str] | None = None) -> str:
    """One line saying where task runs go, for logs and the MLflow run."""
    environ = os.environ if environ is None else environ
    if cfg.runner == "serial":
        return "serial"
    address = environ.get(DASK_ADDRESS_ENV, "").strip() or cfg.dask.address
    return f"dask cluster at {address}" if address else f"local dask cluster, {cfg.dask.n_workers} workers x 1 thread"


# Downloads can fail transiently: retry ingest with backoff. Other stages are
# deterministic, so a retry would fail the same way. Task runs that train
# networks are tagged "gpu" by the flows (`with tags(*gpu)`) when the server has
# a concurrency limit on that tag (`latentlab serve` sets one), so that two
# trainings never share one GPU; deploy.gpu_tags says why only then.
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


@task(name="classifier", task_run_name="classifier-{dataset}", cache_policy=NONE)
def classifier_task(dataset: str, root: str) -> str:
    out = stages.classifier(dataset, Path(root))
    get_run_logger().info("domain classifier of %s: %s", dataset, out)
    return str(out)


@task(name="generate", task_run_name="generate-{model}-{dataset}", cache_policy=NONE)
def generate_task(dataset: str, model: str, root: str) -> str:
    out = stages.generate(dataset, model, Path(root))
    get_run_logger().info("generative model %s on %s: %s", model, dataset, out)
    return str(out)


def _run_logged(
    cmd: list[str], *, env: dict[str, str], failure: str, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``, copy its output into the task run's log, raise with its last line if it fails."""
    logger = get_run_logger()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            logger.info(line)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{failure} failed: {tail[0]}")
    return proc


@task(name="collapse-loop", task_run_name="collapse-{dataset}-{loop}-seed{seed}", cache_policy=NONE)
def collapse_loop_task(dataset: str, loop: str, seed: int, root: str) -> str:
    """One (loop type, seed) pair of the collapse study, in a process of its own.

    A process, not the task's thread: torch's global RNG (weight initialisation,
    VAE noise) is shared by threads, so pairs in threads would not be
    reproducible, and one thread per process keeps parallel pairs from slowing
    each other down.
    """
    import sys

    logger = get_run_logger()
    cmd = [sys.executable, "-m", "latentlab", "collapse-runs", dataset, "--loop", loop, "--seed", str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = _run_logged(cmd + ["--root", root], env=env, failure=f"collapse loop {loop} (seed {seed}) on {dataset}")
    logger.info("collapse loop %s (seed %d) on %s: generations saved", loop, seed, dataset)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


@task(name="collapse", task_run_name="collapse-{dataset}", cache_policy=NONE)
def collapse_task(dataset: str, root: str) -> str:
    out = stages.collapse(dataset, Path(root))
    get_run_logger().info("collapse study of %s: %s", dataset, out)
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
    gpu = gpu_tags()
    for dataset in datasets or params.pipeline.datasets:
        ingest_task(dataset, root)
        validate_task(dataset, root)
        corrupt_task(dataset, root)
        for model in params.train.models:
            with tags(*gpu):
                train_task(dataset, model, root)
            evaluate_task(dataset, model, root)
        compare_task(dataset, root)
        with tags(*gpu):
            if dataset in params.evaluate.anomaly.datasets:
                anomaly_task(dataset, root)
            if dataset in params.evaluate.sparsity.datasets:
                sparsity_task(dataset, root)
            if dataset in params.generate.datasets:
                classifier_task(dataset, root)
                for model in params.generate.models:
                    generate_task(dataset, model, root)
        if dataset in params.collapse.datasets:
            run_collapse(root, dataset)
    return report_task(root)


@flow(name="collapse", log_prints=True)
def collapse_flow(root: str = ".", dataset: str | None = None) -> str:
    """The model-collapse study of ``dataset`` (default: the first of collapse.datasets).

    Generations of one loop run in sequence inside one task; the (loop type,
    seed) pairs are task runs on the flow's task runner (:func:`run_collapse`
    picks it from params.yaml: in parallel on Dask). Each finished generation is saved
    (results and samples), so the closing ``collapse`` task finds every pair
    done, fits nothing, and writes the summary, the figures and the MLflow
    parent run with one child run per generation. The domain classifier must
    exist (the ``classifier`` stage) and is trained here when missing.
    """
    params = load_params(ProjectPaths(Path(root)).params)
    if dataset is None:
        if not params.collapse.datasets:
            raise ValueError("params.yaml: collapse.datasets is empty: no dataset to run the collapse study on")
        dataset = params.collapse.datasets[0]
    with tags(*gpu_tags()):
        if not (ProjectPaths(Path(root)).classifier(dataset) / "classifier.pt").exists():
            classifier_task(dataset, root)
        pairs = [(loop, seed) for loop in params.collapse.loops for seed in params.collapse.seeds]
        futures = [collapse_loop_task.submit(dataset, loop, seed, root) for loop, seed in pairs]
    for future in futures:
        future.result()
    return collapse_task(dataset, root)


def run_collapse(root: str = ".", dataset: str | None = None, *, return_state: bool = False) -> Any:
    """:func:`collapse_flow` with its (loop type, seed) pairs on the task runner of ``sweep.runner``.

    Each pair still runs in a process of its own (``latentlab collapse-runs``),
    started by the Dask worker (or the flow's process, when serial) that took it.
    """
    cfg = load_params(ProjectPaths(Path(root)).params).sweep
    with prefect_api_for_workers(cfg):
        return collapse_flow.with_options(task_runner=task_runner_for(cfg))(
            root=root, dataset=dataset, return_state=return_state
        )


def _where() -> dict[str, Any]:
    """The machine, process and Dask worker (if any) running this task run."""
    import socket

    where: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "worker": "none"}
    try:
        from distributed import get_worker

        where["worker"] = get_worker().address
    except (ImportError, ValueError):
        pass  # not on a Dask worker
    return where


@task(name="sweep-point", task_run_name="sweep-{point.id}", cache_policy=NONE)
def sweep_point_task(root: str, point: sweep.SweepPoint) -> dict[str, Any]:
    """Train and score one point of the sweep; returns its result and where it ran (both small)."""
    # A Dask worker's root logger stays at WARNING: let the library's INFO lines (epochs, a reused
    # result) reach this task run's logs, as they do in the flow's own process.
    library = logging.getLogger("latentlab")
    if library.getEffectiveLevel() > logging.INFO:
        library.setLevel(logging.INFO)
    result = sweep.run_point(Path(root), point)
    where = _where()
    get_run_logger().info(
        "%s: test MSE %.6g (host %s, pid %d, dask worker %s)",
        point.id,
        result["test_mse"],
        where["host"],
        where["pid"],
        where["worker"],
    )
    return {"result": result, "ran_on": where}


@task(name="sweep-summary", task_run_name="sweep-summary", cache_policy=NONE)
def sweep_summary_task(root: str, outcomes: list[dict[str, Any]], runner: str) -> str:
    """The sweep's table, figure and MLflow runs (a parent, a child per point); returns the metrics path."""
    params = load_params(ProjectPaths(Path(root)).params)
    results = [o["result"] for o in outcomes]
    outputs = sweep.summarise(Path(root), results)
    run_tags = {
        o["result"]["id"]: {f"latentlab.ran_on.{k}": v for k, v in o["ran_on"].items()} | {"latentlab.runner": runner}
        for o in outcomes
    }
    run_id = sweep.log_sweep(Path(root), params, results, outputs, run_tags)
    get_run_logger().info("sweep summary in %s, MLflow run %s", outputs.metrics, run_id)
    return str(outputs.metrics)


# Serial unless run_sweep (or with_options) picks another runner: a bare call runs anywhere.
@flow(name="sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def sweep_flow(root: str = ".", runner: str = "serial") -> str:
    """Every point of the ``sweep`` grid as a task run, then one summary; returns the metrics path.

    ``runner`` only describes the task runner for the records; :func:`run_sweep`
    picks the runner itself. Points that finish are kept when others fail, so a
    rerun trains only what is missing.
    """
    logger = get_run_logger()
    params = load_params(ProjectPaths(Path(root)).params)
    points = sweep.sweep_points(params)
    sweep.check_inputs(Path(root), points)
    logger.info("sweep of %s on %s: %d points on %s", params.sweep.model, params.sweep_dataset(), len(points), runner)
    with tags(*gpu_tags()):
        futures = [sweep_point_task.submit(root, point) for point in points]
    # Wait for all before raising, so one failed point leaves the others finished and saved.
    wait(futures)
    outcomes, failed = [], []
    for point, future in zip(points, futures, strict=True):
        try:
            outcomes.append(future.result())
        except Exception as exc:  # noqa: BLE001 - reported below, with every other failure
            failed.append(f"{point.id} ({exc})")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(points)} sweep points failed: {'; '.join(failed)}")
    return sweep_summary_task(root, outcomes, runner)


def run_sweep(
    root: str = ".",
    *,
    runner: Literal["dask", "serial"] | None = None,
    address: str | None = None,
    workers: int | None = None,
    return_state: bool = False,
) -> Any:
    """The sweep flow on the task runner of ``sweep.runner`` / ``sweep.dask`` (overridden by the arguments).

    The grid and the inputs are checked first, so a mistake costs no cluster start.
    """
    params = load_params(ProjectPaths(Path(root)).params)
    cfg = with_overrides(params.sweep, runner=runner, address=address, workers=workers)
    # An address given here beats the environment's, which beats params.yaml's.
    environ = {k: v for k, v in os.environ.items() if k != DASK_ADDRESS_ENV} if address else os.environ
    sweep.check_inputs(Path(root), sweep.sweep_points(params))
    with prefect_api_for_workers(cfg, environ):
        return sweep_flow.with_options(task_runner=task_runner_for(cfg, environ))(
            root=root, runner=describe_runner(cfg, environ), return_state=return_state
        )


@task(name="dvc-exp-run", task_run_name="dvc-exp-run", cache_policy=NONE)
def dvc_exp_run_task(root: str, targets: list[str], set_params: list[str]) -> str:
    """``dvc exp run [targets] -S key=value ...`` in ``root``; returns the experiment's name.

    Tagged ``gpu`` by the flow: the tag concurrency limit that ``latentlab
    serve`` sets from schedule.gpu_concurrency keeps two trainings off one GPU.
    Retries come from the caller (``with_options``), with backoff.
    """
    import re
    import sys

    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *targets]
    for item in set_params:
        cmd += ["-S", item]
    logger.info("running %s in %s", " ".join(cmd[2:]), root)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = _run_logged(cmd, env=env, cwd=root, failure=f"dvc exp run in {root}")
    match = re.search(r"Ran experiment\(s\): (\S+)", proc.stdout + proc.stderr)
    name = match.group(1) if match else ""
    logger.info("DVC experiment %s", name or "(name not reported)")
    return name


@flow(name="latentlab-dvc-experiment", log_prints=True)
def dvc_experiment_flow(root: str = ".", targets: list[str] | None = None, set_params: list[str] | None = None) -> str:
    """The pipeline (or ``targets``) as a DVC experiment, so a scheduled run is versioned and comparable.

    What a deployment of ``latentlab serve`` runs; returns the experiment name
    (``dvc exp show`` lists it with its params and metrics).
    """
    schedule = load_params(ProjectPaths(Path(root)).params).schedule
    task_with_retries = dvc_exp_run_task.with_options(
        retries=schedule.retries, retry_delay_seconds=list(schedule.retry_delay_seconds)
    )
    with tags(*gpu_tags()):
        return task_with_retries(root, list(targets or []), list(set_params or []))
