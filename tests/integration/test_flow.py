"""The Prefect flow over the same stage functions, under prefect_test_harness."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_digit_images, tiny_params, write_idx, write_project

pytestmark = pytest.mark.integration


def test_pipeline_flow_runs_every_stage_as_a_task(tmp_path: Path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort, TaskRunSort
    from prefect.logging.handlers import APILogWorker
    from prefect.testing.utilities import prefect_test_harness

    from latentlab.orchestration import pipeline_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    x, y = make_digit_images(20, 3, seed=3)
    write_idx(tmp_path / "in" / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "in" / "train-labels-idx1-ubyte", y.astype("uint8"))
    params = tiny_params(tmp_path, {"digits": {"kind": "idx", "path": str(tmp_path / "in")}})
    root = write_project(tmp_path / "repo", params)

    with prefect_test_harness(server_startup_timeout=120):
        state = pipeline_flow(root=str(root), return_state=True)
        assert state.is_completed(), state
        assert Path(state.result()) == root / "reports" / "index.html"
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )
            ingest_run = next((t for t in task_runs if t.name == "ingest-digits"), None)
            # Prefect ships logs from a background worker, so they can reach the server after
            # the flow returns: drain the worker, then poll the server briefly.
            APILogWorker.drain_all(timeout=10, at_exit=False)
            deadline = time.monotonic() + 15
            while True:
                logs = client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                    sort=LogSort.TIMESTAMP_ASC,
                    limit=200,
                    offset=0,
                )
                ingest_logs = [log.message for log in logs if ingest_run and log.task_run_id == ingest_run.id]
                if any("ingested digits" in m for m in ingest_logs) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    names = {t.name for t in task_runs}
    assert names == {
        "ingest-digits",
        "validate-digits",
        "corrupt-digits",
        "train-pca-digits",
        "evaluate-pca-digits",
        "compare-digits",
        "report",
    }
    assert all(t.state.is_completed() for t in task_runs)
    # No concurrency limit on "gpu" in this server: training runs untagged (deploy.gpu_tags says why).
    assert not any("gpu" in t.tags for t in task_runs)
    # Stage logs reach the task runs, including the library's own loggers.
    assert any("ingested digits" in message for message in ingest_logs)

    # The source had no test split: ingest carved one out (train 0.7 / val 0.1 / test 0.2).
    manifest = yaml.safe_load((root / "data/processed/digits/manifest.json").read_text())
    assert manifest["counts"] == {"train": 42, "val": 6, "test": 12}
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("latentlab").experiment_id])
    assert len(runs) == 7 and {r.info.status for r in runs} == {"FINISHED"}


def test_gpu_tag_is_used_only_when_the_server_limits_it(monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from latentlab.deploy import ensure_gpu_limit, gpu_tags

    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        assert gpu_tags() == ()
        ensure_gpu_limit(1)
        assert gpu_tags() == ("gpu",)
