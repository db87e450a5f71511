"""The Prefect ``collapse`` flow end to end on a tiny configuration, under prefect_test_harness:
loop types run as parallel task runs, then one summary with an MLflow parent run
and one child run per generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_digit_images, tiny_params, write_idx, write_project

pytestmark = pytest.mark.integration


def _tiny_generative(params: dict, dataset: str) -> dict:
    params["generate"]["datasets"] = [dataset]
    params["generate"]["models"] = []
    params["generate"]["zoo"] = {
        "vae_mlp": {
            "family": "vae_mlp",
            "latent_sizes": [2],
            "hidden": [16],
            "training": {"epochs": 1, "batch_size": 16},
        }
    }
    quality = params["generate"]["quality"]
    quality.update(samples=20, nll_images=10, nll_importance_samples=4, monitor_samples=10, psi=[0.5, 1.0])
    quality["classifier"].update(epochs=1, max_train_samples=None)
    params["collapse"].update(
        datasets=[dataset],
        model="vae_mlp",
        latent_size=2,
        loops=["replace", "accumulate"],
        generations=2,
        seeds=[0],
        samples_per_generation=30,
        real_size=30,
        synthetic_fraction=0.5,
        eval_samples=20,
        healing_generations=0,
    )
    return params


def test_collapse_flow_runs_loops_as_tasks_and_logs_a_child_run_per_generation(tmp_path: Path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.testing.utilities import prefect_test_harness

    from latentlab import stages
    from latentlab.orchestration import collapse_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    x, y = make_digit_images(30, 3, seed=3)
    write_idx(tmp_path / "in" / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "in" / "train-labels-idx1-ubyte", y.astype("uint8"))
    params = _tiny_generative(
        tiny_params(tmp_path, {"digits": {"kind": "idx", "path": str(tmp_path / "in")}}), "digits"
    )
    root = write_project(tmp_path / "repo", params)
    stages.ingest("digits", root)

    with prefect_test_harness(server_startup_timeout=120):
        state = collapse_flow(root=str(root), dataset="digits", return_state=True)
        assert state.is_completed(), state
        flow_run_id = state.state_details.flow_run_id
        with get_client(sync_client=True) as client:
            # The loop tasks are task runs of this flow; the classifier is trained first (it was missing).
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )
    names = {t.name for t in task_runs}
    assert names == {
        "classifier-digits",
        "collapse-digits-replace-seed0",
        "collapse-digits-accumulate-seed0",
        "collapse-digits",
    }
    assert all(t.state.is_completed() for t in task_runs)

    metrics = json.loads((root / "metrics" / "collapse" / "digits.json").read_text())
    generations = {(r["loop"], r["generation"]) for r in metrics["results"]}
    assert generations == {(loop, g) for loop in ("replace", "accumulate") for g in (0, 1, 2)}

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab").experiment_id
    parents = client.search_runs([experiment], "tags.`latentlab.stage` = 'collapse'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 6
    assert {(c.data.params["loop"], c.data.params["generation"]) for c in children} == {
        (loop, str(g)) for loop in ("replace", "accumulate") for g in (0, 1, 2)
    }
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"precision", "recall", "coverage", "frechet_distance"} <= set(child.data.metrics)
