"""Benchmark: PCA on the real MNIST, test MSE at 2, 4 and 6 components.

Fits on the 60,000 training images and reconstructs the 10,000 test images,
pixels scaled to [0, 1], with the same PCA class the pipeline trains. The
published-recipe figures this must reproduce (within 0.001) are 0.0557, 0.0479
and 0.0416. Prints a table and writes bench/results/pca_mnist.json.

    python bench/pca_mnist.py [--mnist ../shared/datasets/mnist]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from latentlab import metrics
from latentlab.atomic import write_json
from latentlab.data.idx import MNIST_CLASSES, read_idx_folder
from latentlab.data.store import to_unit_float
from latentlab.models.pca import PCA

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {2: 0.0557, 4: 0.0479, 6: 0.0416}
TOLERANCE = 0.001


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "datasets" / "mnist")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pca_mnist.json")
    args = parser.parse_args()

    start = time.perf_counter()
    raw = read_idx_folder(args.mnist, MNIST_CLASSES, kind="mnist")
    train, test = to_unit_float(raw.parts["train"].x), to_unit_float(raw.parts["test"].x)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    pca = PCA.fit(train, max(EXPECTED))
    fit_s = time.perf_counter() - start

    rows = []
    print(f"MNIST from {args.mnist}: {len(train)} train, {len(test)} test (read {read_s:.1f} s, fit {fit_s:.1f} s)")
    print(f"{'k':>3} {'test MSE':>10} {'expected':>9} {'|diff|':>8}  ok")
    for k, expected in EXPECTED.items():
        mse = metrics.mse(test, pca.reconstruct(test, k))
        ok = abs(mse - expected) <= TOLERANCE
        rows.append({"k": k, "test_mse": mse, "expected": expected, "abs_diff": abs(mse - expected), "ok": ok})
        print(f"{k:>3} {mse:>10.4f} {expected:>9.4f} {abs(mse - expected):>8.5f}  {'yes' if ok else 'NO'}")
    write_json(
        args.out,
        {"dataset": str(args.mnist), "n_train": len(train), "n_test": len(test), "fit_seconds": fit_s, "rows": rows},
    )
    print(f"written {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
