"""Sample-quality metrics: Fréchet distance, precision/recall, coverage, and the domain classifier."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentlab import quality
from latentlab.quality import ClassifierConfig

torch.set_num_threads(1)
CPU = torch.device("cpu")


# ------------------------------------------------------------ Fréchet distance
def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 3.0, -2.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    # ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) = 5 + (1 + 1 + 0) = 7
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))
    assert expected == pytest.approx(7.0)
    assert quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    assert quality.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    ab, ba = quality.frechet_distance(mu1, s1, mu2, s2), quality.frechet_distance(mu2, s2, mu1, s1)
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-8)


def test_frechet_distance_of_a_singular_covariance_is_finite():
    # A feature that never varies makes both covariances (and their product) singular.
    value = quality.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([4.0, 0.0]))
    assert value == pytest.approx(1.0 + 4.0 - 2 * 2.0, abs=1e-5)
    # A product with no square root at all ([[0, 1], [0, 0]]) falls back to eps * I and stays finite.
    s1, s2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    assert math.isfinite(quality.frechet_distance(np.zeros(2), s1, np.zeros(2), s2))


def test_frechet_distance_of_features_shifted_by_a_constant_is_the_squared_shift():
    f = np.random.default_rng(1).normal(size=(200, 4))
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert quality.frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-8)
    assert quality.frechet_distance_features(f, f + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        quality.frechet_distance_features(f[:1], f)


# ---------------------------------------------------------- precision / recall
SQUARE = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
REAL = np.concatenate([SQUARE, SQUARE + [100.0, 0.0]])  # two unit squares far apart


def test_knn_radii_exclude_the_sample_itself():
    # Each corner of a unit square: neighbours at 1, 1, sqrt(2).
    np.testing.assert_allclose(quality.knn_radii(SQUARE, 1), np.ones(4))
    np.testing.assert_allclose(quality.knn_radii(SQUARE, 3), np.full(4, math.sqrt(2)))
    with pytest.raises(ValueError, match="k must be"):
        quality.knn_radii(SQUARE, 4)


def test_precision_recall_of_identical_and_far_apart_sets():
    assert quality.precision_recall(REAL, REAL, k=3) == (1.0, 1.0)
    assert quality.precision_recall(REAL, REAL + 1000.0, k=3) == (0.0, 0.0)


def test_precision_recall_of_a_fake_set_covering_one_of_two_clusters():
    # Fakes are exactly the first square: all real (precision 1), half the real data covered (recall 0.5).
    assert quality.precision_recall(REAL, SQUARE, k=3) == (1.0, 0.5)
    # Replace one fake by an outlier at (40, 60): 3 of 4 fakes are real-looking; its huge ball
    # (radius 72.1) and those of the others (71.3 to 72.1) still miss the far square (84 or more away).
    fake = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [40.0, 60.0]])
    assert quality.precision_recall(REAL, fake, k=3) == (0.75, 0.5)


def test_precision_recall_blocks_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(60, 3)), rng.normal(0.5, 1.0, size=(50, 3))
    whole = quality.precision_recall(real, fake, k=3)
    monkeypatch.setattr(quality, "_CDIST_BLOCK", 7)  # one or two rows per block
    assert quality.precision_recall(real, fake, k=3) == whole
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0


# ------------------------------------------------------------- mode coverage
def test_coverage_and_entropy_of_known_label_sets():
    uniform = np.repeat(np.arange(10), 7)
    one = np.full(50, 3)
    assert quality.label_entropy(uniform, 10) == pytest.approx(math.log(10))
    assert quality.label_entropy(uniform, 10, normalised=True) == pytest.approx(1.0)
    assert quality.class_coverage(uniform, 10) == 1.0
    assert quality.label_entropy(one, 10) == 0.0
    assert quality.class_coverage(one, 10) == pytest.approx(0.1)
    # Two classes half each: log 2 nats; classes 0 and 1 of 4 covered.
    half = np.array([0, 1] * 10)
    assert quality.label_entropy(half, 4) == pytest.approx(math.log(2))
    assert quality.class_coverage(half, 4) == 0.5


def test_coverage_min_fraction_of_the_uniform_share():
    # Shares over 4 classes: 0.40, 0.40, 0.15, 0.05; uniform share 0.25.
    labels = np.array([0] * 8 + [1] * 8 + [2] * 3 + [3] * 1)
    assert quality.class_coverage(labels, 4, min_fraction=0.5) == 0.75  # needs 0.125: classes 0, 1, 2
    assert quality.class_coverage(labels, 4, min_fraction=0.6) == 0.75  # needs 0.15: 2 is on the edge -> in
    assert quality.class_coverage(labels, 4, min_fraction=0.7) == 0.5  # needs 0.175: classes 0, 1
    assert quality.class_coverage(labels, 4, min_fraction=0.2) == 1.0  # needs 0.05: all four


def test_probabilities_give_the_mean_predicted_distribution():
    probs = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(quality.class_histogram(probs, 3), [0.5, 0.5, 0.0])
    assert quality.label_entropy(probs, 3) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="out of range"):
        quality.class_histogram(np.array([0, 5]), 3)


def test_mode_collapse_flag_uses_the_running_maximum():
    rows = [
        {"epoch": 1, "coverage": 0.3, "entropy_normalised": 0.5},  # a slow start is not collapse
        {"epoch": 2, "coverage": 1.0, "entropy_normalised": 0.96},
        {"epoch": 3, "coverage": 0.9, "entropy_normalised": 0.93},  # drops of 0.1 and 0.03: fine
    ]
    assert quality.mode_collapse_flag(rows) is False
    assert quality.mode_collapse_flag([]) is False
    coverage_lost = [*rows, {"epoch": 4, "coverage": 0.7, "entropy_normalised": 0.9}]
    flag = quality.mode_collapse_flag(coverage_lost)
    assert isinstance(flag, str) and "epoch 4" in flag and "coverage" in flag
    entropy_lost = [*rows, {"epoch": 4, "coverage": 0.9, "entropy_normalised": 0.80}]
    flag = quality.mode_collapse_flag(entropy_lost)
    assert isinstance(flag, str) and "epoch 4" in flag and "entropy" in flag
    # Exactly the allowed drop counts (1.0 - 0.8 is 0.19999... in floats); a recovery does not clear it.
    edge = [*rows, {"coverage": 0.8, "entropy_normalised": 0.96}, {"coverage": 1.0, "entropy_normalised": 0.96}]
    assert "row 3" in quality.mode_collapse_flag(edge)
    assert quality.mode_collapse_flag(coverage_lost, coverage_drop=0.5) is False
    with pytest.raises(ValueError, match="entropy_normalised"):
        quality.mode_collapse_flag([{"coverage": 1.0}])


# ----------------------------------------------------------------- classifier
def _patterns(n_per_class: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of equal mean brightness: a horizontal bar, a vertical bar, a diagonal; plus noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros((3, size, size), np.float32)
    base[0, size // 2 - 2 : size // 2 + 2, 4:-4] = 1.0
    base[1, 4:-4, size // 2 - 2 : size // 2 + 2] = 1.0
    idx = np.arange(4, size - 4)
    for d in range(-2, 2):
        base[2, idx, np.clip(idx + d, 0, size - 1)] = 1.0
    y = np.repeat(np.arange(3), n_per_class)
    x = base[y][:, None] + 0.15 * rng.normal(size=(len(y), 1, size, size))
    return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int64)


X_TRAIN, Y_TRAIN = _patterns(16, 0)
X_VAL, Y_VAL = _patterns(8, 1)
SMALL = ClassifierConfig(epochs=2, batch_size=16, lr=3e-3, augment_shift=2)


def _train(cfg: ClassifierConfig = SMALL, seed: int = 0, **kwargs):
    return quality.train_classifier(X_TRAIN, Y_TRAIN, X_VAL, Y_VAL, cfg, seed=seed, device=CPU, **kwargs)


@pytest.fixture(scope="module")
def trained():
    return _train()


def test_classifier_learns_a_separable_task_and_reports_history(trained):
    model, history = trained
    assert quality.accuracy(model, X_VAL, Y_VAL, CPU) == 1.0
    assert history["epoch"] == [1, 2] and len(history["train_loss"]) == 2
    assert history["best_val_accuracy"] == 1.0 and history["train_samples"] == 48
    assert history["val_accuracy"][history["best_epoch"] - 1] == 1.0
    assert history["lr"][0] == pytest.approx(3e-3) and history["lr"][1] < history["lr"][0]  # cosine
    assert not model.training


def test_feature_and_probability_shapes(trained):
    model, _ = trained
    feats = quality.extract_features(model, X_VAL, CPU, batch_size=5)  # batches of 5 agree with one batch
    assert feats.shape == (24, 128) and feats.dtype == np.float64 and (feats >= 0).all()  # after ReLU
    np.testing.assert_allclose(feats, quality.extract_features(model, X_VAL, CPU), rtol=1e-5, atol=1e-6)
    probs = quality.predict_proba(model, X_VAL, CPU)
    assert probs.shape == (24, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    rgb = quality.DomainClassifier(in_channels=3, num_classes=5, image_size=(32, 24))
    assert rgb(torch.zeros(2, 3, 32, 24)).shape == (2, 5) and rgb.features(torch.zeros(2, 3, 32, 24)).shape == (2, 128)


def test_shift_batch_moves_each_image_by_its_offset():
    x = torch.zeros(2, 1, 5, 5)
    x[:, 0, 2, 2] = 1.0
    out = quality.shift_batch(x, torch.tensor([[2, 2], [0, 4]]), max_shift=2)  # no move; down 2 and left 2
    assert out[0, 0, 2, 2] == 1.0 and out[0].sum() == 1.0
    assert out[1, 0, 4, 0] == 1.0 and out[1].sum() == 1.0
    clipped = quality.shift_batch(x, torch.tensor([[0, 0], [4, 4]]), max_shift=3)
    assert clipped.shape == x.shape


def test_training_is_deterministic_for_a_seed():
    (a, ha), (b, hb) = _train(SMALL.model_copy(update={"epochs": 1})), _train(SMALL.model_copy(update={"epochs": 1}))
    assert ha["train_loss"] == hb["train_loss"]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    _, hc = _train(SMALL.model_copy(update={"epochs": 1}), seed=1)
    assert hc["train_loss"] != ha["train_loss"]


def test_max_train_samples_keeps_a_seeded_subset():
    _, history = _train(SMALL.model_copy(update={"epochs": 1, "max_train_samples": 20}))
    assert history["train_samples"] == 20


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, trained):
    ckpt = tmp_path / "classifier.ckpt"
    save = quality._save_checkpoint

    def save_then_die(path, state):
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(quality, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(checkpoint=ckpt)
    monkeypatch.setattr(quality, "_save_checkpoint", save)
    resumed, history = _train(checkpoint=ckpt)
    assert history["resumed_from_epoch"] == 1 and history["epoch"] == [1, 2]
    full, full_history = trained
    assert history["train_loss"] == full_history["train_loss"]
    for (name, pa), pb in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert _train(checkpoint=ckpt)[1]["resumed_from_epoch"] == 2  # finished: reused as it is
    # Other code does not resume from this checkpoint, nor does another seed.
    with monkeypatch.context() as patch:
        patch.setattr(quality, "code_digest", lambda: "another version of latentlab")
        assert _train(checkpoint=ckpt)[1]["resumed_from_epoch"] == 0
    assert _train(SMALL.model_copy(update={"epochs": 1}), seed=3, checkpoint=ckpt)[1]["resumed_from_epoch"] == 0


def test_save_load_round_trip_gives_identical_logits(tmp_path, trained):
    model, history = trained
    path = tmp_path / "sub" / "classifier.pt"
    quality.save_classifier(model, path, {"dataset": "toy", "val_accuracy": history["best_val_accuracy"]})
    loaded, meta = quality.load_classifier(path, CPU)
    assert meta == {"dataset": "toy", "val_accuracy": 1.0}
    assert [p.name for p in path.parent.iterdir()] == ["classifier.pt"]  # no temporary file left
    with torch.no_grad():
        x = torch.from_numpy(X_VAL)
        assert torch.equal(model(x), loaded(x))
    from latentlab.errors import DataError

    with pytest.raises(DataError, match="missing"):
        quality.load_classifier(tmp_path / "nope.pt")


def test_train_classifier_rejects_bad_labels():
    with pytest.raises(ValueError, match="out of range"):
        quality.train_classifier(X_TRAIN, Y_TRAIN, X_VAL, Y_VAL, SMALL, seed=0, device=CPU, num_classes=2)
    with pytest.raises(ValueError, match="labels must be"):
        quality.train_classifier(X_TRAIN, Y_TRAIN[:-1], X_VAL, Y_VAL, SMALL, seed=0, device=CPU)


# ------------------------------------------------------------------ together
def test_sample_quality_of_real_data_and_of_a_collapsed_generator(trained):
    model, _ = trained
    same = quality.sample_quality(model, X_VAL, X_VAL, CPU)
    assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert same["coverage"] == 1.0 and same["entropy"] == pytest.approx(math.log(3))
    assert same["entropy_normalised"] == pytest.approx(1.0) and "label_accuracy" not in same

    collapsed = X_VAL[Y_VAL == 0]  # a generator that only draws class 0, asked for all classes
    asked = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    out = quality.sample_quality(model, X_VAL, collapsed, CPU, fake_labels=asked)
    assert out["coverage"] == pytest.approx(1 / 3) and out["entropy"] == 0.0
    assert out["label_accuracy"] == pytest.approx(3 / 8)
    assert out["precision"] == 1.0 and out["recall"] < 1.0 and out["frechet_distance"] > 1.0
    assert set(out) == {*same, "label_accuracy"}


def test_real_floor_is_seeded_and_refuses_too_few_samples(trained):
    model, _ = trained
    a = quality.real_floor(model, X_VAL, X_TRAIN, CPU, n=20, seed=0)
    assert a == quality.real_floor(model, X_VAL, X_TRAIN, CPU, n=20, seed=0)
    assert a != quality.real_floor(model, X_VAL, X_TRAIN, CPU, n=20, seed=1)
    assert a["coverage"] == 1.0 and 0.0 < a["precision"] <= 1.0
    with pytest.raises(ValueError, match="only 24 are available"):
        quality.real_floor(model, X_VAL, X_TRAIN, CPU, n=30, seed=0)
