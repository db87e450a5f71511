"""The warm stage server: which commands it takes, what names a server, and a real
server running real commands (results, errors, signals, a killed command, stop)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from latentlab import warm, warm_server
from tests.conftest import make_digit_images, tiny_params, write_idx

BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------------------
# Pure functions


def test_only_stage_commands_go_warm_and_the_switches_turn_it_off():
    on = {"LATENTLAB_WARM": "1"}
    assert warm.enabled(["train", "mnist", "--model", "conv"], on)
    assert warm.enabled(["report"], {}) or warm._nvidia_gpu_present()  # on by default (without a GPU)
    assert not warm.enabled(["flow"], on)  # long-lived commands start cold
    assert not warm.enabled(["warm", "status"], on)
    assert not warm.enabled([], on)
    assert not warm.enabled(["train", "--help"], on)
    assert not warm.enabled(["train", "mnist"], {"LATENTLAB_WARM": "0"})
    assert not warm.enabled(["train", "mnist"], {"LATENTLAB_WARM": "1", "RANK": "0"})  # under torchrun


def test_off_by_default_where_an_nvidia_gpu_is_present(monkeypatch):
    monkeypatch.setattr(warm, "_nvidia_gpu_present", lambda: True)
    assert not warm.enabled(["train", "mnist"], {})
    assert warm.enabled(["train", "mnist"], {"LATENTLAB_WARM": "1"})  # unless asked for
    monkeypatch.setattr(warm, "_nvidia_gpu_present", lambda: False)
    assert warm.enabled(["train", "mnist"], {})


def test_fingerprint_follows_the_source_and_import_time_environment(tmp_path, monkeypatch):
    package = tmp_path / "latentlab"
    package.mkdir()
    module = package / "stages.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(warm, "_package_dir", lambda: package)
    base = {"HOME": "/home/a", "OMP_NUM_THREADS": "1", "DVC_STAGE": "train@mnist-pca"}
    key = warm.fingerprint(base)
    assert warm.fingerprint(dict(base)) == key
    # A variable that no library reads at import does not matter: the worker gets it anyway.
    assert warm.fingerprint({**base, "DVC_STAGE": "report", "LATENTLAB_TIMINGS": "t.jsonl"}) == key
    # Thread pools and CUDA are set up at import: another value needs another server.
    assert warm.fingerprint({**base, "OMP_NUM_THREADS": "2"}) != key
    assert warm.fingerprint({**base, "CUDA_VISIBLE_DEVICES": "1"}) != key
    # An edited source file names a new server: no stale code runs.
    module.write_text("x = 22\n")
    assert warm.fingerprint(base) != key


def test_preload_list_comes_from_the_imports_in_the_source(tmp_path):
    package = tmp_path / "latentlab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stages.py").write_text(
        "import json\nfrom latentlab import paths\n\n"
        "def train():\n    import torch.nn.functional\n    from sklearn.metrics import roc_auc_score\n"
    )
    (package / "orchestration.py").write_text("import prefect\nimport never_preloaded_either\n")
    core, rest = warm_server.modules_to_preload(package)
    # The core: latentlab's modules (with what they import at the top) and MLflow's store.
    assert {"latentlab", "latentlab.stages", "mlflow.store.tracking.sqlalchemy_store"} <= set(core)
    # The rest: what the code imports anywhere, function bodies included.
    assert {"json", "torch.nn.functional", "sklearn.metrics"} <= set(rest)
    # Prefect starts threads; the flows' module is not a stage's.
    assert not {"prefect", "never_preloaded_either", "latentlab.orchestration"} & set(core + rest)
    # Imports that libraries make inside their own functions (a logged model, an optimizer step).
    assert {"mlflow.pyfunc", "torch._dynamo"} <= set(rest)


def test_a_worker_starts_with_the_servers_objects_frozen_and_collections_on(tmp_path, monkeypatch):
    """The server's objects sit in the collector's permanent generation, so a worker's
    collections leave the pages it shares with the server alone; the worker collects its own."""
    import gc

    seen_read, seen_write = os.pipe()

    def report_and_exit(request, fds, conn):
        os.write(seen_write, json.dumps([gc.isenabled(), gc.get_freeze_count()]).encode())
        os._exit(0)

    monkeypatch.setattr(warm_server, "_work", report_and_exit)
    server_end, _command_end = socket.socketpair()
    with open(tmp_path / "lock", "a+") as lock, socket.socket(socket.AF_UNIX) as listener:
        server = warm_server._Server(listener, lock, start_environ={})
        gc.disable()  # as serve() runs
        try:
            server._start(server_end, {"env": {}, "argv": ["report"], "cwd": str(tmp_path)}, [])
        finally:
            gc.enable()
            gc.unfreeze()
        enabled, frozen = json.loads(os.read(seen_read, 100))
        os.waitpid(server.jobs[0].pid, 0)
    assert enabled and frozen > 10_000  # this test process's objects, all of them


# ----------------------------------------------------------------------------------------------
# A real server


def _digits_project(root: Path) -> Path:
    data = root / "inputs"
    x, y = make_digit_images(10, 3, seed=1)
    xt, yt = make_digit_images(3, 3, seed=2)
    write_idx(data / "train-images-idx3-ubyte", x)
    write_idx(data / "train-labels-idx1-ubyte", y.astype("uint8"))
    write_idx(data / "t10k-images-idx3-ubyte", xt)
    write_idx(data / "t10k-labels-idx1-ubyte", yt.astype("uint8"))
    params = tiny_params(data, {"digits": {"kind": "idx", "path": str(data)}})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "latentlab"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _latentlab(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the command; also return its pid (the client's when it went warm)."""
    proc = _start(args, env, cwd)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def warm_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A warm server of this module's own (own folder), started the way a user's first command starts it."""
    folder = tmp_path_factory.mktemp("warm")
    env = {**os.environ, "LATENTLAB_WARM": "1", "LATENTLAB_WARM_DIR": str(folder / "servers")}
    env.pop("MLFLOW_TRACKING_URI", None)
    first = _digits_project(folder / "first")
    timings = folder / "first.jsonl"
    result, pid = _latentlab(
        ["ingest", "digits", "--root", str(first)], {**env, "LATENTLAB_TIMINGS": str(timings)}, first
    )
    assert result.returncode == 0, result.stderr
    # The first command started the server, waited for its core and ran in it.
    assert json.loads(timings.read_text())["pid"] != pid
    assert warm.servers(env)
    yield env
    asked, running = warm.stop_all(env)
    assert (asked, running) == (1, 0)
    assert not list((folder / "servers").glob("*.sock"))


def test_a_warm_command_gives_what_a_cold_one_gives(warm_env, tmp_path):
    outputs = {}
    for mode in ("0", "1"):
        root = _digits_project(tmp_path / mode)
        timings = tmp_path / f"timings{mode}.jsonl"
        env = {**warm_env, "LATENTLAB_WARM": mode, "LATENTLAB_TIMINGS": str(timings)}
        result, pid = _latentlab(["ingest", "digits", "--root", str(root)], env, root)
        assert result.returncode == 0, result.stderr
        record = json.loads(timings.read_text().splitlines()[0])
        # Cold, the command's own process ran the stage; warm, a worker forked by the server did.
        assert (record["pid"] == pid) == (mode == "0")
        assert "MLflow run" in result.stderr and "FINISHED" in result.stderr  # the command's logging reached stderr
        processed = root / "data" / "processed" / "digits"
        outputs[mode] = (
            result.stdout.replace(str(root), "ROOT"),
            {p.name: np.load(p) for p in processed.glob("*.npz")},
        )
    assert outputs["0"][0] == outputs["1"][0] == "ROOT/data/processed/digits\n"
    cold, hot = outputs["0"][1], outputs["1"][1]
    assert cold.keys() == hot.keys() and cold
    for name in cold:
        for array in cold[name].files:
            np.testing.assert_array_equal(cold[name][array], hot[name][array])


def test_a_warm_error_is_the_same_one_line_and_status(warm_env, tmp_path):
    results = []
    for mode in ("0", "1"):
        root = _digits_project(tmp_path / mode)
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["ingest"]["val_fraction"] = 2
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        result, _ = _latentlab(["ingest", "digits", "--root", str(root)], {**warm_env, "LATENTLAB_WARM": mode}, root)
        results.append((result.returncode, result.stderr.replace(str(root), "ROOT")))
    assert results[0] == results[1]
    assert results[1][0] == 2 and results[1][1].startswith("error: ROOT/params.yaml: ingest.val_fraction")


def _blocked_command(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """A warm ``latentlab report`` that blocks reading its params.yaml, a FIFO nobody writes."""
    root = tmp_path / "blocked"
    root.mkdir()
    os.mkfifo(root / "params.yaml")
    proc = _start(["report", "--root", str(root)], env, root)
    _wait(lambda: _running(env) == 1, 60, "the worker to start")
    return proc


def _running(env: dict[str, str]) -> int:
    return sum(server["running"] for server in warm.servers(env))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_command_reaches_its_worker(warm_env, tmp_path, signum):
    proc = _blocked_command(tmp_path, warm_env)
    time.sleep(2)  # the worker is blocked in open(params.yaml) by now: a few milliseconds after its fork
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    if signum == signal.SIGINT:
        # Ctrl-C became a KeyboardInterrupt in the worker, which the CLI turns into status 130, as
        # it does cold. (Had the command kept the signal to itself, it would have died of it: -2.)
        assert proc.returncode == 130
    else:
        # The worker died of SIGTERM, and the command died of it in turn, as a cold command would.
        assert proc.returncode == -signal.SIGTERM
    _wait(lambda: _running(warm_env) == 0, 30, "the worker to end")


def test_a_killed_command_takes_its_worker_with_it(warm_env, tmp_path):
    proc = _blocked_command(tmp_path, warm_env)
    proc.kill()  # SIGKILL: the command cannot say anything, the server sees the connection drop
    proc.communicate(timeout=60)
    _wait(lambda: _running(warm_env) == 0, 30, "the orphaned worker to be killed")


def test_a_stopping_server_lets_new_commands_go_elsewhere(tmp_path):
    env = {**os.environ, "LATENTLAB_WARM": "1", "LATENTLAB_WARM_DIR": str(tmp_path / "servers")}
    env.pop("MLFLOW_TRACKING_URI", None)
    root = _digits_project(tmp_path / "first")
    assert _latentlab(["ingest", "digits", "--root", str(root)], env, root)[0].returncode == 0
    blocked = _blocked_command(tmp_path, env)
    try:
        # Asked to stop while a command runs: it finishes that command, but its socket goes at once.
        assert warm.stop_all(env, timeout=0.5) == (1, 1)
        _wait(lambda: not list((tmp_path / "servers").glob("*.sock")), 10, "the socket to go")
        other = _digits_project(tmp_path / "other")
        result, _ = _latentlab(["ingest", "digits", "--root", str(other)], env, other)
        assert result.returncode == 0, result.stderr  # served by a new server, not stuck behind the old one
    finally:
        blocked.kill()
        blocked.communicate(timeout=60)
        warm.stop_all(env)


@pytest.mark.parametrize("acknowledged", [True, False])
def test_a_command_leaving_with_its_status_does_not_kill_the_exiting_worker(acknowledged, capsys):
    """The worker sends its exit status, then exits; the command may leave in between.

    CI once logged finished stages as "killed by signal 9": the command had its status and
    closed its connection while the worker was still between that send and its exit, and
    the server took the close for the command's death. A command that says it has its
    status (as :func:`warm._relay` does) leaves its worker to exit; one that vanishes
    without a word still takes its worker with it.
    """
    worker = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    server_end, command_end = socket.socketpair()
    server = warm_server._Server(listener=None, lock=None, start_environ={})
    server.stopping = True  # no listener to watch: only this job's events
    job = warm_server._Job(server_end, worker.pid, os.pidfd_open(worker.pid), "latentlab demo", "/here")
    server.jobs.append(job)
    if acknowledged:
        warm._send(command_end, {"done": True})
    command_end.close()
    server.poll(1.0)
    if not acknowledged:
        assert worker.wait(timeout=10) == -signal.SIGKILL
        return
    assert worker.poll() is None and job.conn is None and server.jobs == [job]
    worker.stdin.close()  # the worker ends normally, after its command has gone
    _wait(lambda: (server.poll(0.2), not server.jobs)[1], 10, "the worker to be reaped")
    assert "latentlab demo (in /here): exit 0 after" in capsys.readouterr().out


def test_warm_status_and_stop_commands(tmp_path):
    env = {**os.environ, "LATENTLAB_WARM_DIR": str(tmp_path / "none")}
    status = subprocess.run([str(BIN / "latentlab"), "warm", "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "no warm server" in status.stdout
    stop = subprocess.run([str(BIN / "latentlab"), "warm", "stop"], env=env, capture_output=True, text=True)
    assert stop.returncode == 0 and "stopped 0 warm server(s)" in stop.stdout
