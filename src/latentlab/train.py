"""The ``train`` stage: fit one model family on one dataset's training split.

Families are chosen by name through :data:`TRAINERS`. Every trainer reads the
processed training split, writes its model folder atomically and returns the
figures worth logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentlab.atomic import atomic_dir, write_json
from latentlab.config import Params
from latentlab.data.store import SplitArrays, load_split
from latentlab.models.pca import PCA


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    metrics: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)


def subsample(arrays: SplitArrays, limit: int | None, seed: int) -> SplitArrays:
    """At most ``limit`` samples, drawn without replacement from a seeded permutation."""
    if limit is None or len(arrays) <= limit:
        return arrays
    index = np.sort(np.random.default_rng(seed).permutation(len(arrays))[:limit])
    return arrays.subset(index)


def train_pca(params: Params, processed_dir: Path, model_dir: Path) -> TrainResult:
    """Fit PCA once at the largest latent size; smaller sizes are its prefixes."""
    cfg = params.train.pca
    train = subsample(load_split(processed_dir, "train"), cfg.max_train_samples, params.train.seed)
    x = train.unit_float()
    pca = PCA.fit(x, max(cfg.latent_sizes))
    with atomic_dir(model_dir) as tmp:
        pca.save(tmp / "pca.npz")
        write_json(
            tmp / "meta.json",
            {
                "family": "pca",
                "latent_sizes": sorted(cfg.latent_sizes),
                "n_train": len(train),
                "sample_shape": list(x.shape[1:]),
            },
        )
    metrics = {f"explained_variance_ratio.k{k}": pca.explained_variance_ratio(k) for k in sorted(cfg.latent_sizes)}
    metrics["n_train"] = float(len(train))
    return TrainResult(model_dir, metrics, {"pca": cfg.model_dump(mode="json"), "seed": params.train.seed})


Trainer = Callable[[Params, Path, Path], TrainResult]

#: Model family name (``train.models``) -> trainer.
TRAINERS: dict[str, Trainer] = {"pca": train_pca}
