"""Atomic writes, the processed store, splits, PCA and metrics."""

import numpy as np
import pytest

from latentlab import metrics
from latentlab.atomic import atomic_dir, atomic_path, save_torch
from latentlab.data.ingest import stratified_split
from latentlab.data.store import SplitArrays, from_unit_float, load_split, save_split, to_unit_float
from latentlab.models.pca import PCA


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_torch_writes_the_same_bytes_for_the_same_content(tmp_path):
    # Saved under a random temporary name, torch.save would name its archive after it: equal
    # weights would then hash differently on every run (DVC outputs, saved-state keys).
    import torch

    state = {"w": torch.arange(6.0).reshape(2, 3), "meta": {"k": 2}}
    save_torch(state, tmp_path / "a.pt")
    save_torch(state, tmp_path / "a.pt")  # over an existing file
    first = (tmp_path / "a.pt").read_bytes()
    save_torch(state, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]  # no temporary left
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"]) and loaded["meta"] == {"k": 2}
    state["w"][0, 0] = -1.0
    save_torch(state, tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() != first


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "folder"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_split_round_trip_and_unit_scaling(tmp_path):
    x = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4) * 7
    arrays = SplitArrays(x=x, y=np.array([0, 1]), ids=np.array(["a", "b"]))
    save_split(tmp_path, "train", arrays)
    loaded = load_split(tmp_path, "train")
    np.testing.assert_array_equal(loaded.x, x)
    assert loaded.ids.tolist() == ["a", "b"] and loaded.audio is None
    unit = loaded.unit_float()
    assert unit.dtype == np.float32 and unit.max() == pytest.approx(x.max() / 255)
    np.testing.assert_array_equal(from_unit_float(unit, np.uint8), x)
    half = np.full((1, 1, 2, 2), 0.5, np.float16)
    assert to_unit_float(half).dtype == np.float32


def test_split_arrays_reject_mismatched_rows():
    with pytest.raises(ValueError, match="y has 3 rows but x has 2"):
        SplitArrays(x=np.zeros((2, 1, 2, 2), np.uint8), y=np.zeros(3), ids=np.zeros(2))


def test_stratified_split_is_seeded_disjoint_and_keeps_every_class():
    y = np.array([0] * 50 + [1] * 30 + [2] * 3)
    a = stratified_split(y, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=5)
    b = stratified_split(y, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=5)
    c = stratified_split(y, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=6)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in a)
    together = np.concatenate(list(a.values()))
    assert sorted(together.tolist()) == list(range(len(y)))  # a partition
    assert len(a["test"]) == 10 + 6 + 1  # round(0.2 * n) per class, at least one of the rare class
    assert set(y[a["val"]]) == {0, 1, 2}


def test_pca_matches_a_hand_made_subspace():
    rng = np.random.default_rng(0)
    # Data on a 2-D plane in 5-D plus tiny noise: 2 components reconstruct it almost exactly.
    basis = np.linalg.qr(rng.normal(size=(5, 2)))[0].T  # (2, 5) orthonormal rows
    codes = rng.normal(size=(400, 2)) * [3.0, 1.0]
    x = codes @ basis + 0.5 + 1e-3 * rng.normal(size=(400, 5))
    pca = PCA.fit(x, 3)
    assert metrics.mse(x, pca.reconstruct(x, 2)) < 1e-5
    assert metrics.mse(x, pca.reconstruct(x, 1)) > 0.1
    # The fitted 2-D subspace equals the true one: projector difference ~ 0.
    proj_true = basis.T @ basis
    proj_fit = pca.components[:2].T @ pca.components[:2]
    assert np.abs(proj_true - proj_fit).max() < 1e-3
    assert pca.explained_variance_ratio(2) > 0.999
    assert pca.explained_variance[0] >= pca.explained_variance[1] >= pca.explained_variance[2]


def test_pca_save_load_round_trip(tmp_path):
    x = np.random.default_rng(1).random((50, 1, 3, 3))
    pca = PCA.fit(x, 4)
    pca.save(tmp_path / "pca.npz")
    again = PCA.load(tmp_path / "pca.npz")
    np.testing.assert_allclose(again.reconstruct(x, 4), pca.reconstruct(x, 4))
    assert pca.reconstruct(x, 4).shape == x.shape


def test_psnr_and_mse_of_a_known_error():
    ref = np.zeros((2, 1, 4, 4))
    est = ref + 0.1  # every pixel off by 0.1: MSE 0.01, PSNR 20 dB
    assert metrics.mse(ref, est) == pytest.approx(0.01)
    assert metrics.psnr(ref, est) == pytest.approx(20.0)
    assert metrics.psnr(ref, ref) == pytest.approx(100.0)  # capped, finite
