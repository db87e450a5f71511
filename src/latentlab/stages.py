"""The pipeline's stages as plain functions: the one entry point for DVC (via the
CLI), the ``latentlab`` commands and the Prefect tasks.

Each loads ``params.yaml`` once, opens one MLflow run, calls the library
function that does the work, logs what it produced, and returns the path of
its main output. Paths are relative to ``root``, the folder of ``dvc.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentlab.config import Params, load_params
from latentlab.errors import ConfigError, ValidationFailed
from latentlab.paths import ProjectPaths
from latentlab.tracking import registered_name, stage_run

log = logging.getLogger(__name__)


def _setup(root: Path) -> tuple[Params, ProjectPaths]:
    paths = ProjectPaths(Path(root))
    return load_params(paths.params), paths


def ingest(dataset: str, root: Path = Path(".")) -> Path:
    """Read ``dataset`` from its source into ``data/processed/{dataset}``."""
    from latentlab.data.ingest import ingest_dataset

    params, paths = _setup(root)
    source = params.dataset(dataset)
    split_params = params.ingest.model_dump(mode="json", exclude={"datasets"})
    with stage_run(
        "ingest",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params={"source": source.model_dump(mode="json"), "split": split_params},
    ) as run:
        manifest = ingest_dataset(dataset, source, params.ingest, paths.processed(dataset), paths.raw_dataset(dataset))
        run.log_metrics({f"samples.{split}": n for split, n in manifest.counts.items()})
        run.set_tags(
            {
                "source.kind": manifest.source.get("kind"),
                "source.location": manifest.source.get("location"),
                "source.synthetic": bool(manifest.source.get("synthetic")),
                "source.subset": bool(manifest.source.get("subset")),
            }
        )
        run.log_artifact(paths.processed(dataset) / "manifest.json")
    return paths.processed(dataset)


def validate(dataset: str, root: Path = Path(".")) -> Path:
    """Run the Great Expectations suites of ``dataset``; raises ValidationFailed on a failed expectation."""
    from latentlab.validate import validate_dataset

    params, paths = _setup(root)
    params.dataset(dataset)
    out_dir = paths.validation_report(dataset)
    with stage_run(
        "validate",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params=params.validate_.model_dump(mode="json"),
    ) as run:
        try:
            results = validate_dataset(dataset, paths.processed(dataset), out_dir, params.validate_)
        except ValidationFailed:
            run.log_artifact(out_dir, "validation")
            raise
        splits = results.get("splits", results)
        run.log_metrics(
            {f"success.{s}": float(bool(r.get("success"))) for s, r in splits.items() if isinstance(r, dict)}
        )
        run.log_artifact(out_dir, "validation")
    return out_dir


def corrupt(dataset: str, root: Path = Path(".")) -> Path:
    """Write the noise corruptions of ``dataset`` into ``data/corrupted/{dataset}``."""
    from latentlab.corrupt import corrupt_dataset

    params, paths = _setup(root)
    params.dataset(dataset)
    out_dir = paths.corrupted(dataset)
    with stage_run(
        "corrupt",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params=params.corrupt.model_dump(mode="json"),
    ) as run:
        manifest = corrupt_dataset(dataset, paths.processed(dataset), out_dir, params.corrupt)
        measured = {}
        for entry in manifest["corruptions"]:
            for split, stats in entry.get("measured", {}).items():
                for key, value in stats.items():
                    measured[f"{entry['name']}.{split}.{key}"] = value
        run.log_metrics(measured)
        run.log_artifact(out_dir / "manifest.json")
    return out_dir


def _model(params: Params, model: str) -> str:
    """The family of ``model``, which must be listed in train.models."""
    spec = params.train.spec(model)
    if model not in params.train.models:
        raise ConfigError(f"params.yaml: train.models: {model!r} is defined in train.zoo but not listed")
    return spec.family


def train(dataset: str, model: str = "pca", root: Path = Path(".")) -> Path:
    """Train ``model`` (a key of train.zoo) on ``dataset`` into ``models/{dataset}/{model}``.

    Launched by ``torchrun --nproc_per_node N -m latentlab train ...``, each of
    the N processes joins one process group and trains its share of every
    batch (DistributedDataParallel, :mod:`latentlab.distributed`); rank 0
    alone opens the MLflow run and writes the model. Every rank returns the
    same path, once rank 0 has finished.
    """
    from latentlab.distributed import DistributedContext, process_group
    from latentlab.train import trainer_for

    params, paths = _setup(root)
    params.dataset(dataset)
    family = _model(params, model)
    trainer = trainer_for(family)
    dist = DistributedContext.from_env(params.train.device)
    with process_group(dist):
        if not dist.is_main:
            result = trainer(params, dataset, model, paths, None, dist=dist)
        else:
            with stage_run(
                "train",
                dataset,
                root=paths.root,
                experiment=params.pipeline.experiment,
                tags={"latentlab.model": model, "latentlab.family": family, "latentlab.world_size": dist.world_size},
            ) as run:
                result = trainer(params, dataset, model, paths, run, dist=dist)
                run.log_params(result.params)
                run.log_metrics(result.metrics)
                run.log_artifact(result.model_dir, "model_files")
                run.register_logged_models(registered_name(dataset, model), result.metrics)
        # No rank reports success before rank 0 has written the model and closed the run.
        dist.barrier()
    return result.model_dir


def evaluate(dataset: str, model: str = "pca", root: Path = Path(".")) -> Path:
    """Evaluate ``model`` on ``dataset``: metrics, plots and figures."""
    from latentlab.evaluate import evaluate_model

    params, paths = _setup(root)
    params.dataset(dataset)
    family = _model(params, model)
    with stage_run(
        "evaluate",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params=params.evaluate.model_dump(mode="json", include={"max_test_samples", "grid_size", "latent"}),
        tags={"latentlab.model": model, "latentlab.family": family},
    ) as run:
        metrics, metrics_path, figures = evaluate_model(params, dataset, model, paths)
        run.log_metrics(metrics)
        run.log_artifact(metrics_path, "metrics")
        run.log_artifact(figures, "figures")
    return metrics_path


def compare(dataset: str, root: Path = Path(".")) -> Path:
    """Compare every model of ``dataset`` with each other and with classical methods."""
    from latentlab.compare import compare_dataset

    params, paths = _setup(root)
    params.dataset(dataset)
    with stage_run(
        "compare",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params=params.evaluate.model_dump(
            mode="json", include={"max_test_samples", "median_size", "blur_sigma", "audio_examples"}
        ),
    ) as run:
        metrics, metrics_path, figures = compare_dataset(params, dataset, paths)
        run.log_metrics({k: v for k, v in metrics.items() if k in ("denoising", "inpainting", "speech_cleaning")})
        run.log_artifact(metrics_path, "metrics")
        run.log_artifact(figures, "figures")
    return metrics_path


def _study(name: str, dataset: str, root: Path, summary: Callable[[dict[str, Any]], dict[str, Any]]) -> Path:
    """Run a per-dataset study (``anomaly`` or ``sparsity``) in one MLflow run.

    The study logs its per-step figures through ``log``; ``summary`` picks what
    is logged once at the end.
    """
    import importlib

    run_study = getattr(importlib.import_module(f"latentlab.{name}"), f"run_{name}")
    params, paths = _setup(root)
    params.dataset(dataset)
    cfg = getattr(params.evaluate, name)
    with stage_run(
        name, dataset, root=paths.root, experiment=params.pipeline.experiment, params=cfg.model_dump(mode="json")
    ) as run:
        metrics, metrics_path, figures = run_study(params, dataset, paths, log=lambda m, step: run.log_metrics(m, step))
        run.log_metrics(summary(metrics))
        run.log_artifact(metrics_path, "metrics")
        run.log_artifact(figures, "figures")
    return metrics_path


def anomaly(dataset: str, root: Path = Path(".")) -> Path:
    """One-class anomaly detection on ``dataset``: one model per normal class."""
    return _study("anomaly", dataset, root, lambda m: {"mean_auroc": m["mean_auroc"], "mean_auprc": m["mean_auprc"]})


def sparsity(dataset: str, root: Path = Path(".")) -> Path:
    """The sparse-autoencoder sweep over rho and beta on ``dataset``."""
    return _study("sparsity", dataset, root, lambda m: m)


def _listed(params: Params, dataset: str, section: str) -> None:
    """``dataset`` must be defined and listed in ``{section}.datasets`` (generate, collapse)."""
    params.dataset(dataset)
    if dataset not in getattr(params, section).datasets:
        raise ConfigError(f"params.yaml: {section}.datasets: {dataset!r} is not listed")


def classifier(dataset: str, root: Path = Path(".")) -> Path:
    """Train the domain classifier of ``dataset`` whose features the sample-quality metrics use."""
    from latentlab.generative import train_domain_classifier

    params, paths = _setup(root)
    _listed(params, dataset, "generate")
    with stage_run(
        "classifier",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params=params.generate.quality.classifier.model_dump(mode="json"),
    ) as run:
        metrics, metrics_path = train_domain_classifier(params, dataset, paths, run)
        run.log_metrics(metrics)
        run.log_artifact(metrics_path, "metrics")
    return metrics_path


def generate(dataset: str, model: str, root: Path = Path(".")) -> Path:
    """Train generative model ``model`` (a key of generate.zoo) on ``dataset`` and measure its samples."""
    from latentlab.generative import evaluate_generative, train_generative

    params, paths = _setup(root)
    _listed(params, dataset, "generate")
    spec = params.generate.spec(model)
    if model not in params.generate.models:
        raise ConfigError(f"params.yaml: generate.models: {model!r} is defined in generate.zoo but not listed")
    with stage_run(
        "generate",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params={"model": spec.model_dump(mode="json"), "quality": params.generate.quality.model_dump(mode="json")},
        tags={"latentlab.model": model, "latentlab.family": spec.family},
    ) as run:
        trained = train_generative(params, dataset, model, paths, run)
        run.log_metrics(trained["metrics"])
        metrics, metrics_path, figures = evaluate_generative(params, dataset, model, paths)
        run.log_metrics(metrics)
        run.register_logged_models(registered_name(dataset, model), {**trained["metrics"], **metrics})
        run.log_artifact(metrics_path, "metrics")
        run.log_artifact(figures, "figures")
    return metrics_path


def collapse_runs(dataset: str, loops: list[str], seeds: list[int], root: Path = Path(".")) -> Path:
    """Run some (loop type, seed) pairs of the collapse study, saving each finished generation.

    The Prefect ``collapse`` flow runs the pairs in parallel with this, then
    :func:`collapse` once, which finds them finished and only summarises.
    """
    from latentlab.collapse import run_collapse_pairs

    params, paths = _setup(root)
    _listed(params, dataset, "collapse")
    run_collapse_pairs(params, dataset, paths, loops=loops, seeds=seeds)
    return paths.collapse_state(dataset)


def collapse(dataset: str, root: Path = Path(".")) -> Path:
    """The model-collapse study on ``dataset``: one MLflow parent run, one child run per generation."""
    from latentlab.collapse import run_collapse

    params, paths = _setup(root)
    _listed(params, dataset, "collapse")
    with stage_run(
        "collapse",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params={"collapse": params.collapse.model_dump(mode="json")},
        tags={"latentlab.model": params.collapse.model},
    ) as run:
        metrics, metrics_path, figures = run_collapse(params, dataset, paths)
        for result in metrics["results"]:
            loop, seed, generation, phase = result["loop"], result["seed"], result["generation"], result["phase"]
            run.log_child_run(
                f"collapse:{dataset}:{loop}:seed{seed}:{phase}{generation}",
                params={k: result[k] for k in ("loop", "seed", "generation", "phase", "n_real", "n_synthetic")},
                metrics={**result["metrics"], "seconds": result["seconds"]},
                tags={"latentlab.stage": "collapse-generation", "latentlab.dataset": dataset},
            )
        run.log_metrics({"relative_change": metrics.get("relative_change", {})})
        run.set_tags({"latentlab.collapse_pattern": str(metrics.get("pattern", {}).get("verdict", ""))[:5000]})
        run.log_artifact(metrics_path, "metrics")
        run.log_artifact(figures, "figures")
    return metrics_path


def report(root: Path = Path(".")) -> Path:
    """Write ``reports/index.html``."""
    from latentlab.report import build_report

    params, paths = _setup(root)
    with stage_run("report", None, root=paths.root, experiment=params.pipeline.experiment) as run:
        index = build_report(params, paths)
        run.log_artifact(index, "report")
    return index
