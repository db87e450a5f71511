"""The ``latentlab`` command: one sub-command per pipeline stage, plus the
Prefect flow and the MLflow UI. Each is a thin adapter over
:mod:`latentlab.stages`; errors in the user's input print one line and exit 2."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from latentlab.errors import LatentlabError

app = typer.Typer(
    help="latentlab: a reproducible pipeline for autoencoders, VAEs and GANs (DVC + Prefect + MLflow).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")
Root = Annotated[Path, typer.Option("--root", help="Project folder (holds dvc.yaml and params.yaml).")]
Dataset = Annotated[str, typer.Argument(help="Dataset name, a key of ingest.datasets in params.yaml.")]
Model = Annotated[str, typer.Option("--model", "-m", help="Model name, a key of train.zoo listed in train.models.")]


def _run(fn: Callable[[], T]) -> T:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except LatentlabError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def ingest(dataset: Dataset, root: Root = Path(".")) -> None:
    """Read a dataset from its source into data/processed/DATASET."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.ingest(dataset, root)))


@app.command()
def validate(dataset: Dataset, root: Root = Path(".")) -> None:
    """Check a processed dataset with Great Expectations; fails on a failed expectation."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.validate(dataset, root)))


@app.command()
def corrupt(dataset: Dataset, root: Root = Path(".")) -> None:
    """Write the noise corruptions of a dataset into data/corrupted/DATASET."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.corrupt(dataset, root)))


@app.command()
def train(dataset: Dataset, model: Model = "pca", root: Root = Path(".")) -> None:
    """Train a model of train.zoo on a dataset into models/DATASET/MODEL.

    Under torchrun (several processes, DistributedDataParallel) every rank
    trains; rank 0 writes the model and prints its path.
    """
    from latentlab import stages

    out = _run(lambda: stages.train(dataset, model, root))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(out)


@app.command()
def evaluate(dataset: Dataset, model: Model = "pca", root: Root = Path(".")) -> None:
    """Evaluate a trained model: metrics/DATASET/MODEL.json and figures under reports/."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.evaluate(dataset, model, root)))


@app.command()
def compare(dataset: Dataset, root: Root = Path(".")) -> None:
    """Compare all models of a dataset and classical baselines: metrics/DATASET/compare.json."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.compare(dataset, root)))


@app.command()
def anomaly(dataset: Dataset, root: Root = Path(".")) -> None:
    """One-class anomaly detection: a model per normal class, AUROC/AUPRC per class."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.anomaly(dataset, root)))


@app.command()
def sparsity(dataset: Dataset, root: Root = Path(".")) -> None:
    """Train the sparse-autoencoder sweep over rho and beta and map its code activations."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.sparsity(dataset, root)))


@app.command()
def classifier(dataset: Dataset, root: Root = Path(".")) -> None:
    """Train the domain classifier whose features the sample-quality metrics use."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.classifier(dataset, root)))


GenModel = Annotated[str, typer.Option("--model", "-m", help="Generative model, a key of generate.zoo.")]


@app.command()
def generate(dataset: Dataset, model: GenModel, root: Root = Path(".")) -> None:
    """Train a generative model (VAE, GAN, DCGAN, cGAN) and measure the quality of its samples."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.generate(dataset, model, root)))


@app.command()
def collapse(dataset: Dataset, root: Root = Path(".")) -> None:
    """Model-collapse study: retrain generative models on their own samples over generations."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.collapse(dataset, root)))


@app.command("collapse-runs")
def collapse_runs(
    dataset: Dataset,
    loop: Annotated[
        list[str], typer.Option("--loop", help="Loop type(s) to run (replace, accumulate, augment, fresh).")
    ],
    seed: Annotated[list[int], typer.Option("--seed", help="Seed(s) to run.")],
    root: Root = Path("."),
) -> None:
    """Run some (loop, seed) pairs of the collapse study and save their generations (no summary)."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.collapse_runs(dataset, loop, seed, root)))


@app.command()
def serve(root: Root = Path(".")) -> None:
    """Serve the Prefect deployments (pipeline and collapse, on their cron schedules) until Ctrl-C."""
    from latentlab.deploy import serve as serve_deployments

    if not os.environ.get("PREFECT_API_URL"):
        typer.echo(
            "error: PREFECT_API_URL is not set: start a server (latentlab server) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, or point it at a remote server",
            err=True,
        )
        raise typer.Exit(2)
    _run(lambda: serve_deployments(root))


@app.command()
def server(port: Annotated[int, typer.Option(help="Port of the API and UI.")] = 4200) -> None:
    """Start a local Prefect server on 127.0.0.1 (UI and API) until Ctrl-C."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    typer.echo(
        f"Prefect UI on http://127.0.0.1:{port}; in other shells: export PREFECT_API_URL=http://127.0.0.1:{port}/api"
    )
    raise typer.Exit(subprocess.call(cmd))


@app.command("next-runs")
def next_runs(root: Root = Path("."), count: Annotated[int, typer.Option(help="Runs to list.")] = 3) -> None:
    """Print when each scheduled deployment runs next."""
    from latentlab.config import load_params
    from latentlab.deploy import COLLAPSE_DEPLOYMENT, PIPELINE_DEPLOYMENT
    from latentlab.deploy import next_runs as upcoming

    schedule = _run(lambda: load_params(root / "params.yaml")).schedule
    for name, cfg in ((PIPELINE_DEPLOYMENT, schedule.pipeline), (COLLAPSE_DEPLOYMENT, schedule.collapse)):
        when = (
            ", ".join(t.isoformat() for t in upcoming(cfg.cron, schedule.timezone, count)) if cfg.cron else "on demand"
        )
        typer.echo(f"{name} ({cfg.cron or 'no schedule'}, {schedule.timezone}): {when}")


@app.command()
def report(root: Root = Path(".")) -> None:
    """Write reports/index.html from what the other stages produced."""
    from latentlab import stages

    typer.echo(_run(lambda: stages.report(root)))


@app.command()
def flow(root: Root = Path(".")) -> None:
    """Run the whole pipeline as a Prefect flow (each stage a task run)."""
    from latentlab.orchestration import pipeline_flow

    _run(lambda: pipeline_flow(str(root)))


class Runner(StrEnum):
    dask = "dask"
    serial = "serial"


@app.command()
def sweep(
    root: Root = Path("."),
    runner: Annotated[
        Runner | None, typer.Option(help="Task runner; default: sweep.runner in params.yaml.", case_sensitive=False)
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Scheduler of a running Dask cluster (tcp://host:8786); implies --runner dask. "
            "Default: $LATENTLAB_DASK_ADDRESS, then sweep.dask.address; none = a local cluster."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes of a local Dask cluster; default: sweep.dask.n_workers.")
    ] = None,
) -> None:
    """Run the sweep of params.yaml (sweep section) as a Prefect flow, one task run per grid point."""
    from latentlab.orchestration import run_sweep

    typer.echo(
        _run(lambda: run_sweep(str(root), runner=runner.value if runner else None, address=address, workers=workers))
    )


@app.command()
def check_params(root: Root = Path(".")) -> None:
    """Validate params.yaml and print the parsed configuration."""
    from latentlab.config import load_params

    params = _run(lambda: load_params(Path(root) / "params.yaml"))
    typer.echo(params.model_dump_json(indent=2, by_alias=True))


@app.command()
def overlay_args(
    overlay: Annotated[Path, typer.Argument(help="A partial params file, e.g. configs/full_scale.yaml.")],
    root: Root = Path("."),
) -> None:
    """Print `dvc exp run` -S arguments that apply OVERLAY on params.yaml (checked first).

    Values are written without spaces so that `dvc exp run $(latentlab overlay-args FILE)` works.
    """
    from latentlab.overlay import overlay_args as build

    args = _run(lambda: build(Path(root) / "params.yaml", overlay))
    typer.echo(" ".join(args))


@app.command()
def ui(
    root: Root = Path("."),
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
) -> None:
    """Serve the MLflow UI over mlruns/ on 127.0.0.1."""
    from latentlab.tracking import tracking_uri

    uri = tracking_uri(root)
    typer.echo(f"MLflow UI on http://127.0.0.1:{port} over {uri}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd, env=dict(os.environ)))


warm_app = typer.Typer(
    help="The warm stage server: stage commands fork from a process that has already imported torch and MLflow.",
    no_args_is_help=True,
)
app.add_typer(warm_app, name="warm")


@warm_app.command("status")
def warm_status() -> None:
    """List the running warm servers of this user (pid, socket, commands in flight)."""
    from latentlab import warm

    found = warm.servers()
    if not found:
        typer.echo(f"no warm server in {warm.server_dir()}")
    for server in found:
        typer.echo(f"pid {server['pid']}  {server['socket']}  running {server['running']} command(s)")


@warm_app.command("stop")
def warm_stop() -> None:
    """Stop every warm server of this user once its running commands end."""
    from latentlab import warm

    asked, running = warm.stop_all()
    typer.echo(f"stopped {asked - running} warm server(s)" + (f"; {running} still finishing" if running else ""))


if __name__ == "__main__":
    app()
