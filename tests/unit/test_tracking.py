import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from latentlab.tracking import stage_run, tracking_uri


def test_failed_stage_is_marked_failed_with_its_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with stage_run("train", "toy", root=tmp_path, params={"a": {"b": 1}}) as run:
        run.log_metrics({"loss": {"total": 0.5, "kl": 0.1}, "flag": True, "nan": float("nan"), "blur sigma=1 (x)": 2.0})
        run.log_series("loss.step", [3.0, 2.0, 1.0])
    with pytest.raises(ValueError), stage_run("train", "toy", root=tmp_path) as run:
        raise ValueError("diverged at step 3")
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("latentlab").experiment_id], order_by=["start_time ASC"])
    ok, failed = runs
    assert ok.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert failed.data.tags["latentlab.error"] == "diverged at step 3"
    assert ok.data.params == {"a.b": "1"}
    assert ok.data.metrics == {"loss.total": 0.5, "loss.kl": 0.1, "loss.step": 1.0, "blur sigma_1 _x_": 2.0}
    history = client.get_metric_history(ok.info.run_id, "loss.step")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert ok.info.artifact_uri.startswith((tmp_path / "mlruns").resolve().as_uri())


def test_logging_calls_are_applied_in_order_from_copies_taken_at_call_time(tmp_path, monkeypatch):
    """What is logged is what the stage had at call time, even if it then deletes or changes it."""
    import json

    import torch

    timings = tmp_path / "timings.jsonl"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LATENTLAB_TIMINGS", str(timings))
    figure = tmp_path / "grid.txt"
    folder = tmp_path / "figures"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    with stage_run("train", "toy", root=tmp_path) as run:
        figure.write_text("epoch 1")
        run.log_artifact(figure, "grids")
        figure.unlink()  # e.g. a temporary folder cleaned up right after logging
        run.log_artifact(folder, "figures")
        (folder / "a.txt").write_text("changed")
        run.log_torch_model(model, "model_k2")
        with torch.no_grad():
            model.weight.fill_(5.0)  # training goes on after logging
        for step in range(3):
            run.log_metrics({"loss": 3.0 - step}, step=step)
        run_id = run.run_id
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    local = client.download_artifacts(run_id, "", str(tmp_path / "down"))
    assert (tmp_path / "down" / "grids" / "grid.txt").read_text() == "epoch 1", local
    assert (tmp_path / "down" / "figures" / "a.txt").read_text() == "first"
    import mlflow.pytorch

    logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model_k2")
    assert float(logged.weight.detach().sum()) == 2.0
    record = json.loads(timings.read_text().splitlines()[-1])
    assert record["stage"] == "train" and record["status"] == "FINISHED"
    assert record["left"] >= record["entered"] and 0 < record["mlflow_s"] <= record["left"] - record["entered"]


def test_logging_a_model_drops_only_mlflows_pickle_notice(tmp_path, monkeypatch):
    """Pickle is chosen on purpose: MLflow's notice about it, printed per model, is dropped; other warnings pass."""
    import logging

    import torch

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger, handler = logging.getLogger("mlflow.pytorch"), Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with stage_run("train", "toy", root=tmp_path) as run:
            run.log_torch_model(torch.nn.Linear(2, 1), "model_k2")
            run.log_torch_model(torch.nn.Linear(2, 1), "model_k4")
        logger.warning("a warning that matters")
    finally:
        logger.removeHandler(handler)
    assert seen == ["a warning that matters"]


def test_runs_of_two_projects_in_one_process_go_to_their_own_stores(tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        with stage_run("ingest", root.name, root=root) as run:
            run.log_metrics({"n": 1})
    assert "MLFLOW_TRACKING_URI" not in os.environ
    for root in (first, second):
        client = MlflowClient(tracking_uri=tracking_uri(root))
        runs = client.search_runs([client.get_experiment_by_name("latentlab").experiment_id])
        assert [r.data.tags["latentlab.dataset"] for r in runs] == [root.name]


class _CountingClient:
    """Stands in for MlflowClient: records what each log_batch call carried."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, float, int]]] = []

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.batches.append([(m.key, m.value, m.step) for m in metrics])


def test_metrics_wait_in_a_buffer_until_a_full_batch_or_the_flush_interval():
    from latentlab import tracking

    clock = [100.0]
    client = _CountingClient()
    run = tracking.RunLogger(client, "run", clock=lambda: clock[0])
    for epoch in range(3):  # three short epochs inside the interval: nothing sent yet
        run.log_series("step.loss", [1.0, 0.5], start_step=2 * epoch)
        run.log_metrics({"val": {"loss": 0.1 * epoch}}, step=epoch)
    assert client.batches == []
    clock[0] += tracking._FLUSH_SECONDS  # the oldest waiting metric is now due
    run.log_metrics({"val": {"loss": 0.3}}, step=3)
    assert len(client.batches) == 1 and len(client.batches[0]) == 10
    assert client.batches[0][:3] == [("step.loss", 1.0, 0), ("step.loss", 0.5, 1), ("val.loss", 0.0, 0)]
    # A full batch waiting sends everything at once, in calls of at most _BATCH metrics.
    run.log_series("step.loss", [0.0] * (tracking._BATCH + 5), start_step=6)
    assert [len(b) for b in client.batches] == [10, tracking._BATCH, 5]
    run.log_metrics({"val": {"loss": 0.2}}, step=4)
    assert len(client.batches) == 3
    run.flush()
    assert client.batches[-1] == [("val.loss", 0.2, 4)]
    run.flush()  # nothing left: no empty call
    assert len(client.batches) == 4


def test_buffered_metrics_of_a_failed_run_reach_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(RuntimeError), stage_run("train", "toy", root=tmp_path) as run:
        run.log_series("step.loss", [3.0, 2.0])
        run_id = run.run_id
        raise RuntimeError("diverged")
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run_id, "step.loss")] == [3.0, 2.0]


def _stored(client, run_id: str, keys: list[str]) -> tuple[list[tuple], dict[str, float]]:
    history = sorted(
        (m.key, m.step, m.timestamp, m.value if m.value == m.value else "nan")
        for key in keys
        for m in client.get_metric_history(run_id, key)
    )
    latest = {k: (v if v == v else "nan") for k, v in client.get_run(run_id).data.metrics.items()}
    return history, latest


def test_the_sqlite_metric_writer_stores_what_log_batch_stores(tmp_path):
    """The direct SQLite write (tracking._sqlite_metric_writer) against MLflow's own log_batch,
    batch by batch into two runs of one store: same history, same latest values."""
    from mlflow.entities import Metric

    from latentlab import tracking

    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    experiment = client.create_experiment("x", artifact_location=str(tmp_path / "artifacts"))
    fast = tracking._sqlite_metric_writer(client)
    assert fast is not None
    batches = [
        # steps out of order, NaN and infinities, an exact duplicate (stored once), two values at one step
        [
            Metric("loss", 3.0, 1000, 0),
            Metric("loss", 1.0, 1000, 2),
            Metric("loss", 2.0, 1000, 1),
            Metric("kl", float("nan"), 1000, 0),
            Metric("kl", float("inf"), 1000, 1),
            Metric("kl", -float("inf"), 1000, 2),
            Metric("loss", 1.0, 1000, 2),
            Metric("acc", 0.5, 1000, 3),
            Metric("acc", 0.7, 1000, 3),
        ],
        # a later batch: an older step must not become the latest value; a newer one must; a repeat is skipped
        [
            Metric("loss", 9.0, 2000, 1),
            Metric("acc", 0.9, 900, 4),
            Metric("kl", 0.25, 3000, 2),
            Metric("loss", 3.0, 1000, 0),
            Metric("new", 4.0, 2000, 0),
        ],
    ]
    runs = {name: client.create_run(experiment).info.run_id for name in ("mlflow", "direct")}
    for batch in batches:
        client.log_batch(runs["mlflow"], metrics=batch)
        fast(runs["direct"], batch)
    keys = ["loss", "kl", "acc", "new"]
    expected = _stored(client, runs["mlflow"], keys)
    assert _stored(client, runs["direct"], keys) == expected
    assert len(expected[0]) == 12 and expected[1]["loss"] == 1.0 and expected[1]["acc"] == 0.9
    # A deleted run takes no more metrics, as with log_batch.
    for name, write in (("mlflow", lambda r, m: client.log_batch(r, metrics=m)), ("direct", fast)):
        client.delete_run(runs[name])
        with pytest.raises(MlflowException, match="must be in the 'active' state"):
            write(runs[name], [Metric("loss", 0.0, 5000, 9)])


def test_a_stage_run_on_sqlite_writes_its_metrics_directly(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sent_by_log_batch = []
    monkeypatch.setattr(
        MlflowClient, "log_batch", lambda self, run_id, metrics=(), **kw: sent_by_log_batch.extend(metrics)
    )
    with stage_run("train", "toy", root=tmp_path) as run:
        run.log_series("loss.step", [float(i) for i in range(2500)])
    assert sent_by_log_batch == []  # params, tags and metrics: none went through log_batch
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=tracking_uri(tmp_path))
    (stored,) = client.search_runs([client.get_experiment_by_name("latentlab").experiment_id])
    history = client.get_metric_history(stored.info.run_id, "loss.step")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [float(i) for i in range(2500)]
    assert stored.data.metrics == {"loss.step": 2499.0}
