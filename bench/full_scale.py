"""Benchmark: the reconstruction and one-class anomaly tables at full scale.

Builds a project in a work folder (default bench/work/full_scale, not versioned)
whose params are the repository's params.yaml with configs/full_scale.yaml on
top, on the real MNIST and Fashion-MNIST of ../shared/datasets, and runs the
pipeline's own stage functions: ingest, validate, corrupt, train and evaluate
for each model, compare, anomaly. Prints the best test MSE per latent size
against the targets (0.033 at k=2, 0.022 at 4, 0.016 at 6 on MNIST) and the
mean AUROC per dataset against its target (0.95 MNIST, 0.92 Fashion-MNIST), and
writes bench/results/full_scale.json.

    python bench/full_scale.py                       # the full settings (hours on CPU; use a GPU)
    python bench/full_scale.py --epochs 5 --models pca deep conv_plus   # a shorter run, reported as such

Checkpoints make it resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
RECON_TARGETS = {"2": 0.033, "4": 0.022, "6": 0.016}
AUROC_TARGETS = {"mnist": 0.95, "fashion_mnist": 0.92}


def build_params(args: argparse.Namespace) -> dict:
    from latentlab.overlay import merge

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(params, yaml.safe_load((REPO / "configs" / "full_scale.yaml").read_text()))
    params["pipeline"]["datasets"] = args.datasets
    params["ingest"]["datasets"] = {
        "mnist": {"kind": "mnist", "path": str(SHARED / "mnist")},
        "fashion_mnist": {"kind": "fashion_mnist", "path": str(SHARED / "fashion-mnist")},
    }
    params["ingest"]["datasets"] = {k: v for k, v in params["ingest"]["datasets"].items() if k in args.datasets}
    params["train"]["models"] = args.models
    params["evaluate"]["latent"]["models"] = [m for m in params["evaluate"]["latent"]["models"] if m in args.models]
    params["evaluate"]["anomaly"]["datasets"] = args.datasets if args.anomaly else []
    params["evaluate"]["sparsity"]["datasets"] = []
    if args.epochs is not None:
        for spec in params["train"]["zoo"].values():
            spec.setdefault("training", {})["epochs"] = args.epochs
        params["evaluate"]["anomaly"]["training"]["epochs"] = args.epochs
    if args.max_train_samples is not None:
        for spec in params["train"]["zoo"].values():
            spec.setdefault("training", {})["max_train_samples"] = args.max_train_samples
    return params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "bench" / "work" / "full_scale")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--models", nargs="+", default=["pca", "linear", "deep", "conv", "conv_plus"])
    parser.add_argument("--epochs", type=int, default=None, help="override every model's epochs (shorter runs)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="override every model's training cap")
    parser.add_argument("--no-anomaly", dest="anomaly", action="store_false")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "full_scale.json")
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"{SHARED} is absent: this benchmark needs the real datasets", file=sys.stderr)
        return 2

    from latentlab import stages
    from latentlab.atomic import write_json, write_text
    from latentlab.engine import pick_device

    args.root.mkdir(parents=True, exist_ok=True)
    write_text(args.root / "params.yaml", yaml.safe_dump(build_params(args), sort_keys=False))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    for dataset in args.datasets:
        for stage in (stages.ingest, stages.validate, stages.corrupt):
            stage(dataset, args.root)
        for model in args.models:
            t0 = time.perf_counter()
            stages.train(dataset, model, args.root)
            stages.evaluate(dataset, model, args.root)
            timings[f"{dataset}/{model}"] = time.perf_counter() - t0
        stages.compare(dataset, args.root)
        if args.anomaly:
            t0 = time.perf_counter()
            stages.anomaly(dataset, args.root)
            timings[f"{dataset}/anomaly"] = time.perf_counter() - t0

    result: dict = {"device": str(pick_device("auto")), "args": {k: str(v) for k, v in vars(args).items()}, "timings_s": timings}
    for dataset in args.datasets:
        table = json.loads((args.root / "metrics" / "compare" / f"{dataset}.json").read_text())["reconstruction"]
        print(f"\n{dataset}: test reconstruction (best first at each latent size)")
        print(f"{'model':<14}{'k':>4}{'MSE':>10}{'PSNR':>8}{'SSIM':>8}")
        for row in table:
            print(f"{row['model']:<14}{row['latent_size']:>4}{row['mse']:>10.4f}{row['psnr']:>8.2f}{row['ssim']:>8.3f}")
        best = {}
        for row in table:
            k = str(row["latent_size"])
            if k not in best or row["mse"] < best[k]["mse"]:
                best[k] = row
        result[dataset] = {"reconstruction": table, "best": best}
        if dataset == "mnist":
            for k, target in RECON_TARGETS.items():
                if k in best:
                    ok = best[k]["mse"] <= target
                    print(f"  k={k}: best {best[k]['model']} {best[k]['mse']:.4f} (target <= {target}) {'met' if ok else 'NOT met'}")
        if args.anomaly:
            anomaly = json.loads((args.root / "metrics" / "anomaly" / f"{dataset}.json").read_text())
            target = AUROC_TARGETS[dataset]
            print(f"{dataset}: one-class anomaly detection, mean AUROC {anomaly['mean_auroc']:.3f} (target >= {target}), mean AUPRC {anomaly['mean_auprc']:.3f}")
            for name, row in anomaly["per_class"].items():
                print(f"  {name:<14} AUROC {row['auroc']:.3f}  AUPRC {row['auprc']:.3f}  F1 {row['f1']:.3f}")
            result[dataset]["anomaly"] = anomaly
    result["total_seconds"] = time.perf_counter() - started
    write_json(args.out, result)
    print(f"\nwritten {args.out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
