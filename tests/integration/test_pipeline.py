"""The whole DVC pipeline on a tiny configuration, in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import DVC_FILES, make_digit_images, tiny_params, write_idx, write_project, write_tone_wavs

pytestmark = pytest.mark.integration


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # The stage commands (`latentlab ...`) come from this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _ran_stages(output: str) -> set[str]:
    """Stages DVC ran, by address: a stage of pipelines/X/dvc.yaml is ``pipelines/X/dvc.yaml:NAME``."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def _address(name: str) -> str:
    """How DVC names stage ``name`` from the repository root (and prints it when it runs it)."""
    group = name.partition("@")[0]
    return name if DVC_FILES[group] == "dvc.yaml" else f"{DVC_FILES[group]}:{name}"


@pytest.fixture(scope="module", autouse=True)
def warm_servers(tmp_path_factory) -> Iterator[Path]:
    """The stage commands of this module go through a warm server (as `dvc repro` does by default)
    in a folder of this module's own; it is stopped at the end."""
    from latentlab import warm

    folder = tmp_path_factory.mktemp("warm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LATENTLAB_WARM", "1")
        mp.setenv("LATENTLAB_WARM_DIR", str(folder))
        yield folder
        assert warm.stop_all(dict(os.environ))[1] == 0


@pytest.fixture(scope="module")
def project(tmp_path_factory, warm_servers: Path) -> Path:
    base = tmp_path_factory.mktemp("pipeline")
    data = base / "inputs"
    x, y = make_digit_images(20, 3, seed=1)
    xt, yt = make_digit_images(5, 3, seed=2)
    write_idx(data / "digits" / "train-images-idx3-ubyte.gz", x, gz=True)
    write_idx(data / "digits" / "train-labels-idx1-ubyte.gz", y.astype("uint8"), gz=True)
    write_idx(data / "digits" / "t10k-images-idx3-ubyte.gz", xt, gz=True)
    write_idx(data / "digits" / "t10k-labels-idx1-ubyte.gz", yt.astype("uint8"), gz=True)
    write_tone_wavs(data / "tones", per_digit=5)
    params = tiny_params(
        data,
        {
            "digits": {"kind": "idx", "path": str(data / "digits"), "class_names": ["a", "b", "c"]},
            "tones": {
                "kind": "speech",
                "path": str(data / "tones"),
                "n_fft": 256,
                "hop_length": 128,
                "n_mels": 16,
                "duration": 0.25,
            },
        },
    )
    # Two small networks besides PCA: a plain one and a denoising one (for the compare stage).
    quick = {"epochs": 2, "batch_size": 16, "max_train_samples": 60}
    params["train"]["models"] = ["pca", "deep", "denoising"]
    params["train"]["zoo"]["deep"].update(latent_sizes=[2], hidden=[16], training=quick)
    params["train"]["zoo"]["denoising"] = {
        "family": "deep",
        "latent_sizes": [4],
        "hidden": [16],
        # On speech both noises: one cleaner trained on each clip under white and under babble noise.
        "denoise_from": {"image": "gaussian_sigma0.3", "spectrogram": ["white_snr5db", "babble_snr5db"]},
        "training": quick,
    }
    params["evaluate"]["latent"]["models"] = ["deep"]
    params["evaluate"]["audio_examples"] = 1
    root = write_project(base / "repo", params)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        result = _run(cmd, root)
        assert result.returncode == 0, result.stderr
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], root)
    first = _run([sys.executable, "-m", "dvc", "repro"], root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (root / "first_run.log").write_text(first.stdout)
    return root


def test_first_run_runs_every_stage_and_writes_outputs(project: Path, warm_servers: Path):
    ran = _ran_stages((project / "first_run.log").read_text())
    # The first stage started a warm server; the stages after its start ran in it (its log names them).
    log = "".join(p.read_text() for p in warm_servers.glob("*.log"))
    served = re.findall(r"latentlab (.+?) \(in .+?\): exit 0 after", log)
    assert "report" in served and len(served) >= 10, log[-2000:]
    for dataset in ("digits", "tones"):
        for stage in ("ingest", "validate", "corrupt"):
            assert f"{stage}@{dataset}" in ran
        for model in ("pca", "deep", "denoising"):
            assert _address(f"train@{dataset}-{model}") in ran and _address(f"evaluate@{dataset}-{model}") in ran
        assert _address(f"compare@{dataset}") in ran
    assert "report" in ran

    manifest = json.loads((project / "data/processed/digits/manifest.json").read_text())
    assert manifest["counts"] == {"train": 54, "val": 6, "test": 15}
    assert manifest["class_names"] == ["a", "b", "c"]
    assert set(manifest["source"]["files"]) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    metrics = json.loads((project / "metrics/digits/pca.json").read_text())
    assert metrics["reconstruction"]["4"]["mse"] < metrics["reconstruction"]["2"]["mse"]
    assert set(metrics["reconstruction"]["2"]) == {"mse", "psnr", "ssim", "explained_variance_ratio"}
    compare = json.loads((project / "metrics/compare/digits.json").read_text())
    assert {r["model"] for r in compare["reconstruction"]} == {"pca", "deep", "denoising"}
    assert set(compare["denoising"]) == {"gaussian_sigma0.3", "salt_pepper0.2", "mask0.5", "block4"}
    gaussian = compare["denoising"]["gaussian_sigma0.3"]
    assert {"noisy input", "median 3x3", "PCA k=4", "denoising k=4 (trained on gaussian_sigma0.3)"} <= set(gaussian)
    assert "psnr_in_region" in compare["inpainting"]["block4"]["median 3x3"]
    deep = json.loads((project / "metrics/digits/deep.json").read_text())
    assert set(deep["reconstruction"]["2"]) == {"mse", "psnr", "ssim"}
    assert 0.0 <= deep["latent"]["nmi"] <= 1.0
    assert (project / "reports/evaluation/digits/deep/latent_tsne.png").exists()
    tones = json.loads((project / "metrics/compare/tones.json").read_text())
    both = "denoising k=4 (trained on white_snr5db + babble_snr5db)"
    for noise in ("white_snr5db", "babble_snr5db"):
        cleaning = tones["speech_cleaning"][noise]
        assert {"noisy input", "Wiener filter", both} <= set(cleaning["snr_db"])
    # The evaluate stage restores the test set under each corruption the model learned.
    tones_denoising = json.loads((project / "metrics/tones/denoising.json").read_text())["denoising"]
    assert set(tones_denoising) == {"white_snr5db", "babble_snr5db"}
    assert {"noisy", "k4"} <= set(tones_denoising["babble_snr5db"])
    digits_denoising = json.loads((project / "metrics/digits/denoising.json").read_text())["denoising"]
    assert set(digits_denoising) == {"gaussian_sigma0.3"}
    assert list((project / "reports/compare/tones/audio").glob("*.wav"))

    index = (project / "reports/index.html").read_text()
    assert "digits" in index and "tones" in index and "PCA" in index
    assert "denoising from white_snr5db + babble_snr5db" in index  # the model's own order
    for link in re.findall(r'(?:href|src)="([^"#]+)"', index):
        assert (project / "reports" / link).exists(), f"broken link in index.html: {link}"
    assert (project / "reports/validation/digits/data_docs/index.html").exists()
    # Each stage that ran is recorded in the dvc.lock beside its own dvc.yaml, and only there.
    recorded = set()
    for dvc_yaml in set(DVC_FILES.values()):
        lock = (project / dvc_yaml).with_name("dvc.lock")
        if lock.exists():
            names = yaml.safe_load(lock.read_text())["stages"]
            recorded |= {name if dvc_yaml == "dvc.yaml" else f"{dvc_yaml}:{name}" for name in names}
    assert recorded == ran


def test_mlflow_has_one_finished_run_per_stage(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    names = {r.info.run_name for r in runs}
    assert {
        "ingest:digits",
        "validate:digits",
        "corrupt:digits",
        "train:digits",
        "evaluate:digits",
        "compare:digits",
        "report",
    } <= names
    assert {r.info.status for r in runs} == {"FINISHED"}
    evaluate = next(r for r in runs if r.info.run_name == "evaluate:digits" and r.data.tags["latentlab.model"] == "pca")
    assert "reconstruction.2.mse" in evaluate.data.metrics
    # A network's training run has per-step losses, per-epoch grids and a logged model.
    train = next(r for r in runs if r.info.run_name == "train:digits" and r.data.tags["latentlab.model"] == "deep")
    steps = client.get_metric_history(train.info.run_id, "k2.step.loss")
    assert len(steps) >= 2 and [m.step for m in steps] == list(range(len(steps)))
    assert "k2.val.reconstruction" in train.data.metrics
    assert [a.path for a in client.list_artifacts(train.info.run_id, "reconstructions/k2")]
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"metrics", "figures"} <= artifacts


def test_second_run_does_nothing_and_a_corruption_change_reruns_only_downstream(project: Path):
    again = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert again.returncode == 0, again.stderr
    assert _ran_stages(again.stdout) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["corrupt"]["salt_pepper_amount"] = [0.3]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    ran = _ran_stages(changed.stdout)
    assert "corrupt@digits" in ran and _address("compare@digits") in ran and "report" in ran
    assert not {s for s in ran if s.startswith(("ingest", "validate"))}
    # Speech ignores image corruptions: its corrupted data is unchanged, so nothing of it reruns.
    assert not {s for s in ran if "tones" in s and not s.startswith("corrupt")}
    assert "salt_pepper0.3" in json.loads((project / "metrics/compare/digits.json").read_text())["denoising"]


def test_push_and_pull_round_trip_into_a_fresh_clone(project: Path, tmp_path: Path):
    """Data, checkpoints and reports pushed to a remote come back, byte for byte, in a fresh clone."""
    remote = tmp_path / "remote"
    assert (
        _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "-f", "local", str(remote)], project).returncode == 0
    )
    push = _run([sys.executable, "-m", "dvc", "push"], project)
    assert push.returncode == 0, push.stdout[-2000:] + push.stderr[-2000:]
    ident = ["-c", "user.name=latentlab test", "-c", "user.email=test@latentlab"]
    for cmd in (["git", "add", "-A"], ["git", *ident, "commit", "-qm", "pipeline run"]):
        result = _run(cmd, project)
        assert result.returncode == 0, result.stderr
    clone = tmp_path / "clone"
    assert _run(["git", "clone", "-q", str(project), str(clone)], tmp_path).returncode == 0
    tracked_outputs = ["data/processed/digits/train.npz", "models/digits/pca", "reports/index.html"]
    assert not any((clone / p).exists() for p in tracked_outputs)  # git alone does not carry them
    pull = _run([sys.executable, "-m", "dvc", "pull"], clone)
    assert pull.returncode == 0, pull.stdout[-2000:] + pull.stderr[-2000:]
    for rel in tracked_outputs:
        original = (
            sorted(p for p in (project / rel).rglob("*") if p.is_file())
            if (project / rel).is_dir()
            else [project / rel]
        )
        assert original, rel
        for path in original:
            copy = clone / path.relative_to(project)
            assert copy.read_bytes() == path.read_bytes(), copy
    status = _run([sys.executable, "-m", "dvc", "status"], clone)
    assert "up to date" in status.stdout, status.stdout[-2000:]


def test_repository_has_a_default_remote_outside_the_repository():
    import configparser

    repo = Path(__file__).resolve().parents[2]
    config = configparser.ConfigParser()
    config.read(repo / ".dvc" / "config")
    name = config["core"]["remote"]
    url = config[f"'remote \"{name}\"'"]["url"]
    location = (repo / ".dvc" / url).resolve()
    assert not location.is_relative_to(repo), location


def test_trained_networks_are_registered_and_load_back_by_name(project: Path, monkeypatch):
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from latentlab.tracking import load_registered, registered_name, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = MlflowClient(tracking_uri=tracking_uri(project))
    name = registered_name("digits", "deep")
    version = client.get_model_version_by_alias(name, "k2")
    assert version.tags["latent_size"] == "2"
    assert any(key.startswith("metric.k2.") for key in version.tags)
    # The version's logged model: made by the training run, recorded as its output, with its own metrics.
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == version.run_id
    run = client.get_run(version.run_id)
    assert run.info.run_name == "train:digits"
    assert logged.model_id in {output.model_id for output in run.outputs.model_outputs}
    assert logged.metrics and all(m.key.startswith("k2.") for m in logged.metrics)
    model = load_registered(project, "digits", "deep", "k2")
    x = torch.from_numpy(np.random.default_rng(0).random((5, 1, 12, 12), dtype=np.float32))
    with torch.no_grad():
        assert model.encode(x).shape == (5, 2)
    # PCA is not a network: nothing to register.
    assert not client.search_registered_models(f"name = '{registered_name('digits', 'pca')}'")


def test_mlflow_ui_shows_a_training_runs_loss_chart_in_a_browser(project: Path, tmp_path: Path):
    """Headless Chromium: the UI lists the experiment, opens the deep model's training run, shows its loss chart."""
    import shutil
    import socket
    import time
    import urllib.request

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian package chromium; scripts/setup.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency) is not installed")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{project / 'mlruns' / 'mlflow.db'}",
            "--default-artifact-root", str(project / "mlruns" / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the teardown stops the server's workers too
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlruns' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("latentlab").experiment_id
    deep_run = client.search_runs(
        [experiment_id],
        # The run that trained (a rerun that resumed a finished checkpoint logs no steps).
        "tags.`latentlab.stage` = 'train' and tags.`latentlab.model` = 'deep' and tags.`latentlab.dataset` = 'digits'"
        " and metrics.`k2.step.loss` >= 0",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    run_id = deep_run.info.run_id
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(1)
        with sync_api.sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=browser, headless=True, args=["--no-sandbox", "--disable-gpu"])
            page = chromium.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url, wait_until="load")
            page.get_by_role("link", name="Experiments", exact=True).click()
            page.get_by_role("link", name="latentlab", exact=True).first.click()
            page.get_by_text("Model training", exact=True).first.click()
            # The experiment's run list shows the training runs; open the deep model's one.
            page.get_by_role("link", name="train:digits").first.wait_for(state="visible")
            assert f"/experiments/{experiment_id}/" in page.url
            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}", wait_until="load")
            page.get_by_text("train:digits", exact=True).first.wait_for(state="visible")
            # Its "Model metrics" tab (the tab's own address: a click can race the page's overlays).
            page.get_by_role("tab", name="Model metrics").wait_for(state="visible")
            page.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics", wait_until="load")
            screenshot = tmp_path / "mlflow_loss_chart.png"
            chart_title = page.get_by_text("k2.step.loss", exact=True).first
            try:
                chart_title.wait_for(state="visible")
            finally:
                page.screenshot(path=str(screenshot), full_page=True)
            assert "/runs/" in page.url and page.url.endswith("/model-metrics")
            chromium.close()
        assert screenshot.stat().st_size > 10_000
    finally:
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
