"""Benchmark: the generative models and a model-collapse experiment at full scale.

Builds a project in a work folder (default bench/work/generative, not
versioned) whose params are params.yaml with configs/full_scale.yaml on top, on
the real MNIST and Fashion-MNIST of ../shared/datasets, and calls the library
functions behind the stages (ingest, classifier, generate, collapse) directly,
without the MLflow-tracked adapters, so it also runs on a machine that has only
torch and the scientific stack. Prints the domain classifier's test accuracy
(targets: 99% MNIST, 91% Fashion-MNIST), the sample-quality table of every
model with the real-data floor beside it, the VAE's importance-sampled NLL on
binarised MNIST (target: at most 86 nats), and the collapse study (every loop
type, at least 5 generations) as relative changes from generation 0. Writes
bench/results/generative_full_scale.json.

    python bench/generative_full_scale.py                        # full settings (hours on CPU; use a GPU)
    python bench/generative_full_scale.py --epochs 2 --max-train-samples 5000 --generations 2   # a short run
    python bench/generative_full_scale.py --datasets mnist --models vae_mlp --seeds 0 \
        --collapse-epochs 20 --jobs 2 --threads 1     # on a 2-core CPU: the collapse pairs in 2 processes

Checkpoints and saved generations make it resumable: rerun the same command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from latentlab.config import CollapseConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
ACCURACY_TARGETS = {"mnist": 0.99, "fashion_mnist": 0.91}
NLL_TARGET = 86.0


def build_params(args: argparse.Namespace) -> dict:
    from latentlab.errors import ConfigError
    from latentlab.overlay import merge, set_dotted

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(params, yaml.safe_load((REPO / "configs" / "full_scale.yaml").read_text()))
    sources = {
        "mnist": {"kind": "mnist", "path": str(args.shared / "mnist")},
        "fashion_mnist": {"kind": "fashion_mnist", "path": str(args.shared / "fashion-mnist")},
    }
    params["pipeline"]["datasets"] = args.datasets
    params["ingest"]["datasets"] = {k: v for k, v in sources.items() if k in args.datasets}
    params["train"]["models"] = ["pca"]
    params["evaluate"]["anomaly"]["datasets"] = []
    params["evaluate"]["sparsity"]["datasets"] = []
    params["generate"]["datasets"] = args.datasets
    params["generate"]["models"] = args.models
    params["collapse"]["datasets"] = [args.collapse_dataset] if args.collapse_dataset else []
    if args.generations is not None:
        params["collapse"]["generations"] = args.generations
    if args.seeds is not None:
        params["collapse"]["seeds"] = args.seeds
    if args.nll_images is not None:
        params["generate"]["quality"]["nll_images"] = args.nll_images
    if args.collapse_epochs is not None:
        params["collapse"]["epochs"] = args.collapse_epochs
    if args.threads is not None:
        params["train"]["threads"] = args.threads
    for spec in params["generate"]["zoo"].values():
        training = spec.setdefault("training", {})
        if args.epochs is not None:
            training["epochs"] = args.epochs
        if args.max_train_samples is not None:
            training["max_train_samples"] = args.max_train_samples
    for assignment in args.set:
        try:
            set_dotted(params, assignment)
        except ConfigError as exc:
            raise SystemExit(f"--set {exc}") from None
    return params


def _run_pair(root: Path, dataset: str, loop: str, seed: int) -> str:
    """One (loop, seed) pair of the collapse study, in a worker process (it writes only its own state)."""
    from latentlab.collapse import run_collapse_pairs
    from latentlab.config import load_params
    from latentlab.paths import ProjectPaths

    paths = ProjectPaths(root)
    t0 = time.perf_counter()
    run_collapse_pairs(load_params(paths.params), dataset, paths, loops=[loop], seeds=[seed])
    return f"{loop} seed {seed}: {time.perf_counter() - t0:.0f} s"


def run_pairs_in_parallel(root: Path, dataset: str, collapse: CollapseConfig, jobs: int) -> None:
    """Every (loop, seed) pair of ``collapse`` in ``jobs`` spawned processes, longest loop first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # accumulate's training set grows every generation: start it first so that it does not finish last alone.
    loops = sorted(collapse.loops, key=lambda loop: loop != "accumulate")
    pairs = [(loop, seed) for loop in loops for seed in collapse.seeds]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_pair, root, dataset, loop, seed) for loop, seed in pairs]
        for future in as_completed(futures):
            print(f"  collapse pair done: {future.result()}", flush=True)


def print_quality_table(dataset: str, classifier: dict, models: dict[str, dict]) -> None:
    """The sample-quality table of ``dataset`` with the real-data floor first, and every VAE's NLL."""
    floor = classifier.get("floor", {})
    keys = ["frechet_distance", "precision", "recall", "coverage", "entropy_normalised"]
    print(f"{'model':<12}{'psi':>5}" + "".join(f"{k[:12]:>14}" for k in keys))
    print(f"{'real floor':<12}{'':>5}" + "".join(f"{floor.get(k, float('nan')):>14.4f}" for k in keys))
    for model, metrics in models.items():
        # quality: {"psi0.5": {"psi": 0.5, metric: value, ...}, ...}, one entry per truncation level
        sweep = sorted(metrics.get("quality", {}).values(), key=lambda row: row["psi"])
        for row in sweep:
            print(f"{model:<12}{row['psi']:>5}" + "".join(f"{row.get(k, float('nan')):>14.4f}" for k in keys))
        # likelihood (VAEs): {"images": N, "importance_samples": K, "k32": {"nll": ..., ...}, ...}
        likelihood = metrics.get("likelihood", {})
        for name, v in likelihood.items():
            if not isinstance(v, dict):
                continue
            ok = "met" if v["nll"] <= NLL_TARGET else "not met"
            print(
                f"  {model} {name}: test NLL {v['nll']:.2f} +- {v['nll_sem']:.2f} nats, negative ELBO "
                f"{v['negative_elbo']:.2f} ({likelihood['images']} images, K = {likelihood['importance_samples']}; "
                + (f"{ok}, target <= {NLL_TARGET})" if dataset == "mnist" else "no target)")
            )


def print_collapse_table(summary: dict, generations: int, healing_start: str) -> None:
    """Per loop: generation 0, the last loop generation and every healing generation (mean over seeds)."""
    keys = ["frechet_distance", "recall", "coverage", "heldout_neg_elbo"]
    print(f"\n{'loop':<12}{'generation':>14}" + "".join(f"{k[:16]:>18}" for k in keys))
    for row in summary["rows"]:
        if row["phase"] == "loop" and row["generation"] not in (0, generations):
            continue
        label = f"g{row['generation']}" if row["phase"] == "loop" else f"heal {row['generation']} ({healing_start})"
        cells = "".join(f"{row['mean'].get(k, float('nan')):>18.4f}" for k in keys)
        print(f"{row['loop']:<12}{label:>14}{cells}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "bench" / "work" / "generative")
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder holding mnist/ and fashion-mnist/")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument(
        "--models",
        nargs="*",
        default=["vae_mlp", "vae_conv", "gan", "dcgan", "cgan"],
        help="generative models trained and scored (none: only the classifier and the collapse study)",
    )
    parser.add_argument("--collapse-dataset", default="mnist", help="dataset of the collapse study ('' = none)")
    parser.add_argument("--generations", type=int, default=None, help="override collapse.generations")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override collapse.seeds")
    parser.add_argument("--epochs", type=int, default=None, help="override every generative model's epochs")
    parser.add_argument("--max-train-samples", type=int, default=None, help="override every training cap")
    parser.add_argument(
        "--nll-images", type=int, default=None, help="test images of the importance-sampled NLL (default: all)"
    )
    parser.add_argument("--collapse-epochs", type=int, default=None, help="override collapse.epochs")
    parser.add_argument(
        "--jobs", type=int, default=1, help="processes running the collapse (loop, seed) pairs at once (1 = in turn)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (train.threads)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter after the others, e.g. generate.zoo.vae_mlp.importance_samples=5 (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generative_full_scale.json")
    args = parser.parse_args()
    if not args.shared.exists():
        print(f"{args.shared} is absent: this benchmark needs the real datasets", file=sys.stderr)
        return 2

    from latentlab.atomic import write_json, write_text
    from latentlab.collapse import run_collapse
    from latentlab.config import load_params
    from latentlab.data.ingest import ingest_dataset
    from latentlab.engine import pick_device
    from latentlab.generative import evaluate_generative, train_domain_classifier, train_generative
    from latentlab.paths import ProjectPaths

    args.root.mkdir(parents=True, exist_ok=True)
    write_text(args.root / "params.yaml", yaml.safe_dump(build_params(args), sort_keys=False))
    paths = ProjectPaths(args.root)
    params = load_params(paths.params)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    result: dict = {"device": str(pick_device(params.train.device)), "args": {k: str(v) for k, v in vars(args).items()}}
    for dataset in args.datasets:
        if not (paths.processed(dataset) / "manifest.json").exists():
            ingest_dataset(
                dataset, params.dataset(dataset), params.ingest, paths.processed(dataset), paths.raw_dataset(dataset)
            )
        t0 = time.perf_counter()
        classifier, _ = train_domain_classifier(params, dataset, paths)
        timings[f"{dataset}/classifier"] = time.perf_counter() - t0
        target = ACCURACY_TARGETS.get(dataset)
        print(f"\n{dataset}: domain classifier test accuracy {classifier['test_accuracy']:.4f} (target >= {target})")
        models = {}
        for model in args.models:
            t0 = time.perf_counter()
            train_generative(params, dataset, model, paths)
            metrics, _, _ = evaluate_generative(params, dataset, model, paths)
            timings[f"{dataset}/{model}"] = time.perf_counter() - t0
            models[model] = metrics
        result[dataset] = {"classifier": classifier, "models": models}
        if models:
            print_quality_table(dataset, classifier, models)
    if args.collapse_dataset:
        t0 = time.perf_counter()
        if args.jobs > 1:
            run_pairs_in_parallel(args.root, args.collapse_dataset, params.collapse, args.jobs)
        collapse, _, _ = run_collapse(params, args.collapse_dataset, paths)  # loads the pairs run above
        timings["collapse"] = time.perf_counter() - t0
        result["collapse"] = {k: collapse[k] for k in ("summary", "relative_change", "pattern") if k in collapse}
        print(f"\ncollapse on {args.collapse_dataset}: relative change from generation 0 to the last")
        for metric, per_loop in collapse.get("relative_change", {}).items():
            print(f"  {metric:<20}" + "  ".join(f"{loop} {v:+.3f}" for loop, v in per_loop.items()))
        print(f"  verdict: {collapse.get('pattern', {}).get('verdict', '')}")
        print_collapse_table(collapse["summary"], params.collapse.generations, params.collapse.healing_start)
    result["timings_s"] = timings
    result["total_seconds"] = time.perf_counter() - started
    write_json(args.out, result)
    print(f"\nwritten {args.out} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
