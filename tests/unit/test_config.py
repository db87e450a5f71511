from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from latentlab.config import load_params, parse_params
from latentlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _base() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_parse():
    params = load_params(REPO / "params.yaml")
    assert params.pipeline.datasets == ("mnist", "fashion_mnist", "speech")
    assert params.dataset("speech").n_mels == 32
    assert "sat6" not in params.pipeline.datasets  # no offline source: not a default
    assert params.validate_.class_balance_overrides["sat6"].min_ratio == 0.02


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValidationError):
        params.ingest.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda p: p["ingest"].update(val_fraction=1.5),
            "params.yaml: ingest.val_fraction: Input should be less than 1 (got 1.5)",
        ),
        (
            lambda p: p["ingest"]["datasets"]["speech"].update(n_mel=3),
            "params.yaml: ingest.datasets.speech.n_mel: unknown key",
        ),
        (lambda p: p["corrupt"].update(gausian_sigma=[0.1]), "params.yaml: corrupt.gausian_sigma: unknown key"),
        (
            lambda p: p["train"]["zoo"]["pca"].update(latent_sizes=[0]),
            "params.yaml: train.zoo.pca.latent_sizes.0: Input should be greater than or equal to 1 (got 0)",
        ),
        (lambda p: p["train"]["zoo"]["deep"].update(rho=0.1), "params.yaml: train.zoo.deep.rho: unknown key"),
        (
            lambda p: p["train"]["zoo"]["deep_denoising"]["training"].update(input_noise=-0.1),
            "params.yaml: train.zoo.deep_denoising.training.input_noise: Input should be greater than or equal to 0",
        ),
        (
            lambda p: p["train"].update(models=["pca", "vae"]),
            "model 'vae' is listed in train.models but not defined under train.zoo",
        ),
        (lambda p: p["corrupt"].update(snr_db="loud"), "params.yaml: corrupt.snr_db: Input should be a valid tuple"),
        (
            lambda p: p["pipeline"].update(datasets=["mnist", "nope"]),
            "dataset 'nope' is listed in pipeline.datasets but not defined under ingest.datasets",
        ),
        (
            lambda p: p["ingest"]["datasets"]["speech"].update(fmax=6000),
            "fmax 6000.0 Hz is above the Nyquist frequency 4000.0 Hz",
        ),
        (lambda p: p.update(extra_section={}), "params.yaml: extra_section: unknown key"),
        (
            lambda p: p["train"]["zoo"]["denoising"]["denoise_from"].update(spectrogram=[]),
            "params.yaml: train.zoo.denoising.denoise_from.spectrogram: needs at least one corruption name",
        ),
        (
            lambda p: p["train"]["zoo"]["denoising"]["denoise_from"].update(image=["mask0.5", "mask0.5"]),
            "train.zoo.denoising.denoise_from.image: lists a corruption twice: ['mask0.5', 'mask0.5']",
        ),
        (
            # A variant that changes a noise level must not leave a model learning from a level no longer made.
            lambda p: p["corrupt"].update(gaussian_sigma=[0.5]),
            "params.yaml: train.zoo.denoising.denoise_from.image: no corruption 'gaussian_sigma0.3' "
            "(the corrupt section makes: gaussian_sigma0.5, salt_pepper0.2, mask0.5, block12)",
        ),
        (
            lambda p: p["train"]["zoo"]["denoising"]["denoise_from"].update(spectrogram="pink_snr5db"),
            "train.zoo.denoising.denoise_from.spectrogram: no corruption 'pink_snr5db' "
            "(the corrupt section makes: white_snr5db, babble_snr5db)",
        ),
        (
            lambda p: p["train"]["zoo"]["denoising"].update(spectrogram_loss_weight=-1),
            "params.yaml: train.zoo.denoising.spectrogram_loss_weight: Input should be greater than or equal to 0",
        ),
        (
            lambda p: p["corrupt"].update(mask_fraction=[0.5, 0.5]),
            "params.yaml: corrupt.mask_fraction: level 0.5 is listed twice",
        ),
        (
            lambda p: p["corrupt"].update(audio_train_draws=0),
            "params.yaml: corrupt.audio_train_draws: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            lambda p: p["train"]["zoo"]["denoising"].update(training_by_modality={"spectrogram": {"min_step": 9}}),
            "params.yaml: train.zoo.denoising.training_by_modality.spectrogram.min_step: unknown key",
        ),
        (
            lambda p: p["train"]["zoo"]["denoising"].update(training_by_modality={"audio": {"min_steps": 9}}),
            "params.yaml: train.zoo.denoising.training_by_modality.audio: Input should be 'image' or 'spectrogram'",
        ),
        (
            lambda p: p["train"]["zoo"]["deep"].update(training_by_modality={"image": {"lr": 0}}),
            "params.yaml: train.zoo.deep.training_by_modality.image.lr: Input should be greater than 0 (got 0)",
        ),
    ],
)
def test_bad_params_give_one_line_naming_the_key(mutate, expected):
    raw = _base()
    mutate(raw)
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("pipeline: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_unknown_dataset_lookup_names_known_ones():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ConfigError, match="no dataset named 'cifar'.*fashion_mnist"):
        params.dataset("cifar")


def test_denoise_from_is_checked_only_for_the_models_that_are_trained():
    raw = _base()
    raw["corrupt"]["gaussian_sigma"] = [0.5]
    raw["train"]["models"] = [m for m in raw["train"]["models"] if m != "denoising"]
    params = parse_params(raw)  # denoising still names gaussian_sigma0.3, but nothing trains it
    assert params.train.spec("denoising").corruptions_for("image")[0] == "gaussian_sigma0.3"
    raw["train"]["models"].append("denoising")
    with pytest.raises(ConfigError, match="denoise_from.image: no corruption 'gaussian_sigma0.3'"):
        parse_params(raw)


def test_training_by_modality_replaces_only_its_keys():
    raw = _base()
    raw["train"]["zoo"]["conv"]["training"] = {"epochs": 6, "min_steps": 150, "lr": 0.002, "patience": 3}
    raw["train"]["zoo"]["conv"]["training_by_modality"] = {"spectrogram": {"min_steps": 4000, "patience": None}}
    spec = parse_params(raw).train.spec("conv")
    image, speech = spec.training_for("image"), spec.training_for("spectrogram")
    assert image == spec.training and (image.min_steps, image.patience) == (150, 3)
    assert (speech.min_steps, speech.patience) == (4000, None)
    # Every other key is the model's own `training`.
    assert speech.model_dump(exclude={"min_steps", "patience"}) == image.model_dump(exclude={"min_steps", "patience"})
    assert "training_by_modality" not in spec.family_options()
