"""The sparse-autoencoder sweep: how the target rho and the weight beta shape the code.

For every (rho, beta) of ``evaluate.sparsity``, a sparse autoencoder
(:mod:`latentlab.models.sparse`, after Ng's CS294A notes "Sparse autoencoder",
2011) is trained on the training split with the KL penalty
``beta * sum_j KL(rho || rho_hat_j)``. Its sigmoid code h (N, k) on the test set
is then summarised:

- ``rho_hat_j = mean_n h_j(x_n)``, the mean activation of unit j (the quantity
  the penalty drives towards rho), and the overall mean activation;
- the fraction of units whose mean activation is below 0.1 (rarely active units);
- lifetime sparsity, the mean over units of the sparseness index of Vinje &
  Gallant (2000, Science 287), a normalised Treves-Rolls measure:
  ``S_j = (1 - (mean_n h_j)^2 / mean_n h_j^2) / (1 - 1/N)``, 0 when the unit
  responds equally to every sample and 1 when it responds to a single one
  (Willmore & Tolhurst 2001 call this lifetime sparseness);
- the test reconstruction MSE and the KL sum at the test-set rho_hat.

With beta = 0 nothing asks for sparsity; with beta = 1 and rho = 0.05 the mean
activation is pulled down towards 0.05.

Writes (each atomically): the metrics JSON (a DVC metrics file, keyed
``rho{rho}_beta{beta}``), a CSV (a DVC plot), and a figures folder with
``activations.png``, ``mean_activation.png`` and ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from latentlab import metrics as m
from latentlab.atomic import atomic_dir, write_json
from latentlab.config import Params
from latentlab.data.store import load_split
from latentlab.paths import ProjectPaths

logger = logging.getLogger(__name__)

MetricsLog = Callable[[dict[str, float], int], None]

#: Test images whose codes are summarised (the sweep's statistics settle well before this).
MAX_TEST_SAMPLES = 1000
#: A unit whose mean activation is below this counts as rarely active.
LOW_ACTIVATION = 0.1

ACTIVATIONS_FIGURE = "activations.png"
MEAN_ACTIVATION_FIGURE = "mean_activation.png"


def setting_key(rho: float, beta: float) -> str:
    """The name of one setting, e.g. ``rho0.05_beta1`` (shortest round-trip formatting)."""
    return f"rho{rho:g}_beta{beta:g}"


def lifetime_sparsity(codes: np.ndarray) -> np.ndarray:
    """Sparseness index of every unit over the samples (Vinje & Gallant 2000), (N, k) -> (k,).

    ``S_j = (1 - (mean_n h_nj)^2 / mean_n h_nj^2) / (1 - 1/N)`` for non-negative
    activations, clipped to [0, 1]. A unit silent on every sample (undefined:
    0 / 0) counts as maximally sparse, 1. Needs N >= 2.
    """
    h = np.asarray(codes, dtype=np.float64)
    n = h.shape[0]
    if n < 2:
        raise ValueError(f"lifetime sparsity needs at least 2 samples, got {n}")
    mean = h.mean(axis=0)
    mean_sq = (h**2).mean(axis=0)
    silent = mean_sq <= 0.0
    ratio = np.divide(mean**2, mean_sq, out=np.zeros_like(mean), where=~silent)
    return np.clip((1.0 - ratio) / (1.0 - 1.0 / n), 0.0, 1.0)


def code_statistics(codes: np.ndarray, rho: float) -> dict[str, Any]:
    """Summary of sigmoid codes (N, k) in (0, 1) against the target ``rho``.

    Returns ``mean_activation`` (over all N x k values), ``low_activation_fraction``
    (share of units with rho_hat_j < 0.1), ``lifetime_sparsity`` (mean over units
    of :func:`lifetime_sparsity`), ``kl`` (sum_j KL(rho || rho_hat_j), with
    rho_hat the (k,) test-set means), and ``rho_hat`` (the (k,) list itself).
    """
    import torch

    from latentlab.models.sparse import kl_sparsity

    h = np.asarray(codes, dtype=np.float64)
    rho_hat = h.mean(axis=0)  # (k,)
    kl = float(kl_sparsity(rho, torch.from_numpy(rho_hat)))
    return {
        "mean_activation": float(h.mean()),
        "low_activation_fraction": float(np.mean(rho_hat < LOW_ACTIVATION)),
        "lifetime_sparsity": float(lifetime_sparsity(h).mean()),
        "kl": kl,
        "rho_hat": rho_hat.tolist(),
    }


def _unique(values: tuple[float, ...]) -> list[float]:
    return list(dict.fromkeys(float(v) for v in values))


def run_sparsity(
    params: Params, dataset: str, paths: ProjectPaths, log: MetricsLog | None = None
) -> tuple[dict[str, Any], Path, Path]:
    """Train a sparse autoencoder for every (rho, beta) and summarise its test codes.

    Returns (metrics, metrics file, figures folder). ``metrics`` maps
    ``rho{rho}_beta{beta}`` to ``{rho, beta, mean_activation,
    low_activation_fraction, lifetime_sparsity, test_mse, kl, penalty,
    best_val_loss, best_epoch, epochs_run, n_train}`` (floats). ``log(metrics,
    step)`` is called after each setting with those floats plus
    ``train_seconds``, step = the setting's index (rho-major). Training resumes
    from ``paths.sparsity_checkpoint`` after a kill and gives identical metrics.
    """
    import torch

    from latentlab import engine
    from latentlab.evaluate import write_csv
    from latentlab.models.base import build_model
    from latentlab.plots import save_code_activations, save_line_plot
    from latentlab.train import subsample_index

    cfg = params.evaluate.sparsity
    seed = params.train.seed
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    device = engine.pick_device(params.train.device)
    folder = paths.processed(dataset)
    train = load_split(folder, "train")
    x_train = train.subset(subsample_index(len(train), cfg.training.max_train_samples, seed)).unit_float()
    x_val = load_split(folder, "val").unit_float()
    test = load_split(folder, "test")
    x_test = test.subset(subsample_index(len(test), MAX_TEST_SAMPLES, seed)).unit_float()
    train_data, val_data = engine.TrainingData(x_train), engine.TrainingData(x_val)
    shape = tuple(int(s) for s in x_train.shape[1:])
    rhos, betas = _unique(cfg.rho), _unique(cfg.beta)

    result: dict[str, Any] = {}
    rho_hats: dict[str, list[float]] = {}
    activations: dict[str, np.ndarray] = {}
    for step, (rho, beta) in enumerate((r, b) for r in rhos for b in betas):
        key = setting_key(rho, beta)
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = build_model("sparse", shape, cfg.latent_size, rho=rho, beta=beta)
        fitted = engine.fit(
            model,
            train_data,
            val_data,
            cfg.training,
            seed=seed,
            device=device,
            checkpoint=paths.sparsity_checkpoint(dataset, rho, beta),
        )
        codes = engine.encode(fitted.model, x_test, device)  # (N, k) sigmoid activations
        recon = engine.reconstruct(fitted.model, x_test, device)
        stats = code_statistics(codes, rho)
        rho_hats[key] = stats.pop("rho_hat")
        entry = {
            "rho": rho,
            "beta": beta,
            **stats,
            "penalty": beta * stats["kl"],  # the term the loss adds, at the test-set rho_hat
            "test_mse": m.mse(x_test, recon),
            "best_val_loss": float(fitted.best_val_loss),
            "best_epoch": float(fitted.best_epoch),
            "epochs_run": float(fitted.epochs_run),
            "n_train": float(len(x_train)),
        }
        seconds = time.perf_counter() - start
        result[key] = entry
        activations[f"rho={rho:g}, beta={beta:g}"] = codes
        logger.info(
            "%s: %s: mean activation %.4f, test MSE %.5f (%.1f s)",
            dataset,
            key,
            entry["mean_activation"],
            entry["test_mse"],
            seconds,
        )
        if log is not None:
            log({**entry, "train_seconds": seconds}, step)

    columns = ["rho", "beta", "mean_activation", "low_activation_fraction", "lifetime_sparsity", "test_mse", "kl"]
    table = [{c: entry[c] for c in columns} for entry in result.values()]
    title = f"{dataset}: sparse autoencoder, k={cfg.latent_size}"
    with atomic_dir(paths.study_report("sparsity", dataset)) as figures:
        # One column per beta, one row per rho: the effect of the penalty reads across a row.
        save_code_activations(
            activations, figures / ACTIVATIONS_FIGURE, title=f"{title}: test code activations", max_cols=len(betas)
        )
        save_line_plot(
            betas,
            {f"rho={rho:g}": [result[setting_key(rho, b)]["mean_activation"] for b in betas] for rho in rhos},
            figures / MEAN_ACTIVATION_FIGURE,
            xlabel="beta (weight of the KL penalty)",
            ylabel="mean code activation (test)",
            title=f"{title}: mean activation",
        )
        write_json(
            figures / "summary.json",
            {
                "dataset": dataset,
                "latent_size": cfg.latent_size,
                "rho": rhos,
                "beta": betas,
                "n_test": len(x_test),
                "low_activation": LOW_ACTIVATION,
                "columns": columns,
                "rows": table,
                "rho_hat": rho_hats,
                "figures": {"activations": ACTIVATIONS_FIGURE, "mean_activation": MEAN_ACTIVATION_FIGURE},
            },
        )
    metrics_path = paths.study_metrics("sparsity", dataset)
    write_json(metrics_path, result)
    write_csv(paths.study_table("sparsity", dataset), table)
    return result, metrics_path, paths.study_report("sparsity", dataset)
