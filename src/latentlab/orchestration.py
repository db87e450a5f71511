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
# deterministic, so a retry would fail the same way. Tasks that train networks
# carry the tag "gpu": `latentlab serve` puts a concurrency limit on it so that
# two trainings never share one GPU.
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


@task(name="train", task_run_name="train-{model}-{dataset}", cache_policy=NONE, tags=["gpu"])
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


@task(name="anomaly", task_run_name="anomaly-{dataset}", cache_policy=NONE, tags=["gpu"])
def anomaly_task(dataset: str, root: str) -> str:
    out = stages.anomaly(dataset, Path(root))
    get_run_logger().info("anomaly detection on %s: %s", dataset, out)
    return str(out)


@task(name="sparsity", task_run_name="sparsity-{dataset}", cache_policy=NONE, tags=["gpu"])
def sparsity_task(dataset: str, root: str) -> str:
    out = stages.sparsity(dataset, Path(root))
    get_run_logger().info("sparsity sweep on %s: %s", dataset, out)
    return str(out)


@task(name="classifier", task_run_name="classifier-{dataset}", cache_policy=NONE, tags=["gpu"])
def classifier_task(dataset: str, root: str) -> str:
    out = stages.classifier(dataset, Path(root))
    get_run_logger().info("domain classifier of %s: %s", dataset, out)
    return str(out)


@task(name="generate", task_run_name="generate-{model}-{dataset}", cache_policy=NONE, tags=["gpu"])
def generate_task(dataset: str, model: str, root: str) -> str:
    out = stages.generate(dataset, model, Path(root))
    get_run_logger().info("generative model %s on %s: %s", model, dataset, out)
    return str(out)


@task(name="collapse-loop", task_run_name="collapse-{dataset}-{loop}-seed{seed}", cache_policy=NONE, tags=["gpu"])
def collapse_loop_task(dataset: str, loop: str, seed: int, root: str) -> str:
    """One (loop type, seed) pair of the collapse study, in a process of its own.

    A process, not the task's thread: torch's global RNG (weight initialisation,
    VAE noise) is shared by threads, so pairs in threads would not be
    reproducible, and one thread per process keeps parallel pairs from slowing
    each other down.
    """
    import subprocess
    import sys

    logger = get_run_logger()
    cmd = [sys.executable, "-m", "latentlab", "collapse-runs", dataset, "--loop", loop, "--seed", str(seed)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + ["--root", root], env=env, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            logger.info(line)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"collapse loop {loop} (seed {seed}) on {dataset} failed: {tail[0]}")
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
        if dataset in params.generate.datasets:
            classifier_task(dataset, root)
            for model in params.generate.models:
                generate_task(dataset, model, root)
        if dataset in params.collapse.datasets:
            collapse_flow(root, dataset)
    return report_task(root)


@flow(name="collapse", log_prints=True)
def collapse_flow(root: str = ".", dataset: str | None = None) -> str:
    """The model-collapse study of ``dataset`` (default: the first of collapse.datasets).

    Generations of one loop run in sequence inside one task; the (loop type,
    seed) pairs run in parallel as task runs. Each finished generation is saved
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
    if not (ProjectPaths(Path(root)).classifier(dataset) / "classifier.pt").exists():
        classifier_task(dataset, root)
    pairs = [(loop, seed) for loop in params.collapse.loops for seed in params.collapse.seeds]
    futures = [collapse_loop_task.submit(dataset, loop, seed, root) for loop, seed in pairs]
    for future in futures:
        future.result()
    return collapse_task(dataset, root)


@task(name="dvc-exp-run", task_run_name="dvc-exp-run", cache_policy=NONE, tags=["gpu"])
def dvc_exp_run_task(root: str, targets: list[str], set_params: list[str]) -> str:
    """``dvc exp run [targets] -S key=value ...`` in ``root``; returns the experiment's name.

    Tagged ``gpu``: a tag concurrency limit (``latentlab serve`` sets it from
    schedule.gpu_concurrency) keeps two trainings off one GPU. Retries come
    from the caller (``with_options``), with backoff.
    """
    import re
    import subprocess
    import sys

    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "exp", "run", *targets]
    for item in set_params:
        cmd += ["-S", item]
    logger.info("running %s in %s", " ".join(cmd[2:]), root)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            logger.info(line)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"dvc exp run failed in {root}: {tail[0]}")
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
    return task_with_retries(root, list(targets or []), list(set_params or []))
