"""A real Prefect server on 127.0.0.1 (temporary PREFECT_HOME), `latentlab serve`, a triggered
deployment run of a tiny configuration, and the DVC experiment it leaves behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import make_digit_images, tiny_params, write_idx, write_project

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Prefect server at {url} after {seconds} s")


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A committed tiny project (git + DVC); the tests below run DVC experiments in it."""
    tmp_path = tmp_path_factory.mktemp("deployment")
    x, y = make_digit_images(20, 3, seed=1)
    write_idx(tmp_path / "in" / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "in" / "train-labels-idx1-ubyte", y.astype("uint8"))
    root = write_project(
        tmp_path / "repo", tiny_params(tmp_path, {"digits": {"kind": "idx", "path": str(tmp_path / "in")}})
    )
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@latentlab")
    _git(root, "config", "user.name", "latentlab test")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "tiny project")
    return root


def test_served_deployment_runs_the_pipeline_as_a_dvc_experiment(project: Path, tmp_path: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from latentlab.deploy import PIPELINE_DEPLOYMENT

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect_home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=open(logs / "server.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the teardown stops its workers too
    )
    serving = None
    try:
        _wait_healthy(api, server)
        serving = subprocess.Popen(
            [str(BIN / "latentlab"), "serve", "--root", str(project)],
            env=env,
            stdout=open(logs / "serve.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        with temporary_settings(updates={PREFECT_API_URL: api}):
            name = f"latentlab-dvc-experiment/{PIPELINE_DEPLOYMENT}"
            deadline = time.monotonic() + 120
            with get_client(sync_client=True) as client:
                while True:
                    try:
                        deployment = client.read_deployment_by_name(name)
                        break
                    except Exception:
                        if time.monotonic() > deadline or serving.poll() is not None:
                            raise AssertionError((logs / "serve.log").read_text()[-3000:]) from None
                        time.sleep(1)
                # The weekly schedule is registered with the deployment.
                assert deployment.schedules and deployment.schedules[0].schedule.cron == "0 2 * * 0"
                limit = client.read_concurrency_limit_by_tag("gpu")
                assert limit.concurrency_limit == 1
            flow_run = run_deployment(name, timeout=900)
            assert flow_run.state.is_completed(), (flow_run.state, (logs / "serve.log").read_text()[-3000:])
            with get_client(sync_client=True) as client:
                task_runs = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                    limit=20,
                )
        assert [t.name for t in task_runs] == ["dvc-exp-run"]
        assert task_runs[0].state.is_completed() and "gpu" in task_runs[0].tags
    finally:
        import signal

        for proc in (serving, server):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    # The run left a DVC experiment with the pipeline's metrics, listed by `dvc exp show`.
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True, check=True
    )
    experiments = [
        exp for entry in json.loads(shown.stdout) for exp in (entry.get("experiments") or []) if exp.get("revs")
    ]
    assert experiments, shown.stdout[:2000]
    data = experiments[0]["revs"][0]["data"]
    assert any("metrics/digits/pca.json" in path for path in data["metrics"])


def _experiments(project: Path) -> list[dict]:
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project, capture_output=True, text=True, check=True
    )
    return [exp for entry in json.loads(shown.stdout) for exp in (entry.get("experiments") or []) if exp.get("revs")]


def test_a_dvc_exp_run_sweep_is_listed_by_exp_show_with_params_and_metrics(project: Path):
    """The README's sweep: one `dvc exp run -S` per value; `dvc exp show` compares them."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    before = {exp["revs"][0]["rev"] for exp in _experiments(project)}
    for sizes in ("[2,3]", "[2,5]"):
        run = subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "run", "-S", f"train.zoo.pca.latent_sizes={sizes}"],
            cwd=project, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    new = [exp["revs"][0] for exp in _experiments(project) if exp["revs"][0]["rev"] not in before]
    assert len(new) == 2, new
    by_sizes = {}
    for rev in new:
        params = rev["data"]["params"]["params.yaml"]["data"]
        metrics = rev["data"]["metrics"]["metrics/digits/pca.json"]["data"]
        by_sizes[tuple(params["train"]["zoo"]["pca"]["latent_sizes"])] = metrics
    assert set(by_sizes) == {(2, 3), (2, 5)}
    # Each experiment's metrics are its own: the reconstruction error at its largest latent size.
    assert set(by_sizes[(2, 3)]["reconstruction"]) == {"2", "3"}
    assert set(by_sizes[(2, 5)]["reconstruction"]) == {"2", "5"}
    assert by_sizes[(2, 5)]["reconstruction"]["5"]["mse"] < by_sizes[(2, 3)]["reconstruction"]["3"]["mse"]
