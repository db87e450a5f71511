"""The stages on the real MNIST of ../shared/datasets (skipped when it is absent)."""

from __future__ import annotations

import json

import pytest
import yaml

from latentlab import stages
from tests.conftest import SHARED_DATASETS, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.shared_data]

MNIST = SHARED_DATASETS / "mnist"


@pytest.mark.skipif(
    not MNIST.exists(), reason=f"{MNIST} is absent: the real-data integration test needs ../shared/datasets"
)
def test_real_mnist_through_ingest_validate_corrupt_train_evaluate(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tiny_params(tmp_path, {"mnist": {"kind": "mnist", "path": str(MNIST)}})
    params["train"]["zoo"]["pca"]["latent_sizes"] = [2, 4, 6]
    # The linear autoencoder with the default settings, on every training image.
    params["train"]["models"] = ["pca", "linear"]
    params["train"]["zoo"]["linear"]["training"].update(epochs=5, min_steps=0, max_train_samples=None)
    params["evaluate"]["latent"]["models"] = []
    # One corruption keeps the comparison quick on 10,000 test images.
    params["corrupt"].update(salt_pepper_amount=[], mask_fraction=[], block_size=[])
    params["train"]["threads"] = 2
    params["corrupt"]["splits"] = ["test"]
    params["evaluate"]["max_test_samples"] = None  # the published figures are on all 10,000 test images
    params["validate"]["min_samples"] = {"train": 50000, "val": 5900, "test": 10000}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    stages.ingest("mnist", tmp_path)
    manifest = json.loads((tmp_path / "data/processed/mnist/manifest.json").read_text())
    counts = manifest["counts"]
    # 10% of each class for validation, rounded per class.
    assert counts["test"] == 10000 and counts["train"] + counts["val"] == 60000
    assert abs(counts["val"] - 6000) <= 5
    assert manifest["source"]["files"]["train-images-idx3-ubyte.gz"] == (
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"
    )
    stages.validate("mnist", tmp_path)
    stages.corrupt("mnist", tmp_path)
    for model in ("pca", "linear"):
        stages.train("mnist", model, tmp_path)
        stages.evaluate("mnist", model, tmp_path)
    stages.compare("mnist", tmp_path)
    metrics = json.loads((tmp_path / "metrics/mnist/pca.json").read_text())
    # The published PCA figures on full MNIST (fit on 60,000); ours fit on the 54,000 left after validation.
    for k, expected in {"2": 0.0557, "4": 0.0479, "6": 0.0416}.items():
        assert metrics["reconstruction"][k]["mse"] == pytest.approx(expected, abs=0.001)
    # The linear autoencoder learns the PCA subspace: test MSE within 2% of PCA's at every size.
    compare = json.loads((tmp_path / "metrics/compare/mnist.json").read_text())
    ratios = {row["latent_size"]: row["mse_ratio"] for row in compare["linear_vs_pca"]}
    assert set(ratios) == {2, 4, 6}
    assert all(ratio <= 1.02 for ratio in ratios.values()), ratios
    # PCA removes much of the Gaussian noise: restoration beats the noisy input.
    gaussian = compare["denoising"]["gaussian_sigma0.3"]
    assert gaussian["PCA k=6"]["psnr"] > gaussian["noisy input"]["psnr"]


FSDD = SHARED_DATASETS / "fsdd" / "recordings"


@pytest.mark.skipif(
    not FSDD.is_dir(), reason=f"{FSDD} is absent: the real-speech integration test needs ../shared/datasets"
)
def test_linear_autoencoder_learns_the_pca_subspace_of_real_speech(tmp_path, monkeypatch):
    """The default linear settings of params.yaml on real log-mel spectrograms (32 x 32, fewer clips
    than pixels, as in the default pipeline): test MSE within 2% of PCA's at every latent size."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # 6 speakers x 10 digits x recordings 0-9: 300 test clips (0-4, FSDD's split), 300 for train and val.
    recordings = tmp_path / "fsdd"
    recordings.mkdir()
    wavs = [path for path in sorted(FSDD.glob("*.wav")) if int(path.stem.rsplit("_", 1)[1]) < 10]
    assert len(wavs) == 600, f"{FSDD} holds {len(wavs)} of the 600 recordings 0-9"
    for path in wavs:
        (recordings / path.name).symlink_to(path)
    params = tiny_params(tmp_path, {"speech": {"kind": "speech", "path": str(recordings)}})
    params["train"]["models"] = ["pca", "linear"]
    params["train"]["zoo"]["pca"]["latent_sizes"] = [2, 4, 6]
    params["evaluate"]["latent"]["models"] = []
    params["corrupt"].update(audio_noise=["white"], splits=["test"])
    params["train"]["threads"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    stages.ingest("speech", tmp_path)
    stages.validate("speech", tmp_path)
    stages.corrupt("speech", tmp_path)
    for model in ("pca", "linear"):
        stages.train("speech", model, tmp_path)
        stages.evaluate("speech", model, tmp_path)
    pca, linear = (json.loads((tmp_path / f"metrics/speech/{m}.json").read_text()) for m in ("pca", "linear"))
    ratios = {k: linear["reconstruction"][k]["mse"] / pca["reconstruction"][k]["mse"] for k in ("2", "4", "6")}
    assert all(ratio <= 1.02 for ratio in ratios.values()), ratios
