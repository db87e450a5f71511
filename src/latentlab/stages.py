"""The pipeline's stages as plain functions: the one entry point for DVC (via the
CLI), the ``latentlab`` commands and the Prefect tasks.

Each loads ``params.yaml`` once, opens one MLflow run, calls the library
function that does the work, logs what it produced, and returns the path of
its main output. Paths are relative to ``root``, the folder of ``dvc.yaml``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from latentlab.config import Params, load_params
from latentlab.errors import ConfigError, ValidationFailed
from latentlab.paths import ProjectPaths
from latentlab.tracking import stage_run

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


def _family(params: Params, family: str) -> None:
    from latentlab.train import TRAINERS

    if family not in TRAINERS:
        raise ConfigError(f"model family {family!r} is unknown (known: {', '.join(sorted(TRAINERS))})")
    if family not in params.train.models:
        raise ConfigError(f"params.yaml: train.models: {family!r} is not listed")


def train(dataset: str, family: str = "pca", root: Path = Path(".")) -> Path:
    """Train model ``family`` on ``dataset`` into ``models/{dataset}/{family}``."""
    from latentlab.train import TRAINERS

    params, paths = _setup(root)
    params.dataset(dataset)
    _family(params, family)
    with stage_run(
        "train", dataset, root=paths.root, experiment=params.pipeline.experiment, tags={"latentlab.model": family}
    ) as run:
        result = TRAINERS[family](params, paths.processed(dataset), paths.model(dataset, family))
        run.log_params(result.params)
        run.log_metrics(result.metrics)
        run.log_artifact(result.model_dir, "model")
    return result.model_dir


def evaluate(dataset: str, family: str = "pca", root: Path = Path(".")) -> Path:
    """Evaluate model ``family`` on ``dataset``: metrics, plots and figures."""
    from latentlab.evaluate import EVALUATORS

    params, paths = _setup(root)
    params.dataset(dataset)
    _family(params, family)
    with stage_run(
        "evaluate",
        dataset,
        root=paths.root,
        experiment=params.pipeline.experiment,
        params=params.evaluate.model_dump(mode="json"),
        tags={"latentlab.model": family},
    ) as run:
        result = EVALUATORS[family](params, dataset, paths)
        run.log_metrics(result.metrics)
        run.log_artifact(result.metrics_path, "metrics")
        run.log_artifact(result.report_dir, "figures")
    return result.metrics_path


def report(root: Path = Path(".")) -> Path:
    """Write ``reports/index.html``."""
    from latentlab.report import build_report

    params, paths = _setup(root)
    with stage_run("report", None, root=paths.root, experiment=params.pipeline.experiment) as run:
        index = build_report(params, paths)
        run.log_artifact(index, "report")
    return index
