"""The model-collapse study end to end on a tiny dataset: VAE and GAN backends, outputs, resuming, the report.

Three classes of 8x8 images, each with its own bright bar, written as a
processed dataset; a small domain classifier built (not trained: the pipeline
needs its features, not its accuracy) and saved where the classifier stage puts
it; networks of a few units trained for one epoch. Everything runs on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from latentlab import collapse_backends as cb
from latentlab.collapse import (
    GenerationResult,
    collapse_pattern,
    collapse_report_section,
    run_collapse,
    run_collapse_pairs,
    summarise,
)
from latentlab.config import GanSpec, Params, VaeSpec, parse_params
from latentlab.models.vae import binarise
from latentlab.paths import ProjectPaths
from latentlab.quality import DomainClassifier, save_classifier
from tests.conftest import write_bar_dataset

REPO = Path(__file__).resolve().parents[2]
DATASET = "tiny"
SIZE = 8
PER_CLASS = {"train": 30, "val": 4, "test": 15}
QUALITY = {"frechet_distance", "precision", "recall", "coverage", "entropy", "entropy_normalised"}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_project(root: Path) -> ProjectPaths:
    """The processed tiny dataset and its domain classifier."""
    paths = ProjectPaths(root)
    folder = paths.processed(DATASET)
    write_bar_dataset(folder, DATASET, PER_CLASS, SIZE)
    torch.manual_seed(0)
    classifier = DomainClassifier(1, 3, (SIZE, SIZE), feature_dim=6, channels=(4, 8)).eval()
    save_classifier(classifier, paths.classifier(DATASET) / "classifier.pt", {"dataset": DATASET})
    return paths


def _params(**collapse: Any) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pipeline"]["datasets"] = [DATASET]
    raw["ingest"]["datasets"] = {DATASET: {"kind": "idx", "path": "unused"}}
    raw["train"]["device"] = "cpu"
    raw["evaluate"]["grid_size"] = 4
    generate = raw["generate"]
    generate["datasets"] = [DATASET]
    generate["models"] = []
    generate["zoo"] = {
        "vae_tiny": {
            "family": "vae_mlp",
            "latent_sizes": [2, 3],
            "hidden": [16],
            "training": {"epochs": 1, "min_steps": 0, "batch_size": 32, "lr": 0.01, "patience": 1},
        },
        "cgan_tiny": {
            "family": "cgan",
            "arch": "mlp",
            "latent_dim": 4,
            "g_hidden": [16],
            "d_hidden": [16],
            "training": {"epochs": 1, "batch_size": 16},
        },
    }
    generate["quality"]["nll_images"] = 20
    raw["collapse"] = {
        "datasets": [DATASET],
        "model": "vae_tiny",
        "latent_size": None,
        "loops": ["replace", "accumulate"],
        "generations": 2,
        "seeds": [0, 1],
        "samples_per_generation": 30,
        "real_size": 30,
        "synthetic_fraction": 0.5,
        "psi": 1.0,
        "healing_generations": 1,
        "eval_samples": 20,
        **collapse,
    }
    return parse_params(raw)


class FitLog(list):
    """(generation, training-set size) of every fit; ``starts``: (generation, weights digest of the
    model it started from) of every fine-tuning fit."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[tuple[int, str]] = []


def _count_fits(monkeypatch: pytest.MonkeyPatch, backend: type) -> FitLog:
    """Record every fit of ``backend`` (see :class:`FitLog`)."""
    calls = FitLog()
    original = backend.fit

    def counted(self, images, labels, *, seed, generation, init=None):
        calls.append((generation, len(images)))
        if init is not None:
            calls.starts.append((generation, cb._weights_digest(init)))
        return original(self, images, labels, seed=seed, generation=generation, init=init)

    monkeypatch.setattr(backend, "fit", counted)
    return calls


def _key(r: dict[str, Any]) -> tuple:
    return (r["loop"], r["seed"], r["phase"], r["generation"])


# ---------------------------------------------------------------------- VAE
def test_vae_study_writes_every_output_and_a_rerun_fits_nothing(tmp_path, monkeypatch):
    paths = _write_project(tmp_path)
    params = _params()
    fits = _count_fits(monkeypatch, cb.VaeBackend)
    seen: list[GenerationResult] = []
    metrics, metrics_path, figures = run_collapse(params, DATASET, paths, on_generation=seen.append)

    # 2 loops x 2 seeds x (generations 0..2 + 1 healing generation), each fitted once.
    assert len(fits) == len(seen) == len(metrics["results"]) == 16
    assert metrics_path == paths.study_metrics("collapse", DATASET) and metrics_path.exists()
    assert json.loads(metrics_path.read_text())["pattern"]["verdict"] == metrics["pattern"]["verdict"]
    rows = metrics["summary"]["rows"]
    expected = {(loop, "loop", g) for loop in ("replace", "accumulate") for g in range(3)}
    expected |= {(loop, "healing", 1) for loop in ("replace", "accumulate")}
    assert {(r["loop"], r["phase"], r["generation"]) for r in rows} == expected
    assert all(r["n_seeds"] == 2 and r["seeds"] == [0, 1] for r in rows)
    assert set(metrics["summary"]["metrics"]) == QUALITY | {"heldout_neg_elbo"}
    for r in metrics["results"]:
        assert r["metrics"]["heldout_neg_elbo"] > 0  # nats per binary image
        assert 0 <= r["metrics"]["precision"] <= 1 and r["metrics"]["frechet_distance"] >= 0
    # Generation 0 trains on the same real data under every loop: the same model and metrics (paired).
    g0 = {(r["loop"], r["seed"]): r["metrics"] for r in metrics["results"] if r["generation"] == 0}
    assert g0[("replace", 0)] == g0[("accumulate", 0)]
    # Healing fine-tunes each loop's own last model (step 3 starts from generation 2's weights, one per
    # loop and seed), so, unlike generation 0, it differs between the loops.
    assert [g for g, _ in fits.starts] == [3, 3, 3, 3] and len({d for _, d in fits.starts}) == 4
    heal = {(r["loop"], r["seed"]): r["metrics"] for r in metrics["results"] if r["phase"] == "healing"}
    assert heal[("replace", 0)] != heal[("accumulate", 0)]
    # accumulate at generation 2: 30 real + 2 x 30 synthetic images.
    acc2 = next(r for r in metrics["results"] if _key(r) == ("accumulate", 0, "loop", 2))
    assert (acc2["n_real"], acc2["n_synthetic"]) == (30, 60)
    assert (2, 90) in fits
    assert set(metrics["relative_change"]) == set(metrics["summary"]["metrics"])
    assert set(metrics["relative_change"]["recall"]) == {"replace", "accumulate"}
    assert metrics["pattern"]["observed"] in (True, False, None)
    assert set(metrics["pattern"]["loops"]) == {"replace", "accumulate"}
    settings = metrics["settings"]
    assert settings["latent_size"] == 3 and settings["n_reference"] == 20 and settings["n_heldout"] == 20
    assert set(settings["real_floor"]) == QUALITY

    # The table: one row per loop x phase x generation x metric.
    table = paths.study_table("collapse", DATASET).read_text().splitlines()
    assert table[0] == "loop,phase,generation,x,metric,mean,std,n_seeds"
    assert len(table) - 1 == len(expected) * len(metrics["summary"]["metrics"])
    # Figures: a plot per metric, a grid per loop, a grid per generation of each loop (first seed).
    assert figures == paths.study_report("collapse", DATASET)
    listing = json.loads((figures / "summary.json").read_text())
    assert set(listing["metrics"]) == set(metrics["summary"]["metrics"])
    assert set(listing["loop_grids"]) == {"replace", "accumulate"}
    assert all(len(names) == 4 for names in listing["generation_grids"].values())
    for name in [
        *listing["metrics"].values(),
        *listing["loop_grids"].values(),
        *listing["generation_grids"]["replace"],
    ]:
        assert (figures / name).read_bytes()[:4] == b"\x89PNG"
    # Fit checkpoints are dropped once a generation is finished; the model healing started from is kept.
    assert not list(paths.collapse_state(DATASET).rglob("fit-*.pt"))
    assert len(list(paths.collapse_state(DATASET).rglob("g0002.model"))) == 4

    # A rerun loads every generation: no fit, identical results, the same figures.
    fits.clear()
    again, _, _ = run_collapse(params, DATASET, paths)
    assert fits == []
    assert again["results"] == metrics["results"]
    assert again["summary"] == metrics["summary"]
    assert set(json.loads((figures / "summary.json").read_text())["loop_grids"]) == {"replace", "accumulate"}

    # The report fragment: the verdict, every loop, figures that exist.
    html = collapse_report_section(params, paths)
    assert "replace" in html and "accumulate" in html and "1 healing (finetune)" in html
    assert metrics["pattern"]["verdict"].split(":")[0] in html
    for src in [part.split('"')[0] for part in html.split('src="')[1:]]:
        assert (paths.reports / src).exists(), src


def test_subset_pairs_then_the_whole_study_loads_what_was_run(tmp_path, monkeypatch):
    paths = _write_project(tmp_path)
    params = _params(seeds=[0], healing_generations=0)
    fits = _count_fits(monkeypatch, cb.VaeBackend)

    # What the Prefect flow runs in parallel: pairs, writing state only.
    first = run_collapse_pairs(params, DATASET, paths, loops=["replace"], seeds=[0])
    assert [(r.loop, r.generation) for r in first] == [("replace", 0), ("replace", 1), ("replace", 2)]
    assert len(fits) == 3
    assert not paths.study_metrics("collapse", DATASET).exists()

    # A subset through run_collapse runs and summarises that subset only.
    fits.clear()
    partial, _, _ = run_collapse(params, DATASET, paths, loops=["accumulate"])
    assert [g for g, _ in fits] == [0, 1, 2]
    assert {r["loop"] for r in partial["results"]} == {"accumulate"}
    assert partial["pattern"]["observed"] is None and "cannot be judged" in partial["pattern"]["verdict"]

    # The whole study afterwards fits nothing: both pairs are loaded, grids included.
    fits.clear()
    whole, _, figures = run_collapse(params, DATASET, paths)
    assert fits == []
    assert {r["loop"] for r in whole["results"]} == {"replace", "accumulate"}
    replace = [r for r in whole["results"] if r["loop"] == "replace"]
    assert [r["metrics"] for r in replace] == [r.metrics for r in first]
    assert (figures / "samples_replace.png").exists()
    assert whole["settings"]["loops"] == ["replace", "accumulate"]

    with pytest.raises(ValueError, match="collapse.loops"):
        run_collapse_pairs(params, DATASET, paths, loops=["fresh"])
    with pytest.raises(ValueError, match="collapse.seeds"):
        run_collapse(params, DATASET, paths, seeds=[7])


def test_more_healing_refits_the_last_one_from_its_saved_start_and_gets_the_same_result(tmp_path, monkeypatch):
    paths = _write_project(tmp_path)
    params = _params(loops=["replace"], seeds=[0], generations=1)
    first = run_collapse_pairs(params, DATASET, paths)
    # Healing 2 needs healing 1's model, which was not kept: healing 1 is refitted, starting from
    # generation 1's weights read back from disk. On the CPU that reproduces it exactly.
    fits = _count_fits(monkeypatch, cb.VaeBackend)
    more = params.model_copy(update={"collapse": params.collapse.model_copy(update={"healing_generations": 2})})
    again = run_collapse_pairs(more, DATASET, paths)
    assert [g for g, _ in fits] == [2, 3] and [g for g, _ in fits.starts] == [2, 3]
    assert [r.metrics for r in again[:3]] == [r.metrics for r in first]
    # A fine-tuned healing generation is not a fresh model on the same data.
    fresh = params.model_copy(update={"collapse": params.collapse.model_copy(update={"healing_start": "fresh"})})
    control = run_collapse_pairs(fresh, DATASET, paths)
    assert control[:2] == first[:2] and control[2].metrics != first[2].metrics


def test_a_changed_backend_setting_gets_its_own_state_folder(tmp_path, monkeypatch):
    paths = _write_project(tmp_path)
    test = np.random.default_rng(0).random((30, 1, SIZE, SIZE), dtype=np.float32)
    a = cb.study_backends(_params(), DATASET, paths, test, 3)
    b = cb.study_backends(_params(), DATASET, paths, test, 3)
    c = cb.study_backends(_params(latent_size=2), DATASET, paths, test, 3)
    assert a.state_dir == b.state_dir != c.state_dir
    assert a.state_dir.parent == paths.collapse_state(DATASET)
    assert isinstance(a.make("replace", 0), cb.VaeBackend)
    # Generations made by other code are not reused either.
    monkeypatch.setattr(cb, "code_digest", lambda: "another version of latentlab")
    assert cb.study_backends(_params(), DATASET, paths, test, 3).state_dir not in (a.state_dir, c.state_dir)


# ---------------------------------------------------------------------- GAN
def test_conditional_gan_study_smoke(tmp_path):
    paths = _write_project(tmp_path)
    params = _params(model="cgan_tiny", loops=["replace"], seeds=[0], generations=1, healing_generations=0)
    metrics, _, figures = run_collapse(params, DATASET, paths)
    assert len(metrics["results"]) == 2
    names = set(metrics["summary"]["metrics"])
    assert names == QUALITY | {"label_accuracy"}  # no held-out likelihood figure for a GAN
    assert metrics["settings"]["family"] == "cgan" and metrics["settings"]["latent_size"] is None
    assert (figures / "samples_replace.png").exists()
    # The samples the next generation trained on carry the classes they were drawn for.
    state = next(paths.collapse_state(DATASET).glob("cgan_tiny-*/replace-seed0-*"))
    with np.load(state / "g0000.npz") as z:
        assert z["images"].shape == (30, 1, SIZE, SIZE) and set(np.unique(z["labels"])) <= {0, 1, 2}


def test_unconditional_gan_backend_ignores_labels_and_draws_unlabelled_samples(tmp_path):
    paths = _write_project(tmp_path)
    params = _params()
    test = np.random.default_rng(1).random((30, 1, SIZE, SIZE), dtype=np.float32)
    context = cb.study_backends(params, DATASET, paths, test, 3).context
    spec = GanSpec(family="gan", latent_dim=4, g_hidden=(8,), d_hidden=(8,), training={"epochs": 1, "batch_size": 8})
    backend = cb.build_backend(spec, context)
    assert isinstance(backend, cb.GanBackend)
    images = test[:24]
    model = backend.fit(images, np.zeros(24, np.int64), seed=3, generation=0)
    x, y = backend.sample(model, 20, psi=0.5, seed=4)
    assert y is None and x.shape == (20, 1, SIZE, SIZE) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    again, _ = backend.sample(model, 20, psi=0.5, seed=4)
    np.testing.assert_array_equal(x, again)
    assert set(backend.evaluate(model, x, y, generation=0)) == QUALITY


def test_registry_picks_the_backend_by_spec_type(tmp_path):
    paths = _write_project(tmp_path)
    test = np.random.default_rng(2).random((30, 1, SIZE, SIZE), dtype=np.float32)
    context = cb.study_backends(_params(), DATASET, paths, test, 3).context
    vae = cb.build_backend(VaeSpec(family="vae_mlp", latent_sizes=(2,), hidden=(8,)), context)
    assert isinstance(vae, cb.VaeBackend)
    # The Bernoulli decoder's held-out set is binarised once, with a fixed seed.
    assert set(np.unique(vae.heldout)) <= {0.0, 1.0}
    np.testing.assert_array_equal(vae.heldout, binarise(context.heldout, cb.HELDOUT_SEED))
    with pytest.raises(TypeError, match="no collapse backend"):
        cb.build_backend(object(), context)


# ------------------------------------------------------------------ verdict
def _results(changes: dict[str, dict[str, float]], generations: int = 3) -> list[GenerationResult]:
    """Two seeds per loop; each metric moves linearly to (1 + change) x its generation-0 value."""
    base = {"precision": 0.8, "recall": 0.6, "coverage": 1.0, "frechet_distance": 10.0}
    out = []
    for loop, change in changes.items():
        for seed in (0, 1):
            for g in range(generations + 1):
                m = {k: v * (1 + change.get(k, 0.0) * g / generations) + 1e-3 * seed for k, v in base.items()}
                out.append(GenerationResult(loop, seed, g, "loop", 10, 0, m, 0.0))
    return out


def test_collapse_pattern_verdicts():
    observed = collapse_pattern(
        summarise(_results({"replace": {"recall": -0.5, "frechet_distance": 1.0}, "accumulate": {"recall": -0.05}}))
    )
    assert observed["observed"] is True
    assert observed["verdict"].startswith("Collapse pattern observed")
    assert observed["loops"]["replace"]["fell"] == ["recall", "frechet_distance"]
    assert observed["loops"]["accumulate"]["status"] == "held"

    # Improvements never count against a loop; a stable loop that degrades breaks the pattern.
    broken = collapse_pattern(
        summarise(
            _results(
                {
                    "replace": {"coverage": -0.3, "recall": -0.3},
                    "fresh": {"precision": 0.2, "frechet_distance": 0.4, "coverage": -0.3},
                }
            )
        )
    )
    assert broken["observed"] is False
    assert "under fresh" in broken["verdict"] and "Fréchet distance +40 %" in broken["verdict"]
    # One fallen metric of four does not make a stable loop degrade (noise); two of four do.
    one_of_four = collapse_pattern(
        summarise(_results({"replace": {"coverage": -0.3, "recall": -0.3}, "fresh": {"precision": -0.2}}))
    )
    assert one_of_four["observed"] is True and one_of_four["loops"]["fresh"]["fell"] == ["precision"]

    no_drop = collapse_pattern(summarise(_results({"replace": {"recall": -0.05}, "accumulate": {}})))
    assert no_drop["observed"] is False and "did not fall" in no_drop["verdict"]

    alone = collapse_pattern(summarise(_results({"replace": {"recall": -0.5, "coverage": -0.5}, "augment": {}})))
    assert alone["observed"] is None and "cannot be judged" in alone["verdict"]
    assert alone["loops"]["augment"]["status"] == "held"


def test_collapse_pattern_skips_near_zero_shares():
    # Recall 0.01 at generation 0 halving is noise, not collapse: not judged; three metrics remain.
    results = _results({"replace": {"coverage": -0.5, "frechet_distance": 1.0}, "accumulate": {"recall": -0.9}})
    for r in results:
        r.metrics["recall"] *= 0.01 / 0.6
    verdict = collapse_pattern(summarise(results))
    assert "recall" not in verdict["loops"]["accumulate"]["judged"]
    assert verdict["loops"]["accumulate"]["status"] == "held" and verdict["observed"] is True


def test_report_section_without_results_says_not_run(tmp_path):
    html = collapse_report_section(_params(), ProjectPaths(tmp_path))
    assert "not run on tiny" in html and "<img" not in html


@pytest.mark.parametrize("family", ["gan", "vae"])
def test_backend_fine_tunes_a_copy_and_round_trips_its_model(tmp_path, family):
    paths = _write_project(tmp_path)
    test = np.random.default_rng(1).random((30, 1, SIZE, SIZE), dtype=np.float32)
    context = cb.study_backends(_params(), DATASET, paths, test, 3).context
    if family == "gan":
        spec: Any = GanSpec(
            family="gan", latent_dim=4, g_hidden=(8,), d_hidden=(8,), training={"epochs": 1, "batch_size": 8}
        )
    else:
        spec = VaeSpec(
            family="vae_mlp", latent_sizes=(2,), hidden=(8,), training={"epochs": 1, "min_steps": 0, "batch_size": 8}
        )
    backend = cb.build_backend(spec, context)
    first = backend.fit(test[:24], None, seed=3, generation=0)
    before = cb._weights_digest(first)
    tuned = backend.fit(test[6:], None, seed=5, generation=1, init=first)
    assert cb._weights_digest(first) == before  # the starting model is not changed in place
    assert tuned is not first and cb._weights_digest(tuned) != before
    # A fine-tuning fit's checkpoint is named by its start: a killed one never resumes another's.
    names = {cb._checkpoint(tmp_path, 1), cb._checkpoint(tmp_path, 1, first), cb._checkpoint(tmp_path, 1, tuned)}
    assert len(names) == 3
    # Saved and loaded, the model draws the same samples.
    backend.save_model(tuned, tmp_path / "m.model")
    loaded = backend.load_model(tmp_path / "m.model")
    assert cb._weights_digest(loaded) == cb._weights_digest(tuned)
    np.testing.assert_array_equal(
        backend.sample(loaded, 5, psi=1.0, seed=9)[0], backend.sample(tuned, 5, psi=1.0, seed=9)[0]
    )
