"""The train stage under torchrun: 2 processes (DistributedDataParallel, gloo on CPU) against one.

The same tiny project is trained once with ``python -m latentlab train`` and,
in a copy, once with ``torchrun --standalone --nproc_per_node 2 -m latentlab
train``. Both must give the same metrics, histories, weights and checkpoints
(up to floating-point summation order), the 2-process run must log one MLflow
run, and its checkpoint must be resumed by a 1-process run.

The training set has 46 samples in batches of 15: every full batch splits 8 + 7
over the ranks (uneven weights), and the last batch holds one sample, so rank 1
runs it on a weight-0 stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_digit_images, tiny_params, write_idx, write_project

pytestmark = pytest.mark.integration

DATASET, MODEL, K = "digits", "deep", 3
RTOL, ATOL = 1e-4, 1e-6


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # Both runs get the same CPU threads per process (torchrun would set 1 for its workers).
    env["OMP_NUM_THREADS"] = "1"
    return env


def _latentlab(root: Path, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    if torchrun:
        launcher = Path(sys.executable).with_name("torchrun")
        prefix = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [*prefix, "--standalone", "--nproc_per_node", "2", "-m", "latentlab", *args]
    else:
        cmd = [sys.executable, "-m", "latentlab", *args]
    done = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _project(tmp_path: Path) -> Path:
    """A project with 66 train and 12 test images of 12x12 pixels (ingest keeps 60 for training, 6 for validation)."""
    for split, (x, y) in {"train": make_digit_images(22, 3, seed=3), "t10k": make_digit_images(4, 3, seed=4)}.items():
        write_idx(tmp_path / "in" / f"{split}-images-idx3-ubyte", x)
        write_idx(tmp_path / "in" / f"{split}-labels-idx1-ubyte", y.astype("uint8"))
    params = tiny_params(tmp_path, {DATASET: {"kind": "idx", "path": str(tmp_path / "in")}})
    params["train"]["models"] = [MODEL]
    params["train"]["threads"] = None
    params["train"]["zoo"] = {
        MODEL: {
            "family": "deep",
            "latent_sizes": [K],
            "hidden": [32, 16],
            "activation": "selu",
            "training": {
                "epochs": 3,
                "min_steps": 0,
                "batch_size": 15,
                "lr": 0.005,
                "patience": 5,
                "checkpoint_every": 1,
                "max_train_samples": 46,  # of 60: an uneven split, see the module docstring
            },
        }
    }
    return write_project(tmp_path / "one", params)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _train_runs(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("latentlab")
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if r.data.tags.get("latentlab.stage") == "train"]


def test_two_processes_train_the_same_model_as_one(tmp_path: Path):
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no gloo backend")
    one = _project(tmp_path)
    _latentlab(one, "ingest", DATASET)
    manifest = json.loads((one / "data/processed" / DATASET / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 60, "val": 6, "test": 12}
    two = tmp_path / "two"
    shutil.copytree(one, two)

    _latentlab(one, "train", DATASET, "--model", MODEL)
    ddp = _latentlab(two, "train", DATASET, "--model", MODEL, torchrun=True)
    assert "rank 1 of 2 joined the gloo process group" in ddp.stderr
    # Rank 0 wrote the model folder and prints it, once.
    assert ddp.stdout.split() == [f"models/{DATASET}/{MODEL}"]

    # Metrics: best validation loss, epochs, and every per-epoch loss.
    meta1 = json.loads((one / "models" / DATASET / MODEL / "meta.json").read_text())
    meta2 = json.loads((two / "models" / DATASET / MODEL / "meta.json").read_text())
    assert (meta1["world_size"], meta2["world_size"]) == (1, 2)
    assert meta2["n_train"] == 46
    for key in (f"k{K}.epochs_run", f"k{K}.best_epoch"):
        assert meta2[key] == meta1[key]
    assert meta2[f"k{K}.best_val_loss"] == pytest.approx(meta1[f"k{K}.best_val_loss"], rel=RTOL)
    hist1 = json.loads((one / "models" / DATASET / MODEL / f"k{K}_history.json").read_text())
    hist2 = json.loads((two / "models" / DATASET / MODEL / f"k{K}_history.json").read_text())
    assert len(hist1) == len(hist2) == 3
    for row1, row2 in zip(hist1, hist2, strict=True):
        assert row1.keys() == row2.keys()
        assert (row1["epoch"], row1["step"]) == (row2["epoch"], row2["step"]) == (row1["epoch"], 4 * row1["epoch"])
        for key in row1.keys() - {"epoch", "step", "seconds"}:
            assert row2[key] == pytest.approx(row1[key], rel=RTOL), key

    # Weights of the saved model and the whole resumable state (model, best model, Adam moments).
    w1 = _load(one / "models" / DATASET / MODEL / f"k{K}.pt")["state_dict"]
    w2 = _load(two / "models" / DATASET / MODEL / f"k{K}.pt")["state_dict"]
    max_weight_diff = _assert_states_close(w1, w2)
    c1 = _load(one / "checkpoints" / DATASET / MODEL / f"k{K}.pt")
    c2 = _load(two / "checkpoints" / DATASET / MODEL / f"k{K}.pt")
    assert c1["fingerprint"] == c2["fingerprint"]  # independent of the number of processes
    assert (c1["epoch"], c1["step"], c1["best_epoch"]) == (c2["epoch"], c2["step"], c2["best_epoch"])
    _assert_states_close(c1["model"], c2["model"])
    _assert_states_close(c1["best_model"], c2["best_model"])
    for s1, s2 in zip(c1["optimizer"]["state"].values(), c2["optimizer"]["state"].values(), strict=True):
        _assert_states_close(s1, s2)
    print(f"max |w1 - w2| = {max_weight_diff:.3g}")

    # One MLflow run for the 2-process training (rank 0's), with the per-step losses of all steps.
    runs = _train_runs(two)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["latentlab.world_size"] == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{two / 'mlruns' / 'mlflow.db'}")
    steps = client.get_metric_history(runs[0].info.run_id, f"k{K}.step.loss")
    assert len(steps) == 12

    # A 1-process run resumes the 2-process checkpoint (it does not start over): nothing left
    # to train, and it writes exactly the 2-process weights and history.
    resumed = _latentlab(two, "train", DATASET, "--model", MODEL)
    assert f"resuming from checkpoints/{DATASET}/{MODEL}/k{K}.pt at epoch 3" in resumed.stderr
    assert "ignoring" not in resumed.stderr
    w3 = _load(two / "models" / DATASET / MODEL / f"k{K}.pt")["state_dict"]
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    hist3 = json.loads((two / "models" / DATASET / MODEL / f"k{K}_history.json").read_text())
    assert hist3 == hist2  # the very rows of the 2-process run, seconds included
