"""One-class anomaly detection and the sparse-autoencoder sweep, end to end on a tiny dataset.

Three classes of 8x8 images, each with its own bright bar (a row, a column, the
diagonal) over faint noise: a model trained on one class reconstructs the others
badly, so AUROC is near 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from latentlab.anomaly import run_anomaly
from latentlab.config import Params, parse_params
from latentlab.data.store import load_split, to_unit_float
from latentlab.paths import ProjectPaths
from latentlab.sparsity import lifetime_sparsity, run_sparsity, setting_key
from tests.conftest import write_bar_dataset

REPO = Path(__file__).resolve().parents[2]
DATASET = "tiny"
SIZE = 8
PER_CLASS = {"train": 60, "val": 15, "test": 30}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_dataset(root: Path) -> ProjectPaths:
    paths = ProjectPaths(root)
    write_bar_dataset(paths.processed(DATASET), DATASET, PER_CLASS, SIZE)
    return paths


def _params(model: str = "conv_plus") -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pipeline"]["datasets"] = [DATASET]
    raw["generate"]["datasets"] = []
    raw["collapse"]["datasets"] = []
    raw["ingest"]["datasets"] = {DATASET: {"kind": "idx", "path": "unused"}}
    raw["train"]["device"] = "cpu"
    raw["train"]["zoo"]["conv_plus"]["channels"] = [8, 16]
    small = {"epochs": 3, "batch_size": 32, "lr": 0.01, "max_train_samples": 60}
    raw["evaluate"]["anomaly"] = {
        "datasets": [DATASET],
        "model": model,
        "latent_size": 4,
        "threshold_percentile": 90.0,
        "max_test_samples": 60,
        "training": small,
    }
    raw["evaluate"]["sparsity"] = {
        "datasets": [DATASET],
        "latent_size": 16,
        "rho": [0.05, 0.5],
        "beta": [0, 1],
        "training": {**small, "epochs": 5, "max_train_samples": 180},
    }
    return parse_params(raw)


def _no_temporaries(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or p.name.endswith(".old"))]
    assert leftovers == []


def _best_one_class_model(paths: ProjectPaths, label: int, params: Params) -> torch.nn.Module:
    """The one-class model of ``label`` with the best weights its checkpoint saved, in eval mode."""
    from latentlab.models.base import build_model

    cfg = params.evaluate.anomaly
    spec = params.train.spec(cfg.model)
    state = torch.load(paths.anomaly_checkpoint(DATASET, label), weights_only=False)
    model = build_model(spec.family, (1, SIZE, SIZE), cfg.latent_size, **spec.family_options())
    model.load_state_dict(state["best_model"])
    model.eval()
    return model


def _normal_val_scores(paths: ProjectPaths, label: int, params: Params) -> np.ndarray:
    """Per-image MSE of the class's validation images under the saved best weights, recomputed here."""
    model = _best_one_class_model(paths, label, params)
    val = load_split(paths.processed(DATASET), "val")
    x = to_unit_float(val.x[val.y == label])
    with torch.no_grad():
        recon = model.reconstruct(torch.from_numpy(x)).numpy()
    return ((recon.astype(np.float64) - x) ** 2).reshape(len(x), -1).mean(axis=1)


def test_anomaly_end_to_end_deterministic_and_resumable(tmp_path: Path) -> None:
    params = _params()
    paths = _write_dataset(tmp_path / "a")
    logged: list[tuple[dict[str, float], int]] = []
    result, metrics_path, figures = run_anomaly(params, DATASET, paths, log=lambda d, s: logged.append((d, s)))

    # Files: DVC metrics, DVC plot table, figures and the report's summary.
    assert metrics_path == paths.study_metrics("anomaly", DATASET)
    assert json.loads(metrics_path.read_text()) == json.loads(json.dumps(result))
    table = paths.study_table("anomaly", DATASET).read_text().splitlines()
    assert table[0] == "class,auroc,auprc,f1" and len(table) == 4
    for name in ("roc.png", "scores.png", "summary.json"):
        assert (figures / name).stat().st_size > 0
    summary = json.loads((figures / "summary.json").read_text())
    assert [row["class"] for row in summary["rows"]] == ["row", "column", "diagonal"]
    assert summary["figures"] == {"roc": "roc.png", "scores": "scores.png"}
    for label in range(3):
        assert paths.anomaly_checkpoint(DATASET, label).exists()

    # Metrics: easy data, a mean that is the mean, a threshold that is the percentile.
    per_class = result["per_class"]
    assert list(per_class) == ["row", "column", "diagonal"]
    for label, (_name, cls) in enumerate(per_class.items()):
        assert cls["auroc"] > 0.9 and cls["auprc"] > 0.9
        for key in ("precision", "recall", "f1", "false_positive_rate"):
            assert 0.0 <= cls[key] <= 1.0
        assert cls["n_train"] == 60 and cls["n_test_normal"] + cls["n_test_anomalous"] == 60
        expected = np.percentile(_normal_val_scores(paths, label, params), 90.0)
        assert cls["threshold"] == pytest.approx(expected, rel=1e-5)
    assert result["mean_auroc"] == pytest.approx(np.mean([c["auroc"] for c in per_class.values()]))
    assert result["mean_auprc"] == pytest.approx(np.mean([c["auprc"] for c in per_class.values()]))
    assert [step for _, step in logged] == [0, 1, 2]
    assert logged[1][0]["auroc"] == per_class["column"]["auroc"] and "train_seconds" in logged[1][0]

    # Resume: outputs gone, checkpoints kept -> no training, identical metrics.
    metrics_path.unlink()
    shutil.rmtree(figures)
    again, _, _ = run_anomaly(params, DATASET, paths)
    assert again == result
    assert (figures / "roc.png").exists()

    # Determinism: a fresh project (no checkpoints) gives identical metrics.
    fresh_paths = _write_dataset(tmp_path / "b")
    fresh, _, _ = run_anomaly(params, DATASET, fresh_paths)
    assert fresh == result
    _no_temporaries(tmp_path)


def test_anomaly_with_pca(tmp_path: Path) -> None:
    paths = _write_dataset(tmp_path)
    result, _, _ = run_anomaly(_params("pca"), DATASET, paths)
    assert result["family"] == "pca"
    assert all(cls["auroc"] > 0.9 for cls in result["per_class"].values())
    assert not (tmp_path / "checkpoints").exists()


def test_anomaly_with_a_vae_scores_by_negative_elbo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentlab import engine

    paths = _write_dataset(tmp_path)
    raw = _params().model_dump(mode="json", by_alias=True)
    raw["generate"]["models"] = []
    raw["generate"]["zoo"] = {"vae_anomaly": {"family": "vae_mlp", "hidden": [32], "latent_sizes": [4]}}
    raw["evaluate"]["anomaly"]["model"] = "vae_anomaly"
    params = parse_params(raw)
    validated_on: list[np.ndarray] = []
    fit = engine.fit

    def spy(model: Any, train: Any, val: Any, *args: Any, **kwargs: Any) -> Any:
        validated_on.append(val.inputs)
        return fit(model, train, val, *args, **kwargs)

    monkeypatch.setattr(engine, "fit", spy)
    result, _, _ = run_anomaly(params, DATASET, paths)
    # Early stopping watched binary validation images (one fixed binarisation), as the score is measured.
    assert len(validated_on) == len(result["per_class"])
    assert all(set(np.unique(v)) == {0.0, 1.0} for v in validated_on)
    assert result["family"] == "vae_mlp"
    assert result["score"] == "negative ELBO (nats)"
    assert all(cls["auroc"] > 0.9 for cls in result["per_class"].values())
    # The threshold is a percentile of negative ELBOs: nats per image, far above any per-pixel MSE.
    assert all(cls["threshold"] > 1.0 for cls in result["per_class"].values())


def test_combine_terms_standardises_each_term_on_normal_validation_and_sums() -> None:
    from latentlab.anomaly import combine_terms

    one = {"reconstruction": (np.array([1.0, 2.0]), np.array([5.0]))}
    assert combine_terms(one) == one["reconstruction"]  # one term: the score itself

    # reconstruction: validation mean 2, std 1; latent: validation mean 10, std 5 (population std).
    terms = {
        "reconstruction": (np.array([1.0, 3.0]), np.array([2.0, 6.0])),
        "latent": (np.array([5.0, 15.0]), np.array([10.0, 0.0])),
        "constant": (np.array([4.0, 4.0]), np.array([4.0, 7.0])),  # std 0: only centred
    }
    val, test = combine_terms(terms)
    np.testing.assert_allclose(val, [-1.0 - 1.0 + 0.0, 1.0 + 1.0 + 0.0])
    np.testing.assert_allclose(test, [0.0 + 0.0 + 0.0, 4.0 - 2.0 + 3.0])


def _combined_val_scores(paths: ProjectPaths, label: int, params: Params) -> np.ndarray:
    """1 - SSIM and the Ledoit-Wolf Mahalanobis distance of the class's validation images, standardised
    on themselves and summed, recomputed here from the saved best weights and the training codes."""
    from skimage.metrics import structural_similarity
    from sklearn.covariance import LedoitWolf

    model = _best_one_class_model(paths, label, params)
    train, val = (load_split(paths.processed(DATASET), s) for s in ("train", "val"))
    x_train = to_unit_float(train.x[train.y == label])
    x = to_unit_float(val.x[val.y == label])
    with torch.no_grad():
        recon = model.reconstruct(torch.from_numpy(x)).numpy()
        codes_train = model.encode(torch.from_numpy(x_train)).double().numpy()
        codes = model.encode(torch.from_numpy(x)).double().numpy()
    # The window of an 8x8 image is 7 px (the largest odd size that fits), Gaussian weights of std 1.5.
    dissimilarity = np.array(
        [
            1.0
            - structural_similarity(
                a[0], b[0], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, win_size=7
            )
            for a, b in zip(x, recon, strict=True)
        ]
    )
    centred = codes - LedoitWolf().fit(codes_train).location_
    precision = LedoitWolf().fit(codes_train).precision_
    distance = np.einsum("ni,ij,nj->n", centred, precision, centred)
    return sum((t - t.mean()) / t.std() for t in (dissimilarity, distance))


def test_anomaly_scored_by_ssim_and_latent_density(tmp_path: Path) -> None:
    raw = _params("deep").model_dump(mode="json", by_alias=True)
    raw["evaluate"]["anomaly"].update(reconstruction_error="ssim", latent_density=True)
    params = parse_params(raw)
    paths = _write_dataset(tmp_path)
    result, _, figures = run_anomaly(params, DATASET, paths)

    assert result["reconstruction_error"] == "ssim" and result["latent_density"] is True
    assert result["score"] == (
        "standardised structural dissimilarity 1 - SSIM + standardised squared Mahalanobis distance of the code"
    )
    for label, cls in enumerate(result["per_class"].values()):
        assert cls["auroc"] > 0.9
        # Each term's own AUROC is reported beside the sum's.
        assert 0.0 <= cls["auroc_reconstruction"] <= 1.0 and 0.0 <= cls["auroc_latent"] <= 1.0
        # The threshold is the percentile of the combined normal validation scores, recomputed by hand.
        expected = np.percentile(_combined_val_scores(paths, label, params), 90.0)
        assert cls["threshold"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert (figures / "scores.png").stat().st_size > 0


def test_histogram_bins_span_the_scores_on_a_log_or_an_even_scale() -> None:
    from latentlab.anomaly import histogram_bins

    errors = np.array([0.01, 0.1, 1.0])
    log_bins = histogram_bins(errors, log_scale=True, n_bins=2)
    np.testing.assert_allclose(log_bins, [0.01, 0.1, 1.0])
    # A standardised sum has negative scores: even bins from its minimum, nothing clipped.
    np.testing.assert_allclose(histogram_bins(np.array([-2.0, 0.0, 2.0]), log_scale=False, n_bins=4), [-2, -1, 0, 1, 2])
    assert histogram_bins(np.array([3.0, 3.0]), log_scale=True, n_bins=1)[1] > 3.0  # a constant score gets a width


def test_a_vae_refuses_scores_made_for_autoencoders_before_training(tmp_path: Path) -> None:
    from latentlab.errors import ConfigError

    paths = _write_dataset(tmp_path)
    raw = _params().model_dump(mode="json", by_alias=True)
    raw["generate"]["models"] = []
    raw["generate"]["zoo"] = {"vae_anomaly": {"family": "vae_mlp", "hidden": [32], "latent_sizes": [4]}}
    raw["evaluate"]["anomaly"].update(model="vae_anomaly", latent_density=True)
    with pytest.raises(ConfigError, match="evaluate.anomaly: 'vae_anomaly' is a VAE.*latent_density"):
        run_anomaly(parse_params(raw), DATASET, paths)
    assert not (tmp_path / "checkpoints").exists()


def test_anomaly_model_must_be_an_autoencoder_or_a_vae() -> None:
    from latentlab.anomaly import anomaly_spec
    from latentlab.errors import ConfigError

    raw = _params().model_dump(mode="json", by_alias=True)
    raw["generate"]["models"] = []
    raw["generate"]["zoo"] = {"gan": {"family": "gan"}}
    raw["evaluate"]["anomaly"]["model"] = "gan"
    with pytest.raises(ConfigError, match="evaluate.anomaly.model"):
        anomaly_spec(parse_params(raw))


def test_sparsity_sweep(tmp_path: Path) -> None:
    params = _params()
    paths = _write_dataset(tmp_path)
    logged: list[int] = []
    result, metrics_path, figures = run_sparsity(params, DATASET, paths, log=lambda d, s: logged.append(s))

    keys = ["rho0.05_beta0", "rho0.05_beta1", "rho0.5_beta0", "rho0.5_beta1"]
    assert list(result) == keys and logged == [0, 1, 2, 3]
    assert json.loads(metrics_path.read_text()) == json.loads(json.dumps(result))
    assert paths.study_table("sparsity", DATASET).read_text().splitlines()[0].startswith("rho,beta,mean_activation")
    for name in ("activations.png", "mean_activation.png", "summary.json"):
        assert (figures / name).stat().st_size > 0
    summary = json.loads((figures / "summary.json").read_text())
    assert len(summary["rows"]) == 4 and len(summary["rho_hat"]["rho0.05_beta1"]) == 16
    for key in keys:
        assert paths.sparsity_checkpoint(DATASET, result[key]["rho"], result[key]["beta"]).exists()
        entry = result[key]
        for stat in ("mean_activation", "low_activation_fraction", "lifetime_sparsity"):
            assert 0.0 <= entry[stat] <= 1.0
        assert entry["test_mse"] > 0 and entry["kl"] >= 0
        assert entry["penalty"] == pytest.approx(entry["beta"] * entry["kl"])
        # The overall mean is the mean of the per-unit means.
        assert entry["mean_activation"] == pytest.approx(np.mean(summary["rho_hat"][key]))

    # The KL penalty pulls the mean activation down towards rho = 0.05.
    sparse, free = result[setting_key(0.05, 1.0)], result[setting_key(0.05, 0.0)]
    assert sparse["mean_activation"] < 0.5 * free["mean_activation"]
    assert sparse["kl"] < free["kl"]
    assert sparse["low_activation_fraction"] > free["low_activation_fraction"]
    _no_temporaries(tmp_path)


def test_lifetime_sparsity_known_values() -> None:
    codes = np.zeros((4, 3))
    codes[:, 0] = 0.5  # responds equally to everything: 0
    codes[2, 1] = 0.9  # responds to one sample only: 1
    # Unit 2 is silent: counted as maximally sparse.
    assert lifetime_sparsity(codes) == pytest.approx([0.0, 1.0, 1.0])
    two_of_four = np.array([[1.0], [1.0], [0.0], [0.0]])  # (1 - 0.25 / 0.5) / (1 - 1/4) = 2/3
    assert lifetime_sparsity(two_of_four) == pytest.approx([2 / 3])
