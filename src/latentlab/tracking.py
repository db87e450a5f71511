"""The one module that talks to MLflow.

Runs live in a SQLite store (``mlruns/mlflow.db``) with artifacts under
``mlruns/artifacts``: MLflow 3.17 refuses the plain ``./mlruns`` file store.
Set ``MLFLOW_TRACKING_URI`` to log to a server instead.

Every stage execution is one run, opened with :func:`stage_run`. A run that
raises is ended with status FAILED (KILLED on Ctrl-C), never left RUNNING.
Metrics are sent with ``log_batch``: one ``log_metric`` call costs ~7 ms on
SQLite, more than a training step, and a ``log_batch`` call costs about the
same plus ~0.1 ms per metric (1000 at most). So metrics wait in a buffer: a
logging call sends them all when 1000 are waiting or the oldest has waited
``_FLUSH_SECONDS``, and the end of the run sends the rest (failed runs
included). With three calls per epoch, the linear autoencoder on speech (842
short epochs) spent 19.5 s of its 33 s in MLflow; buffered, 5 s.

On the SQLite store the buffer is written by :func:`_sqlite_metric_writer`
instead: one INSERT of all its rows and one update of the run's latest values,
what ``log_batch`` stores, without the ORM object per metric that made
``log_batch`` ~80% of a training stage's MLflow time (~0.08 ms a metric, 0.4 s
for a short training's 4,900 per-step losses; the direct write takes 0.065 s).
Any other store (an MLflow server, PostgreSQL) gets ``log_batch``.

With ``LATENTLAB_TIMINGS`` set to a file, each stage run appends one JSON line
with its wall-clock span and the time spent in MLflow, import included
(``bench/orchestration_overhead.py`` reads them). MLflow is called from the
stage's own thread: importing it in a thread beside the stage's own imports
(torch) was measured slower than one after the other, since both hold the GIL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# Seconds this process has spent in MLflow (import, store, calls): the overhead the bench reports.
_mlflow_seconds = 0.0


def _timed(fn: F) -> F:
    """Count the time spent in ``fn`` as MLflow time (nested calls are counted once)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _mlflow_seconds
        start = time.perf_counter()
        before = _mlflow_seconds
        try:
            return fn(*args, **kwargs)
        finally:
            _mlflow_seconds = before + (time.perf_counter() - start)

    return wrapper  # type: ignore[return-value]


class _PickleNoticeFilter(logging.Filter):
    """Drops MLflow's notice that a PyTorch model is saved by pickle, which it prints for every model.

    latentlab chooses pickle on purpose (see :meth:`RunLogger.log_torch_model`).
    The notice came 60 times in a default ``dvc repro`` and hid the warnings
    that matter (a dataset download falling back, a GAN's mode collapse).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")


_PICKLE_NOTICE_FILTER = _PickleNoticeFilter()

# MLflow's own per-call limit for log_batch is 1000 metrics.
_BATCH = 1000

MetricWriter = Callable[[str, list[Any]], None]


def _log_batch_writer(client: Any) -> MetricWriter:
    def write(run_id: str, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])

    return write


def _sqlite_metric_writer(client: Any) -> MetricWriter | None:
    """A writer that stores metrics as ``log_batch`` does on a SQLite store, ~6x faster; None elsewhere.

    ``SqlAlchemyStore.log_batch`` builds one ORM object per metric and flushes them
    through the unit of work. This writes the same rows with one executemany INSERT
    (``OR IGNORE``: a metric already stored is skipped, as MLflow deduplicates) and
    updates ``latest_metrics`` by MLflow's rule, newest by (step, timestamp, value),
    in one transaction. It uses MLflow's store internals (session maker, table
    models): an MLflow without them gets ``log_batch`` (this returns None), and
    tests/unit/test_tracking.py checks both store the same history and latest
    values, so an upgrade that changes their meaning fails there.
    """
    try:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking.fluent import get_active_model_id
        from mlflow.utils.validation import _validate_metric_name
        from sqlalchemy import insert

        store = client._tracking_client.store
        if not isinstance(store, SqlAlchemyStore) or store.db_type != "sqlite":
            return None
        session_maker, get_run, check_active = store.ManagedSessionMaker, store._get_run, store._check_run_is_active
    except (ImportError, AttributeError):
        return None

    insert_metrics = insert(SqlMetric).prefix_with("OR IGNORE")
    checked_keys: set[str] = set()
    log_batch = _log_batch_writer(client)

    def write(run_id: str, metrics: list[Any]) -> None:
        if get_active_model_id() is not None:
            # Metrics then also belong to a logged model: MLflow's own path records that.
            log_batch(run_id, metrics)
            return
        # (key, timestamp, step, value, is_nan): the metrics table's identity within a run.
        rows: dict[tuple[str, int, int, float, bool], None] = {}
        for metric in metrics:
            if metric.key not in checked_keys:
                _validate_metric_name(metric.key)
                checked_keys.add(metric.key)
            is_nan, value = store.sanitize_metric_value(float(metric.value))
            rows[(metric.key, int(metric.timestamp), int(metric.step), value, is_nan)] = None
        newest: dict[str, tuple[str, int, int, float, bool]] = {}
        for row in rows:
            held = newest.get(row[0])
            if held is None or (row[2], row[1], row[3]) > (held[2], held[1], held[3]):
                newest[row[0]] = row
        with session_maker(read_only=False) as session:
            check_active(get_run(run_uuid=run_id, session=session))
            session.execute(
                insert_metrics,
                [
                    {"run_uuid": run_id, "key": k, "timestamp": t, "step": s, "value": v, "is_nan": n}
                    for k, t, s, v, n in rows
                ],
            )
            latest = {
                m.key: m
                for m in session.query(SqlLatestMetric).filter(
                    SqlLatestMetric.run_uuid == run_id, SqlLatestMetric.key.in_(list(newest))
                )
            }
            for key, (_, timestamp, step, value, is_nan) in newest.items():
                held_row = latest.get(key)
                if held_row is None:
                    session.add(
                        SqlLatestMetric(
                            run_uuid=run_id, key=key, timestamp=timestamp, step=step, value=value, is_nan=is_nan
                        )
                    )
                elif (step, timestamp, value) > (held_row.step, held_row.timestamp, held_row.value):
                    held_row.step, held_row.timestamp, held_row.value, held_row.is_nan = step, timestamp, value, is_nan
            session.commit()

    return write


# The longest a logged metric waits in the buffer before it is sent (seconds).
_FLUSH_SECONDS = 5.0


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


class RunLogger:
    """What a stage may log into its open run."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        *,
        experiment_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.run_id = run_id
        # Kept here: reading them back (get_run) loads every metric of the run, which takes
        # seconds once a training has logged thousands.
        self._experiment_id = experiment_id
        self._params: dict[str, str] = {}
        self._clock = clock  # seconds, for the buffer's flush interval
        self._logged_models: list[tuple[str, str]] = []  # (name in the run, logged model id)
        self._pending: list[Any] = []  # mlflow.entities.Metric, not sent yet
        self._oldest_pending: float | None = None  # self._clock() when the oldest was queued
        self._write_metrics: MetricWriter | None = None  # chosen at the first flush

    def _queue(self, metrics: list[Any]) -> None:
        if not metrics:
            return
        self._pending.extend(metrics)
        if self._oldest_pending is None:
            self._oldest_pending = self._clock()
        if len(self._pending) >= _BATCH or self._clock() - self._oldest_pending >= _FLUSH_SECONDS:
            self.flush()

    @_timed
    def flush(self) -> None:
        """Send every buffered metric now (stage_run calls it when the run ends)."""
        if not self._pending:
            return
        if self._write_metrics is None:
            self._write_metrics = _sqlite_metric_writer(self._client) or _log_batch_writer(self._client)
        pending, self._pending, self._oldest_pending = self._pending, [], None
        self._write_metrics(self.run_id, pending)

    @_timed
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters.
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        self._params.update((p.key, p.value) for p in items)
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    @_timed
    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log every finite number in ``metrics`` (nested keys joined by dots) in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue(
            [
                Metric(metric_key(key), float(value), now, step)
                for key, value in flatten(metrics).items()
                if isinstance(value, int | float) and not isinstance(value, bool) and value == value
            ]
        )

    @_timed
    def log_series(self, key: str, values: list[float], start_step: int = 0) -> None:
        """Log one metric over steps (e.g. a per-step loss) in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._queue([Metric(metric_key(key), float(v), now, start_step + i) for i, v in enumerate(values)])

    @_timed
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_timed
    def log_torch_model(self, model: Any, name: str) -> None:
        """Log a torch module as an MLflow logged model of this run (``mlflow.pytorch.load_model`` loads it).

        The model is created with this run as its source and recorded as the
        run's output here, rather than by ``log_model`` under an active run:
        that path also re-reads the whole history of every metric of the run
        (one query per metric name) to copy the step-0 values onto the model,
        about 0.3 s a model in a training stage. The metrics that belong to a
        model are linked to it in :meth:`register_logged_models`.

        It is saved by pickle, not as ``pt2`` (``torch.export``): pickle keeps
        the latentlab module itself, so the model loaded back has its
        ``encode``, ``decode`` or ``sample`` and the loss contract, where an
        exported program keeps one traced ``forward``. Unpickling runs code, so
        load models only from a store you trust; MLflow's notice saying so is
        not repeated for every model (:class:`_PickleNoticeFilter`).
        """
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.entities import LoggedModelOutput

        logging.getLogger("mlflow.pytorch").addFilter(_PICKLE_NOTICE_FILTER)  # adds it once

        logged = mlflow.initialize_logged_model(
            name=name, source_run_id=self.run_id, params=dict(self._params), experiment_id=self._experiment_id_()
        )
        # Pinning the requirement skips MLflow's slow environment inference.
        mlflow.pytorch.log_model(
            model,
            name=name,
            model_id=logged.model_id,
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        self._client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        self._logged_models.append((name, logged.model_id))

    @_timed
    def register_logged_models(self, registered_name: str, metrics: Mapping[str, Any]) -> list[str]:
        """Register every model this run logged as a version of ``registered_name``, with its metrics.

        Each logged model is the best-validation checkpoint of one network (the
        engine restores the best weights). A name ``model_k{k}`` gives the
        version the tag ``latent_size`` and the alias ``k{k}``; a single other
        model gets the alias ``default`` (MLflow reserves ``latest``). The metrics whose key starts with
        ``k{k}.`` (or all, for a single model) become the version's tags, so
        the registry shows them. Returns the version numbers.
        """
        import mlflow
        from mlflow.entities import Metric

        versions = []
        for name, model_id in self._logged_models:
            k = name.removeprefix("model_k") if name.startswith("model_k") else None
            picked = {key: v for key, v in flatten(metrics).items() if k is None or key.startswith(f"k{k}.")}
            now = int(time.time() * 1000)
            numeric = {
                key: float(v) for key, v in picked.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            # The model's own metrics, on the logged model's page (and in search_logged_models).
            self._client.log_batch(
                self.run_id,
                metrics=[Metric(metric_key(key), v, now, 0, model_id=model_id) for key, v in numeric.items()],
            )
            tags = {
                "latentlab.run_id": self.run_id,
                "latentlab.artifact": name,
                **{f"metric.{key}": v for key, v in picked.items()},
            }
            if k is not None:
                tags["latent_size"] = k
            # Tags with the version in one call: one SQLite transaction, not one per tag.
            version = mlflow.register_model(
                f"models:/{model_id}",
                registered_name,
                await_registration_for=0,
                tags={key: str(v) for key, v in tags.items()},
            )
            self._client.set_registered_model_alias(
                registered_name, f"k{k}" if k is not None else "default", version.version
            )
            versions.append(version.version)
        return versions

    @_timed
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
        experiment_id = self._experiment_id_()
        all_tags = {"mlflow.parentRunId": self.run_id, "mlflow.runName": name}
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        child = RunLogger(
            self._client,
            self._client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id,
            experiment_id=experiment_id,
        )
        status = "FAILED"
        try:
            if params:
                child.log_params(params)
            if metrics:
                child.log_metrics(metrics)
            if artifacts is not None:
                child.log_artifact(artifacts)
            status = "FINISHED"
        finally:
            try:
                child.flush()
            finally:
                self._client.set_terminated(child.run_id, status)
        return child.run_id

    def _experiment_id_(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._client.get_run(self.run_id).info.experiment_id
        return self._experiment_id

    @_timed
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path)


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


@_timed
def _open_run(root: Path, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[Any, str, str]:
    """Create the run; returns (client, run id, experiment id).

    No fluent "active run" is started: every call goes through the client with
    this run's id, so stages in one process (the Prefect flow) cannot log into
    each other's runs.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    Path(root, "mlruns").mkdir(parents=True, exist_ok=True)
    # Keep MLflow's own INFO chatter (database migrations) out of stage logs.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=tracking_uri(root))
    experiment_id = _experiment_id(client, experiment, root)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    # MLflow looks up (get_run) and caches a run's artifact store at its first artifact; a
    # get_run loads every metric of the run, 0.5 s once a training has logged thousands. Do
    # it now, while the run is empty.
    client.list_artifacts(run.info.run_id)
    # The fluent functions that have no client counterpart (logged models, the registry)
    # follow the fluent tracking URI. set_tracking_uri also exports MLFLOW_TRACKING_URI, which
    # tracking_uri() obeys: put the variable back, or a later stage run of another project in
    # this process would log here.
    exported = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(client.tracking_uri)
    if exported is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = exported
    return client, run.info.run_id, experiment_id


def _record_timing(stage: str, dataset: str | None, status: str, entered: float, mlflow_seconds: float) -> None:
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
        "mlflow_s": mlflow_seconds,  # in MLflow during this run, import and store opening included
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
    """Open one MLflow run for one stage execution and close it with the right status."""
    entered, spent_before = time.time(), _mlflow_seconds
    run_name = f"{stage}:{dataset}" if dataset else stage
    all_tags = {"latentlab.stage": stage, "mlflow.runName": run_name}
    if dataset:
        all_tags["latentlab.dataset"] = dataset
    all_tags.update({k: str(v) for k, v in (tags or {}).items()})
    client, run_id, experiment_id = _open_run(Path(root), experiment, run_name, all_tags)
    logger = RunLogger(client, run_id, experiment_id=experiment_id)
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
        with contextlib.suppress(Exception):
            logger.set_tags({"latentlab.error": str(exc)[:5000]})
        raise
    finally:
        try:
            logger.flush()  # the metrics of a failed run are kept too
        finally:
            _timed(client.set_terminated)(run_id, status)
        log.info("MLflow run %s (%s) ended %s", run_id, run_name, status)
        _record_timing(stage, dataset, status, entered, _mlflow_seconds - spent_before)


def registered_name(dataset: str, model: str) -> str:
    """The MLflow registry name of ``model`` (a zoo key) trained on ``dataset``."""
    return f"latentlab-{dataset}-{model}"


def load_registered(root: Path, dataset: str, model: str, alias: str) -> Any:
    """Load a registered model back by name: an autoencoder (``encode``/``decode``), a VAE or a GAN pair
    (``sample``). ``alias`` is ``k{latent size}`` for per-size models, ``default`` for a GAN."""
    import mlflow.pytorch

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(root))
    return mlflow.pytorch.load_model(f"models:/{registered_name(dataset, model)}@{alias}", map_location="cpu")
