"""The generative stages' library: domain classifier, VAE and GAN training, evaluation, report section.

One tiny synthetic project (3 classes of 8x8 bar images) is trained once per
module on the CPU: the classifier, a two-size MLP VAE and a conditional DCGAN.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentlab import engine, quality
from latentlab.config import Params, parse_params
from latentlab.data.store import load_split
from latentlab.generative import (
    KINDS,
    draw_samples,
    evaluate_generative,
    generative_report_section,
    load_generative,
    train_domain_classifier,
    train_generative,
)
from latentlab.models.gan import GanPair
from latentlab.models.vae import VariationalAutoencoder, binarise
from latentlab.paths import ProjectPaths
from tests.conftest import BAR_CLASSES, tiny_params, write_bar_dataset

DATASET = "bars"
SIZE = 8
PER_CLASS = {"train": 60, "val": 10, "test": 20}
CLASS_NAMES = BAR_CLASSES
VAE_EPOCHS, GAN_EPOCHS, CLASSIFIER_EPOCHS = 3, 2, 2


class RecordingRun:
    """A RunLog that records every call (and has set_tags, like tracking.RunLogger)."""

    def __init__(self) -> None:
        self.series: dict[str, list[tuple[int, list[float]]]] = {}
        self.metrics: list[tuple[dict[str, Any], int]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.models: list[str] = []
        self.tags: dict[str, Any] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        self.metrics.append((metrics, step))

    def log_series(self, key: str, values: list[float], start_step: int = 0) -> None:
        self.series.setdefault(key, []).append((start_step, list(values)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert Path(path).exists()
        self.artifacts.append((Path(path), artifact_path))

    def log_torch_model(self, model: Any, name: str) -> None:
        self.models.append(name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)


def _write_dataset(root: Path) -> ProjectPaths:
    paths = ProjectPaths(root)
    write_bar_dataset(paths.processed(DATASET), DATASET, PER_CLASS, SIZE)
    return paths


def _params(root: Path) -> Params:
    raw = tiny_params(root, {DATASET: {"kind": "idx", "path": "unused"}})
    raw["train"]["device"] = "cpu"
    raw["train"]["threads"] = 1
    raw["generate"] = {
        "datasets": [DATASET],
        "models": ["vae", "cgan", "dcgan", "never_run"],
        "zoo": {
            "vae": {
                "family": "vae_mlp",
                "latent_sizes": [2, 3],
                "hidden": [32],
                "training": {"epochs": VAE_EPOCHS, "batch_size": 32, "lr": 0.005, "patience": 5},
            },
            "cgan": {
                "family": "cgan",
                "latent_dim": 8,
                "arch": "dcgan",
                "channels": [8, 16],
                "training": {"epochs": GAN_EPOCHS, "batch_size": 32},
            },
            "dcgan": {"family": "dcgan", "latent_dim": 4, "channels": [4, 8], "training": {"epochs": 1}},
            "never_run": {"family": "dcgan", "latent_dim": 4, "channels": [4, 8]},
        },
        "quality": {
            "samples": 45,
            "seed": 0,
            "k": 3,
            "psi": [0.5, 1.0],
            "nll_images": 60,
            "nll_importance_samples": 50,
            "monitor_samples": 30,
            "classifier": {"epochs": CLASSIFIER_EPOCHS, "batch_size": 32, "lr": 0.005, "max_train_samples": None},
        },
    }
    raw["collapse"]["datasets"] = []
    return parse_params(raw)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train and evaluate everything once: classifier, VAE (k = 2, 3), conditional DCGAN."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("generative")
    paths = _write_dataset(root)
    params = _params(root)
    runs = {name: RecordingRun() for name in ("classifier", "vae", "cgan", "dcgan")}
    out: dict[str, Any] = {"root": root, "paths": paths, "params": params, "runs": runs}
    out["classifier"] = train_domain_classifier(params, DATASET, paths, runs["classifier"])
    for model in ("vae", "cgan", "dcgan"):
        out[f"{model}_trained"] = train_generative(params, DATASET, model, paths, runs[model])
        out[f"{model}_evaluated"] = evaluate_generative(params, DATASET, model, paths)
    return out


def _finite_numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [v for value in obj.values() for v in _finite_numbers(value)]
    if isinstance(obj, int | float) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def _no_temporaries(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old"))]
    assert leftovers == []


# ------------------------------------------------------------------------ classifier
def test_domain_classifier_metrics_and_files(project):
    paths: ProjectPaths = project["paths"]
    metrics, metrics_path = project["classifier"]
    assert metrics_path == paths.study_metrics("classifier", DATASET)
    assert json.loads(metrics_path.read_text()) == json.loads(json.dumps(metrics))
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_accuracy"] > 0.5  # bars are easy
    assert metrics["train_samples"] == 3 * PER_CLASS["train"]
    assert metrics["floor_samples"] == 45
    floor = metrics["floor"]
    assert set(floor) >= {"frechet_distance", "precision", "recall", "coverage", "entropy", "entropy_normalised"}
    assert all(math.isfinite(v) for v in floor.values())
    assert set(metrics["per_class_accuracy"]) == set(CLASS_NAMES)
    model, meta = quality.load_classifier(paths.classifier(DATASET) / "classifier.pt")
    assert model.num_classes == 3 and meta["dataset"] == DATASET
    run = project["runs"]["classifier"]
    assert [len(v) for _, v in run.series["classifier.val_accuracy"]] == [CLASSIFIER_EPOCHS]


# ------------------------------------------------------------------------------- VAE
def test_vae_training_logs_every_part_and_saves_each_latent_size(project):
    paths: ProjectPaths = project["paths"]
    trained = project["vae_trained"]
    folder = trained["model_dir"]
    assert folder == paths.generative_model(DATASET, "vae")
    assert {p.name for p in folder.iterdir()} >= {"k2.pt", "k3.pt", "k2_history.json", "k3_history.json", "meta.json"}
    metrics = trained["metrics"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert metrics["k2.resumed_from_epoch"] == 0.0 and metrics["k2.epochs_run"] == VAE_EPOCHS
    run = project["runs"]["vae"]
    steps_per_epoch = math.ceil(3 * PER_CLASS["train"] / 32)
    for k in (2, 3):
        for part in ("loss", "reconstruction", "kl", "elbo"):
            calls = run.series[f"k{k}.step.{part}"]
            # One batched call per part per epoch, with consecutive step numbers.
            assert [start for start, _ in calls] == [e * steps_per_epoch for e in range(VAE_EPOCHS)]
            assert all(len(values) == steps_per_epoch for _, values in calls)
    assert run.models == ["model_k2", "model_k3"]
    assert sum(1 for _, where in run.artifacts if where == "samples/k2") == VAE_EPOCHS
    models = load_generative(paths, DATASET, "vae")
    assert sorted(models) == [2, 3] and all(isinstance(m, VariationalAutoencoder) for m in models.values())
    assert models[3].latent_dim == 3 and not models[3].training
    # Early stopping watched the negative ELBO of one fixed binarisation of the validation split (the
    # quantity the test NLL measures), not a cross-entropy against its grey images.
    val = load_split(paths.processed(DATASET), "val").unit_float()
    seed = project["params"].train.seed
    history = json.loads((folder / "k2_history.json").read_text())
    best = min(row["val_loss"] for row in history)
    on_binary = engine.evaluate_loss(models[2], engine.TrainingData(binarise(val, seed)), torch.device("cpu"))
    on_grey = engine.evaluate_loss(models[2], engine.TrainingData(val), torch.device("cpu"))
    assert on_binary["loss"] == pytest.approx(best, rel=1e-5)
    assert on_grey["loss"] != pytest.approx(best, rel=1e-3)


def test_vae_evaluation_bounds_figures_and_sweep(project):
    paths: ProjectPaths = project["paths"]
    metrics, metrics_path, figures = project["vae_evaluated"]
    assert metrics_path == paths.generative_metrics(DATASET, "vae") and metrics_path.exists()
    assert figures == paths.generative_report(DATASET, "vae")
    names = {p.name for p in figures.iterdir()}
    assert names >= {
        "samples_psi0.5.png",
        "samples_psi1.png",
        "samples_by_latent_size.png",
        "interpolation.png",
        "manifold_k2.png",
        "codes_k2.png",
        "quality_vs_diversity.png",
        "psi_sweep.csv",
        "summary.json",
    }
    assert all(math.isfinite(v) for v in _finite_numbers(metrics))
    likelihood = metrics["likelihood"]
    assert likelihood["images"] == 60 and likelihood["importance_samples"] == 50
    for k in (2, 3):
        row = likelihood[f"k{k}"]
        assert row["binarised"] and row["nll"] >= 0.0
        # The importance-weighted bound is tighter than the ELBO (Burda et al. 2016, Theorem 1).
        assert row["nll"] <= row["negative_elbo"] + 0.5
    assert metrics["quality_latent_size"] == 3
    with open(figures / "psi_sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["psi"]) for r in rows] == [0.5, 1.0]
    assert set(metrics["quality"]) == {"psi0.5", "psi1"}
    for scores in metrics["quality"].values():
        assert 0.0 <= scores["precision"] <= 1.0 and 0.0 <= scores["recall"] <= 1.0
        assert scores["frechet_distance"] >= 0.0 and "label_accuracy" not in scores
    assert metrics["floor"] == project["classifier"][0]["floor"]
    _no_temporaries(project["root"])


# ------------------------------------------------------------------------------- GAN
def test_gan_training_logs_steps_watch_and_collapse_verdict(project):
    paths: ProjectPaths = project["paths"]
    trained = project["cgan_trained"]
    folder = trained["model_dir"]
    assert {p.name for p in folder.iterdir()} >= {"gan.pt", "history.json", "meta.json"}
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == GAN_EPOCHS
    assert all({"coverage", "entropy_normalised", "label_accuracy"} <= set(row) for row in history)
    q = project["params"].generate.quality
    assert trained["mode_collapse"] == quality.mode_collapse_flag(history, q.coverage_drop, q.entropy_drop)
    assert trained["metrics"]["mode_collapse_flag"] == float(bool(trained["mode_collapse"]))
    assert all(math.isfinite(v) for v in trained["metrics"].values())
    run = project["runs"]["cgan"]
    for part in ("d_loss", "g_loss", "d_real", "d_fake"):
        assert len(run.series[f"step.{part}"]) == GAN_EPOCHS
    assert [step for _, step in run.metrics] == list(range(1, GAN_EPOCHS + 1))
    assert run.models == ["model_gan"]
    pair = load_generative(paths, DATASET, "cgan")
    assert isinstance(pair, GanPair) and pair.conditional and pair.num_classes == 3
    # Sampling is reproducible from the seed alone and leaves torch's global RNG untouched.
    state = torch.get_rng_state()
    a, b = draw_samples(pair, 7, seed=3), draw_samples(pair, 7, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    np.testing.assert_array_equal(a, b)
    assert a.shape == (7, 1, SIZE, SIZE) and a.min() >= 0.0 and a.max() <= 1.0


def test_gan_evaluation_has_label_accuracy_and_training_figure(project):
    metrics, _, figures = project["cgan_evaluated"]
    assert {"samples_psi0.5.png", "samples_psi1.png", "training.png", "quality_vs_diversity.png"} <= {
        p.name for p in figures.iterdir()
    }
    assert metrics["kind"] == "gan" and metrics["conditional"] is True
    assert all(math.isfinite(v) for v in _finite_numbers(metrics))
    for scores in metrics["quality"].values():
        assert 0.0 <= scores["label_accuracy"] <= 1.0
    with open(figures / "psi_sweep.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 2


# ---------------------------------------------------------------------------- report
def test_unconditional_gan_rows_and_no_label_accuracy(project):
    metrics, _, figures = project["dcgan_evaluated"]
    assert metrics["conditional"] is False and metrics["epochs_run"] == 1
    assert all("label_accuracy" not in scores for scores in metrics["quality"].values())
    history = json.loads((project["dcgan_trained"]["model_dir"] / "history.json").read_text())
    assert "label_accuracy" not in history[0] and "coverage" in history[0]
    pair = load_generative(project["paths"], DATASET, "dcgan")
    assert isinstance(pair, GanPair) and not pair.conditional


def test_report_section_mentions_every_model_and_missing_ones(project):
    params: Params = project["params"]
    paths: ProjectPaths = project["paths"]
    html = generative_report_section(params, paths)
    for model in ("vae", "cgan", "dcgan", "never_run"):
        assert f"<h4>{model} " in html
    assert "not comparable with Inception FID" in html
    assert 'src="generate/bars/vae/samples_psi1.png"' in html
    assert 'src="generate/bars/cgan/training.png"' in html
    assert "Not run." in html  # never_run
    assert "real floor" in html and "Mode collapse during training" in html
    # Nothing run at all: short lines, no exception.
    empty = generative_report_section(params, ProjectPaths(project["root"] / "elsewhere"))
    assert "Domain classifier: not run." in empty and empty.count("Not run.") == 4
    assert (
        generative_report_section(
            params.model_copy(update={"generate": params.generate.model_copy(update={"datasets": ()})}), paths
        )
        == ""
    )


# ---------------------------------------------------------------------------- resume
def test_rerun_resumes_from_checkpoints_without_training(project, monkeypatch):
    params: Params = project["params"]
    paths: ProjectPaths = project["paths"]
    metrics, _ = train_domain_classifier(params, DATASET, paths)
    assert metrics["resumed_from_epoch"] == CLASSIFIER_EPOCHS
    assert metrics["test_accuracy"] == project["classifier"][0]["test_accuracy"]
    run = RecordingRun()
    again = train_generative(params, DATASET, "vae", paths, run)
    for k in (2, 3):
        assert again["metrics"][f"k{k}.resumed_from_epoch"] == again["metrics"][f"k{k}.epochs_run"]
        assert again["metrics"][f"k{k}.best_val_loss"] == project["vae_trained"]["metrics"][f"k{k}.best_val_loss"]
    assert run.series == {}  # no epoch ran
    # A GAN resumed at its last epoch; a collapse verdict becomes a run tag.
    monkeypatch.setattr(quality, "mode_collapse_flag", lambda history, *a: "mode collapse at epoch 2: test")
    run = RecordingRun()
    gan = train_generative(params, DATASET, "cgan", paths, run)
    assert gan["metrics"]["resumed_from_epoch"] == GAN_EPOCHS and run.series == {}
    assert run.tags == {"latentlab.mode_collapse": "mode collapse at epoch 2: test"}
    assert json.loads((gan["model_dir"] / "meta.json").read_text())["mode_collapse"].startswith("mode collapse")


def test_kinds_are_dispatched_by_spec_type(project):
    params: Params = project["params"]
    assert {type(params.generate.spec(m)) for m in ("vae", "cgan")} == set(KINDS)
    assert {kind.name for kind in KINDS.values()} == {"vae", "gan"}
