"""The sweep: grid points and their ids, checks of the sweep section, the task-runner choice,
and one point trained on a tiny project (the same result in any process, resumed when finished)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from latentlab.config import Params, load_params, parse_params
from latentlab.errors import ConfigError, DataError
from tests.conftest import REPO, tiny_params, write_bar_dataset, write_tone_spectrograms


def _params(**sweep) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweep"].update(sweep)
    return parse_params(raw)


# --------------------------------------------------------------------- points
def test_repository_sweep_enumerates_latent_size_by_noise_by_seed():
    from latentlab.sweep import sweep_points

    params = load_params(REPO / "params.yaml")
    points = sweep_points(params)
    cfg = params.sweep
    assert len(points) == len(cfg.grid.latent_size) * len(cfg.grid.noise) * len(cfg.grid.seed)
    assert points[0].dataset == params.pipeline.datasets[0]  # dataset: null = the first of pipeline.datasets
    ids = [p.id for p in points]
    assert len(set(ids)) == len(ids)
    noisy = next(p for p in points if p.noise != "none")
    assert noisy.spec.denoise_from == {"image": (noisy.noise,)}
    assert all(p.spec.training == cfg.training for p in points)


def test_point_ids_and_specs_of_a_sparse_grid():
    from latentlab.sweep import sweep_points

    params = _params(
        model="sparse",
        grid={"latent_size": [16, 4], "rho": [0.05, 0.1], "beta": [1.0], "seed": [3, 1]},
        training=None,
    )
    points = sweep_points(params)
    assert [p.id for p in points] == [
        "k16-none-rho0.05-beta1-seed3",
        "k16-none-rho0.05-beta1-seed1",
        "k16-none-rho0.1-beta1-seed3",
        "k16-none-rho0.1-beta1-seed1",
        "k4-none-rho0.05-beta1-seed3",
        "k4-none-rho0.05-beta1-seed1",
        "k4-none-rho0.1-beta1-seed3",
        "k4-none-rho0.1-beta1-seed1",
    ]
    point = points[2]
    assert (point.latent_size, point.seed, point.noise) == (16, 3, "none")
    assert point.spec.family_options() == {"rho": 0.1, "beta": 1.0}
    assert point.hyperparameters() == {"rho": 0.1, "beta": 1.0}
    assert point.spec.training == params.train.spec("sparse").training  # training: null = the model's own
    assert point.spec.denoise_from is None


def test_axes_left_out_keep_the_models_values():
    from latentlab.sweep import sweep_points

    params = _params(model="denoising", grid={})
    spec = params.train.spec("denoising")
    points = sweep_points(params)
    # One point per latent size and per corruption the model learns from.
    pairs = [(k, noise) for k in spec.latent_sizes for noise in spec.denoise_from["image"]]
    assert sorted((p.latent_size, p.noise) for p in points) == sorted(pairs)
    assert {p.seed for p in points} == {params.train.seed}


def test_a_speech_point_trains_as_the_train_stage_does(tmp_path: Path):
    """Spectrogram settings of the model (training_by_modality) and every noise draw of the training clips."""
    import numpy as np

    from latentlab.corrupt import corrupt_dataset, load_corruption
    from latentlab.data.store import load_split, to_unit_float
    from latentlab.paths import ProjectPaths
    from latentlab.sweep import load_point_data, sweep_points

    raw = tiny_params(tmp_path, {"digits": {"kind": "speech", "path": str(tmp_path / "unused")}})
    raw["corrupt"] |= {"audio_train_draws": 3, "babble_speakers": 2}
    raw["sweep"] |= {"model": "denoising", "grid": {"latent_size": [4]}, "training": None, "max_test_samples": None}
    raw["train"]["zoo"]["denoising"]["training_by_modality"] = {"spectrogram": {"min_steps": 7}}
    params = parse_params(raw)
    paths = ProjectPaths(tmp_path)
    write_tone_spectrograms(paths.processed("digits"))
    corrupt_dataset("digits", paths.processed("digits"), paths.corrupted("digits"), params.corrupt)

    points = sweep_points(params)
    assert [p.noise for p in points] == ["white_snr5db", "babble_snr5db"]
    point = points[1]
    assert point.spec.training == params.train.spec("denoising").training_for("spectrogram")
    assert point.spec.training.min_steps == 7 and point.spec.training_for("spectrogram").min_steps == 7

    data = load_point_data(paths, point)
    clean = to_unit_float(load_split(paths.processed("digits"), "train").x)
    corrupted = load_corruption(paths.corrupted("digits"), "babble_snr5db", "train")
    assert data.train_in.shape == data.train_target.shape == (3 * len(clean), *clean.shape[1:])
    np.testing.assert_array_equal(data.train_in, to_unit_float(corrupted.draws(np.arange(len(clean)))))
    np.testing.assert_array_equal(data.train_target, np.tile(clean, (3, 1, 1, 1)))
    assert data.val_in.shape == data.val_target.shape and len(data.val_in) == 6  # one draw of each val clip


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"grid": {"rho": [0.1]}}, "params.yaml: sweep.grid.rho: applies to the sparse family only"),
        ({"model": "sparse", "grid": {"lam": [0.1]}}, "params.yaml: sweep.grid.lam: applies to the contractive"),
        ({"grid": {"sigma": [0.1]}}, "params.yaml: sweep.grid.sigma: unknown key"),
        ({"grid": {"seed": [0, 0]}}, "params.yaml: sweep.grid.seed: must be a non-empty list without repeats"),
        ({"grid": {"latent_size": [0]}}, "params.yaml: sweep.grid.latent_size.0: Input should be greater than"),
        ({"model": "pca"}, "params.yaml: sweep.model: 'pca' is PCA"),
        ({"model": "vae"}, "params.yaml: sweep.model: no model 'vae' under train.zoo"),
        ({"dataset": "sat6"}, "params.yaml: sweep.dataset: 'sat6' is not in pipeline.datasets"),
        ({"runner": "ray"}, "params.yaml: sweep.runner: Input should be 'dask' or 'serial'"),
        ({"dask": {"n_workers": 0}}, "params.yaml: sweep.dask.n_workers: Input should be greater than or equal to 1"),
        ({"dask": {"addres": "tcp://h:8786"}}, "params.yaml: sweep.dask.addres: unknown key"),
    ],
)
def test_bad_sweep_sections_give_one_line_naming_the_key(sweep, expected):
    with pytest.raises(ConfigError) as info:
        _params(**sweep)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unknown_noise_names_the_key_and_what_exists():
    from latentlab.sweep import sweep_points

    params = _params(grid={"noise": ["none", "gaussian_sigma0.5"]})
    with pytest.raises(ConfigError, match=r"params.yaml: sweep.grid.noise: no corruption 'gaussian_sigma0.5'.*"):
        sweep_points(params)


def test_values_that_print_alike_are_refused():
    from latentlab.sweep import sweep_points

    params = _params(model="sparse", grid={"latent_size": [4], "rho": [0.1234567, 0.1234568]})
    with pytest.raises(ConfigError, match=r"params.yaml: sweep.grid: .* \['k4-none-rho0.123457-seed0'\]"):
        sweep_points(params)


# --------------------------------------------------------------------- runner
def test_task_runner_choice():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from latentlab.orchestration import describe_runner, task_runner_for

    serial = task_runner_for(_params(runner="serial").sweep, environ={})
    assert isinstance(serial, ThreadPoolTaskRunner) and serial._max_workers == 1

    local = task_runner_for(_params(dask={"n_workers": 3}).sweep, environ={})
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True}
    assert describe_runner(_params(dask={"n_workers": 3}).sweep, environ={}) == (
        "local dask cluster, 3 workers x 1 thread"
    )

    remote = _params(dask={"address": "tcp://10.0.0.5:8786"}).sweep
    from_params = task_runner_for(remote, environ={})
    assert isinstance(from_params, DaskTaskRunner) and from_params.address == "tcp://10.0.0.5:8786"
    assert from_params.cluster_kwargs == {}

    # The environment beats params.yaml; an empty value counts as unset.
    env = {"LATENTLAB_DASK_ADDRESS": "tcp://scheduler:8786"}
    assert task_runner_for(remote, environ=env).address == "tcp://scheduler:8786"
    assert task_runner_for(_params().sweep, environ=env).address == "tcp://scheduler:8786"
    assert task_runner_for(remote, environ={"LATENTLAB_DASK_ADDRESS": " "}).address == "tcp://10.0.0.5:8786"
    assert describe_runner(remote, environ=env) == "dask cluster at tcp://scheduler:8786"
    # ... but runner: serial stays serial.
    assert isinstance(task_runner_for(_params(runner="serial").sweep, environ=env), ThreadPoolTaskRunner)


def test_command_line_overrides():
    from latentlab.orchestration import with_overrides

    cfg = _params(runner="serial").sweep
    assert with_overrides(cfg) == cfg
    remote = with_overrides(cfg, address="tcp://h:8786")
    assert (remote.runner, remote.dask.address) == ("dask", "tcp://h:8786")  # an address implies Dask
    assert with_overrides(cfg, runner="serial", address="tcp://h:8786").runner == "serial"
    assert with_overrides(cfg, runner="dask", workers=4).dask.n_workers == 4
    with pytest.raises(ConfigError, match=r"^--workers: Input should be greater than or equal to 1"):
        with_overrides(cfg, workers=0)
    with pytest.raises(ConfigError, match=r"^--address: "):
        with_overrides(cfg, address="tcp://a b")


# ---------------------------------------------------------------- run_point
def _tiny_project(root: Path) -> Path:
    """Processed bar images (8x8, three classes) and their corruptions; a sweep of a small MLP."""
    from latentlab.corrupt import corrupt_dataset

    raw = tiny_params(root, {"bars": {"kind": "idx", "path": str(root / "unused")}})
    raw["train"]["zoo"]["deep"]["hidden"] = [16]
    raw["sweep"] = {
        "dataset": "bars",
        "model": "deep",
        "grid": {"latent_size": [2, 3], "noise": ["none", "gaussian_sigma0.3"], "seed": [0]},
        "training": {"epochs": 2, "batch_size": 16, "lr": 0.01, "patience": 2},
        "max_test_samples": 12,
        "runner": "serial",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    write_bar_dataset(root / "data" / "processed" / "bars", "bars", {"train": 20, "val": 4, "test": 6})
    corrupt_dataset("bars", root / "data" / "processed" / "bars", root / "data" / "corrupted" / "bars", params.corrupt)
    return root


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    return _tiny_project(tmp_path / "project")


def _without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "train_seconds"}


def test_run_point_is_deterministic_single_threaded_and_resumes(tiny_project: Path, tmp_path: Path, monkeypatch):
    import torch

    from latentlab import engine
    from latentlab.paths import ProjectPaths
    from latentlab.sweep import run_point, sweep_points

    params = load_params(tiny_project / "params.yaml")
    point = next(p for p in sweep_points(params) if p.noise != "none")
    assert point.id == "k2-gaussian_sigma0.3-seed0"
    other = shutil.copytree(tiny_project, tmp_path / "copy")

    seen_threads = []
    real_fit = engine.fit

    def spy_fit(*args, **kwargs):
        seen_threads.append(torch.get_num_threads())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(engine, "fit", spy_fit)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = run_point(tiny_project, point)
        assert torch.get_num_threads() == 2  # the caller's thread count comes back
    finally:
        torch.set_num_threads(before)
    second = run_point(other, point)
    assert seen_threads == [1, 1]
    # The same point in another project folder, with another caller thread count: the same numbers.
    assert _without_timing(first) == _without_timing(second)
    assert first["test_mse"] > 0 and first["n_test"] == 12 and first["n_train"] == 60
    assert (first["latent_size"], first["noise"], first["family"]) == (2, "gaussian_sigma0.3", "deep")

    folder = ProjectPaths(tiny_project).sweep_point("bars", "deep", point.id)
    assert json.loads((folder / "result.json").read_text()) == first
    assert (folder / "checkpoint.pt").exists()
    model, meta = engine.load_model(folder / "model.pt")
    assert meta["latent_dim"] == 2 and meta["denoise_from"] == ["gaussian_sigma0.3"]

    # Finished: read back, nothing trained.
    def no_fit(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(engine, "fit", no_fit)
    assert run_point(tiny_project, point) == first
    # Other settings are another result: trained again, not reused.
    monkeypatch.setattr(engine, "fit", real_fit)
    longer = point.model_copy(
        update={
            "spec": point.spec.model_copy(update={"training": point.spec.training.model_copy(update={"epochs": 3})})
        }
    )
    assert run_point(tiny_project, longer)["epochs_run"] == 3
    # So is the same point computed by other code.
    from latentlab import sweep

    monkeypatch.setattr(sweep, "code_digest", lambda: "another version of latentlab")
    monkeypatch.setattr(engine, "fit", no_fit)
    with pytest.raises(AssertionError, match="trained again"):
        run_point(tiny_project, point)


def test_summarise_writes_sorted_table_and_figure(tiny_project: Path):
    import csv

    from latentlab.paths import ProjectPaths
    from latentlab.sweep import run_point, summarise, sweep_points

    params = load_params(tiny_project / "params.yaml")
    results = [run_point(tiny_project, p) for p in reversed(sweep_points(params))]
    outputs = summarise(tiny_project, results)
    paths = ProjectPaths(tiny_project)
    assert (
        outputs.metrics == paths.sweep_metrics("bars", "deep") == tiny_project / "reports/sweep/bars-deep/results.json"
    )
    summary = json.loads(outputs.metrics.read_text())
    order = ["k2-none-seed0", "k2-gaussian_sigma0.3-seed0", "k3-none-seed0", "k3-gaussian_sigma0.3-seed0"]
    assert [r["id"] for r in summary["rows"]] == order
    assert summary["points"] == 4 and summary["best"]["id"] in order
    with open(outputs.table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["id"] for r in rows] == order and float(rows[0]["test_mse"]) == summary["rows"][0]["test_mse"]
    assert (outputs.figures / "test_mse.png").stat().st_size > 0


def test_missing_inputs_name_the_dvc_stage(tiny_project: Path):
    from latentlab.sweep import check_inputs, sweep_points

    points = sweep_points(load_params(tiny_project / "params.yaml"))
    check_inputs(tiny_project, points)
    (tiny_project / "data" / "corrupted" / "bars" / "gaussian_sigma0.3.npz").unlink()
    with pytest.raises(DataError, match=r"gaussian_sigma0.3.npz: missing; run `dvc repro corrupt@bars` first"):
        check_inputs(tiny_project, points)
    check_inputs(tiny_project, [p for p in points if p.noise == "none"])
    shutil.rmtree(tiny_project / "data" / "processed")
    with pytest.raises(DataError, match=r"run `dvc repro corrupt@bars` first"):
        check_inputs(tiny_project, points)


def test_cli_sweep_reports_a_bad_grid_in_one_line(tiny_project: Path):
    from typer.testing import CliRunner

    from latentlab.cli import app

    raw = yaml.safe_load((tiny_project / "params.yaml").read_text())
    raw["sweep"]["grid"]["beta"] = [0.1]
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["sweep", "--root", str(tiny_project)])
    assert result.exit_code == 2
    assert result.output.startswith("error: ")
    assert "params.yaml: sweep.grid.beta: applies to the sparse family only" in result.output


def test_collapse_pairs_and_sweep_points_take_the_runner_of_params(tmp_path: Path, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from latentlab import orchestration

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sweep"]["runner"] = "serial"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    calls = []

    def capture(flow):
        def with_options(**options):
            return lambda **kwargs: calls.append((flow, options["task_runner"], kwargs))

        return with_options

    monkeypatch.setattr(orchestration.collapse_flow, "with_options", capture("collapse"))
    monkeypatch.setattr(orchestration.sweep_flow, "with_options", capture("sweep"))
    monkeypatch.setattr(orchestration.sweep, "check_inputs", lambda root, points: None)
    monkeypatch.setattr(orchestration, "prefect_api_for_workers", lambda *args: contextlib.nullcontext())
    monkeypatch.delenv("LATENTLAB_DASK_ADDRESS", raising=False)
    orchestration.run_collapse(str(tmp_path), "mnist")
    orchestration.run_sweep(str(tmp_path))
    orchestration.run_sweep(str(tmp_path), address="tcp://h:8786")
    (collapse, runner, kwargs), (_, serial, sweep_kwargs), (_, remote, remote_kwargs) = calls
    assert collapse == "collapse" and kwargs == {"root": str(tmp_path), "dataset": "mnist", "return_state": False}
    assert isinstance(runner, ThreadPoolTaskRunner) and isinstance(serial, ThreadPoolTaskRunner)
    assert sweep_kwargs["runner"] == "serial"
    # A command-line address beats the environment's.
    monkeypatch.setenv("LATENTLAB_DASK_ADDRESS", "tcp://env:8786")
    orchestration.run_sweep(str(tmp_path), address="tcp://h:8786")
    for _, dask_runner, dask_kwargs in (calls[2], calls[3]):
        assert isinstance(dask_runner, DaskTaskRunner) and dask_runner.address == "tcp://h:8786"
        assert dask_kwargs["runner"] == "dask cluster at tcp://h:8786"


def test_dask_workers_get_the_flows_prefect_api(monkeypatch):
    """Without PREFECT_API_URL, one temporary server is started here and its URL handed to the workers."""
    import prefect.server.api.server as server_module
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from latentlab.orchestration import prefect_api_for_workers

    started = []

    class FakeServer:
        api_url = "http://127.0.0.1:1234/api"

        def start(self) -> None:
            started.append(self)

    monkeypatch.setattr(server_module, "SubprocessASGIServer", FakeServer)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with prefect_api_for_workers(_params(runner="serial").sweep, environ={}):
            assert get_current_settings().api.url is None
        assert not started
        with prefect_api_for_workers(_params().sweep, environ={}):
            assert get_current_settings().api.url == FakeServer.api_url
        assert len(started) == 1 and get_current_settings().api.url is None
    configured = temporary_settings(updates={PREFECT_API_URL: "http://prefect:4200/api"})
    with configured, prefect_api_for_workers(_params().sweep, environ={}):
        assert get_current_settings().api.url == "http://prefect:4200/api"
    assert len(started) == 1  # a configured API is used as it is
