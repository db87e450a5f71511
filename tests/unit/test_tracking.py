import pytest
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
