"""The Prefect ``sweep`` flow on a 2-worker local Dask cluster, under prefect_test_harness: its
points run as task runs in two worker processes, and their results equal a serial run's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_digit_images, tiny_params, write_idx, write_project

pytestmark = pytest.mark.integration

POINTS = {"k2-none-seed0", "k2-gaussian_sigma0.3-seed0", "k4-none-seed0", "k4-gaussian_sigma0.3-seed0"}


def _child_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab").experiment_id
    parents = client.search_runs([experiment], "tags.`latentlab.stage` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")


def test_sweep_on_two_dask_workers_equals_a_serial_run(tmp_path: Path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.testing.utilities import prefect_test_harness

    from latentlab import stages
    from latentlab.orchestration import run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LATENTLAB_DASK_ADDRESS", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    x, y = make_digit_images(30, 3, seed=3)
    write_idx(tmp_path / "in" / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "in" / "train-labels-idx1-ubyte", y.astype("uint8"))
    params = tiny_params(tmp_path, {"digits": {"kind": "idx", "path": str(tmp_path / "in")}})
    params["train"]["zoo"]["deep"]["hidden"] = [32]
    params["sweep"] = {
        "dataset": "digits",
        "model": "deep",
        "grid": {"latent_size": [2, 4], "noise": ["none", "gaussian_sigma0.3"], "seed": [0]},
        "training": {"epochs": 3, "batch_size": 16, "lr": 0.01, "patience": 3},
        "max_test_samples": None,
        "runner": "serial",  # the Dask run below asks for Dask itself, as `latentlab sweep --runner dask` does
        "dask": {"address": None, "n_workers": 2},
    }
    dask_root = write_project(tmp_path / "dask", params)
    stages.ingest("digits", dask_root)
    stages.corrupt("digits", dask_root)
    serial_root = shutil.copytree(dask_root, tmp_path / "serial")

    with prefect_test_harness(server_startup_timeout=120):
        state = run_sweep(str(dask_root), runner="dask", workers=2, return_state=True)
        assert state.is_completed(), state
        assert Path(state.result()) == dask_root / "reports" / "sweep" / "digits-deep" / "results.json"
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )
        serial_state = run_sweep(str(serial_root), return_state=True)
        assert serial_state.is_completed(), serial_state

    points = [t for t in task_runs if t.name != "sweep-summary"]
    assert {t.name for t in points} == {f"sweep-{p}" for p in POINTS}
    assert len(points) == 4 and all(t.state.is_completed() for t in task_runs)
    assert {t.name for t in task_runs} - {t.name for t in points} == {"sweep-summary"}

    # The Dask run trained in two worker processes, none of them this one; the serial run in this one.
    dask_children = _child_runs(dask_root)
    pids = {c.data.tags["latentlab.ran_on.pid"] for c in dask_children}
    workers = {c.data.tags["latentlab.ran_on.worker"] for c in dask_children}
    assert len(dask_children) == 4 and len(pids) == 2 and len(workers) == 2
    assert str(os.getpid()) not in pids and all(w.startswith("tcp://") for w in workers)
    serial_children = _child_runs(serial_root)
    assert {c.data.tags["latentlab.ran_on.pid"] for c in serial_children} == {str(os.getpid())}
    assert {c.data.tags["latentlab.ran_on.worker"] for c in serial_children} == {"none"}

    # Every point's result is exactly the serial one: one thread and a fixed seed per point.
    dask_summary = json.loads((dask_root / "reports/sweep/digits-deep/results.json").read_text())
    serial_summary = json.loads((serial_root / "reports/sweep/digits-deep/results.json").read_text())
    assert {r["id"] for r in dask_summary["rows"]} == POINTS
    for dask_row, serial_row in zip(dask_summary["rows"], serial_summary["rows"], strict=True):
        dask_row.pop("train_seconds"), serial_row.pop("train_seconds")
        assert dask_row == serial_row
    assert dask_summary["best"] == serial_summary["best"]
    for point in POINTS:
        results = [
            json.loads((root / "checkpoints/digits/sweep/deep" / point / "result.json").read_text())
            for root in (dask_root, serial_root)
        ]
        for result in results:
            result.pop("train_seconds")
        assert results[0] == results[1]
        assert results[0]["test_mse"] > 0
