"""Benchmark: the reconstruction and one-class anomaly tables at full scale.

Builds a project in a work folder (default bench/work/full_scale, not versioned)
whose params are the repository's params.yaml with configs/full_scale.yaml on
top, on the real MNIST and Fashion-MNIST of ../shared/datasets, and runs the
library functions behind the pipeline's stages: ingest, corrupt, train and
evaluate for each model, compare, anomaly. It calls them directly rather than
through the MLflow-tracked stage adapters, so it also runs on a machine that
has only torch and the scientific stack (a rented GPU box); validation (Great
Expectations) and the latent maps (UMAP) are left out, since neither changes
the tables. ``--jobs N`` trains N (dataset, model) pairs at once in separate
processes: on a GPU the small models here are bound by kernel launches, so
several processes share one GPU well. Prints the best test MSE per latent size
against the targets (0.033 at k=2, 0.022 at 4, 0.016 at 6 on MNIST) and the
mean AUROC per dataset against its target (0.95 MNIST, 0.92 Fashion-MNIST), and
writes bench/results/full_scale.json.

    python bench/full_scale.py                       # the full settings (hours on CPU; use a GPU)
    python bench/full_scale.py --epochs 5 --models pca deep conv_plus   # a shorter run, reported as such
    python bench/full_scale.py --jobs 8 --threads 2                     # on a GPU machine with 16 cores
    python bench/full_scale.py --models pca conv_plus --set 'train.zoo.conv_plus.latent_sizes=[4]'

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
    from latentlab.errors import ConfigError
    from latentlab.overlay import merge, set_dotted

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(params, yaml.safe_load((REPO / "configs" / "full_scale.yaml").read_text()))
    params["pipeline"]["datasets"] = args.datasets
    params["ingest"]["datasets"] = {
        "mnist": {"kind": "mnist", "path": str(args.shared / "mnist")},
        "fashion_mnist": {"kind": "fashion_mnist", "path": str(args.shared / "fashion-mnist")},
    }
    params["ingest"]["datasets"] = {k: v for k, v in params["ingest"]["datasets"].items() if k in args.datasets}
    params["train"]["models"] = args.models
    params["evaluate"]["latent"]["models"] = []  # latent maps do not enter the tables
    params["evaluate"]["anomaly"]["datasets"] = args.datasets if args.anomaly else []
    params["evaluate"]["sparsity"]["datasets"] = []
    params["generate"]["datasets"] = []  # bench/generative_full_scale.py measures the generative models
    params["collapse"]["datasets"] = []
    if args.epochs is not None:
        for spec in params["train"]["zoo"].values():
            spec.setdefault("training", {})["epochs"] = args.epochs
        params["evaluate"]["anomaly"]["training"]["epochs"] = args.epochs
    if args.max_train_samples is not None:
        for spec in params["train"]["zoo"].values():
            spec.setdefault("training", {})["max_train_samples"] = args.max_train_samples
        params["evaluate"]["anomaly"]["training"]["max_train_samples"] = args.max_train_samples
    for assignment in args.set:
        try:
            set_dotted(params, assignment)
        except ConfigError as exc:
            raise SystemExit(f"--set {exc}") from None
    return params


def _work(task: tuple[str, str, str, int | None]) -> tuple[str, float]:
    """One unit of work in a worker process: ("train", dataset, model) or ("anomaly", dataset, "")."""
    kind, dataset, model, threads = task
    import torch

    from latentlab.config import load_params
    from latentlab.paths import ProjectPaths

    if threads:
        torch.set_num_threads(threads)
    paths = ProjectPaths(ROOT_OF_WORKER[0])
    params = load_params(paths.params)
    t0 = time.perf_counter()
    if kind == "train":
        from latentlab.evaluate import evaluate_model
        from latentlab.train import trainer_for

        trainer_for(params.train.spec(model).family)(params, dataset, model, paths, None)
        evaluate_model(params, dataset, model, paths)
    else:
        from latentlab.anomaly import run_anomaly

        run_anomaly(params, dataset, paths)
    return f"{dataset}/{model or kind}", time.perf_counter() - t0


# The project folder of the worker processes (set by _init_worker).
ROOT_OF_WORKER: list[Path] = [Path(".")]


def _init_worker(root: Path) -> None:
    ROOT_OF_WORKER[0] = root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "bench" / "work" / "full_scale")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--models", nargs="+", default=["pca", "linear", "deep", "deep_denoising", "conv", "conv_plus"])
    parser.add_argument("--epochs", type=int, default=None, help="override every model's epochs (shorter runs)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="override every model's training cap")
    parser.add_argument("--no-anomaly", dest="anomaly", action="store_false")
    parser.add_argument(
        "--shared", type=Path, default=SHARED, help="folder holding mnist/ and fashion-mnist/ IDX files"
    )
    parser.add_argument("--jobs", type=int, default=1, help="(dataset, model) trainings run at once, in processes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter after the others, e.g. train.zoo.conv_plus.latent_sizes=[4] (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "full_scale.json")
    args = parser.parse_args()
    if not args.shared.exists():
        print(f"{args.shared} is absent: this benchmark needs the real datasets", file=sys.stderr)
        return 2

    from latentlab.atomic import write_json, write_text
    from latentlab.compare import compare_dataset
    from latentlab.config import load_params
    from latentlab.corrupt import corrupt_dataset
    from latentlab.data.ingest import ingest_dataset
    from latentlab.engine import pick_device
    from latentlab.paths import ProjectPaths

    args.root.mkdir(parents=True, exist_ok=True)
    write_text(args.root / "params.yaml", yaml.safe_dump(build_params(args), sort_keys=False))
    paths = ProjectPaths(args.root)
    params = load_params(paths.params)
    started = time.perf_counter()
    for dataset in args.datasets:
        manifest_file = paths.processed(dataset) / "manifest.json"
        if not manifest_file.exists():
            ingest_dataset(
                dataset, params.dataset(dataset), params.ingest, paths.processed(dataset), paths.raw_dataset(dataset)
            )
        if not (paths.corrupted(dataset) / "manifest.json").exists():
            corrupt_dataset(dataset, paths.processed(dataset), paths.corrupted(dataset), params.corrupt)
    tasks = [("train", d, m, args.threads) for d in args.datasets for m in args.models]
    tasks += [("anomaly", d, "", args.threads) for d in args.datasets if args.anomaly]
    # Slowest first (the linear AE's small batches, then the anomaly studies), so a
    # parallel run does not end waiting on one long straggler.
    slowest = {"linear": 0, "anomaly": 1}
    tasks.sort(key=lambda t: slowest.get(t[2] or t[0], 2))
    timings: dict[str, float] = {}
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(args.root,)
        ) as pool:
            for name, seconds in pool.map(_work, tasks):
                timings[name] = seconds
                print(f"done {name} in {seconds:.0f} s", flush=True)
    else:
        _init_worker(args.root)
        for task in tasks:
            name, seconds = _work(task)
            timings[name] = seconds
            print(f"done {name} in {seconds:.0f} s", flush=True)
    for dataset in args.datasets:
        compare_dataset(params, dataset, paths)

    result: dict = {
        "device": str(pick_device("auto")),
        "args": {k: str(v) for k, v in vars(args).items()},
        "timings_s": timings,
    }
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
                    print(
                        f"  k={k}: best {best[k]['model']} {best[k]['mse']:.4f} (target <= {target}) {'met' if ok else 'NOT met'}"
                    )
        if args.anomaly:
            anomaly = json.loads((args.root / "metrics" / "anomaly" / f"{dataset}.json").read_text())
            target = AUROC_TARGETS[dataset]
            print(
                f"{dataset}: one-class anomaly detection, mean AUROC {anomaly['mean_auroc']:.3f} (target >= {target}), mean AUPRC {anomaly['mean_auprc']:.3f}"
            )
            for name, row in anomaly["per_class"].items():
                print(f"  {name:<14} AUROC {row['auroc']:.3f}  AUPRC {row['auprc']:.3f}  F1 {row['f1']:.3f}")
            result[dataset]["anomaly"] = anomaly
    result["total_seconds"] = time.perf_counter() - started
    write_json(args.out, result)
    print(f"\nwritten {args.out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
