"""The one module that talks to MLflow.

Runs live in a SQLite store (``mlruns/mlflow.db``) with artifacts under
``mlruns/artifacts``: MLflow 3.17 refuses the plain ``./mlruns`` file store.
Set ``MLFLOW_TRACKING_URI`` to log to a server instead.

Every stage execution is one run, opened with :func:`stage_run`. A run that
raises is ended with status FAILED (KILLED on Ctrl-C), never left RUNNING.
Metrics are sent with ``log_batch``: one ``log_metric`` call costs ~7 ms on
SQLite, more than a training step.

MLflow is driven from a thread of its own. Importing MLflow and opening its
SQLite store costs ~3 s per process, as much as a small stage's work, and every
DVC stage is a process of its own. So :func:`stage_run` returns at once; the
thread imports MLflow, opens the run and then applies the stage's logging
calls in order while the stage works. Leaving ``stage_run`` waits until every
call has been applied and the run has ended. Files handed to ``log_artifact``
are copied at call time (the stage may delete or replace them), models are
snapshotted, and calls that return something (model registration, child runs)
wait for their answer.

With ``LATENTLAB_TIMINGS`` set to a file, each stage run appends one JSON line
with its wall-clock span and the time it spent waiting on MLflow
(``bench/orchestration_overhead.py`` reads them).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow's own per-call limit for log_batch is 1000 metrics.
_BATCH = 1000


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = (Path(root) / "mlruns" / "mlflow.db").resolve()
    return f"sqlite:///{db}"


def artifact_root(root: Path) -> str:
    return (Path(root) / "mlruns" / "artifacts").resolve().as_uri()


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = obj


def metric_key(key: str) -> str:
    """MLflow allows only alphanumerics, ``_ - . : /`` and spaces in names; the rest becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def flatten(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, the form MLflow params and metrics take."""
    out: dict[str, Any] = {}
    _flatten("", obj, out)
    return out


class _MlflowRun:
    """The MLflow calls of one run, made with a client (in the tracking thread only)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.logged_models: list[tuple[str, str]] = []  # (name in the run, model URI)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters.
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metric_rows(self, rows: list[tuple[str, float, int, int]]) -> None:
        """(key, value, timestamp ms, step) rows, in batches of MLflow's per-call maximum."""
        from mlflow.entities import Metric

        items = [Metric(*row) for row in rows]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_torch_model(self, model: Any, name: str) -> None:
        import mlflow.pytorch
        import torch

        # The run is the fluent API's active run of this thread (see _TrackingThread).
        # Pinning the requirement skips MLflow's slow environment inference.
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        self.logged_models.append((name, info.model_uri))

    def register_logged_models(self, registered_name: str, metrics: Mapping[str, Any]) -> list[str]:
        import mlflow

        versions = []
        for name, uri in self.logged_models:
            k = name.removeprefix("model_k") if name.startswith("model_k") else None
            picked = {key: v for key, v in flatten(metrics).items() if k is None or key.startswith(f"k{k}.")}
            version = mlflow.register_model(uri, registered_name, await_registration_for=0)
            tags = {
                "latentlab.run_id": self.run_id,
                "latentlab.artifact": name,
                **{f"metric.{key}": v for key, v in picked.items()},
            }
            if k is not None:
                tags["latent_size"] = k
            for key, value in tags.items():
                self.client.set_model_version_tag(registered_name, version.version, key, str(value))
            self.client.set_registered_model_alias(
                registered_name, f"k{k}" if k is not None else "default", version.version
            )
            versions.append(version.version)
        return versions

    def log_child_run(
        self,
        name: str,
        params: Mapping[str, Any] | None,
        metric_rows: list[tuple[str, float, int, int]],
        tags: Mapping[str, Any] | None,
        artifacts: Path | None,
    ) -> str:
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        all_tags = {"mlflow.parentRunId": self.run_id, "mlflow.runName": name}
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        child = _MlflowRun(self.client, self.client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id)
        status = "FAILED"
        try:
            if params:
                child.log_params(params)
            if metric_rows:
                child.log_metric_rows(metric_rows)
            if artifacts is not None:
                child.log_artifact(artifacts, None)
            status = "FINISHED"
        finally:
            self.client.set_terminated(child.run_id, status)
        return child.run_id


class _TrackingThread:
    """The thread that owns one stage run's MLflow client and applies its calls in order.

    It starts with the slow part (importing MLflow, opening the store, creating
    the run), so the stage works meanwhile. ``close`` ends the run with the
    stage's status and waits. After an MLflow error the remaining calls are
    skipped and the error is raised by ``close`` (or by a call that waits).
    """

    def __init__(self, root: Path, experiment: str, run_name: str, tags: dict[str, str]) -> None:
        self._root, self._experiment, self._run_name, self._tags = root, experiment, run_name, tags
        self._calls: queue.SimpleQueue[tuple[Callable[[_MlflowRun], Any], Future] | None] = queue.SimpleQueue()
        self._status = "FAILED"
        self.error: BaseException | None = None
        self.run_id: str | None = None
        self._client: Any = None
        self.busy_seconds = 0.0  # time the thread spent in MLflow, import included
        self.wait_seconds = 0.0  # time the stage waited for the thread
        self._staging = Path(tempfile.mkdtemp(prefix="latentlab-mlflow-"))
        self._staged = 0
        self._thread = threading.Thread(target=self._main, name=f"mlflow {run_name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[_MlflowRun], Any]) -> Future:
        future: Future = Future()
        self._calls.put((call, future))
        return future

    def wait(self, future: Future) -> Any:
        start = time.perf_counter()
        try:
            return future.result()
        finally:
            self.wait_seconds += time.perf_counter() - start

    def stage(self, path: Path) -> Path:
        """A private copy of ``path`` (file or folder), so the stage may change the original at once."""
        self._staged += 1
        target = self._staging / str(self._staged) / path.name
        target.parent.mkdir(parents=True)
        if path.is_dir():
            shutil.copytree(path, target)
        elif path.exists():
            shutil.copy2(path, target)
        return target

    def close(self, status: str) -> None:
        self._status = status
        self._calls.put(None)
        start = time.perf_counter()
        self._thread.join()
        self.wait_seconds += time.perf_counter() - start
        shutil.rmtree(self._staging, ignore_errors=True)

    def _open(self) -> tuple[Any, _MlflowRun]:
        import mlflow
        from mlflow.tracking import MlflowClient

        # Keep MLflow's own INFO chatter (database migrations) out of stage logs.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        client = self._client = MlflowClient(tracking_uri=tracking_uri(self._root))
        experiment_id = _experiment_id(client, self._experiment, self._root)
        run = client.create_run(experiment_id, run_name=self._run_name, tags=self._tags)
        self.run_id = run.info.run_id
        # Also this thread's fluent active run, for the calls that exist only there (log_model).
        # set_tracking_uri also exports MLFLOW_TRACKING_URI, which tracking_uri() obeys: put the
        # variable back, or a later stage run of another project in this process would log here.
        exported = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(client.tracking_uri)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported
        mlflow.start_run(run_id=run.info.run_id)
        return mlflow, _MlflowRun(client, run.info.run_id)

    def _main(self) -> None:
        start = time.perf_counter()
        mlflow, target = None, None
        try:
            mlflow, target = self._open()
        except BaseException as exc:  # noqa: BLE001 - handed to the stage by close()
            self.error = exc
        self.busy_seconds += time.perf_counter() - start
        while (item := self._calls.get()) is not None:
            call, future = item
            if self.error is not None or target is None:
                future.set_exception(RuntimeError(f"MLflow run {self._run_name}: skipped after an earlier error"))
                continue
            start = time.perf_counter()
            try:
                future.set_result(call(target))
            except BaseException as exc:  # noqa: BLE001 - handed to the stage by close()
                self.error = exc
                future.set_exception(exc)
            self.busy_seconds += time.perf_counter() - start
        if mlflow is not None and target is not None:
            start = time.perf_counter()
            status = self._status if self.error is None else "FAILED"
            try:
                mlflow.end_run(status=status)
                log.info("MLflow run %s (%s) ended %s", target.run_id, self._run_name, status)
            except BaseException as exc:  # noqa: BLE001
                self.error = self.error or exc
            self.busy_seconds += time.perf_counter() - start
        elif self.run_id is not None:
            # Created but not opened as the active run: never leave it RUNNING.
            with contextlib.suppress(Exception):
                self._client.set_terminated(self.run_id, "FAILED")


def _metric_rows(metrics: Mapping[str, Any], step: int) -> list[tuple[str, float, int, int]]:
    now = int(time.time() * 1000)
    return [
        (metric_key(key), float(value), now, step)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value
    ]


class RunLogger:
    """What a stage may log into its open run.

    Calls return at once (the tracking thread applies them in order), except
    those that return something, which wait for it.
    """

    def __init__(self, thread: _TrackingThread) -> None:
        self._thread = thread

    @property
    def run_id(self) -> str:
        """The run's MLflow id (waits until the run exists)."""
        self._thread.wait(self._thread.submit(lambda run: run.run_id))
        assert self._thread.run_id is not None
        return self._thread.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        params = copy.deepcopy(dict(params))
        self._thread.submit(lambda run: run.log_params(params))

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log every finite number in ``metrics`` (nested keys joined by dots) in batches."""
        rows = _metric_rows(metrics, step)
        self._thread.submit(lambda run: run.log_metric_rows(rows))

    def log_series(self, key: str, values: list[float], start_step: int = 0) -> None:
        """Log one metric over steps (e.g. a per-step loss) in batches."""
        now = int(time.time() * 1000)
        rows = [(metric_key(key), float(v), now, start_step + i) for i, v in enumerate(values)]
        self._thread.submit(lambda run: run.log_metric_rows(rows))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        self._thread.submit(lambda run: run.set_tags(tags))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder (a copy taken now: the stage may change the original at once)."""
        staged = self._thread.stage(Path(path))
        self._thread.submit(lambda run: run.log_artifact(staged, artifact_path))

    def log_torch_model(self, model: Any, name: str) -> None:
        """Log a torch module as an MLflow model (loadable with ``mlflow.pytorch.load_model``).

        The module is snapshotted now, on the CPU, since the stage may go on training it.
        """
        snapshot = copy.deepcopy(model).to("cpu")
        self._thread.submit(lambda run: run.log_torch_model(snapshot, name))

    def register_logged_models(self, registered_name: str, metrics: Mapping[str, Any]) -> list[str]:
        """Register every model this run logged as a version of ``registered_name``, with its metrics.

        Each logged model is the best-validation checkpoint of one network (the
        engine restores the best weights). A name ``model_k{k}`` gives the
        version the tag ``latent_size`` and the alias ``k{k}``; a single other
        model gets the alias ``default`` (MLflow reserves ``latest``). The metrics whose key starts with
        ``k{k}.`` (or all, for a single model) become the version's tags, so
        the registry shows them. Returns the version numbers.
        """
        metrics = copy.deepcopy(dict(metrics))
        return self._thread.wait(self._thread.submit(lambda run: run.register_logged_models(registered_name, metrics)))

    def log_child_run(
        self,
        name: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        artifacts: Path | None = None,
    ) -> str:
        """A finished child run of this run (``mlflow.parentRunId``), e.g. one generation of a study.

        Returns the child's run id. The MLflow UI nests it under this run.
        """
        rows = _metric_rows(metrics or {}, 0)
        return self._thread.wait(
            self._thread.submit(lambda run: run.log_child_run(name, params, rows, tags, artifacts))
        )


def _experiment_id(client: Any, name: str, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(root))
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def _record_timing(stage: str, dataset: str | None, entered: float, thread: _TrackingThread, status: str) -> None:
    """One JSON line per stage run into ``$LATENTLAB_TIMINGS`` (for bench/orchestration_overhead.py)."""
    target = os.environ.get("LATENTLAB_TIMINGS")
    if not target:
        return
    record = {
        "stage": stage,
        "dataset": dataset,
        "pid": os.getpid(),
        "status": status,
        "entered": entered,  # epoch seconds
        "left": time.time(),
        "mlflow_wait_s": thread.wait_seconds,
        "mlflow_busy_s": thread.busy_seconds,
    }
    # One short append per record: lines from parallel processes do not interleave.
    with open(target, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@contextlib.contextmanager
def stage_run(
    stage: str,
    dataset: str | None,
    *,
    root: Path = Path("."),
    experiment: str = "latentlab",
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[RunLogger]:
    """Open one MLflow run for one stage execution and close it with the right status.

    Raises the MLflow error, if one happened, when the stage itself succeeded.
    """
    entered = time.time()
    Path(root, "mlruns").mkdir(parents=True, exist_ok=True)
    run_name = f"{stage}:{dataset}" if dataset else stage
    all_tags = {"latentlab.stage": stage, "mlflow.runName": run_name}
    if dataset:
        all_tags["latentlab.dataset"] = dataset
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    thread = _TrackingThread(Path(root), experiment, run_name, all_tags)
    logger = RunLogger(thread)
    status = "FAILED"
    try:
        if params:
            logger.log_params(params)
        yield logger
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:
        # The error is the run's most useful fact: keep it with the run.
        logger.set_tags({"latentlab.error": str(exc)[:5000]})
        raise
    finally:
        thread.close(status)
        _record_timing(stage, dataset, entered, thread, status)
        if thread.error is not None:
            if status == "FINISHED":
                raise thread.error
            log.warning("MLflow run %s: %s", run_name, thread.error)


def registered_name(dataset: str, model: str) -> str:
    """The MLflow registry name of ``model`` (a zoo key) trained on ``dataset``."""
    return f"latentlab-{dataset}-{model}"


def load_registered(root: Path, dataset: str, model: str, alias: str) -> Any:
    """Load a registered model back by name: an autoencoder (``encode``/``decode``), a VAE or a GAN pair
    (``sample``). ``alias`` is ``k{latent size}`` for per-size models, ``default`` for a GAN."""
    import mlflow.pytorch

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(root))
    return mlflow.pytorch.load_model(f"models:/{registered_name(dataset, model)}@{alias}", map_location="cpu")
